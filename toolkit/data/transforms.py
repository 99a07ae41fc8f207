"""SSD-faithful data augmentation: the train and test transforms of SSD300 / DSOD300.

This reproduces what SSD-Caffe's ``AnnotatedData`` layer did with the
``transform_param`` / ``annotated_data_param`` blocks of the SSD and DSOD
``train.prototxt`` files, in Caffe's order:

1. **Photometric distortion** (``distort_param``; ours, :func:`distort_image`).
   With probability 0.5 the order is brightness, contrast, saturation, hue;
   otherwise brightness, saturation, hue, contrast; then an optional random
   channel permutation (``random_order_prob``, 0 in the recipes).  Each step
   fires with its own probability (0.5).  Semantics are Caffe's, on ``uint8``
   BGR with saturating arithmetic (``cv::Mat::convertTo``):

   - brightness: ``x + δ``, ``δ ~ U(-32, 32)``;
   - contrast: ``x · α``, ``α ~ U(0.5, 1.5)`` (about zero, not about the mean);
   - saturation: OpenCV 8-bit HSV, ``S · α``, ``α ~ U(0.5, 1.5)``;
   - hue: OpenCV 8-bit HSV (H in [0, 180)), ``H + δ``, ``δ ~ U(-18, 18)``,
     saturated to [0, 255] rather than wrapped (OpenCV's HSV→BGR then reads
     H ≥ 180 modulo 180; negative values clamp to 0).

   albumentations' colour transforms differ (contrast about the mean, hue
   wrap-around, float LUTs), so these are ours.
2. **Expand** (``expand_param``; ours, :func:`expand_image`): with probability
   0.5, place the image at a random integer offset in a canvas up to 4× larger
   filled with the mean pixel (104, 117, 123).
3. **Batch samplers** (``batch_sampler``; ours, :func:`generate_batch_samples`):
   the whole image plus up to one crop per sampler (scale U[0.3, 1], aspect
   ratio U[0.5, 2] clamped to [scale², 1/scale²], 50 trials) that satisfies its
   Jaccard constraint with at least one object (min 0.1/0.3/0.5/0.7/0.9, or
   max 1.0); one candidate is chosen uniformly.  The crop's pixel window is
   Caffe's ``int()`` truncation of the normalized box while the boxes are
   projected with the normalized box itself, exactly as Caffe did.
4. **Emit constraint CENTER** (ours, :func:`crop_boxes`): an object is kept
   only if its centre lies inside the crop (bounds inclusive); kept boxes are
   clipped to the crop; boxes with zero area after clipping are dropped.
5. **Warp resize** to the network size with an interpolation drawn uniformly
   from LINEAR, AREA, NEAREST, CUBIC, LANCZOS4 — albumentations ``Resize``
   (cv2.resize, the function Caffe called; boxes scale with the image).
6. **Mirror** with probability 0.5 — albumentations ``HorizontalFlip``
   (``x ↦ W - x`` on continuous coordinates, Caffe's ``1 - x`` normalized).
7. **Caffe preprocessing** (:class:`CaffePreprocess`): float, ``(x - mean) ·
   scale`` in BGR order (mean 104/117/123; DSOD's deploy nets use scale 0.017),
   HWC → CHW.

The test transform is a plain LINEAR warp followed by the same preprocessing.

Boxes are continuous absolute pixel ``xyxy`` (see :mod:`toolkit.data.voc`)
before and after; the sampler internals work, like Caffe, on boxes normalized
by the current image size.  Random decisions come from a ``numpy.random.Generator``
seeded per process from ``torch.initial_seed()`` (so DataLoader workers differ
and runs repeat under ``torch.manual_seed``), or from an explicit ``rng``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import albumentations as A
import cv2
import numpy as np
import torch

# Caffe's ResizeParameter interp_mode list order in the SSD recipes.
INTERPOLATIONS: dict[str, int] = {
    "LINEAR": cv2.INTER_LINEAR,
    "AREA": cv2.INTER_AREA,
    "NEAREST": cv2.INTER_NEAREST,
    "CUBIC": cv2.INTER_CUBIC,
    "LANCZOS4": cv2.INTER_LANCZOS4,
}


@dataclass(frozen=True)
class CaffePreprocess:
    """Caffe's ``transform_param`` pixel preprocessing: ``(x - mean_bgr) * scale``.

    ``channel_order="rgb"`` swaps to RGB after the mean is subtracted (the mean
    stays given in BGR, as Caffe writes it).
    """

    mean_bgr: tuple[float, float, float] = (104.0, 117.0, 123.0)
    scale: float = 1.0
    channel_order: str = "bgr"

    def __call__(self, image_bgr: np.ndarray) -> torch.Tensor:
        """``uint8 (H, W, 3)`` BGR → ``float32 (3, H, W)`` tensor."""
        x = image_bgr.astype(np.float32)
        x -= np.asarray(self.mean_bgr, dtype=np.float32)
        if self.scale != 1.0:
            x *= np.float32(self.scale)
        if self.channel_order == "rgb":
            x = x[:, :, ::-1]
        elif self.channel_order != "bgr":
            raise ValueError(f"channel_order must be 'bgr' or 'rgb', got {self.channel_order!r}")
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def invert(self, tensor: torch.Tensor) -> np.ndarray:
        """``float (3, H, W)`` → ``uint8 (H, W, 3)`` BGR (for drawing and tests)."""
        x = tensor.detach().cpu().numpy().transpose(1, 2, 0)
        if self.channel_order == "rgb":
            x = x[:, :, ::-1]
        x = x / self.scale + np.asarray(self.mean_bgr, dtype=np.float32)
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)


PREPROCESS_PRESETS: dict[str, CaffePreprocess] = {
    # SSD300-VGG16: BGR, mean subtraction only.
    "ssd": CaffePreprocess(),
    # DSOD300 / GRP-DSOD320: BGR, mean subtraction, then scale 0.017.
    "dsod": CaffePreprocess(scale=0.017),
}


@dataclass(frozen=True)
class DistortParams:
    """Caffe ``DistortionParameter`` with the SSD/DSOD recipe values."""

    brightness_prob: float = 0.5
    brightness_delta: float = 32.0
    contrast_prob: float = 0.5
    contrast_lower: float = 0.5
    contrast_upper: float = 1.5
    hue_prob: float = 0.5
    hue_delta: float = 18.0
    saturation_prob: float = 0.5
    saturation_lower: float = 0.5
    saturation_upper: float = 1.5
    random_order_prob: float = 0.0


@dataclass(frozen=True)
class ExpandParams:
    """Caffe ``ExpansionParameter`` with the SSD/DSOD recipe values."""

    prob: float = 0.5
    max_expand_ratio: float = 4.0


@dataclass(frozen=True)
class BatchSampler:
    """Caffe ``BatchSampler``: a ``Sampler`` box distribution plus a ``SampleConstraint``.

    The defaults (scale and aspect 1, one trial, no constraint) are Caffe's
    defaults and yield the whole image.  ``None`` means the constraint field is unset.
    """

    min_scale: float = 1.0
    max_scale: float = 1.0
    min_aspect_ratio: float = 1.0
    max_aspect_ratio: float = 1.0
    min_jaccard_overlap: Optional[float] = None
    max_jaccard_overlap: Optional[float] = None
    min_sample_coverage: Optional[float] = None
    max_sample_coverage: Optional[float] = None
    min_object_coverage: Optional[float] = None
    max_object_coverage: Optional[float] = None
    max_sample: int = 1
    max_trials: int = 1

    def __post_init__(self) -> None:
        if not (0.0 < self.min_scale <= self.max_scale <= 1.0):
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {self}")
        if not (0.0 < self.min_aspect_ratio <= self.max_aspect_ratio):
            raise ValueError(f"need 0 < min_aspect_ratio <= max_aspect_ratio, got {self}")


def _ssd_sampler(**constraint: float) -> BatchSampler:
    return BatchSampler(0.3, 1.0, 0.5, 2.0, max_trials=50, **constraint)


SSD_BATCH_SAMPLERS: tuple[BatchSampler, ...] = (
    BatchSampler(),  # the original image
    _ssd_sampler(min_jaccard_overlap=0.1),
    _ssd_sampler(min_jaccard_overlap=0.3),
    _ssd_sampler(min_jaccard_overlap=0.5),
    _ssd_sampler(min_jaccard_overlap=0.7),
    _ssd_sampler(min_jaccard_overlap=0.9),
    _ssd_sampler(max_jaccard_overlap=1.0),
)
"""The seven samplers of the SSD300 / DSOD300 / GRP-DSOD320 train prototxts."""


# --------------------------------------------------------------------------- rng
_PROCESS_RNG: dict[int, np.random.Generator] = {}


def process_rng() -> np.random.Generator:
    """A generator for this process, seeded from ``torch.initial_seed()``.

    DataLoader workers get distinct ``torch.initial_seed()`` values, so each worker
    draws a different stream; re-created after a fork (keyed by pid).
    """
    pid = os.getpid()
    rng = _PROCESS_RNG.get(pid)
    if rng is None:
        rng = np.random.default_rng(torch.initial_seed() % (2**63))
        _PROCESS_RNG.clear()
        _PROCESS_RNG[pid] = rng
    return rng


# --------------------------------------------------------------- photometric
def _convert_to(x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """``cv::Mat::convertTo(out, -1, alpha, beta)`` on uint8: round, then saturate."""
    # OpenCV computes in float and rounds half to even (cvRound), as np.rint does.
    y = x.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def adjust_brightness(image: np.ndarray, delta: float) -> np.ndarray:
    """Caffe ``AdjustBrightness``: ``saturate(x + delta)``."""
    return _convert_to(image, 1.0, delta) if delta != 0 else image


def adjust_contrast(image: np.ndarray, alpha: float) -> np.ndarray:
    """Caffe ``AdjustContrast``: ``saturate(x * alpha)`` (skipped when |alpha - 1| <= 1e-3)."""
    return _convert_to(image, alpha, 0.0) if abs(alpha - 1.0) > 1e-3 else image


def adjust_saturation(image: np.ndarray, alpha: float) -> np.ndarray:
    """Caffe ``AdjustSaturation``: 8-bit HSV, ``S = saturate(S * alpha)``, back to BGR."""
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    hsv[:, :, 1] = _convert_to(hsv[:, :, 1], alpha, 0.0)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def adjust_hue(image: np.ndarray, delta: float) -> np.ndarray:
    """Caffe ``AdjustHue``: 8-bit HSV, ``H = saturate(H + delta)`` (no wrap), back to BGR."""
    if delta == 0:
        return image
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    hsv[:, :, 0] = _convert_to(hsv[:, :, 0], 1.0, delta)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def distort_image(image: np.ndarray, params: DistortParams, rng: np.random.Generator) -> np.ndarray:
    """Caffe ``ApplyDistort`` on a ``uint8 (H, W, 3)`` BGR image; returns a new array."""
    p = params

    def brightness(x):
        if rng.uniform() < p.brightness_prob:
            return adjust_brightness(x, rng.uniform(-p.brightness_delta, p.brightness_delta))
        return x

    def contrast(x):
        if rng.uniform() < p.contrast_prob:
            return adjust_contrast(x, rng.uniform(p.contrast_lower, p.contrast_upper))
        return x

    def saturation(x):
        if rng.uniform() < p.saturation_prob:
            return adjust_saturation(x, rng.uniform(p.saturation_lower, p.saturation_upper))
        return x

    def hue(x):
        if rng.uniform() < p.hue_prob:
            return adjust_hue(x, rng.uniform(-p.hue_delta, p.hue_delta))
        return x

    if rng.uniform() > 0.5:
        order = (brightness, contrast, saturation, hue)
    else:
        order = (brightness, saturation, hue, contrast)
    out = image
    for step in order:
        out = step(out)
    if rng.uniform() < p.random_order_prob:
        out = np.ascontiguousarray(out[:, :, rng.permutation(3)])
    return out


# --------------------------------------------------------------------- expand
@dataclass(frozen=True)
class Expansion:
    """A drawn expansion: the canvas size and where the image's top-left corner sits on it."""

    canvas_h: int
    canvas_w: int
    y_off: int
    x_off: int


