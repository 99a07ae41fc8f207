"""SSD post-processing with SSD-Caffe's ``DetectionOutput`` semantics.

For every image and every class except the background, in ascending label order:

1. decode the location outputs against the priors (:func:`decode_boxes`; with
   ``share_location=False`` each class has its own boxes);
2. keep candidates whose score is **strictly** greater than
   ``confidence_threshold``, sort them by descending score with a *stable*
   sort (ties keep prior order), cut to ``top_k``;
3. greedy NMS: a box is kept if its IoU (normalized, no ``+1``) with every kept
   box is ``<= threshold``; with ``eta < 1`` the threshold is multiplied by
   ``eta`` after each kept box while it is above 0.5 (adaptive NMS);
4. if ``keep_top_k > -1`` and the image has more detections, keep the
   ``keep_top_k`` highest scores over all classes.

Detections of an image are ordered by label ascending, then score descending.
With ``eta == 1`` and boxes of non-negative size, step 3 runs in torchvision's
``nms`` (the same keep rule); the candidates are handed to it with a strictly
decreasing surrogate score so that its internal sort cannot reorder ties.

``DetectionOutputParams(nms="voting_cluster_diou")`` replaces step 3 by LD's
score-voting cluster DIoU-NMS (:func:`voting_cluster_diou_nms`) over the
candidates of every class at once, at ``VOTING_IOU_THRESHOLD``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torchvision

from toolkit.models.box_coder import CodeType, decode_boxes, jaccard_normalized


NMS_KINDS = ("greedy", "voting_cluster_diou")
# LD's test configuration (HikariTJU/LD: nms=dict(type='voting_cluster_diounms', iou_threshold=0.6)).
VOTING_IOU_THRESHOLD = 0.6


def diou_matrix(a: torch.Tensor, b: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Distance-IoU of every pair: ``IoU - D ** beta`` with ``D`` the squared distance of the centres over the
    squared diagonal of the smallest enclosing box (``+ 1e-7``, as LD's ``diou``).

    Args:
        a, b: ``(N, 4)`` and ``(M, 4)`` xyxy boxes (any unit; LD uses pixels).
    Returns:
        ``(N, M)`` in the boxes' dtype.
    """
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :]
    centre_a = (a[:, None, :2] + a[:, None, 2:]) / 2
    centre_b = (b[None, :, :2] + b[None, :, 2:]) / 2
    enclosing = torch.maximum(a[:, None, 2:], b[None, :, 2:]) - torch.minimum(a[:, None, :2], b[None, :, :2])
    d = ((centre_b - centre_a) ** 2).sum(dim=2) / ((enclosing ** 2).sum(dim=2) + 1e-7)
    return inter / (area_a + area_b - inter) - d ** beta


