"""The DETR set criterion with Deformable DETR's losses (``SetCriterion`` of its ``models/deformable_detr.py``).

For each prediction set (the last decoder layer, every auxiliary layer with its
own matching, and the two-stage encoder proposals matched class-agnostically):

* ``loss_ce``: sigmoid focal loss (alpha 0.25, gamma 2) against one-hot targets
  (unmatched queries: all zeros), averaged over classes, summed, divided by the
  number of target boxes and multiplied by the number of queries (the official
  normalization);
* ``loss_bbox``: L1 between matched boxes (cxcywh), summed / number of boxes;
* ``loss_giou``: ``1 - GIoU`` of matched boxes, summed / number of boxes;
* logged, without gradient: ``class_error`` (100 - top-1 accuracy of matched
  queries, last layer only) and ``cardinality_error``.

Returns a dict with the official keys (``_<i>`` for auxiliary layer ``i``, ``_enc``
for the encoder).  ``weight_dict`` gives the coefficients the total loss uses
(``total_loss``).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

from toolkit.models.detr.matcher import HungarianMatcher


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """RetinaNet's focal loss of ``(B, Q, K)`` logits against 0/1 targets, ``mean over K, summed, / num_boxes``."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def default_weight_dict(dec_layers: int = 6, cls: float = 2.0, bbox: float = 5.0, giou: float = 2.0,
                        two_stage: bool = False) -> dict[str, float]:
    """The official coefficients: per layer ``loss_ce``, ``loss_bbox``, ``loss_giou`` (and ``_enc`` ones)."""
    base = {"loss_ce": cls, "loss_bbox": bbox, "loss_giou": giou}
    weights = dict(base)
    for i in range(dec_layers - 1):
        weights.update({f"{k}_{i}": v for k, v in base.items()})
    weights.update({f"{k}_enc": v for k, v in base.items()})
    return weights


class SetCriterion(nn.Module):
    """Deformable DETR's losses (module docstring).

    Args:
        num_classes: logits per query (no background class).
        matcher: the :class:`~toolkit.models.detr.matcher.HungarianMatcher`.
        weight_dict: loss name -> coefficient (:func:`default_weight_dict`).
        focal_alpha: the focal loss's alpha.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Mapping[str, float],
                 focal_alpha: float = 0.25) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha

    @staticmethod
    def _matched(indices) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        return batch, torch.cat([src for src, _ in indices])

    def loss_labels(self, outputs, targets, indices, num_boxes: float, log: bool = True) -> dict:
        logits = outputs["pred_logits"]
        idx = self._matched(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[idx] = matched_labels
        onehot = torch.zeros([*logits.shape[:2], logits.shape[2] + 1], dtype=logits.dtype, device=logits.device)
        onehot.scatter_(2, classes.unsqueeze(-1), 1)
        loss = sigmoid_focal_loss(logits, onehot[:, :, :-1], num_boxes, self.focal_alpha) * logits.shape[1]
        out = {"loss_ce": loss}
        if log:
            with torch.no_grad():
                if matched_labels.numel():
                    correct = (logits[idx].argmax(-1) == matched_labels).float().sum()
                    out["class_error"] = 100 - correct * (100.0 / matched_labels.numel())
                else:
                    out["class_error"] = torch.full((), 100.0, device=logits.device)
        return out

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes: float) -> dict:
        logits = outputs["pred_logits"]
        lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        # Predictions whose best logit is not the last class, as the official (DETR-inherited) count.
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted.float(), lengths.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes: float) -> dict:
        idx = self._matched(indices)
        boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
        l1 = F.l1_loss(boxes, target_boxes, reduction="none")
        giou = torch.diag(generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                              box_convert(target_boxes, "cxcywh", "xyxy")))
        return {"loss_bbox": l1.sum() / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}

    def _all_losses(self, outputs, targets, indices, num_boxes, log: bool) -> dict:
        out = self.loss_labels(outputs, targets, indices, num_boxes, log=log)
        out.update(self.loss_cardinality(outputs, targets, indices, num_boxes))
        out.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        return out

    @staticmethod
    def num_boxes(targets: Sequence[dict], device: torch.device) -> float:
        """Target boxes per process, averaged over processes (all-reduced under torch.distributed), at least 1."""
        count = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], dtype=torch.float, device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            world = dist.get_world_size()
        return torch.clamp(count / world, min=1).item()

    def forward(self, outputs: dict, targets: Sequence[dict], num_boxes: Optional[float] = None) -> dict:
        """Every loss of ``outputs`` (a DETR output dict) against ``targets`` (per image ``labels`` int64 ``(T,)``,
        ``boxes`` ``(T, 4)`` cxcywh normalized)."""
        if num_boxes is None:
            num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        final = {k: v for k, v in outputs.items() if k in ("pred_logits", "pred_boxes")}
        losses = self._all_losses(final, targets, self.matcher(final, targets), num_boxes, log=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            layer = self._all_losses(aux, targets, self.matcher(aux, targets), num_boxes, log=False)
            losses.update({f"{k}_{i}": v for k, v in layer.items()})
        if "enc_outputs" in outputs:
            # Proposals are matched and scored class-agnostically: every target is class 0.
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc = outputs["enc_outputs"]
            layer = self._all_losses(enc, binary, self.matcher(enc, binary), num_boxes, log=False)
            losses.update({f"{k}_enc": v for k, v in layer.items()})
        return losses

    def total_loss(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``sum(weight_dict[k] * losses[k])`` over the weighted losses present."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)
