"""COCO box AP (pycocotools' numbers, computed on arrays), plus the toolkit's per-class table and plots.

Results files are COCO's: a JSON list of ``{"image_id": int, "category_id":
int, "bbox": [x, y, w, h], "score": float}`` with ``bbox`` in absolute pixels
(continuous, so ``[x0, y0, x1 - x0, y1 - y0]`` of the toolkit's xyxy boxes).

The evaluation is :func:`toolkit.evaluation.cocoeval.evaluate_bbox`: ``COCOeval``'s
bbox algorithm on whole arrays, with the same 12 statistics (the tests compare them
with pycocotools to 1e-12). Neither pycocotools nor torch is imported here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import numpy as np

from toolkit.data.errors import AnnotationError, DatasetNotFoundError
from toolkit.evaluation.cocoeval import IOU_THRESHOLDS, MAX_DETS, RECALL_THRESHOLDS, evaluate_bbox
from toolkit.evaluation.submission import to_numpy

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
        return {"metric": "coco", "mAP": self.mAP, "ap": dict(self.ap), "ap50": dict(self.ap50),
                "stats": dict(self.stats)}


def predictions_to_coco(predictions: Iterable[dict], label_to_cat_id: Mapping[int, int]) -> list[dict]:
    """Per-image predictions (``image_id`` int, ``boxes`` (K, 4) xyxy pixels, ``scores``,
    ``labels`` 1-based) → COCO results entries."""
    out = []
    for p in predictions:
        boxes, scores, labels = to_numpy(p["boxes"]), to_numpy(p["scores"]), to_numpy(p["labels"])
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


def load_coco_annotations(path: str | os.PathLike) -> dict:
    """The content of a COCO instances JSON (``images``, ``annotations``, ``categories``).

    Raises:
        DatasetNotFoundError: no such file (naming it and the expected layout).
        AnnotationError: not JSON, or not a COCO instances file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"COCO annotation file not found: {path}; expected <root>/annotations/instances_<split>.json "
            "and images under <root>/<split>/. See data/README.md for how to obtain and place COCO."
        )
    try:
        with open(path) as f:
            dataset = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: not a COCO annotation file ({type(exc).__name__}: {exc})") from None
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list) \
            or not isinstance(dataset.get("categories"), list):
        raise AnnotationError(f"{path}: not a COCO annotation file (no 'images' and 'categories' lists)")
    return dataset


def evaluate_coco(coco_gt, results: Union[str, os.PathLike, Sequence[dict]]) -> COCOEvalResult:
    """COCO box AP (``COCOeval``'s bbox evaluation) and per-class AP.

    Args:
        coco_gt: the path of an annotation file, its loaded content (a dict), or a
            ``pycocotools.coco.COCO`` (its ``dataset`` is read).
        results: a results list or the path of a results JSON.
    Returns:
        :class:`COCOEvalResult`; per-class AP averages ``precision`` over IoU
        0.50:0.95, all recall points, area "all", 100 detections, ignoring the
        ``-1`` entries as COCOeval's own summary does.
    Raises:
        ValueError: a result names an image that is not in the annotations, or lacks a field.
    """
    if isinstance(coco_gt, (str, os.PathLike)):
        dataset = load_coco_annotations(coco_gt)
    else:
        dataset = coco_gt if isinstance(coco_gt, dict) else coco_gt.dataset
    if isinstance(results, (str, os.PathLike)):
        with open(results) as f:
            results = json.load(f)
        if not isinstance(results, list):
            raise ValueError("a COCO results file holds a JSON list of detections")
    ev = evaluate_bbox(dataset, results)
    stats = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
    names = {cat["id"]: cat["name"] for cat in dataset["categories"]}
    area_all, max_dets = 0, len(MAX_DETS) - 1
    iou50 = int(np.argmin(np.abs(IOU_THRESHOLDS - 0.5)))
    ap, ap50, curves = {}, {}, {}
    for k, cat_id in enumerate(ev.cat_ids):
        name = names[cat_id]
        p = ev.precision[:, :, k, area_all, max_dets]
        valid = p > -1
        if not valid.any():
            continue  # no ground truth for this category
        ap[name] = float(p[valid].mean())
        p50 = p[iou50]
        ap50[name] = float(p50[p50 > -1].mean()) if (p50 > -1).any() else float("nan")
        curves[name] = (RECALL_THRESHOLDS.copy(), np.clip(p50, 0, None), ap50[name])
    return COCOEvalResult(stats, ap, ap50, ev.summary, curves)
