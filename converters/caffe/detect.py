"""Any converted SSD-fork detector on images and datasets: the work behind ``detect`` and ``evaluate``.

A Caffe detector's ``DetectionOutput`` top already holds its detections: rows
``[image, label, score, xmin, ymin, xmax, ymax]``, boxes normalized by the input
size (:class:`toolkit.caffe.layers.DetectionOutput`).  What a Caffe user
needs on top of the interpreter is the preprocessing the net was trained with,
its class names, and a way from images (or a dataset) to those rows and back to
pixels.  This module supplies them:

* :func:`resolve_preprocessing` -- Caffe's TEST transform: a **warp** to the
  net's input size (``cv2.resize`` with one interpolation, as SSD's
  ``ApplyResize`` with ``resize_mode: WARP``), BGR unless ``rgb``, ``(x -
  mean_value) * scale``.  Each value comes from the first source that gives it:
  the command-line flags, a train / test prototxt's ``transform_param``, a
  checkpoint that ``convert`` wrote, the net's Input layer (the size), Caffe's
  defaults (no mean, scale 1, LINEAR);
* :func:`class_names` -- names by label from a Caffe labelmap (or ``class_<label>``);
* :class:`CaffeDetector` -- a net (plain or :func:`optimize_for_inference`'d) with
  its chosen DetectionOutput top, giving per-image detections;
* :func:`detect_images` / :func:`evaluate_dataset` -- ``detect`` and ``evaluate``.

``toolkit`` supplies the image reader, the warp + preprocessing transform
(:class:`toolkit.data.transforms.SSDTestTransform`), the drawing
(:func:`toolkit.visualize.draw_detections`), the datasets and the evaluators.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from converters.caffe.cli import atomic_write, is_zip_file, load_net, read_converted_checkpoint, read_definition
from converters.caffe.optimize import optimize_for_inference
from toolkit.caffe import caffe_pb2, read_prototxt
from toolkit.caffe.errors import CaffeConversionError
from toolkit.caffe.net import CaffeNet, layer_included, modern_layers, parse_net_definition
from toolkit.data.errors import AnnotationError, DatasetError, ImageReadError
from toolkit.data.transforms import INTERPOLATIONS, CaffePreprocess, SSDTestTransform
from toolkit.models.postprocess import DetectionOutputParams, detections_from_caffe_blob

PathLike = str | os.PathLike

# Caffe's defaults when neither a flag nor a prototxt says (data_transformer.cpp: no mean, scale 1;
# im_transforms.cpp ApplyResize: INTER_LINEAR when no interp_mode is listed).
CAFFE_DEFAULTS = {"mean_bgr": (0.0, 0.0, 0.0), "scale": 1.0, "channel_order": "bgr", "interpolation": "LINEAR"}
DEFAULT_SOURCE = "Caffe's default"

# A hint: field -> (value, where it came from).  Fields: input_hw, resize_hw (H, W); mean_bgr; scale;
# channel_order ("bgr" / "rgb"); interpolation (a key of INTERPOLATIONS).
Hints = dict[str, tuple[Any, str]]
HINT_FIELDS = ("input_hw", "resize_hw", "mean_bgr", "scale", "channel_order", "interpolation")

# The key under which ``convert`` stores preprocessing and class names in a checkpoint.
PREPROCESSING_KEY = "preprocessing"
CLASSES_KEY = "classes"


# ---------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------


def parse_mean(text: str) -> tuple[float, float, float]:
    """``"104,117,123"`` (B, G, R) or one value for all channels."""
    try:
        values = [float(v) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise CaffeConversionError(f"--mean {text!r}: give B,G,R numbers (e.g. 104,117,123) or one number") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise CaffeConversionError(f"--mean {text!r}: give three values B,G,R or one, got {len(values)}")
    return tuple(values)


def parse_size(text: str) -> tuple[int, int]:
    """``"320x240"`` (width x height) -> ``(240, 320)`` as ``(H, W)``."""
    parts = str(text).lower().replace(" ", "").split("x")
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        raise CaffeConversionError(f"--input-size {text!r}: give WIDTHxHEIGHT, e.g. 320x240") from None
    if w <= 0 or h <= 0:
        raise CaffeConversionError(f"--input-size {text!r}: width and height must be positive")
    return h, w


def hints_from_flags(mean: Optional[str] = None, scale: Optional[float] = None, input_size: Optional[str] = None,
                     interpolation: Optional[str] = None, rgb: bool = False) -> Hints:
    """The preprocessing values given on the command line (``--mean``, ``--scale``, ``--input-size``,
    ``--interpolation``, ``--rgb``)."""
    hints: Hints = {}
    if input_size is not None:
        hints["input_hw"] = (parse_size(input_size), "--input-size")
    if mean is not None:
        hints["mean_bgr"] = (parse_mean(mean), "--mean")
    if scale is not None:
        if not np.isfinite(scale) or scale == 0:
            raise CaffeConversionError(f"--scale {scale}: must be a finite non-zero number")
        hints["scale"] = (float(scale), "--scale")
    if interpolation is not None:
        key = str(interpolation).upper()
        if key not in INTERPOLATIONS:
            raise CaffeConversionError(f"--interpolation {interpolation!r}: choose from "
                                       f"{[k.lower() for k in INTERPOLATIONS]}")
        hints["interpolation"] = (key, "--interpolation")
    if rgb:
        hints["channel_order"] = ("rgb", "--rgb")
    return hints


def _enum_name(message, field_name: str, value: int) -> str:
    return message.DESCRIPTOR.fields_by_name[field_name].enum_type.values_by_number[value].name


@dataclass
class PrototxtPreprocessing:
    """What a train / test prototxt's data layer says: preprocessing hints, the labelmap it names, notes."""

    hints: Hints
    labelmap: Optional[Path]
    notes: list[str] = field(default_factory=list)


