"""Where the demo's models come from: every kind of file the toolkit loads, as :class:`apps.compare.LoadedModel`.

- ``checkpoint``: a ``toolkit.train`` checkpoint (a ThumbDet student included), a ``converters.caffe convert``
  checkpoint of a net that maps onto a native preset (DSOD300, SSD300, GRP-DSOD320), or a
  ``converters.detr convert`` checkpoint;
- ``caffe``: ``NET.prototxt,WEIGHTS.caffemodel``, converted in memory (a temporary file) as
  ``python -m converters.caffe convert`` would;
- ``detr``: an official Deformable DETR, Sparse DETR or ThumbDet checkpoint, converted in memory as
  ``python -m converters.detr convert`` would.

Each loader raises the loader's own error (the file, layer or key at fault); :func:`load_source` passes it on
for the UI to show.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from apps.compare import LoadedModel
from toolkit.data.labelmap import read_labelmap
from toolkit.data.voc import VOC_CLASSES
from toolkit.engine import detr_default_classes, is_converted_checkpoint, model_from_checkpoint, read_checkpoint

SOURCE_KINDS = ("checkpoint", "caffe", "detr")


def _classes_from(labelmap: Optional[str]) -> Optional[tuple[str, ...]]:
    return None if labelmap is None else ("background", *read_labelmap(labelmap).foreground)


def load_checkpoint_file(path: str, labelmap: Optional[str] = None) -> LoadedModel:
    """A ``toolkit.train``, ``converters.caffe convert`` or ``converters.detr convert`` checkpoint.  A converted
    Caffe net without stored class names takes ``labelmap``'s, else VOC's (the converted presets are VOC
    models), as ``toolkit.predict`` does."""
    ckpt, name = read_checkpoint(path)
    classes = _classes_from(labelmap)
    if classes is None and is_converted_checkpoint(ckpt) and "classes" not in ckpt:
        classes = ("background", *VOC_CLASSES)
    model, classes, name = model_from_checkpoint(ckpt, path, name, classes)
    return LoadedModel(model, name, tuple(classes), str(path))


def load_caffe(spec: str, labelmap: Optional[str] = None) -> LoadedModel:
    """``NET.prototxt,WEIGHTS.caffemodel`` -> the native preset its layers map onto, with Caffe's weights."""
    from converters.caffe import cli
    from converters.caffe.detect import convert_metadata

    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--caffe takes NET.prototxt,WEIGHTS.caffemodel, got {spec!r}")
    net, weights = parts
    extra, _ = convert_metadata(cli.read_definition(net), net, labelmap=labelmap)
    with tempfile.TemporaryDirectory(prefix="legacy-det-demo-") as tmp:
        out = Path(tmp) / "converted.pth"
        cli.convert(net, weights, out, extra=extra)
        loaded = load_checkpoint_file(str(out), labelmap)
    loaded.source = f"{net} + {weights}"
    return loaded


def load_official_detr(path: str) -> LoadedModel:
    """An official Deformable DETR / Sparse DETR / ThumbDet checkpoint (``{"model", "args"}``)."""
    from converters.detr.checkpoint import model_from_checkpoint as detr_from_checkpoint

    model, cfg, _ = detr_from_checkpoint(path)
    return LoadedModel(model, f"{cfg.family}_detr", detr_default_classes(cfg.num_classes), str(path))


def load_source(kind: str, spec: str, labelmap: Optional[str] = None) -> LoadedModel:
    """One model of ``kind`` (see :data:`SOURCE_KINDS`)."""
    if kind == "checkpoint":
        return load_checkpoint_file(spec, labelmap)
    if kind == "caffe":
        return load_caffe(spec, labelmap)
    if kind == "detr":
        return load_official_detr(spec)
    raise ValueError(f"unknown model source {kind!r}; choose from {SOURCE_KINDS}")
