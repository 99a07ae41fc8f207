"""SSD augmentation: property tests (hypothesis) for boxes, the sampler constraints, the
emit-centre rule and labels following their boxes; exactness of the single steps."""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.data.transforms import (
    PREPROCESS_PRESETS,
    SSD_BATCH_SAMPLERS,
    CaffePreprocess,
    DistortParams,
    ExpandParams,
    RandomMirror,
    SSDTestTransform,
    SSDTrainTransform,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    collate_detection,
    crop_boxes,
    expand_image,
    generate_batch_samples,
)

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def image_and_boxes(draw, min_side=24, max_side=160, max_boxes=6):
    h = draw(st.integers(min_side, max_side))
    w = draw(st.integers(min_side, max_side))
    n = draw(st.integers(0, max_boxes))
    boxes = []
    for _ in range(n):
        x0 = draw(st.floats(0, w - 2, allow_nan=False))
        y0 = draw(st.floats(0, h - 2, allow_nan=False))
        x1 = draw(st.floats(x0 + 1, w, allow_nan=False))
        y1 = draw(st.floats(y0 + 1, h, allow_nan=False))
        boxes.append([x0, y0, x1, y1])
    seed = draw(st.integers(0, 2**31 - 1))
    return h, w, np.array(boxes, dtype=np.float64).reshape(-1, 4), seed


def _target(boxes, labels=None, difficult=None):
    n = len(boxes)
    labels = np.arange(1, n + 1) if labels is None else labels
    difficult = (np.arange(n) % 3 == 0) if difficult is None else difficult
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "difficult": torch.tensor(difficult, dtype=torch.bool),
        "image_id": "x",
    }


@SETTINGS
@given(image_and_boxes())
def test_train_transform_boxes_valid_and_labels_keep_their_flags(sample):
    h, w, boxes, seed = sample
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    target = _target(boxes)
    size = 64
    t = SSDTrainTransform(size, rng=rng)
    out, got = t(image, target)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    b = got["boxes"]
    assert b.dtype == torch.float32 and b.shape[1] == 4
    assert (b >= 0).all() and (b <= size).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    # Labels are unique per input box, so each output label names its source box.
    labels = got["labels"].tolist()
    assert len(set(labels)) == len(labels)
    src_difficult = dict(zip(target["labels"].tolist(), target["difficult"].tolist()))
    assert all(src_difficult[l] == d for l, d in zip(labels, got["difficult"].tolist()))
    assert got["image_id"] == "x"


def _iou_reference(sample, boxes):
    return torchvision.ops.box_iou(torch.tensor(sample[None], dtype=torch.float64),
                                   torch.tensor(boxes, dtype=torch.float64))[0].numpy()


@SETTINGS
@given(image_and_boxes(min_side=10, max_side=50, max_boxes=5))
def test_batch_samples_satisfy_their_constraints(sample):
    h, w, boxes, seed = sample
    rng = np.random.default_rng(seed)
    norm = boxes / np.array([w, h, w, h])
    for sampler in SSD_BATCH_SAMPLERS:
        for crop in generate_batch_samples(norm, [sampler], rng):
            assert 0 <= crop[0] < crop[2] <= 1 + 1e-12 and 0 <= crop[1] < crop[3] <= 1 + 1e-12
            cw, ch = crop[2] - crop[0], crop[3] - crop[1]
            scale = np.sqrt(cw * ch)
            assert sampler.min_scale - 1e-9 <= scale <= sampler.max_scale + 1e-9
            aspect = cw / ch
            lo = max(sampler.min_aspect_ratio, scale**2)
            hi = min(sampler.max_aspect_ratio, 1 / scale**2)
            assert lo - 1e-9 <= aspect <= hi + 1e-9
            if sampler.min_jaccard_overlap is not None or sampler.max_jaccard_overlap is not None:
                iou = _iou_reference(crop, norm)
                ok = np.ones(len(norm), bool)
                if sampler.min_jaccard_overlap is not None:
                    ok &= iou >= sampler.min_jaccard_overlap - 1e-12
                if sampler.max_jaccard_overlap is not None:
                    ok &= iou <= sampler.max_jaccard_overlap + 1e-12
                assert ok.any()


def test_unconstrained_sampler_is_the_whole_image():
    crops = generate_batch_samples(np.zeros((0, 4)), SSD_BATCH_SAMPLERS[:1], np.random.default_rng(0))
    np.testing.assert_allclose(crops, [[0, 0, 1, 1]])
    # Constrained samplers find nothing without objects.
    assert generate_batch_samples(np.zeros((0, 4)), SSD_BATCH_SAMPLERS[1:], np.random.default_rng(0)) == []