def _resolve_relative(path_text: str, prototxt: Path) -> Optional[Path]:
    """A path written in a prototxt: as given (relative to the working directory, as Caffe reads it),
    else relative to the prototxt's folder; None when neither exists."""
    for candidate in (Path(path_text), prototxt.parent / path_text):
        if candidate.is_file():
            return candidate
    return None


def hints_from_prototxt(path: PathLike) -> PrototxtPreprocessing:
    """The TEST transform that a train or test prototxt's data layer describes.

    The data layer (``Data``, ``AnnotatedData``, ``ImageData``, ... with a
    ``transform_param``) included in the TEST phase is read if there is one,
    else the TRAIN one: ``mean_value`` (one value or three, BGR), ``scale``,
    ``resize_param`` (``height`` x ``width``, the first ``interp_mode``: Caffe
    draws one of several at random for each image, SSD's test nets list only
    LINEAR).  The random parts of a TRAIN transform (mirror, distortion,
    expansion, crops) are not used at test time, as Caffe's TEST phase does not.
    ``annotated_data_param.label_map_file`` is returned when the file exists
    (as written, or relative to the prototxt).

    Raises:
        CaffeConversionError: unreadable prototxt, no data layer with a
            ``transform_param``, or a transform that ``detect`` cannot reproduce
            (``mean_file``, ``crop_size``, ``force_gray``, a resize mode other than WARP).
    """
    path = Path(path)
    try:
        net = read_prototxt(path)
    except Exception as exc:  # CaffeFormatError: a missing file, a syntax error
        raise CaffeConversionError(f"cannot read the train prototxt: {exc}") from None
    layers = [layer for layer in modern_layers(net)
              if layer.type.endswith("Data") and layer.HasField("transform_param")]
    if not layers:
        raise CaffeConversionError(f"{path}: no data layer with a transform_param (the train or test prototxt "
                                   "of the net names its preprocessing there)")
    tested = [layer for layer in layers if layer_included(layer, "TEST")]
    layer = (tested or layers)[0]
    where = f"{path}: layer {layer.name!r} ({layer.type}, {'TEST' if tested else 'TRAIN'} phase)"
    tp = layer.transform_param
    unsupported = []
    if tp.HasField("mean_file"):
        unsupported.append(f"mean_file {tp.mean_file!r} (give the per-channel mean with --mean B,G,R)")
    if tp.crop_size or tp.crop_h or tp.crop_w:
        unsupported.append("crop_size / crop_h / crop_w (a TEST-phase centre crop)")
    if tp.force_gray:
        unsupported.append("force_gray")
    rp = tp.resize_param if tp.HasField("resize_param") else None
    if rp is not None and rp.resize_mode != caffe_pb2.ResizeParameter.WARP:
        unsupported.append(f"resize_mode {_enum_name(rp, 'resize_mode', rp.resize_mode)} (detect warps, "
                           "as resize_mode WARP does)")
    if unsupported:
        raise CaffeConversionError(f"{where}: cannot reproduce {'; '.join(unsupported)}")
    source = f"{path.name} {layer.name!r}"
    hints: Hints = {}
    notes: list[str] = []
    means = [float(v) for v in tp.mean_value]
    if means:
        if len(means) == 1:
            means *= 3
        if len(means) != 3:
            raise CaffeConversionError(f"{where}: {len(means)} mean_value entries; Caffe takes one or one per "
                                       "channel (3)")
        hints["mean_bgr"] = (tuple(means), source)
    if tp.HasField("scale"):
        hints["scale"] = (float(tp.scale), source)
    if rp is not None:
        if rp.height and rp.width:
            hints["resize_hw"] = ((int(rp.height), int(rp.width)), source)
        modes = [_enum_name(rp, "interp_mode", m) for m in rp.interp_mode]
        if modes:
            hints["interpolation"] = (modes[0], source)
            if len(modes) > 1:
                notes.append(f"{where}: interp_mode lists {modes}, from which Caffe draws one at random per "
                             f"image; using the first, {modes[0]}")
    labelmap = None
    if layer.HasField("annotated_data_param") and layer.annotated_data_param.label_map_file:
        written = layer.annotated_data_param.label_map_file
        labelmap = _resolve_relative(written, path)
        if labelmap is None:
            notes.append(f"{where}: label_map_file {written!r} not found (as written or beside the prototxt)")
    return PrototxtPreprocessing(hints, labelmap, notes)


