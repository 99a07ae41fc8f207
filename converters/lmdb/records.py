"""``inspect``: every record of an SSD-Caffe LMDB as JSON, or a readable summary.

One JSON entry per record, in key order::

    {"key": str, "value_len": int, "value_sha256": hex,
     "type": int (AnnotatedDatum.type; null for a plain Datum record),
     "datum": {"channels", "height", "width", "encoded", "label", "data_len", "data_sha256"},
     "annotation_group": [{"group_label": int,
                           "annotation": [{"instance_id": int,
                                           "bbox": {"xmin", "ymin", "xmax", "ymax", "difficult"}}]}]}

Boxes are the stored normalized xyxy float32 values (as JSON doubles).  A datum
holding ``float_data`` adds ``"float_data_len"``; a box with the optional
``label`` / ``score`` / ``size`` fields set adds them.  A record that is not a
protobuf ``AnnotatedDatum`` / ``Datum`` is left out and reported.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from toolkit.caffe import caffe_pb2
from toolkit.data.caffe_lmdb import CaffeRecord, decode_record, iter_lmdb, key_text, lmdb_path
from toolkit.data.errors import CorruptRecordError
from toolkit.data.labelmap import LabelMap

_BBOX_OPTIONAL = ("label", "score", "size")


def datum_to_json(datum: caffe_pb2.Datum) -> dict:
    out = {
        "channels": datum.channels,
        "height": datum.height,
        "width": datum.width,
        "encoded": datum.encoded,
        "label": datum.label,
        "data_len": len(datum.data),
        "data_sha256": hashlib.sha256(datum.data).hexdigest(),
    }
    if len(datum.float_data):
        out["float_data_len"] = len(datum.float_data)
    return out


def _bbox_to_json(bbox: caffe_pb2.NormalizedBBox) -> dict:
    out = {"xmin": bbox.xmin, "ymin": bbox.ymin, "xmax": bbox.xmax, "ymax": bbox.ymax, "difficult": bbox.difficult}
    out.update({name: getattr(bbox, name) for name in _BBOX_OPTIONAL if bbox.HasField(name)})
    return out


def record_to_json(key: bytes | str, value: bytes) -> dict:
    """One record as the JSON entry described in the module docstring.

    Raises:
        CorruptRecordError: the value is not an ``AnnotatedDatum`` / ``Datum``.
    """
    return _entry(decode_record(key, value), value)


def _entry(record: CaffeRecord, value: bytes) -> dict:
    anno = record.anno
    return {
        "key": record.key,
        "value_len": len(value),
        "value_sha256": hashlib.sha256(value).hexdigest(),
        "type": (anno.type if anno.HasField("type") else 0) if record.annotated else None,
        "datum": datum_to_json(anno.datum),
        "annotation_group": [
            {
                "group_label": group.group_label,
                "annotation": [
                    {"instance_id": a.instance_id, "bbox": _bbox_to_json(a.bbox) if a.HasField("bbox") else None}
                    for a in group.annotation
                ],
            }
            for group in anno.annotation_group
        ],
    }


_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"BM", "BMP"), (b"GIF8", "GIF"))


def data_format(datum: caffe_pb2.Datum) -> str:
    """``"JPEG"``, ``"PNG"``, ... for encoded data (by signature); ``"raw C-channel"`` otherwise."""
    if not datum.encoded:
        return f"raw {datum.channels}-channel" if datum.data else "float_data"
    return next((name for magic, name in _MAGIC if datum.data.startswith(magic)), "unknown encoding")


@dataclass
class InspectResult:
    """What :func:`inspect_lmdb` found: the entries, the data formats and the records it could not decode."""

    entries: list[dict] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    corrupt: dict[str, str] = field(default_factory=dict)  # key -> reason


def inspect_lmdb(path: str | os.PathLike, *, strict: bool = False, progress: bool = False) -> InspectResult:
    """Every record of the LMDB as a JSON entry (module docstring), in key order.

    Raises:
        CorruptRecordError: under ``strict``, naming the first record that does not decode.
    """
    from tqdm import tqdm

    where = lmdb_path(path)
    result = InspectResult()
    for key, value in tqdm(iter_lmdb(where), desc="inspect", unit="rec", disable=not progress):
        name = key_text(key)
        try:
            record = decode_record(key, value)
        except CorruptRecordError as exc:
            if strict:
                raise CorruptRecordError(f"{where}: {exc}") from None
            result.corrupt[name] = str(exc).removeprefix(f"record {name!r}: ")
            continue
        result.entries.append(_entry(record, value))
        result.formats[data_format(record.datum)] += 1
    return result


def write_json(entries: list[dict], out: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write the entries as a JSON list (indent 1), atomically."""
    from converters.lmdb.output import atomic_output

    out = Path(out)
    with atomic_output(out, overwrite=overwrite) as tmp:
        with open(tmp, "w") as f:
            json.dump(entries, f, indent=1)  # the layout of the fixtures' *.records.json
    return out


def summarize(path: str | os.PathLike, result: InspectResult, labelmap: Optional[LabelMap] = None) -> list[str]:
    """Readable lines about an inspected LMDB: counts per class, image sizes, encodings, corrupt keys."""
    names = dict(enumerate(labelmap.names)) if labelmap is not None else {}
    kinds = Counter("AnnotatedDatum" if e["type"] is not None else "Datum" for e in result.entries)
    sizes: Counter = Counter()
    per_class: Counter = Counter()
    per_class_difficult: Counter = Counter()
    images_without_boxes = 0
    for e in result.entries:
        d = e["datum"]
        sizes[(d["width"], d["height"])] += 1
        boxes = 0
        for g in e["annotation_group"]:
            for a in g["annotation"]:
                boxes += 1
                per_class[g["group_label"]] += 1
                if a["bbox"] is not None and a["bbox"]["difficult"]:
                    per_class_difficult[g["group_label"]] += 1
        images_without_boxes += boxes == 0
    total = len(result.entries) + len(result.corrupt)
    lines = [f"{lmdb_path(path)}: {total} record(s)"]
    lines.append("  records: " + ", ".join(f"{n} {k}" for k, n in kinds.most_common()) if kinds else "  records: none")
    lines.append("  data: " + (", ".join(f"{n} {k}" for k, n in result.formats.most_common()) or "none"))
    if sizes:
        widths = [w for w, _ in sizes.elements()]
        heights = [h for _, h in sizes.elements()]
        common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(3))
        lines.append(f"  image size (datum header): width {min(widths)}..{max(widths)}, "
                     f"height {min(heights)}..{max(heights)}; most common {common}")
    lines.append(f"  boxes: {sum(per_class.values())} ({sum(per_class_difficult.values())} difficult); "
                 f"{images_without_boxes} record(s) without boxes")
    if per_class:
        lines.append(f"  {'label':>7}  {'class':<20}{'boxes':>8}{'difficult':>11}")
        for label in sorted(per_class):
            lines.append(f"  {label:>7}  {names.get(label, '?'):<20}{per_class[label]:>8}"
                         f"{per_class_difficult[label]:>11}")
    if result.corrupt:
        lines.append(f"  skipped {len(result.corrupt)} corrupt record(s):")
        lines.extend(f"    {key!r}: {reason}" for key, reason in result.corrupt.items())
    return lines
