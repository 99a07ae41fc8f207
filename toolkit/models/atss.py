"""ATSS assignment (Zhang et al., CVPR 2020), as mmdetection 2.x's ``ATSSAssigner`` in LD's code base computes it:
the positives of the GFL-style heads.

For every ground-truth box:

1. on every level, the ``topk`` anchors whose centres are closest to the box's centre are candidates (fewer when
   the level has fewer anchors; ties of distance go to the lower anchor index, where mmdetection's ``topk``
   leaves the order unspecified);
2. the IoU threshold is the mean plus the standard deviation (unbiased, as ``Tensor.std``) of the candidates'
   IoUs with the box;
3. a candidate is a positive of the box when its IoU reaches the threshold and its centre lies inside the box by
   more than ``center_margin`` on every side (mmdetection: 0.01, in the boxes' unit: pixels).

An anchor that is a positive of several boxes goes to the one it overlaps most (the first of equals).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.ops import box_iou


def atss_assign(anchors: torch.Tensor, num_per_level: Sequence[int], gt_boxes: torch.Tensor, topk: int = 9,
                center_margin: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign anchors to ground-truth boxes.

    Args:
        anchors: ``(P, 4)`` xyxy, the levels' anchors one level after another.
        num_per_level: anchors of each level (summing to ``P``).
        gt_boxes: ``(G, 4)`` xyxy, in the anchors' unit.
    Returns:
        ``(assigned (P,) int64: the box index, or -1 for a negative; iou (P,): the IoU with the assigned box,
        0 for a negative)``.
    Raises:
        ValueError: ``num_per_level`` that does not add up to ``P``.
    """
    p, g = anchors.shape[0], gt_boxes.shape[0]
    if sum(num_per_level) != p:
        raise ValueError(f"{p} anchors, but the levels hold {sum(num_per_level)}")
    assigned = torch.full((p,), -1, dtype=torch.int64, device=anchors.device)
    best = anchors.new_zeros(p)
    if g == 0 or p == 0:
        return assigned, best
    overlaps = box_iou(anchors, gt_boxes)  # (P, G)
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    candidates, threshold = _candidates_and_threshold(anchors, num_per_level, gt_boxes, overlaps, topk)
    columns = torch.arange(g, device=anchors.device)
    candidate_iou = overlaps[candidates, columns]
    centres = anchor_centres[candidates]  # (K, G, 2)
    inside = torch.stack([centres[..., 0] - gt_boxes[:, 0], centres[..., 1] - gt_boxes[:, 1],
                          gt_boxes[:, 2] - centres[..., 0], gt_boxes[:, 3] - centres[..., 1]]).amin(dim=0)
    positive = (candidate_iou >= threshold) & (inside > center_margin)
    masked = torch.full_like(overlaps, float("-inf"))
    rows, cols = candidates[positive], columns.expand_as(candidates)[positive]
    masked[rows, cols] = overlaps[rows, cols]
    value, index = masked.max(dim=1)
    hit = value > float("-inf")
    assigned[hit] = index[hit]
    best[hit] = value[hit]
    return assigned, best


def _candidates_and_threshold(anchors: torch.Tensor, num_per_level: Sequence[int], gt_boxes: torch.Tensor,
                              overlaps: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ATSS's steps 1 and 2: the candidates ``(K, G)`` (anchor indices, level after level) and each box's IoU
    threshold ``(G,)``."""
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    distances = torch.cdist(anchor_centres, gt_centres)  # (P, G)
    candidates = []
    start = 0
    for count in num_per_level:
        k = min(topk, count)
        if k:
            nearest = torch.sort(distances[start:start + count], dim=0, stable=True).indices[:k]
            candidates.append(nearest + start)
        start += count
    candidates = torch.cat(candidates)  # (K, G)
    candidate_iou = overlaps[candidates, torch.arange(gt_boxes.shape[0], device=anchors.device)]
    return candidates, candidate_iou.mean(dim=0) + candidate_iou.std(dim=0)


def pairwise_diou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Distance-IoU of every box of ``a`` ``(P, 4)`` with every box of ``b`` ``(G, 4)`` (xyxy) -> ``(P, G)``:
    ``IoU - d^2 / c^2``, ``d`` the distance of the centres and ``c`` the diagonal of the smallest enclosing box;
    the union and ``c^2`` floored at ``eps``, as mmdetection's ``bbox_overlaps(mode="diou")`` in LD's code base."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    iou = inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=eps)
    centre_a = (a[:, :2] + a[:, 2:]) / 2
    centre_b = (b[:, :2] + b[:, 2:]) / 2
    d2 = ((centre_a[:, None] - centre_b[None, :]) ** 2).sum(dim=2)
    enclose = (torch.maximum(a[:, None, 2:], b[None, :, 2:]) - torch.minimum(a[:, None, :2], b[None, :, :2]))
    c2 = (enclose.clamp(min=0) ** 2).sum(dim=2).clamp(min=eps)
    return iou - d2 / c2


def atss_vlr_region(anchors: torch.Tensor, num_per_level: Sequence[int], gt_boxes: torch.Tensor, topk: int = 9,
                    lower: float = 0.25) -> torch.Tensor:
    """LD's *valuable localization region* (the ATSS assigner's ``get_vlr_region`` in HikariTJU/LD).

    With each box's ATSS threshold ``t`` (mean + std of the IoUs of its top-``topk`` candidates per level, as
    :func:`atss_assign`), an anchor of **any** level lies in the box's region when its distance-IoU with the box
    (:func:`pairwise_diou`) is in ``[lower * t, t)``; no centre-inside condition.  Its value is its largest IoU
    (plain IoU) over the boxes whose region holds it, 0 outside every region.  Positives of the assignment can lie
    in it too (their DIoU is below their IoU), as in LD.

    Args:
        anchors: ``(P, 4)`` xyxy, level after level; ``num_per_level`` the anchors of each level.
        gt_boxes: ``(G, 4)`` xyxy, in the anchors' unit.
    Returns:
        ``(P,)`` in the anchors' dtype: the IoU weight of each anchor's LD-VLR term (0: not in the region).
    """
    p, g = anchors.shape[0], gt_boxes.shape[0]
    if sum(num_per_level) != p:
        raise ValueError(f"{p} anchors, but the levels hold {sum(num_per_level)}")
    if g == 0 or p == 0:
        return anchors.new_zeros(p)
    overlaps = box_iou(anchors, gt_boxes)
    _, threshold = _candidates_and_threshold(anchors, num_per_level, gt_boxes, overlaps, topk)
    diou = pairwise_diou(anchors, gt_boxes)
    inside = (diou < threshold) & (diou >= lower * threshold)
    value = torch.where(inside, overlaps, torch.full_like(overlaps, float("-inf"))).max(dim=1).values
    return torch.where(value > float("-inf"), value, torch.zeros_like(value))
