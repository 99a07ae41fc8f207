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

    @classmethod
    def from_caffe(cls, param, loss_param=None) -> "MultiBoxLossParams":
        """The parameters of a ``caffe_pb2.MultiBoxLossParameter`` (+ the layer's ``loss_param``).

        Caffe's own defaults apply to unset fields (``code_type`` CORNER);
        ``loss_param.normalization`` (else the older ``normalize``: false means
        BATCH_SIZE) gives the normalizer, VALID when neither is set.  The
        deprecated ``do_neg_mining`` must agree with ``mining_type`` (Caffe checks it).

        Raises:
            ValueError: no ``num_classes``, or a setting this loss does not
                implement (``share_location: false``, LOGISTIC confidence loss,
                HARD_EXAMPLE mining, ``map_object_to_agnostic``).
        """
        def enum_name(msg, field):
            return msg.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[getattr(msg, field)].name

        if not param.HasField("num_classes"):
            raise ValueError("MultiBoxLoss: num_classes is required")
        unsupported = []
        if not param.share_location:
            unsupported.append("share_location: false")
        if enum_name(param, "conf_loss_type") != "SOFTMAX":
            unsupported.append(f"conf_loss_type: {enum_name(param, 'conf_loss_type')}")
        if enum_name(param, "mining_type") == "HARD_EXAMPLE":
            unsupported.append("mining_type: HARD_EXAMPLE")
        if param.map_object_to_agnostic:
            unsupported.append("map_object_to_agnostic: true")
        if unsupported:
            raise ValueError(f"MultiBoxLoss: not implemented: {', '.join(unsupported)}")
        mining = MiningType(enum_name(param, "mining_type"))
        if param.HasField("do_neg_mining") and param.do_neg_mining != (mining is not MiningType.NONE):
            raise ValueError(f"MultiBoxLoss: do_neg_mining: {str(param.do_neg_mining).lower()} contradicts "
                             f"mining_type: {mining.value}")
        normalization = Normalization.VALID
        if loss_param is not None:
            if loss_param.HasField("normalization"):
                normalization = Normalization(enum_name(loss_param, "normalization"))
            elif loss_param.HasField("normalize"):
                normalization = Normalization.VALID if loss_param.normalize else Normalization.BATCH_SIZE
        return cls(
            num_classes=int(param.num_classes),
            loc_loss_type=LocLossType(enum_name(param, "loc_loss_type")),
            loc_weight=float(param.loc_weight),
            match_type=MatchType(enum_name(param, "match_type")),
            overlap_threshold=float(param.overlap_threshold),
            use_prior_for_matching=bool(param.use_prior_for_matching),
            background_label_id=int(param.background_label_id),
            use_difficult_gt=bool(param.use_difficult_gt),
            neg_pos_ratio=float(param.neg_pos_ratio),
            neg_overlap=float(param.neg_overlap),
            code_type=CodeType(enum_name(param, "code_type")),
            encode_variance_in_target=bool(param.encode_variance_in_target),
            ignore_cross_boundary_bbox=bool(param.ignore_cross_boundary_bbox),
            mining_type=mining,
            normalization=normalization,
        )


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