def hints_to_checkpoint(hints: Hints) -> dict:
    """Hints as plain types for a checkpoint (``torch.load(weights_only=True)`` reads them back)."""
    return {name: {"value": list(value) if isinstance(value, tuple) else value, "source": source}
            for name, (value, source) in hints.items()}


def hints_from_checkpoint(stored: Mapping, checkpoint: PathLike) -> Hints:
    """The hints :func:`hints_to_checkpoint` stored; each source reads ``<checkpoint>, from <original source>``."""
    hints: Hints = {}
    for name, entry in stored.items():
        if name not in HINT_FIELDS or not isinstance(entry, Mapping) or "value" not in entry:
            raise CaffeConversionError(f"{checkpoint}: stored preprocessing has an unknown entry {name!r}")
        value = entry["value"]
        value = tuple(value) if isinstance(value, list) else value
        hints[name] = (value, f"{Path(checkpoint).name}, from {entry.get('source', '?')}")
    return hints


def _given_hints(flags: Optional[Hints],
                 train_prototxt: Optional[PathLike]) -> tuple[list[Hints], Optional[Path], list[str]]:
    """The hints of the flags and of a train prototxt, in that order of precedence; the prototxt's labelmap
    and notes."""
    if train_prototxt is None:
        return [dict(flags or {})], None, []
    from_train = hints_from_prototxt(train_prototxt)
    return [dict(flags or {}), from_train.hints], from_train.labelmap, list(from_train.notes)


def merge_hints(*sources: Hints) -> Hints:
    """One value per field: the first source that gives it wins."""
    merged: Hints = {}
    for hints in sources:
        for name, entry in hints.items():
            merged.setdefault(name, entry)
    return merged


@dataclass(frozen=True)
class Preprocessing:
    """Caffe's TEST transform of one net: warp to ``input_hw``, then ``(x - mean_bgr) * scale``.

    Attributes:
        input_hw: the net input's ``(H, W)``.
        mean_bgr: per-channel mean, B, G, R (subtracted before an RGB swap, as Caffe's mean_value is BGR).
        scale: multiplier after the mean.
        channel_order: ``"bgr"`` (Caffe's OpenCV images) or ``"rgb"``.
        interpolation: the warp's OpenCV interpolation (a key of ``INTERPOLATIONS``).
        sources: field -> where its value came from (a flag, a prototxt, a checkpoint, the Input layer,
            Caffe's default).
    """

    input_hw: tuple[int, int]
    mean_bgr: tuple[float, float, float]
    scale: float
    channel_order: str
    interpolation: str
    sources: Mapping[str, str]

    def transform(self) -> SSDTestTransform:
        """``(uint8 BGR image (H0, W0, 3), target) -> (float32 (3, H, W), target)``, boxes scaled along."""
        return SSDTestTransform(self.input_hw, CaffePreprocess(self.mean_bgr, self.scale, self.channel_order),
                                self.interpolation)

    def describe(self) -> str:
        """One line: every value and its source."""
        def num(v: float) -> str:
            return f"{v:g}"

        h, w = self.input_hw
        parts = [
            f"warp to {w}x{h} ({self.sources['input_hw']}), {self.interpolation} ({self.sources['interpolation']})",
            f"{self.channel_order.upper()} ({self.sources['channel_order']})",
            f"mean {','.join(num(v) for v in self.mean_bgr)} ({self.sources['mean_bgr']})",
            f"scale {num(self.scale)} ({self.sources['scale']})",
        ]
        return "; ".join(parts)


