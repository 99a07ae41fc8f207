"""Export a detector to ONNX, checked against onnxruntime before anything is written.

::

    python -m toolkit.export --checkpoint runs/main/checkpoint.pth -o dsod_tiny.onnx
    python -m toolkit.export --checkpoint runs/main/checkpoint.pth -o dsod_tiny_nms.onnx --with-postprocess \\
        --dynamic-batch
    python -m toolkit.export --checkpoint dsod300.pth -o dsod300.onnx          # python -m converters.caffe convert
    python -m toolkit.export --checkpoint runs/ddetr_tiny/checkpoint.pth -o ddetr.onnx --with-postprocess

What the graph takes and gives, by the kind of checkpoint:

- **SSD family** (``toolkit.train`` checkpoints, ThumbDet students included; a converted Caffe checkpoint with
  ``--model``): input ``images`` float32 ``(B, 3, S, S)``, preprocessed as the preset's test transform does
  (Caffe's warp, mean, scale and channel order; a ThumbDet student takes the full-size image and its
  down-sampler is in the graph).  Outputs ``loc`` ``(B, P, 4)`` (encoded offsets), ``conf`` ``(B, P, C)``
  (logits, background first), ``priors`` ``(P, 4)`` (normalized xyxy), ``variances`` ``(P, 4)``; with
  ``--with-postprocess`` instead ``detection_out`` ``(1, 1, R, 7)``: SSD-Caffe's DetectionOutput rows
  ``[image, label, score, xmin, ymin, xmax, ymax]`` (normalized), built from ONNX operations by
  :func:`toolkit.models.graph_postprocess.detection_output_graph`.
- **DETR family** (``toolkit.train`` and ``converters.detr convert`` checkpoints): input ``images`` float32
  ``(B, 3, H, W)``, RGB normalized with the ImageNet mean and std, no padding.  Outputs ``pred_logits``
  ``(B, Q, K)`` and ``pred_boxes`` ``(B, Q, 4)`` (cxcywh normalized); with ``--with-postprocess`` instead
  ``scores`` ``(B, k)``, ``labels`` int64 ``(B, k)`` (1..K) and ``boxes`` ``(B, k, 4)`` (xyxy normalized), the
  ``k`` best (query, class) pairs.  The multi-scale deformable attention runs its PyTorch reference
  (``grid_sample``) in the graph: the compiled kernels have no ONNX form.
- **Converted Caffe nets** (``python -m converters.caffe convert`` checkpoints, any net the interpreter runs):
  the net's input blobs by name (``data``, ...) at their declared shapes, and as outputs, by name, the net's
  outputs (blobs no layer consumes: ``detection_out``, ...) followed by the bottoms of its DetectionOutput
  layers (``mbox_loc``, ``mbox_conf_flatten``, ``mbox_priorbox``), or the blobs ``--outputs`` names.  A
  DetectionOutput becomes :func:`~toolkit.models.graph_postprocess.detection_output_graph`; its module
  docstring says which rows can differ from Caffe's (an IoU within float rounding of the NMS threshold);
  adaptive NMS (``eta < 1``) becomes an ONNX ``Loop``.

The check: the exported file is run by onnxruntime on a real image (``--image``, else a rendered ``shapes``
scene), preprocessed for the model, at batch 1 and, with ``--dynamic-batch``, at batch 2; every output must
have PyTorch's shape and lie within 1e-4 of it (``--tolerance``).  Only then is the file moved into place
(written beside it first, so a failed or killed export leaves nothing half-written), and the report prints the
graph's inputs, outputs, opset and the differences.  The class names, the model and the preprocessing go into
the file's metadata (``legacy_det.*`` properties).

Why the TorchScript-based exporter (``torch.onnx.export(dynamo=False)``) and not the dynamo one: the
post-processing has data-dependent shapes (how many boxes survive the threshold, the NMS, ``keep_top_k``),
which the tracer records as the ONNX operations that produce them (``NonZero``, ``NonMaxSuppression``), while
``torch.export`` needs every such size declared and guarded; the exact ONNX operations we rely on (``TopK``
ties, ``NonMaxSuppression``) are emitted through ``symbolic`` methods the tracer honours; and the dynamo
exporter needs ``onnxscript``, one more dependency to pin.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

DEFAULT_OPSET = 17  # GridSample (the DETR attention's reference path) needs 16
DEFAULT_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The model cannot be exported, or its export does not reproduce PyTorch (the message says which output)."""


