"""SSD's MultiBoxLoss with SSD-Caffe's semantics (``multibox_loss_layer.cpp``, ``bbox_util.cpp``).

Per image (``share_location`` only):

1. **Ground truth**: boxes normalized xyxy; difficult ones dropped unless
   ``use_difficult_gt``.
2. **Matching** against the priors (or, with ``use_prior_for_matching=False``,
   against the boxes decoded from the detached predictions), IoU without ``+1``:
   greedy **bipartite** matching first — repeatedly the largest IoU (> 1e-6)
   between a not-yet-matched prior and a not-yet-matched ground truth, ties to
   the lowest prior index, then the earliest ground truth — then, for
   ``PER_PREDICTION``, every still unmatched prior whose best IoU is
   ``>= overlap_threshold``.  With ``ignore_cross_boundary_bbox`` priors with a
   coordinate outside ``[0, 1]`` are neither matched nor mined.
3. **Mining** ``MAX_NEGATIVE``: negatives are unmatched priors whose best IoU is
   ``< neg_overlap``, ranked by ``-log softmax(conf)[background]``; the top
   ``min(floor(num_pos * neg_pos_ratio), #candidates)`` are kept.  An image
   without (usable) ground truth has no positives and so no negatives.
   ``NONE``: every prior is a classification term (unmatched → background).
4. **Losses**: localisation on the matched priors, ``SMOOTH_L1`` (``0.5 d²`` if
   ``|d| < 1`` else ``|d| - 0.5``) or ``L2`` (``0.5 d²``), summed, against the
   encoded ground truth (:func:`encode_boxes`); classification: summed softmax
   cross-entropy over positives (their class) and negatives (background).
5. ``loss = (loc_weight * L_loc + L_conf) / Z`` with ``Z = max(1, #matches)``
   (VALID), ``N * P`` (FULL), ``N`` (BATCH_SIZE) or 1 (NONE).

``encode_variance_in_target=True`` reproduces Caffe exactly: the target is
encoded without variances, then prediction and target are both divided by the
variances, and the gradient reaching the prediction is that of the divided
prediction (Caffe applies no ``1 / variance`` chain factor).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.models.box_coder import CodeType, decode_boxes, encode_boxes, jaccard_normalized


class MatchType(str, Enum):
    BIPARTITE = "BIPARTITE"
    PER_PREDICTION = "PER_PREDICTION"


class MiningType(str, Enum):
    NONE = "NONE"
    MAX_NEGATIVE = "MAX_NEGATIVE"


class Normalization(str, Enum):
    FULL = "FULL"
    VALID = "VALID"
    BATCH_SIZE = "BATCH_SIZE"
    NONE = "NONE"


class LocLossType(str, Enum):
    SMOOTH_L1 = "SMOOTH_L1"
    L2 = "L2"


@dataclass(frozen=True)
class MultiBoxLossParams:
    """Caffe ``multibox_loss_param`` + ``loss_param.normalization``.

    Defaults are those of the DSOD / SSD recipes (Caffe's own defaults differ for
    ``code_type``, CORNER, and are spelled out by the recipes).
    """

    num_classes: int
    loc_loss_type: LocLossType = LocLossType.SMOOTH_L1
    loc_weight: float = 1.0
    match_type: MatchType = MatchType.PER_PREDICTION
    overlap_threshold: float = 0.5
    use_prior_for_matching: bool = True
    background_label_id: int = 0
    use_difficult_gt: bool = True
    neg_pos_ratio: float = 3.0
    neg_overlap: float = 0.5
    code_type: CodeType = CodeType.CENTER_SIZE
    encode_variance_in_target: bool = False
    ignore_cross_boundary_bbox: bool = False
    mining_type: MiningType = MiningType.MAX_NEGATIVE
    normalization: Normalization = Normalization.VALID


def match_priors(
    candidates_xyxy: torch.Tensor,
    gt_xyxy: torch.Tensor,
    match_type: MatchType = MatchType.PER_PREDICTION,
    overlap_threshold: float = 0.5,
    ignore_cross_boundary: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Caffe ``MatchBBox``.

    Args:
        candidates_xyxy: ``(P, 4)`` normalized priors (or decoded predictions).
        gt_xyxy: ``(G, 4)`` normalized ground truth.
    Returns:
        ``(match_indices (P,) int64, match_overlaps (P,) float)``: the matched
        ground-truth index, ``-1`` when unmatched, ``-2`` for an ignored
        cross-boundary candidate; the best IoU of each candidate (0 when no
        overlap above 1e-6), used to mine negatives.
    """
    p = candidates_xyxy.shape[0]
    match = torch.full((p,), -1, dtype=torch.int64)
    overlaps = torch.zeros(p, dtype=candidates_xyxy.dtype)
    if gt_xyxy.shape[0] == 0:
        return match, overlaps
    iou = jaccard_normalized(candidates_xyxy, gt_xyxy)  # (P, G)
    if ignore_cross_boundary:
        cross = ((candidates_xyxy < 0) | (candidates_xyxy > 1)).any(dim=1)
        match[cross] = -2
        iou = iou.masked_fill(cross[:, None], 0.0)
    iou = iou.masked_fill(iou <= 1e-6, 0.0)  # Caffe only records overlaps above 1e-6
    overlaps = iou.max(dim=1).values
    # Bipartite: the global maximum among unmatched candidates and unmatched ground truth.
    work = iou.masked_fill(iou <= 0, -1.0)
    work[match == -2] = -1.0
    for _ in range(gt_xyxy.shape[0]):
        flat = int(torch.argmax(work))  # first maximum in row-major order: lowest prior, then earliest gt
        i, j = divmod(flat, work.shape[1])
        if work[i, j] <= 0:
            break
        match[i] = j
        overlaps[i] = iou[i, j]
        work[i, :] = -1.0
        work[:, j] = -1.0
    if MatchType(match_type) is MatchType.PER_PREDICTION:
        best, best_j = iou.max(dim=1)  # first maximal ground truth, as Caffe's strict '>' scan
        extra = (match == -1) & (best >= overlap_threshold)
        match[extra] = best_j[extra]
        overlaps[extra] = best[extra]
    return match, overlaps


