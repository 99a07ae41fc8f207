"""The GFL-style head of the SSD / DSOD family: its layout, the decoding against plain loops, the loss on a
hand-built case against values computed from GFL's definitions, gradients, the post-processing against a naive
reference, and a tiny model that learns two images."""

from __future__ import annotations

import math

import pytest
import torch

from toolkit.models.build import DSOD_TINY_PRIORS, build_model
from toolkit.models.gfl import (GFLHead, GFLLossParams, GFLPostprocessParams, distances_to_boxes,
                                distribution_expectation, gfl_loss, gfl_postprocess, gfl_targets, grid_anchors,
                                level_anchor_sizes, level_maps)
from toolkit.models.postprocess import voting_cluster_diou_nms


@pytest.mark.parametrize("tower_convs, batch_norm", [(1, False), (0, True), (1, True)])
def test_head_shapes_and_layout(tower_convs, batch_norm):
    torch.manual_seed(0)
    head = GFLHead([8, 12], num_classes=3, reg_max=5, tower_convs=tower_convs, tower_channels=6,
                   batch_norm=batch_norm).eval()
    sources = [torch.randn(2, 8, 4, 5), torch.randn(2, 12, 2, 3)]
    cls_logits, reg_logits = head(sources)
    assert cls_logits.shape == (2, 20 + 6, 3)
    assert reg_logits.shape == (2, 26, 4, 6)
    # Level by level, row-major: each level's maps come back from the flat outputs.
    reg_maps = []
    for k, x in enumerate(sources):
        x = head.norms[k](x)
        reg_maps.append(head.reg[k](head.reg_towers[k](x)))
        torch.testing.assert_close(level_maps(cls_logits, [(4, 5), (2, 3)])[k], head.cls[k](head.cls_towers[k](x)))
        torch.testing.assert_close(level_maps(reg_logits, [(4, 5), (2, 3)])[k], reg_maps[k])
    # Location 7 of level 0 is row 1, column 2; channel 6 * e + i is bin i of edge e.
    assert reg_logits[1, 7, 2, 4].item() == reg_maps[0][1, 6 * 2 + 4, 1, 2].item()
    assert reg_logits[0, 20 + 4, 3, 0].item() == reg_maps[1][0, 6 * 3, 1, 1].item()
    # Every class starts at GFL's prior probability 0.01 (bias) give or take the N(0, 0.01) weights.
    assert cls_logits.sigmoid().mean().item() == pytest.approx(0.01, rel=0.5)


def test_grid_anchors_against_a_loop():
    anchors, strides = grid_anchors([(3, 4), (1, 2)], (12, 16), [5.0, 9.0])
    expected, expected_strides = [], []
    for (fh, fw), size in (((3, 4), 5.0), ((1, 2), 9.0)):
        sx, sy = 16 / fw, 12 / fh
        for y in range(fh):
            for x in range(fw):
                cx, cy = (x + 0.5) * sx, (y + 0.5) * sy
                expected.append([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])
                expected_strides.append([sx, sy])
    torch.testing.assert_close(anchors, torch.tensor(expected))
    torch.testing.assert_close(strides, torch.tensor(expected_strides))


def test_anchor_sizes_are_the_middle_of_each_level_of_the_preset():
    sizes = level_anchor_sizes(DSOD_TINY_PRIORS)
    assert sizes == pytest.approx([math.sqrt(a * b) for a, b in
                                   ((8, 16), (16, 32), (32, 59), (59, 86), (86, 113), (113, 140), (140, 168))])
    model = build_model("gfl_dsod_tiny", 7)
    assert model.anchor_sizes == pytest.approx(sizes)
    assert model.num_classes == 7 and model.head.num_classes == 6 and model.reg_max == 16


def test_gfl_dsod300_outputs():
    model = build_model("gfl_dsod300", 21).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 300, 300))
    assert out["feature_hws"] == [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (2, 2)]
    assert out["cls_logits"].shape == (1, 1943, 20) and out["reg_logits"].shape == (1, 1943, 4, 17)
    # Strides are the input over the map (300 / 38 ...), anchors the middle of DSOD300's prior sizes.
    assert out["strides"][0].tolist() == pytest.approx([300 / 38] * 2)
    assert out["strides"][-1].tolist() == pytest.approx([150.0, 150.0])
    assert (out["anchors"][0, 2] - out["anchors"][0, 0]).item() == pytest.approx(math.sqrt(30 * 60), rel=1e-6)
    assert len(out["sources"]) == 6 and out["sources"][0].shape == (1, 800, 38, 38)