@dataclass
class ExportSpec:
    """What to trace: ``module(*example)`` returns one tensor per name of ``output_names``.

    ``make_inputs(batch)`` gives the real inputs of a batch (the example is ``make_inputs(1)``; every input's
    axis 0 is the batch); ``row_axes`` names the outputs whose length along an axis depends on the data
    (DetectionOutput's rows); ``metadata`` goes into the file."""

    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    make_inputs: Callable[[int], tuple[torch.Tensor, ...]]
    row_axes: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    description: str = ""


# ----------------------------------------------------------------------------- inputs
def parity_image(path: Optional[Path] = None) -> np.ndarray:
    """``uint8 (H, W, 3)`` BGR: ``path``, else a rendered ``shapes`` test scene (deterministic)."""
    if path is not None:
        from toolkit.data.voc import read_image_bgr

        return read_image_bgr(path)
    from toolkit.data.shapes import render_image

    return render_image(0, "test", 0).image_bgr


def no_boxes() -> dict:
    """The empty target a test transform is called with when only the image matters."""
    return {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}


def batch_of(image: torch.Tensor, batch: int) -> torch.Tensor:
    """``(batch, ...)``: the image, then its mirror, alternately (distinct images in one batch)."""
    return torch.stack([image if i % 2 == 0 else image.flip(-1) for i in range(batch)])


# ----------------------------------------------------------------------------- wrappers
class SSDGraph(nn.Module):
    """An SSD-family detector as a graph: raw heads and priors, or Caffe's DetectionOutput."""

    def __init__(self, model: nn.Module, params=None) -> None:
        super().__init__()
        self.model = model
        self.params = params

    def forward(self, images: torch.Tensor):
        out = self.model(images)
        if self.params is None:
            return out["loc"], out["conf"], out["priors"], out["variances"]
        from toolkit.models.graph_postprocess import detection_output_graph

        return detection_output_graph(out["loc"].float(), torch.softmax(out["conf"].float(), dim=-1),
                                      out["priors"], out["variances"], self.params)


class DETRGraph(nn.Module):
    """A DETR-family detector as a graph: raw predictions, or the top-``k`` post-processing."""

    def __init__(self, model: nn.Module, top_k: Optional[int] = None) -> None:
        super().__init__()
        self.model = model
        self.top_k = top_k

    def forward(self, images: torch.Tensor):
        out = self.model(images)
        logits, boxes = out["pred_logits"], out["pred_boxes"]
        if self.top_k is None:
            return logits, boxes
        from torchvision.ops import box_convert

        from toolkit.models.graph_postprocess import stable_topk

        prob = logits.sigmoid().flatten(1)
        scores, index = stable_topk(prob, min(self.top_k, prob.shape[1]))
        query = torch.div(index, logits.shape[2], rounding_mode="floor")
        labels = torch.remainder(index, logits.shape[2]) + 1
        xyxy = torch.gather(box_convert(boxes, "cxcywh", "xyxy"), 1, query.unsqueeze(-1).expand(-1, -1, 4))
        return scores, labels, xyxy


class CaffeNetGraph(nn.Module):
    """A :class:`~toolkit.caffe.net.CaffeNet` with positional inputs and outputs (blob names kept outside)."""

    def __init__(self, net: nn.Module, input_names: Sequence[str], output_names: Sequence[str]) -> None:
        super().__init__()
        self.net = net
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def forward(self, *inputs: torch.Tensor):
        blobs = self.net(dict(zip(self.input_names, inputs)), blobs=self.output_names)
        return tuple(blobs[name] for name in self.output_names)


