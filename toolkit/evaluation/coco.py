"""COCO box AP through pycocotools, plus the toolkit's per-class table and plots.

Results files are COCO's: a JSON list of ``{"image_id": int, "category_id":
int, "bbox": [x, y, w, h], "score": float}`` with ``bbox`` in absolute pixels
(continuous, so ``[x0, y0, x1 - x0, y1 - y0]`` of the toolkit's xyxy boxes).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import numpy as np
import torch

from toolkit.data.coco import load_coco

STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
"""Names of ``COCOeval.stats`` in order."""


@dataclass
class COCOEvalResult:
    """``stats`` are COCOeval's twelve numbers (fractions); ``ap`` / ``ap50`` per class name.

    ``pr_curves`` maps class → ``(recall (101,), precision (101,), AP50)`` at IoU 0.5,
    area "all", 100 detections (COCO's interpolated curve).
    """

    stats: dict[str, float]
    ap: dict[str, float]
    ap50: dict[str, float]
    summary: str = ""
    pr_curves: dict[str, tuple[np.ndarray, np.ndarray, float]] = field(default_factory=dict, repr=False)

    @property
    def mAP(self) -> float:
        return self.stats["AP"]

    def to_json(self) -> dict:
        return {"metric": "coco", "mAP": self.mAP, "ap": dict(self.ap), "ap50": dict(self.ap50), "stats": dict(self.stats)}


def predictions_to_coco(predictions: Iterable[dict], label_to_cat_id: Mapping[int, int]) -> list[dict]:
    """Per-image predictions (``image_id`` int, ``boxes`` (K, 4) xyxy pixels, ``scores``,
    ``labels`` 1-based) → COCO results entries."""
    out = []
    for p in predictions:
        boxes = p["boxes"].detach().cpu().numpy() if isinstance(p["boxes"], torch.Tensor) else np.asarray(p["boxes"])
        scores = p["scores"].detach().cpu().numpy() if isinstance(p["scores"], torch.Tensor) else np.asarray(p["scores"])
        labels = p["labels"].detach().cpu().numpy() if isinstance(p["labels"], torch.Tensor) else np.asarray(p["labels"])
        for box, score, label in zip(boxes.reshape(-1, 4).astype(np.float64), scores, labels):
            x0, y0, x1, y1 = box.tolist()
            out.append(
                {
                    "image_id": int(p["image_id"]),
                    "category_id": int(label_to_cat_id[int(label)]),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(score),
                }
            )
    return out


def write_coco_results(results: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write a COCO results JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(list(results), f)
    os.replace(tmp, path)
    return path


def evaluate_coco(coco_gt, results: Union[str, os.PathLike, Sequence[dict]]) -> COCOEvalResult:
    """Run ``COCOeval`` (bbox) and gather per-class AP.

    Args:
        coco_gt: a ``pycocotools.coco.COCO`` or the path of an annotation file.
        results: a results list or the path of a results JSON.
    Returns:
        :class:`COCOEvalResult`; per-class AP averages ``precision`` over IoU
        0.50:0.95, all recall points, area "all", 100 detections, ignoring the
        ``-1`` entries as COCOeval's own summary does.
    """
    from pycocotools.cocoeval import COCOeval

    if not hasattr(coco_gt, "loadRes"):
        coco_gt = load_coco(coco_gt)
    if isinstance(results, (str, os.PathLike)):
        with open(results) as f:
            results = json.load(f)
    results = list(results)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:
            coco_dt = coco_gt.loadRes(np.zeros((0, 7)))  # pycocotools rejects an empty list
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
    precision = ev.eval["precision"]  # (T IoUs, R recalls, K classes, A areas, M maxDets)
    area_all = ev.params.areaRngLbl.index("all")
    max_dets = len(ev.params.maxDets) - 1
    iou50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    ap, ap50, curves = {}, {}, {}
    for k, cat_id in enumerate(ev.params.catIds):
        name = coco_gt.cats[cat_id]["name"]
        p = precision[:, :, k, area_all, max_dets]
        valid = p > -1
        if not valid.any():
            continue  # no ground truth for this category
        ap[name] = float(p[valid].mean())
        p50 = p[iou50]
        ap50[name] = float(p50[p50 > -1].mean()) if (p50 > -1).any() else float("nan")
        curves[name] = (np.asarray(ev.params.recThrs), np.clip(p50, 0, None), ap50[name])
    return COCOEvalResult(stats, ap, ap50, buffer.getvalue(), curves)
