"""Where the demo's models come from: every kind of file the toolkit loads, as :class:`apps.compare.LoadedModel`.

- ``checkpoint``: a ``toolkit.train`` checkpoint (a ThumbDet student included), a ``converters.caffe convert``
  checkpoint, or a ``converters.detr convert`` checkpoint.  A converted Caffe net that maps onto a native preset
  (DSOD300, SSD300, GRP-DSOD320) becomes that model; any other SSD-fork net runs as it is
  (:class:`CaffeNetDetector`, as ``python -m converters.caffe detect`` runs it: at its own input size, with the
  preprocessing and class names ``convert`` stored);
- ``caffe``: ``NET.prototxt,WEIGHTS.caffemodel[,TRAIN.prototxt]``, converted in memory (a temporary file) as
  ``python -m converters.caffe convert --train-prototxt`` would (the train prototxt's data layer gives the
  preprocessing and its labelmap the class names);
- ``detr``: an official Deformable DETR, Sparse DETR or ThumbDet checkpoint, converted in memory as
  ``python -m converters.detr convert`` would;
- ``onnx``: a file ``python -m toolkit.export`` wrote (its metadata says the family, classes, preprocessing and
  post-processing), run by onnxruntime at its export size; its PyTorch side is the same file converted by
  onnx2torch (``python -m converters.onnx import``'s conversion and check), or none when that fails.

Each loader raises the loader's own error (the file, layer or key at fault); :func:`load_source` passes it on
for the UI to show.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from apps.compare import LoadedModel, runtime_detector
from toolkit.data.labelmap import read_labelmap
from toolkit.data.voc import VOC_CLASSES

from toolkit.engine import (InferenceSetup, detr_default_classes, is_converted_checkpoint, model_from_checkpoint,
                            read_checkpoint)

SOURCE_KINDS = ("checkpoint", "caffe", "detr", "onnx")


def _classes_from(labelmap: Optional[str]) -> Optional[tuple[str, ...]]:
    return None if labelmap is None else ("background", *read_labelmap(labelmap).foreground)


class CaffeNetDetector(nn.Module):
    """A converted SSD-fork Caffe net with its DetectionOutput (:class:`converters.caffe.detect.CaffeDetector`) as
    a module: ``forward(images (1, 3, H, W) preprocessed) -> the DetectionOutput top``; the parameters are the
    net's.  :meth:`predict` is the demo's ``predict_fn``."""

    def __init__(self, detector) -> None:
        super().__init__()
        self.detector = detector
        self.net = detector.net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net({self.detector.input_name: images}, blobs=[self.detector.layer.top])[self.detector.layer.top]

    @staticmethod
    def predict(model: "CaffeNetDetector", inputs: torch.Tensor, device) -> list[dict]:
        """Per image: ``boxes`` float32 (K, 4) normalized xyxy, ``scores`` (K,), ``labels`` int64 (K,)."""
        return [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in det.items()}
                for det in model.detector(inputs.to(device))]


def load_caffe_as_is(checkpoint: str, labelmap: Optional[str] = None) -> LoadedModel:
    """Any SSD-fork detection net, from its ``convert`` checkpoint, run as ``python -m converters.caffe detect``
    runs it (the preprocessing and class names ``convert`` stored; ``labelmap`` first)."""
    from converters.caffe.detect import load_detector

    loaded = load_detector(None, checkpoint, labelmap=labelmap, fast=True)
    transform = loaded.preprocessing.transform()
    from toolkit.data.transforms import collate_detection

    setup = InferenceSetup(transform, collate_detection, CaffeNetDetector.predict, None, 1)
    name = f"caffe:{loaded.detector.net.name or 'net'}"
    return LoadedModel(CaffeNetDetector(loaded.detector).eval(), name, tuple(loaded.classes.names), loaded.source,
                       setup=setup, fixed_input=True)


def _converted_of_no_preset(path: str) -> bool:
    """Whether ``path`` is a ``converters.caffe convert`` checkpoint whose layers map onto no native preset."""
    from toolkit.models.build import presets_for_caffe_layers
    from toolkit.models.caffe_import import CONVERTED_BLOBS_KEY

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a checkpoint at all: the caller's error stands
        return False
    if not is_converted_checkpoint(ckpt):
        return False
    return not presets_for_caffe_layers([n for n, blobs in ckpt[CONVERTED_BLOBS_KEY].items() if len(blobs)])


def load_checkpoint_file(path: str, labelmap: Optional[str] = None) -> LoadedModel:
    """A ``toolkit.train``, ``converters.caffe convert`` or ``converters.detr convert`` checkpoint.  A converted
    Caffe net of a native preset without stored class names takes ``labelmap``'s, else VOC's (the converted
    presets are VOC models), as ``toolkit.predict`` does; one of no preset runs as it is."""
    try:
        ckpt, name = read_checkpoint(path)
    except ValueError:
        # read_checkpoint refuses a converted net of no native preset; the demo runs it as it is.
        if _converted_of_no_preset(path):
            return load_caffe_as_is(path, labelmap)
        raise
    classes = _classes_from(labelmap)
    if classes is None and is_converted_checkpoint(ckpt) and "classes" not in ckpt:
        classes = ("background", *VOC_CLASSES)
    model, classes, name = model_from_checkpoint(ckpt, path, name, classes)
    return LoadedModel(model, name, tuple(classes), str(path))


def load_caffe(spec: str, labelmap: Optional[str] = None) -> LoadedModel:
    """``NET.prototxt,WEIGHTS.caffemodel[,TRAIN.prototxt]`` -> the native preset its layers map onto, with Caffe's
    weights; a net of no preset runs as it is (:func:`load_caffe_as_is`)."""
    from converters.caffe import cli
    from converters.caffe.detect import convert_metadata

    parts = [p.strip() for p in spec.split(",")]
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"--caffe takes NET.prototxt,WEIGHTS.caffemodel[,TRAIN.prototxt], got {spec!r}")
    net, weights, train = (*parts, None)[:3]
    extra, _ = convert_metadata(cli.read_definition(net), net, train_prototxt=train, labelmap=labelmap)
    with tempfile.TemporaryDirectory(prefix="legacy-det-demo-") as tmp:
        out = Path(tmp) / "converted.pth"
        cli.convert(net, weights, out, extra=extra)
        loaded = load_checkpoint_file(str(out), labelmap)  # read whole: the temporary file goes
    loaded.source = f"{net} + {weights}"
    return loaded


def load_official_detr(path: str) -> LoadedModel:
    """An official Deformable DETR / Sparse DETR / ThumbDet checkpoint (``{"model", "args"}``)."""
    from converters.detr.checkpoint import model_from_checkpoint as detr_from_checkpoint

    model, cfg, _ = detr_from_checkpoint(path)
    return LoadedModel(model, f"{cfg.family}_detr", detr_default_classes(cfg.num_classes), str(path))


class ImportedOnnx(nn.Module):
    """An ONNX file converted by onnx2torch (``module``, a ``torch.fx.GraphModule`` returning its outputs in the
    graph's order) with the interface of the file's :class:`~toolkit.onnx_backend.OnnxRuntimeDetector`:
    ``forward(images float32 (B, 3, H, W)) -> {output name: tensor}`` and ``detections_output``, so the
    prediction functions of :func:`toolkit.onnx_backend.onnx_inference_setup` run on either."""

    def __init__(self, module: nn.Module, runtime) -> None:
        super().__init__()
        self.module = module
        self.output_names = list(runtime.output_names)
        self.detections_output = runtime.detections_output

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with warnings.catch_warnings():
            # onnx2torch's Slice indexes with a list, which this torch warns about (the import checked the result).
            warnings.filterwarnings("ignore", "Using a non-tuple sequence", UserWarning)
            out = self.module(images)
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        return dict(zip(self.output_names, out))


def load_onnx(path: str, labelmap: Optional[str] = None) -> LoadedModel:
    """A file ``python -m toolkit.export`` wrote, run by onnxruntime at its export size (``fixed_input``) with its
    family's test pipeline (:func:`toolkit.onnx_backend.onnx_inference_setup`); ``labelmap``'s class names replace
    the file's.  Its PyTorch side: the file converted by onnx2torch and checked against onnxruntime
    (:func:`converters.onnx.import_onnx`); when that fails the model still loads, ``import_error`` says why.

    Raises:
        ValueError: not such a file, or one that names no classes and no ``labelmap``.
    """
    from converters.onnx import OnnxImportError, import_onnx
    from toolkit.onnx_backend import onnx_inference_setup

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    runtime = runtime_detector(path)
    classes = _classes_from(labelmap) or runtime.classes
    if classes is None:
        raise ValueError(f"{path}: the file names no classes; give a --labelmap")
    runtime.classes = tuple(classes)
    setup = onnx_inference_setup(runtime)
    imported, error = None, None
    try:
        imported = ImportedOnnx(import_onnx(Path(path)).module, runtime).eval()
    except OnnxImportError as exc:  # names the unsupported node types, or the output onnx2torch gets wrong
        error = str(exc)
    except Exception as exc:  # onnx2torch failing otherwise: onnxruntime still runs the file
        error = f"{type(exc).__name__}: {exc}"
    return LoadedModel(runtime.eval(), runtime.model_name, tuple(classes), str(path), setup=setup,
                       fixed_input=True, imported=imported, import_error=error)


def load_source(kind: str, spec: str, labelmap: Optional[str] = None) -> LoadedModel:
    """One model of ``kind`` (see :data:`SOURCE_KINDS`)."""
    if kind == "checkpoint":
        return load_checkpoint_file(spec, labelmap)
    if kind == "caffe":
        return load_caffe(spec, labelmap)
    if kind == "detr":
        return load_official_detr(spec)
    if kind == "onnx":
        return load_onnx(spec, labelmap)
    raise ValueError(f"unknown model source {kind!r}; choose from {SOURCE_KINDS}")
