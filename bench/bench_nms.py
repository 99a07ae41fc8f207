"""Greedy NMS against LD's score-voting cluster DIoU-NMS on one checkpoint: AP and post-processing time.

The network runs once per test image (``--dataset``'s test split, batch 1, float32); its outputs are kept and
post-processed by both NMS in turn.  SSD-family checkpoints (location offsets, class probabilities, priors):
DetectionOutput's per-class greedy NMS at the preset's threshold (0.45), and ``nms="voting_cluster_diou"`` (all
classes together at IoU 0.6; the same confidence threshold 0.01, per-class ``top_k`` 400 and ``keep_top_k`` 200
around it).  GFL-head checkpoints (``gfl_*``): GFL's post-processing (score threshold 0.05, 1,000 locations per
level, 100 detections) with per-class greedy NMS at IoU 0.6 or the voting NMS at 0.6, LD's test configuration.  Both
lists of detections are scored with VOC07 and VOC12 AP (``toolkit.evaluation.voc``) and with COCO-style AP
(pycocotools' COCOeval on the same ground truth converted to COCO: AP over IoU 0.50:0.95, AP50, AP75).
Post-processing time is per image (decoding, thresholds, NMS, voting), measured image by image with the two
kinds interleaved; reported as the median and the range over the images.

Run from the repository root, e.g.::

    .venv/bin/python bench/bench_nms.py runs/main/checkpoint.pth [--dataset shapes] [--images 500] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchutil import OtherLoad, cpu_name  # also puts the repo root on sys.path if needed

KINDS = ("greedy", "voting_cluster_diou")


def coco_ground_truth(gt: dict, classes) -> "object":
    """``toolkit.evaluation.submission.ground_truth_from_voc``'s images as a pycocotools ``COCO`` (VOC's 1-based
    inclusive corners -> 0-based ``x, y, w, h``; difficult objects as crowd regions, which COCOeval ignores)."""
    from pycocotools.coco import COCO

    images, annotations = [], []
    for number, (image_id, image) in enumerate(gt.items(), start=1):
        images.append({"id": number, "file_name": image_id})
        for box, label, difficult in zip(image.boxes_voc, image.labels, image.difficult):
            x0, y0, x1, y1 = (float(v) for v in box)
            w, h = x1 - x0 + 1, y1 - y0 + 1
            annotations.append({"id": len(annotations) + 1, "image_id": number, "category_id": int(label),
                                "bbox": [x0 - 1, y0 - 1, w, h], "area": w * h, "iscrowd": int(difficult)})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress prints
        coco.createIndex()
    return coco


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a toolkit.train checkpoint of the SSD family or a gfl_* one")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--images", type=int, default=500, help="test images used (default 500)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from toolkit.data import build_dataset
    from toolkit.engine import inference_setup, load_trained_model, to_image_pixels
    from toolkit.evaluation.submission import detections_from_predictions, ground_truth_from_voc
    from toolkit.evaluation.voc import evaluate_voc
    from toolkit.models.build import GFL_MODELS
    from toolkit.models.gfl import GFLPostprocessParams, gfl_postprocess
    from toolkit.models.postprocess import detection_output

    torch.set_num_threads(args.threads)
    model, classes, name = load_trained_model(args.checkpoint)
    setup = inference_setup(name, len(classes))
    dataset = build_dataset(args.dataset, "test", root=args.data_root, transform=setup.transform)
    count = min(args.images, len(dataset))
    gfl = name in GFL_MODELS
    params = {kind: GFLPostprocessParams(nms=kind) if gfl else replace(setup.params, nms=kind) for kind in KINDS}
    predictions = {kind: [] for kind in KINDS}
    times = {kind: [] for kind in KINDS}
    load = OtherLoad()
    with torch.no_grad():
        for index in range(count):
            image, target = dataset[index]
            out = model(image[None])
            probs = None if gfl else torch.softmax(out["conf"].float(), dim=-1)
            for kind in KINDS:
                start = time.perf_counter()
                if gfl:
                    det = gfl_postprocess(out["cls_logits"], out["reg_logits"], out["anchors"], out["strides"],
                                          out["feature_hws"], out["image_hw"], params[kind])[0]
                else:
                    det = detection_output(out["loc"].float(), probs, out["priors"], out["variances"],
                                           params[kind])[0]
                times[kind].append(time.perf_counter() - start)
                det = to_image_pixels(det, target["orig_size"].tolist())
                predictions[kind].append({**det, "image_id": target["image_id"]})
    cores = load.cores()

    full_gt = ground_truth_from_voc(dataset)
    gt = {p["image_id"]: full_gt[p["image_id"]] for p in predictions[KINDS[0]]}
    coco_gt = coco_ground_truth(gt, classes[1:])
    number = {image_id: i for i, image_id in enumerate(gt, start=1)}
    print(f"{name} ({args.checkpoint}) on {count} {args.dataset} test images, batch 1, float32, {cpu_name()}, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"  {'NMS':22} {'VOC07':>6} {'VOC12':>6} {'COCO AP':>8} {'AP50':>6} {'AP75':>6} {'dets/img':>8} "
          f"{'post-processing ms/img: median (range)':>40}")
    from pycocotools.cocoeval import COCOeval

    for kind in KINDS:
        dets = detections_from_predictions(predictions[kind], classes[1:])
        voc = {m: evaluate_voc(gt, dets, classes[1:], m).mAP for m in ("voc07", "voc12")}
        results = [{"image_id": number[p["image_id"]], "category_id": int(label),
                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], "score": float(s)}
                   for p in predictions[kind] for b, s, label in zip(p["boxes"], p["scores"], p["labels"])]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress prints
            coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        ms = np.array(times[kind]) * 1e3
        per_image = len(results) / count
        print(f"  {kind:22} {voc['voc07']:6.4f} {voc['voc12']:6.4f} {coco_eval.stats[0]:8.4f} "
              f"{coco_eval.stats[1]:6.4f} {coco_eval.stats[2]:6.4f} {per_image:8.1f} "
              f"{statistics.median(ms):>22.2f} ({ms.min():.2f}-{ms.max():.2f})")
    ratio = np.array(times["voting_cluster_diou"]) / np.array(times["greedy"])
    print(f"  voting / greedy post-processing time per image: median {np.median(ratio):.2f}x "
          f"(range {ratio.min():.2f}-{ratio.max():.2f}x)")
    if cores is not None:
        print(f"other processes used {cores:.2f} cores during the measurements")


if __name__ == "__main__":
    main()