# ----------------------------------------------------------------------------- specs
def spec_for_checkpoint(path: Path, model_name: Optional[str] = None, with_postprocess: bool = False,
                        input_size: Optional[Sequence[int]] = None, image: Optional[Path] = None,
                        outputs: Optional[Sequence[str]] = None, top_k: int = 100,
                        classes: Optional[Sequence[str]] = None, input_npz: Optional[Path] = None) -> ExportSpec:
    """The :class:`ExportSpec` of a checkpoint (module docstring: what each kind exports); ``classes`` (background
    first) name a converted Caffe checkpoint's classes when it stores none (default: VOC's); ``input_npz``: a
    converted Caffe net's check inputs, one array per input blob (``python -m converters.caffe run``'s format).

    Raises:
        FileNotFoundError, ValueError: the checkpoint cannot be read (the loaders' messages).
        ExportError: options that do not apply to this kind of checkpoint, or parameters with no graph form.
    """
    from toolkit.caffe.net import CHECKPOINT_FORMAT
    from toolkit.engine import checkpoint_model_name, is_converted_checkpoint, load_checkpoint_file, \
        model_from_checkpoint

    ckpt = load_checkpoint_file(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT and model_name is None:
        if with_postprocess:
            raise ExportError("--with-postprocess: a converted Caffe net exports its own DetectionOutput (its output "
                              "blob); give --model to export it as a native preset instead")
        return _caffe_spec(path, ckpt, image, outputs, input_size, input_npz)
    if outputs or input_npz:
        raise ExportError(f"{'--outputs' if outputs else '--input'} applies to a converted Caffe net; this checkpoint "
                          "is not one (or --model was given)")
    from toolkit.data.voc import VOC_CLASSES

    if classes is None and is_converted_checkpoint(ckpt) and "classes" not in ckpt:
        classes = ("background", *VOC_CLASSES)  # the converted presets are VOC models (as toolkit.predict)
    model, classes, name = model_from_checkpoint(ckpt, path, checkpoint_model_name(ckpt, path, model_name), classes)
    return spec_for_model(model, classes, name, with_postprocess, input_size, image, top_k)


def spec_for_model(model: nn.Module, classes: Sequence[str], name: str, with_postprocess: bool = False,
                   input_size: Optional[Sequence[int]] = None, image: Optional[Path] = None,
                   top_k: int = 100) -> ExportSpec:
    """The :class:`ExportSpec` of a loaded toolkit detector (``name`` its preset; a DETR or an SSD-family model,
    a ThumbDet student included), as :func:`spec_for_checkpoint` gives for its checkpoint."""
    from toolkit.models.detr import DeformableDETR
    from toolkit.models.gfl import GFLDetector

    if isinstance(model, DeformableDETR):
        return _detr_spec(model, classes, name, with_postprocess, input_size, image, top_k)
    if isinstance(model, GFLDetector):
        raise ExportError(f"{name}: the GFL head has no ONNX export yet (its outputs and post-processing differ "
                          "from the SSD family's); export an SSD/DSOD or DETR model")
    return _ssd_spec(model, classes, name, with_postprocess, input_size, image)


def _ssd_spec(model, classes, name, with_postprocess, input_size, image) -> ExportSpec:
    from toolkit.data.transforms import PREPROCESS_PRESETS, SSDTestTransform
    from toolkit.models.build import INPUTS, default_postprocess
    from toolkit.models.graph_postprocess import GraphPostprocessError, check_graph_params

    spec = INPUTS[name]
    size = tuple(input_size) if input_size else (spec.size, spec.size)
    pre = PREPROCESS_PRESETS[spec.preprocess]
    picture = parity_image(image)
    tensor = SSDTestTransform(size, pre)(picture, no_boxes())[0]
    params = default_postprocess(len(classes)) if with_postprocess else None
    if params is not None:
        try:
            check_graph_params(params)
        except GraphPostprocessError as exc:
            raise ExportError(f"{exc}; export without --with-postprocess") from None
    outputs = ["detection_out"] if with_postprocess else ["loc", "conf", "priors", "variances"]
    meta = {"family": "ssd", "model": name, "classes": json.dumps(list(classes)),
            "postprocess": "detection_output" if with_postprocess else "none",
            "preprocess": json.dumps({"size_hw": list(size), "mean_bgr": list(pre.mean_bgr), "scale": pre.scale,
                                      "channel_order": pre.channel_order, "interpolation": "LINEAR"})}
    return ExportSpec(SSDGraph(model, params).eval(), ["images"], outputs, lambda b: (batch_of(tensor, b),),
                      {"detection_out": 2} if with_postprocess else {}, meta,
                      f"{name} ({len(classes) - 1} classes), input {size[0]}x{size[1]}")


def _detr_spec(model, classes, name, with_postprocess, input_size, image, top_k) -> ExportSpec:
    from toolkit.data.detr_transforms import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, DETRFixedSizeTransform
    from toolkit.models.detr.training import DETR_PRESETS

    if input_size:
        size = tuple(input_size)
    else:
        scale = DETR_PRESETS[name].test_scale if name in DETR_PRESETS else 800
        size = (scale, scale)
    tensor = DETRFixedSizeTransform(size)(parity_image(image), no_boxes())[0]
    outputs = ["scores", "labels", "boxes"] if with_postprocess else ["pred_logits", "pred_boxes"]
    meta = {"family": "detr", "model": name, "classes": json.dumps(list(classes)),
            "postprocess": f"top{top_k}" if with_postprocess else "none",
            "preprocess": json.dumps({"size_hw": list(size), "mean_rgb": list(IMAGENET_MEAN_RGB),
                                      "std_rgb": list(IMAGENET_STD_RGB), "interpolation": "LINEAR"})}
    return ExportSpec(DETRGraph(model, top_k if with_postprocess else None).eval(), ["images"], outputs,
                      lambda b: (batch_of(tensor, b),), {}, meta,
                      f"{name} ({len(classes) - 1} classes), input {size[0]}x{size[1]}")


def _caffe_spec(path, ckpt, image, outputs, input_size, input_npz=None) -> ExportSpec:
    from toolkit.caffe.errors import CaffeConversionError
    from toolkit.caffe.net import CaffeNet
    from toolkit.data.transforms import CaffePreprocess, SSDTestTransform

    if input_size:
        raise ExportError("--input-size: a converted Caffe net exports at its declared input shapes")
    try:
        net = CaffeNet.from_checkpoint(ckpt).eval()
    except CaffeConversionError as exc:
        raise ExportError(f"{path}: {exc}") from None
    inputs = list(net.input_shapes)
    detection_layers = [s for s in net.layer_specs if s.type == "DetectionOutput"]
    if outputs:
        unknown = [o for o in outputs if o not in net.blob_shapes]
        if unknown:
            raise ExportError(f"--outputs: net {net.name!r} has no blob {', '.join(map(repr, unknown))}")
        names = list(outputs)
    else:
        names = list(net.outputs)
        for spec in detection_layers:
            names += [b for b in spec.bottoms[:3] if b not in names]
    from toolkit.models.graph_postprocess import GraphPostprocessError, check_graph_params

    for spec in detection_layers:
        if any(t in names for t in spec.tops):
            try:
                check_graph_params(net.layer(spec.name).params)
            except GraphPostprocessError as exc:
                raise ExportError(f"layer {spec.name!r} (DetectionOutput): {exc}; --outputs can name the blobs "
                                  "before it") from None
    hints = ckpt.get("preprocessing") or {}

    def hint(key, default):
        entry = hints.get(key)
        return entry["value"] if isinstance(entry, dict) and "value" in entry else default

    mean = hint("mean", (104.0, 117.0, 123.0))
    pixel_scale = float(hint("scale", 1.0))
    rgb = bool(hint("rgb", False))
    picture = parity_image(image)

    pre = CaffePreprocess(tuple(mean), pixel_scale, "rgb" if rgb else "bgr")

    given = None
    if input_npz is not None:
        with np.load(input_npz) as arrays:
            missing = [n for n in inputs if n not in arrays.files]
            if missing:
                raise ExportError(f"{input_npz}: no array for the net's input {', '.join(map(repr, missing))}")
            given = {n: torch.from_numpy(np.ascontiguousarray(arrays[n], dtype=np.float32)) for n in inputs}

    def make_inputs(batch: int):
        if given is not None:  # the file's first images; its mirror images where it holds fewer than batch
            return tuple(torch.cat([x, x.flip(-1)])[:batch] if len(x) < batch else x[:batch] for x in given.values())
        out = []
        for name in inputs:
            shape = list(net.input_shapes[name])
            if len(shape) == 4 and shape[1] == 3:  # an image: Caffe's TEST transform (a LINEAR warp, the mean)
                x = SSDTestTransform((shape[2], shape[3]), pre)(picture, no_boxes())[0]
                out.append(batch_of(x, batch))
            else:  # not an image: a fixed pseudo-random blob of the declared shape
                g = torch.Generator().manual_seed(0)
                out.append(torch.randn([batch, *shape[1:]], generator=g))
        return tuple(out)

    producers = {top: s.type for s in net.layer_specs for top in s.tops}  # the last writer of an in-place blob
    row_axes = {n: 2 for n in names if producers.get(n) == "DetectionOutput"}  # (1, 1, R, 7)
    detection_tops = [t for spec in detection_layers for t in spec.tops if t in names]
    meta = {"family": "caffe", "model": net.name or "net", "postprocess": "caffe" if detection_tops else "none",
            "detections": detection_tops[0] if detection_tops else "",
            "classes": json.dumps(list(ckpt["classes"])) if ckpt.get("classes") else "",
            "preprocess": json.dumps({"mean_bgr": list(mean), "scale": pixel_scale,
                                      "channel_order": "rgb" if rgb else "bgr", "interpolation": "LINEAR"})}
    return ExportSpec(CaffeNetGraph(net, inputs, names).eval(), inputs, names, make_inputs, row_axes, meta,
                      f"Caffe net {net.name!r} ({len(net.layer_specs)} layers)")


# ----------------------------------------------------------------------------- bicubic thumbnails
BICUBIC_AA_OPSET = 18  # ONNX Resize gained ``antialias`` in opset 18
_bicubic_aa_registered = []


def register_antialiased_bicubic() -> None:
    """Teach the TorchScript ONNX exporter ThumbDet's bicubic thumbnail, ``F.interpolate(mode="bicubic",
    antialias=True)``, which it refuses at every opset: ONNX ``Resize`` with ``antialias=1`` (opset 18),
    ``cubic_coeff_a=-0.5`` (PyTorch's bicubic kernel), ``exclude_outside=1`` (PyTorch drops the taps outside the
    image and renormalizes the rest) and half-pixel coordinates.  onnxruntime computes it within 3e-5 of PyTorch
    on [0, 1] images (measured from 160x160 to 533x800, scales 2 and 4); the export's check still holds every
    detector output to 1e-4.  Registered for opset 18 and later only (once; later calls do nothing).
    """
    if _bicubic_aa_registered:
        return
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx import symbolic_helper as sh

    def antialiased_bicubic(g, x, output_size, align_corners, scales_h=None, scales_w=None):
        size = sh._maybe_get_const(output_size, "is")
        if sh._is_value(size):  # (h, w) computed from the input's shape while tracing
            hw = g.op("Concat", *[g.op("Cast", sh._unsqueeze_helper(g, v, [0]), to_i=7)  # to int64
                                  for v in sh._unpack_list(size)], axis_i=0)
        else:
            hw = g.op("Constant", value_t=torch.tensor(list(size), dtype=torch.int64))
        batch_channels = g.op("Slice", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([0])),
                              g.op("Constant", value_t=torch.tensor([2])))
        sizes = g.op("Concat", batch_channels, hw, axis_i=0)
        none = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))  # no roi, no scales: sizes
        return g.op("Resize", x, none, none, sizes, mode_s="cubic", antialias_i=1, cubic_coeff_a_f=-0.5,
                    exclude_outside_i=1, coordinate_transformation_mode_s="half_pixel")

    register_custom_op_symbolic("aten::_upsample_bicubic2d_aa", antialiased_bicubic, BICUBIC_AA_OPSET)
    _bicubic_aa_registered.append(True)


