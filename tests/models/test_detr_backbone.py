"""The DETR family's DSOD backbone: its input map, weights from a toolkit DSOD checkpoint, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.data.detr_transforms import DETRTestTransform
from toolkit.models.build import build_model
from toolkit.models.detr import build_deformable_detr
from toolkit.models.detr.backbone import DSODBody
from toolkit.models.detr.training import preset_config


def _dsod_input(image_bgr: np.ndarray) -> torch.Tensor:
    """The DSOD family's preprocessing written out: BGR, (x - (104, 117, 123)) * 0.017, (1, 3, H, W) float64."""
    x = image_bgr.astype(np.float64) - np.array([104.0, 117.0, 123.0])
    return torch.from_numpy(x * 0.017).permute(2, 0, 1)[None]


def _detr_input(image_bgr: np.ndarray) -> torch.Tensor:
    """ImageNet-normalized RGB as the DETR's transforms make it, (1, 3, H, W) float32."""
    h, w = image_bgr.shape[:2]
    image, _ = DETRTestTransform(min(h, w), max(h, w))(image_bgr, {"boxes": np.zeros((0, 4), np.float32),
                                                                   "labels": np.zeros(0, np.int64)})
    return image[None]


def test_the_input_map_gives_the_dsod_preprocessing():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    body = DSODBody()
    x = _detr_input(image)
    mapped = x.flip(1) * body.input_scale + body.input_shift
    torch.testing.assert_close(mapped.double(), _dsod_input(image), rtol=0, atol=1e-5)


def test_weights_from_a_dsod_tiny_checkpoint_give_its_sources(tmp_path):
    torch.manual_seed(0)
    detector = build_model("dsod_tiny", 7)
    with torch.no_grad():  # batch-norm statistics that are not the identity
        for module in detector.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "dsod_tiny.pth"
    torch.save({"model": detector.state_dict(), "model_name": "dsod_tiny"}, path)

    body = DSODBody("dsod_tiny", weights=path).eval()
    detector.eval()
    image = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    mask = torch.zeros(1, 96, 128, dtype=torch.bool)
    with torch.no_grad():
        levels, extras = body(_detr_input(image), mask)
        reference = detector.backbone(_dsod_input(image).float())
    assert extras == {} and body.strides == [8, 16, 32, 64] and body.num_channels == [128, 128, 128, 64]
    # dsod_tiny's sources: Fine (stride 4), First, Second, Third, Fourth, ...; the body's: First .. Fourth.
    assert len(levels) == 4
    for (feature, level_mask), expected in zip(levels, reference[1:5]):
        assert level_mask.shape == (1, *feature.shape[-2:]) and not level_mask.any()
        torch.testing.assert_close(feature, expected, rtol=1e-4, atol=1e-4)


def test_a_checkpoint_that_does_not_fit_is_refused_by_name(tmp_path):
    nano = tmp_path / "dsod_nano.pth"
    torch.save({"model": build_model("dsod_nano", 3).state_dict(), "model_name": "dsod_nano"}, nano)
    with pytest.raises(ValueError, match=r"dsod_nano\.pth: the backbone of model 'dsod_nano' does not fit.*shape"):
        DSODBody("dsod_tiny", weights=nano)
    plain = tmp_path / "plain.pth"
    torch.save({"stem.0.conv.weight": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match="plain.pth: not a toolkit checkpoint"):
        DSODBody("dsod_tiny", weights=plain)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth: not a readable PyTorch checkpoint"):
        DSODBody("dsod_tiny", weights=garbage)
    with pytest.raises(ValueError, match="unknown DSOD backbone 'dsod_huge'"):
        DSODBody("dsod_huge")


@pytest.mark.parametrize("preset", ["deformable_detr_dsod", "sparse_detr_dsod"])
def test_the_dsod_presets_build_and_run(preset):
    sparse = preset.startswith("sparse")
    cfg = preset_config(preset, 6, aux_dense_head=not sparse)
    model = build_deformable_detr(cfg)
    assert model.backbone.strides == [8, 16, 32, 64] and len(model.input_proj) == 4
    images, mask = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 100:] = True
    out = model(images, mask)
    assert out["pred_logits"].shape == (2, cfg.num_queries, 6) and out["pred_boxes"].shape == (2, cfg.num_queries, 4)
    assert ("aux_dense" in out) != sparse and ("backbone_mask_prediction" in out) == sparse
    out["pred_logits"].sum().backward()
    assert model.backbone[0].body.stem[0].conv.weight.grad.abs().sum() > 0