def test_decode_against_a_loop():
    torch.manual_seed(1)
    reg_max = 7
    logits = torch.randn(2, 5, 4, reg_max + 1, dtype=torch.float64) * 2
    anchors = torch.rand(5, 4, dtype=torch.float64) * 50
    anchors[:, 2:] += anchors[:, :2]
    strides = torch.tensor([[4.0, 4.0], [8.0, 8.0], [8.0, 6.0], [16.0, 16.0], [3.0, 5.0]], dtype=torch.float64)
    boxes = distances_to_boxes(distribution_expectation(logits), anchors, strides)
    for n in range(2):
        for p in range(5):
            cx = (anchors[p, 0].item() + anchors[p, 2].item()) / 2
            cy = (anchors[p, 1].item() + anchors[p, 3].item()) / 2
            d = []
            for e in range(4):
                row = logits[n, p, e].tolist()
                z = sum(math.exp(v) for v in row)
                d.append(sum(i * math.exp(v) / z for i, v in enumerate(row)))
            sx, sy = strides[p].tolist()
            expected = [cx - d[0] * sx, cy - d[1] * sy, cx + d[2] * sx, cy + d[3] * sy]
            assert boxes[n, p].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


# ------------------------------------------------------------------------------------------- the loss by hand
def _hand_case():
    """A 16x16 input, one 2x2 level (stride 8, anchors of side 8), two classes, ``reg_max`` 4; three images: a box
    whose only ATSS positive is location 0, a box whose only positive is location 3, no box."""
    reg_max = 4
    anchors, strides = grid_anchors([(2, 2)], (16, 16), [8.0])
    cls_logits = torch.tensor([[[0.5, -1.0], [-2.0, 0.3], [-3.0, -0.5], [1.0, -4.0]],
                               [[-1.5, -2.5], [0.2, 0.1], [-0.7, 0.9], [-1.0, 0.4]],
                               [[-2.0, 1.5], [-6.0, -3.0], [0.0, -1.0], [2.0, -2.0]]], dtype=torch.float64)
    reg_logits = torch.linspace(-2, 2, 3 * 4 * 4 * 5, dtype=torch.float64).reshape(3, 4, 4, 5).sin() * 3
    out = {"cls_logits": cls_logits, "reg_logits": reg_logits, "anchors": anchors.double(),
           "strides": strides.double(), "feature_hws": [(2, 2)], "image_hw": (16, 16)}
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 7.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[7.0, 9.0, 15.0, 15.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    return out, targets, reg_max


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _giou_loss(a, b):
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return 1 - (iw * ih / union - (hull - union) / hull)


def test_loss_on_a_hand_built_case():
    out, targets, reg_max = _hand_case()
    assigned = gfl_targets(out, targets)
    assert assigned.labels.tolist() == [[0, 2, 2, 2], [2, 2, 2, 1], [2, 2, 2, 2]]
    assert assigned.num_pos.tolist() == [1, 1, 0]
    losses = gfl_loss(out, targets)

    centres = [(4.0, 4.0), (12.0, 4.0), (4.0, 12.0), (12.0, 12.0)]
    positives = {(0, 0): ([1.0, 1.0, 9.0, 7.0], 0), (1, 3): ([7.0, 9.0, 15.0, 15.0], 1)}
    qfl, weighted_giou, weighted_dfl, weight_sum = 0.0, 0.0, 0.0, 0.0
    for n in range(3):
        for p in range(4):
            quality, positive_class = 0.0, None
            if (n, p) in positives:
                gt, positive_class = positives[(n, p)]
                cx, cy = centres[p]
                dists, dfl = [], 0.0
                for e in range(4):
                    row = out["reg_logits"][n, p, e].tolist()
                    z = sum(math.exp(v) for v in row)
                    probs = [math.exp(v) / z for v in row]
                    dists.append(sum(i * q for i, q in enumerate(probs)))
                    # DFL: the target distance (in strides of 8) between its two bins.
                    y = [cx - gt[0], cy - gt[1], gt[2] - cx, gt[3] - cy][e] / 8
                    left = math.floor(y)
                    dfl += -(left + 1 - y) * math.log(probs[left]) - (y - left) * math.log(probs[left + 1])
                box = [cx - 8 * dists[0], cy - 8 * dists[1], cx + 8 * dists[2], cy + 8 * dists[3]]
                quality = _iou(box, gt)
                weight = max(_sigmoid(v) for v in out["cls_logits"][n, p].tolist())
                weighted_giou += weight * _giou_loss(box, gt)
                weighted_dfl += weight * dfl / 4
                weight_sum += weight
            for c, x in enumerate(out["cls_logits"][n, p].tolist()):
                s = _sigmoid(x)
                if c == positive_class:
                    qfl += -(quality * math.log(s) + (1 - quality) * math.log(1 - s)) * abs(quality - s) ** 2
                else:
                    qfl += -math.log(1 - s) * s ** 2
    expected = {"loss_cls": qfl / 3,  # positives, at least one per image: 1 + 1 + 1
                "loss_box": 2.0 * weighted_giou / weight_sum, "loss_dfl": 0.25 * weighted_dfl / weight_sum}
    expected["loss"] = sum(expected.values())
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-10), key
    # The weights are parameters.
    scaled = gfl_loss(out, targets, GFLLossParams(cls_weight=2.0, box_weight=1.0, dfl_weight=1.0))
    assert scaled["loss_cls"].item() == pytest.approx(2 * expected["loss_cls"], rel=1e-10)
    assert scaled["loss_dfl"].item() == pytest.approx(4 * expected["loss_dfl"], rel=1e-10)


