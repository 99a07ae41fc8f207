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

:func:`evaluate_voc` works on the split's ground truth as flat arrays
(:class:`VOCGroundTruth`, which :mod:`toolkit.evaluation.voc_gt` reads from the
XML files and caches) and vectorises the matching over all detections of a
class (one IoU matrix against each detection's own image's boxes; "first in
score order wins" as a ``unique`` over (image, box) keys).
:func:`match_class_loop` is the same algorithm as a plain per-detection loop;
tests and ``bench/bench_eval.py`` check that both agree exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import repeat
from typing import Iterator, Optional, Sequence

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


class VOCGroundTruth(Mapping):
    """Ground truth of a whole split as flat arrays, objects grouped by image.

    Attributes:
        image_ids: ``(M,)`` object array of the image ids (str), unique, in split order.
        offsets: ``(M + 1,)`` int64; image ``i``'s objects are rows ``offsets[i]:offsets[i + 1]``.
        boxes_voc: ``(N, 4)`` float64, VOC 1-based inclusive ``xmin ymin xmax ymax``.
        labels: ``(N,)`` int64, 1-based class labels.
        difficult: ``(N,)`` bool.

    It is also a read-only mapping image id → :class:`ImageGT`, so code written for
    ``dict[str, ImageGT]`` (what :func:`evaluate_voc` took before) reads it unchanged.
    """

    def __init__(self, image_ids, offsets, boxes_voc, labels, difficult) -> None:
        self.image_ids = np.asarray(image_ids, dtype=object).reshape(-1)
        self.offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
        self.boxes_voc = np.asarray(boxes_voc, dtype=np.float64).reshape(-1, 4)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.difficult = np.asarray(difficult, dtype=bool).reshape(-1)
        n = len(self.labels)
        if not (len(self.boxes_voc) == n == len(self.difficult)):
            raise ValueError("boxes_voc, labels and difficult must have the same length")
        if (len(self.offsets) != len(self.image_ids) + 1 or self.offsets[0] != 0 or self.offsets[-1] != n
                or np.any(np.diff(self.offsets) < 0)):
            raise ValueError("offsets must rise from 0 to the number of objects, one step per image")
        self._index: Optional[dict[str, int]] = None

    @classmethod
    def from_images(cls, gt: Mapping[str, ImageGT]) -> "VOCGroundTruth":
        """The flat form of an image id → :class:`ImageGT` mapping (its order kept)."""
        if isinstance(gt, VOCGroundTruth):
            return gt
        images = list(gt.values())
        counts = np.fromiter((len(g.labels) for g in images), dtype=np.int64, count=len(images))
        offsets = np.concatenate(([0], np.cumsum(counts)))
        if not images:
            return cls(np.empty(0, dtype=object), offsets, np.empty((0, 4)), np.empty(0), np.empty(0))
        return cls(
            np.array(list(gt), dtype=object), offsets,
            np.concatenate([g.boxes_voc for g in images]),
            np.concatenate([g.labels for g in images]),
            np.concatenate([g.difficult for g in images]),
        )

    @property
    def index(self) -> dict[str, int]:
        """Image id → its position in :attr:`image_ids`."""
        if self._index is None:
            self._index = {image_id: i for i, image_id in enumerate(self.image_ids.tolist())}
        return self._index

    @property
    def object_image(self) -> np.ndarray:
        """``(N,)`` int64: the position in :attr:`image_ids` of each object's image (nondecreasing)."""
        return np.repeat(np.arange(len(self.image_ids)), np.diff(self.offsets))

    def __getitem__(self, image_id: str) -> ImageGT:
        i = self.index[image_id]
        rows = slice(self.offsets[i], self.offsets[i + 1])
        return ImageGT(self.boxes_voc[rows], self.labels[rows], self.difficult[rows])

    def __iter__(self) -> Iterator[str]:
        return iter(self.image_ids.tolist())

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return f"VOCGroundTruth({len(self)} images, {len(self.labels)} objects)"


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


def _detection_images(dets: ClassDetections, gt: VOCGroundTruth, class_name: str) -> np.ndarray:
    """``(D,)`` int64: the position in ``gt.image_ids`` of each detection's image.

    Raises:
        KeyError: naming the class and a few of the ids that are not in the ground truth.
    """
    index = gt.index
    det_image = np.fromiter(map(index.get, dets.image_ids, repeat(-1)), dtype=np.int64, count=len(dets))
    if np.any(det_image < 0):
        unknown = set(dets.image_ids[det_image < 0].tolist())
        sample = ", ".join(sorted(map(str, unknown))[:5])
        raise KeyError(
            f"class {class_name!r}: {len(unknown)} detection image id(s) not in the ground truth "
            f"(e.g. {sample}); are detections and split the same?"
        )
    return det_image


def _check_labels(gt: VOCGroundTruth, num_classes: int) -> None:
    bad = (gt.labels < 1) | (gt.labels > num_classes)
    if bad.any():
        first = int(np.searchsorted(gt.offsets, np.flatnonzero(bad)[0], side="right")) - 1
        labels = gt.labels[gt.offsets[first]:gt.offsets[first + 1]]
        outside = labels[(labels < 1) | (labels > num_classes)]
        raise ValueError(f"image {gt.image_ids[first]}: label(s) {outside.tolist()} outside 1..{num_classes}")


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
    """Vectorised :func:`match_class_loop` (identical output; same arguments and result).

    ``chunk_elements`` bounds the size of the IoU matrix computed at once (see :func:`_match_sorted`).
    """
    order = np.argsort(-dets.scores, kind="stable")
    index_of = {image_id: i for i, image_id in enumerate(class_gt)}
    values = list(class_gt.values())
    counts = np.fromiter((len(b) for b, _ in values), dtype=np.int64, count=len(values))
    obj_image = np.repeat(np.arange(len(values)), counts)
    obj_boxes = np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1, 4) for b, _ in values]) if values \
        else np.empty((0, 4))
    obj_difficult = np.concatenate([np.asarray(d, dtype=bool).reshape(-1) for _, d in values]) if values \
        else np.empty(0, dtype=bool)
    det_image = np.fromiter(map(index_of.get, dets.image_ids[order], repeat(-1)), dtype=np.int64, count=len(order))
    return _match_sorted(obj_image, obj_boxes, obj_difficult, det_image, dets.boxes_voc[order], iou_threshold,
                         chunk_elements)


