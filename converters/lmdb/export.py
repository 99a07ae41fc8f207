"""``to-voc`` and ``to-coco``: an SSD LMDB as a VOC folder or as COCO JSON plus images.

Both read through :class:`toolkit.data.caffe_lmdb.LMDBDetection`, so they see the
same pixel boxes a training run sees (continuous xyxy, ``box_convention``) and
skip corrupt records the same way (listed in the report; an error under
``strict``).  Image files are named after the record key: the image file's stem
for ``convert_annoset`` keys (``00000007_VOC/JPEGImages/2007_000256.jpg`` →
``2007_000256``), the key with ``/`` and other unsafe characters replaced by
``_`` otherwise, with ``_<index>`` appended where two keys would collide.

Images: an encoded JPEG datum is written byte for byte; anything else (raw
pixels, PNG) is encoded as JPEG with ``jpeg_quality`` (lossy).

* **VOC** (``OUT_DIR`` is one ``VOCdevkit/<name>`` folder): ``JPEGImages/<id>.jpg``,
  ``Annotations/<id>.xml`` (1-based integer coordinates where the boxes are
  whole pixels, decimals otherwise; ``<name>`` is the labelmap's ``name``,
  which ``convert_annoset`` matches), ``ImageSets/Main/<split>.txt``, and
  ``<split>_annoset.txt`` (``JPEGImages/<id>.jpg Annotations/<id>.xml`` lines, the
  list ``from-voc OUT_DIR <split>_annoset.txt`` takes).  Read it back with
  ``VOCDetection(OUT_DIR, [(OUT_DIR.name, split)], classes=...)``.
* **COCO**: ``images`` (``id`` 1.., ``file_name``, ``width``, ``height``, and the
  record's ``lmdb_key``), ``annotations`` (``bbox`` ``[x, y, w, h]`` in continuous
  pixels, ``area = w * h``, ``iscrowd`` 0, ``category_id`` = the label, and a
  non-standard ``difficult`` flag that pycocotools ignores), ``categories``
  (labels 1..K with the labelmap's display names).
"""

from __future__ import annotations

import json
import os
import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np

from toolkit.data.caffe_lmdb import LMDBDetection, SkippedRecordsWarning
from toolkit.data.errors import CorruptRecordError, DatasetError
from toolkit.data.voc import VOC_CLASSES, xyxy_to_voc

_ANNOSET_KEY = re.compile(r"\d{8,}_(.+)")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class ExportReport:
    """What an export wrote; ``skipped`` maps a record key to why it was left out."""

    out: Path
    written: int = 0
    boxes: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def image_name(key: str) -> str:
    """The file stem an exported record gets (module docstring), before collisions."""
    m = _ANNOSET_KEY.fullmatch(key)
    stem = Path(m.group(1)).stem if m else key
    return _UNSAFE.sub("_", stem).strip("._") or "record"


