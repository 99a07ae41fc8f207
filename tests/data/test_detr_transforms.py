"""DETR-style augmentation: sizes as DETR's get_size rule, boxes following the pixels, padded batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.data.detr_transforms import (IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, DETRTestTransform, DETRTrainTransform,
                                          collate_padded, resized_hw)


@pytest.mark.parametrize("h, w, size, max_size, expected", [
    (480, 640, 800, 1333, (800, 1066)),   # shorter side to 800: 640 * 800 / 480 = 1066.67, truncated
    (480, 640, 800, 1000, (750, 1000)),   # the longer side capped: size becomes round(1000 * 480 / 640) = 750
    (500, 333, 600, None, (900, 600)),    # portrait: int(600 * 500 / 333) = 900
    (300, 300, 300, None, (300, 300)),    # already that size
])
def test_resized_hw_follows_detrs_rule(h, w, size, max_size, expected):
    assert resized_hw(h, w, size, max_size) == expected


def _picture(h=240, w=320):
    """Black image with three white rectangles; their boxes as targets (xyxy pixels)."""
    image = np.zeros((h, w, 3), np.uint8)
    boxes = np.array([[20, 30, 120, 90], [150, 100, 300, 220], [60, 150, 100, 230]], np.float32)
    for x0, y0, x1, y1 in boxes.astype(int):
        image[y0:y1, x0:x1] = 255
    target = {"boxes": torch.from_numpy(boxes), "labels": torch.tensor([1, 2, 3]),
              "difficult": torch.tensor([False, True, False])}
    return image, target


def _white(tensor: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN_RGB).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD_RGB).view(3, 1, 1)
    return ((tensor * std + mean).mean(0) > 0.5).numpy()


def test_train_transform_boxes_follow_the_pixels():
    """Whatever flip / resize / crop is drawn, each surviving box covers white pixels and the image around a box's
    inside is the rectangle's: the box interiors are white, labels and difficult flags follow their boxes."""
    transform = DETRTrainTransform(scales=(160, 192, 224), max_size=300, crop_scales=(200, 240), crop_min=96,
                                   crop_max=200)
    sizes = set()
    for seed in range(40):
        image, target = _picture()
        out, t = transform(image, target, np.random.default_rng(seed))
        white = _white(out)
        assert tuple(t["size"].tolist()) == tuple(out.shape[1:])
        sizes.add(tuple(out.shape[1:]))
        assert len(t["boxes"]) == len(t["labels"]) == len(t["difficult"])
        for box, label, difficult in zip(t["boxes"], t["labels"], t["difficult"]):
            x0, y0, x1, y1 = box.tolist()
            assert 0 <= x0 < x1 <= out.shape[2] and 0 <= y0 < y1 <= out.shape[1]
            assert bool(difficult) == (int(label) == 2)
            inner = white[int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1]
            if inner.size:
                assert inner.mean() > 0.95, (seed, box)
    assert len(sizes) > 5  # the scales and crops vary


def test_test_transform_and_padded_batch():
    image, target = _picture()
    out, t = DETRTestTransform(120, 200)(image, target)
    assert out.shape == (3, 120, 160) and tuple(t["size"].tolist()) == (120, 160)
    torch.testing.assert_close(t["boxes"], target["boxes"] * 0.5)
    other, t2 = DETRTestTransform(100, 200)(image[:200, :100], {"boxes": torch.zeros(0, 4),
                                                                  "labels": torch.zeros(0, dtype=torch.int64)})
    (images, mask), targets = collate_padded([(out, t), (other, t2)])
    assert images.shape == (2, 3, 200, 160) and mask.shape == (2, 200, 160)
    assert not mask[0, :120].any() and mask[0, 120:].all()
    assert not mask[1, :, :100].any() and mask[1, :, 100:].all()
    assert torch.equal(images[0, :, :120], out) and images[0, :, 120:].abs().sum() == 0
    assert targets[1]["boxes"].shape == (0, 4)