def voting_cluster_diou_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                            iou_threshold: float = VOTING_IOU_THRESHOLD
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score-voting cluster DIoU-NMS, as LD's published ``multiclass_nms`` (``voting_cluster_diounms``).

    1. Sort by descending score (stable: ties keep the input order).
    2. DIoU of every pair with the centre-distance term raised to 0.8; classes never interact (LD offsets each
       box by ``label x 4000`` and works on the whole matrix; here each class is its own block).
    3. Cluster NMS: with ``U`` the strictly upper-triangular DIoU, ``keep = max over earlier boxes of U masked by
       the previous keep <= iou_threshold``, iterated until the mask stops changing.
    4. Score voting: each kept box becomes the weighted mean of the boxes in its row of the upper-triangular
       DIoU (itself included), with weights ``exp(-(1 - DIoU)^2 / 0.025) x score`` where ``DIoU > 0.7`` and, as
       published, ``exp(-1 / 0.025) x score`` (about 4e-18 x score) for every other box of its class.  (LD's
       single matrix also gives that floor weight to the boxes of the other classes: at most ~1e-12 of a
       result, which the per-class blocks leave out.)

    Args:
        boxes: ``(N, 4)`` xyxy; ``scores`` ``(N,)``; ``labels`` ``(N,)`` int64.
    Returns:
        ``(boxes (K, 4), scores (K,), labels (K,))`` of the kept boxes in descending score order, in the input's
        dtype (computed in float64).
    """
    if boxes.numel() == 0:
        return boxes.reshape(0, 4), scores.reshape(0), labels.reshape(0)
    order = torch.sort(scores, descending=True, stable=True).indices
    kept, voted = [], []
    for label in torch.unique(labels[order]):
        rows = order[labels[order] == label]  # this class's boxes, by descending score
        b, s = boxes[rows].double(), scores[rows].double()
        full = diou_matrix(b, b, beta=0.8)
        upper = torch.triu(full, diagonal=1)
        keep = torch.ones(len(s), dtype=torch.bool)
        for _ in range(999):  # converges in far fewer steps; LD's bound
            new_keep = (upper * keep[:, None]).max(dim=0).values <= iou_threshold
            if torch.equal(new_keep, keep):
                break
            keep = new_keep
        votes = torch.triu(full)[keep]
        weights = torch.exp(-(1 - votes * (votes > 0.7)) ** 2 / 0.025) * s[None, :]
        kept.append(rows[keep])
        voted.append(weights @ b / weights.sum(dim=1, keepdim=True))
    kept_rows, voted_boxes = torch.cat(kept), torch.cat(voted)
    # Back to one descending-score order (ties: input order): ranks of the kept rows in ``order``.
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    by_score = torch.argsort(rank[kept_rows])
    kept_rows, voted_boxes = kept_rows[by_score], voted_boxes[by_score]
    return voted_boxes.to(boxes.dtype), scores[kept_rows], labels[kept_rows]


@dataclass(frozen=True)
class DetectionOutputParams:
    """Caffe ``detection_output_param`` (+ ``nms_param``); defaults are Caffe's.

    ``confidence_threshold=None`` is Caffe's unset value (``-FLT_MAX``: every score passes).
    """

    num_classes: int
    share_location: bool = True
    background_label_id: int = 0
    nms_threshold: float = 0.3
    top_k: int = -1
    eta: float = 1.0
    keep_top_k: int = -1
    confidence_threshold: Optional[float] = None
    code_type: CodeType = CodeType.CORNER
    variance_encoded_in_target: bool = False
    # "greedy": Caffe's per-class NMS at nms_threshold; "voting_cluster_diou": LD's (see the module docstring).
    nms: str = "greedy"

    def __post_init__(self) -> None:
        if self.nms not in NMS_KINDS:
            raise ValueError(f"unknown NMS {self.nms!r}; choose from {NMS_KINDS}")

    @classmethod
    def from_caffe(cls, param) -> "DetectionOutputParams":
        """The parameters of a ``caffe_pb2.DetectionOutputParameter`` (``detection_output_param``).

        Unset ``nms_param.top_k`` is ``-1`` (no cut) and unset
        ``confidence_threshold`` is ``None`` (every score passes), as in Caffe.
        ``save_output_param`` and ``visualize`` are not read: nothing is written.

        Raises:
            ValueError: no ``num_classes``, a negative NMS threshold or ``eta``
                outside ``(0, 1]`` (Caffe's checks).
        """
        if not param.HasField("num_classes"):
            raise ValueError("DetectionOutput: num_classes is required")
        nms = param.nms_param
        if nms.nms_threshold < 0:
            raise ValueError(f"DetectionOutput: nms_threshold must be >= 0, got {nms.nms_threshold}")
        if not 0 < nms.eta <= 1:
            raise ValueError(f"DetectionOutput: eta must be in (0, 1], got {nms.eta}")
        code = param.DESCRIPTOR.fields_by_name["code_type"].enum_type.values_by_number[param.code_type].name
        return cls(
            num_classes=int(param.num_classes),
            share_location=bool(param.share_location),
            background_label_id=int(param.background_label_id),
            nms_threshold=float(nms.nms_threshold),
            top_k=int(nms.top_k) if nms.HasField("top_k") else -1,
            eta=float(nms.eta),
            keep_top_k=int(param.keep_top_k),
            confidence_threshold=float(param.confidence_threshold) if param.HasField("confidence_threshold") else None,
            code_type=CodeType(code),
            variance_encoded_in_target=bool(param.variance_encoded_in_target),
        )


def _greedy_nms(boxes: torch.Tensor, threshold: float, eta: float) -> list[int]:
    """Caffe ``ApplyNMSFast``'s loop on boxes already in score order; returns kept positions."""
    if eta >= 1.0 and bool(((boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])).all()):
        # Strictly decreasing surrogate scores pin torchvision's order to ours.
        surrogate = torch.arange(len(boxes), 0, -1, dtype=torch.float32)
        keep = torchvision.ops.nms(boxes.float(), surrogate, threshold)
        return sorted(keep.tolist())
    iou = jaccard_normalized(boxes, boxes)
    kept: list[int] = []
    adaptive = threshold
    for i in range(len(boxes)):
        if all(iou[i, k] <= adaptive for k in kept):
            kept.append(i)
            if eta < 1.0 and adaptive > 0.5:
                adaptive *= eta
    return kept


