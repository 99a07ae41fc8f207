"""ATSS assignment and LD's valuable localization region against plain loops written from their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from toolkit.models.atss import atss_assign, atss_vlr_region, pairwise_diou


def _naive(anchors, per_level, gts, topk=9, margin=0.01):
    anchors, gts = anchors.tolist(), gts.tolist()

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    def centre(a):
        return (a[0] + a[2]) / 2, (a[1] + a[3]) / 2

    positives = {}  # anchor -> [(iou, gt)]
    for j, gt in enumerate(gts):
        gc = centre(gt)
        candidates, start = [], 0
        for count in per_level:
            level = list(range(start, start + count))
            level.sort(key=lambda i: (math.dist(centre(anchors[i]), gc), i))
            candidates += level[:min(topk, count)]
            start += count
        ious = [iou(anchors[i], gt) for i in candidates]
        mean = sum(ious) / len(ious)
        std = math.sqrt(sum((v - mean) ** 2 for v in ious) / (len(ious) - 1))
        for i, v in zip(candidates, ious):
            cx, cy = centre(anchors[i])
            if v >= mean + std and min(cx - gt[0], cy - gt[1], gt[2] - cx, gt[3] - cy) > margin:
                positives.setdefault(i, []).append((v, j))
    assigned, best = [-1] * len(anchors), [0.0] * len(anchors)
    for i, pairs in positives.items():
        top = max(v for v, _ in pairs)
        best[i], assigned[i] = top, min(j for v, j in pairs if v == top)
    return assigned, best


def _grid_anchors(size, strides, scale=8.0):
    boxes, counts = [], []
    for stride in strides:
        n = math.ceil(size / stride)
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        cx, cy = (xs.flatten() + 0.5) * stride, (ys.flatten() + 0.5) * stride
        half = scale * stride / 2
        boxes.append(torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1))
        counts.append(n * n)
    return torch.cat(boxes).double(), counts


@pytest.mark.parametrize("seed, num_gt", [(0, 1), (1, 5), (2, 12), (3, 3)])
def test_atss_equals_the_naive_loop(seed, num_gt):
    gen = torch.Generator().manual_seed(seed)
    anchors, counts = _grid_anchors(160, (8, 16, 32, 64))
    xy = torch.rand(num_gt, 2, generator=gen, dtype=torch.float64) * 120
    wh = 10 + torch.rand(num_gt, 2, generator=gen, dtype=torch.float64) * 60
    gts = torch.cat([xy, (xy + wh).clamp(max=160)], dim=1)
    if seed == 3:  # centres exactly between anchors: distance ties at the candidate boundary
        gts = torch.tensor([[16.0, 16.0, 48.0, 48.0], [64.0, 8.0, 96.0, 40.0], [10.0, 10.0, 150.0, 150.0]],
                           dtype=torch.float64)
    assigned, best = atss_assign(anchors, counts, gts)
    want_assigned, want_best = _naive(anchors, counts, gts)
    assert assigned.tolist() == want_assigned
    torch.testing.assert_close(best, torch.tensor(want_best, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert (assigned >= 0).sum() >= 1


def test_atss_edge_cases():
    anchors, counts = _grid_anchors(32, (8,))
    assigned, best = atss_assign(anchors, counts, torch.zeros(0, 4, dtype=torch.float64))
    assert (assigned == -1).all() and (best == 0).all()
    with pytest.raises(ValueError, match="levels hold"):
        atss_assign(anchors, [3], torch.zeros(1, 4, dtype=torch.float64))
    # Four candidates: the unbiased standard deviation (Tensor.std's) decides; the biased one would make anchor
    # 0 a positive.
    four, four_counts = _grid_anchors(16, (8,), scale=2.0)
    gt = torch.tensor([[3.964642732759243, 3.7407366618334628, 10.005324667776353, 8.631046745472764]],
                      dtype=torch.float64)
    assert atss_assign(four, four_counts, gt)[0].tolist() == _naive(four, four_counts, gt)[0] == [-1] * 4
    # A level with fewer anchors than topk: all of them are candidates.
    few, few_counts = _grid_anchors(16, (8,))
    gt = torch.tensor([[0.0, 0.0, 12.0, 12.0]], dtype=torch.float64)
    assert atss_assign(few, few_counts, gt)[0].tolist() == _naive(few, few_counts, gt)[0]


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / max((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter, 1e-6)


def _diou(a, b):
    centre_distance = ((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2) ** 2 + ((a[1] + a[3]) / 2 - (b[1] + b[3]) / 2) ** 2
    diagonal = (max(a[2], b[2]) - min(a[0], b[0])) ** 2 + (max(a[3], b[3]) - min(a[1], b[1])) ** 2
    return _iou(a, b) - centre_distance / max(diagonal, 1e-6)


def _naive_vlr(anchors, per_level, gts, topk=9, lower=0.25):
    """LD's get_vlr_region: the ATSS threshold t of each box; every anchor whose DIoU with it lies in
    [lower * t, t) takes the box's IoU; an anchor keeps its largest such IoU."""
    anchors, gts = anchors.tolist(), gts.tolist()
    values = [0.0] * len(anchors)
    for gt in gts:
        gc = ((gt[0] + gt[2]) / 2, (gt[1] + gt[3]) / 2)
        candidates, start = [], 0
        for count in per_level:
            level = sorted(range(start, start + count),
                           key=lambda i: (math.dist(((anchors[i][0] + anchors[i][2]) / 2,
                                                     (anchors[i][1] + anchors[i][3]) / 2), gc), i))
            candidates += level[:min(topk, count)]
            start += count
        ious = [_iou(anchors[i], gt) for i in candidates]
        mean = sum(ious) / len(ious)
        t = mean + math.sqrt(sum((v - mean) ** 2 for v in ious) / (len(ious) - 1))
        for i, anchor in enumerate(anchors):
            if lower * t <= _diou(anchor, gt) < t:
                values[i] = max(values[i], _iou(anchor, gt))
    return values


