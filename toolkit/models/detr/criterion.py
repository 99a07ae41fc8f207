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

Sparse DETR (kakaobrain/sparse-detr's ``SetCriterion``) adds the same three
losses on its encoder layers' auxiliary heads (``_enc_<i>``, matched with the
real labels), scores the two-stage proposals with the real labels when
``eff_specific_head``, and supervises the scoring network:
``loss_mask_prediction`` is the multi-label soft-margin loss of the token scores
against the top tokens of the decoder attention map
(:mod:`toolkit.models.detr.dam`), as many per image as the encoder kept; the
share of decoder attention on the kept tokens is logged as ``corr_*``.

H-DETR's hybrid matching (HDETR/H-Deformable-DETR ``engine.train_hybrid``): when
the outputs carry a ``one2many`` set, the same decoder losses are computed on it
against every target repeated ``k_one2many`` times (so up to ``k`` queries match
each object), normalized by the repeated count, under ``<key>_one2many`` and
weighted ``lambda_one2many`` times the key's own coefficient.

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

from toolkit.models.detr.dam import attention_map_correlation, decoder_attention_map, tokens_to_grid
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


def _decoder_key(key: str) -> bool:
    """Whether ``key`` names a decoder layer's loss (``loss_ce``, ``loss_bbox``, ``loss_giou``, or one ``_<i>``)."""
    base, _, layer = key.rpartition("_")
    return key in _DECODER_LOSSES or (base in _DECODER_LOSSES and layer.isdigit())


_DECODER_LOSSES = ("loss_ce", "loss_bbox", "loss_giou")


def default_weight_dict(dec_layers: int = 6, cls: float = 2.0, bbox: float = 5.0, giou: float = 2.0,
                        enc_layers: int = 6, sparse: bool = False, use_enc_aux_loss: bool = False,
                        rho: float = 0.0, mask_prediction: float = 1.0) -> dict[str, float]:
    """The official coefficients: per decoder layer ``loss_ce``, ``loss_bbox``, ``loss_giou``, and ``_enc`` ones
    (Deformable DETR lists them whether or not the model is two-stage); Sparse DETR's ``main.py`` also
    ``_enc_<i>`` (encoder auxiliary heads), ``_backbone`` (with ``rho``) and ``loss_mask_prediction``."""
    base = {"loss_ce": cls, "loss_bbox": bbox, "loss_giou": giou}
    weights = dict(base)
    for i in range(dec_layers - 1):
        weights.update({f"{k}_{i}": v for k, v in base.items()})
    weights.update({f"{k}_enc": v for k, v in base.items()})
    if sparse:
        if use_enc_aux_loss:
            for i in range(enc_layers - 1):
                weights.update({f"{k}_enc_{i}": v for k, v in base.items()})
        if rho:
            weights.update({f"{k}_backbone": v for k, v in base.items()})
        weights["loss_mask_prediction"] = mask_prediction
    return weights


