"""Hungarian matching of DETR predictions to ground truth (Deformable DETR's ``HungarianMatcher``).

The cost of assigning prediction ``i`` to object ``j`` is
``cost_bbox * L1(box_i, box_j) + cost_class * focal(i, label_j) + cost_giou * -GIoU(box_i, box_j)``
with boxes ``(cx, cy, w, h)`` normalized, and the focal class cost (alpha 0.25, gamma 2)
``alpha (1 - p)^gamma (-log(p + 1e-8)) - (1 - alpha) p^gamma (-log(1 - p + 1e-8))``,
``p = sigmoid(logit of label_j)``.  Each image's cost matrix is assigned by
``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou


def focal_class_cost(prob: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """``(P, K)`` sigmoid probabilities, ``(T,)`` labels -> ``(P, T)`` focal classification cost."""
    neg = (1 - alpha) * (prob ** gamma) * (-(1 - prob + 1e-8).log())
    pos = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    return pos[:, labels] - neg[:, labels]


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising the matching cost (module docstring).

    Args:
        cost_class, cost_bbox, cost_giou: the weights of the three costs (official defaults 2, 5, 2).
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: at least one cost weight must be non-zero")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    def cost_matrices(self, outputs: dict, targets: Sequence[dict]) -> list[torch.Tensor]:
        """Per image, the ``(Q, T_b)`` cost matrix on the CPU."""
        bs, queries = outputs["pred_logits"].shape[:2]
        prob = outputs["pred_logits"].flatten(0, 1).sigmoid()
        boxes = outputs["pred_boxes"].flatten(0, 1)
        labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets])
        cost = (self.cost_bbox * torch.cdist(boxes, target_boxes, p=1)
                + self.cost_class * focal_class_cost(prob, labels)
                + self.cost_giou * -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                                        box_convert(target_boxes, "cxcywh", "xyxy")))
        cost = cost.view(bs, queries, -1).cpu()
        return [c[i] for i, c in enumerate(cost.split([len(t["boxes"]) for t in targets], -1))]

    @torch.no_grad()
    def forward(self, outputs: dict, targets: Sequence[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match.

        Args:
            outputs: ``pred_logits`` ``(B, Q, K)``, ``pred_boxes`` ``(B, Q, 4)`` cxcywh normalized.
            targets: per image ``labels`` int64 ``(T,)`` and ``boxes`` ``(T, 4)`` cxcywh normalized.
        Returns:
            Per image ``(prediction indices, target indices)``, int64, ``min(Q, T)`` pairs in order of
            prediction index.
        """
        pairs = []
        for cost in self.cost_matrices(outputs, targets):
            rows, cols = linear_sum_assignment(cost.numpy())
            pairs.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return pairs
