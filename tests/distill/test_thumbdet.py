"""ThumbDet: the official model's float64 outputs and losses (``shared/fixtures/detr/thumbdet_4x``), the down-sample,
KD and FM losses against hand-computed values, the thumbnailer's sizes and normalization round trip."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch

from conftest import require_fixture
from detr_fixtures import assert_reproduces, load_official, write_official_checkpoint
from toolkit.distill.thumbdet import downsample_loss, fm_loss, kd_loss
from toolkit.models.detr import DeformableDETRConfig, build_deformable_detr, flatten_outputs
from toolkit.models.detr.criterion import SetCriterion, default_weight_dict
from toolkit.models.detr.matcher import HungarianMatcher
from toolkit.models.thumbnail import Thumbnailer, thumbnail_size


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    root = require_fixture("detr/thumbdet_4x")
    checkpoint = load_official(write_official_checkpoint("thumbdet_4x", tmp_path_factory.mktemp("td") / "o.pth"))
    return root, checkpoint


def _run(model, root):
    inputs = np.load(root / "input.npz")
    pixels = torch.from_numpy(inputs["images"]).double()  # ThumbDet takes [0, 1] RGB
    images = Thumbnailer(4).from_pixels(pixels)  # the toolkit's models take normalized images
    with torch.no_grad():
        return model(images, torch.from_numpy(inputs["mask"])), pixels


def test_official_thumbdet_reproduces_outputs_and_losses(official):
    root, checkpoint = official
    spec = json.loads((root / "spec.json").read_text())
    cfg = DeformableDETRConfig.from_official_args(vars(checkpoint["args"]), 91, thumb_scale=4)
    model = build_deformable_detr(cfg)
    state = model.state_dict()
    assert [[k, list(v.shape)] for k, v in sorted(state.items())] == [t[:2] for t in spec["tensors"]]
    model.load_state_dict(checkpoint["model"], strict=True)
    out, pixels = _run(model.double().eval(), root)
    assert_reproduces({k: v.numpy() for k, v in flatten_outputs(out).items()}, np.load(root / "output.npz"))
    assert torch.allclose(out["src_input"], pixels, rtol=0, atol=1e-15)

    # The official criterion ran with the same weights as the teacher, on the full image, in eval mode.
    teacher = build_deformable_detr(DeformableDETRConfig.from_official_args(vars(checkpoint["args"]), 91))
    teacher.load_state_dict({k: v for k, v in checkpoint["model"].items() if "down_sample" not in k}, strict=True)
    teacher_out, _ = _run(teacher.double().eval(), root)
    targets = [{"labels": torch.tensor(t["labels"]), "boxes": torch.tensor(t["boxes_cxcywh"], dtype=torch.float64)}
               for t in json.loads((root / "targets.json").read_text())]
    criterion = SetCriterion(91, HungarianMatcher(2, 5, 2), default_weight_dict(cfg.dec_layers))
    with torch.no_grad():
        losses = criterion(out, targets)
    losses["loss_downsample"] = downsample_loss(out["src_input"], out["downsample_input"])
    losses["loss_kd"] = kd_loss(out["pred_logits"], teacher_out["pred_logits"])
    losses["loss_fm"] = fm_loss(out["srcs"], teacher_out["srcs"])
    assert sorted(losses) == sorted(spec["losses"])
    for name, value in spec["losses"].items():
        assert abs(float(losses[name]) - value) <= 1e-8 * max(abs(value), 1e-12), (name, float(losses[name]), value)
    for name, weight in spec["weight_dict"].items():  # the official weights: ours where we compute the loss
        if name in criterion.weight_dict:
            assert criterion.weight_dict[name] == weight, name


def test_downsample_loss_by_hand():
    src = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]] * 3], dtype=torch.float64)  # mean 0.5, var 1/3 per channel
    thumb = torch.full((1, 3, 1, 2), 0.25, dtype=torch.float64)  # mean 0.25, var 0
    expected = (0.25 / 255) ** 2 + 0.1 * (1 / 3 / 255 ** 2) ** 2
    assert float(downsample_loss(src, thumb)) == pytest.approx(expected, rel=1e-12)


def test_kd_loss_by_hand():
    student = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]], dtype=torch.float64)  # p_s = (1/4, 3/4), (1/2, 1/2)
    teacher = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]], dtype=torch.float64)  # p_t = (1/2, 1/2), (3/4, 1/4)
    cross = torch.tensor([[0.5 * math.log(4), 0.5 * math.log(4 / 3)], [0.75 * math.log(2), 0.25 * math.log(2)]],
                         dtype=torch.float64)
    # DETR: summed over queries, averaged over images and classes; SSD: summed over classes, averaged over priors.
    assert float(kd_loss(student, teacher)) == pytest.approx(float(cross.sum(0).mean()), rel=1e-12)
    assert float(kd_loss(student, teacher, per_prior=True)) == pytest.approx(float(cross.sum(1).mean()), rel=1e-12)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    kd_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


def test_fm_loss_by_hand():
    student = [torch.tensor([[[[1.0, 3.0]]]], dtype=torch.float64), torch.ones(1, 2, 1, 1, dtype=torch.float64)]
    teacher = [torch.zeros(1, 1, 1, 4, dtype=torch.float64), torch.zeros(1, 2, 2, 2, dtype=torch.float64)]
    # Bilinear, half-pixel centres: 1 3 -> 1, 1.5, 2.5, 3 (edges clamp); a 1x1 map upsamples to a constant.
    level0 = (1 + 1.5 ** 2 + 2.5 ** 2 + 9) / 4
    assert float(fm_loss(student, teacher)) == pytest.approx((level0 + 1.0) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="pair one to one"):
        fm_loss(student[:1], teacher)


@pytest.mark.parametrize("scale, size", [(4, (75, 100)), (2, (148, 198))])
def test_thumbnail_sizes_and_normalization_round_trip(scale, size):
    assert thumbnail_size(300, 400, scale) == size
    for mode in ("learned", "bicubic", "bicubic_aliased"):
        # Caffe's (x - mean) * 0.017 on BGR 0-255 pixels, as DSOD's nets take them.
        t = Thumbnailer(scale, mode, mean=(104 / 255, 117 / 255, 123 / 255), std=(1 / (255 * 0.017),) * 3, bgr=True)
        pixels = torch.rand(2, 3, 300, 400, dtype=torch.float64)
        bgr255 = pixels.flip(1) * 255
        normalized = (bgr255 - torch.tensor([104.0, 117.0, 123.0], dtype=torch.float64).view(1, 3, 1, 1)) * 0.017
        out = t.double()(normalized)
        assert torch.allclose(out["src_input"], pixels, atol=1e-12)
        assert out["images"].shape[-2:] == size and out["downsample_input"].shape[-2:] == size
        assert torch.allclose(t.to_pixels(out["images"]), out["downsample_input"], atol=1e-12)
    assert [k for k in Thumbnailer(4).state_dict()] == ["0.weight", "2.weight"]
    assert not Thumbnailer(4, "bicubic").state_dict() and not Thumbnailer(4, "bicubic_aliased").state_dict()
    assert Thumbnailer(4, "bicubic")  # no layers, yet a thumbnailer: `if thumbnailer:` must not read it as none
    with pytest.raises(ValueError, match="scale"):
        Thumbnailer(3)
    with pytest.raises(ValueError, match="bicubic_aliased"):
        Thumbnailer(4, "bilinear")


@pytest.mark.parametrize("scale", [2, 4])
def test_aliased_bicubic_is_opencvs_inter_cubic(scale):
    """``bicubic_aliased`` is the resize of ``cv2.resize(..., interpolation=cv2.INTER_CUBIC)`` (no anti-aliasing);
    ``bicubic`` is not: it low-passes first, so on noise the two differ by far more than float rounding."""
    rng = np.random.default_rng(scale)
    pixels = rng.random((2, 3, 61, 90)).astype(np.float32)
    size = thumbnail_size(61, 90, scale)
    aliased = Thumbnailer(scale, "bicubic_aliased").downsample(torch.from_numpy(pixels)).numpy()
    smooth = Thumbnailer(scale, "bicubic").downsample(torch.from_numpy(pixels)).numpy()
    for b in range(2):
        expected = cv2.resize(pixels[b].transpose(1, 2, 0), (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
        expected = np.clip(expected, 0, 1).transpose(2, 0, 1)  # the thumbnailer clamps as a stored image would
        np.testing.assert_allclose(aliased[b], expected, rtol=0, atol=1e-5)
        assert np.abs(smooth[b] - expected).max() > 0.1
    # Aliasing keeps more of the noise's variance than the antialiased resize does.
    assert aliased.var() > 1.5 * smooth.var()


def _naive_strided_filter(image: np.ndarray, taps: list[float], stride: int, pad: int) -> np.ndarray:
    """One channel ``(H, W)`` filtered by ``outer(taps, taps)`` with zero padding ``pad``, sampled every ``stride``
    pixels: the plain loop over output pixels and taps."""
    k = len(taps)
    h, w = image.shape
    out_h, out_w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            for u in range(k):
                for v in range(k):
                    y, x = i * stride + u - pad, j * stride + v - pad
                    if 0 <= y < h and 0 <= x < w:
                        out[i, j] += taps[u] * taps[v] * image[y, x]
    return out


@pytest.mark.parametrize("scale", [2, 4])
def test_antialias_init_is_the_binomial_filter(scale):
    torch.manual_seed(0)
    thumb = Thumbnailer(scale).double().init_antialias()
    pixels = torch.rand(1, 3, 23, 30, dtype=torch.float64)
    out = thumb.downsample(pixels)
    assert out.shape[-2:] == thumbnail_size(23, 30, scale)
    for c in range(3):
        image = pixels[0, c].numpy()
        if scale == 2:  # the 5x5 delta keeps the inner pixels, then [1, 4, 6, 4, 1] / 16 at stride 2
            expected = _naive_strided_filter(image[1:-1, 1:-1], [1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16], 2, 1)
        else:  # [1, 2, 1] / 4 at stride 2, twice
            expected = _naive_strided_filter(image, [0.25, 0.5, 0.25], 2, 1)
            expected = _naive_strided_filter(expected, [0.25, 0.5, 0.25], 2, 1)
        np.testing.assert_allclose(out[0, c].detach().numpy(), expected, rtol=0, atol=1e-12)
    # A flat grey stays grey away from the zero-padded border.
    flat = thumb.downsample(torch.full((1, 3, 40, 40), 0.3, dtype=torch.float64))
    assert torch.allclose(flat[..., 2:-2, 2:-2], torch.tensor(0.3, dtype=torch.float64), atol=1e-12)

    def gradients():  # per layer, which output channels' weights get a non-zero gradient
        thumb.zero_grad()
        (thumb.downsample(pixels) - 0.5).square().mean().backward()
        return [(layer.weight.grad != 0).flatten(1).any(dim=1) for layer in (thumb[0], thumb[2])]

    # Nothing is dead: the second layer's zero weights on the 9 random channels get gradients at once, and after
    # one step every output channel of the first layer gets one too.
    first, second = gradients()
    assert bool(second.all()) and bool((thumb[2].weight.grad[:, 3:] != 0).any()) and not bool(first[3:].any())
    torch.optim.SGD(thumb.parameters(), lr=0.01).step()
    first, second = gradients()
    assert bool(first.all()) and bool(second.all())
    for mode in ("bicubic", "bicubic_aliased"):
        with pytest.raises(ValueError, match="bicubic"):
            Thumbnailer(scale, mode).init_antialias()