def detection_output(
    loc: torch.Tensor,
    conf: torch.Tensor,
    priors_xyxy: torch.Tensor,
    variances: torch.Tensor,
    params: DetectionOutputParams,
) -> list[dict[str, torch.Tensor]]:
    """Detections of a batch.

    Args:
        loc: ``(N, P, 4)`` with ``share_location``, else ``(N, P, num_classes, 4)``
            (Caffe's ``mbox_loc`` reshaped; ``(N, P * L * 4)`` is accepted too).
        conf: ``(N, P, num_classes)`` class **probabilities** (after softmax), or
            ``(N, P * num_classes)``.
        priors_xyxy, variances: ``(P, 4)`` normalized priors and their variances.
    Returns:
        One dict per image: ``boxes`` ``(K, 4)`` normalized xyxy (not clipped),
        ``scores`` ``(K,)``, ``labels`` ``(K,)`` int64, ordered by label then score.
    """
    n, p = conf.shape[0], priors_xyxy.shape[0]
    c = params.num_classes
    conf = conf.reshape(n, p, c)
    loc = loc.reshape(n, p, 4) if params.share_location else loc.reshape(n, p, c, 4)
    bg = params.background_label_id
    threshold = params.confidence_threshold
    results = []
    with torch.no_grad():
        if params.share_location:
            decoded = decode_boxes(loc, priors_xyxy, variances, params.code_type, params.variance_encoded_in_target)
        else:
            decoded = decode_boxes(loc, priors_xyxy[:, None, :], variances[:, None, :], params.code_type,
                                   params.variance_encoded_in_target)
        for i in range(n):
            per_label = []
            for label in range(c):
                if label == bg:
                    continue
                scores = conf[i, :, label]
                idx = torch.arange(p) if threshold is None else torch.nonzero(scores > threshold).flatten()
                if idx.numel() == 0:
                    continue
                order = torch.sort(scores[idx], descending=True, stable=True).indices
                idx = idx[order]
                if -1 < params.top_k < idx.numel():
                    idx = idx[: params.top_k]
                boxes = decoded[i, idx] if params.share_location else decoded[i, idx, label]
                kept = idx if params.nms != "greedy" else idx[_greedy_nms(boxes, params.nms_threshold, params.eta)]
                kept_boxes = decoded[i, kept] if params.share_location else decoded[i, kept, label]
                per_label.append((label, kept, kept_boxes, scores[kept]))
            boxes = torch.cat([b for _, _, b, _ in per_label]) if per_label else torch.zeros(0, 4)
            scores = torch.cat([s for _, _, _, s in per_label]) if per_label else torch.zeros(0)
            labels = (torch.cat([torch.full((len(k),), lab, dtype=torch.int64) for lab, k, _, _ in per_label])
                      if per_label else torch.zeros(0, dtype=torch.int64))
            if params.nms == "voting_cluster_diou":
                boxes, scores, labels = voting_cluster_diou_nms(boxes, scores, labels, VOTING_IOU_THRESHOLD)
                if -1 < params.keep_top_k < len(scores):  # already by descending score
                    boxes, scores, labels = boxes[:params.keep_top_k], scores[:params.keep_top_k], \
                        labels[:params.keep_top_k]
                by_label = torch.sort(labels, stable=True).indices  # the module's order: label, then score
                boxes, scores, labels = boxes[by_label], scores[by_label], labels[by_label]
            elif -1 < params.keep_top_k < len(scores):
                top = torch.sort(scores, descending=True, stable=True).indices[: params.keep_top_k]
                # Back to label-ascending order; within a label the rows already are score-descending.
                sel = torch.sort(top).values
                boxes, scores, labels = boxes[sel], scores[sel], labels[sel]
            results.append({"boxes": boxes, "scores": scores, "labels": labels})
    return results


def to_caffe_detection_blob(results: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Caffe's ``detection_out`` layout ``(1, 1, R, 7)``: rows ``[image, label, score, xmin, ymin, xmax, ymax]``.

    When no image has a detection, Caffe writes one row ``[i, -1, -1, -1, -1, -1, -1]`` per image.
    """
    rows = []
    for i, r in enumerate(results):
        k = len(r["scores"])
        if k:
            rows.append(torch.cat([torch.full((k, 1), float(i)), r["labels"].float()[:, None],
                                   r["scores"].float()[:, None], r["boxes"].float()], dim=1))
    if not rows:
        out = torch.full((len(results), 7), -1.0)
        out[:, 0] = torch.arange(len(results), dtype=torch.float32)
        return out[None, None]
    return torch.cat(rows)[None, None]


def detections_from_caffe_blob(blob: torch.Tensor, batch: int) -> list[dict[str, torch.Tensor]]:
    """The inverse of :func:`to_caffe_detection_blob`: ``(1, 1, R, 7)`` rows (or ``(R, 7)``) of a batch of
    ``batch`` images -> per image ``boxes`` float32 ``(K, 4)`` normalized xyxy, ``scores`` float32 ``(K,)``,
    ``labels`` int64 ``(K,)``, in row order; Caffe's ``label -1`` placeholder rows are dropped."""
    rows = blob.detach().float().cpu().reshape(-1, 7)
    rows = rows[rows[:, 1] != -1]
    out = []
    for i in range(batch):
        mine = rows[rows[:, 0] == i]
        out.append({"boxes": mine[:, 3:7].contiguous(), "scores": mine[:, 2].contiguous(),
                    "labels": mine[:, 1].to(torch.int64)})
    return out