def draw_expansion(height: int, width: int, params: ExpandParams, rng: np.random.Generator) -> Optional[Expansion]:
    """Caffe ``ExpandImage``'s random draws: ``None`` when the coin (``prob``) or the ratio
    (``|ratio - 1| < 0.01``) says not to expand; offsets are floored to whole pixels."""
    if rng.uniform() >= params.prob:
        return None
    ratio = rng.uniform(1.0, params.max_expand_ratio)
    if abs(ratio - 1.0) < 1e-2:
        return None
    new_h, new_w = int(height * ratio), int(width * ratio)
    y_off = int(math.floor(rng.uniform(0.0, new_h - height)))
    x_off = int(math.floor(rng.uniform(0.0, new_w - width)))
    return Expansion(new_h, new_w, y_off, x_off)


def _fill_pixel(fill_bgr: Sequence[float]) -> np.ndarray:
    # Caffe sets the canvas of a uint8 cv::Mat to the mean values, i.e. rounded.
    return np.clip(np.rint(np.asarray(fill_bgr, dtype=np.float64)), 0, 255).astype(np.uint8)


def crop_from_canvas(
    image: np.ndarray, expansion: Expansion, window: tuple[int, int, int, int], fill_bgr: Sequence[float]
) -> np.ndarray:
    """The ``(x0, y0, w, h)`` window of the expanded canvas, without building the canvas.

    Equal to cropping the output of :func:`expand_image`, but only the window is
    allocated (the canvas can be 16 times the image).
    """
    x0, y0, cw, ch = window
    h, w = image.shape[:2]
    # The image's rectangle in window coordinates, intersected with the window.
    ix0, iy0 = max(expansion.x_off - x0, 0), max(expansion.y_off - y0, 0)
    ix1, iy1 = min(expansion.x_off + w - x0, cw), min(expansion.y_off + h - y0, ch)
    if ix0 == 0 and iy0 == 0 and ix1 == cw and iy1 == ch:
        sy, sx = y0 - expansion.y_off, x0 - expansion.x_off
        return image[sy : sy + ch, sx : sx + cw]
    fill = tuple(int(v) for v in _fill_pixel(fill_bgr))
    if ix1 > ix0 and iy1 > iy0:
        sy, sx = y0 + iy0 - expansion.y_off, x0 + ix0 - expansion.x_off
        part = image[sy : sy + (iy1 - iy0), sx : sx + (ix1 - ix0)]
        # One C pass for paste + fill (numpy's broadcast fill of 3-channel pixels is ~30x slower).
        return cv2.copyMakeBorder(part, iy0, ch - iy1, ix0, cw - ix1, cv2.BORDER_CONSTANT, value=fill)
    out = np.empty((ch, cw, 3), dtype=np.uint8)
    for c in range(3):
        out[:, :, c] = fill[c]
    return out