def _open(lmdb_dir, labelmap, box_convention: str, strict: bool, report: ExportReport) -> LMDBDetection:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedRecordsWarning)
        dataset = LMDBDetection(lmdb_dir, labelmap=labelmap, strict=strict, box_convention=box_convention)
    for w in caught:
        if not issubclass(w.category, SkippedRecordsWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    report.skipped.update(dataset.skipped)
    return dataset


def _class_names(dataset: LMDBDetection) -> tuple[list[str], list[str]]:
    """(XML names, display names) of labels 0..K."""
    if dataset.labelmap is not None:
        return [i.name for i in dataset.labelmap.items], list(dataset.labelmap.names)
    names = ["background", *VOC_CLASSES]
    return names, names


def _items(dataset: LMDBDetection, strict: bool, report: ExportReport, progress: bool, what: str) -> Iterator:
    """``(name, record, image, target)`` of every usable record, with unique names."""
    from tqdm import tqdm

    used: set[str] = set()
    for index in tqdm(range(len(dataset)), desc=what, unit="rec", disable=not progress):
        try:
            record = dataset.read_record(index)
            image = dataset.image_of(record)
        except CorruptRecordError as exc:
            if strict:
                raise
            key = dataset.image_ids[index]
            report.skipped[key] = str(exc).split(f"record {key!r}: ", 1)[-1]
            continue
        name = image_name(record.key)
        if name in used:
            name = f"{name}_{index}"
        used.add(name)
        yield name, record, image, dataset.target(index, image.shape[:2])


def _jpeg_bytes(record, image: np.ndarray, quality: int) -> bytes:
    datum = record.datum
    if datum.encoded and datum.data.startswith(b"\xff\xd8\xff"):
        return datum.data
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise DatasetError(f"record {record.key!r}: OpenCV could not encode the image as JPEG")
    return buf.tobytes()


def _coordinate(value: float) -> str:
    whole = round(value)
    return str(int(whole)) if abs(value - whole) < 1e-6 else f"{value:.3f}".rstrip("0").rstrip(".")


def voc_xml(name: str, folder: str, hw: tuple[int, int], boxes_xyxy, labels, difficult, class_names) -> str:
    """A VOC annotation file (boxes given in continuous pixel xyxy, written 1-based)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(hw[1])
    ET.SubElement(size, "height").text = str(hw[0])
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for box, label, diff in zip(xyxy_to_voc(boxes_xyxy), labels, difficult):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = class_names[int(label)]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        # Before <bndbox>: convert_annoset applies <difficult> only to boxes that follow it.
        ET.SubElement(obj, "difficult").text = "1" if diff else "0"
        bnd = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bnd, tag).text = _coordinate(float(value))
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


def lmdb_to_voc(
    lmdb_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    labelmap: Optional[str | os.PathLike] = None,
    split: str = "trainval",
    box_convention: str = "voc",
    jpeg_quality: int = 95,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ExportReport:
    """Write the LMDB as a VOC folder (module docstring), atomically.

    Raises:
        CorruptRecordError: under ``strict``, naming the first corrupt record.
        OutputExistsError: ``out_dir`` exists and not ``overwrite``.
    """
    from converters.lmdb.output import atomic_output, check_writable

    out = Path(out_dir)
    if not split or _UNSAFE.search(split):
        raise ValueError(f"split must be a plain name such as 'trainval', got {split!r}")
    check_writable(out, overwrite)
    report = ExportReport(out)
    dataset = _open(lmdb_dir, labelmap, box_convention, strict, report)
    xml_names, _ = _class_names(dataset)
    with atomic_output(out, overwrite=overwrite, directory=True) as tmp:
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (tmp / sub).mkdir(parents=True)
        ids = []
        for name, record, image, target in _items(dataset, strict, report, progress, "to-voc"):
            (tmp / "JPEGImages" / f"{name}.jpg").write_bytes(_jpeg_bytes(record, image, jpeg_quality))
            xml = voc_xml(name, out.name, image.shape[:2], target["boxes"], target["labels"].tolist(),
                          target["difficult"].tolist(), xml_names)
            (tmp / "Annotations" / f"{name}.xml").write_text(xml)
            ids.append(name)
            report.written += 1
            report.boxes += len(target["labels"])
        (tmp / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        (tmp / f"{split}_annoset.txt").write_text(
            "".join(f"JPEGImages/{i}.jpg Annotations/{i}.xml\n" for i in ids)
        )
    return report


def lmdb_to_coco(
    lmdb_dir: str | os.PathLike,
    out_json: str | os.PathLike,
    images_dir: str | os.PathLike,
    *,
    labelmap: Optional[str | os.PathLike] = None,
    box_convention: str = "voc",
    jpeg_quality: int = 95,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ExportReport:
    """Write the LMDB as COCO JSON plus an image folder (module docstring), atomically.

    The image folder is renamed into place first, the JSON last.

    Raises:
        CorruptRecordError: under ``strict``, naming the first corrupt record.
        OutputExistsError: an output exists and not ``overwrite``.
    """
    from converters.lmdb.output import atomic_output, check_writable

    out, images = Path(out_json), Path(images_dir)
    check_writable(out, overwrite)
    check_writable(images, overwrite)
    report = ExportReport(out)
    dataset = _open(lmdb_dir, labelmap, box_convention, strict, report)
    _, display = _class_names(dataset)
    coco: dict = {
        "info": {"description": f"converted from the SSD LMDB {dataset.path}", "version": "1"},
        "licenses": [],
        "images": [],
        "annotations": [],
        "categories": [{"id": label, "name": display[label], "supercategory": "none"}
                       for label in range(1, len(display))],
    }
    with atomic_output(images, overwrite=overwrite, directory=True) as tmp_images:
        for name, record, image, target in _items(dataset, strict, report, progress, "to-coco"):
            (tmp_images / f"{name}.jpg").write_bytes(_jpeg_bytes(record, image, jpeg_quality))
            image_id = len(coco["images"]) + 1
            coco["images"].append({"id": image_id, "file_name": f"{name}.jpg", "width": int(image.shape[1]),
                                   "height": int(image.shape[0]), "lmdb_key": record.key})
            for box, label, diff in zip(target["boxes"].tolist(), target["labels"].tolist(),
                                        target["difficult"].tolist()):
                x0, y0, x1, y1 = box
                w, h = x1 - x0, y1 - y0
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": int(label),
                    "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0, "difficult": bool(diff),
                })
            report.written += 1
            report.boxes += len(target["labels"])
    with atomic_output(out, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(coco) + "\n")
    return report


def format_report(report: ExportReport, what: str) -> list[str]:
    lines = [f"wrote {report.written} image(s) and {report.boxes} box(es) as {what} to {report.out}"]
    if report.skipped:
        lines.append(f"skipped {len(report.skipped)} corrupt record(s):")
        lines.extend(f"  {key!r}: {reason}" for key, reason in report.skipped.items())
    return lines