def targets_from_caffe_labels(label_blob: torch.Tensor, num_images: int) -> list[dict[str, torch.Tensor]]:
    """Caffe's AnnotatedData label blob ``(1, 1, G, 8)`` → per-image targets.

    Rows are ``[item_id, group_label, instance_id, xmin, ymin, xmax, ymax, difficult]``
    with normalized boxes; rows with ``item_id == -1`` are skipped.
    Returns ``num_images`` dicts with ``boxes`` ``(G_i, 4)`` normalized xyxy,
    ``labels`` ``(G_i,)`` int64 and ``difficult`` ``(G_i,)`` bool.
    """
    rows = label_blob.reshape(-1, 8)
    out = []
    for i in range(num_images):
        r = rows[rows[:, 0] == i]
        out.append({"boxes": r[:, 3:7].clone(), "labels": r[:, 1].long(), "difficult": r[:, 7] > 0})
    return out


def _smooth_l1_sum(d: torch.Tensor) -> torch.Tensor:
    a = d.abs()
    return torch.where(a < 1, 0.5 * d * d, a - 0.5).sum()


class MultiBoxLoss(nn.Module):
    """SSD MultiBoxLoss (module docstring); ``forward`` returns a dict of losses.

    Shapes: ``loc`` ``(N, P, 4)``; ``conf`` ``(N, P, C)`` **logits**; ``priors_xyxy``
    and ``variances`` ``(P, 4)`` normalized; ``targets`` N dicts with ``boxes``
    ``(G, 4)`` normalized xyxy, ``labels`` ``(G,)`` (1-based class ids, never the
    background id) and optionally ``difficult`` ``(G,)``.
    """

    def __init__(self, params: MultiBoxLossParams) -> None:
        super().__init__()
        self.params = params

    def forward(
        self,
        loc: torch.Tensor,
        conf: torch.Tensor,
        priors_xyxy: torch.Tensor,
        variances: torch.Tensor,
        targets: Sequence[dict],
    ) -> dict[str, torch.Tensor]:
        """Returns ``{"loss", "loss_box", "loss_cls", "num_pos", "num_neg"}``
        (the first three scalars already divided by the normalizer)."""
        prm = self.params
        n, p, c = conf.shape
        if c != prm.num_classes:
            raise ValueError(f"conf has {c} classes, the loss was built for {prm.num_classes}")
        if loc.shape != (n, p, 4):
            raise ValueError(f"loc must be (N, P, 4) = {(n, p, 4)}, got {tuple(loc.shape)}")
        if len(targets) != n:
            raise ValueError(f"{len(targets)} targets for a batch of {n}")
        priors = priors_xyxy.to(loc.dtype)
        var = variances.to(loc.dtype)
        if not prm.use_prior_for_matching:
            decoded = decode_boxes(loc.detach(), priors, var, prm.code_type, prm.encode_variance_in_target)
        pos_mask = torch.zeros(n, p, dtype=torch.bool, device=loc.device)
        neg_mask = torch.zeros(n, p, dtype=torch.bool, device=loc.device)
        conf_labels = torch.full((n, p), prm.background_label_id, dtype=torch.int64, device=loc.device)
        loc_targets = []
        with torch.no_grad():
            bg_loss = -F.log_softmax(conf.detach(), dim=2)[:, :, prm.background_label_id]
        for i, t in enumerate(targets):
            boxes = t["boxes"].to(loc.dtype)
            labels = t["labels"].to(torch.int64)
            if not prm.use_difficult_gt and "difficult" in t:
                keep = ~t["difficult"].to(torch.bool)
                boxes, labels = boxes[keep], labels[keep]
            if bool((labels == prm.background_label_id).any()):
                raise ValueError(f"image {i}: a ground-truth box has the background label {prm.background_label_id}")
            candidates = priors if prm.use_prior_for_matching else decoded[i]
            match, overlaps = match_priors(candidates, boxes, prm.match_type, prm.overlap_threshold,
                                           prm.ignore_cross_boundary_bbox)
            pos = match >= 0
            pos_mask[i] = pos
            conf_labels[i, pos] = labels[match[pos]]
            loc_targets.append(encode_boxes(boxes[match[pos]], priors[pos], var[pos], prm.code_type,
                                            prm.encode_variance_in_target))
            if MiningType(prm.mining_type) is MiningType.MAX_NEGATIVE:
                cand = torch.nonzero((match == -1) & (overlaps < prm.neg_overlap)).flatten()
                num_sel = min(int(int(pos.sum()) * prm.neg_pos_ratio), cand.numel())
                if num_sel > 0:
                    order = torch.sort(bg_loss[i, cand], descending=True, stable=True).indices[:num_sel]
                    neg_mask[i, cand[order]] = True
        num_pos = int(pos_mask.sum())
        if num_pos > 0:
            pred = loc[pos_mask]
            target = torch.cat(loc_targets)
            if prm.encode_variance_in_target:
                v = var.expand(n, p, 4)[pos_mask]
                # Value pred / v, gradient passed through unscaled (Caffe's backward).
                pred = pred.detach() / v + (pred - pred.detach())
                target = target / v
            d = pred - target
            loss_loc = _smooth_l1_sum(d) if LocLossType(prm.loc_loss_type) is LocLossType.SMOOTH_L1 else 0.5 * (d * d).sum()
        else:
            loss_loc = loc.sum() * 0.0
        if MiningType(prm.mining_type) is MiningType.NONE:
            rows = torch.ones_like(pos_mask)
        else:
            rows = pos_mask | neg_mask
        loss_conf = F.cross_entropy(conf[rows], conf_labels[rows], reduction="sum") if bool(rows.any()) else conf.sum() * 0.0
        norm = Normalization(prm.normalization)
        z = {Normalization.VALID: num_pos, Normalization.FULL: n * p,
             Normalization.BATCH_SIZE: n, Normalization.NONE: 1}[norm]
        z = max(1.0, float(z))
        loss_box = prm.loc_weight * loss_loc / z
        loss_cls = loss_conf / z
        return {
            "loss": loss_box + loss_cls,
            "loss_box": loss_box,
            "loss_cls": loss_cls,
            "num_pos": torch.tensor(num_pos),
            "num_neg": torch.tensor(int(neg_mask.sum())),
        }
