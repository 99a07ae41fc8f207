"""DETR training pieces: post-processing against a naive loop, the official optimizer groups, target conversion,
and small models of both kinds overfitting a few shapes images."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from conftest import FirstImages
from toolkit.data import build_dataset
from toolkit.data.detr_transforms import DETRTestTransform, collate_padded
from toolkit.data.shapes import generate_shapes
from toolkit.engine import evaluate_detector
from toolkit.models.detr import DeformableDETRConfig, build_deformable_detr
from toolkit.models.detr.criterion import SetCriterion, default_weight_dict
from toolkit.models.detr.matcher import HungarianMatcher
from toolkit.models.detr.training import (DETR_PRESETS, detr_postprocess, detr_predict, detr_targets, param_groups,
                                          preset_config)


def test_postprocess_takes_the_best_query_class_pairs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 3, generator=g)
    boxes = torch.rand(2, 7, 4, generator=g) * 0.5 + 0.1
    out = detr_postprocess({"pred_logits": logits, "pred_boxes": boxes}, top_k=5)
    for b in range(2):
        pairs = sorted(((float(logits[b, q, c].sigmoid()), q, c) for q in range(7) for c in range(3)), reverse=True)[:5]
        assert out[b]["scores"].tolist() == pytest.approx([p[0] for p in pairs])
        assert out[b]["labels"].tolist() == [c + 1 for _, _, c in pairs]  # toolkit labels are 1-based
        for (_, q, _), box in zip(pairs, out[b]["boxes"]):
            cx, cy, w, h = boxes[b, q].tolist()
            assert box.tolist() == pytest.approx([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def test_param_groups_are_the_official_ones():
    model = build_deformable_detr(DeformableDETRConfig(num_classes=3, backbone="resnet18", hidden_dim=64,
                                                       nheads=4, enc_layers=1, dec_layers=1, num_queries=5))
    groups = param_groups(model, 2e-4, 2e-5, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    main, backbone, proj = ([names[id(p)] for p in g["params"]] for g in groups)
    assert [g["lr"] for g in groups] == pytest.approx([2e-4, 2e-5, 2e-5])
    assert backbone and all(n.startswith("backbone.0.body.layer") for n in backbone)  # stem and layer1 frozen
    assert not any("layer1." in n or "conv1" == n.split(".")[3] for n in backbone)
    assert proj and all("sampling_offsets" in n or "reference_points" in n for n in proj)
    assert len(main) + len(backbone) + len(proj) == sum(p.requires_grad for p in model.parameters())


def test_targets_become_normalized_cxcywh_with_zero_based_labels():
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]), "labels": torch.tensor([3]),
                "size": torch.tensor([100, 200])}]
    out = detr_targets(targets, torch.device("cpu"))
    assert out[0]["labels"].tolist() == [2]
    assert out[0]["boxes"][0].tolist() == pytest.approx([30 / 200, 40 / 100, 40 / 200, 40 / 100])


def test_presets_and_flags():
    cfg = preset_config("sparse_detr_tiny", 6, rho=0.3)
    assert cfg.rho == 0.3 and cfg.num_classes == 6 and cfg.family == "sparse"
    assert preset_config("deformable_detr", 91, two_stage=True).two_stage
    with pytest.raises(ValueError, match="--rho applies to Sparse DETR"):
        preset_config("deformable_detr_tiny", 6, rho=0.1)
    assert set(DETR_PRESETS) >= {"deformable_detr", "sparse_detr", "deformable_detr_tiny", "sparse_detr_tiny"}


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_shapes(root / "shapes", seed=5, num_train=4, num_test=1, progress=False)
    dataset = build_dataset("shapes", "train", root=root, transform=DETRTestTransform(128, 160))
    return dataset, Subset(dataset, range(4))


@pytest.mark.parametrize("family", ["deformable", "sparse"])
def test_small_models_overfit_a_few_images(family, four_images):
    """No augmentation, 4 training images: the model must learn them (train-set VOC07 mAP)."""
    dataset, subset = four_images
    torch.manual_seed(0)
    sparse = dict(two_stage=True, family="sparse", rho=0.5, use_enc_aux_loss=True, eff_query_init=True,
                  eff_specific_head=True) if family == "sparse" else {}
    cfg = DeformableDETRConfig(num_classes=6, backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=1,
                               dec_layers=2, dim_feedforward=128, num_queries=20, dropout=0.0, with_box_refine=True,
                               **sparse)
    model = build_deformable_detr(cfg)
    criterion = SetCriterion(6, HungarianMatcher(2, 5, 2),
                             default_weight_dict(2, enc_layers=1, sparse=family == "sparse", rho=cfg.rho),
                             eff_specific_head=cfg.eff_specific_head)
    optimizer = torch.optim.AdamW(param_groups(model, 1e-3, 1e-4, 0.1), lr=1e-3, weight_decay=1e-4)
    inputs, targets = collate_padded([subset[i] for i in range(4)])
    detr = detr_targets(targets, torch.device("cpu"))
    first = None
    for _ in range(160):
        loss = criterion.total_loss(criterion(model(*inputs), detr))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.2 * first

    model.eval()
    loader = DataLoader(subset, batch_size=4, collate_fn=collate_padded)
    result, _ = evaluate_detector(model, FirstImages(dataset, 4), loader, None, torch.device("cpu"),
                                  predict_fn=detr_predict)
    assert result.mAP >= 0.9, result.ap