def resolve_preprocessing(hints: Hints, input_name: str, declared_shape: Optional[Sequence[int]]) -> Preprocessing:
    """The preprocessing from merged hints (:func:`merge_hints`) and the net's image input.

    The input size is ``input_hw`` of the hints (a flag, or one stored by
    ``convert``), else the Input layer's declared ``(N, C, H, W)``, else a
    prototxt's ``resize_param``; the other values fall back to Caffe's defaults.

    Raises:
        CaffeConversionError: no input size from any source.
    """
    sources: dict[str, str] = {}
    values: dict[str, Any] = {}
    if "input_hw" in hints:
        values["input_hw"], sources["input_hw"] = hints["input_hw"]
    elif declared_shape is not None and len(declared_shape) == 4 and all(int(d) > 0 for d in declared_shape[2:]):
        values["input_hw"] = (int(declared_shape[2]), int(declared_shape[3]))
        sources["input_hw"] = f"Input layer {input_name!r}"
    elif "resize_hw" in hints:
        values["input_hw"], sources["input_hw"] = hints["resize_hw"]
    else:
        raise CaffeConversionError(f"the input size of {input_name!r} is unknown: the net declares no shape and no "
                                   "train prototxt gives a resize_param; give --input-size WxH")
    for name, default in CAFFE_DEFAULTS.items():
        values[name], sources[name] = hints.get(name, (default, DEFAULT_SOURCE))
    return Preprocessing(tuple(int(v) for v in values["input_hw"]), tuple(float(v) for v in values["mean_bgr"]),
                         float(values["scale"]), str(values["channel_order"]), str(values["interpolation"]),
                         sources)


# ---------------------------------------------------------------------------
# Class names
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassNames:
    """``names[label]`` for labels ``0..num_classes - 1`` of a DetectionOutput, and where they came from."""

    names: tuple[str, ...]
    source: str


def generic_class_names(num_classes: int, background_label_id: int) -> tuple[str, ...]:
    """``background`` at the background label, ``class_<label>`` elsewhere."""
    return tuple("background" if k == background_label_id else f"class_{k}" for k in range(num_classes))


def read_class_names(labelmap: PathLike, num_classes: int) -> tuple[str, ...]:
    """Display names by label of a Caffe labelmap, which must have exactly ``num_classes`` labels.

    Raises:
        CaffeConversionError: unreadable labelmap, or another number of labels.
    """
    from toolkit.data.labelmap import read_labelmap

    try:
        labelmap_ = read_labelmap(labelmap)
    except AnnotationError as exc:
        raise CaffeConversionError(f"cannot read the labelmap: {exc}") from None
    if len(labelmap_.items) != num_classes:
        raise CaffeConversionError(f"{labelmap}: {len(labelmap_.items)} labels, the net's DetectionOutput has "
                                   f"num_classes {num_classes}")
    return labelmap_.names


# ---------------------------------------------------------------------------
# The net
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectionOutputLayer:
    """A DetectionOutput layer of a definition: its name, its top and its parameters."""

    name: str
    top: str
    params: DetectionOutputParams
    save_labelmap: Optional[str]  # save_output_param.label_map_file, as written


def detection_outputs(definition: caffe_pb2.NetParameter) -> list[DetectionOutputLayer]:
    """The DetectionOutput layers active in the TEST phase."""
    out = []
    for layer in modern_layers(definition):
        if layer.type == "DetectionOutput" and layer_included(layer, "TEST") and len(layer.top):
            try:
                params = DetectionOutputParams.from_caffe(layer.detection_output_param)
            except ValueError as exc:
                raise CaffeConversionError(f"layer {layer.name!r} (DetectionOutput): {exc}") from None
            save = layer.detection_output_param.save_output_param.label_map_file or None
            out.append(DetectionOutputLayer(layer.name, layer.top[0], params, save))
    return out


def choose_detection_output(definition: caffe_pb2.NetParameter, output: Optional[str],
                            where: str) -> DetectionOutputLayer:
    """The DetectionOutput layer to read: the only one, or the one whose top (or name) is ``output``.

    Raises:
        CaffeConversionError: none (a classifier, an MTCNN stage ...), several and no
            ``output``, or an ``output`` that names none of them.
    """
    found = detection_outputs(definition)
    if not found:
        tests = [layer for layer in modern_layers(definition) if layer_included(layer, "TEST")]
        consumed = {b for layer in tests for b in layer.bottom}
        outputs = [t for layer in tests for t in layer.top if t not in consumed]
        raise CaffeConversionError(f"{where}: no DetectionOutput layer, so there are no detections to read "
                                   f"(the net's outputs: {list(dict.fromkeys(outputs))}); detect and evaluate run "
                                   "SSD-style detectors; for other nets use 'run'")
    if output is None:
        if len(found) > 1:
            raise CaffeConversionError(f"{where}: {len(found)} DetectionOutput layers; choose one with --output "
                                       f"({', '.join(repr(d.top) for d in found)})")
        return found[0]
    for d in found:
        if output in (d.top, d.name):
            return d
    raise CaffeConversionError(f"{where}: --output {output!r} is no DetectionOutput top; the net has "
                               f"{', '.join(repr(d.top) for d in found)}")


