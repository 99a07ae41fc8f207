"""Deformable DETR and Sparse DETR against the official code's float64 outputs and losses (``shared/fixtures/detr``),
the matcher against brute force, the decoder attention map against a naive loop."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from conftest import require_fixture
from detr_fixtures import assert_reproduces, load_official, write_official_checkpoint
from toolkit.models.detr import DeformableDETRConfig, build_deformable_detr, flatten_outputs
from toolkit.models.detr.criterion import SetCriterion, default_weight_dict
from toolkit.models.detr.matcher import HungarianMatcher

FOLDERS = ["deformable_detr", "deformable_detr_refine_twostage", "sparse_detr_rho0.1"]


@pytest.fixture(scope="module", params=FOLDERS)
def official(request, tmp_path_factory):
    path = write_official_checkpoint(request.param, tmp_path_factory.mktemp(request.param) / "official.pth")
    return request.param, load_official(path)


@pytest.fixture(scope="module")
def reproduced(official):
    """The model built from the official args, checked against the official key list, and its float64 outputs."""
    folder, checkpoint = official
    root = require_fixture(f"detr/{folder}")
    spec = json.loads((root / "spec.json").read_text())
    cfg = DeformableDETRConfig.from_official_args(vars(checkpoint["args"]), 91)
    assert (cfg.with_box_refine, cfg.two_stage) == ((False, False) if folder == "deformable_detr" else (True, True))
    assert cfg.family == ("sparse" if folder.startswith("sparse") else "deformable")
    model = build_deformable_detr(cfg)
    # The module tree carries the official names: the same keys, shapes, and tensors shared where the official
    # model shares them (one head listed per decoder layer without refinement; the decoder's copies of the heads).
    state = model.state_dict()
    assert [[k, list(v.shape)] for k, v in sorted(state.items())] == [t[:2] for t in spec["tensors"]]
    for name, _, owner in (t for t in spec["tensors"] if len(t) == 3):
        assert state[name].data_ptr() == state[owner].data_ptr(), (name, owner)
    model.load_state_dict(checkpoint["model"], strict=True)
    model = model.double().eval()
    inputs = np.load(root / "input.npz")
    with torch.no_grad():
        out = model(torch.from_numpy(inputs["images"]).double(), torch.from_numpy(inputs["mask"]))
    return folder, out, cfg


def test_official_checkpoints_reproduce_the_official_outputs(reproduced):
    folder, out, _ = reproduced
    reference = np.load(require_fixture(f"detr/{folder}") / "output.npz")
    assert_reproduces({k: v.numpy() for k, v in flatten_outputs(out).items()}, reference)


def test_criterion_reproduces_the_official_losses(reproduced):
    """Matching, focal / L1 / GIoU losses, auxiliary layers, two-stage encoder losses, Sparse DETR's encoder
    auxiliary and mask-prediction losses and the logged errors and correlations, on the real VOC boxes of
    targets.json, against the official criterion's values."""
    folder, out, cfg = reproduced
    root = require_fixture(f"detr/{folder}")
    spec = json.loads((root / "spec.json").read_text())
    targets = [{"labels": torch.tensor(t["labels"]), "boxes": torch.tensor(t["boxes_cxcywh"], dtype=torch.float64)}
               for t in json.loads((root / "targets.json").read_text())]
    weights = default_weight_dict(cfg.dec_layers, enc_layers=cfg.enc_layers, sparse=cfg.family == "sparse",
                                  use_enc_aux_loss=cfg.use_enc_aux_loss, rho=cfg.rho)
    assert weights == spec["weight_dict"]
    criterion = SetCriterion(91, HungarianMatcher(2, 5, 2), weights, eff_specific_head=cfg.eff_specific_head)
    with torch.no_grad():
        losses = criterion(out, targets)
    assert sorted(losses) == sorted(spec["losses"])
    for name, value in spec["losses"].items():
        assert abs(float(losses[name]) - value) <= 1e-8 * max(abs(value), 1e-12), (name, float(losses[name]), value)
    total = criterion.total_loss(losses)
    assert float(total) == pytest.approx(sum(spec["weight_dict"][k] * v for k, v in spec["losses"].items()
                                             if k in spec["weight_dict"]), rel=1e-12)


