"""Generalized Focal Loss's terms (Li et al., NeurIPS 2020), as LD's code base (HikariTJU/LD,
``mmdet/models/losses/gfocal_loss.py``) computes them: what a GFL-style head of the SSD family trains with.

- :func:`quality_focal_loss` (QFL): sigmoid class scores against IoU-aware targets.  Every class of every
  location is a negative (target 0) weighted by ``sigmoid(x) ** beta``, except the positive's own class, whose
  target is its quality ``q`` (the IoU of the predicted box with its ground truth) and whose weight is
  ``|q - sigmoid(x)| ** beta``; summed over classes.
- :func:`distribution_focal_loss` (DFL): each box edge's distance (in units of the level's stride) as a discrete
  distribution over ``0..reg_max``; a target ``y`` between the bins ``l = floor(y)`` and ``l + 1`` is the
  cross-entropy to both, weighted ``(l + 1 - y)`` and ``(y - l)``.
- the box term is GIoU, ``torchvision.ops.generalized_box_iou_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quality_focal_loss(logits: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor,
                       beta: float = 2.0) -> torch.Tensor:
    """QFL per location.

    Args:
        logits: ``(N, C)`` class logits (sigmoid; no background column).
        labels: ``(N,)`` int64, the positive's class in ``0..C-1``, or any other value (``C``, ``-1``) for a
            negative location.
        quality: ``(N,)`` the positives' quality targets in ``[0, 1]`` (ignored at negatives).
    Returns:
        ``(N,)``: the loss of each location, summed over classes.
    """
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * prob.pow(beta)
    pos = torch.nonzero((labels >= 0) & (labels < logits.shape[1])).flatten()
    if pos.numel():
        cls = labels[pos]
        target = quality[pos].to(logits.dtype)
        modulation = (target - prob[pos, cls]).abs().pow(beta)
        loss = loss.clone()
        loss[pos, cls] = F.binary_cross_entropy_with_logits(logits[pos, cls], target, reduction="none") * modulation
    return loss.sum(dim=1)


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL per edge.

    Args:
        logits: ``(N, reg_max + 1)`` the edge distance's distribution (before softmax).
        target: ``(N,)`` the distance in bins, in ``[0, reg_max)`` (a target of exactly ``reg_max`` has no right
            bin: clamp it below, as GFL's heads do with ``reg_max - 0.01``).
    Returns:
        ``(N,)``.
    Raises:
        ValueError: a target outside ``[0, reg_max)``.
    """
    reg_max = logits.shape[1] - 1
    if target.numel() and (target.min() < 0 or target.max() >= reg_max):
        raise ValueError(f"DFL targets must lie in [0, {reg_max}), got [{float(target.min())}, "
                         f"{float(target.max())}]")
    left = target.long()
    right = left + 1
    weight_left = right.to(target.dtype) - target
    weight_right = target - left.to(target.dtype)
    return (F.cross_entropy(logits, left, reduction="none") * weight_left
            + F.cross_entropy(logits, right, reduction="none") * weight_right)