def image_input(definition: caffe_pb2.NetParameter, top: str, where: str) -> tuple[str, Optional[tuple[int, ...]]]:
    """The net input that ``top`` is computed from, and its declared shape (None when undeclared).

    Raises:
        CaffeConversionError: ``top`` depends on no input or on several.
    """
    layers = [layer for layer in modern_layers(definition) if layer_included(layer, "TEST")]
    declared: dict[str, Optional[tuple[int, ...]]] = {}
    for layer in layers:
        if layer.type == "Input":
            shapes = [tuple(int(d) for d in s.dim) for s in layer.input_param.shape]
            for k, t in enumerate(layer.top):
                declared[t] = shapes[k] if k < len(shapes) else (shapes[0] if len(shapes) == 1 else None)
    needed = {top}
    for layer in reversed(layers):
        if needed.intersection(layer.top) and layer.type != "Input":
            needed.update(layer.bottom)
    inputs = [name for name in declared if name in needed]
    if len(inputs) != 1:
        raise CaffeConversionError(f"{where}: {top!r} depends on {len(inputs)} net inputs ({inputs}); detect feeds "
                                   "one image input")
    shape = declared[inputs[0]]
    if shape is not None and (len(shape) != 4 or shape[1] != 3):
        raise CaffeConversionError(f"{where}: input {inputs[0]!r} has shape {shape}; detect feeds 3-channel images "
                                   "(N, 3, H, W)")
    return inputs[0], shape


class CaffeDetector:
    """A Caffe net with its DetectionOutput, as per-image detections.

    Args:
        net: the net (TEST phase), built for the input size of the images it will see.
        layer: the DetectionOutput layer to read (:func:`choose_detection_output`).
        input_name: the image input.
        fast: run an :func:`~converters.caffe.optimize.optimize_for_inference` plan that
            computes only ``layer.top`` (same rows up to float rounding).
    """

    def __init__(self, net: CaffeNet, layer: DetectionOutputLayer, input_name: str, fast: bool = False) -> None:
        self.net = net
        self.layer = layer
        self.input_name = input_name
        self.fast = fast
        self._run = optimize_for_inference(net, [layer.top]) if fast else None

    @property
    def num_classes(self) -> int:
        return self.layer.params.num_classes

    @torch.no_grad()
    def rows(self, images: torch.Tensor) -> np.ndarray:
        """The DetectionOutput top for a batch ``float32 (B, 3, H, W)``: ``float32 (R, 7)`` rows
        ``[image, label, score, xmin, ymin, xmax, ymax]`` (normalized, not clipped), Caffe's row
        order, with Caffe's ``label -1`` placeholder rows of a batch without detections removed."""
        inputs = {self.input_name: images}
        try:
            out = self._run(inputs)[self.layer.top] if self._run is not None else \
                self.net(inputs, blobs=[self.layer.top])[self.layer.top]
        except CaffeConversionError as exc:
            raise CaffeConversionError(f"net {self.net.name!r}: {exc}") from None
        except (RuntimeError, ValueError, IndexError) as exc:
            notes = "; ".join(getattr(exc, "__notes__", []))
            raise CaffeConversionError(f"net {self.net.name!r}: {notes + ': ' if notes else ''}{exc}") from None
        rows = out.detach().float().cpu().numpy().reshape(-1, 7)
        return rows[rows[:, 1] != -1]

    def __call__(self, images: torch.Tensor) -> list[dict[str, np.ndarray]]:
        """Per image of the batch: ``labels`` int64 ``(K,)``, ``scores`` float32 ``(K,)``, ``boxes``
        float32 ``(K, 4)`` normalized xyxy (may reach past ``[0, 1]``), in DetectionOutput's row order."""
        per_image = detections_from_caffe_blob(torch.from_numpy(self.rows(images)), images.shape[0])
        return [{k: v.numpy() for k, v in d.items()} for d in per_image]


@dataclass
class LoadedDetector:
    """:func:`load_detector`'s result: the detector, its preprocessing and class names, and notes to print."""

    detector: CaffeDetector
    preprocessing: Preprocessing
    classes: ClassNames
    source: str
    notes: list[str] = field(default_factory=list)