def test_config_from_official_args_refuses_what_it_cannot_build():
    args = vars(argparse.Namespace(masks=True, position_embedding="learned", hidden_dim=256))
    with pytest.raises(ValueError, match=r"masks \(segmentation\), position_embedding 'learned'"):
        DeformableDETRConfig.from_official_args(args, 91)


def test_single_scale_and_padding_free_forward():
    """A single-level model (C5 only) runs, and an absent mask means no padding."""
    torch.manual_seed(0)
    cfg = DeformableDETRConfig(num_classes=5, backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=1,
                               dec_layers=2, dim_feedforward=64, num_feature_levels=1, num_queries=7)
    model = build_deformable_detr(cfg).eval()
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        out = model(images)
        same = model(images, torch.zeros(2, 96, 128, dtype=torch.bool))
    assert out["pred_logits"].shape == (2, 7, 5) and out["pred_boxes"].shape == (2, 7, 4)
    assert len(out["aux_outputs"]) == 1
    torch.testing.assert_close(out["pred_boxes"], same["pred_boxes"], rtol=0, atol=0)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()


def test_matcher_equals_brute_force_assignment():
    """On small random problems, the assignment's total cost is the minimum over every injective assignment."""
    import itertools

    g = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher(2, 5, 2)
    for trial in range(20):
        queries, n_targets = 5, int(torch.randint(1, 5, (1,), generator=g))
        cxcy = torch.rand(2, queries, 2, generator=g, dtype=torch.float64) * 0.6 + 0.2
        wh = torch.rand(2, queries, 2, generator=g, dtype=torch.float64) * 0.3 + 0.05
        outputs = {"pred_logits": torch.randn(2, queries, 4, generator=g, dtype=torch.float64),
                   "pred_boxes": torch.cat([cxcy, wh], -1)}
        targets = [{"labels": torch.randint(0, 4, (n_targets,), generator=g),
                    "boxes": torch.cat([torch.rand(n_targets, 2, generator=g, dtype=torch.float64) * 0.6 + 0.2,
                                        torch.rand(n_targets, 2, generator=g, dtype=torch.float64) * 0.3 + 0.05],
                                       -1)} for _ in range(2)]
        costs = matcher.cost_matrices(outputs, targets)
        for (rows, cols), cost in zip(matcher(outputs, targets), costs):
            assert len(rows) == n_targets and sorted(cols.tolist()) == list(range(n_targets))
            best = min(sum(float(cost[q, t]) for t, q in enumerate(perm))
                       for perm in itertools.permutations(range(queries), n_targets))
            assert float(cost[rows, cols].sum()) == pytest.approx(best, rel=1e-12, abs=1e-12), trial


