"""COCO box AP on whole arrays: pycocotools' ``COCOeval(iouType="bbox")`` with its default
parameters (evaluate, accumulate, summarize), the same numbers, without a Python loop per
image, category and detection.

What it reproduces, step by step (pycocotools 2.0's ``cocoeval.py`` and ``coco.py``):

- images are the annotation file's ``images`` ids, sorted; categories its ``categories``
  ids, sorted; annotations and results of other images or categories are left out (a
  result naming an image the file does not have is an error, as ``loadRes`` asserts);
- a ground-truth box is *ignored* for an area range when it is a crowd (``iscrowd``) or
  its ``area`` field lies outside the range; a result's area is ``w * h`` of its box;
- per image and category, results are sorted by descending score (a stable sort: ties
  keep file order) and the first 100 are kept; IoU is ``maskUtils.iou``'s, boxes
  ``[x, y, w, h]``: ``w_i = min(x1 + w1, x2 + w2) - max(x1, x2)`` (0 if ``<= 0``), same for
  ``h_i``, ``i = w_i * h_i``, IoU ``i / (a_d + a_g - i)``, or ``i / a_d`` against a crowd box;
- each result in score order takes, at each IoU threshold ``t`` in 0.50:0.05:0.95, the
  not yet taken non-ignored box of highest IoU ``>= min(t, 1 - 1e-10)`` (a crowd box can
  be taken again; equal IoUs: the box later in file order), and only when there is none,
  the ignored box of highest IoU; a result matched to an ignored box, or unmatched with
  its area outside the range, is ignored; a box whose annotation ``id`` is 0 counts as
  unmatched for the result that took it (pycocotools stores the id as the match);
- per category, area range and maximum number of results per image (1, 10, 100), the
  results of all images are sorted by descending score (ties: image order, then rank in
  the image), true and false positives accumulated, precision made monotone from the
  right and read at the 101 recall thresholds 0:0.01:1 (0 past the last recall);
  categories without non-ignored boxes stay ``-1``;
- the 12 statistics are the means of the entries ``> -1`` of the same slices as
  ``COCOeval.summarize``.

The matching runs over all (image, category) pairs at once, one rank of the per-image
score order at a time (at most 100 steps), for every area range and IoU threshold
together; the accumulation is vectorised over IoU thresholds and area ranges. The tests
compare all 12 statistics with pycocotools to 1e-12 (in practice: equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain, repeat
from operator import itemgetter
from typing import Hashable, Sequence

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
"""COCOeval's ``params.iouThrs`` (the same ``linspace`` call, so the same floats)."""
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
"""COCOeval's ``params.recThrs``."""
MAX_DETS = (1, 10, 100)
AREA_RANGES = ((0 ** 2, 1e5 ** 2), (0 ** 2, 32 ** 2), (32 ** 2, 96 ** 2), (96 ** 2, 1e5 ** 2))
AREA_LABELS = ("all", "small", "medium", "large")

# (average precision?, IoU threshold, area label, max detections) of COCOeval's 12 statistics, in order.
_STATS = (
    (True, None, "all", 100), (True, 0.5, "all", 100), (True, 0.75, "all", 100),
    (True, None, "small", 100), (True, None, "medium", 100), (True, None, "large", 100),
    (False, None, "all", 1), (False, None, "all", 10), (False, None, "all", 100),
    (False, None, "small", 100), (False, None, "medium", 100), (False, None, "large", 100),
)


@dataclass
class COCOEvalArrays:
    """What ``COCOeval`` leaves in ``eval`` and ``stats``.

    Attributes:
        precision: ``(T=10, R=101, K, A=4, M=3)`` float64 (``-1`` where a category has no
            non-ignored ground truth); IoU thresholds × recall thresholds × categories
            (sorted ids) × area ranges (all, small, medium, large) × max detections (1, 10, 100).
        recall: ``(T, K, A, M)`` float64, ``-1`` likewise.
        stats: ``(12,)`` float64, ``COCOeval.stats``.
        cat_ids: ``(K,)`` the category ids, sorted.
        summary: the 12 lines ``COCOeval.summarize`` prints.
    """

    precision: np.ndarray
    recall: np.ndarray
    stats: np.ndarray
    cat_ids: list
    summary: str