def split_net_arguments(paths: Sequence[PathLike]) -> tuple[Optional[Path], Path, list[Path]]:
    """``NET WEIGHTS REST...`` or ``CHECKPOINT REST...`` -> ``(net or None, weights, rest)``.

    A first path that is a zip archive (what ``torch.save`` writes) is a ``convert``
    checkpoint, which holds the net definition itself.

    Raises:
        CaffeConversionError: too few paths, or a missing net file.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise CaffeConversionError("give NET.prototxt WEIGHTS, or a checkpoint written by 'convert'")
    first = paths[0]
    if not first.exists():
        raise CaffeConversionError(f"{first}: no such file")
    if is_zip_file(first):
        return None, first, paths[1:]
    if len(paths) < 2:
        raise CaffeConversionError(f"{first}: a net definition needs its WEIGHTS (a .caffemodel or a checkpoint "
                                   "written by 'convert') after it")
    return first, paths[1], paths[2:]


def load_detector(
    net_path: Optional[PathLike],
    weights: PathLike,
    *,
    flags: Optional[Hints] = None,
    train_prototxt: Optional[PathLike] = None,
    labelmap: Optional[PathLike] = None,
    output: Optional[str] = None,
    fast: bool = False,
) -> LoadedDetector:
    """A :class:`CaffeDetector` with its preprocessing and class names.

    Args:
        net_path: the deploy prototxt; None when ``weights`` is a ``convert``
            checkpoint (its stored definition is used).
        weights: a ``.caffemodel`` or a ``convert`` checkpoint.
        flags: preprocessing from the command line (:func:`hints_from_flags`).
        train_prototxt: a train or test prototxt whose data layer gives the
            preprocessing (:func:`hints_from_prototxt`) and, when it exists, the labelmap.
        labelmap: a Caffe labelmap for the class names.
        output: the DetectionOutput top to read when the net has several.
        fast: run the inference-optimized plan.

    Preprocessing sources, first wins: ``flags``, ``train_prototxt``, what the
    checkpoint stores, the Input layer (size), Caffe's defaults.  Class names:
    ``labelmap``, the train prototxt's ``label_map_file``, the checkpoint's, the
    DetectionOutput's ``save_output_param.label_map_file``, ``class_<label>``.

    Raises:
        CaffeConversionError: naming the file (and layer) at fault.
    """
    weights = Path(weights)
    checkpoint = read_converted_checkpoint(weights) if is_zip_file(weights) else None
    if net_path is not None:
        definition = read_definition(net_path)
        where = str(net_path)
    elif checkpoint is not None:
        definition = parse_net_definition(checkpoint["prototxt"], f"{weights} (stored net definition)")
        where = str(weights)
    else:
        raise CaffeConversionError(f"{weights}: not a checkpoint written by 'convert'; give the net definition "
                                   "before the caffemodel")
    layer = choose_detection_output(definition, output, where)
    input_name, declared = image_input(definition, layer.top, where)
    sources, train_labelmap, notes = _given_hints(flags, train_prototxt)
    if checkpoint is not None and checkpoint.get(PREPROCESSING_KEY):
        sources.append(hints_from_checkpoint(checkpoint[PREPROCESSING_KEY], weights))
    preprocessing = resolve_preprocessing(merge_hints(*sources), input_name, declared)

    h, w = preprocessing.input_hw
    net = load_net(net_path if net_path is not None else weights, weights, input_shapes={input_name: (1, 3, h, w)},
                   definition=definition, checkpoint=checkpoint)
    if net.ignored_weights:
        notes.append(f"{weights}: layers with blobs that the net lacks, ignored as Caffe does: "
                     f"{list(net.ignored_weights)}")
    classes = _class_names(layer, labelmap, train_labelmap, checkpoint, weights, where, net_path)
    return LoadedDetector(CaffeDetector(net, layer, input_name, fast), preprocessing, classes, where, notes)


def _class_names(layer: DetectionOutputLayer, labelmap, train_labelmap, checkpoint, weights, where,
                 net_path) -> ClassNames:
    n = layer.params.num_classes
    if labelmap is not None:
        return ClassNames(read_class_names(labelmap, n), f"--labelmap {labelmap}")
    if train_labelmap is not None:
        return ClassNames(read_class_names(train_labelmap, n), f"the train prototxt's label_map_file {train_labelmap}")
    if checkpoint is not None and checkpoint.get(CLASSES_KEY):
        names = tuple(str(c) for c in checkpoint[CLASSES_KEY])
        if len(names) != n:
            raise CaffeConversionError(f"{weights}: stores {len(names)} class names, DetectionOutput {layer.name!r} "
                                       f"has num_classes {n}")
        return ClassNames(names, f"{weights.name}")
    if layer.save_labelmap and net_path is not None:
        found = _resolve_relative(layer.save_labelmap, Path(net_path))
        if found is not None:
            return ClassNames(read_class_names(found, n), f"{where}'s save_output_param label_map_file {found}")
    return ClassNames(generic_class_names(n, layer.params.background_label_id),
                      "generic: no labelmap given")


# ---------------------------------------------------------------------------
# detect
# ---------------------------------------------------------------------------


@dataclass
class DetectResult:
    """What :func:`detect_images` wrote: one record per image read (the ``detections.json`` entries), the
    drawings, and the images that could not be decoded."""

    records: list[dict]
    drawings: list[Path]
    json_path: Path
    unreadable: list[str] = field(default_factory=list)


def _drawing_names(images: Sequence[Path]) -> list[str]:
    """``<stem>.png`` per image; a stem met again gets ``_2``, ``_3``, ..."""
    seen: dict[str, int] = {}
    names = []
    for path in images:
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}.png")
    return names


def detect_images(
    loaded: LoadedDetector,
    images: Sequence[PathLike],
    out_dir: PathLike,
    *,
    score_threshold: float = 0.0,
    draw_threshold: Optional[float] = None,
    progress: bool = True,
    log=print,
) -> DetectResult:
    """Run the detector on image files; write ``<out>/<stem>.png`` (drawn) and ``<out>/detections.json``.

    ``detections.json`` is a list, one entry per image in the given order:
    ``{"image": path, "width": W, "height": H, "detections": [{"label": int,
    "name": str, "score": float, "box_xyxy": [x1, y1, x2, y2]}]}``, boxes in
    pixels of the original image (DetectionOutput's normalized box times W, H;
    not clipped, as Caffe's), rows in DetectionOutput's order, those with
    ``score >= score_threshold``.  The drawing shows those with ``score >=
    draw_threshold`` (default ``max(score_threshold, 0.3)``).

    Missing files are an error before anything runs; an image that cannot be
    decoded is skipped and listed in ``unreadable`` (the others are still
    written).

    Raises:
        CaffeConversionError: a missing image or an unwritable folder.
    """
    from tqdm import tqdm

    from toolkit.data.voc import read_image_bgr
    from toolkit.evaluation.report import write_json
    from toolkit.visualize import draw_detections

    images = [Path(p) for p in images]
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise CaffeConversionError(f"image(s) not found: {', '.join(missing)}")
    if not images:
        raise CaffeConversionError("give at least one image")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CaffeConversionError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc})") from None
    draw_threshold = max(score_threshold, 0.3) if draw_threshold is None else draw_threshold
    transform = loaded.preprocessing.transform()
    names = loaded.classes.names
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    records, drawings, unreadable = [], [], []
    bar = tqdm(list(zip(images, _drawing_names(images))), desc="detect", unit="image", disable=not progress,
               leave=False)
    for path, drawing in bar:
        try:
            image = read_image_bgr(path)
        except ImageReadError as exc:
            unreadable.append(str(exc))
            continue
        height, width = image.shape[:2]
        tensor, _ = transform(image, empty)
        det = loaded.detector(tensor[None])[0]
        keep = det["scores"] >= score_threshold
        labels, scores = det["labels"][keep], det["scores"][keep]
        boxes = det["boxes"][keep].astype(np.float64) * np.array([width, height, width, height], dtype=np.float64)
        records.append({
            "image": str(path), "width": int(width), "height": int(height),
            "detections": [{"label": int(lab), "name": _name(names, lab), "score": float(s),
                            "box_xyxy": [float(v) for v in box]} for lab, s, box in zip(labels, scores, boxes)],
        })
        shown = scores >= draw_threshold
        picture = draw_detections(image, boxes[shown], scores[shown], labels[shown], names)
        target = out_dir / drawing
        _write_png(target, picture)
        drawings.append(target)
        (bar.write if progress else log)(f"{path}: {len(scores)} detection(s), {int(shown.sum())} drawn "
                                         f"(score >= {draw_threshold:g}) -> {target}")
    json_path = write_json(records, out_dir / "detections.json")
    return DetectResult(records, drawings, json_path, unreadable)


def _name(names: Sequence[str], label) -> str:
    label = int(label)
    return names[label] if 0 <= label < len(names) else f"class_{label}"


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise CaffeConversionError(f"{path}: PNG encoding failed")
    atomic_write(path, lambda f: f.write(encoded.tobytes()))


# ---------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------


def match_classes(net_names: Sequence[str], background_label_id: int, dataset_classes: Sequence[str],
                  net_source: str, dataset_name: str) -> tuple[dict[int, int], list[str]]:
    """:func:`toolkit.evaluation.classes.match_classes`, its error as a :class:`CaffeConversionError`."""
    from toolkit.evaluation.classes import ClassMismatchError
    from toolkit.evaluation.classes import match_classes as match

    try:
        return match(net_names, background_label_id, dataset_classes, net_source, dataset_name, kind="net")
    except ClassMismatchError as exc:
        raise CaffeConversionError(str(exc)) from None


@dataclass
class EvaluateResult:
    """:func:`evaluate_dataset`'s outcome: the evaluator's result (``mAP``, ``ap``, ``to_json()``), the
    per-image predictions (pixels, dataset labels) and notes."""

    result: Any
    predictions: list[dict]
    dataset: Any
    notes: list[str] = field(default_factory=list)


def evaluate_dataset(
    loaded: LoadedDetector,
    dataset_name: str,
    *,
    split: str = "test",
    data_root: Optional[PathLike] = None,
    metric: str = "voc07",
    batch_size: int = 8,
    workers: int = 2,
    progress: bool = True,
) -> EvaluateResult:
    """AP of a Caffe detector on a dataset, through ``toolkit.evaluation``.

    The dataset is one that ``toolkit.train`` accepts (``voc07``, ``coco``,
    ``shapes``, ``lmdb:PATH,...``; an LMDB named without ``test=`` is itself
    the test set), its ``split``, read with the net's
    preprocessing (:meth:`Preprocessing.transform`).  Detections are matched to
    the dataset's classes by name (:func:`match_classes`), taken to pixels of the
    original image (clipped to it, as ``toolkit.evaluate`` does) and scored with
    VOC07 / VOC12 AP, or COCO AP for COCO.

    Raises:
        CaffeConversionError: the classes do not match, or the net fails.
        DatasetError, KeyError, ValueError: from ``toolkit.data.build_dataset``.
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from toolkit.data import build_dataset
    from toolkit.data.transforms import collate_detection
    from toolkit.engine import evaluate_predictions, to_image_pixels

    notes: list[str] = []
    if split == "test" and dataset_name.startswith("lmdb:"):
        from toolkit.data import parse_lmdb_spec

        try:
            spec = parse_lmdb_spec(dataset_name)
        except (KeyError, ValueError) as exc:
            raise CaffeConversionError(f"dataset {dataset_name!r}: {exc}") from None
        if spec.test is None:
            # An LMDB named alone is the set to evaluate (a test LMDB, as SSD's create_data.sh writes them).
            split = "train"
            notes.append(f"{dataset_name} names one LMDB (no ',test=PATH'): evaluating its records")
    try:
        dataset = build_dataset(dataset_name, split, root=data_root, transform=loaded.preprocessing.transform())
    except (KeyError, ValueError, DatasetError) as exc:  # a bad name, a missing folder or list
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CaffeConversionError(f"dataset {dataset_name!r}: {message}") from None
    params = loaded.detector.layer.params
    mapping, extra = match_classes(loaded.classes.names, params.background_label_id, dataset.classes,
                                   loaded.classes.source, dataset_name)
    if extra:
        notes.append(f"net classes not in the dataset, their detections left out: {extra}")
    lookup = np.full(max(params.num_classes, 1), -1, dtype=np.int64)
    for label, j in mapping.items():
        lookup[label] = j
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_detection)
    predictions = []
    for images, targets in tqdm(loader, desc="evaluate", unit="batch", disable=not progress, leave=False):
        for det, target in zip(loaded.detector(images), targets):
            labels = lookup[det["labels"]]
            keep = labels >= 0
            p = to_image_pixels({"boxes": torch.from_numpy(det["boxes"][keep]),
                                 "scores": torch.from_numpy(det["scores"][keep]),
                                 "labels": torch.from_numpy(labels[keep])}, target["orig_size"].tolist())
            p["image_id"] = target["image_id"]
            predictions.append(p)
    return EvaluateResult(evaluate_predictions(dataset, predictions, metric), predictions, dataset, notes)


