"""Evaluate detections: VOC submission files (VOC07 / VOC12 AP) or COCO results (COCO AP).

VOC::

    python -m toolkit.evaluate --voc-root data/VOCdevkit --year 2007 --split test \\
        --detections results/ --metric voc07 --json map.json [--plot pr.png]

reads ``<detections>/comp4_det_<split>_<class>.txt`` (``image_id score xmin ymin
xmax ymax``, 1-based pixels) and the ground truth of
``<voc-root>/VOC<year>/ImageSets/Main/<split>.txt``; ``--json`` writes
``{"metric": ..., "mAP": float, "ap": {class: float}}`` (fractions; classes with
no non-difficult ground truth are left out of ``ap`` and of the mean).

COCO::

    python -m toolkit.evaluate --coco-annotations instances_val2017.json \\
        --detections results.json --json coco.json [--plot pr.png]

A trained checkpoint on a dataset's test split (VOC07 AP by default)::

    python -m toolkit.evaluate --checkpoint runs/main/checkpoint.pth --dataset shapes --json map.json

A Caffe model converted by ``python -m converters.caffe convert`` (``--model`` names
the toolkit model its blobs load into, through that model's rename table)::

    python -m toolkit.evaluate --checkpoint dsod300.pth --model dsod300 --dataset voc07test

In onnxruntime: an ONNX file written by ``python -m toolkit.export``, or a checkpoint exported for the run
(:mod:`toolkit.onnx_backend`)::

    python -m toolkit.evaluate --checkpoint dsod_tiny.onnx --dataset shapes
    python -m toolkit.evaluate --checkpoint runs/main/checkpoint.pth --dataset shapes --backend onnxruntime

All print a per-class table; ``--plot`` writes precision-recall curves (PNG).

The VOC and COCO paths import neither torch nor matplotlib (matplotlib only
with ``--plot``); ``--checkpoint`` imports torch. The VOC path keeps the parsed
ground truth of a split in a cache folder (``--cache-dir``, default
``$XDG_CACHE_HOME/legacy-det`` or ``~/.cache/legacy-det``; ``--no-cache`` to
parse every XML file), reused while no annotation file's size or modification
time has changed (see :mod:`toolkit.evaluation.voc_gt`).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from toolkit.data.errors import DatasetError
from toolkit.data.labelmap import read_labelmap
from toolkit.data.voc import VOC_CLASSES
from toolkit.evaluation.report import format_table, plot_pr_curves, write_json
from toolkit.evaluation.submission import SubmissionFormatError, read_voc_submission
from toolkit.evaluation.voc import METRICS, evaluate_voc
from toolkit.evaluation.voc_gt import default_cache_dir, read_voc_ground_truth


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "python -m toolkit.evaluate",
        description="VOC07/VOC12 AP of VOC submission files, or COCO AP of a COCO results JSON.",
        add_help=add_help,
    )
    p.add_argument("--voc-root", type=Path, help="VOCdevkit folder (or its parent, or VOC<year> itself)")
    p.add_argument("--year", default="2007", help="VOC year: 2007 or 2012 (the VOC<year> folder); default 2007")
    p.add_argument("--subdir", help="VOCdevkit sub-folder to read instead of VOC<year> (e.g. SHAPES)")
    p.add_argument("--split", default="test", help="ImageSets/Main list name, e.g. test or val; default test")
    p.add_argument("--detections", type=Path,
                   help="VOC: folder of comp4_det_<split>_<class>.txt files; COCO: results JSON")
    p.add_argument("--checkpoint", type=Path,
                   help="a toolkit.train checkpoint to evaluate on --dataset (or a converted one, or an ONNX file "
                        "written by python -m toolkit.export)")
    p.add_argument("--backend", choices=("pytorch", "onnxruntime"), default="pytorch",
                   help="with --checkpoint: run the detector in PyTorch or in onnxruntime (a checkpoint is exported "
                        "for the run; an .onnx file always runs in onnxruntime)")
    p.add_argument("--dataset", help="dataset name for --checkpoint (its test split)")
    p.add_argument("--model", help="with a --checkpoint converted from Caffe (python -m converters.caffe convert): "
                                   "the toolkit model it loads into (default: the one whose Caffe layer names it "
                                   "has: dsod300, ssd300 or grp_dsod320)")
    p.add_argument("--data-root", type=Path, help="data root for --dataset (default $TOOLKIT_DATA or ./data)")
    p.add_argument("--write-detections", type=Path,
                   help="with --checkpoint: also write VOC submission files into this folder")
    p.add_argument("--metric", choices=METRICS, default="voc07", help="VOC metric (default voc07)")
    p.add_argument("--iou", type=float, default=0.5, help="VOC IoU threshold (default 0.5)")
    p.add_argument("--labelmap", type=Path,
                   help="Caffe labelmap prototxt for the class names (default: the 20 VOC classes)")
    p.add_argument("--prefix", default="comp4", help="submission file prefix (default comp4)")
    p.add_argument("--coco-annotations", type=Path, help="COCO instances JSON: evaluate --detections as COCO results")
    p.add_argument("--cache-dir", type=Path,
                   help="VOC: folder for the parsed ground truth, reused while no XML file changes "
                        "(default $XDG_CACHE_HOME/legacy-det, else ~/.cache/legacy-det)")
    p.add_argument("--no-cache", action="store_true", help="VOC: parse every XML file, read and write no cache")
    # toolkit.models.postprocess.NMS_KINDS, spelled out: parsing the arguments needs no torch here.
    p.add_argument("--nms", choices=("greedy", "voting_cluster_diou"), default="greedy",
                   help="with --checkpoint, SSD family: greedy (Caffe's DetectionOutput, default) or "
                        "voting_cluster_diou (LD's score-voting cluster DIoU-NMS at IoU 0.6 over all classes)")
    p.add_argument("--json", type=Path, help="write the result as JSON here")
    p.add_argument("--plot", type=Path, help="write precision-recall curves (PNG) here")
    return p


def _run_voc(args) -> dict:
    if args.voc_root is None:
        raise SystemExit("error: --voc-root is required for VOC evaluation (or pass --coco-annotations)")
    classes = read_labelmap(args.labelmap).foreground if args.labelmap else VOC_CLASSES
    subdir = args.subdir or f"VOC{args.year}"
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gt = read_voc_ground_truth(args.voc_root, subdir, args.split, classes, cache_dir=cache_dir)
        detections = read_voc_submission(args.detections, args.split, classes, prefix=args.prefix)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    result = evaluate_voc(gt, detections, classes, args.metric, args.iou)
    extra = {
        name: {"#gt": result.per_class[name].num_gt, "#det": result.per_class[name].num_detections,
               "#tp": result.per_class[name].num_tp}
        for name in result.ap
    }
    title = (f"{subdir} {args.split}: {len(gt)} images, metric {args.metric}, IoU > {args.iou}"
             f" ({len(classes) - len(result.ap)} class(es) without non-difficult ground truth left out)")
    print(format_table(result.ap, result.mAP, title, extra))
    if args.plot:
        curves = {n: (r.recall, r.precision, r.ap) for n, r in result.per_class.items() if n in result.ap}
        plot_pr_curves(curves, args.plot, f"{subdir} {args.split}, {args.metric}: mAP {100 * result.mAP:.2f}")
    return result.to_json()


def _run_checkpoint(args) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from toolkit.data import build_dataset
    from toolkit.engine import (evaluate_detector, inference_setup, is_converted_checkpoint, is_detr_checkpoint,
                                model_from_checkpoint, read_checkpoint, relabel)
    from toolkit.evaluation.classes import match_classes
    from toolkit.evaluation.submission import detections_from_predictions, write_voc_submission

    if not args.dataset:
        raise SystemExit("error: --checkpoint needs --dataset")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.backend == "onnxruntime" or args.checkpoint.suffix.lower() == ".onnx":
        from toolkit.onnx_backend import load_onnxruntime_detector, onnx_inference_setup

        device = torch.device("cpu")
        model = load_onnxruntime_detector(args.checkpoint, args.model)
        dataset = build_dataset(args.dataset, "test", root=args.data_root)
        classes, name = model.classes, model.model_name
        setup = onnx_inference_setup(model, args.nms)
        # Trained on the dataset (its names), or a converted model whose classes are matched by name.
        by_name = model.family != "ssd" or args.checkpoint.suffix.lower() == ".onnx"
        name = f"{name} (onnxruntime)"
    else:
        ckpt, name = read_checkpoint(args.checkpoint, args.model)
        dataset = build_dataset(args.dataset, "test", root=args.data_root)
        # A converted Caffe model without stored names takes the dataset's (its own, when stored, must match).
        use_dataset_classes = is_converted_checkpoint(ckpt) and "classes" not in ckpt
        model, classes, name = model_from_checkpoint(ckpt, args.checkpoint, name,
                                                     dataset.classes if use_dataset_classes else None, device)
        setup = inference_setup(name, len(classes), args.nms)
        by_name = is_detr_checkpoint(ckpt) or is_converted_checkpoint(ckpt)
    dataset.transform = setup.transform  # every dataset class applies self.transform in __getitem__
    predict_fn = setup.predict_fn
    if tuple(dataset.classes) != classes:
        if not by_name:
            raise ValueError(f"{args.checkpoint}: trained on classes {classes[1:]}, dataset {args.dataset!r} has "
                             f"{tuple(dataset.classes[1:])}")
        # A converted model (e.g. a COCO-trained DETR's 91 ids): its classes matched to the dataset's by name.
        mapping, extra = match_classes(classes, 0, dataset.classes, str(args.checkpoint), args.dataset)
        if extra:
            print(f"note: {len(extra)} model classes the dataset lacks are left out: {extra[:10]}"
                  + (" ..." if len(extra) > 10 else ""))
        predict_fn = relabel(predict_fn, setup.params, mapping)
        classes = tuple(dataset.classes)
    loader = DataLoader(dataset, batch_size=setup.batch_size, shuffle=False, num_workers=2, collate_fn=setup.collate)
    result, predictions = evaluate_detector(model, dataset, loader, setup.params, device, args.metric, progress=True,
                                            predict_fn=predict_fn)
    if args.write_detections and not hasattr(dataset, "coco"):
        write_voc_submission(args.write_detections, args.split,
                             detections_from_predictions(predictions, classes[1:]), args.prefix)
    title = f"{name} on {args.dataset} (test split, {len(dataset)} images), metric {args.metric}"
    print(format_table(result.ap, result.mAP, title))
    if args.plot:
        from toolkit.engine import pr_curves

        plot_pr_curves(pr_curves(result), args.plot, f"{name} on {args.dataset}: mAP {100 * result.mAP:.2f}")
    return result.to_json()


def _run_coco(args) -> dict:
    from toolkit.evaluation.coco import evaluate_coco

    result = evaluate_coco(args.coco_annotations, args.detections)
    print(result.summary.rstrip())
    print(format_table(result.ap, result.mAP, f"COCO AP@[.50:.95] per class ({args.coco_annotations.name})"))
    if args.plot:
        plot_pr_curves(result.pr_curves, args.plot, f"COCO, IoU 0.5 (AP50 {100 * result.stats['AP50']:.2f})")
    return result.to_json()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.checkpoint:
            out = _run_checkpoint(args)
        elif args.detections is None:
            raise SystemExit("error: give --detections (VOC folder or COCO results) or --checkpoint")
        elif args.nms != "greedy":
            raise ValueError("--nms applies to --checkpoint: --detections are already post-processed")
        elif args.backend != "pytorch":
            raise ValueError("--backend applies to --checkpoint: --detections are already computed")
        else:
            out = _run_coco(args) if args.coco_annotations else _run_voc(args)
    except (DatasetError, SubmissionFormatError, FileNotFoundError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2
    if args.json:
        write_json(out, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
