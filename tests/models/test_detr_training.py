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
    assert set(DETR_PRESETS) >= {"deformable_detr", "sparse_detr", "deformable_detr_tiny", "sparse_detr_tiny",
                                 "deformable_detr_dsod", "sparse_detr_dsod"}


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


def test_one_to_many_losses_match_every_target_k_times():
    """H-DETR's one-to-many set: its losses are the plain criterion's on the ``one2many`` outputs against each
    image's targets written out k times (normalized by k x the boxes), weighted lambda x the key's coefficient; each
    target is matched by exactly k queries."""
    g = torch.Generator().manual_seed(0)

    def layer(queries):
        return {"pred_logits": torch.randn(2, queries, 3, generator=g, dtype=torch.float64),
                "pred_boxes": torch.rand(2, queries, 4, generator=g, dtype=torch.float64) * 0.4 + 0.1}

    outputs = {**layer(5), "aux_outputs": [layer(5)], "one2many": {**layer(12), "aux_outputs": [layer(12)]}}
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.1], [0.6, 0.5, 0.3, 0.3]],
                                                                      dtype=torch.float64)},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]], dtype=torch.float64)}]
    k, lam = 3, 0.5
    weights = default_weight_dict(2)
    criterion = SetCriterion(3, HungarianMatcher(2, 5, 2), weights, k_one2many=k, lambda_one2many=lam)
    losses = criterion(outputs, targets)

    written_out = [{"labels": torch.cat([t["labels"]] * k), "boxes": torch.cat([t["boxes"]] * k)} for t in targets]
    plain = SetCriterion(3, HungarianMatcher(2, 5, 2), weights)
    many = plain(outputs["one2many"], written_out, num_boxes=3.0 * k)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"):
        assert losses[f"{key}_one2many"].item() == pytest.approx(many[key].item(), rel=1e-12)
    one = plain({k_: v for k_, v in outputs.items() if k_ != "one2many"}, targets)
    total = sum(weights[key] * (one[key] + lam * many[key]) for key in weights if key in one)
    assert criterion.total_loss(losses).item() == pytest.approx(total.item(), rel=1e-12)
    assert "loss_ce_enc_one2many" not in criterion.weight_dict
    for (rows, cols), t in zip(plain.matcher(outputs["one2many"], written_out), targets):
        assert torch.bincount(cols % len(t["labels"]), minlength=len(t["labels"])).tolist() == [k] * len(t["labels"])
        assert len(set(rows.tolist())) == len(rows)
    without = SetCriterion(3, HungarianMatcher(2, 5, 2), weights, lambda_one2many=0)(outputs, targets)
    assert not any(key.endswith("_one2many") for key in without)
    with pytest.raises(ValueError, match="k_one2many"):
        SetCriterion(3, HungarianMatcher(2, 5, 2), weights, k_one2many=0)