def needed_opset(module: nn.Module, opset: int) -> int:
    """``opset``, raised to :data:`BICUBIC_AA_OPSET` for a model with a bicubic thumbnailer (whose resize needs
    ONNX ``Resize``'s ``antialias``; the symbolic is registered here)."""
    from toolkit.models.thumbnail import Thumbnailer

    if any(isinstance(m, Thumbnailer) and m.mode == "bicubic" for m in module.modules()):
        register_antialiased_bicubic()
        return max(opset, BICUBIC_AA_OPSET)
    return opset


# ----------------------------------------------------------------------------- export and check
@dataclass
class ExportReport:
    path: Path
    opset: int
    inputs: list[tuple[str, list, str]]
    outputs: list[tuple[str, list, str]]
    parity: dict[int, dict[str, float]]  # batch -> output -> max |onnxruntime - PyTorch|
    seconds: float

    def format(self) -> str:
        def rows(items):
            return "\n".join(f"  {name:<24} {dtype:<8} {shape}" for name, shape, dtype in items)

        lines = [f"wrote {self.path} (opset {self.opset}, {self.path.stat().st_size / 2**20:.1f} MiB, "
                 f"{self.seconds:.1f} s)", "inputs:", rows(self.inputs), "outputs:", rows(self.outputs),
                 "onnxruntime vs PyTorch, max |difference| per output:"]
        for batch, diffs in self.parity.items():
            lines.append(f"  batch {batch}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        return "\n".join(lines)


def _value_info(values) -> list[tuple[str, list, str]]:
    from onnx import TensorProto

    out = []
    for v in values:
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        out.append((v.name, dims, TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()))
    return out


def _run_torch(spec: ExportSpec, inputs) -> list[np.ndarray]:
    try:
        with torch.no_grad():
            out = spec.module(*inputs)
    except (RuntimeError, ValueError) as exc:  # e.g. too few encoder tokens for a two-stage DETR's proposals
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(spec.input_names, inputs))
        raise ExportError(f"{spec.description}: the model does not run on {shapes}: {exc}") from None
    out = out if isinstance(out, tuple) else (out,)
    return [o.detach().cpu().numpy() for o in out]