def expand_image(
    image: np.ndarray,
    boxes_xyxy: np.ndarray,
    params: ExpandParams,
    fill_bgr: Sequence[float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Caffe ``ExpandImage``: zoom out onto a mean-filled canvas (materialised).

    Args:
        image: ``uint8 (H, W, 3)``.
        boxes_xyxy: ``(N, 4)`` continuous pixels.
        fill_bgr: canvas colour (the mean values, rounded into uint8).
    Returns:
        ``(canvas (H', W', 3), boxes shifted by the offset)``; the inputs unchanged
        when :func:`draw_expansion` says not to expand.
    """
    h, w = image.shape[:2]
    e = draw_expansion(h, w, params, rng)
    if e is None:
        return image, boxes_xyxy
    canvas = crop_from_canvas(image, e, (0, 0, e.canvas_w, e.canvas_h), fill_bgr)
    return canvas, boxes_xyxy + np.array([e.x_off, e.y_off, e.x_off, e.y_off], dtype=boxes_xyxy.dtype)


# ------------------------------------------------------------ batch sampling
def _intersection(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise intersection areas of normalized boxes: ``(T, 4) x (N, 4) -> (T, N)``."""
    ix0 = np.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    iy0 = np.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1])
    ix1 = np.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2])
    iy1 = np.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3])
    return np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def satisfies_constraint(samples: np.ndarray, boxes_norm: np.ndarray, sampler: BatchSampler) -> np.ndarray:
    """Caffe ``SatisfySampleConstraint`` for ``(T, 4)`` normalized samples → bool ``(T,)``.

    A sample satisfies the constraint when none is set, or when at least one object
    meets every set bound: Jaccard overlap, sample coverage (intersection over the
    sample's area) and object coverage (intersection over the object's area).
    (Caffe's loop also counts an object that passed the Jaccard test but failed a
    later coverage test; the SSD recipes set Jaccard bounds only, where both agree.)
    """
    samples = np.asarray(samples, dtype=np.float64).reshape(-1, 4)
    s = sampler
    has_jaccard = s.min_jaccard_overlap is not None or s.max_jaccard_overlap is not None
    has_sample_cov = s.min_sample_coverage is not None or s.max_sample_coverage is not None
    has_object_cov = s.min_object_coverage is not None or s.max_object_coverage is not None
    if not (has_jaccard or has_sample_cov or has_object_cov):
        return np.ones(len(samples), dtype=bool)
    inter = _intersection(samples, boxes_norm)
    area_s = _area(samples)[:, None]
    area_b = _area(boxes_norm)[None, :]
    ok = np.ones(inter.shape, dtype=bool)
    checks = []
    if has_jaccard:
        checks.append((_safe_div(inter, area_s + area_b - inter), s.min_jaccard_overlap, s.max_jaccard_overlap))
    if has_sample_cov:
        checks.append((_safe_div(inter, np.broadcast_to(area_s, inter.shape)), s.min_sample_coverage, s.max_sample_coverage))
    if has_object_cov:
        checks.append((_safe_div(inter, np.broadcast_to(area_b, inter.shape)), s.min_object_coverage, s.max_object_coverage))
    for values, lo, hi in checks:
        if lo is not None:
            ok &= values >= lo
        if hi is not None:
            ok &= values <= hi
    return ok.any(axis=1)


