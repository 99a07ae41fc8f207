"""DETR-style augmentation and batching (Deformable DETR's ``datasets/coco.py`` / ``datasets/transforms.py``).

Train: random horizontal flip; then, with probability 0.5 each, either a resize
of the shorter side to a random scale (longer side capped at ``max_size``), or a
resize to a random ``crop_scales`` value, a random crop of ``crop_min..crop_max``
pixels per side, and a resize to a random scale; then RGB normalized with the
ImageNet mean and std.  Test: the shorter side resized to ``test_scale``.  The
resizes are ``cv2.resize`` LINEAR (the official code uses PIL's bilinear: the
same geometry).

Inputs are the datasets' ``uint8 (H, W, 3)`` BGR images and targets with
``boxes`` float32 ``(N, 4)`` xyxy in pixels; outputs are ``float32 (3, h, w)``
tensors and targets whose boxes are in pixels of the output image, plus
``size`` int64 ``(2,)`` = ``(h, w)`` (boxes that a crop leaves without area are
dropped, labels and difficult flags following them).  :func:`collate_padded`
pads a batch bottom-right and returns the padding mask.
"""

from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np
import torch

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
# Deformable DETR's COCO scales.
COCO_SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)


def resized_hw(h: int, w: int, size: int, max_size: Optional[int] = None) -> tuple[int, int]:
    """The output ``(h, w)`` when the shorter side becomes ``size`` and the longer at most ``max_size``
    (DETR's ``get_size_with_aspect_ratio``, integer rounding included)."""
    if max_size is not None:
        short, long = float(min(w, h)), float(max(w, h))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def _resize(image: np.ndarray, boxes: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h0, w0 = image.shape[:2]
    h, w = hw
    if (h, w) != (h0, w0):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    return image, boxes * np.array([w / w0, h / h0, w / w0, h / h0], dtype=np.float32)


def _to_tensor(image_bgr: np.ndarray) -> torch.Tensor:
    rgb = image_bgr[:, :, ::-1].astype(np.float32) / 255.0
    rgb = (rgb - np.asarray(IMAGENET_MEAN_RGB, np.float32)) / np.asarray(IMAGENET_STD_RGB, np.float32)
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def _unpack(target: dict) -> tuple[np.ndarray, dict]:
    boxes = target["boxes"].numpy() if isinstance(target["boxes"], torch.Tensor) else np.asarray(target["boxes"])
    return boxes.astype(np.float32).reshape(-1, 4), target


def _finish(image: np.ndarray, boxes: np.ndarray, keep: np.ndarray, target: dict):
    h, w = image.shape[:2]
    # Clipped to the image: a resize's float32 scale can put a border box a hair outside.
    boxes = np.minimum(np.maximum(boxes, 0), np.array([w, h, w, h], dtype=np.float32))
    out = dict(target)
    out["boxes"] = torch.from_numpy(np.ascontiguousarray(boxes[keep], dtype=np.float32).reshape(-1, 4))
    for key in ("labels", "difficult"):
        if key in target:
            value = target[key]
            out[key] = value[torch.from_numpy(keep)] if isinstance(value, torch.Tensor) else np.asarray(value)[keep]
    out["size"] = torch.tensor(image.shape[:2], dtype=torch.int64)
    return _to_tensor(image), out


class DETRTrainTransform:
    """The DETR train augmentation (module docstring).  Call with ``(image, target, rng)``."""

    def __init__(self, scales: Sequence[int] = COCO_SCALES, max_size: int = 1333,
                 crop_scales: Sequence[int] = (400, 500, 600), crop_min: int = 384, crop_max: int = 600) -> None:
        self.scales, self.max_size = tuple(scales), max_size
        self.crop_scales, self.crop_min, self.crop_max = tuple(crop_scales), crop_min, crop_max

    def __call__(self, image: np.ndarray, target: dict, rng: Optional[np.random.Generator] = None):
        rng = rng or np.random.default_rng()
        boxes, target = _unpack(target)
        keep = np.ones(len(boxes), dtype=bool)
        if rng.random() < 0.5:
            image = np.ascontiguousarray(image[:, ::-1])
            w = image.shape[1]
            boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        if rng.random() < 0.5:
            h, w = image.shape[:2]
            image, boxes = _resize(image, boxes, resized_hw(h, w, int(rng.choice(self.scales)), self.max_size))
        else:
            h, w = image.shape[:2]
            image, boxes = _resize(image, boxes, resized_hw(h, w, int(rng.choice(self.crop_scales))))
            h, w = image.shape[:2]
            ch = int(rng.integers(self.crop_min, max(self.crop_min, min(h, self.crop_max)) + 1))
            cw = int(rng.integers(self.crop_min, max(self.crop_min, min(w, self.crop_max)) + 1))
            ch, cw = min(ch, h), min(cw, w)
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            image = image[top:top + ch, left:left + cw]
            boxes = boxes - np.array([left, top, left, top], dtype=np.float32)
            boxes = np.minimum(np.maximum(boxes, 0), np.array([cw, ch, cw, ch], dtype=np.float32))
            keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            h, w = image.shape[:2]
            image, boxes = _resize(image, boxes, resized_hw(h, w, int(rng.choice(self.scales)), self.max_size))
        return _finish(image, boxes, keep, target)


class DETRTestTransform:
    """The shorter side resized to ``scale`` (longer side at most ``max_size``), normalized."""

    def __init__(self, scale: int = 800, max_size: int = 1333) -> None:
        self.scale, self.max_size = scale, max_size

    def __call__(self, image: np.ndarray, target: dict, rng: Optional[np.random.Generator] = None):
        boxes, target = _unpack(target)
        h, w = image.shape[:2]
        image, boxes = _resize(image, boxes, resized_hw(h, w, self.scale, self.max_size))
        return _finish(image, boxes, np.ones(len(boxes), dtype=bool), target)


class DETRFixedSizeTransform:
    """Every image warped to ``size_hw`` (aspect ratio not kept), normalized: the input of a DETR exported at a
    fixed size (``python -m toolkit.export``); batches stack without padding (:func:`collate_detection`)."""

    def __init__(self, size_hw: Sequence[int]) -> None:
        self.size_hw = (int(size_hw[0]), int(size_hw[1]))

    def __call__(self, image: np.ndarray, target: dict, rng: Optional[np.random.Generator] = None):
        boxes, target = _unpack(target)
        image, boxes = _resize(image, boxes, self.size_hw)
        return _finish(image, boxes, np.ones(len(boxes), dtype=bool), target)


def collate_padded(batch: Sequence[tuple[torch.Tensor, dict]]):
    """Images of different sizes -> ``((images (B, 3, H, W) zero-padded bottom-right, mask bool (B, H, W) True on
    padding), targets)``."""
    images, targets = zip(*batch)
    h = max(int(i.shape[1]) for i in images)
    w = max(int(i.shape[2]) for i in images)
    padded = images[0].new_zeros((len(images), 3, h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool)
    for k, image in enumerate(images):
        padded[k, :, :image.shape[1], :image.shape[2]] = image
        mask[k, :image.shape[1], :image.shape[2]] = False
    return (padded, mask), list(targets)
