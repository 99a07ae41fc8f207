"""Evaluation speed, end to end: ``python -m toolkit.evaluate`` against the tools it replaces.

Three parts (``--parts``, all by default), each side by side in one run:

``voc``
    A generated VOC-style split of ``--num-images`` images (default 5,000: 500x375, 0-8 objects of
    20 classes, about 10% difficult; XML files, ``ImageSets/Main/test.txt``) and ~65 detections per
    image (~325k, as ``comp4_det_test_<class>.txt`` files written by the toolkit: near-ground-truth
    and random boxes, a quarter of the scores rounded to 2 decimals so that many tie), in a
    temporary folder (the XML files' times set an hour back, as a dataset's are old). Timed as
    separate processes, from process start to the JSON of APs:

    - ours: ``python -m toolkit.evaluate --metric voc07 --json ...``;
    - the peer: py-faster-rcnn's ``voc_eval.py`` algorithm, written here from the published
      algorithm (:func:`voc_eval`, run as ``bench_eval.py voc-eval-peer``), called once per class
      over the 20 classes as ``pascal_voc._do_python_eval`` does: per class it reads the split
      list, loads its annotation pickle (``annots.pkl``: every XML parsed with ElementTree on the
      first call, then pickled), reads the class's file line by line into arrays, sorts by score
      and matches detection by detection in Python. One deliberate change: the published script
      sorts with ``np.argsort(-confidence)``, numpy's default (unstable) sort, which orders tied
      scores arbitrarily (on this problem that moves every class AP, by up to 0.018); the peer uses a
      stable sort, as the VOC devkit's MATLAB ``sort`` and our evaluator do, so that both see tied
      detections in file order and their APs can be compared exactly. Its ``<class>_pr.pkl`` dumps
      are left out (ours writes no curves either).

    Caches *cold* (our ``--cache-dir`` emptied, the peer's ``annots.pkl`` deleted: both parse
    every XML file; the files themselves are in the OS page cache either way) and *warm* (both
    caches filled by the previous run). Rounds alternate the two tools; medians, ranges and the
    ratio peer / ours per round are printed, and the script fails unless every class AP and the
    mAP of the two are identical (exact float equality).

``coco``
    A synthetic COCO set of ``--coco-images`` images (default 5,000, 20 categories, 0-14 boxes
    per image, crowd and area-range cases, ~60 results per image, ~300k), as JSON files. Ours:
    ``python -m toolkit.evaluate --coco-annotations A --detections R --json ...``; the peer: a
    process running pycocotools as its users do (``COCO(A)``, ``loadRes(R)``, ``COCOeval``
    evaluate + accumulate + summarize, stats to JSON). End to end as above, plus the evaluation
    alone (pycocotools' evaluate + accumulate + summarize, timed in its process, against
    :func:`toolkit.evaluation.cocoeval.evaluate_bbox` on the loaded JSON, timed here). Fails
    unless the 12 statistics are identical.

``matchers``
    In one process, :func:`toolkit.evaluation.voc.evaluate_voc` on the VOC problem's arrays with
    the vectorised matcher (the default) and with ``match_class_loop`` (the devkit's loop, the
    reference), for ``voc07`` and ``voc12``; every AP, PR curve and TP count must be equal.

Run from the repository root on an otherwise idle machine (it reports the CPU other processes took)::

    .venv/bin/python bench/bench_eval.py
    .venv/bin/python bench/bench_eval.py --parts voc --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

# Only the standard library and numpy above: the peers run as `python bench/bench_eval.py <peer> ...`
# and import what voc_eval.py and a pycocotools script import. The toolkit is imported in the functions
# that measure it.

REPO_ROOT = Path(__file__).resolve().parents[1]
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IMAGE_WIDTH, IMAGE_HEIGHT = 500, 375
MAX_GT = 8
DIFFICULT_FRACTION = 0.1
DETECTIONS_RANGE = (30, 100)  # per image, inclusive
NEAR_GT_FRACTION = 0.4        # of an image's detections, when it has ground truth
WRONG_CLASS_FRACTION = 0.1    # of near-GT detections, labelled with another class
TIED_FRACTION = 0.25          # of detections whose score is rounded to 2 decimals
PARTS = ("voc", "coco", "matchers")


# ----------------------------------------------------------------------------------------------
# The peer: voc_eval.py's algorithm (py-faster-rcnn, lib/datasets/voc_eval.py), written from it.

def parse_rec(filename: str) -> list[dict]:
    """One VOC XML file as the published script reads it: every ``<object>``'s name, pose,
    truncated and difficult flags and its ``<bndbox>`` as integers."""
    tree = ET.parse(filename)
    objects = []
    for obj in tree.findall("object"):
        bbox = obj.find("bndbox")
        objects.append({
            "name": obj.find("name").text,
            "pose": obj.find("pose").text if obj.find("pose") is not None else "Unspecified",
            "truncated": int(obj.find("truncated").text) if obj.find("truncated") is not None else 0,
            "difficult": int(obj.find("difficult").text),
            "bbox": [int(bbox.find(tag).text) for tag in ("xmin", "ymin", "xmax", "ymax")],
        })
    return objects


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """The devkit's AP: 11-point (VOC2007) or the area under the monotone envelope."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def voc_eval(detpath: str, annopath: str, imagesetfile: str, classname: str, cachedir: str,
             ovthresh: float = 0.5, use_07_metric: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """AP of one class: ``detpath.format(classname)`` against ``annopath.format(image_id)`` for the
    images of ``imagesetfile``; every file's objects cached in ``<cachedir>/annots.pkl``."""
    os.makedirs(cachedir, exist_ok=True)
    cachefile = os.path.join(cachedir, "annots.pkl")
    with open(imagesetfile) as f:
        imagenames = [x.strip() for x in f.readlines()]
    if not os.path.isfile(cachefile):
        recs = {name: parse_rec(annopath.format(name)) for name in imagenames}
        with open(cachefile, "wb") as f:
            pickle.dump(recs, f)
    else:
        with open(cachefile, "rb") as f:
            recs = pickle.load(f)

    class_recs = {}
    npos = 0
    for name in imagenames:
        objs = [obj for obj in recs[name] if obj["name"] == classname]
        bbox = np.array([x["bbox"] for x in objs])
        difficult = np.array([x["difficult"] for x in objs]).astype(bool)
        npos = npos + sum(~difficult)
        class_recs[name] = {"bbox": bbox, "difficult": difficult, "det": [False] * len(objs)}

    with open(detpath.format(classname)) as f:
        splitlines = [x.strip().split(" ") for x in f.readlines()]
    image_ids = [x[0] for x in splitlines]
    confidence = np.array([float(x[1]) for x in splitlines])
    boxes = np.array([[float(z) for z in x[2:]] for x in splitlines])
    sorted_ind = np.argsort(-confidence, kind="stable")  # the published script: default (unstable) sort
    boxes = boxes[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]

    nd = len(image_ids)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        r = class_recs[image_ids[d]]
        bb = boxes[d, :].astype(float)
        ovmax = -np.inf
        bbgt = r["bbox"].astype(float)
        if bbgt.size > 0:
            ixmin = np.maximum(bbgt[:, 0], bb[0])
            iymin = np.maximum(bbgt[:, 1], bb[1])
            ixmax = np.minimum(bbgt[:, 2], bb[2])
            iymax = np.minimum(bbgt[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (bbgt[:, 2] - bbgt[:, 0] + 1.0) * (bbgt[:, 3] - bbgt[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not r["difficult"][jmax]:
                if not r["det"][jmax]:
                    tp[d] = 1.0
                    r["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0

    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return rec, prec, voc_ap(rec, prec, use_07_metric)


def voc_eval_peer(argv: Sequence[str]) -> int:
    """``bench_eval.py voc-eval-peer DEVKIT YEAR SPLIT DETDIR CACHEDIR OUT.json``: the 20 classes as
    py-faster-rcnn's ``pascal_voc._do_python_eval`` runs them (VOC2007: the 11-point metric)."""
    devkit, year, split, detdir, cachedir, out = argv
    annopath = os.path.join(devkit, f"VOC{year}", "Annotations", "{:s}.xml")
    imagesetfile = os.path.join(devkit, f"VOC{year}", "ImageSets", "Main", f"{split}.txt")
    detpath = os.path.join(detdir, f"comp4_det_{split}_{{:s}}.txt")
    use_07_metric = int(year) < 2010
    aps = {}
    for cls in VOC_CLASSES:
        _, _, ap = voc_eval(detpath, annopath, imagesetfile, cls, cachedir, 0.5, use_07_metric)
        aps[cls] = float(ap)
        print(f"AP for {cls} = {ap:.4f}")
    print(f"Mean AP = {np.mean(list(aps.values())):.4f}")
    with open(out, "w") as f:
        json.dump({"metric": "voc07" if use_07_metric else "voc12", "mAP": float(np.mean(list(aps.values()))),
                   "ap": aps}, f)
    return 0


def pycocotools_peer(argv: Sequence[str]) -> int:
    """``bench_eval.py pycocotools-peer ANNOTATIONS RESULTS OUT.json``: COCOeval as its users run it."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    annotations, results, out = argv
    gt = COCO(annotations)
    dt = gt.loadRes(results)
    ev = COCOeval(gt, dt, "bbox")
    start = time.perf_counter()
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    seconds = time.perf_counter() - start
    with open(out, "w") as f:
        json.dump({"stats": [float(v) for v in ev.stats], "evaluate_accumulate_summarize_s": seconds}, f)
    return 0


# ----------------------------------------------------------------------------------------------
# Problems.

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


def make_problem(num_images: int, classes: Sequence[str] = VOC_CLASSES, seed: int = 0):
    """A seeded synthetic VOC ground truth and detection set.

    Returns:
        ``(gt, detections)``: image id → :class:`~toolkit.evaluation.voc.ImageGT` (integer VOC
        1-based inclusive boxes) and class → :class:`~toolkit.evaluation.voc.ClassDetections`
        (coordinates rounded to 0.1 px, float32 scores, a quarter rounded to 2 decimals).
    """
    from toolkit.evaluation.voc import ClassDetections, ImageGT

    rng = np.random.default_rng(seed)
    num_classes = len(classes)
    gt = {}
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


def write_voc_problem(root: Path, gt: dict, detections: dict, year: str = "2007", split: str = "test") -> Path:
    """The problem as files: ``root/VOCdevkit/VOC<year>`` (XML, split list) and ``root/detections``
    (``comp4_det_<split>_<class>.txt``, written by the toolkit). Returns the devkit folder."""
    from toolkit.evaluation.submission import write_voc_submission

    voc = root / "VOCdevkit" / f"VOC{year}"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for image_id, g in gt.items():
        objects = "".join(
            f"\t<object>\n\t\t<name>{VOC_CLASSES[label - 1]}</name>\n\t\t<pose>Unspecified</pose>\n"
            f"\t\t<truncated>0</truncated>\n\t\t<difficult>{int(difficult)}</difficult>\n\t\t<bndbox>\n"
            + "".join(f"\t\t\t<{tag}>{int(v)}</{tag}>\n" for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
            + "\t\t</bndbox>\n\t</object>\n"
            for box, label, difficult in zip(g.boxes_voc, g.labels, g.difficult)
        )
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation>\n\t<folder>VOC{year}</folder>\n\t<filename>{image_id}.jpg</filename>\n"
            f"\t<size>\n\t\t<width>{IMAGE_WIDTH}</width>\n\t\t<height>{IMAGE_HEIGHT}</height>\n"
            f"\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n{objects}</annotation>\n")
    (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(gt) + "\n")
    # A dataset's files are older than the 2 s within which toolkit.evaluate's cache re-reads a file
    # (toolkit.evaluation.voc_gt.RACY_NS); files written a moment ago would be re-read once more.
    an_hour_ago = time.time_ns() - 3600 * 10 ** 9
    for path in (voc / "Annotations").iterdir():
        os.utime(path, ns=(an_hour_ago, an_hour_ago))
    write_voc_submission(root / "detections", split, detections)
    return root / "VOCdevkit"


def make_coco_problem(num_images: int, seed: int = 0, num_cats: int = 20) -> tuple[dict, list]:
    """A seeded synthetic COCO annotation dict and results list.

    Images of 300-640 x 240-640 px, 0-14 boxes each (sides 4 px to 60% of the image, so all
    three area ranges; 3% crowd; ``area`` fields 50-100% of ``w * h``, as segmentation areas
    are), 30-90 results per image: half jittered copies of a box (10% of them with another
    category), half random; float32 scores, a quarter rounded to 2 decimals.
    """
    rng = np.random.default_rng(seed)
    cat_ids = [3 * k + 2 for k in range(num_cats)]
    images, annotations, results = [], [], []
    for i in range(num_images):
        width, height = int(rng.integers(300, 640)), int(rng.integers(240, 640))
        image_id = 10 * i + 7
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        n = int(rng.integers(0, 15))
        w, h = rng.uniform(4, width * 0.6, n), rng.uniform(4, height * 0.6, n)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        cats = rng.integers(0, num_cats, n)
        crowd = rng.random(n) < 0.03
        for k in range(n):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_ids[cats[k]],
                                "bbox": [float(x[k]), float(y[k]), float(w[k]), float(h[k])],
                                "area": float(w[k] * h[k] * rng.uniform(0.5, 1.0)), "iscrowd": int(crowd[k])})
        for _ in range(int(rng.integers(30, 90))):
            if n and rng.random() < 0.5:
                k = int(rng.integers(n))
                box = [x[k] + rng.normal(0, 0.1 * w[k]), y[k] + rng.normal(0, 0.1 * h[k]),
                       w[k] * rng.uniform(0.8, 1.2), h[k] * rng.uniform(0.8, 1.2)]
                cat = int(cats[k]) if rng.random() < 0.9 else int(rng.integers(num_cats))
            else:
                bw, bh = rng.uniform(2, width * 0.5), rng.uniform(2, height * 0.5)
                box = [rng.uniform(0, width - bw), rng.uniform(0, height - bh), bw, bh]
                cat = int(rng.integers(num_cats))
            score = float(np.float32(rng.random()))
            if rng.random() < 0.25:
                score = round(score, 2)
            results.append({"image_id": image_id, "category_id": cat_ids[cat],
                            "bbox": [round(float(v), 2) for v in box], "score": score})
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in cat_ids]
    return {"images": images, "annotations": annotations, "categories": categories}, results


# ----------------------------------------------------------------------------------------------
# Measuring.

def run_process(cmd: Sequence[str]) -> float:
    """Wall time of one command, from spawning it to its exit (it must succeed); its output is discarded."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(list(map(str, cmd)), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr}")
    return seconds


def spread(values: Sequence[float], unit: str = "s", digits: int = 2) -> str:
    """``median (min-max)``."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f}){unit}"


def bench_voc(args, work: Path) -> None:
    from toolkit.evaluation.voc import VOCGroundTruth

    start = time.perf_counter()
    gt, detections = make_problem(args.num_images, VOC_CLASSES, args.seed)
    devkit = write_voc_problem(work / "voc", gt, detections)
    flat = VOCGroundTruth.from_images(gt)
    print(f"\n== VOC: {len(gt)} images, {len(flat.labels)} objects ({int(flat.difficult.sum())} difficult), "
          f"{sum(len(d) for d in detections.values())} detections in 20 files "
          f"({sum(p.stat().st_size for p in (work / 'voc' / 'detections').iterdir()) / 2 ** 20:.1f} MiB); "
          f"written in {time.perf_counter() - start:.1f} s")
    ours_cache, peer_cache = work / "ours-cache", work / "peer-cache"
    ours = [sys.executable, "-m", "toolkit.evaluate", "--voc-root", devkit, "--year", "2007", "--split", "test",
            "--detections", work / "voc" / "detections", "--metric", "voc07", "--cache-dir", ours_cache,
            "--json", work / "ours_voc.json"]
    peer = [sys.executable, Path(__file__).resolve(), "voc-eval-peer", devkit, "2007", "test",
            work / "voc" / "detections", peer_cache, work / "peer_voc.json"]
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for state in ("cold", "warm"):
            for name, cmd, cache in (("ours", ours, ours_cache), ("voc_eval", peer, peer_cache)):
                if state == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                times.setdefault((name, state), []).append(run_process(cmd))
    a = json.loads((work / "ours_voc.json").read_text())
    b = json.loads((work / "peer_voc.json").read_text())
    identical = a["ap"] == b["ap"] and a["mAP"] == b["mAP"]
    print(f"end to end, process start to JSON, {args.rounds} rounds (median (min-max))")
    print(f"  {'caches':<7}{'toolkit.evaluate':>22}{'voc_eval (20 classes)':>26}{'voc_eval / ours':>24}")
    for state in ("cold", "warm"):
        o, p = times[("ours", state)], times[("voc_eval", state)]
        ratios = [y / x for x, y in zip(o, p)]
        print(f"  {state:<7}{spread(o):>22}{spread(p):>26}{spread(ratios, 'x', 1):>24}")
    print(f"  mAP (voc07): ours {a['mAP']:.10f}, voc_eval {b['mAP']:.10f}; "
          f"20 class APs and mAP identical: {'yes' if identical else 'NO'}")
    if not identical:
        diff = {k: (a['ap'].get(k), b['ap'].get(k)) for k in b['ap'] if a['ap'].get(k) != b['ap'][k]}
        raise SystemExit(f"APs differ: {diff}")


def bench_coco(args, work: Path) -> None:
    import importlib.metadata

    from pycocotools.coco import COCO  # noqa: F401  (fail early when it is missing)

    from toolkit.evaluation.cocoeval import evaluate_bbox

    start = time.perf_counter()
    dataset, results = make_coco_problem(args.coco_images, args.seed)
    (work / "instances.json").write_text(json.dumps(dataset))
    (work / "results.json").write_text(json.dumps(results))
    print(f"\n== COCO: {len(dataset['images'])} images, {len(dataset['annotations'])} boxes "
          f"({sum(a['iscrowd'] for a in dataset['annotations'])} crowd), {len(results)} results, 20 categories "
          f"(results JSON {(work / 'results.json').stat().st_size / 2 ** 20:.1f} MiB); pycocotools "
          f"{importlib.metadata.version('pycocotools')}; written in {time.perf_counter() - start:.1f} s")
    ours = [sys.executable, "-m", "toolkit.evaluate", "--coco-annotations", work / "instances.json",
            "--detections", work / "results.json", "--json", work / "ours_coco.json"]
    peer = [sys.executable, Path(__file__).resolve(), "pycocotools-peer", work / "instances.json",
            work / "results.json", work / "peer_coco.json"]
    t_ours, t_peer, t_eval_ours, t_eval_peer = [], [], [], []
    for _ in range(args.rounds):
        t_ours.append(run_process(ours))
        t_peer.append(run_process(peer))
        t_eval_peer.append(json.loads((work / "peer_coco.json").read_text())["evaluate_accumulate_summarize_s"])
        t0 = time.perf_counter()
        in_process = evaluate_bbox(dataset, results)
        t_eval_ours.append(time.perf_counter() - t0)
    a = json.loads((work / "ours_coco.json").read_text())["stats"]
    b = json.loads((work / "peer_coco.json").read_text())["stats"]
    ours_stats = np.array(list(a.values()))
    diff = float(np.max(np.abs(ours_stats - np.array(b))))
    identical = ours_stats.tolist() == b and in_process.stats.tolist() == b
    print(f"{args.rounds} rounds (median (min-max))")
    print(f"  {'':<34}{'ours':>20}{'pycocotools':>22}{'pycocotools / ours':>24}")
    rows = (("end to end, process start to JSON", t_ours, t_peer),
            ("evaluate + accumulate + summarize", t_eval_ours, t_eval_peer))
    for label, o, p in rows:
        ratios = [y / x for x, y in zip(o, p)]
        print(f"  {label:<34}{spread(o):>20}{spread(p):>22}{spread(ratios, 'x', 1):>24}")
    print(f"  AP {ours_stats[0]:.10f} (pycocotools {b[0]:.10f}); 12 stats identical: "
          f"{'yes' if identical else 'NO'} (max |difference| {diff:.1e})")
    if not identical:
        raise SystemExit(f"COCO stats differ: ours {ours_stats.tolist()}, pycocotools {b}")


def bench_matchers(args) -> None:
    from toolkit.evaluation.voc import METRICS, evaluate_voc, match_class_loop

    gt, detections = make_problem(args.num_images, VOC_CLASSES, args.seed)
    print(f"\n== evaluate_voc in one process, vectorised matcher (best of {args.repeat}) vs the per-detection "
          f"loop (best of 1), {len(gt)} images")
    print(f"  {'metric':<8}{'mAP':>9}{'vectorised s':>14}{'loop s':>9}{'speed-up':>10}  identical")
    for metric in METRICS:
        t_fast, fast = best_time(lambda: evaluate_voc(gt, detections, VOC_CLASSES, metric), args.repeat)
        t_loop, loop = best_time(
            lambda: evaluate_voc(gt, detections, VOC_CLASSES, metric, matcher=match_class_loop), 1)
        assert_identical(fast, loop)
        print(f"  {metric:<8}{fast.mAP:>9.6f}{t_fast:>14.3f}{t_loop:>9.3f}{t_loop / t_fast:>9.1f}x  yes "
              f"({len(fast.ap)} class APs, PR curves, TP counts)")


def assert_identical(a, b) -> None:
    """Exact equality of everything two VOC evaluations report (raises AssertionError)."""
    assert a.metric == b.metric and a.ap == b.ap and a.mAP == b.mAP, (a.ap, b.ap)
    assert a.per_class.keys() == b.per_class.keys()
    for name in a.per_class:
        ra, rb = a.per_class[name], b.per_class[name]
        assert (ra.ap == rb.ap) or (np.isnan(ra.ap) and np.isnan(rb.ap)), name
        assert (ra.num_gt, ra.num_detections, ra.num_tp) == (rb.num_gt, rb.num_detections, rb.num_tp), name
        assert np.array_equal(ra.precision, rb.precision) and np.array_equal(ra.recall, rb.recall), name


def best_time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Minimum wall time of ``repeat`` calls and the last call's result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "bench_eval.py",
        description="toolkit.evaluate end to end against voc_eval.py's algorithm and pycocotools (same numbers).",
        add_help=add_help,
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (all)")
    parser.add_argument("--num-images", type=int, default=5000, help="VOC images (default 5000)")
    parser.add_argument("--coco-images", type=int, default=5000, help="COCO images (default 5000)")
    parser.add_argument("--rounds", type=int, default=3, help="end-to-end rounds, tools alternated (default 3)")
    parser.add_argument("--repeat", type=int, default=3, help="matchers: timed runs of the vectorised one (3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where to write the problems (default: a temporary folder)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["voc-eval-peer"]:
        return voc_eval_peer(argv[1:])
    if argv[:1] == ["pycocotools-peer"]:
        return pycocotools_peer(argv[1:])
    args = get_args_parser().parse_args(argv)
    if min(args.num_images, args.coco_images, args.rounds, args.repeat) < 1:
        print("error: --num-images, --coco-images, --rounds and --repeat must be >= 1", file=sys.stderr)
        return 2
    import importlib.metadata

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchutil import OtherLoad, cpu_name  # also puts the repo root on sys.path if needed

    other_load = OtherLoad()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores; python {platform.python_version()}, "
          f"numpy {np.__version__}, torch {importlib.metadata.version('torch')} (imported by neither side)")
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "voc" in args.parts:
            bench_voc(args, work)
        if "coco" in args.parts:
            bench_coco(args, work)
    if "matchers" in args.parts:
        bench_matchers(args)
    busy = other_load.cores()
    if busy is not None:
        note = "" if busy < 0.5 else "  <- a core was busy elsewhere: the times above may be inflated"
        print(f"\nother processes used {busy:.2f} of {os.cpu_count()} cores during the run{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
