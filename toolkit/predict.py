"""Run a trained detector on images and draw the detections.

::

    python -m toolkit.predict --checkpoint runs/main/checkpoint.pth img1.jpg img2.jpg --out predictions/
    python -m toolkit.predict --checkpoint dsod300.pth --model dsod300 --labelmap labelmap_voc.prototxt img.jpg --out p/

(the second: a Caffe model converted by ``python -m converters.caffe convert``).

For every image, ``<out>/<stem>.png`` shows the boxes with class and score, and
``<out>/detections.json`` lists ``{"image", "boxes" (xyxy pixels), "scores", "labels", "classes"}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch

from toolkit.data.errors import DatasetError, ImageReadError
from toolkit.data.labelmap import read_labelmap
from toolkit.data.transforms import PREPROCESS_PRESETS, SSDTestTransform
from toolkit.data.voc import VOC_CLASSES, read_image_bgr
from toolkit.engine import load_trained_model, predict, to_image_pixels
from toolkit.evaluation.report import write_json
from toolkit.models.build import INPUTS, default_postprocess


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m toolkit.predict", description="Draw a trained detector's detections.",
                                add_help=add_help)
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a toolkit.train checkpoint, or a Caffe model converted by python -m converters.caffe convert")
    p.add_argument("--model", help="with a converted Caffe checkpoint: the toolkit model it loads into (e.g. dsod300)")
    p.add_argument("--labelmap", type=Path,
                   help="with a converted Caffe checkpoint: Caffe labelmap prototxt of its classes (default: VOC's 20)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--score-threshold", type=float, default=0.3, help="draw detections above this score (default 0.3)")
    return p


def draw_detections(image_bgr: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    classes: Sequence[str]) -> np.ndarray:
    """Boxes ``(K, 4)`` xyxy pixels drawn with ``class score`` captions; returns a copy."""
    out = image_bgr.copy()
    rng = np.random.default_rng(7)
    colours = rng.integers(60, 256, (len(classes), 3))
    for box, score, label in zip(boxes, scores, labels):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        colour = tuple(int(c) for c in colours[int(label)])
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, 2)
        caption = f"{classes[int(label)]} {score:.2f}"
        (tw, th), _ = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        cv2.rectangle(out, (x0, max(0, y0 - th - 4)), (x0 + tw + 2, max(th + 4, y0)), colour, -1)
        cv2.putText(out, caption, (x0 + 1, max(th + 1, y0 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        classes = None
        if args.model:
            if args.model not in INPUTS:
                raise ValueError(f"unknown model {args.model!r}; choose from {sorted(INPUTS)}")
            names = read_labelmap(args.labelmap).foreground if args.labelmap else VOC_CLASSES
            classes = ("background", *names)
        model, classes, name = load_trained_model(args.checkpoint, device, args.model, classes)
    except (FileNotFoundError, ValueError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = INPUTS[name]
    transform = SSDTestTransform(spec.size, PREPROCESS_PRESETS[spec.preprocess])
    params = default_postprocess(len(classes))
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for path in args.images:
        try:
            image = read_image_bgr(path)
        except ImageReadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        tensor, _ = transform(image, empty)
        det = to_image_pixels(predict(model, tensor[None].to(device), params)[0], image.shape[:2])
        keep = det["scores"] >= args.score_threshold
        boxes, scores, labels = (det[k][keep].numpy() for k in ("boxes", "scores", "labels"))
        drawn = draw_detections(image, boxes, scores, labels, classes)
        cv2.imwrite(str(args.out / f"{path.stem}.png"), drawn)
        records.append({"image": str(path), "boxes": boxes.round(2).tolist(), "scores": scores.round(4).tolist(),
                        "labels": labels.tolist(), "classes": [classes[int(i)] for i in labels]})
        print(f"{path}: {len(scores)} detection(s) >= {args.score_threshold}")
    write_json({"checkpoint": str(args.checkpoint), "detections": records}, args.out / "detections.json")
    print(f"wrote {len(records)} image(s) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