@SETTINGS
@given(image_and_boxes(min_side=10, max_side=50, max_boxes=8), st.floats(0, 0.6), st.floats(0, 0.6),
       st.floats(0.3, 1.0), st.floats(0.3, 1.0))
def test_emit_centre_rule_and_projection(sample, x0, y0, cw, ch):
    h, w, boxes, _ = sample
    norm = boxes / np.array([w, h, w, h])
    crop = np.array([x0, y0, min(x0 + cw, 1.0), min(y0 + ch, 1.0)])
    keep, proj = crop_boxes(norm, crop)
    for i, b in enumerate(norm):
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        centre_in = crop[0] <= cx <= crop[2] and crop[1] <= cy <= crop[3]
        if keep[i]:
            assert centre_in
        elif centre_in:
            # Kept unless the clipped box is degenerate.
            inter_w = min(b[2], crop[2]) - max(b[0], crop[0])
            inter_h = min(b[3], crop[3]) - max(b[1], crop[1])
            assert inter_w <= 1e-12 or inter_h <= 1e-12
    # Projected boxes, mapped back, are the original boxes intersected with the crop.
    size = np.array([crop[2] - crop[0], crop[3] - crop[1]] * 2)
    back = proj * size + crop[[0, 1, 0, 1]]
    inter = np.column_stack([np.maximum(norm[keep, 0], crop[0]), np.maximum(norm[keep, 1], crop[1]),
                             np.minimum(norm[keep, 2], crop[2]), np.minimum(norm[keep, 3], crop[3])])
    np.testing.assert_allclose(back, inter, atol=1e-12)


# Colours far from the expand fill (104, 117, 123) and from each other.
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255],
                    [0, 255, 255], [255, 255, 255], [0, 0, 0], [255, 128, 0]], dtype=np.uint8)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(48, 160), st.integers(48, 160))