def sample_boxes(sampler: BatchSampler, count: int, rng: np.random.Generator) -> np.ndarray:
    """Caffe ``SampleBBox`` drawn ``count`` times: ``(count, 4)`` normalized boxes in the unit square.

    scale ~ U[min_scale, max_scale], aspect ~ U[min_aspect, max_aspect] clamped to
    [scale², 1 / scale²] so that neither side exceeds 1; width = scale·√aspect,
    height = scale/√aspect; the corner is uniform over the positions that fit.
    """
    scale = rng.uniform(sampler.min_scale, sampler.max_scale, count)
    aspect = rng.uniform(sampler.min_aspect_ratio, sampler.max_aspect_ratio, count)
    aspect = np.minimum(np.maximum(aspect, scale**2), 1.0 / scale**2)
    w = np.minimum(scale * np.sqrt(aspect), 1.0)
    h = np.minimum(scale / np.sqrt(aspect), 1.0)
    x0 = rng.uniform(0.0, 1.0, count) * (1.0 - w)
    y0 = rng.uniform(0.0, 1.0, count) * (1.0 - h)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1)


def generate_batch_samples(
    boxes_norm: np.ndarray, samplers: Sequence[BatchSampler], rng: np.random.Generator
) -> list[np.ndarray]:
    """Caffe ``GenerateBatchSamples``: every sampler tries ``max_trials`` boxes and keeps
    the first ``max_sample`` that satisfy its constraint.

    The trials of one sampler are drawn and tested at once (the same distribution and
    the same "first successes" rule as Caffe's sequential loop).

    Args:
        boxes_norm: ``(N, 4)`` object boxes normalized by the image size.
    Returns:
        Candidate crops, normalized ``(4,)`` arrays (possibly empty).
    """
    boxes_norm = np.asarray(boxes_norm, dtype=np.float64).reshape(-1, 4)
    out: list[np.ndarray] = []
    for sampler in samplers:
        trials = sample_boxes(sampler, sampler.max_trials, rng)
        good = np.flatnonzero(satisfies_constraint(trials, boxes_norm, sampler))[: sampler.max_sample]
        out.extend(trials[good])
    return out