def evaluate_bbox(dataset: dict, results: Sequence[dict]) -> COCOEvalArrays:
    """COCO box evaluation of ``results`` against the annotation file's content ``dataset``.

    Args:
        dataset: a COCO instances file as loaded by ``json.load`` (``images``, ``annotations``
            with ``id``, ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``, ``area``,
            ``iscrowd`` (0 when absent); ``categories``).
        results: COCO results, ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` each.
    Raises:
        ValueError: a result names an image that ``dataset`` does not have, or an entry lacks a field.
    """
    image_ids = sorted(set(img["id"] for img in dataset.get("images", [])))
    cat_ids = sorted(set(cat["id"] for cat in dataset.get("categories", [])))
    image_pos = {image_id: i for i, image_id in enumerate(image_ids)}
    cat_pos = {cat_id: k for k, cat_id in enumerate(cat_ids)}
    gt = _ground_truth(dataset.get("annotations", []), image_pos, cat_pos)
    dt = _results(results, image_pos, cat_pos)
    dtm, dt_ignore = _match(gt, dt, len(cat_ids))
    precision, recall = _accumulate(gt, dt, dtm, dt_ignore, len(cat_ids))
    stats, summary = _summarize(precision, recall)
    return COCOEvalArrays(precision, recall, stats, cat_ids, summary)


@dataclass
class _Boxes:
    """Ground-truth boxes or results of the evaluated images and categories, as flat arrays.

    ``image`` and ``cat`` are positions in the sorted image and category ids; rows are
    grouped by ``(image, cat)`` (``group_start`` per row's group); ground truth keeps file
    order within a group, results are in descending score order (``rank`` 0, 1, ...).
    """

    image: np.ndarray      # (N,) int64
    cat: np.ndarray        # (N,) int64
    boxes: np.ndarray      # (N, 4) float64 [x, y, w, h]
    area: np.ndarray       # (N,) float64
    crowd: np.ndarray      # (N,) bool (results: all False)
    id_zero: np.ndarray    # (N,) bool: annotation id 0 (ground truth only)
    score: np.ndarray      # (N,) float64 (results only)
    rank: np.ndarray       # (N,) int64 (results only)


def _missing(kind: str, index: int, exc: Exception) -> ValueError:
    return ValueError(f"{kind} {index} has no {exc.args[0]!r} field")


def _ground_truth(annotations: list, image_pos: dict[Hashable, int], cat_pos: dict[Hashable, int]) -> _Boxes:
    n = len(annotations)
    try:
        img = np.fromiter(map(image_pos.get, map(itemgetter("image_id"), annotations), repeat(-1)),
                          dtype=np.int64, count=n)
        cat = np.fromiter(map(cat_pos.get, map(itemgetter("category_id"), annotations), repeat(-1)),
                          dtype=np.int64, count=n)
        ids = [a["id"] for a in annotations]
    except KeyError as exc:
        index = next(i for i, a in enumerate(annotations) if exc.args[0] not in a)
        raise _missing("annotation", index, exc) from None
    # pycocotools lists the annotations of the evaluated images (image order, then file order) and
    # loads each by its id: with repeated ids, every one of them reads the last annotation of that id.
    listed = np.flatnonzero((img >= 0) & (cat >= 0))
    listed = listed[np.argsort(img[listed], kind="stable")]
    last_of_id = {ann_id: i for i, ann_id in enumerate(ids)}
    if len(last_of_id) != n:
        listed = np.array([last_of_id[ids[i]] for i in listed], dtype=np.int64)
        keep = (img[listed] >= 0) & (cat[listed] >= 0)
        listed = listed[keep]
    # Group by (image, category), keeping the listed order within a group.
    order = np.lexsort((np.arange(len(listed)), cat[listed], img[listed]))
    rows = listed[order]
    anns = [annotations[i] for i in rows.tolist()]
    try:
        boxes = _box_array([a["bbox"] for a in anns], "annotation")
        area = np.array([a["area"] for a in anns], dtype=np.float64)
    except KeyError as exc:
        raise _missing("annotation", next(i for i in rows.tolist() if exc.args[0] not in annotations[i]),
                       exc) from None
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    id_zero = np.array([a["id"] == 0 for a in anns], dtype=bool)
    return _Boxes(img[rows], cat[rows], boxes, area, crowd, id_zero, np.empty(0), np.empty(0, dtype=np.int64))


