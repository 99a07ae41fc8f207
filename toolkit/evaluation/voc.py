"""PASCAL VOC detection AP: the VOC2007 11-point metric and the VOC2010+ area metric.

The algorithm is the official devkit's (and py-faster-rcnn's ``voc_eval``):

- per class, detections of all images are sorted by descending score (a
  *stable* sort: tied detections keep their input order);
- each detection is assigned to the ground-truth box of its image with the
  highest IoU, difficult boxes included; if that IoU is greater than the
  threshold (0.5) the detection is a true positive when the box is not
  difficult and not yet taken, *ignored* (neither TP nor FP) when the box is
  difficult, and a false positive when the box was already taken; otherwise
  it is a false positive;
- recall is over the non-difficult boxes; precision is ``tp / (tp + fp)``;
- ``voc07``: mean over recall thresholds ``0, 0.1, …, 1`` of the maximum
  precision at recall ≥ threshold; ``voc12``: area under the precision
  envelope (precision made monotone from the right) at each recall change.

Boxes are in VOC's convention, 1-based inclusive, with IoU's ``+1``:
``w = xmax - xmin + 1`` (see :mod:`toolkit.data.voc` for the conversion of the
toolkit's continuous boxes).  Classes without non-difficult ground truth are
left out of ``ap`` and of the mean, as in the devkit's per-class division by
zero that we turn into an omission.

:func:`evaluate_voc` vectorises the matching over all detections of a class
(one IoU matrix against each detection's own image's boxes; "first in score
order wins" as a ``unique`` over (image, box) keys).  :func:`match_class_loop`
is the same algorithm as a plain per-detection loop; tests and
``bench/bench_eval.py`` check that both agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

METRICS = ("voc07", "voc12")


@dataclass
class ImageGT:
    """Ground truth of one image.

    Attributes:
        boxes_voc: ``(N, 4)`` float64, VOC 1-based inclusive ``xmin ymin xmax ymax``.
        labels: ``(N,)`` int64, 1-based class labels (``classes[label - 1]``).
        difficult: ``(N,)`` bool.
    """

    boxes_voc: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray

    def __post_init__(self) -> None:
        self.boxes_voc = np.asarray(self.boxes_voc, dtype=np.float64).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.difficult = np.asarray(self.difficult, dtype=bool).reshape(-1)
        if not (len(self.boxes_voc) == len(self.labels) == len(self.difficult)):
            raise ValueError("boxes_voc, labels and difficult must have the same length")


@dataclass
class ClassDetections:
    """All detections of one class.

    Attributes:
        image_ids: ``(D,)`` image ids (str).
        scores: ``(D,)`` float64 confidences.
        boxes_voc: ``(D, 4)`` float64, VOC 1-based inclusive.
    """

    image_ids: np.ndarray
    scores: np.ndarray
    boxes_voc: np.ndarray

    def __post_init__(self) -> None:
        self.image_ids = np.asarray(self.image_ids, dtype=object).reshape(-1)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        self.boxes_voc = np.asarray(self.boxes_voc, dtype=np.float64).reshape(-1, 4)
        if not (len(self.image_ids) == len(self.scores) == len(self.boxes_voc)):
            raise ValueError("image_ids, scores and boxes_voc must have the same length")

    @classmethod
    def empty(cls) -> "ClassDetections":
        return cls(np.empty(0, dtype=object), np.empty(0), np.empty((0, 4)))

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class ClassResult:
    """Per-class outcome: AP, the PR curve (in score order) and counts."""

    ap: float
    precision: np.ndarray
    recall: np.ndarray
    num_gt: int  # non-difficult ground-truth boxes
    num_detections: int
    num_tp: int


@dataclass
class VOCEvalResult:
    """Result of :func:`evaluate_voc`.

    ``ap`` holds only classes with at least one non-difficult ground-truth box;
    ``per_class`` holds every class (AP ``nan`` where there is no such box).
    """

    metric: str
    iou_threshold: float
    ap: dict[str, float]
    per_class: dict[str, ClassResult] = field(repr=False)

    @property
    def mAP(self) -> float:
        return float(np.mean(list(self.ap.values()))) if self.ap else float("nan")

    def to_json(self) -> dict:
        """The contract of ``python -m toolkit.evaluate --json``: metric, mAP, ap (fractions)."""
        return {"metric": self.metric, "mAP": self.mAP, "ap": dict(self.ap)}


def voc_ap(recall: np.ndarray, precision: np.ndarray, metric: str) -> float:
    """Average precision from a PR curve given in score order.

    Args:
        recall, precision: ``(D,)`` cumulative recall and precision.
        metric: ``"voc07"`` (11-point) or ``"voc12"`` (area under the envelope).
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if metric == "voc07":
        ap = 0.0
        # The devkit's thresholds, np.arange's floating values included.
        for t in np.arange(0.0, 1.1, 0.1):
            p = precision[recall >= t].max() if np.any(recall >= t) else 0.0
            ap += p / 11.0
        return float(ap)
    if metric == "voc12":
        mrec = np.concatenate(([0.0], recall, [1.0]))
        mpre = np.concatenate(([0.0], precision, [0.0]))
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        i = np.where(mrec[1:] != mrec[:-1])[0]
        return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
    raise ValueError(f"unknown VOC metric {metric!r}; choose from {METRICS}")