def _match_sorted(
    obj_image: np.ndarray,
    obj_boxes: np.ndarray,
    obj_difficult: np.ndarray,
    det_image: np.ndarray,
    det_boxes: np.ndarray,
    iou_threshold: float = 0.5,
    chunk_elements: int = 1 << 22,
) -> tuple[np.ndarray, np.ndarray]:
    """The vectorised matcher of one class, detections already in descending-score (stable) order.

    Args:
        obj_image: ``(G,)`` int64, the image of each ground-truth box of the class, nondecreasing
            (an image's boxes are consecutive, in file order).
        obj_boxes: ``(G, 4)`` float64 VOC boxes; ``obj_difficult``: ``(G,)`` bool.
        det_image: ``(D,)`` int64, the image of each detection (in the numbering of ``obj_image``;
            an image with no box of the class, or ``-1``, makes the detection a false positive).
        det_boxes: ``(D, 4)`` float64 VOC boxes.
        chunk_elements: the ground truth is padded to ``(images, max boxes, 4)``; each detection's
            IoUs against its image's boxes form a ``(D, max boxes)`` matrix, computed in chunks of at
            most this many entries.
    Returns:
        ``(tp, fp)``, float64 ``(D,)`` flags in the given order.
    """
    n = len(det_image)
    tp = np.zeros(n)
    fp = np.zeros(n)
    if n == 0:
        return tp, fp
    if len(obj_image) == 0:
        fp[:] = 1.0
        return tp, fp
    starts = np.flatnonzero(np.concatenate(([True], obj_image[1:] != obj_image[:-1])))
    slot_image = obj_image[starts]  # the images that have boxes of this class, ascending
    counts = np.diff(np.append(starts, len(obj_image)))
    max_n = int(counts.max())
    slot_of_obj = np.repeat(np.arange(len(starts)), counts)
    pos = np.arange(len(obj_image)) - starts[slot_of_obj]
    pad_boxes = np.zeros((len(starts), max_n, 4))
    pad_valid = np.zeros((len(starts), max_n), dtype=bool)
    pad_difficult = np.zeros((len(starts), max_n), dtype=bool)
    pad_boxes[slot_of_obj, pos] = obj_boxes
    pad_valid[slot_of_obj, pos] = True
    pad_difficult[slot_of_obj, pos] = obj_difficult
    k = np.minimum(np.searchsorted(slot_image, det_image), len(slot_image) - 1)
    det_slot = np.where(slot_image[k] == det_image, k, -1)
    has_gt = det_slot >= 0
    ovmax = np.full(n, -np.inf)
    jmax = np.zeros(n, dtype=np.int64)
    rows = np.flatnonzero(has_gt)
    step = max(1, chunk_elements // max_n)
    for s in range(0, len(rows), step):
        r = rows[s:s + step]
        g = det_slot[r]
        ov = _iou_voc(det_boxes[r][:, None, :], pad_boxes[g])
        ov[~pad_valid[g]] = -np.inf
        # argmax picks the first maximal box, as the devkit's loop does.
        j = ov.argmax(axis=1)
        jmax[r] = j
        ovmax[r] = ov[np.arange(len(r)), j]
    matched = ovmax > iou_threshold
    on_difficult = matched & pad_difficult[np.maximum(det_slot, 0), jmax]
    candidate = matched & ~on_difficult
    cand_rows = np.flatnonzero(candidate)
    keys = det_slot[cand_rows] * max_n + jmax[cand_rows]
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
        gt: the ground truth of every image of the split (images without objects
            included: their detections are false positives): a :class:`VOCGroundTruth`
            or a mapping image id → :class:`ImageGT`.
        detections: class name → :class:`ClassDetections` (missing classes have none).
        classes: foreground class names; ground-truth labels index them 1-based.
        metric: ``"voc07"`` or ``"voc12"``.
        matcher: ``None`` (the vectorised matcher on the flat ground truth), or a function
            with the signature of :func:`match_class` / :func:`match_class_loop`.
    Raises:
        KeyError: a detection names an image that is not in ``gt``.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown VOC metric {metric!r}; choose from {METRICS}")
    unknown = set(detections) - set(classes)
    if unknown:
        raise KeyError(f"detections for unknown class(es) {sorted(unknown)}; classes are {list(classes)}")
    gt = VOCGroundTruth.from_images(gt)
    _check_labels(gt, len(classes))
    object_image = gt.object_image
    ap: dict[str, float] = {}
    per_class: dict[str, ClassResult] = {}
    for label, name in enumerate(classes, start=1):
        dets = detections.get(name) or ClassDetections.empty()
        det_image = _detection_images(dets, gt, name)
        rows = np.flatnonzero(gt.labels == label)  # in image order, file order within an image
        npos = int(np.count_nonzero(~gt.difficult[rows]))
        if matcher is None:
            order = np.argsort(-dets.scores, kind="stable")
            tp, fp = _match_sorted(object_image[rows], gt.boxes_voc[rows], gt.difficult[rows], det_image[order],
                                   dets.boxes_voc[order], iou_threshold)
        else:
            tp, fp = matcher(_class_gt(gt, rows, object_image), dets, iou_threshold)
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


def _class_gt(gt: VOCGroundTruth, rows: np.ndarray, object_image: np.ndarray) -> dict[str, tuple]:
    """Image id → ``(boxes_voc, difficult)`` of the objects ``rows`` (one class), as matchers take them."""
    out = {}
    images = object_image[rows]
    bounds = np.flatnonzero(np.diff(images)) + 1
    for chunk in np.split(rows, bounds) if len(rows) else []:
        out[gt.image_ids[object_image[chunk[0]]]] = (gt.boxes_voc[chunk], gt.difficult[chunk])
    return out