def test_decoder_attention_map_equals_a_naive_scatter():
    """Every point's weight spread over the four tokens around ``loc * (W, H)`` (Sparse DETR's placement), one
    point at a time, against the vectorised map."""
    from toolkit.models.detr.dam import decoder_attention_map

    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[3, 4], [2, 2]])
    starts = torch.tensor([0, 12])
    n, layers, lq, heads, n_levels, points = 2, 2, 3, 2, 2, 2
    locations = torch.rand(n, layers, lq, heads, n_levels, points, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(n, layers, lq, heads, n_levels, points, generator=g, dtype=torch.float64)
    expected = torch.zeros(n, layers, heads, 16, dtype=torch.float64)
    for index in np.ndindex(n, layers, lq, heads, n_levels, points):
        b, layer, _, head, level, _ = index
        h, w = (int(v) for v in shapes[level])
        x = float(locations[index][0]) * w
        y = float(locations[index][1]) * h
        x0, y0 = math.floor(x), math.floor(y)
        for xi in (x0, x0 + 1):
            for yi in (y0, y0 + 1):
                if 0 <= xi < w and 0 <= yi < h:
                    area = (1 - abs(x - xi)) * (1 - abs(y - yi))
                    expected[b, layer, head, int(starts[level]) + yi * w + xi] += float(weights[index]) * area
    torch.testing.assert_close(decoder_attention_map(shapes, starts, locations, weights), expected, rtol=1e-12,
                               atol=1e-12)


def test_rho_one_keeps_every_token():
    """With rho = 1 every token is selected and written back: the encoder equals the dense one (rho = 0) with the
    same weights, on images without padding."""
    torch.manual_seed(0)
    common = dict(num_classes=5, backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2,
                  dim_feedforward=64, num_feature_levels=3, num_queries=10, with_box_refine=True, two_stage=True,
                  family="sparse", use_enc_aux_loss=True, eff_query_init=True, eff_specific_head=True)
    sparse = build_deformable_detr(DeformableDETRConfig(**common, rho=1.0)).double().eval()
    dense = build_deformable_detr(DeformableDETRConfig(**common, rho=0.0)).double().eval()
    state = {k: v for k, v in sparse.state_dict().items() if "enc_mask_predictor" not in k}
    dense.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        a, b = sparse(images), dense(images)
    tokens = 8 * 12 + 4 * 6 + 2 * 3
    assert a["sparse_token_nums"].tolist() == [tokens + 1] * 2 and a["backbone_topk_proposals"].shape == (2, tokens)
    assert sorted(a["backbone_topk_proposals"][0].tolist()) == list(range(tokens))
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a["enc_outputs"]["pred_boxes"], b["enc_outputs"]["pred_boxes"], rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("two_stage", [False, True])
def test_hybrid_matching_queries_leave_the_one_to_one_queries_alone(two_stage):
    """H-DETR's extra queries: in training the one-to-one queries' outputs equal those of the same model without
    them (the self-attention mask keeps the groups apart) and their loss gives the extra queries no gradient; in
    eval mode the extra queries do not run."""
    torch.manual_seed(0)
    small = dict(num_classes=4, backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                 dim_feedforward=32, num_queries=6, dropout=0.0, with_box_refine=True, two_stage=two_stage)
    hybrid = build_deformable_detr(DeformableDETRConfig(**small, num_queries_one2many=9)).double().train()
    plain = build_deformable_detr(DeformableDETRConfig(**small)).double().train()
    weights = hybrid.state_dict()
    if not two_stage:
        weights["query_embed.weight"] = weights["query_embed.weight"][:6]
    plain.load_state_dict(weights)
    images = torch.randn(2, 3, 96, 128, dtype=torch.float64)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 100:] = True
    out, ref = hybrid(images, mask), plain(images, mask)
    assert out["one2many"]["pred_logits"].shape == (2, 9, 4) and len(out["one2many"]["aux_outputs"]) == 1
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out["aux_outputs"][0][key], ref["aux_outputs"][0][key], rtol=1e-12, atol=1e-12)
    assert out["decoder_attention"]["dec_locations"].shape[2] == 6
    if not two_stage:
        (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
        grad = hybrid.query_embed.weight.grad
        assert grad[:6].abs().sum() > 0 and torch.count_nonzero(grad[6:]) == 0
    hybrid.eval()
    plain.eval()
    with torch.no_grad():
        out, ref = hybrid(images, mask), plain(images, mask)
    assert "one2many" not in out and out["pred_logits"].shape == (2, 6, 4)
    torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"], rtol=1e-12, atol=1e-12)


def test_hybrid_matching_is_refused_where_it_is_not_built():
    with pytest.raises(ValueError, match="num_queries_one2many"):
        DeformableDETRConfig(family="sparse", two_stage=True, rho=0.1, num_queries_one2many=10)
    with pytest.raises(ValueError, match="num_queries_one2many"):
        DeformableDETRConfig(num_queries_one2many=-1)
    with pytest.raises(ValueError, match="unsupported official arguments: mixed_selection"):
        DeformableDETRConfig.from_official_args({"mixed_selection": True, "look_forward_twice": True}, 91)
    cfg = DeformableDETRConfig.from_official_args({"num_queries_one2one": 300, "num_queries_one2many": 1500,
                                                   "look_forward_twice": True}, 91)
    assert (cfg.num_queries, cfg.num_queries_one2many, cfg.look_forward_twice) == (300, 1500, True)


def test_look_forward_twice_changes_the_gradients_not_the_outputs():
    """With box refinement, layer 1's boxes start from layer 0's refined boxes: with look_forward_twice their loss
    reaches layer 0's box head through that start (H-DETR); without, it does not.  The outputs are the same."""
    torch.manual_seed(0)
    small = dict(num_classes=4, backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                 dim_feedforward=32, num_queries=5, dropout=0.0, with_box_refine=True)
    models = {flag: build_deformable_detr(DeformableDETRConfig(**small, look_forward_twice=flag)).double()
              for flag in (False, True)}
    models[True].load_state_dict(models[False].state_dict())
    images = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    grads, boxes = {}, {}
    for flag, model in models.items():
        out = model(images)
        out["pred_boxes"].sum().backward()  # the last (second) layer's boxes only
        grads[flag] = model.bbox_embed[0].layers[-1].weight.grad
        boxes[flag] = out["pred_boxes"].detach()
    torch.testing.assert_close(boxes[True], boxes[False], rtol=0, atol=0)
    assert grads[False] is None or torch.count_nonzero(grads[False]) == 0
    assert grads[True].abs().sum() > 0


def test_auxiliary_dense_head_reads_the_encoder_maps():
    """Co-DETR's dense branch: token ``start_l + y * W_l + x`` of the memory is pixel ``(y, x)`` of level ``l``'s map
    (a loop); in training the branch covers every level plus one stride-2 level with anchors of scale x stride
    (grid_anchors), its GFL loss reaches the backbone; in eval mode it does not run."""
    from toolkit.models.detr.deformable_detr import memory_maps
    from toolkit.models.gfl import gfl_loss, grid_anchors

    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[3, 4], [2, 2], [1, 1]])
    memory = torch.randn(2, 12 + 4 + 1, 5, generator=g)
    maps = memory_maps(memory, shapes)
    start = 0
    for level, (h, w) in enumerate(shapes.tolist()):
        for y in range(h):
            for x in range(w):
                assert torch.equal(maps[level][:, :, y, x], memory[:, start + y * w + x])
        start += h * w

    torch.manual_seed(0)
    cfg = DeformableDETRConfig(num_classes=3, backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1,
                               dec_layers=1, dim_feedforward=32, num_queries=4, aux_dense_head=True,
                               aux_dense_anchor_scale=4.0)
    model = build_deformable_detr(cfg).train()
    images = torch.randn(1, 3, 128, 192)
    dense = model(images)["aux_dense"]
    hws = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]  # strides 8..64, then the extra level
    assert dense["feature_hws"] == hws and dense["cls_logits"].shape == (1, sum(h * w for h, w in hws), 3)
    anchors, _ = grid_anchors(hws, (128, 192), [4.0 * 192 / w for _, w in hws])
    torch.testing.assert_close(dense["anchors"], anchors)
    target = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([2])}]
    gfl_loss(dense, target)["loss"].backward()
    assert model.backbone[0].body.layer2[0].conv1.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert "aux_dense" not in model(images)
    with pytest.raises(ValueError, match="aux_dense_anchor_scale"):
        DeformableDETRConfig(aux_dense_anchor_scale=0)