class SetCriterion(nn.Module):
    """Deformable DETR's losses (module docstring).

    Args:
        num_classes: logits per query (no background class).
        matcher: the :class:`~toolkit.models.detr.matcher.HungarianMatcher`.
        weight_dict: loss name -> coefficient (:func:`default_weight_dict`).
        focal_alpha: the focal loss's alpha.
        eff_specific_head: Sparse DETR's class-specific proposal head: the two-stage proposals are matched and
            scored with the real labels (else class-agnostically, every target as class 0).
        k_one2many: hybrid matching: copies of each target the ``one2many`` queries are matched to (H-DETR: 6).
        lambda_one2many: hybrid matching: the one-to-many losses' weight relative to their one-to-one keys'
            (H-DETR: 1); 0 leaves a ``one2many`` output unscored.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Mapping[str, float],
                 focal_alpha: float = 0.25, eff_specific_head: bool = False, k_one2many: int = 6,
                 lambda_one2many: float = 1.0) -> None:
        super().__init__()
        if k_one2many < 1 or lambda_one2many < 0:
            raise ValueError(f"k_one2many must be >= 1 and lambda_one2many >= 0, got {k_one2many} and "
                             f"{lambda_one2many}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        if lambda_one2many:  # the decoder's keys: loss_ce, loss_bbox, loss_giou and their _<i>
            self.weight_dict.update({f"{k}_one2many": w * lambda_one2many for k, w in weight_dict.items()
                                     if _decoder_key(k)})
        self.focal_alpha = focal_alpha
        self.eff_specific_head = eff_specific_head
        self.k_one2many = k_one2many
        self.lambda_one2many = lambda_one2many

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

    @staticmethod
    def attention_map(outputs: dict) -> torch.Tensor:
        """The decoder attention map summed over layers and heads, ``(B, S)``."""
        a = outputs["decoder_attention"]
        return decoder_attention_map(a["spatial_shapes"], a["level_start_index"], a["dec_locations"],
                                     a["dec_weights"]).sum(dim=(1, 2))

    def loss_mask_prediction(self, outputs: dict, attention: torch.Tensor) -> dict:
        """Sparse DETR: token scores against the top of the decoder attention map (padding never a target)."""
        scores = outputs["backbone_mask_prediction"]
        attention = attention.masked_fill(outputs["decoder_attention"]["padding_mask"], attention.min() - 1)
        kept = outputs["sparse_token_nums"]
        top = torch.topk(attention, int(kept.max()))[1]
        target = torch.zeros_like(scores)
        for i in range(target.shape[0]):
            target[i].scatter_(0, top[i][:kept[i]], 1)
        return {"loss_mask_prediction": F.multilabel_soft_margin_loss(scores, target)}

    @torch.no_grad()
    def attention_correlation(self, outputs: dict, attention: torch.Tensor) -> dict:
        """Logged: the share of decoder attention on the tokens the encoder kept, all levels and per level."""
        shapes = outputs["decoder_attention"]["spatial_shapes"]
        corr = attention_map_correlation(tokens_to_grid(shapes, outputs["backbone_topk_proposals"]), attention,
                                         shapes)
        out = {"corr_mask_attn_map_dec_all": corr[0].mean()}
        out.update({f"corr_mask_attn_map_dec_{i}": c.mean() for i, c in enumerate(corr[1:])})
        return out

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

    def _decoder_losses(self, outputs: dict, targets: Sequence[dict], num_boxes: float) -> dict:
        """The last layer's losses (with the logged errors) and every auxiliary layer's (``_<i>``)."""
        final = {k: v for k, v in outputs.items() if k in ("pred_logits", "pred_boxes")}
        losses = self._all_losses(final, targets, self.matcher(final, targets), num_boxes, log=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            layer = self._all_losses(aux, targets, self.matcher(aux, targets), num_boxes, log=False)
            losses.update({f"{k}_{i}": v for k, v in layer.items()})
        return losses

    def forward(self, outputs: dict, targets: Sequence[dict], num_boxes: Optional[float] = None) -> dict:
        """Every loss of ``outputs`` (a DETR output dict) against ``targets`` (per image ``labels`` int64 ``(T,)``,
        ``boxes`` ``(T, 4)`` cxcywh normalized)."""
        if num_boxes is None:
            num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        losses = self._decoder_losses(outputs, targets, num_boxes)
        if "one2many" in outputs and self.lambda_one2many:
            k = self.k_one2many
            repeated = [{**t, "labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
            many = self._decoder_losses(outputs["one2many"], repeated,
                                        self.num_boxes(repeated, outputs["pred_logits"].device))
            losses.update({f"{key}_one2many": v for key, v in many.items()})
        if "backbone_topk_proposals" in outputs:
            attention = self.attention_map(outputs)
            losses.update(self.attention_correlation(outputs, attention))
            losses.update(self.loss_mask_prediction(outputs, attention))
        if "enc_outputs" in outputs:
            # Proposals are matched and scored class-agnostically (every target class 0), unless the proposal
            # head is class-specific (Sparse DETR's eff_specific_head).
            enc_targets = targets if self.eff_specific_head else [
                {**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc = outputs["enc_outputs"]
            layer = self._all_losses(enc, enc_targets, self.matcher(enc, enc_targets), num_boxes, log=False)
            losses.update({f"{k}_enc": v for k, v in layer.items()})
        for i, aux in enumerate(outputs.get("aux_outputs_enc", [])):
            layer = self._all_losses(aux, targets, self.matcher(aux, targets), num_boxes, log=False)
            losses.update({f"{k}_enc_{i}": v for k, v in layer.items()})
        return losses

    def total_loss(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``sum(weight_dict[k] * losses[k])`` over the weighted losses present."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)
