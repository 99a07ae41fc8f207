"""``from-voc``: write an SSD LMDB exactly as SSD-Caffe's ``convert_annoset`` does.

With ``--anno_type=detection --label_type=xml`` (SSD's ``create_data.sh``),
``convert_annoset ROOT/ LIST DB`` writes one ``AnnotatedDatum`` per list line.
What we reproduce, record for record (checked against records real
``convert_annoset`` wrote, in ``tests/converters/test_lmdb_cli.py``):

* **List**: whitespace-separated pairs ``image_path xml_path`` relative to
  ``ROOT``, optionally shuffled.  **Key**: ``"%08d_%s" % (line index, image_path)``;
  a line whose image cannot be read is skipped and its index is not reused.
* **Datum** (label ``-1``): with ``encoded`` and no resize, when the file's
  extension matches the encode type (``jpg`` also matches ``.jpeg``), the file's
  own bytes, with ``channels`` / ``height`` / ``width`` of the decoded image.
  Otherwise the image decoded by OpenCV (``IMREAD_COLOR``, BGR), resized with
  ``cv2.resize`` (``INTER_LINEAR``) to ``resize_width x resize_height`` when both
  are set, then either re-encoded with ``cv2.imencode`` (OpenCV's default JPEG
  quality 95 / PNG settings) or stored raw: **channel-planar (CHW) BGR uint8**
  (``CVMatToDatum``).
* **Boxes** (``ReadXMLToAnnotatedDatum``): the XML's ``<size>`` (the decoded
  image's when missing or unreadable) normalizes the **1-based** VOC integers:
  ``xmin / width`` etc., in float32, never clipped.  Coordinates are read as
  integers; a missing or non-integer coordinate (``"273.5"``) becomes 0, as
  boost's ``ptree::get(path, 0)`` makes it.  ``difficult`` is the text ``"1"``
  exactly, and applies to boxes that follow it within the object.  Groups are
  created in order of the first object of each label; ``instance_id`` counts
  0, 1, ... within a group.  A missing XML file gives a record without boxes.
  A class name not in the labelmap's ``name`` fields is an error (Caffe aborts).
* ``type`` is ``BBOX``.

Not reproduced: ``convert_annoset``'s own shuffle (Caffe's RNG; ``seed`` drives
ours), ``--gray``, ``--min_dim`` / ``--max_dim``, ``--check_size``, LevelDB, and
the quirk that ``--encoded`` with an empty ``--encode_type`` re-encodes every
image (``encode_type`` defaults to ``jpg`` here, the flags ``create_data.sh`` passes).
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from toolkit.caffe import caffe_pb2
from toolkit.data.errors import AnnotationError, DatasetNotFoundError, ImageReadError
from toolkit.data.labelmap import LabelMap, read_labelmap
from toolkit.data.voc import read_xml_root

ENCODE_TYPES = ("jpg", "png")
COMMIT_EVERY = 1000  # records per LMDB transaction, as convert_annoset commits
_INT32 = (-(2**31), 2**31 - 1)


@dataclass(frozen=True)
class AnnosetOptions:
    """``convert_annoset`` flags that change the records.

    ``encoded`` with ``encode_type`` (``"jpg"`` or ``"png"``) stores image files;
    ``encoded=False`` stores raw pixels.  ``resize_height`` / ``resize_width``: both
    0 (keep the size) or both positive.  ``shuffle`` permutes the list with a
    generator seeded by ``seed`` before the keys are numbered.
    """

    encoded: bool = True
    encode_type: str = "jpg"
    resize_height: int = 0
    resize_width: int = 0
    shuffle: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.encoded and self.encode_type not in ENCODE_TYPES:
            raise ValueError(f"encode_type must be one of {ENCODE_TYPES}, got {self.encode_type!r}")
        if self.resize_height < 0 or self.resize_width < 0 or (self.resize_height > 0) != (self.resize_width > 0):
            raise ValueError(
                f"resize needs both height and width (or neither), got {self.resize_height}x{self.resize_width}"
            )


@dataclass
class ConversionReport:
    """What :func:`convert_annoset` did; ``skipped`` maps an image path to why it was left out."""

    out: Path
    written: int = 0
    boxes: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    without_xml: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# List, labelmap, XML
# ---------------------------------------------------------------------------


def read_annoset_list(list_file: str | os.PathLike) -> list[tuple[str, str]]:
    """``(image_path, xml_path)`` pairs: the file's whitespace-separated tokens, two by two.

    Raises:
        DatasetNotFoundError: the file is missing.
        AnnotationError: an odd number of tokens (naming the last one).
    """
    path = Path(list_file)
    try:
        tokens = path.read_text().split()
    except FileNotFoundError:
        raise DatasetNotFoundError(f"list file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot read the list ({exc})") from None
    if len(tokens) % 2:
        raise AnnotationError(f"{path}: odd number of entries; {tokens[-1]!r} has no XML path beside it")
    return list(zip(tokens[0::2], tokens[1::2]))


def name_to_label(labelmap: LabelMap) -> dict[str, int]:
    """``name`` → label, as ``MapNameToLabel`` (``--check_label``: names must be unique).

    Raises:
        AnnotationError: a duplicated name.
    """
    out: dict[str, int] = {}
    for item in labelmap.items:
        if item.name in out:
            raise AnnotationError(f"{labelmap.path}: name {item.name!r} appears twice")
        out[item.name] = item.label
    return out


_PTREE_INT = re.compile(r"\s*([+-]?\d+)\s*")


def ptree_int(text: Optional[str]) -> Optional[int]:
    """An integer as boost ``ptree``'s stream translator reads it, or ``None`` where it fails.

    Surrounding whitespace is allowed; decimals, trailing characters and values
    outside int32 fail.
    """
    m = _PTREE_INT.fullmatch(text or "")
    if m is None:
        return None
    value = int(m.group(1))
    return value if _INT32[0] <= value <= _INT32[1] else None


def _child_text(elem: ET.Element, tag: str) -> Optional[str]:
    child = elem.find(tag)
    return None if child is None else (child.text or "")


def xml_annotation_groups(
    xml_path: str | os.PathLike, image_hw: tuple[int, int], labels: dict[str, int]
) -> list[caffe_pb2.AnnotationGroup]:
    """``ReadXMLToAnnotatedDatum``: the annotation groups of one VOC XML (module docstring).

    Args:
        xml_path: the annotation file.
        image_hw: the decoded image's ``(height, width)``, used where the XML has no size.
        labels: :func:`name_to_label` of the labelmap.
    Raises:
        AnnotationError: naming the file: malformed XML, no ``<annotation>`` root, zero
            size, a class name not in the labelmap, a box before its object's name.
    """
    path = Path(xml_path)
    root = read_xml_root(path)
    if root.tag != "annotation":
        raise AnnotationError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    size = root.find("size")
    height = ptree_int(_child_text(size, "height")) if size is not None else None
    width = ptree_int(_child_text(size, "width")) if size is not None else None
    if height is None or width is None:
        # Caffe reads both in one try block: either failing falls back to the image.
        height, width = image_hw
    if width == 0 or height == 0:
        raise AnnotationError(f"{path}: no valid image width/height ({width}x{height})")
    f32 = np.float32
    groups: list[caffe_pb2.AnnotationGroup] = []
    for obj in root:
        if obj.tag != "object":
            continue
        annotation: Optional[caffe_pb2.Annotation] = None
        difficult = False
        for child in obj:
            if child.tag == "name":
                name = child.text or ""
                if name not in labels:
                    raise AnnotationError(f"{path}: unknown class name {name!r} (not a 'name' of the labelmap)")
                label = labels[name]
                group = next((g for g in groups if g.group_label == label), None)
                if group is None:
                    group = caffe_pb2.AnnotationGroup(group_label=label)
                    groups.append(group)
                    instance_id = 0
                else:
                    instance_id = group.annotation[-1].instance_id + 1 if len(group.annotation) else 0
                annotation = group.annotation.add()
                annotation.instance_id = instance_id
            elif child.tag == "difficult":
                difficult = child.text == "1"
            elif child.tag == "bndbox":
                if annotation is None:
                    raise AnnotationError(f"{path}: an object's <bndbox> comes before its <name>")
                coords = [ptree_int(_child_text(child, tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]
                xmin, ymin, xmax, ymax = (0 if v is None else v for v in coords)
                bbox = annotation.bbox
                # static_cast<float>(xmin) / width: float32 division.
                bbox.xmin = float(f32(xmin) / f32(width))
                bbox.ymin = float(f32(ymin) / f32(height))
                bbox.xmax = float(f32(xmax) / f32(width))
                bbox.ymax = float(f32(ymax) / f32(height))
                bbox.difficult = difficult
    return groups


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def _extension_matches(filename: str, encode_type: str) -> bool:
    ext = filename.rsplit(".", 1)[-1].lower()
    return ext == encode_type.lower() or (encode_type.lower() == "jpg" and ext == "jpeg")


def read_image(path: Path) -> np.ndarray:
    """``cv::imread(path, IMREAD_COLOR)``: ``uint8 (H, W, 3)`` BGR.

    Raises:
        ImageReadError: naming the file.
    """
    if not path.is_file():  # checked first: OpenCV would also print a warning
        raise ImageReadError(f"{path}: cannot read image (no such file)")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageReadError(f"{path}: cannot read image (not a decodable image)")
    return image


def image_datum(path: Path, rel: str, image: np.ndarray, options: AnnosetOptions) -> caffe_pb2.Datum:
    """``ReadImageToDatum`` with label -1 for an already decoded image (module docstring)."""
    datum = caffe_pb2.Datum()
    resize = options.resize_height > 0 and options.resize_width > 0
    if resize:
        image = cv2.resize(image, (options.resize_width, options.resize_height), interpolation=cv2.INTER_LINEAR)
    datum.channels, datum.height, datum.width = image.shape[2], image.shape[0], image.shape[1]
    if options.encoded and not resize and _extension_matches(rel, options.encode_type):
        try:
            datum.data = path.read_bytes()
        except OSError as exc:
            raise ImageReadError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    elif options.encoded:
        ok, buf = cv2.imencode("." + options.encode_type, image)
        if not ok:
            raise ImageReadError(f"{path}: OpenCV could not encode the image as {options.encode_type}")
        datum.data = buf.tobytes()
    else:
        datum.data = np.ascontiguousarray(image.transpose(2, 0, 1)).tobytes()
    datum.encoded = options.encoded
    datum.label = -1
    return datum


def annotated_datum(
    root: str | os.PathLike, image_rel: str, xml_rel: str, labels: dict[str, int], options: AnnosetOptions
) -> tuple[caffe_pb2.AnnotatedDatum, bool]:
    """The record ``convert_annoset`` writes for one list line; and whether the XML exists.

    Raises:
        ImageReadError: the image cannot be read (``convert_annoset`` skips the line).
        AnnotationError: see :func:`xml_annotation_groups`.
    """
    image_path = Path(root) / image_rel
    image = read_image(image_path)
    record = caffe_pb2.AnnotatedDatum()
    record.datum.CopyFrom(image_datum(image_path, image_rel, image, options))
    xml_path = Path(root) / xml_rel
    has_xml = xml_path.exists()
    if has_xml:
        record.annotation_group.extend(xml_annotation_groups(xml_path, image.shape[:2], labels))
    record.type = caffe_pb2.AnnotatedDatum.BBOX
    return record, has_xml


def annoset_key(index: int, image_rel: str) -> str:
    """``caffe::format_int(index, 8) + "_" + image_path``."""
    return f"{index:08d}_{image_rel}"


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


class _Writer:
    """Puts records in transactions of :data:`COMMIT_EVERY`, growing the map when it fills."""

    def __init__(self, path: Path, map_size: int = 1 << 28) -> None:
        import lmdb

        self._lmdb = lmdb
        self.env = lmdb.open(str(path), map_size=map_size, subdir=True, meminit=False, max_dbs=0)
        self.pending: list[tuple[bytes, bytes]] = []

    def put(self, key: bytes, value: bytes) -> None:
        self.pending.append((key, value))
        if len(self.pending) >= COMMIT_EVERY:
            self.commit()

    def commit(self) -> None:
        while self.pending:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self.pending:
                        txn.put(key, value)
                self.pending = []
            except self._lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def close(self) -> None:
        self.commit()
        self.env.close()


def convert_annoset(
    root: str | os.PathLike,
    list_file: str | os.PathLike,
    out_lmdb: str | os.PathLike,
    labelmap: str | os.PathLike | LabelMap,
    options: AnnosetOptions = AnnosetOptions(),
    *,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Write ``out_lmdb`` from a VOC-style list, as ``convert_annoset`` would (module docstring).

    The LMDB is written to a temporary folder beside ``out_lmdb`` and renamed at
    the end (:mod:`converters.lmdb.output`).

    Args:
        root: folder the list's paths are relative to.
        list_file: lines ``image_path xml_path``.
        out_lmdb: the LMDB folder to create.
        labelmap: the labelmap prototxt (or a parsed one); XML names match its ``name`` fields.
        strict: fail on an unreadable image instead of skipping it.
        overwrite: replace an existing ``out_lmdb``.
        progress: tqdm progress bar.
    Raises:
        ImageReadError: under ``strict``, an unreadable image.
        AnnotationError: a malformed XML or unknown class (always fatal, as in Caffe).
        OutputExistsError: ``out_lmdb`` exists and not ``overwrite``.
    """
    from tqdm import tqdm

    from converters.lmdb.output import atomic_output, check_writable

    out = Path(out_lmdb)
    check_writable(out, overwrite)
    lm = labelmap if isinstance(labelmap, LabelMap) else read_labelmap(labelmap)
    labels = name_to_label(lm)
    lines = read_annoset_list(list_file)
    if not Path(root).is_dir():
        raise DatasetNotFoundError(f"root folder not found: {root}")
    if options.shuffle:
        order = np.random.default_rng(options.seed).permutation(len(lines))
        lines = [lines[i] for i in order]
    report = ConversionReport(out)
    with atomic_output(out, overwrite=overwrite) as tmp:
        writer = _Writer(tmp)
        try:
            bar = tqdm(lines, desc="from-voc", unit="img", disable=not progress)
            for index, (image_rel, xml_rel) in enumerate(bar):
                try:
                    record, has_xml = annotated_datum(root, image_rel, xml_rel, labels, options)
                except ImageReadError as exc:
                    if strict:
                        raise
                    report.skipped[image_rel] = str(exc)
                    continue
                if not has_xml:
                    report.without_xml.append(xml_rel)
                writer.put(annoset_key(index, image_rel).encode(), record.SerializeToString())
                report.written += 1
                report.boxes += sum(len(g.annotation) for g in record.annotation_group)
        finally:
            writer.close()
    return report


def format_report(report: ConversionReport) -> list[str]:
    lines = [f"wrote {report.written} record(s), {report.boxes} box(es) to {report.out}"]
    if report.without_xml:
        lines.append(f"{len(report.without_xml)} record(s) without an XML file (no boxes): "
                     + ", ".join(report.without_xml[:10]) + (" ..." if len(report.without_xml) > 10 else ""))
    if report.skipped:
        lines.append(f"skipped {len(report.skipped)} image(s) that could not be read:")
        lines.extend(f"  {rel}: {reason}" for rel, reason in report.skipped.items())
    return lines
