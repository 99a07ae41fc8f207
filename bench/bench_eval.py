"""VOC evaluation speed: the vectorised matcher against the per-detection loop.

What it measures
----------------
:func:`toolkit.evaluation.voc.evaluate_voc` on a synthetic VOC-like problem,
once with ``matcher=match_class`` (vectorised, the default) and once with
``matcher=match_class_loop`` (the devkit's loop, the reference), for both
metrics (``voc07``, ``voc12``).  The two are the same algorithm, so every
output must be *identical*: each class's AP, the mean, the precision/recall
curves and the TP counts are compared with exact equality and the script fails
if anything differs.  Times are of the whole ``evaluate_voc`` call (best of
``--repeat`` for the vectorised matcher, of ``--repeat-loop`` for the loop);
a second table times the matchers alone over the 20 classes, to show how much
of the call is matching.

The synthetic problem (seeded, deterministic): ``--num-images`` images of
500x375 with 0–8 ground-truth boxes of 20 classes (about 10% difficult), and
30–100 detections per image: about 40% are jittered copies of a ground-truth
box (mostly of its class, sometimes duplicated, so there are true positives,
duplicates and near misses), the rest random boxes of random classes.  Scores
are float32 values and a quarter of them are rounded to 2 decimals, so part of
the detections tie (ties keep their input order, as the devkit's stable sort does).

Run from the repository root::

    .venv/bin/python bench/bench_eval.py
    .venv/bin/python bench/bench_eval.py --num-images 10000 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Callable, Optional, Sequence

from benchutil import OtherLoad, cpu_name  # also puts the repo root on sys.path if needed

import numpy as np

from toolkit.evaluation.voc import (
    METRICS,
    ClassDetections,
    ImageGT,
    VOCEvalResult,
    _gt_by_label,
    evaluate_voc,
    match_class,
    match_class_loop,
)
from toolkit.data.voc import VOC_CLASSES

IMAGE_WIDTH, IMAGE_HEIGHT = 500, 375
MAX_GT = 8
DIFFICULT_FRACTION = 0.1
DETECTIONS_RANGE = (30, 100)  # per image, inclusive
NEAR_GT_FRACTION = 0.4        # of an image's detections, when it has ground truth
WRONG_CLASS_FRACTION = 0.1    # of near-GT detections, labelled with another class
TIED_FRACTION = 0.25          # of detections whose score is rounded to 2 decimals


def _random_boxes_voc(rng: np.random.Generator, n: int, min_side: float = 8.0) -> np.ndarray:
    """``(n, 4)`` VOC 1-based inclusive boxes inside a 500x375 image."""
    w = rng.uniform(min_side, 0.8 * IMAGE_WIDTH, n)
    h = rng.uniform(min_side, 0.8 * IMAGE_HEIGHT, n)
    x0 = rng.uniform(1.0, IMAGE_WIDTH - w)
    y0 = rng.uniform(1.0, IMAGE_HEIGHT - h)
    return np.stack([x0, y0, x0 + w - 1.0, y0 + h - 1.0], axis=1)


def _clip_voc(boxes: np.ndarray) -> np.ndarray:
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 1.0, IMAGE_WIDTH)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 1.0, IMAGE_HEIGHT)
    boxes[:, 2] = np.maximum(boxes[:, 2], boxes[:, 0])
    boxes[:, 3] = np.maximum(boxes[:, 3], boxes[:, 1])
    return boxes


def make_problem(
    num_images: int, classes: Sequence[str] = VOC_CLASSES, seed: int = 0
) -> tuple[dict[str, ImageGT], dict[str, ClassDetections]]:
    """A seeded synthetic ground truth and detection set (see the module docstring).

    Returns:
        ``(gt, detections)`` as :func:`evaluate_voc` takes them; boxes are VOC
        1-based inclusive, detection coordinates rounded to 0.1 px as in a
        submission file.
    """
    rng = np.random.default_rng(seed)
    num_classes = len(classes)
    gt: dict[str, ImageGT] = {}
    ids_per_class: list[list[np.ndarray]] = [[] for _ in classes]
    scores_per_class: list[list[np.ndarray]] = [[] for _ in classes]
    boxes_per_class: list[list[np.ndarray]] = [[] for _ in classes]
    for i in range(num_images):
        image_id = f"{i:06d}"
        n_gt = int(rng.integers(0, MAX_GT + 1))
        gt_boxes = np.round(_random_boxes_voc(rng, n_gt))
        gt_labels = rng.integers(1, num_classes + 1, n_gt)
        gt[image_id] = ImageGT(gt_boxes, gt_labels, rng.random(n_gt) < DIFFICULT_FRACTION)

        n_det = int(rng.integers(DETECTIONS_RANGE[0], DETECTIONS_RANGE[1] + 1))
        n_near = int(rng.binomial(n_det, NEAR_GT_FRACTION)) if n_gt else 0
        src = rng.integers(0, n_gt, n_near) if n_gt else np.zeros(0, dtype=np.int64)
        wh = gt_boxes[src, 2:] - gt_boxes[src, :2] + 1.0
        # Each edge moves by N(0, 8% of the box's side): IoUs mostly 0.6-0.9, some under 0.5.
        near = _clip_voc(gt_boxes[src] + rng.normal(0.0, 0.08, (n_near, 4)) * np.concatenate([wh, wh], axis=1))
        near_labels = gt_labels[src].copy()
        wrong = rng.random(n_near) < WRONG_CLASS_FRACTION
        near_labels[wrong] = rng.integers(1, num_classes + 1, int(wrong.sum()))
        near_scores = np.clip(rng.normal(0.65, 0.2, n_near), 0.0, 1.0)

        n_rand = n_det - n_near
        rand = _random_boxes_voc(rng, n_rand)
        rand_labels = rng.integers(1, num_classes + 1, n_rand)
        rand_scores = np.clip(rng.normal(0.3, 0.2, n_rand), 0.0, 1.0)

        boxes = np.round(np.concatenate([near, rand]), 1)
        labels = np.concatenate([near_labels, rand_labels])
        # float32, as networks emit them; a quarter rounded to 2 decimals, as some
        # submission writers do, so that part of the scores tie.
        scores = np.concatenate([near_scores, rand_scores]).astype(np.float32).astype(np.float64)
        coarse = rng.random(n_det) < TIED_FRACTION
        scores[coarse] = np.round(scores[coarse], 2)
        order = rng.permutation(n_det)  # near and random detections interleaved in the input
        boxes, labels, scores = boxes[order], labels[order], scores[order]
        for c in np.unique(labels):
            m = labels == c
            ids_per_class[c - 1].append(np.full(int(m.sum()), image_id, dtype=object))
            scores_per_class[c - 1].append(scores[m])
            boxes_per_class[c - 1].append(boxes[m])
    detections = {}
    for k, name in enumerate(classes):
        if ids_per_class[k]:
            detections[name] = ClassDetections(
                np.concatenate(ids_per_class[k]),
                np.concatenate(scores_per_class[k]),
                np.concatenate(boxes_per_class[k]),
            )
    return gt, detections


def assert_identical(a: VOCEvalResult, b: VOCEvalResult) -> None:
    """Exact equality of everything two evaluations report (raises AssertionError)."""
    assert a.metric == b.metric
    assert a.ap == b.ap, f"per-class AP differs: {a.ap} vs {b.ap}"
    assert a.mAP == b.mAP
    assert a.per_class.keys() == b.per_class.keys()
    for name in a.per_class:
        ra, rb = a.per_class[name], b.per_class[name]
        assert (ra.ap == rb.ap) or (np.isnan(ra.ap) and np.isnan(rb.ap)), name
        assert (ra.num_gt, ra.num_detections, ra.num_tp) == (rb.num_gt, rb.num_detections, rb.num_tp), name
        assert np.array_equal(ra.precision, rb.precision), name
        assert np.array_equal(ra.recall, rb.recall), name


def best_time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Minimum wall time of ``repeat`` calls and the last call's result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def describe(gt: dict[str, ImageGT], detections: dict[str, ClassDetections]) -> str:
    n_gt = sum(len(g.labels) for g in gt.values())
    n_diff = sum(int(g.difficult.sum()) for g in gt.values())
    empty = sum(len(g.labels) == 0 for g in gt.values())
    n_det = sum(len(d) for d in detections.values())
    tied = 0
    for d in detections.values():
        _, counts = np.unique(d.scores, return_counts=True)
        tied += int(counts[counts > 1].sum())
    return (
        f"{len(gt)} images ({empty} without objects), {n_gt} GT boxes ({n_diff} difficult), "
        f"{n_det} detections over {len(detections)} classes ({tied} tied with another of their class)"
    )


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "bench_eval.py",
        description="evaluate_voc with the vectorised matcher vs the per-detection loop (identical results).",
        add_help=add_help,
    )
    parser.add_argument("--num-images", type=int, default=5000, help="synthetic images (default 5000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs of the vectorised matcher, best kept (default 3)")
    parser.add_argument("--repeat-loop", type=int, default=1,
                        help="timed runs of the loop matcher, best kept (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.num_images < 1 or args.repeat < 1 or args.repeat_loop < 1:
        print("error: --num-images, --repeat and --repeat-loop must be >= 1", file=sys.stderr)
        return 2
    other_load = OtherLoad()
    start = time.perf_counter()
    gt, detections = make_problem(args.num_images, VOC_CLASSES, args.seed)
    print(f"problem: {describe(gt, detections)}; built in {time.perf_counter() - start:.1f} s")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores; "
          f"python {platform.python_version()}, numpy {np.__version__}")

    print(f"\nevaluate_voc, whole call (vectorised: best of {args.repeat}; loop: best of {args.repeat_loop})")
    print(f"  {'metric':<8}{'mAP':>9}{'vectorised s':>14}{'loop s':>9}{'speed-up':>10}  identical")
    for metric in METRICS:
        t_fast, fast = best_time(
            lambda: evaluate_voc(gt, detections, VOC_CLASSES, metric=metric, matcher=match_class), args.repeat
        )
        t_loop, loop = best_time(
            lambda: evaluate_voc(gt, detections, VOC_CLASSES, metric=metric, matcher=match_class_loop),
            args.repeat_loop,
        )
        assert_identical(fast, loop)  # exact: same algorithm, so same floats
        print(f"  {metric:<8}{fast.mAP:>9.6f}{t_fast:>14.3f}{t_loop:>9.3f}{t_loop / t_fast:>9.1f}x  yes "
              f"({len(fast.ap)} class APs, PR curves, TP counts)")

    # The matchers alone, on the inputs evaluate_voc would give them.
    gt_by_label = _gt_by_label(gt, len(VOC_CLASSES))
    per_class = [(gt_by_label[label], detections.get(name) or ClassDetections.empty())
                 for label, name in enumerate(VOC_CLASSES, start=1)]

    def match_all(matcher) -> list:
        return [matcher(cgt, dets) for cgt, dets in per_class]

    t_fast, out_fast = best_time(lambda: match_all(match_class), args.repeat)
    t_loop, out_loop = best_time(lambda: match_all(match_class_loop), args.repeat_loop)
    for (tp_a, fp_a), (tp_b, fp_b) in zip(out_fast, out_loop):
        assert np.array_equal(tp_a, tp_b) and np.array_equal(fp_a, fp_b)
    print("\nmatchers alone, 20 classes (same best-of counts)")
    print(f"  {'vectorised s':>14}{'loop s':>9}{'speed-up':>10}")
    print(f"  {t_fast:>14.3f}{t_loop:>9.3f}{t_loop / t_fast:>9.1f}x")
    busy = other_load.cores()
    if busy is not None:
        note = "" if busy < 0.5 else "  <- a core was busy elsewhere: the times above may be inflated"
        print(f"other processes used {busy:.2f} of {os.cpu_count()} cores during the run{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