def test_pairwise_diou_equals_the_definition():
    gen = torch.Generator().manual_seed(4)
    xy = torch.rand(7, 2, generator=gen, dtype=torch.float64) * 50
    a = torch.cat([xy, xy + 1 + torch.rand(7, 2, generator=gen, dtype=torch.float64) * 40], dim=1)
    b = a[torch.tensor([0, 3, 5])] + torch.rand(3, 4, generator=gen, dtype=torch.float64) * 10
    want = torch.tensor([[_diou(x, y) for y in b.tolist()] for x in a.tolist()], dtype=torch.float64)
    torch.testing.assert_close(pairwise_diou(a, b), want, rtol=1e-12, atol=1e-14)
    same = pairwise_diou(a[:1], a[:1])
    assert same.item() == pytest.approx(1.0)


@pytest.mark.parametrize("seed, num_gt", [(0, 1), (1, 4), (2, 9)])
def test_vlr_region_equals_the_naive_loop(seed, num_gt):
    gen = torch.Generator().manual_seed(seed)
    anchors, counts = _grid_anchors(160, (8, 16, 32, 64), scale=4.0)
    xy = torch.rand(num_gt, 2, generator=gen, dtype=torch.float64) * 120
    wh = 10 + torch.rand(num_gt, 2, generator=gen, dtype=torch.float64) * 60
    gts = torch.cat([xy, (xy + wh).clamp(max=160)], dim=1)
    got = atss_vlr_region(anchors, counts, gts)
    want = torch.tensor(_naive_vlr(anchors, counts, gts), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    region = got > 0
    assert region.sum() > 0
    # The region reaches beyond the positives, and positives can lie in it (their DIoU is below their IoU).
    assigned, _ = atss_assign(anchors, counts, gts)
    assert (region & (assigned < 0)).any()
    lower = atss_vlr_region(anchors, counts, gts, lower=0.5)
    assert ((lower > 0) <= region).all() and (lower > 0).sum() < region.sum()


def test_vlr_region_edge_cases():
    anchors, counts = _grid_anchors(32, (8,))
    assert (atss_vlr_region(anchors, counts, torch.zeros(0, 4, dtype=torch.float64)) == 0).all()
    with pytest.raises(ValueError, match="levels hold"):
        atss_vlr_region(anchors, [3], torch.zeros(1, 4, dtype=torch.float64))