def _iou_voc(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU with VOC's inclusive ``+1`` widths; broadcasts ``(..., 4)`` against ``(..., 4)``."""
    ix0 = np.maximum(box[..., 0], boxes[..., 0])
    iy0 = np.maximum(box[..., 1], boxes[..., 1])
    ix1 = np.minimum(box[..., 2], boxes[..., 2])
    iy1 = np.minimum(box[..., 3], boxes[..., 3])
    iw = np.maximum(ix1 - ix0 + 1.0, 0.0)
    ih = np.maximum(iy1 - iy0 + 1.0, 0.0)
    inter = iw * ih
    area_a = (box[..., 2] - box[..., 0] + 1.0) * (box[..., 3] - box[..., 1] + 1.0)
    area_b = (boxes[..., 2] - boxes[..., 0] + 1.0) * (boxes[..., 3] - boxes[..., 1] + 1.0)
    return inter / (area_a + area_b - inter)


def _gt_by_label(gt: Mapping[str, ImageGT], num_classes: int) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """One pass over the images: ``out[label][image_id] = (boxes_voc, difficult)`` of that label."""
    out: list[dict] = [{} for _ in range(num_classes + 1)]
    for image_id, g in gt.items():
        if len(g.labels) == 0:
            continue
        bad = (g.labels < 1) | (g.labels > num_classes)
        if bad.any():
            raise ValueError(f"image {image_id}: label(s) {g.labels[bad].tolist()} outside 1..{num_classes}")
        for label in np.unique(g.labels):
            m = g.labels == label
            out[int(label)][image_id] = (g.boxes_voc[m], g.difficult[m])
    return out


def _check_image_ids(dets: ClassDetections, gt: Mapping[str, ImageGT], class_name: str) -> None:
    unknown = set(dets.image_ids.tolist()) - set(gt)
    if unknown:
        sample = ", ".join(sorted(map(str, unknown))[:5])
        raise KeyError(
            f"class {class_name!r}: {len(unknown)} detection image id(s) not in the ground truth "
            f"(e.g. {sample}); are detections and split the same?"
        )


def match_class_loop(
    class_gt: Mapping[str, tuple[np.ndarray, np.ndarray]],
    dets: ClassDetections,
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """The reference matcher: one detection at a time, in score order (the devkit's loop).

    Args:
        class_gt: image id → ``(boxes_voc (N, 4), difficult (N,))`` of this class.
        dets: this class's detections.
    Returns:
        ``(tp, fp)``, float64 ``(D,)`` flags in descending-score (stable) order.
    """
    order = np.argsort(-dets.scores, kind="stable")
    taken = {image_id: np.zeros(len(b), dtype=bool) for image_id, (b, _) in class_gt.items()}
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for d, k in enumerate(order):
        image_id = dets.image_ids[k]
        if image_id not in class_gt:
            fp[d] = 1.0
            continue
        boxes, difficult = class_gt[image_id]
        overlaps = _iou_voc(dets.boxes_voc[k], boxes)
        j = int(np.argmax(overlaps))
        if overlaps[j] > iou_threshold:
            if difficult[j]:
                continue
            if not taken[image_id][j]:
                tp[d] = 1.0
                taken[image_id][j] = True
            else:
                fp[d] = 1.0
        else:
            fp[d] = 1.0
    return tp, fp


def match_class(
    class_gt: Mapping[str, tuple[np.ndarray, np.ndarray]],
    dets: ClassDetections,
    iou_threshold: float = 0.5,
    chunk_elements: int = 1 << 22,
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`match_class_loop` (identical output).

    Ground truth is padded to ``(M images, max boxes, 4)``; each detection's IoUs
    against its image's boxes form a ``(D, max boxes)`` matrix computed in chunks
    of at most ``chunk_elements`` entries.
    """
    order = np.argsort(-dets.scores, kind="stable")
    n = len(order)
    tp = np.zeros(n)
    fp = np.zeros(n)
    if n == 0:
        return tp, fp
    image_ids = list(class_gt)
    index_of = {image_id: i for i, image_id in enumerate(image_ids)}
    max_n = max((len(b) for b, _ in class_gt.values()), default=0)
    det_img = np.fromiter((index_of.get(i, -1) for i in dets.image_ids[order]), dtype=np.int64, count=n)
    has_gt = det_img >= 0
    if max_n == 0 or not has_gt.any():
        fp[:] = 1.0
        return tp, fp
    pad_boxes = np.zeros((len(image_ids), max_n, 4))
    pad_valid = np.zeros((len(image_ids), max_n), dtype=bool)
    pad_difficult = np.zeros((len(image_ids), max_n), dtype=bool)
    for i, image_id in enumerate(image_ids):
        b, dif = class_gt[image_id]
        pad_boxes[i, : len(b)] = b
        pad_valid[i, : len(b)] = True
        pad_difficult[i, : len(b)] = dif
    boxes = dets.boxes_voc[order]
    ovmax = np.full(n, -np.inf)
    jmax = np.zeros(n, dtype=np.int64)
    rows = np.flatnonzero(has_gt)
    step = max(1, chunk_elements // max_n)
    for s in range(0, len(rows), step):
        r = rows[s : s + step]
        g = det_img[r]
        ov = _iou_voc(boxes[r][:, None, :], pad_boxes[g])
        ov[~pad_valid[g]] = -np.inf
        # argmax picks the first maximal box, as the devkit's loop does.
        j = ov.argmax(axis=1)
        jmax[r] = j
        ovmax[r] = ov[np.arange(len(r)), j]
    matched = ovmax > iou_threshold
    on_difficult = matched & pad_difficult[np.maximum(det_img, 0), jmax]
    candidate = matched & ~on_difficult
    cand_rows = np.flatnonzero(candidate)
    keys = det_img[cand_rows] * max_n + jmax[cand_rows]
    # np.unique's return_index gives the first occurrence, i.e. the highest-scored claim.
    _, first = np.unique(keys, return_index=True)
    tp[cand_rows[first]] = 1.0
    fp[~matched] = 1.0
    fp[candidate] = 1.0
    fp[cand_rows[first]] = 0.0
    return tp, fp


def evaluate_voc(
    gt: Mapping[str, ImageGT],
    detections: Mapping[str, ClassDetections],
    classes: Sequence[str],
    metric: str = "voc07",
    iou_threshold: float = 0.5,
    matcher=None,
) -> VOCEvalResult:
    """VOC AP of every class and their mean.

    Args:
        gt: image id → :class:`ImageGT` for every image of the split (images
            without objects included: their detections are false positives).
        detections: class name → :class:`ClassDetections` (missing classes have none).
        classes: foreground class names; ``ImageGT.labels`` index them 1-based.
        metric: ``"voc07"`` or ``"voc12"``.
        matcher: :func:`match_class` (default) or :func:`match_class_loop`.
    Raises:
        KeyError: a detection names an image that is not in ``gt``.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown VOC metric {metric!r}; choose from {METRICS}")
    unknown = set(detections) - set(classes)
    if unknown:
        raise KeyError(f"detections for unknown class(es) {sorted(unknown)}; classes are {list(classes)}")
    matcher = matcher or match_class
    ap: dict[str, float] = {}
    per_class: dict[str, ClassResult] = {}
    gt_by_label = _gt_by_label(gt, len(classes))
    for label, name in enumerate(classes, start=1):
        dets = detections.get(name) or ClassDetections.empty()
        _check_image_ids(dets, gt, name)
        class_gt = gt_by_label[label]
        npos = int(sum(int((~dif).sum()) for _, dif in class_gt.values()))
        tp, fp = matcher(class_gt, dets, iou_threshold)
        tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
        precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        if npos > 0:
            recall = tp_cum / float(npos)
            value = voc_ap(recall, precision, metric)
            ap[name] = value
        else:
            recall = np.zeros_like(tp_cum)
            value = float("nan")
        per_class[name] = ClassResult(value, precision, recall, npos, len(dets), int(tp.sum()))
    return VOCEvalResult(metric, iou_threshold, ap, per_class)