# ---------------------------------------------------------------------------
# convert: what a checkpoint stores for detect
# ---------------------------------------------------------------------------


def convert_metadata(
    definition: caffe_pb2.NetParameter,
    where: str,
    *,
    flags: Optional[Hints] = None,
    train_prototxt: Optional[PathLike] = None,
    labelmap: Optional[PathLike] = None,
) -> tuple[dict, list[str]]:
    """The entries ``convert`` adds to a checkpoint so that ``detect`` on it needs no flags.

    Returns:
        ``({"preprocessing": ..., "classes": [...]} (each when known), notes)``:
        the preprocessing hints of ``flags`` over ``train_prototxt`` (with their
        sources), and the class names by label of ``labelmap`` or the train
        prototxt's ``label_map_file``, checked against every DetectionOutput's ``num_classes``.
    Raises:
        CaffeConversionError: unreadable files, a labelmap for a net without
            DetectionOutput or with another number of classes.
    """
    sources, train_labelmap, notes = _given_hints(flags, train_prototxt)
    extra: dict = {}
    hints = merge_hints(*sources)
    if hints:
        extra[PREPROCESSING_KEY] = hints_to_checkpoint(hints)
    chosen = labelmap if labelmap is not None else train_labelmap
    if chosen is not None:
        layers = detection_outputs(definition)
        if not layers:
            raise CaffeConversionError(f"{where}: no DetectionOutput layer, so no classes to name with {chosen}")
        names = read_class_names(chosen, layers[0].params.num_classes)
        for layer in layers[1:]:
            read_class_names(chosen, layer.params.num_classes)
        extra[CLASSES_KEY] = list(names)
    return extra, notes


def describe_hints(hints: Hints) -> str:
    """Stored hints as one line (``mean 104,117,123 (--mean); ...``)."""
    def show(name, value) -> str:
        if name in ("input_hw", "resize_hw"):
            return f"{'input' if name == 'input_hw' else 'resize'} {value[1]}x{value[0]}"
        if name == "mean_bgr":
            return "mean " + ",".join(f"{v:g}" for v in value)
        if name == "scale":
            return f"scale {value:g}"
        if name == "channel_order":
            return str(value).upper()
        return str(value)

    return "; ".join(f"{show(name, value)} ({source})" for name, (value, source) in hints.items())
