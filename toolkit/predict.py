"""Run a trained detector on images and draw the detections.

::

    python -m toolkit.predict --checkpoint runs/main/checkpoint.pth img1.jpg img2.jpg --out predictions/
    python -m toolkit.predict --checkpoint dsod300.pth --model dsod300 --labelmap labelmap_voc.prototxt img.jpg --out p/
    python -m toolkit.predict --checkpoint dsod_tiny.onnx img1.jpg --out predictions/          # onnxruntime
    python -m toolkit.predict --checkpoint runs/main/checkpoint.pth --backend onnxruntime img1.jpg --out p/

(the second: a Caffe model converted by ``python -m converters.caffe convert``; the last two run in onnxruntime:
a ``python -m toolkit.export`` file, or a checkpoint exported for the run, see :mod:`toolkit.onnx_backend`).

For every image, ``<out>/<stem>.png`` shows the boxes with class and score, and
``<out>/detections.json`` lists ``{"image", "boxes" (xyxy pixels), "scores", "labels", "classes"}``.
With ``--save-thumbnails``, a ThumbDet student (``toolkit.train --distill thumbdet``,
or a converted official ThumbDet checkpoint) also writes ``<out>/<stem>_thumbnail.png``:
the image its detector sees, made from the full-size input by its down-sampler.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import cv2
import torch

from toolkit.data.errors import DatasetError, ImageReadError
from toolkit.data.labelmap import read_labelmap
from toolkit.data.voc import VOC_CLASSES, read_image_bgr
from toolkit.engine import (inference_setup, is_converted_checkpoint, model_from_checkpoint, predict_batch,
                            read_checkpoint, to_image_pixels)
from toolkit.evaluation.report import write_json
from toolkit.models.postprocess import NMS_KINDS
from toolkit.models.thumbnail import find_thumbnailer
from toolkit.visualize import draw_detections


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m toolkit.predict", description="Draw a trained detector's detections.",
                                add_help=add_help)
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a toolkit.train checkpoint, a Caffe model converted by python -m converters.caffe convert, "
                        "or an ONNX file written by python -m toolkit.export (run by onnxruntime)")
    p.add_argument("--backend", choices=("pytorch", "onnxruntime"), default="pytorch",
                   help="onnxruntime: run the detector in onnxruntime (a checkpoint is exported for the run; an "
                        ".onnx file always runs there)")
    p.add_argument("--model", help="with a converted Caffe checkpoint: the toolkit model it loads into (default: the "
                                   "one whose Caffe layer names it has: dsod300, ssd300 or grp_dsod320)")
    p.add_argument("--labelmap", type=Path,
                   help="with a converted Caffe checkpoint: Caffe labelmap prototxt of its classes (default: the "
                        "names 'convert --labelmap' stored, else VOC's 20)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--score-threshold", type=float, default=0.3, help="draw detections above this score (default 0.3)")
    p.add_argument("--nms", choices=NMS_KINDS, default="greedy",
                   help="SSD family: greedy (Caffe's DetectionOutput, default) or voting_cluster_diou (LD's "
                        "score-voting cluster DIoU-NMS at IoU 0.6 over all classes)")
    p.add_argument("--save-thumbnails", action="store_true",
                   help="a thumbnail model (ThumbDet): also write <stem>_thumbnail.png, the down-sampled image its "
                        "detector sees")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    onnxruntime = args.backend == "onnxruntime" or args.checkpoint.suffix.lower() == ".onnx"
    try:
        classes = ("background", *read_labelmap(args.labelmap).foreground) if args.labelmap else None
        if onnxruntime:
            from toolkit.onnx_backend import load_onnxruntime_detector, onnx_inference_setup

            device = torch.device("cpu")
            model = load_onnxruntime_detector(args.checkpoint, args.model, classes)
            classes, name = model.classes, model.model_name
            setup = onnx_inference_setup(model, args.nms)
        else:
            ckpt, name = read_checkpoint(args.checkpoint, args.model)
            if classes is None and is_converted_checkpoint(ckpt) and "classes" not in ckpt:
                classes = ("background", *VOC_CLASSES)  # the converted presets are VOC models
            model, classes, name = model_from_checkpoint(ckpt, args.checkpoint, name, classes, device)
            setup = inference_setup(name, len(classes), args.nms)
    except (FileNotFoundError, ValueError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    thumbnailer = None if onnxruntime else find_thumbnailer(model)
    if args.save_thumbnails and onnxruntime:
        print("error: --save-thumbnails needs the PyTorch backend (the ONNX graph gives detections only)",
              file=sys.stderr)
        return 2
    if args.save_thumbnails and thumbnailer is None:
        print(f"error: {args.checkpoint}: --save-thumbnails needs a thumbnail model (toolkit.train --distill "
              "thumbdet); this one sees the full image", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for path in args.images:
        try:
            image = read_image_bgr(path)
        except ImageReadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        inputs, _ = setup.collate([setup.transform(image, empty)])
        det = predict_batch(model, inputs, device, setup.predict_fn, setup.params)[0]
        det = to_image_pixels(det, image.shape[:2])
        keep = det["scores"] >= args.score_threshold
        boxes, scores, labels = (det[k][keep].numpy() for k in ("boxes", "scores", "labels"))
        drawn = draw_detections(image, boxes, scores, labels, classes)
        cv2.imwrite(str(args.out / f"{path.stem}.png"), drawn)
        if args.save_thumbnails:
            images = inputs[0] if isinstance(inputs, (tuple, list)) else inputs  # DETR: (images, mask), unpadded
            with torch.no_grad():
                thumb = thumbnailer(images.to(device))["downsample_input"][0]
            pixels = (thumb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).flip(-1).cpu().numpy()  # RGB -> BGR
            cv2.imwrite(str(args.out / f"{path.stem}_thumbnail.png"), pixels)
        records.append({"image": str(path), "boxes": boxes.round(2).tolist(), "scores": scores.round(4).tolist(),
                        "labels": labels.tolist(), "classes": [classes[int(i)] for i in labels]})
        print(f"{path}: {len(scores)} detection(s) >= {args.score_threshold}")
    write_json({"checkpoint": str(args.checkpoint), "detections": records}, args.out / "detections.json")
    print(f"wrote {len(records)} image(s) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