def _results(results: Sequence[dict], image_pos: dict[Hashable, int], cat_pos: dict[Hashable, int]) -> _Boxes:
    results = list(results)
    n = len(results)
    try:
        image_ids = list(map(itemgetter("image_id"), results))
        cat = np.fromiter(map(cat_pos.get, map(itemgetter("category_id"), results), repeat(-1)),
                          dtype=np.int64, count=n)
        score = np.fromiter(map(itemgetter("score"), results), dtype=np.float64, count=n)
        boxes = _box_array(list(map(itemgetter("bbox"), results)), "result")
    except KeyError as exc:
        index = next(i for i, r in enumerate(results) if exc.args[0] not in r)
        raise _missing("result", index, exc) from None
    img = np.fromiter(map(image_pos.get, image_ids, repeat(-1)), dtype=np.int64, count=n)
    if np.any(img < 0):
        unknown = sorted(set(image_ids[i] for i in np.flatnonzero(img < 0).tolist()), key=str)
        raise ValueError(f"{len(unknown)} result image id(s) are not in the annotations' images "
                         f"(e.g. {', '.join(map(str, unknown[:5]))}): results and annotations do not match")
    keep = np.flatnonzero(cat >= 0)
    # Per (image, category): descending score, ties in file order; the first 100 are evaluated.
    order = keep[np.lexsort((keep, -score[keep], cat[keep], img[keep]))]
    img, cat, score, boxes = img[order], cat[order], score[order], boxes[order]
    rank = np.arange(len(order)) - _group_start(img, cat)
    top = rank < MAX_DETS[-1]
    return _Boxes(img[top], cat[top], boxes[top], boxes[top, 2] * boxes[top, 3], np.zeros(int(top.sum()), bool),
                  np.empty(0, dtype=np.int64), score[top], rank[top])


def _box_array(boxes: list, kind: str) -> np.ndarray:
    """``(N, 4)`` float64 from a list of ``[x, y, w, h]`` lists; an entry of another length is an error."""
    lengths = np.fromiter(map(len, boxes), dtype=np.int64, count=len(boxes))
    if np.any(lengths != 4):
        raise ValueError(f"{kind} bbox must be [x, y, w, h]; got {boxes[int(np.argmax(lengths != 4))]!r}")
    return np.fromiter(chain.from_iterable(boxes), dtype=np.float64, count=4 * len(boxes)).reshape(-1, 4)


def _group_start(img: np.ndarray, cat: np.ndarray) -> np.ndarray:
    """For rows sorted by (img, cat): the index of the first row of each row's group."""
    if len(img) == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.concatenate(([True], (img[1:] != img[:-1]) | (cat[1:] != cat[:-1])))
    starts = np.flatnonzero(new)
    return starts[np.cumsum(new) - 1]


