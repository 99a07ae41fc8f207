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
    columns = torch.arange(g, device=anchors.device)
    candidate_iou = overlaps[candidates, columns]
    threshold = candidate_iou.mean(dim=0) + candidate_iou.std(dim=0)
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