def check_parity(session, spec: ExportSpec, inputs, expected: Sequence[np.ndarray], tolerance: float
                 ) -> dict[str, float]:
    """Max ``|onnxruntime - PyTorch|`` per output on ``inputs`` (PyTorch gave ``expected``); raises
    :class:`ExportError` naming the first output of another shape or beyond ``tolerance``."""
    batch = len(inputs[0])
    # The exporter drops inputs whose values the graph never reads (a Caffe input used for its shape only).
    wanted = {i.name for i in session.get_inputs()}
    got = session.run(spec.output_names, {n: t.numpy() for n, t in zip(spec.input_names, inputs) if n in wanted})
    return max_differences(spec.output_names, got, expected, tolerance, batch, "onnxruntime", "PyTorch")


def max_differences(names: Sequence[str], got: Sequence[np.ndarray], expected: Sequence[np.ndarray],
                    tolerance: float, batch: int, got_label: str, expected_label: str) -> dict[str, float]:
    """``{name: max |got - expected|}`` (in float64; 0 for empty outputs).

    Raises:
        ExportError: the first output of another shape, or beyond ``tolerance`` (named, with the batch and the
            two sides' labels).
    """
    diffs = {}
    for name, g, e in zip(names, got, expected):
        if g.shape != e.shape:
            raise ExportError(f"output {name!r} at batch {batch}: {got_label} gives shape {g.shape}, "
                              f"{expected_label} {e.shape}")
        diff = float(np.max(np.abs(g.astype(np.float64) - e.astype(np.float64)))) if e.size else 0.0
        if not diff <= tolerance:
            raise ExportError(f"output {name!r} at batch {batch}: {got_label} differs from {expected_label} by "
                              f"{diff:.3g} (> {tolerance:g})")
        diffs[name] = diff
    return diffs