def _iou(dt_boxes: np.ndarray, gt_boxes: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """Row-wise IoU of ``[x, y, w, h]`` boxes, operation for operation as ``maskUtils.iou`` (bbIou)."""
    dx, dy, dw, dh = dt_boxes.T
    gx, gy, gw, gh = gt_boxes.T
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    inter = w * h
    da = dw * dh
    union = np.where(crowd, da, da + gw * gh - inter)
    out = np.zeros(len(inter))
    ok = (w > 0) & (h > 0)
    out[ok] = inter[ok] / union[ok]
    return out


def _ignored_by_area(area: np.ndarray) -> np.ndarray:
    """``(A, N)`` bool: ``area`` outside each area range (pycocotools' ``< lo or > hi``)."""
    lo = np.array([r[0] for r in AREA_RANGES], dtype=np.float64)[:, None]
    hi = np.array([r[1] for r in AREA_RANGES], dtype=np.float64)[:, None]
    return (area[None, :] < lo) | (area[None, :] > hi)


def _match(gt: _Boxes, dt: _Boxes, num_cats: int) -> tuple[np.ndarray, np.ndarray]:
    """``(dtm, dt_ignore)``, bool ``(A, T, D)``: each result matched / ignored, per area range and IoU threshold."""
    num_a, num_t, num_d = len(AREA_RANGES), len(IOU_THRESHOLDS), len(dt.score)
    dtm = np.zeros((num_a, num_t, num_d), dtype=bool)
    dt_ignore = np.zeros((num_a, num_t, num_d), dtype=bool)
    gt_ignore = gt.crowd[None, :] | _ignored_by_area(gt.area)  # (A, G)
    if num_d and len(gt.image):
        # The ground-truth rows [start, stop) of each result's (image, category).
        key_gt = gt.image * num_cats + gt.cat  # nondecreasing: rows are grouped by (image, category)
        key_dt = dt.image * num_cats + dt.cat
        start = np.searchsorted(key_gt, key_dt, side="left")
        stop = np.searchsorted(key_gt, key_dt, side="right")
        count = stop - start
        # One pair per (result, ground-truth box of its group); pairs sorted by (rank, result, box).
        has = np.flatnonzero(count > 0)
        has = has[np.argsort(dt.rank[has], kind="stable")]
        pair_dt = np.repeat(has, count[has])
        first = np.repeat(np.cumsum(count[has]) - count[has], count[has])
        pair_gt = start[pair_dt] + np.arange(len(pair_dt)) - first
        pair_iou = _iou(dt.boxes[pair_dt], gt.boxes[pair_gt], gt.crowd[pair_gt])
        thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[None, :, None]
        taken = np.zeros((num_a, num_t, len(gt.image)), dtype=bool)
        ranks = dt.rank[pair_dt]
        bounds = np.searchsorted(ranks, np.arange(MAX_DETS[-1] + 1))
        for r in range(MAX_DETS[-1]):
            lo, hi = bounds[r], bounds[r + 1]
            if lo == hi:
                continue
            d, g, iou = pair_dt[lo:hi], pair_gt[lo:hi], pair_iou[lo:hi]
            new = np.concatenate(([True], d[1:] != d[:-1]))
            seg = np.flatnonzero(new)  # the first pair of each result
            seg_of = np.cumsum(new) - 1  # each pair's result, numbered within this rank
            ok = (~taken[:, :, g] | gt.crowd[g]) & (iou >= thresholds)  # (A, T, P)
            ign = gt_ignore[:, None, g]                                   # (A, 1, P)
            chosen = np.full((num_a, num_t, len(seg)), -1, dtype=np.int64)
            # Non-ignored boxes first; the ignored ones only for results that found none.
            for eligible in (ok & ~ign, ok & ign):
                best = np.maximum.reduceat(np.where(eligible, iou, -1.0), seg, axis=2)
                at_best = eligible & (iou == best[:, :, seg_of])
                last = np.maximum.reduceat(np.where(at_best, np.arange(len(d)), -1), seg, axis=2)
                chosen = np.where(chosen >= 0, chosen, last)
            a_idx, t_idx, s_idx = np.nonzero(chosen >= 0)
            pair = chosen[a_idx, t_idx, s_idx]
            taken[a_idx, t_idx, g[pair]] = True
            det = d[pair]
            dtm[a_idx, t_idx, det] = ~gt.id_zero[g[pair]]
            dt_ignore[a_idx, t_idx, det] = gt_ignore[a_idx, g[pair]]
    dt_ignore |= ~dtm & _ignored_by_area(dt.area)[:, None, :]
    return dtm, dt_ignore


def _accumulate(gt: _Boxes, dt: _Boxes, dtm: np.ndarray, dt_ignore: np.ndarray,
                num_cats: int) -> tuple[np.ndarray, np.ndarray]:
    """``(precision (T, R, K, A, M), recall (T, K, A, M))`` as ``COCOeval.accumulate`` fills ``eval``."""
    num_a, num_t, num_r, num_m = len(AREA_RANGES), len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(MAX_DETS)
    precision = -np.ones((num_t, num_r, num_cats, num_a, num_m))
    recall = -np.ones((num_t, num_cats, num_a, num_m))
    gt_ignore = gt.crowd[None, :] | _ignored_by_area(gt.area)
    npig = np.stack([np.count_nonzero(~gt_ignore[:, gt.cat == k], axis=1) for k in range(num_cats)])  # (K, A)
    # All results of a category: descending score, ties in image order then rank (pycocotools
    # concatenates the images' lists in image order and sorts them with a stable sort).
    order = np.lexsort((dt.rank, dt.image, -dt.score, dt.cat))
    tps = (dtm & ~dt_ignore)[:, :, order]
    fps = (~dtm & ~dt_ignore)[:, :, order]
    rank = dt.rank[order]
    cat_bounds = np.searchsorted(dt.cat[order], np.arange(num_cats + 1))
    for k in range(num_cats):
        if not npig[k].any():
            continue  # no non-ignored box in any area range: this category stays -1
        b0, b1 = cat_bounds[k], cat_bounds[k + 1]
        for m, max_det in enumerate(MAX_DETS):
            # Every kept result has rank < MAX_DETS[-1]: the last maximum takes the whole slice.
            sel = slice(b0, b1) if max_det >= MAX_DETS[-1] else b0 + np.flatnonzero(rank[b0:b1] < max_det)
            # Counts as floats, as pycocotools' cumsum(...).astype(float) (exact: integers below 2**53).
            tp_sum = np.cumsum(tps[:, :, sel], axis=2, dtype=np.float64)
            fp_sum = np.cumsum(fps[:, :, sel], axis=2, dtype=np.float64)
            nd = tp_sum.shape[2]
            for a in range(num_a):
                if npig[k, a] == 0:
                    continue
                tp, fp = tp_sum[a], fp_sum[a]
                rc = tp / int(npig[k, a])
                pr = tp / (fp + tp + np.spacing(1))
                recall[:, k, a, m] = rc[:, -1] if nd else 0
                envelope = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
                for t in range(num_t):
                    inds = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
                    inside = inds < nd
                    q = np.zeros(num_r)
                    q[inside] = envelope[t, inds[inside]]
                    precision[t, :, k, a, m] = q
    return precision, recall


def _summarize(precision: np.ndarray, recall: np.ndarray) -> tuple[np.ndarray, str]:
    """``COCOeval.summarize``'s 12 numbers (same slices, same means) and its printed lines."""
    stats, lines = np.zeros(len(_STATS)), []
    for i, (is_ap, iou, area, max_det) in enumerate(_STATS):
        aind = [AREA_LABELS.index(area)]
        mind = [MAX_DETS.index(max_det)]
        if is_ap:
            s = precision
            if iou is not None:
                s = s[np.where(iou == IOU_THRESHOLDS)[0]]
            s = s[:, :, :, aind, mind]
        else:
            s = recall
            if iou is not None:
                s = s[np.where(iou == IOU_THRESHOLDS)[0]]
            s = s[:, :, aind, mind]
        stats[i] = -1 if len(s[s > -1]) == 0 else np.mean(s[s > -1])
        iou_str = f"{IOU_THRESHOLDS[0]:0.2f}:{IOU_THRESHOLDS[-1]:0.2f}" if iou is None else f"{iou:0.2f}"
        title, kind = ("Average Precision", "(AP)") if is_ap else ("Average Recall", "(AR)")
        lines.append(f" {title:<18} {kind} @[ IoU={iou_str:<9} | area={area:>6s} | maxDets={max_det:>3d} ] = "
                     f"{stats[i]:0.3f}")
    return stats, "\n".join(lines) + "\n"
