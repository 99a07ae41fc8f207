"""Distilled students against their undistilled runs: AP of every run folder, mean and spread over seeds.

Each group is ``LABEL=RUN[,RUN...]``: run folders of ``toolkit.train`` (the same recipe, one seed each).  Every
checkpoint is evaluated on ``--dataset``'s test split with its preset's test pipeline and post-processing (batch
16, float32): VOC07 and VOC12 AP (``toolkit.evaluation.voc``) and COCO-style AP, AP50 and AP75 (pycocotools'
COCOeval on the same ground truth converted to COCO, difficult objects as crowd regions).  A group prints each
metric's mean over its runs and, with two runs or more, the range; ``--baseline LABEL`` adds each group's
difference to that group's mean and whether it exceeds the spread of both groups' seeds, in VOC07 or in each
metric of ``--compare`` (comma-separated, e.g. ``voc07,coco``).

Run from the repository root, e.g.::

    .venv/bin/python bench/bench_distill.py "nano=runs/i15/gfl_dsod_nano_s0,runs/i15/gfl_dsod_nano_s1" \\
        "LD=runs/i15/ld_nano_s0,runs/i15/ld_nano_s1" --baseline nano
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from bench_nms import coco_ground_truth  # also puts the repo root on sys.path via benchutil
from benchutil import cpu_name

METRICS = ("voc07", "voc12", "coco", "ap50", "ap75")


def evaluate_run(run: Path, dataset_name: str, data_root, cache: dict) -> dict[str, float]:
    """The five metrics of ``run``'s checkpoint (``cache`` keeps the test set and its ground truth per preset)."""
    from pycocotools.cocoeval import COCOeval
    from torch.utils.data import DataLoader

    from toolkit.data import build_dataset
    from toolkit.engine import evaluate_detector, inference_setup, load_trained_model
    from toolkit.evaluation.submission import detections_from_predictions, ground_truth_from_voc
    from toolkit.evaluation.voc import evaluate_voc

    model, classes, name = load_trained_model(run / "checkpoint.pth")
    setup = inference_setup(name, len(classes))
    key = (name, tuple(classes))
    if key not in cache:
        dataset = build_dataset(dataset_name, "test", root=data_root, transform=setup.transform)
        gt = ground_truth_from_voc(dataset)
        cache[key] = (dataset, gt, coco_ground_truth(gt, classes[1:]))
    dataset, gt, coco_gt = cache[key]
    loader = DataLoader(dataset, batch_size=setup.batch_size, shuffle=False, num_workers=0, collate_fn=setup.collate)
    _, predictions = evaluate_detector(model, dataset, loader, setup.params, torch.device("cpu"),
                                       predict_fn=setup.predict_fn)
    dets = detections_from_predictions(predictions, classes[1:])
    values = {m: evaluate_voc(gt, dets, classes[1:], m).mAP for m in ("voc07", "voc12")}
    number = {image_id: i for i, image_id in enumerate(gt, start=1)}
    results = [{"image_id": number[p["image_id"]], "category_id": int(label),
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], "score": float(s)}
               for p in predictions for b, s, label in zip(p["boxes"], p["scores"], p["labels"])]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress prints
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    values.update(coco=float(coco_eval.stats[0]), ap50=float(coco_eval.stats[1]), ap75=float(coco_eval.stats[2]))
    return values


def metric_list(text: str) -> tuple[str, ...]:
    """``"voc07,coco"`` -> ``("voc07", "coco")`` (argparse type of ``--compare``)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in METRICS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {unknown or [text]}; choose from {', '.join(METRICS)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", help="LABEL=RUN[,RUN...]")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--baseline", help="the LABEL the others are compared with")
    parser.add_argument("--compare", type=metric_list, default=("voc07",), metavar="METRIC[,METRIC...]",
                        help=f"the metrics compared with --baseline's, of {', '.join(METRICS)} (default voc07)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write every run's metrics here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    groups: dict[str, list[Path]] = {}
    for group in args.groups:
        label, sep, runs = group.partition("=")
        if not sep or not runs:
            parser.error(f"{group!r}: expected LABEL=RUN[,RUN...]")
        groups[label] = [Path(r) for r in runs.split(",")]
        for run in groups[label]:
            if not (run / "checkpoint.pth").is_file():
                parser.error(f"{run}: no checkpoint.pth")
    if args.baseline is not None and args.baseline not in groups:
        parser.error(f"--baseline {args.baseline!r} is none of the groups {sorted(groups)}")

    cache: dict = {}
    values = {label: [evaluate_run(run, args.dataset, args.data_root, cache) for run in runs]
              for label, runs in groups.items()}
    print(f"{args.dataset} test split, batch 16, float32, {cpu_name()}, torch {torch.__version__}")
    print(f"  {'group':14} {'runs':>4} " + " ".join(f"{m.upper():>19}" for m in METRICS))
    for label, rows in values.items():
        cells = []
        for m in METRICS:
            v = np.array([r[m] for r in rows])
            cells.append(f"{v.mean():.4f}" + (f" ({v.min():.3f}-{v.max():.3f})" if len(v) > 1 else " " * 14))
        print(f"  {label:14} {len(rows):>4} " + " ".join(f"{c:>19}" for c in cells))
    if args.baseline is not None:
        for label, rows in values.items():
            if label == args.baseline:
                continue
            for m in args.compare:
                base = np.array([r[m] for r in values[args.baseline]])
                v = np.array([r[m] for r in rows])
                beyond = v.min() > base.max() or v.max() < base.min()
                print(f"  {label} - {args.baseline}: {m.upper()} {100 * (v.mean() - base.mean()):+.2f} points "
                      f"({'beyond' if beyond else 'within'} the seeds' spread: {v.min():.4f}-{v.max():.4f} vs "
                      f"{base.min():.4f}-{base.max():.4f})")
    if args.json is not None:
        args.json.write_text(json.dumps({label: {str(run): row for run, row in zip(groups[label], rows)}
                                         for label, rows in values.items()}, indent=1))


if __name__ == "__main__":
    main()