def export(spec: ExportSpec, out: Path, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False,
           tolerance: float = DEFAULT_TOLERANCE) -> ExportReport:
    """Trace ``spec`` to ``out``, check it with onnxruntime, then move it into place (see the module docstring).
    ``opset`` is raised to 18 for a model with a bicubic thumbnail (:func:`needed_opset`).

    Raises:
        ExportError: the trace fails, or onnxruntime does not reproduce PyTorch; ``out`` is left as it was.
    """
    import onnx
    import onnxruntime as ort

    start = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    opset = needed_opset(spec.module, opset)
    runs = {1: spec.make_inputs(1)}
    if dynamic_batch:
        runs[2] = spec.make_inputs(2)
    expected = {batch: _run_torch(spec, inputs) for batch, inputs in runs.items()}
    dynamic_axes: dict[str, dict[int, str]] = {}
    for name in spec.input_names if dynamic_batch else ():
        dynamic_axes[name] = {0: "batch"}
    for i, name in enumerate(spec.output_names):
        # An output has a batch axis when PyTorch's changes with the batch (priors and DetectionOutput rows do not).
        if dynamic_batch and expected[1][i].shape[:1] != expected[2][i].shape[:1]:
            dynamic_axes.setdefault(name, {})[0] = "batch"
        if name in spec.row_axes:
            dynamic_axes.setdefault(name, {})[spec.row_axes[name]] = f"{name}_rows"
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # The tracer's notes (constants folded from shapes, Python values) are expected here.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning)
            try:
                torch.onnx.export(spec.module, runs[1], tmp, dynamo=False, opset_version=opset,
                                  input_names=spec.input_names, output_names=spec.output_names,
                                  dynamic_axes=dynamic_axes or None, do_constant_folding=True)
            except Exception as exc:  # the exporter's own errors name the unsupported operation
                raise ExportError(f"the ONNX export failed: {type(exc).__name__}: {exc}") from None
        model = onnx.load(tmp)
        for value, array in zip(model.graph.output, expected[1]):
            # The tracer leaves some static sizes symbolic: state them, keeping the declared dynamic axes.
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if axis not in dynamic_axes.get(value.name, {}):
                    dim.dim_value = array.shape[axis]
        for key, value in spec.metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = f"legacy_det.{key}", value
        model.producer_name = "legacy-det"
        onnx.checker.check_model(model)
        onnx.save(model, tmp)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(tmp, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's message names the node
            raise ExportError(f"onnxruntime cannot load the exported graph: {exc}") from None
        parity = {batch: check_parity(session, spec, runs[batch], expected[batch], tolerance) for batch in runs}
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ExportReport(out, opset, _value_info(model.graph.input), _value_info(model.graph.output), parity,
                        time.perf_counter() - start)


# ----------------------------------------------------------------------------- int8
# What int8 quantization touches, by family: the SSD family's convolutions (and any matrix product); the DETR
# family's backbone convolutions only: its transformer's products feed the sampling offsets and reference points,
# where int8 error moves the sampled points (deformable_detr_tiny on shapes, VOC07 mAP: float 0.293, Conv only
# 0.292, Conv + MatMul + Gemm 0.287).
QUANTIZED_OPS = {"ssd": ("Conv", "MatMul", "Gemm"), "caffe": ("Conv", "MatMul", "Gemm"), "detr": ("Conv",)}


def quantize_int8(float_path: Path, out: Path, dataset_name: str, images: int = 64, data_root=None,
                  seed: int = 0, op_types: Optional[Sequence[str]] = None) -> Path:
    """Static int8 quantization of an exported file by onnxruntime, calibrated on ``images`` training images of
    ``dataset_name`` (drawn with ``seed``, preprocessed as the file's metadata says; min-max ranges).

    QDQ format, int8 weights per output channel, uint8 activations.  Only the network's operations of
    ``op_types`` (default :data:`QUANTIZED_OPS` of the file's family) are quantized: the post-processing in the
    graph (DetectionOutput's rows hold labels and image indices as floats; the top-k and NMS) stays float.
    Written beside ``out`` first, then moved into place.

    Raises:
        ExportError: onnxruntime's quantizer fails, or the dataset has fewer images than asked.
    """
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    from toolkit.data import build_dataset
    from toolkit.onnx_backend import OnnxRuntimeDetector, onnx_inference_setup

    detector = OnnxRuntimeDetector(float_path)
    if op_types is None:
        op_types = QUANTIZED_OPS[detector.family]
    setup = onnx_inference_setup(detector)
    dataset = build_dataset(dataset_name, "train", root=data_root, transform=setup.transform)
    if len(dataset) < images:
        raise ExportError(f"--calibration-images {images}: {dataset_name!r} has {len(dataset)} training images")
    chosen = np.random.default_rng(seed).permutation(len(dataset))[:images]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.order = iter(chosen.tolist())

        def get_next(self):
            index = next(self.order, None)
            return None if index is None else {detector.input_name: dataset[index][0][None].numpy()}

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="legacy-det-int8-") as folder:
        prepared = Path(folder) / "prepared.onnx"
        partial = Path(folder) / "int8.onnx"
        with warnings.catch_warnings():
            # Constant activations (a zero range) make the quantizer divide by zero scales: numpy warns, the scale
            # is then replaced by 1, the result stays exact for them.
            warnings.filterwarnings("ignore", category=RuntimeWarning)
            try:
                quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
                quantize_static(str(prepared), str(partial), Reader(), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=list(op_types))
            except Exception as exc:  # the quantizer's own message names the node
                raise ExportError(f"int8 quantization failed: {type(exc).__name__}: {exc}") from None
        import onnx

        model = onnx.load(str(partial))
        del model.metadata_props[:]
        model.metadata_props.extend(onnx.load(str(float_path)).metadata_props)
        entry = model.metadata_props.add()
        entry.key, entry.value = "legacy_det.quantized", json.dumps({"type": "int8", "dataset": dataset_name,
                                                                    "calibration_images": images})
        onnx.save(model, str(partial))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(partial), str(out))
    return out