def crop_boxes(boxes_norm: np.ndarray, crop_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Emit constraint CENTER then Caffe ``ProjectBBox`` onto a crop.

    Args:
        boxes_norm: ``(N, 4)`` normalized boxes of the uncropped image.
        crop_norm: ``(4,)`` normalized crop window.
    Returns:
        ``(keep, projected)``: ``keep`` a bool mask ``(N,)`` and ``projected``
        ``(K, 4)`` boxes normalized to the crop, clipped to ``[0, 1]``, for the
        kept boxes in their original order.
    """
    cx = (boxes_norm[:, 0] + boxes_norm[:, 2]) / 2
    cy = (boxes_norm[:, 1] + boxes_norm[:, 3]) / 2
    keep = (cx >= crop_norm[0]) & (cx <= crop_norm[2]) & (cy >= crop_norm[1]) & (cy <= crop_norm[3])
    cw = crop_norm[2] - crop_norm[0]
    ch = crop_norm[3] - crop_norm[1]
    proj = (boxes_norm - crop_norm[[0, 1, 0, 1]]) / np.array([cw, ch, cw, ch])
    proj = np.clip(proj, 0.0, 1.0)
    keep &= (proj[:, 2] > proj[:, 0]) & (proj[:, 3] > proj[:, 1])
    return keep, proj[keep]


def _crop_window(crop_norm: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Caffe ``CropImage``'s integer window: ``int()`` of the scaled box corners and size."""
    x0 = int(crop_norm[0] * width)
    y0 = int(crop_norm[1] * height)
    w = int((crop_norm[2] - crop_norm[0]) * width)
    h = int((crop_norm[3] - crop_norm[1]) * height)
    return x0, y0, max(w, 1), max(h, 1)


# -------------------------------------------------------------- the transforms
def _unpack(target: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = target["boxes"]
    labels = target["labels"]
    difficult = target.get("difficult")
    boxes = boxes.numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes)
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if difficult is None:
        difficult = np.zeros(len(labels), dtype=bool)
    difficult = difficult.numpy() if isinstance(difficult, torch.Tensor) else np.asarray(difficult)
    return boxes.astype(np.float64).reshape(-1, 4), labels.astype(np.int64), difficult.astype(bool)


def _repack(target: dict, boxes: np.ndarray, labels: np.ndarray, difficult: np.ndarray) -> dict:
    out = dict(target)
    out["boxes"] = torch.from_numpy(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    out["labels"] = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    out["difficult"] = torch.from_numpy(np.asarray(difficult, dtype=bool))
    return out


class _WarpAndMirror:
    """albumentations ``Resize`` (one per interpolation) and ``HorizontalFlip``, box-aware."""

    def __init__(self, size_hw: tuple[int, int], interpolations: Sequence[str]) -> None:
        unknown = [m for m in interpolations if m not in INTERPOLATIONS]
        if unknown or not interpolations:
            raise ValueError(f"unknown interpolation(s) {unknown}; choose from {list(INTERPOLATIONS)}")
        bbox_params = A.BboxParams(format="pascal_voc", label_fields=["index"], clip=True)
        self.resizers = [
            A.Compose([A.Resize(size_hw[0], size_hw[1], interpolation=INTERPOLATIONS[m], p=1.0)], bbox_params=bbox_params)
            for m in interpolations
        ]
        self.flip = A.Compose([A.HorizontalFlip(p=1.0)], bbox_params=bbox_params)

    def __call__(self, image, boxes, interp_index: int, mirror: bool):
        index = np.arange(len(boxes))
        out = self.resizers[interp_index](image=image, bboxes=boxes, index=index)
        if mirror:
            out = self.flip(image=out["image"], bboxes=out["bboxes"], index=out["index"])
        # albumentations drops boxes that became degenerate; ``index`` says which remain.
        return out["image"], np.asarray(out["bboxes"], dtype=np.float64).reshape(-1, 4), np.asarray(out["index"], dtype=np.int64)


class SSDTrainTransform:
    """The SSD/DSOD train transform (module docstring, steps 1–7).

    Call with ``(image_bgr uint8 (H, W, 3), target)``; returns ``(image float32
    (3, size_h, size_w), target)`` with ``boxes`` in output pixels (xyxy
    continuous) and ``labels`` / ``difficult`` following their boxes.
    ``target["orig_size"]`` and ``image_id`` pass through.
    """

    def __init__(
        self,
        size: int | tuple[int, int] = 300,
        preprocess: CaffePreprocess = PREPROCESS_PRESETS["ssd"],
        distort: Optional[DistortParams] = DistortParams(),
        expand: Optional[ExpandParams] = ExpandParams(),
        samplers: Sequence[BatchSampler] = SSD_BATCH_SAMPLERS,
        interpolations: Sequence[str] = tuple(INTERPOLATIONS),
        mirror: bool = True,
        rng: Optional[np.random.Generator] = None,
    ) -> None:
        self.size_hw = (size, size) if isinstance(size, int) else tuple(size)
        self.preprocess = preprocess
        self.distort = distort
        self.expand = expand
        self.samplers = tuple(samplers)
        self.interpolations = tuple(interpolations)
        self.mirror = mirror
        self.rng = rng
        self._warp = _WarpAndMirror(self.size_hw, self.interpolations)

    def augment(
        self,
        image: np.ndarray,
        target: dict,
        rng: Optional[np.random.Generator] = None,
        timings: Optional[dict] = None,
    ):
        """Steps 1–6 on ``uint8`` BGR; returns ``(uint8 image, target)`` (no preprocessing).

        ``timings``, when given, accumulates seconds per stage ("distort", "expand +
        crop", "warp + mirror") for profiling (``bench/bench_data_pipeline.py``).
        """
        rng = rng or self.rng or process_rng()
        clock = time.perf_counter if timings is not None else None
        t0 = clock() if clock else 0.0
        boxes, labels, difficult = _unpack(target)
        if self.distort is not None:
            image = distort_image(image, self.distort, rng)
        if clock:
            t1 = clock()
            timings["distort"] = timings.get("distort", 0.0) + t1 - t0
            t0 = t1
        h, w = image.shape[:2]
        expansion = draw_expansion(h, w, self.expand, rng) if self.expand is not None else None
        if expansion is not None:
            # The canvas stays virtual: only the crop window is ever allocated.
            h, w = expansion.canvas_h, expansion.canvas_w
            boxes = boxes + np.array([expansion.x_off, expansion.y_off] * 2, dtype=np.float64)
        else:
            expansion = Expansion(h, w, 0, 0)
        scale = np.array([w, h, w, h], dtype=np.float64)
        candidates = generate_batch_samples(boxes / scale, self.samplers, rng) if self.samplers else []
        window = (0, 0, w, h)
        if candidates:
            crop = candidates[int(rng.integers(len(candidates)))]
            keep, proj = crop_boxes(boxes / scale, crop)
            window = _crop_window(crop, w, h)
            boxes = proj * np.array([window[2], window[3]] * 2, dtype=np.float64)
            labels, difficult = labels[keep], difficult[keep]
        image = np.ascontiguousarray(crop_from_canvas(image, expansion, window, self.preprocess.mean_bgr))
        if clock:
            t1 = clock()
            timings["expand + crop"] = timings.get("expand + crop", 0.0) + t1 - t0
            t0 = t1
        interp = int(rng.integers(len(self.interpolations)))
        mirror = bool(self.mirror and rng.integers(2))
        image, boxes, index = self._warp(image, boxes, interp, mirror)
        if clock:
            timings["warp + mirror"] = timings.get("warp + mirror", 0.0) + clock() - t0
        return image, _repack(target, boxes, labels[index], difficult[index])

    def __call__(self, image: np.ndarray, target: dict, rng: Optional[np.random.Generator] = None):
        image, target = self.augment(image, target, rng)
        return self.preprocess(image), target


class SSDTestTransform:
    """Caffe's TEST-phase transform: LINEAR warp to ``size`` then preprocessing.

    Returns ``(float32 (3, size_h, size_w), target)`` with boxes scaled to the output.
    """

    def __init__(
        self,
        size: int | tuple[int, int] = 300,
        preprocess: CaffePreprocess = PREPROCESS_PRESETS["ssd"],
        interpolation: str = "LINEAR",
    ) -> None:
        self.size_hw = (size, size) if isinstance(size, int) else tuple(size)
        self.preprocess = preprocess
        self._warp = _WarpAndMirror(self.size_hw, (interpolation,))

    def __call__(self, image: np.ndarray, target: dict, rng: Optional[np.random.Generator] = None):
        """``rng`` is accepted for interface symmetry with the train transform (unused)."""
        boxes, labels, difficult = _unpack(target)
        image, boxes, index = self._warp(image, boxes, 0, False)
        return self.preprocess(image), _repack(target, boxes, labels[index], difficult[index])


class RandomMirror:
    """Horizontal mirror with probability 0.5 of an image the test transform already
    warped and preprocessed (the ``mirror`` recipe of short CPU runs).

    Call with ``(image float (3, H, W) tensor, target, rng)``; boxes are xyxy continuous
    pixels of that image, and ``x`` maps to ``W - x``.  Mirroring commutes with Caffe's
    per-pixel preprocessing, so this equals warping (LINEAR), mirroring and then
    preprocessing, and a dataset can cache the warped images once.
    """

    def __call__(self, image: torch.Tensor, target: dict, rng: Optional[np.random.Generator] = None):
        rng = rng or process_rng()
        if not rng.integers(2):
            return image, target
        width = image.shape[-1]
        boxes = target["boxes"]
        out = dict(target)
        out["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        return image.flip(-1), out


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Stack same-sized images to ``(B, 3, H, W)``; targets stay a list of dicts."""
    images, targets = zip(*batch)
    return torch.stack(list(images)), list(targets)