def test_labels_follow_their_boxes_through_every_geometric_step(seed, h, w):
    """Paint each box in its label's colour; after expand, crop, warp (NEAREST) and mirror
    the centre pixel of every output box still has its label's colour."""
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), 128, np.uint8)
    boxes, labels = [], []
    # A 3x3 grid of cells, one box per chosen cell, so boxes never overlap.
    cells = rng.permutation(9)[: rng.integers(1, 7)]
    for k, cell in enumerate(cells):
        gy, gx = divmod(int(cell), 3)
        cx0, cy0 = gx * w // 3, gy * h // 3
        bw = int(rng.integers(6, w // 3 + 1))
        bh = int(rng.integers(6, h // 3 + 1))
        x0 = cx0 + int(rng.integers(0, w // 3 - bw + 1))
        y0 = cy0 + int(rng.integers(0, h // 3 - bh + 1))
        image[y0 : y0 + bh, x0 : x0 + bw] = PALETTE[k]
        boxes.append([x0, y0, x0 + bw, y0 + bh])
        labels.append(k + 1)
    t = SSDTrainTransform(96, distort=None, interpolations=("NEAREST",), rng=rng)
    out, got = t.augment(image, _target(np.array(boxes, float), labels))
    assert out.shape == (96, 96, 3)
    for box, label in zip(got["boxes"].numpy(), got["labels"].tolist()):
        if box[2] - box[0] < 4 or box[3] - box[1] < 4:
            continue  # too small to sample a centre pixel robustly
        cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
        assert (out[cy, cx] == PALETTE[label - 1]).all(), (box, label, out[cy, cx])


def test_mirror_flips_boxes_and_pixels():
    image = np.zeros((50, 100, 3), np.uint8)
    image[10:20, 5:25] = 255
    t = SSDTrainTransform(size=(50, 100), distort=None, expand=None, samplers=(), interpolations=("NEAREST",))
    seen = set()
    for seed in range(20):
        out, got = t.augment(image, _target(np.array([[5.0, 10, 25, 20]])), rng=np.random.default_rng(seed))
        box = got["boxes"][0].tolist()
        seen.add(tuple(box))
        assert box in ([5.0, 10.0, 25.0, 20.0], [75.0, 10.0, 95.0, 20.0])
        x0 = int(box[0])
        assert (out[10:20, x0 : x0 + 20] == 255).all()
    assert len(seen) == 2  # both outcomes occur


def test_photometric_steps_equal_opencv_saturating_arithmetic():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    zeros = np.zeros_like(image)
    for delta in (-31.7, -5.25, 12.5, 32.0):
        np.testing.assert_array_equal(adjust_brightness(image, delta), cv2.addWeighted(image, 1.0, zeros, 0, delta))
    for alpha in (0.5, 0.83, 1.37, 1.5):
        np.testing.assert_array_equal(adjust_contrast(image, alpha), cv2.addWeighted(image, alpha, zeros, 0, 0))
    assert adjust_contrast(image, 1.0005) is image  # Caffe skips |alpha - 1| <= 1e-3
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    for alpha in (0.5, 1.4):
        ref = hsv.copy()
        ref[..., 1] = cv2.addWeighted(hsv[..., 1], alpha, np.zeros_like(hsv[..., 1]), 0, 0)
        np.testing.assert_array_equal(adjust_saturation(image, alpha), cv2.cvtColor(ref, cv2.COLOR_HSV2BGR))


def test_hue_saturates_instead_of_wrapping():
    hsv = np.array([[[175, 200, 200], [3, 200, 200]]], np.uint8)
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    h0 = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)[..., 0].astype(int)
    up = cv2.cvtColor(adjust_hue(image, 10.0), cv2.COLOR_BGR2HSV)[0, :, 0]
    down = cv2.cvtColor(adjust_hue(image, -10.0), cv2.COLOR_BGR2HSV)[0, :, 0]
    # 175 + 10 = 185 is kept as 185, which HSV→BGR reads as hue 5 (mod 180).
    assert abs(int(up[0]) - (h0[0, 0] + 10 - 180)) <= 1
    # 3 - 10 clamps to 0 (red), not 173.
    assert down[1] == 0


def test_expand_places_image_on_mean_canvas():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    boxes = np.array([[1.0, 2.0, 11.0, 22.0]])
    hits = 0
    for seed in range(30):
        canvas, moved = expand_image(image, boxes, ExpandParams(), (104, 117, 123), np.random.default_rng(seed))
        if canvas is image:
            np.testing.assert_array_equal(moved, boxes)
            continue
        hits += 1
        assert canvas.shape[0] >= 30 and canvas.shape[0] <= 120 and canvas.shape[1] <= 160
        # Locate the image: exact template match.
        res = cv2.matchTemplate(canvas, image, cv2.TM_SQDIFF)
        y, x = np.unravel_index(np.argmin(res), res.shape)
        assert res[y, x] == 0
        np.testing.assert_array_equal(moved, boxes + [x, y, x, y])
        mask = np.ones(canvas.shape[:2], bool)
        mask[y : y + 30, x : x + 40] = False
        assert (canvas[mask] == [104, 117, 123]).all()
    assert 5 < hits < 30


def test_test_transform_is_linear_warp_and_caffe_preprocessing():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    target = _target(np.array([[0.0, 0, 500, 375], [100, 75, 200, 150]]))
    for preset in ("ssd", "dsod"):
        pre = PREPROCESS_PRESETS[preset]
        out, got = SSDTestTransform(300, pre)(image, target)
        ref = (cv2.resize(image, (300, 300), interpolation=cv2.INTER_LINEAR).astype(np.float32)
               - np.array([104, 117, 123], np.float32)) * np.float32(pre.scale)
        torch.testing.assert_close(out, torch.from_numpy(ref.transpose(2, 0, 1)), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(got["boxes"], torch.tensor([[0.0, 0, 300, 300], [60, 60, 120, 120]]),
                                   rtol=1e-5, atol=1e-4)
    assert PREPROCESS_PRESETS["dsod"].scale == 0.017


def test_preprocess_rgb_and_invert():
    image = np.random.default_rng(2).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    for pre in (CaffePreprocess(), CaffePreprocess(scale=0.017, channel_order="rgb")):
        x = pre(image)
        np.testing.assert_array_equal(pre.invert(x), image)
    rgb = CaffePreprocess(channel_order="rgb")(image)
    torch.testing.assert_close(rgb[0], torch.from_numpy(image[..., 2].astype(np.float32) - 123))  # R minus the R mean


def test_same_rng_same_output_and_collate():
    image = np.random.default_rng(5).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    target = _target(np.array([[10.0, 10, 80, 90], [90, 20, 150, 110]]))
    a = SSDTrainTransform(64, rng=np.random.default_rng(7))(image, target)
    b = SSDTrainTransform(64, rng=np.random.default_rng(7))(image, target)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1]["boxes"], b[1]["boxes"])
    images, targets = collate_detection([a, b])
    assert images.shape == (2, 3, 64, 64) and len(targets) == 2


def test_distortion_changes_pixels_but_not_geometry():
    image = np.random.default_rng(9).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    t = SSDTrainTransform((60, 80), distort=DistortParams(), expand=None, samplers=(),
                          interpolations=("NEAREST",), mirror=False)
    changed = 0
    for seed in range(10):
        out, got = t.augment(image, _target(np.array([[5.0, 5, 30, 40]])), rng=np.random.default_rng(seed))
        assert got["boxes"].tolist() == [[5.0, 5.0, 30.0, 40.0]]
        changed += int(not np.array_equal(out, image))
    assert changed >= 7


def test_coverage_constraints_against_direct_computation():
    from toolkit.data.transforms import BatchSampler, satisfies_constraint

    rng = np.random.default_rng(11)
    boxes = np.array([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.9]])
    samples = rng.uniform(0, 0.5, (200, 2))
    samples = np.hstack([samples, samples + rng.uniform(0.1, 0.5, (200, 2))])
    sampler = BatchSampler(0.3, 1, 0.5, 2, min_sample_coverage=0.5, min_object_coverage=0.3, max_trials=50)
    got = satisfies_constraint(samples, boxes, sampler)
    for s, g in zip(samples, got):
        ok = False
        for b in boxes:
            iw = max(0.0, min(s[2], b[2]) - max(s[0], b[0]))
            ih = max(0.0, min(s[3], b[3]) - max(s[1], b[1]))
            inter = iw * ih
            sample_cov = inter / ((s[2] - s[0]) * (s[3] - s[1]))
            object_cov = inter / ((b[2] - b[0]) * (b[3] - b[1]))
            ok |= sample_cov >= 0.5 and object_cov >= 0.3
        assert g == ok
    assert 0 < got.sum() < len(got)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(5, 60), st.integers(5, 60))
def test_virtual_canvas_crop_equals_materialised_expand_then_crop(seed, h, w):
    from toolkit.data.transforms import Expansion, crop_from_canvas

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    canvas, _ = expand_image(image, np.zeros((0, 4)), ExpandParams(prob=1.0), (104, 117, 123), np.random.default_rng(seed))
    if canvas is image:
        e = Expansion(h, w, 0, 0)
    else:
        res = cv2.matchTemplate(canvas, image, cv2.TM_SQDIFF)
        y, x = np.unravel_index(np.argmin(res), res.shape)
        e = Expansion(canvas.shape[0], canvas.shape[1], int(y), int(x))
    ch_, cw_ = canvas.shape[:2]
    for _ in range(5):
        x0 = int(rng.integers(0, cw_))
        y0 = int(rng.integers(0, ch_))
        cw = int(rng.integers(1, cw_ - x0 + 1))
        chh = int(rng.integers(1, ch_ - y0 + 1))
        np.testing.assert_array_equal(crop_from_canvas(image, e, (x0, y0, cw, chh), (104, 117, 123)),
                                      canvas[y0 : y0 + chh, x0 : x0 + cw])


def test_random_mirror_equals_warp_then_flip_then_preprocess():
    # RandomMirror after the (cacheable) test transform == LINEAR warp, flip, Caffe preprocessing.
    gen = np.random.default_rng(4)
    image = gen.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    target = {"boxes": torch.tensor([[3.0, 4.0, 40.0, 30.0], [60.0, 0.0, 70.0, 50.0]]),
              "labels": torch.tensor([1, 2]), "difficult": torch.tensor([False, True]), "image_id": "x"}
    preprocess = PREPROCESS_PRESETS["dsod"]
    warped, warped_target = SSDTestTransform(32, preprocess)(image, target)
    resized = cv2.resize(image, (32, 32), interpolation=cv2.INTER_LINEAR)
    scaled = target["boxes"] * torch.tensor([32 / 70, 32 / 50, 32 / 70, 32 / 50])
    seen = set()
    for seed in range(12):
        out, out_target = RandomMirror()(warped.clone(), warped_target, np.random.default_rng(seed))
        mirrored = bool(np.random.default_rng(seed).integers(2))
        seen.add(mirrored)
        want_image = preprocess(np.ascontiguousarray(resized[:, ::-1]) if mirrored else resized)
        assert torch.equal(out, want_image)
        want_boxes = scaled[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0]) + torch.tensor(
            [32.0, 0.0, 32.0, 0.0]) if mirrored else scaled
        torch.testing.assert_close(out_target["boxes"], want_boxes, rtol=0, atol=1e-4)
        assert torch.equal(out_target["labels"], target["labels"])
        assert torch.equal(out_target["difficult"], target["difficult"])
        assert out_target["image_id"] == "x"
    assert seen == {True, False}
    assert torch.equal(warped_target["boxes"], SSDTestTransform(32, preprocess)(image, target)[1]["boxes"])
