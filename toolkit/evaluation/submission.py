"""VOC submission files and conversions between the toolkit's detections and the evaluator's.

A VOC submission is one text file per class, ``comp4_det_<split>_<class>.txt``,
with one detection per line::

    <image_id> <score> <xmin> <ymin> <xmax> <ymax>

in VOC's 1-based inclusive pixel coordinates (see :mod:`toolkit.data.voc`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from toolkit.data.voc import VOCDetection, xyxy_to_voc
from toolkit.evaluation.voc import ClassDetections, ImageGT


class SubmissionFormatError(ValueError):
    """A submission file has a malformed line; the message names file and line."""


def submission_path(directory: str | os.PathLike, split: str, class_name: str, prefix: str = "comp4") -> Path:
    return Path(directory) / f"{prefix}_det_{split}_{class_name}.txt"


def read_voc_submission_file(path: str | os.PathLike) -> ClassDetections:
    """Parse one ``comp4_det_<split>_<class>.txt`` file.

    Raises:
        SubmissionFormatError: naming the file and line of a malformed entry.
    """
    path = Path(path)
    ids, scores, boxes = [], [], []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                raise SubmissionFormatError(
                    f"{path}:{lineno}: expected 'image_id score xmin ymin xmax ymax', got {line.strip()!r}"
                )
            try:
                values = [float(v) for v in fields[1:]]
            except ValueError:
                raise SubmissionFormatError(f"{path}:{lineno}: non-numeric field in {line.strip()!r}") from None
            if not np.all(np.isfinite(values)):
                raise SubmissionFormatError(f"{path}:{lineno}: non-finite value in {line.strip()!r}")
            ids.append(fields[0])
            scores.append(values[0])
            boxes.append(values[1:])
    return ClassDetections(np.array(ids, dtype=object), np.array(scores), np.array(boxes).reshape(-1, 4))


def read_voc_submission(
    directory: str | os.PathLike, split: str, classes: Sequence[str], prefix: str = "comp4"
) -> dict[str, ClassDetections]:
    """Read every class's file from ``directory``; a missing file means no detections
    for that class (with a warning naming it)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"detections folder not found: {directory}")
    out = {}
    missing = []
    for name in classes:
        path = submission_path(directory, split, name, prefix)
        if path.is_file():
            out[name] = read_voc_submission_file(path)
        else:
            missing.append(path.name)
    if len(missing) == len(classes):
        raise FileNotFoundError(
            f"no detection files {prefix}_det_{split}_<class>.txt in {directory} "
            f"(looked for e.g. {missing[0]})"
        )
    if missing:
        warnings.warn(f"{directory}: no detections for {len(missing)} class(es): {', '.join(missing)}", stacklevel=2)
    return out


def write_voc_submission(
    directory: str | os.PathLike,
    split: str,
    detections: Mapping[str, ClassDetections],
    prefix: str = "comp4",
) -> list[Path]:
    """Write one file per class (scores with 9 significant digits, coordinates with 3 decimals).

    Each file is written to a temporary name and renamed, so a killed run leaves
    no truncated file behind.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, dets in detections.items():
        path = submission_path(directory, split, name, prefix)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            for image_id, score, box in zip(dets.image_ids, dets.scores, dets.boxes_voc):
                f.write(f"{image_id} {score:.9g} {box[0]:.3f} {box[1]:.3f} {box[2]:.3f} {box[3]:.3f}\n")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def ground_truth_from_voc(dataset: VOCDetection) -> dict[str, ImageGT]:
    """Image id → :class:`ImageGT` (VOC coordinates) for every image of a VOC dataset.

    Reads the XML files only (no image decoding). The dataset must keep difficult
    objects, since the evaluator needs them to ignore their detections.
    """
    if not dataset.keep_difficult:
        raise ValueError("evaluation needs difficult objects: build the dataset with keep_difficult=True")
    gt = {}
    for i in range(len(dataset)):
        t = dataset.get_annotation(i)
        gt[t["image_id"]] = ImageGT(xyxy_to_voc(t["boxes"]), t["labels"].numpy(), t["difficult"].numpy())
    return gt


def detections_from_predictions(
    predictions: Iterable[dict], classes: Sequence[str]
) -> dict[str, ClassDetections]:
    """Group per-image predictions by class for the evaluator.

    Args:
        predictions: dicts with ``image_id`` (str), ``boxes`` ``(K, 4)`` continuous
            xyxy pixels of the original image, ``scores`` ``(K,)`` and ``labels``
            ``(K,)`` (1-based, ``classes[label - 1]``); tensors or arrays.
    """
    per_class: dict[int, list] = {label: [[], [], []] for label in range(1, len(classes) + 1)}
    for p in predictions:
        boxes = xyxy_to_voc(p["boxes"])
        scores = p["scores"].detach().cpu().numpy() if isinstance(p["scores"], torch.Tensor) else np.asarray(p["scores"])
        labels = p["labels"].detach().cpu().numpy() if isinstance(p["labels"], torch.Tensor) else np.asarray(p["labels"])
        for label in np.unique(labels):
            if int(label) not in per_class:
                raise ValueError(f"image {p['image_id']}: label {int(label)} outside 1..{len(classes)}")
            m = labels == label
            entry = per_class[int(label)]
            entry[0].extend([p["image_id"]] * int(m.sum()))
            entry[1].append(scores[m])
            entry[2].append(boxes[m])
    out = {}
    for label, (ids, scores, boxes) in per_class.items():
        out[classes[label - 1]] = ClassDetections(
            np.array(ids, dtype=object),
            np.concatenate(scores) if scores else np.empty(0),
            np.concatenate(boxes) if boxes else np.empty((0, 4)),
        )
    return out