def match_priors_batched(
    candidates_xyxy: torch.Tensor,
    gt_xyxy: torch.Tensor,
    gt_valid: torch.Tensor,
    match_type: MatchType = MatchType.PER_PREDICTION,
    overlap_threshold: float = 0.5,
    ignore_cross_boundary: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`match_priors` for a batch at once, with the same results image by image.

    Args:
        candidates_xyxy: ``(P, 4)`` priors shared by the batch, or ``(N, P, 4)``.
        gt_xyxy: ``(N, G, 4)`` ground truth padded to the largest count ``G``.
        gt_valid: ``(N, G)`` bool, False on padding.
    Returns:
        ``(match_indices (N, P) int64, match_overlaps (N, P))`` as :func:`match_priors`.
    """
    n, g = gt_valid.shape
    cand = candidates_xyxy if candidates_xyxy.dim() == 3 else candidates_xyxy.expand(n, -1, -1)
    p = cand.shape[1]
    match = torch.full((n, p), -1, dtype=torch.int64, device=cand.device)
    if g == 0:
        return match, torch.zeros(n, p, dtype=cand.dtype, device=cand.device)
    iou = jaccard_normalized(cand, gt_xyxy)  # (N, P, G)
    iou = iou.masked_fill(~gt_valid[:, None, :], 0.0)
    if ignore_cross_boundary:
        # (N, P); only in images with ground truth, as match_priors returns early without any.
        cross = ((cand < 0) | (cand > 1)).any(dim=2) & gt_valid.any(dim=1)[:, None]
        match[cross] = -2
        iou = iou.masked_fill(cross[:, :, None], 0.0)
    iou = iou.masked_fill(iou <= 1e-6, 0.0)  # Caffe only records overlaps above 1e-6
    best, best_j = iou.max(dim=2)  # first maximal ground truth, as Caffe's strict '>' scan
    overlaps = best.clone()
    # Bipartite, all images in step: each round takes every image's global maximum among
    # unmatched priors and ground truth (first in (prior, gt) row-major order on ties).
    work = iou.masked_fill(iou <= 0, -1.0)
    rows = torch.arange(n, device=cand.device)
    for _ in range(g):
        value, flat = work.reshape(n, p * g).max(dim=1)
        active = value > 0
        if not bool(active.any()):
            break
        b, flat = rows[active], flat[active]
        i, j = flat // g, flat % g
        match[b, i] = j
        overlaps[b, i] = iou[b, i, j]
        work[b, i, :] = -1.0
        work[b, :, j] = -1.0
    if MatchType(match_type) is MatchType.PER_PREDICTION:
        extra = (match == -1) & (best >= overlap_threshold)
        match[extra] = best_j[extra]
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
        # Ground truth padded to the batch's largest count (difficult boxes dropped first).
        kept = []
        for i, t in enumerate(targets):
            boxes = t["boxes"].to(device=loc.device, dtype=loc.dtype)
            labels = t["labels"].to(device=loc.device, dtype=torch.int64)
            if not prm.use_difficult_gt and "difficult" in t:
                keep = ~t["difficult"].to(device=loc.device, dtype=torch.bool)
                boxes, labels = boxes[keep], labels[keep]
            if bool((labels == prm.background_label_id).any()):
                raise ValueError(f"image {i}: a ground-truth box has the background label {prm.background_label_id}")
            kept.append((boxes, labels))
        g = max([1] + [len(lb) for _, lb in kept])  # one padding column at least: gathers stay valid
        gt = torch.zeros(n, g, 4, dtype=loc.dtype, device=loc.device)
        gt_labels = torch.zeros(n, g, dtype=torch.int64, device=loc.device)
        gt_valid = torch.zeros(n, g, dtype=torch.bool, device=loc.device)
        for i, (boxes, labels) in enumerate(kept):
            gt[i, :len(labels)] = boxes
            gt_labels[i, :len(labels)] = labels
            gt_valid[i, :len(labels)] = True
        if prm.use_prior_for_matching:
            candidates = priors
        else:
            candidates = decode_boxes(loc.detach().reshape(-1, 4), priors.repeat(n, 1), var.repeat(n, 1),
                                      prm.code_type, prm.encode_variance_in_target).reshape(n, p, 4)
        match, overlaps = match_priors_batched(candidates, gt, gt_valid, prm.match_type, prm.overlap_threshold,
                                               prm.ignore_cross_boundary_bbox)
        pos_mask = match >= 0
        matched = match.clamp(min=0)
        conf_labels = torch.where(pos_mask, gt_labels.gather(1, matched), prm.background_label_id)
        matched_boxes = gt.gather(1, matched[:, :, None].expand(n, p, 4))
        rows_i, prior_i = torch.nonzero(pos_mask, as_tuple=True)  # batch-major, then prior order
        loc_target = encode_boxes(matched_boxes[rows_i, prior_i], priors[prior_i], var[prior_i], prm.code_type,
                                  prm.encode_variance_in_target)
        neg_mask = torch.zeros(n, p, dtype=torch.bool, device=loc.device)
        if MiningType(prm.mining_type) is MiningType.MAX_NEGATIVE:
            with torch.no_grad():
                bg_loss = -F.log_softmax(conf.detach(), dim=2)[:, :, prm.background_label_id]
            cand = (match == -1) & (overlaps < prm.neg_overlap)
            num_sel = torch.minimum((pos_mask.sum(dim=1).to(torch.float64) * prm.neg_pos_ratio).floor().long(),
                                    cand.sum(dim=1))
            # Rank candidates by background loss (stable: ties keep prior order); others last.
            score = bg_loss.masked_fill(~cand, float("-inf"))
            order = torch.sort(score, dim=1, descending=True, stable=True).indices
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(p, device=loc.device).expand(n, p))
            neg_mask = cand & (rank < num_sel[:, None])
        num_pos = int(pos_mask.sum())
        if num_pos > 0:
            pred = loc[pos_mask]
            target = loc_target
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
