"""SSD-Caffe LMDBs (``convert_annoset`` / ``convert_imageset`` output) as a detection dataset.

Records
-------
An LMDB written by SSD's ``convert_annoset`` maps keys (``"%08d_<image path>"``, in
the order of the list file) to serialized ``AnnotatedDatum`` messages
(:mod:`toolkit.caffe.caffe_pb2`); one written by ``convert_imageset`` maps them to
plain ``Datum`` messages (an image and a class label, no boxes).  Both are read:

* ``datum.encoded = true``: ``datum.data`` is an image file (JPEG, PNG, ...);
  SSD's ``convert_annoset`` also fills ``channels`` / ``height`` / ``width``, plain
  Caffe leaves them 0.
* ``datum.encoded = false``: ``datum.data`` is ``channels x height x width`` uint8
  pixels, **channel-planar** (CHW) in **BGR** order (Caffe's ``CVMatToDatum``), of
  any stored size.  ``channels`` 1 (``--gray``) is expanded to 3.
* boxes: ``annotation_group[g].annotation[a].bbox`` is a ``NormalizedBBox``,
  **normalized xyxy** (float32, coordinates divided by the image width / height),
  label ``group_label`` (1..K; 0 is the background), ``difficult`` flag.

Box convention (pixels ↔ normalized)
------------------------------------
``convert_annoset`` reading VOC XML stores ``xmin / W`` with VOC's **1-based**
``xmin`` (``ReadXMLToAnnotatedDatum``), while its COCO-JSON path stores
continuous ``x / W``.  Targets are the toolkit's continuous pixels (see
:mod:`toolkit.data.voc`), so the conversion depends on where the LMDB came from:

* ``box_convention="voc"`` (default: SSD's VOC LMDBs)::

      x0 = xmin * W - 1,  y0 = ymin * H - 1,  x1 = xmax * W,  y1 = ymax * H

  which gives exactly the targets :class:`~toolkit.data.voc.VOCDetection` gives
  for the same XML;
* ``box_convention="continuous"``: ``x0 = xmin * W`` etc.

Caffe itself used the normalized values as they are, so under ``"voc"`` the
``x0`` / ``y0`` that Caffe trained on were 1 pixel right of / below ours.  Pixel
boxes are clipped to the image.

Corrupt records
---------------
A record is corrupt when its value is not an ``AnnotatedDatum`` / ``Datum``, its
image cannot be decoded (raw pixels of the wrong length, bytes OpenCV cannot
decode, an image header disagreeing with the datum's size), a box is not finite,
inverted or outside ``[0, 1]`` by more than :data:`NORMALIZED_BOX_SLACK`, or a
label is outside ``1..K``.  :class:`LMDBDetection` checks every record's protobuf,
boxes and labels when it is built (images only with ``validate_images=True``):
corrupt ones are left out, counted and listed in one warning at the end of the
scan (``dataset.skipped`` maps key → reason), or, with ``strict=True``, raise
:class:`~toolkit.data.errors.CorruptRecordError` naming the key.  An image that
fails to decode later, in ``__getitem__``, is skipped the same way (the next
usable record is returned instead, with a warning from the process that read it,
e.g. a DataLoader worker) or raises under ``strict``.

Workers
-------
The LMDB environment is opened read-only and without a lock file by the process
that reads, one per process (:func:`shared_lmdb`; DataLoader workers are told
apart by pid).  An environment inherited across ``fork`` is closed in the child
as it starts and never used there; pickling (``spawn`` workers) drops it.
Without the lock file nothing may write the LMDB while it is read (Caffe's
training data never changes; read-only media work too).
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import cv2
import numpy as np
import torch
from google.protobuf.message import DecodeError

from toolkit.caffe import caffe_pb2
from toolkit.data.errors import CorruptRecordError, DatasetError, DatasetNotFoundError
from toolkit.data.voc import VOC_CLASSES

__all__ = [
    "BOX_CONVENTIONS", "MAX_IMAGE_PIXELS", "NORMALIZED_BOX_SLACK", "PIXEL_SNAP", "CaffeRecord", "LMDBDetection",
    "SkippedRecordsWarning", "caffe_crop_reencode", "caffe_label_blob", "decode_datum_image", "decode_record",
    "encoded_image_size", "iter_lmdb", "key_text", "lmdb_path", "normalized_to_pixels", "open_lmdb",
    "pixels_to_normalized", "record_arrays", "record_problem", "shared_lmdb",
]

BOX_CONVENTIONS = ("voc", "continuous")
NORMALIZED_BOX_SLACK = 0.01
"""How far outside ``[0, 1]`` a normalized coordinate may lie before the record is corrupt
(1 % of the image: room for VOC's 1-based ``xmax = W + 1`` slips, not for garbage)."""
PIXEL_SNAP = 1e-3
"""Pixel coordinates this close to a whole pixel are snapped to it (:func:`normalized_to_pixels`)."""
MAX_IMAGE_PIXELS = 1 << 26
"""Largest encoded image (pixels, from its header) that is decoded: 64 Mpx.  Guards
against a damaged header making OpenCV allocate gigabytes."""

class SkippedRecordsWarning(UserWarning):
    """Corrupt LMDB records were left out; the message counts them and names their keys."""


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------


def lmdb_path(path: str | os.PathLike) -> Path:
    """The LMDB folder (the one holding ``data.mdb``); ``path`` may name ``data.mdb`` itself.

    Raises:
        DatasetNotFoundError: no such folder, or no ``data.mdb`` in it (a LevelDB is named as such).
    """
    p = Path(path)
    if p.name == "data.mdb" and p.is_file():
        p = p.parent
    if not p.exists():
        raise DatasetNotFoundError(f"LMDB not found: {p}")
    if not (p / "data.mdb").is_file():
        if p.is_dir() and (p / "CURRENT").is_file():
            raise DatasetNotFoundError(f"{p} is a LevelDB (Caffe's other backend); only LMDB is read")
        raise DatasetNotFoundError(f"{p} is not an LMDB folder: it has no data.mdb")
    return p


def open_lmdb(path: str | os.PathLike, *, readahead: bool = False):
    """Open an LMDB read-only without a lock file: a new ``lmdb.Environment``.

    py-lmdb refuses a second environment on the same files in one process; use
    :func:`shared_lmdb` unless the caller closes this one at once.
    ``readahead=False`` suits random access (the OS does not read pages around each
    record).

    Raises:
        DatasetNotFoundError: see :func:`lmdb_path`.
        DatasetError: LMDB cannot open the file (not an LMDB, damaged, or already open).
    """
    import lmdb

    p = lmdb_path(path)
    try:
        return lmdb.open(str(p), readonly=True, lock=False, readahead=readahead, create=False, subdir=True,
                         max_readers=1, max_spare_txns=1)
    except lmdb.Error as exc:
        raise DatasetError(f"{p}: cannot open as an LMDB ({type(exc).__name__}: {exc})") from None


# One environment per LMDB and process, shared by every reader in the process while
# any holds it (py-lmdb forbids two on the same files in one process).
_SHARED: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()


def _close_inherited() -> None:
    """In a forked child: close the parent's environments before anything can use them.

    Each process must open its own; py-lmdb also refuses to open one while the
    inherited object is open.  With no lock file (``MDB_NOLOCK``) closing releases
    only this process's copy of the memory map and file descriptor; the parent's
    handle is untouched.
    """
    for env in list(_SHARED.values()):
        with contextlib.suppress(Exception):
            env.close()
    _SHARED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


def shared_lmdb(path: str | os.PathLike):
    """This process's read-only environment of the LMDB at ``path`` (opened on first use).

    Shared by all callers in the process and closed when the last one drops it;
    after ``fork`` the child gets its own (the inherited one is closed in the child).
    """
    key = os.path.realpath(lmdb_path(path))
    env = _SHARED.get(key)
    if env is None:
        env = open_lmdb(key)
        _SHARED[key] = env
    return env


def iter_lmdb(path: str | os.PathLike) -> Iterator[tuple[bytes, bytes]]:
    """``(key, value)`` of every record in key order (the order Caffe reads them)."""
    import lmdb

    env = shared_lmdb(path)
    try:
        with env.begin() as txn:
            for key, value in txn.cursor():
                yield bytes(key), bytes(value)
    except lmdb.Error as exc:
        raise DatasetError(f"{lmdb_path(path)}: LMDB read failed ({type(exc).__name__}: {exc})") from None


def key_text(key: bytes | str) -> str:
    """A key as text (invalid UTF-8 bytes shown as ``\\xNN``)."""
    return key if isinstance(key, str) else key.decode("utf-8", errors="backslashreplace")


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CaffeRecord:
    """One decoded LMDB record.

    ``anno`` is an ``AnnotatedDatum``; a plain ``Datum`` record comes wrapped in one
    without annotation groups and with ``annotated=False``.
    """

    key: str
    anno: caffe_pb2.AnnotatedDatum
    annotated: bool

    @property
    def datum(self) -> caffe_pb2.Datum:
        return self.anno.datum


def decode_record(key: bytes | str, value: bytes | memoryview) -> CaffeRecord:
    """Parse a record value as an ``AnnotatedDatum`` or, failing that, a plain ``Datum``.

    The two are told apart by what parses: an ``AnnotatedDatum`` has its ``datum``
    (field 1, a message); a ``Datum``'s field 1 is the integer ``channels``, which
    the ``AnnotatedDatum`` parser sets aside as an unknown field.

    Raises:
        CorruptRecordError: the value is neither (naming the key).
    """
    key = key_text(key)
    try:
        anno = caffe_pb2.AnnotatedDatum.FromString(value)
    except DecodeError:
        anno = None
    if anno is not None and anno.HasField("datum"):
        return CaffeRecord(key, anno, True)
    try:
        datum = caffe_pb2.Datum.FromString(value)
    except DecodeError:
        raise CorruptRecordError(
            f"record {key!r}: not a protobuf AnnotatedDatum or Datum ({len(value)} bytes)"
        ) from None
    if not (datum.data or len(datum.float_data)):
        raise CorruptRecordError(f"record {key!r}: neither an AnnotatedDatum nor a Datum with data")
    wrapped = caffe_pb2.AnnotatedDatum()
    wrapped.datum.CopyFrom(datum)
    return CaffeRecord(key, wrapped, False)


def _be16(b: bytes, i: int) -> int:
    return (b[i] << 8) | b[i + 1]


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def encoded_image_size(data: bytes) -> Optional[tuple[int, int]]:
    """``(height, width)`` from a JPEG's SOF or a PNG's IHDR header, without decoding.

    ``None`` for other formats, or when the header cannot be found.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    if data[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(data)
    while pos + 3 < n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        length = _be16(data, pos + 2)
        if marker in _JPEG_SOF:
            if pos + 9 > n:
                return None
            return _be16(data, pos + 5), _be16(data, pos + 7)
        if length < 2:
            return None
        pos += 2 + length
    return None


def _raw_problem(datum: caffe_pb2.Datum) -> Optional[str]:
    c, h, w = datum.channels, datum.height, datum.width
    if len(datum.float_data) and not datum.data:
        return f"a float_data Datum ({len(datum.float_data)} floats) is not an image"
    if c not in (1, 3) or h <= 0 or w <= 0:
        return f"raw datum of shape {c}x{h}x{w} (need 1 or 3 channels and a positive size)"
    if len(datum.data) != c * h * w:
        return f"raw datum {c}x{h}x{w} needs {c * h * w} bytes, holds {len(datum.data)}"
    return None


def _raw_pixels(datum: caffe_pb2.Datum, key: str) -> np.ndarray:
    problem = _raw_problem(datum)
    if problem is not None:
        raise CorruptRecordError(f"record {key!r}: {problem}")
    c, h, w = datum.channels, datum.height, datum.width
    # Caffe's CVMatToDatum stores channel-planar (CHW) BGR.
    chw = np.frombuffer(datum.data, dtype=np.uint8).reshape(c, h, w)
    hwc = np.ascontiguousarray(chw.transpose(1, 2, 0))
    return cv2.cvtColor(hwc, cv2.COLOR_GRAY2BGR) if c == 1 else hwc


def _encoded_problem(datum: caffe_pb2.Datum) -> Optional[str]:
    if not datum.data:
        return "encoded datum without data"
    size = encoded_image_size(datum.data)
    if size is None:
        return None
    h, w = size
    if h * w > MAX_IMAGE_PIXELS:
        return f"image header claims {h}x{w} pixels (more than {MAX_IMAGE_PIXELS})"
    header = (datum.height, datum.width)
    # SSD's convert_annoset records the decoded size (EXIF rotation may swap it); plain Caffe records 0.
    if datum.height > 0 and datum.width > 0 and header not in ((h, w), (w, h)):
        return f"datum says {datum.height}x{datum.width}, its image header says {h}x{w}"
    return None


def decode_datum_image(datum: caffe_pb2.Datum, key: str = "?") -> np.ndarray:
    """The datum's image as ``uint8 (H, W, 3)`` BGR.

    Encoded data is decoded by OpenCV (``IMREAD_COLOR``, as Caffe's
    ``DecodeDatumToCVMat``); raw data is reshaped from planar CHW.

    Raises:
        CorruptRecordError: naming ``key``, when the data is not a decodable image.
    """
    if not datum.encoded:
        return _raw_pixels(datum, key)
    problem = _encoded_problem(datum)
    if problem is not None:
        raise CorruptRecordError(f"record {key!r}: {problem}")
    try:
        image = cv2.imdecode(np.frombuffer(datum.data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise CorruptRecordError(f"record {key!r}: OpenCV cannot decode the image ({exc.err})") from None
    if image is None or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise CorruptRecordError(f"record {key!r}: encoded image ({len(datum.data)} bytes) cannot be decoded")
    return image


def record_arrays(anno: caffe_pb2.AnnotatedDatum) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every annotation, group by group in record order.

    Returns:
        ``boxes_norm`` float32 ``(N, 4)`` normalized xyxy, ``labels`` int64 ``(N,)``
        (the groups' ``group_label``), ``difficult`` bool ``(N,)``, ``instance_ids``
        int64 ``(N,)``.
    """
    boxes, labels, difficult, ids = [], [], [], []
    for group in anno.annotation_group:
        for a in group.annotation:
            b = a.bbox
            boxes.append((b.xmin, b.ymin, b.xmax, b.ymax))
            labels.append(group.group_label)
            difficult.append(b.difficult)
            ids.append(a.instance_id)
    return (
        np.array(boxes, dtype=np.float32).reshape(-1, 4),
        np.array(labels, dtype=np.int64),
        np.array(difficult, dtype=bool),
        np.array(ids, dtype=np.int64),
    )


def record_problem(record: CaffeRecord, num_classes: Optional[int] = None) -> Optional[str]:
    """Why a decoded record is unusable, without decoding its image; ``None`` when it is fine.

    Checks the datum (raw: shape and length; encoded: data present, image header
    consistent) and every box (an annotation without a box, a coordinate not finite,
    ``xmin > xmax`` or ``ymin > ymax``, outside ``[0, 1]`` by more than
    :data:`NORMALIZED_BOX_SLACK`) and label (outside ``1..num_classes``).
    """
    datum = record.datum
    problem = _encoded_problem(datum) if datum.encoded else _raw_problem(datum)
    if problem is not None:
        return problem
    for group in record.anno.annotation_group:
        label = group.group_label
        if num_classes is not None and not 1 <= label <= num_classes:
            return f"label {label} outside the labelmap's 1..{num_classes}"
        for a in group.annotation:
            if not a.HasField("bbox"):
                return f"annotation {a.instance_id} of label {label} has no bbox"
            b = a.bbox
            coords = np.array([b.xmin, b.ymin, b.xmax, b.ymax], dtype=np.float64)
            if not np.isfinite(coords).all():
                return f"label {label} instance {a.instance_id}: box {coords.tolist()} is not finite"
            if coords[0] > coords[2] or coords[1] > coords[3]:
                return f"label {label} instance {a.instance_id}: box {coords.tolist()} is inverted"
            if coords.min() < -NORMALIZED_BOX_SLACK or coords.max() > 1 + NORMALIZED_BOX_SLACK:
                return f"label {label} instance {a.instance_id}: normalized box {coords.tolist()} is out of range"
    return None


# ---------------------------------------------------------------------------
# Box conversions and Caffe's label blob
# ---------------------------------------------------------------------------


def _check_convention(box_convention: str) -> None:
    if box_convention not in BOX_CONVENTIONS:
        raise ValueError(f"box_convention must be one of {BOX_CONVENTIONS}, got {box_convention!r}")


def normalized_to_pixels(boxes_norm, height: int, width: int, box_convention: str = "voc") -> np.ndarray:
    """Normalized xyxy → continuous pixel xyxy (module docstring), clipped to the image.

    Coordinates within :data:`PIXEL_SNAP` of a whole pixel become that pixel, so
    boxes that ``convert_annoset`` normalized from VOC's integers come back as
    exactly those integers (and :func:`pixels_to_normalized` gives back the stored
    float32 values: float64 arithmetic rounded once to float32).

    Args:
        boxes_norm: ``(N, 4)`` float32 as stored in the records.
        height, width: image size in pixels.
        box_convention: ``"voc"`` (``x0 = xmin * W - 1``) or ``"continuous"`` (``x0 = xmin * W``).
    Returns:
        float32 ``(N, 4)``.
    """
    _check_convention(box_convention)
    b = np.asarray(boxes_norm, dtype=np.float32).astype(np.float64).reshape(-1, 4)
    px = b * np.array([width, height, width, height], dtype=np.float64)
    if box_convention == "voc":
        px[:, :2] -= 1.0  # the stored xmin / ymin are VOC's 1-based pixel indices
    # Records made from integer pixel coordinates hold their float32 quotients, whose
    # products with the size miss the integer by rounding (< 1e-4 px below 3,000 px).
    whole = np.rint(px)
    px = np.where(np.abs(px - whole) < PIXEL_SNAP, whole, px) + 0.0  # (+ 0.0: no -0.0)
    px[:, 0::2] = px[:, 0::2].clip(0.0, width)
    px[:, 1::2] = px[:, 1::2].clip(0.0, height)
    return px.astype(np.float32)


def pixels_to_normalized(boxes_xyxy, height: int, width: int, box_convention: str = "voc") -> np.ndarray:
    """Inverse of :func:`normalized_to_pixels` (without the clipping): float32 ``(N, 4)``."""
    _check_convention(box_convention)
    if isinstance(boxes_xyxy, torch.Tensor):
        boxes_xyxy = boxes_xyxy.detach().cpu().numpy()
    px = np.asarray(boxes_xyxy, dtype=np.float32).astype(np.float64).reshape(-1, 4).copy()
    if box_convention == "voc":
        px[:, :2] += 1.0
    return (px / np.array([width, height, width, height], dtype=np.float64)).astype(np.float32)


def _warp_round_trip(norm: np.ndarray, old_w: int, old_h: int, new_w: int, new_h: int) -> np.ndarray:
    """SSD-Caffe ``UpdateBBoxByResizePolicy`` for WARP, in float32 as Caffe computes it."""
    f = np.float32
    out = norm.astype(np.float32).copy()
    for col, old, new in ((0, old_w, new_w), (1, old_h, new_h), (2, old_w, new_w), (3, old_h, new_h)):
        x = (out[:, col] * f(old)).astype(np.float32)  # back to the old pixels
        x = ((x * f(new)).astype(np.float32) / f(old)).astype(np.float32)
        x = np.maximum(f(0), x) if col < 2 else np.minimum(f(new), x)
        out[:, col] = (x / f(new)).astype(np.float32)
    return out


def caffe_label_blob(
    targets: Sequence[dict],
    *,
    box_convention: str = "voc",
    warp_hw: Optional[tuple[int, int]] = None,
) -> np.ndarray:
    """Caffe's ``AnnotatedData`` label blob from dataset targets (before any transform).

    Rows ``[item_id, group_label, instance_id, xmin, ymin, xmax, ymax, difficult]``
    with normalized boxes, item by item, in target order (the records' group order);
    ``instance_id`` counts the boxes of each label within an item from 0, as
    ``convert_annoset`` numbers them.  Like Caffe: boxes are clipped to ``[0, 1]``
    and those left without area dropped (``ProjectBBox``); a batch without any box
    gives one row of ``-1``.  The reverse is
    ``toolkit.models.multibox_loss.targets_from_caffe_labels``.

    Args:
        targets: dicts with ``boxes`` ``(N, 4)`` continuous pixel xyxy of the
            original image, ``labels``, ``difficult`` and ``orig_size`` ``(H, W)``.
        box_convention: how the pixels relate to the stored normalized boxes
            (:func:`pixels_to_normalized`).
        warp_hw: the ``resize_param`` WARP size ``(height, width)`` of the Caffe
            transform, whose float32 round trip through pixels Caffe applies to the
            normalized boxes (``UpdateBBoxByResizePolicy``); ``None`` for none.
    Returns:
        float32 ``(1, 1, R, 8)``.
    """
    rows = []
    for item, t in enumerate(targets):
        h, w = (int(v) for v in t["orig_size"])
        labels = np.asarray(t["labels"], dtype=np.int64).reshape(-1)
        difficult = np.asarray(t.get("difficult", np.zeros(len(labels), dtype=bool)), dtype=bool).reshape(-1)
        norm = pixels_to_normalized(t["boxes"], h, w, box_convention)
        if warp_hw is not None:
            norm = _warp_round_trip(norm, w, h, int(warp_hw[1]), int(warp_hw[0]))
        norm = norm.clip(0.0, 1.0)  # ClipBBox inside ProjectBBox
        seen: dict[int, int] = {}
        for box, label, diff in zip(norm, labels, difficult):
            instance = seen.get(int(label), 0)
            seen[int(label)] = instance + 1
            if box[2] <= box[0] or box[3] <= box[1]:
                continue  # ProjectBBox keeps only boxes with positive size
            rows.append([item, label, instance, *box.tolist(), float(diff)])
    if not rows:
        return np.full((1, 1, 1, 8), -1.0, dtype=np.float32)
    return np.asarray(rows, dtype=np.float32).reshape(1, 1, -1, 8)


def caffe_crop_reencode(image_bgr: np.ndarray) -> np.ndarray:
    """Re-encode as JPEG (OpenCV's default quality, 95) and decode: what SSD-Caffe did to
    every encoded image whenever a ``batch_sampler`` is configured.

    ``AnnotatedDataLayer`` passes each sample through ``DataTransformer::CropImage``,
    which for an encoded datum decodes, crops (the whole image for the default
    ``batch_sampler {}``) and stores the crop with ``EncodeCVMatToDatum(crop,
    "jpg")`` before the transform decodes it again.  Every SSD and DSOD train *and*
    test prototxt has a ``batch_sampler``, so this JPEG generation loss is part of
    the pixels Caffe's nets saw (up to ~30 grey levels on VOC images).
    """
    ok, buf = cv2.imencode(".jpg", image_bgr)
    if not ok:
        raise DatasetError("cv2.imencode failed to re-encode an image as JPEG")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


# ---------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    key: bytes
    height: int  # datum header; 0 when an encoded datum does not record it
    width: int
    boxes_norm: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


class LMDBDetection(torch.utils.data.Dataset):
    """Detection dataset over an SSD-Caffe LMDB (``AnnotatedDatum`` or plain ``Datum`` records).

    Items are ``(image, target)`` as for :class:`~toolkit.data.voc.VOCDetection`:
    ``image`` ``uint8 (H, W, 3)`` BGR, ``target`` ``{"boxes": float32 (N, 4)
    continuous pixel xyxy, "labels": int64 (N,), "difficult": bool (N,),
    "image_id": str (the record key), "orig_size": int64 (2,) (H, W)}``, then
    ``transform(image, target)`` when given.  Plain ``Datum`` records have no boxes.
    Records are in key order; ``len`` counts the usable ones.

    Args:
        path: the LMDB folder (or its ``data.mdb``).
        labelmap: a Caffe labelmap prototxt; its display names of labels 1..K are
            the classes.  Default: the 20 VOC classes (SSD's ``labelmap_voc``).
        transform: optional ``transform(image_bgr, target) -> (image, target)``.
        keep_difficult: keep boxes flagged difficult.
        strict: raise :class:`~toolkit.data.errors.CorruptRecordError` on the first
            corrupt record instead of skipping it (module docstring).
        box_convention: ``"voc"`` or ``"continuous"`` (module docstring).
        validate_images: also decode every image while scanning (slow; finds every
            undecodable image up front).
        caffe_reencode: pass encoded images through :func:`caffe_crop_reencode`, as
            SSD-Caffe's data layer did with a ``batch_sampler``.
        progress: show a progress bar while scanning (default: on a terminal, for
            LMDBs of more than 2,000 records).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        labelmap: Optional[str | os.PathLike] = None,
        transform: Optional[Callable] = None,
        keep_difficult: bool = True,
        strict: bool = False,
        box_convention: str = "voc",
        validate_images: bool = False,
        caffe_reencode: bool = False,
        progress: Optional[bool] = None,
    ) -> None:
        _check_convention(box_convention)
        self.path = lmdb_path(path)
        self.labelmap = None
        if labelmap is not None:
            from toolkit.data.labelmap import read_labelmap

            self.labelmap = read_labelmap(labelmap)
            foreground = self.labelmap.foreground
        else:
            foreground = VOC_CLASSES
        self.classes: tuple[str, ...] = ("background", *foreground)
        self.transform = transform
        self.keep_difficult = keep_difficult
        self.strict = strict
        self.box_convention = box_convention
        self.caffe_reencode = caffe_reencode
        self.skipped: dict[str, str] = {}
        self._entries: list[_Entry] = []
        self._bad: set[int] = set()
        self._sizes: dict[int, tuple[int, int]] = {}
        self._env = None
        self._env_pid: Optional[int] = None
        self.total_records = self._scan(validate_images, progress)
        if not self._entries:
            raise DatasetError(
                f"{self.path}: no usable record among {self.total_records}"
                + (f" ({len(self.skipped)} corrupt, first: {next(iter(self.skipped.items()))})" if self.skipped else "")
            )

    # -- scanning -------------------------------------------------------------
    def _scan(self, validate_images: bool, progress: Optional[bool]) -> int:
        import lmdb

        env = self._environment()
        try:
            total = env.stat()["entries"]
            if progress is None:
                progress = total > 2000 and _stderr_is_tty()
            from tqdm import tqdm

            with env.begin() as txn, tqdm(total=total, desc=f"scan {self.path.name}", unit="rec",
                                          disable=not progress) as bar:
                for key, value in txn.cursor():
                    self._scan_one(bytes(key), value, validate_images)
                    bar.update(1)
        except lmdb.Error as exc:
            raise DatasetError(f"{self.path}: LMDB read failed ({type(exc).__name__}: {exc})") from None
        if self.skipped:
            shown = list(self.skipped.items())[:20]
            listing = "; ".join(f"{k!r}: {reason}" for k, reason in shown)
            hidden = len(self.skipped) - len(shown)
            more = f"; ... and {hidden} more (dataset.skipped)" if hidden else ""
            warnings.warn(
                f"{self.path}: skipped {len(self.skipped)} corrupt record(s) of {total}: {listing}{more}",
                SkippedRecordsWarning, stacklevel=3,
            )
        return total

    def _scan_one(self, key: bytes, value: bytes, validate_images: bool) -> None:
        name = key_text(key)
        try:
            record = decode_record(key, value)
            problem = record_problem(record, len(self.classes) - 1)
            if problem is None and validate_images:
                decode_datum_image(record.datum, name)
        except CorruptRecordError as exc:
            problem = str(exc).removeprefix(f"record {name!r}: ")
        if problem is not None:
            if self.strict:
                raise CorruptRecordError(f"{self.path}: record {name!r}: {problem}")
            self.skipped[name] = problem
            return
        boxes, labels, difficult, _ = record_arrays(record.anno)
        datum = record.datum
        self._entries.append(_Entry(key, max(datum.height, 0), max(datum.width, 0), boxes, labels, difficult))

    # -- environment per process ------------------------------------------------
    def _environment(self):
        # Opened by the process that reads: after a fork (DataLoader workers) the
        # inherited handle was closed in the child and a fresh one is opened here.
        pid = os.getpid()
        if self._env is None or self._env_pid != pid:
            self._env = shared_lmdb(self.path)
            self._env_pid = pid
        return self._env

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_env"] = None
        state["_env_pid"] = None
        return state

    # -- access -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    @property
    def image_ids(self) -> list[str]:
        return [key_text(e.key) for e in self._entries]

    def read_record(self, index: int) -> CaffeRecord:
        """The decoded record of item ``index`` (read from the LMDB now)."""
        import lmdb

        entry = self._entries[index]
        try:
            with self._environment().begin() as txn:
                value = txn.get(entry.key)
        except lmdb.Error as exc:
            raise DatasetError(f"{self.path}: LMDB read failed ({type(exc).__name__}: {exc})") from None
        if value is None:
            raise CorruptRecordError(f"{self.path}: record {key_text(entry.key)!r} is no longer in the LMDB")
        try:
            return decode_record(entry.key, value)
        except CorruptRecordError as exc:
            raise CorruptRecordError(f"{self.path}: {exc}") from None

    def read_image(self, index: int) -> np.ndarray:
        """The decoded ``uint8 (H, W, 3)`` BGR image of item ``index``.

        Raises:
            CorruptRecordError: naming the LMDB and key, when it cannot be decoded.
        """
        return self.image_of(self.read_record(index))

    def image_of(self, record: CaffeRecord) -> np.ndarray:
        """A record's decoded image (``caffe_reencode`` applied), as :meth:`read_image`."""
        try:
            image = decode_datum_image(record.datum, record.key)
        except CorruptRecordError as exc:
            raise CorruptRecordError(f"{self.path}: {exc}") from None
        if self.caffe_reencode and record.datum.encoded:
            image = caffe_crop_reencode(image)
        return image

    def target(self, index: int, image_hw: tuple[int, int]) -> dict:
        """The target of item ``index`` for an image of ``(height, width)`` (class docstring)."""
        e = self._entries[index]
        keep = np.ones(len(e.labels), dtype=bool) if self.keep_difficult else ~e.difficult
        h, w = int(image_hw[0]), int(image_hw[1])
        boxes = normalized_to_pixels(e.boxes_norm[keep], h, w, self.box_convention)
        return {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(e.labels[keep].copy()),
            "difficult": torch.from_numpy(e.difficult[keep].copy()),
            "image_id": key_text(e.key),
            "orig_size": torch.tensor((h, w), dtype=torch.int64),
        }

    def get_annotation(self, index: int) -> dict:
        """The target of item ``index`` without decoding the image (for evaluation).

        ``orig_size`` is the datum's recorded size; an encoded datum that records none
        (plain Caffe) is decoded once per process to learn it.
        """
        e = self._entries[index]
        hw = (e.height, e.width)
        if not (e.height > 0 and e.width > 0):
            if index not in self._sizes:
                self._sizes[index] = self.read_image(index).shape[:2]
            hw = self._sizes[index]
        return self.target(index, hw)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        index %= len(self)
        image = None
        for step in range(len(self)):
            i = (index + step) % len(self)
            if i in self._bad:
                continue
            try:
                image = self.read_image(i)
                break
            except CorruptRecordError as exc:
                if self.strict:
                    raise
                self._bad.add(i)
                name = key_text(self._entries[i].key)
                self.skipped[name] = str(exc).split(f"record {name!r}: ", 1)[-1]
                warnings.warn(f"{exc}; skipped (returning the next usable record)", SkippedRecordsWarning,
                              stacklevel=2)
        if image is None:
            raise DatasetError(f"{self.path}: no record has a decodable image")
        target = self.target(i, image.shape[:2])
        if self.transform is not None:
            return self.transform(image, target)
        return image, target

    def __repr__(self) -> str:
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        return f"LMDBDetection({self.path}, {len(self)} records{skipped}, {len(self.classes) - 1} classes)"


def _stderr_is_tty() -> bool:
    import sys

    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
