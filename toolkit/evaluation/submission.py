"""VOC submission files and conversions between the toolkit's detections and the evaluator's.

A VOC submission is one text file per class, ``comp4_det_<split>_<class>.txt``,
with one detection per line::

    <image_id> <score> <xmin> <ymin> <xmax> <ymax>

in VOC's 1-based inclusive pixel coordinates (see :mod:`toolkit.data.voc`).
Blank lines are allowed; fields are separated by any ASCII whitespace.

Nothing here imports torch: tensors (in :func:`detections_from_predictions`)
exist only where the caller has imported it.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Optional, Sequence

import numpy as np

from toolkit.data.voc import xyxy_to_voc
from toolkit.evaluation.voc import ClassDetections, ImageGT

if TYPE_CHECKING:
    from toolkit.data.voc import VOCDetection

FIELDS = ("image_id", "score", "xmin", "ymin", "xmax", "ymax")

# The bytes bytes.split() separates fields at (ASCII whitespace).
_SPACE = np.zeros(256, dtype=bool)
_SPACE[list(b" \t\n\r\x0b\x0c")] = True


class SubmissionFormatError(ValueError):
    """A submission file has a malformed line; the message names file and line."""


def submission_path(directory: str | os.PathLike, split: str, class_name: str, prefix: str = "comp4") -> Path:
    return Path(directory) / f"{prefix}_det_{split}_{class_name}.txt"


def to_numpy(x) -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array, without importing torch."""
    torch = sys.modules.get("torch")  # a tensor implies torch is imported
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _fields_per_line(data: bytes) -> np.ndarray:
    """``(L,)`` int64: the number of whitespace-separated fields on each line of ``data``
    (``L = data.count(b"\\n") + 1``, the lines of ``data.split(b"\\n")``)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    space = _SPACE.take(buf)
    # A field starts at a non-space byte that follows a space byte, or at the start of the text.
    starts = np.flatnonzero(space[:-1] & ~space[1:]) + 1
    if len(buf) and not space[0]:
        starts = np.concatenate(([0], starts))
    line_ends = np.append(np.flatnonzero(buf == ord("\n")), len(buf))
    return np.diff(np.searchsorted(starts, line_ends), prepend=0)


def read_voc_submission_file(path: str | os.PathLike) -> ClassDetections:
    """Parse one ``comp4_det_<split>_<class>.txt`` file.

    The file is read and split once; the fields are converted as whole arrays.
    Lines end at ``\\n``, ``\\r\\n`` or ``\\r`` (as text-mode reading has it).

    Raises:
        SubmissionFormatError: naming the file and line of the first malformed entry (a line
            without 6 fields, a non-numeric field, a non-finite value), as a line-by-line
            reader would find it.
    """
    path = Path(path)
    data = path.read_bytes()
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    counts = _fields_per_line(data)
    tokens = data.split()
    bad_count = np.flatnonzero((counts != 0) & (counts != len(FIELDS)))
    # Rows (lines with fields) before the first line of the wrong length are aligned: they are
    # checked and reported first, so that the error named is the first one in the file.
    row_lines = np.flatnonzero(counts[:bad_count[0]] if len(bad_count) else counts)
    del tokens[len(row_lines) * len(FIELDS):]
    ids = tokens[0::len(FIELDS)]
    del tokens[0::len(FIELDS)]
    values, bad_number = _to_float(tokens, len(FIELDS) - 1)
    nonfinite = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if len(nonfinite):
        _format_error(path, data, row_lines[nonfinite[0]], "non-finite value in")
    if bad_number is not None:
        _format_error(path, data, row_lines[bad_number], "non-numeric field in")
    if len(bad_count):
        _format_error(path, data, bad_count[0], "expected 'image_id score xmin ymin xmax ymax', got")
    return ClassDetections(np.array(list(map(bytes.decode, ids)), dtype=object), values[:, 0], values[:, 1:])


def _to_float(tokens: list[bytes], width: int) -> tuple[np.ndarray, Optional[int]]:
    """``(values (rows, width) float64, None)``, or, when a token is not a number, the values of the
    rows before the first such row and that row's index."""
    try:
        return np.array(tokens, dtype=np.float64).reshape(-1, width), None
    except ValueError:
        pass
    for k, token in enumerate(tokens):
        try:
            float(token)
        except ValueError:
            row = k // width
            return np.array(tokens[:row * width], dtype=np.float64).reshape(-1, width), row
    raise AssertionError("unreachable: numpy and float() accept the same numbers")


def _format_error(path: Path, data: bytes, line_index: int, what: str):
    line = data.split(b"\n")[line_index].decode(errors="replace").strip()
    raise SubmissionFormatError(f"{path}:{line_index + 1}: {what} {line!r}")


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


def ground_truth_from_voc(dataset: "VOCDetection") -> dict[str, ImageGT]:
    """Image id → :class:`ImageGT` (VOC coordinates) for every image of a VOC dataset.

    Reads the XML files only (no image decoding). The dataset must keep difficult
    objects, since the evaluator needs them to ignore their detections. Any dataset
    with VOC-style targets works (shapes, LMDB); for a VOC folder,
    :func:`toolkit.evaluation.voc_gt.read_voc_ground_truth` is faster and caches.
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
        scores = to_numpy(p["scores"])
        labels = to_numpy(p["labels"])
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