def test_difficult_boxes_are_left_out_unless_asked():
    out, targets, _ = _hand_case()
    targets[1]["difficult"] = torch.tensor([True])
    assert gfl_targets(out, targets).num_pos.tolist() == [1, 0, 0]
    assert gfl_targets(out, targets, GFLLossParams(use_difficult_gt=True)).num_pos.tolist() == [1, 1, 0]


def test_a_batch_without_boxes_has_zero_box_losses_and_a_finite_class_loss():
    out, targets, _ = _hand_case()
    losses = gfl_loss(out, [targets[2]] * 3)
    assert losses["loss_box"].item() == 0 and losses["loss_dfl"].item() == 0
    assert math.isfinite(losses["loss_cls"].item()) and losses["loss_cls"].item() > 0


def test_gradients_reach_every_part_of_the_model():
    torch.manual_seed(0)
    model = build_model("gfl_dsod_tiny", 7)
    out = model(torch.randn(2, 3, 160, 160))
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0], [90.0, 30.0, 150.0, 100.0]]),
                "labels": torch.tensor([1, 4])},
               {"boxes": torch.tensor([[5.0, 5.0, 13.0, 12.0]]), "labels": torch.tensor([6])}]
    losses = gfl_loss(out, targets)
    losses["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    for name in ("backbone.stem.0.conv.weight", "head.cls.0.conv.weight", "head.reg.0.conv.weight",
                 "head.norms.0.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    # The quality target and the loss weights carry no gradient: the box terms alone move the distributions.
    out = {k: (v.detach().requires_grad_() if k in ("cls_logits", "reg_logits") else v) for k, v in out.items()}
    gfl_loss(out, targets)["loss_box"].backward()
    assert out["cls_logits"].grad is None or out["cls_logits"].grad.abs().sum() == 0
    assert out["reg_logits"].grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------- post-processing
def _naive_postprocess(cls_logits, reg_logits, anchors, strides, counts, image_hw, params):
    h, w = image_hw
    results = []
    for n in range(cls_logits.shape[0]):
        scores = cls_logits[n].sigmoid()
        candidates = []  # (score, class, box)
        start = 0
        for count in counts:
            level = list(range(start, start + count))
            if count > params.nms_pre:
                level.sort(key=lambda p: -scores[p].max().item())
                level = level[:params.nms_pre]
            for p in level:
                cx, cy = ((anchors[p, :2] + anchors[p, 2:]) / 2).tolist()
                d = [sum(i * q for i, q in enumerate(reg_logits[n, p, e].softmax(0).tolist())) for e in range(4)]
                sx, sy = strides[p].tolist()
                box = [min(max(cx - d[0] * sx, 0), w), min(max(cy - d[1] * sy, 0), h),
                       min(max(cx + d[2] * sx, 0), w), min(max(cy + d[3] * sy, 0), h)]
                for c in range(scores.shape[1]):
                    if scores[p, c] > params.score_threshold:
                        candidates.append((scores[p, c].item(), c, box))
            start += count
        candidates.sort(key=lambda t: -t[0])
        kept = []
        for score, c, box in candidates:
            if all(k[1] != c or _iou(box, k[2]) <= params.nms_threshold for k in kept):
                kept.append((score, c, box))
        kept = kept[:params.max_per_image]
        results.append([(s, c + 1, [b[0] / w, b[1] / h, b[2] / w, b[3] / h]) for s, c, b in kept])
    return results


def _random_outputs(seed):
    torch.manual_seed(seed)
    feature_hws = [(6, 6), (3, 3)]
    anchors, strides = grid_anchors(feature_hws, (48, 48), [10.0, 20.0])
    cls_logits = torch.randn(2, 45, 3) * 2 - 1
    reg_logits = torch.randn(2, 45, 4, 6) - 0.8 * torch.arange(6.0)  # boxes of a few strides: NMS keeps some
    return cls_logits, reg_logits, anchors, strides, feature_hws


@pytest.mark.parametrize("seed", [0, 1])
def test_postprocess_against_a_naive_reference(seed):
    cls_logits, reg_logits, anchors, strides, feature_hws = _random_outputs(seed)
    params = GFLPostprocessParams(score_threshold=0.2, nms_pre=20, nms_threshold=0.5, max_per_image=40)
    got = gfl_postprocess(cls_logits, reg_logits, anchors, strides, feature_hws, (48, 48), params)
    expected = _naive_postprocess(cls_logits, reg_logits, anchors, strides, [36, 9], (48, 48), params)
    for g, e in zip(got, expected):
        assert len(e) == params.max_per_image  # the cut is exercised
        assert g["scores"].tolist() == pytest.approx([s for s, _, _ in e])
        assert g["labels"].tolist() == [c for _, c, _ in e]
        torch.testing.assert_close(g["boxes"], torch.tensor([b for _, _, b in e]))


def test_postprocess_with_voting_cluster_diou_nms():
    cls_logits, reg_logits, anchors, strides, feature_hws = _random_outputs(2)
    params = GFLPostprocessParams(score_threshold=0.3, nms="voting_cluster_diou", max_per_image=1000)
    got = gfl_postprocess(cls_logits, reg_logits, anchors, strides, feature_hws, (48, 48), params)
    # The candidates are those of the greedy path before its NMS (a threshold of 1 keeps them all).
    everything = gfl_postprocess(cls_logits, reg_logits, anchors, strides, feature_hws, (48, 48),
                                 GFLPostprocessParams(score_threshold=0.3, nms_threshold=1.0, max_per_image=10**6))
    for g, e in zip(got, everything):
        boxes, scores, labels = voting_cluster_diou_nms(e["boxes"] * 48, e["scores"], e["labels"], 0.6)
        assert 0 < len(scores) < len(e["scores"])
        torch.testing.assert_close(g["boxes"], boxes / 48)
        assert g["scores"].tolist() == scores.tolist() and g["labels"].tolist() == labels.tolist()
    with pytest.raises(ValueError, match="unknown NMS"):
        GFLPostprocessParams(nms="soft")


# ------------------------------------------------------------------------------------------------- learning
def test_a_tiny_model_learns_two_images(mini_shapes_root):
    """No augmentation: two training images learned to a high train-set VOC07 mAP in few steps."""
    from torch.utils.data import DataLoader, Subset

    from conftest import FirstImages
    from toolkit.data import build_dataset
    from toolkit.data.transforms import PREPROCESS_PRESETS, SSDTestTransform, collate_detection
    from toolkit.engine import evaluate_detector
    from toolkit.models.gfl import predict_gfl

    torch.manual_seed(0)
    dataset = build_dataset("shapes", "train", root=mini_shapes_root,
                            transform=SSDTestTransform(160, PREPROCESS_PRESETS["dsod"]))
    subset = Subset(dataset, range(2))
    images, targets = collate_detection([subset[i] for i in range(2)])
    model = build_model("gfl_dsod_tiny", len(dataset.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)
    history = []
    for _ in range(40):  # mAP 0.91 from step 30 on (10 of 11 objects; the last is 6 x 5 pixels)
        losses = gfl_loss(model(images), targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append(losses["loss"].item())
    assert history[-1] < 0.3 * history[0]
    loader = DataLoader(subset, batch_size=2, collate_fn=collate_detection)
    result, _ = evaluate_detector(model, FirstImages(dataset, 2), loader, None, torch.device("cpu"),
                                  predict_fn=predict_gfl)
    assert result.mAP >= 0.9, result.ap