# ----------------------------------------------------------------------------- command line
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m toolkit.export", add_help=add_help,
                                description="Export a detector to ONNX; onnxruntime must reproduce PyTorch first.")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a toolkit.train, converters.caffe convert or converters.detr convert checkpoint")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--model", help="a converted Caffe checkpoint: export it as this native preset (toolkit names "
                                   "and outputs) instead of as the Caffe net (its blob names)")
    p.add_argument("--with-postprocess", action="store_true",
                   help="put the post-processing in the graph: SSD family, Caffe's DetectionOutput rows; DETR, the "
                        "top-k (query, class) pairs")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--dynamic-batch", action="store_true", help="a free batch axis (checked at batch 1 and 2)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                   help="the input size (default: the preset's test size)")
    p.add_argument("--image", type=Path, help="the image of the onnxruntime check (default: a rendered shapes scene)")
    p.add_argument("--input", type=Path, metavar="NPZ",
                   help="a converted Caffe net: the check's inputs instead, one array per input blob (as python -m "
                        "converters.caffe run takes them)")
    p.add_argument("--outputs", nargs="+", metavar="BLOB",
                   help="a converted Caffe net: the blobs to export as outputs (default: the net's outputs and its "
                        "DetectionOutput's bottoms)")
    p.add_argument("--top-k", type=int, default=100, help="DETR with --with-postprocess: pairs kept (default 100)")
    p.add_argument("--quantize", choices=("int8",),
                   help="also write OUTPUT's .int8.onnx sibling: onnxruntime's static int8 quantization, calibrated "
                        "on --calibration-images training images of --dataset, and print both models' VOC07 mAP on "
                        "its test split")
    p.add_argument("--dataset", help="--quantize: the dataset to calibrate and evaluate on (default: the one the "
                                     "checkpoint was trained on)")
    p.add_argument("--data-root", type=Path, help="--quantize: data root (default $TOOLKIT_DATA or ./data)")
    p.add_argument("--calibration-images", type=int, default=64,
                   help="--quantize: training images to calibrate on (default 64)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"largest |onnxruntime - PyTorch| accepted on any output (default {DEFAULT_TOLERANCE:g})")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.opset < 16:
        print(f"error: --opset {args.opset}: 16 or later is needed (GridSample, TopK and NonMaxSuppression as used "
              "here)", file=sys.stderr)
        return 2
    try:
        spec = spec_for_checkpoint(args.checkpoint, args.model, args.with_postprocess, args.input_size, args.image,
                                   args.outputs, args.top_k, input_npz=args.input)
        print(f"exporting {spec.description} from {args.checkpoint}", flush=True)
        report = export(spec, args.output, args.opset, args.dynamic_batch, args.tolerance)
    except (FileNotFoundError, ValueError, KeyError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if not isinstance(exc, ExportError) else 1
    print(report.format())
    if args.quantize:
        return _quantize(args)
    return 0


def int8_path(float_path: Path) -> Path:
    """``model.onnx`` -> ``model.int8.onnx``."""
    return float_path.with_name(f"{float_path.stem}.int8{float_path.suffix or '.onnx'}")


def _quantize(args) -> int:
    from toolkit.onnx_backend import OnnxRuntimeDetector, evaluate_onnx

    dataset = args.dataset
    if dataset is None:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        dataset = ckpt.get("dataset") if isinstance(ckpt, dict) else None
        if not dataset:
            print("error: --quantize: give --dataset (the checkpoint does not say what it was trained on)",
                  file=sys.stderr)
            return 2
    out = int8_path(args.output)
    try:
        quantize_int8(args.output, out, dataset, args.calibration_images, args.data_root)
        print(f"wrote {out} (int8, calibrated on {args.calibration_images} {dataset} training images, "
              f"{out.stat().st_size / 2**20:.1f} MiB)")
        for label, path in (("float", args.output), ("int8", out)):
            result = evaluate_onnx(OnnxRuntimeDetector(path), dataset, args.data_root)
            print(f"  {label:<5} VOC07 mAP on the {dataset} test split: {result.mAP:.4f}", flush=True)
    except (ExportError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
