"""A Caffe net as a PyTorch module: the prototxt interpreted layer by layer.

:class:`CaffeNet` holds one :class:`~toolkit.caffe.layers.CaffeLayer` per
active layer and runs them in prototxt order over a dict of named blobs, the
way Caffe's ``Net::Forward`` does.  What it takes over from Caffe's ``Net``:

* **Upgrades** (``upgrade_proto.cpp``): legacy V1 ``layers { type: ENUM }``
  become modern layers (``param`` names, ``blobs_lr`` / ``weight_decay`` into
  ``ParamSpec``); the net-level ``input`` + ``input_shape`` / ``input_dim``
  fields become one ``Input`` layer named ``"input"``, first.
* **Phase rules**: ``include`` / ``exclude`` ``NetStateRule`` (phase, level,
  stages) filter the layers; TEST by default.
* **In-place layers** (top == bottom) overwrite the blob; the value reported
  for a name is the one after its last writer, as Caffe's blob holds it.
  Caffe's auto-inserted ``Split`` layers are not needed: blobs are never
  modified in place here.
* **Shared weights**: layers naming the same ``param { name }`` hold the same
  ``nn.Parameter``.
* **Weights** from a caffemodel, matched by layer name; legacy blobs
  (num/channels/height/width) are compared right-aligned as Caffe does.

Every problem with the inputs is a :class:`CaffeConversionError` raised at
construction, before anything runs: one error lists every unsupported layer,
every bottom never produced, every missing / extra / misshapen weight blob.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from google.protobuf import text_format
from torch import nn

from toolkit.caffe.errors import CaffeConversionError
from toolkit.caffe.layers import LAYER_TYPES, CaffeLayer, Input, build_layer, fill_
from toolkit.caffe import CaffeFormatError, CaffemodelLayers, blob_to_numpy, caffe_pb2, read_prototxt

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
Shape = tuple[int, ...]

CHECKPOINT_FORMAT = "legacy-det/caffe-net/1"

# V1LayerParameter.LayerType -> the modern type string (upgrade_proto.cpp's table).
V1_LAYER_TYPES = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL", "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution", "DATA": "Data",
    "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "MVN": "MVN",
    "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

_PHASES = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST}


# ---------------------------------------------------------------------------
# Upgrades and phase rules
# ---------------------------------------------------------------------------


def upgrade_v1_layer(v1: caffe_pb2.V1LayerParameter) -> caffe_pb2.LayerParameter:
    """A V1 layer in modern form: enum type -> string, ``param`` / ``blobs_lr`` / ``weight_decay``
    -> ``ParamSpec`` (name, lr_mult, decay_mult), every ``*_param`` message and the blobs copied."""
    layer = caffe_pb2.LayerParameter()
    layer.name = v1.name
    enum_name = caffe_pb2.V1LayerParameter.LayerType.Name(v1.type)
    if enum_name not in V1_LAYER_TYPES:
        raise CaffeConversionError(f"V1 layer {v1.name!r} has no type")
    layer.type = V1_LAYER_TYPES[enum_name]
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    layer.loss_weight.extend(v1.loss_weight)
    layer.blobs.extend(v1.blobs)
    n_params = max(len(v1.param), len(v1.blobs_lr), len(v1.weight_decay), len(v1.blob_share_mode))
    for i in range(n_params):
        spec = layer.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
        if i < len(v1.blob_share_mode):
            spec.share_mode = v1.blob_share_mode[i]
    modern_fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    for field, value in v1.ListFields():
        if field.name.endswith("_param") and field.name in modern_fields:
            getattr(layer, field.name).CopyFrom(value)
    return layer


def modern_layers(net: caffe_pb2.NetParameter) -> list[caffe_pb2.LayerParameter]:
    """The net's layers in modern form, with the net-level inputs as a leading ``Input`` layer.

    Raises:
        CaffeConversionError: the net mixes ``layer`` and V1 ``layers`` (Caffe
            refuses such files), or its input fields do not pair up.
    """
    if len(net.layer) and len(net.layers):
        raise CaffeConversionError(f"net {net.name!r} has both 'layer' and V1 'layers' entries; "
                                   "Caffe refuses such nets")
    layers = list(net.layer) if len(net.layer) else [upgrade_v1_layer(v1) for v1 in net.layers]
    if not len(net.input):
        return layers
    # upgrade_proto.cpp (UpgradeNetInput): one Input layer "input", first, one top per input.
    # Inputs without any shape (old snapshots) get no declared shape here instead of being dropped.
    n = len(net.input)
    if len(net.input_shape) and len(net.input_shape) != n:
        raise CaffeConversionError(f"net {net.name!r}: {n} inputs but {len(net.input_shape)} input_shape entries")
    if len(net.input_dim) and len(net.input_dim) != 4 * n:
        raise CaffeConversionError(f"net {net.name!r}: {n} inputs need {4 * n} input_dim values, "
                                   f"got {len(net.input_dim)}")
    layer = caffe_pb2.LayerParameter(name="input", type="Input", top=list(net.input))
    if len(net.input_shape):
        for shape in net.input_shape:
            layer.input_param.shape.add().CopyFrom(shape)
    elif len(net.input_dim):
        for i in range(n):
            layer.input_param.shape.add().dim.extend(net.input_dim[4 * i:4 * i + 4])
    return [layer] + layers


def _meets_rule(rule: caffe_pb2.NetStateRule, phase: int, level: int, stages: Sequence[str]) -> bool:
    # net.cpp StateMeetsRule: every condition the rule sets must hold.
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    return all(s in stages for s in rule.stage) and not any(s in stages for s in rule.not_stage)


def layer_included(layer: caffe_pb2.LayerParameter, phase: str = "TEST", level: int = 0,
                   stages: Sequence[str] = ()) -> bool:
    """Caffe's ``FilterNet`` for one layer: with ``include`` rules, kept if one is met; else kept
    unless an ``exclude`` rule is met."""
    if len(layer.include) and len(layer.exclude):
        raise CaffeConversionError(f"layer {layer.name!r} has both include and exclude rules; Caffe refuses this")
    p = _PHASES[phase]
    if len(layer.include):
        return any(_meets_rule(r, p, level, stages) for r in layer.include)
    return not any(_meets_rule(r, p, level, stages) for r in layer.exclude)


def parse_net_definition(text: str, where: str = "<definition>") -> caffe_pb2.NetParameter:
    """A prototxt given as text (e.g. :attr:`CaffeNet.definition` from a checkpoint)."""
    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as exc:
        raise CaffeConversionError(f"{where}: {exc}") from None
    return net


def _definition_text(net: caffe_pb2.NetParameter) -> str:
    if not any(len(layer.blobs) for layer in list(net.layer) + list(net.layers)):
        return text_format.MessageToString(net, as_utf8=True)
    stripped = caffe_pb2.NetParameter()
    stripped.CopyFrom(net)
    for layer in list(stripped.layer) + list(stripped.layers):
        layer.ClearField("blobs")
    return text_format.MessageToString(stripped, as_utf8=True)


# ---------------------------------------------------------------------------
# The net
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """One active layer: its Caffe name and type, bottoms and tops, and the attribute holding its module."""

    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    module_name: str


def _sanitize(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name) or "layer"


def _legacy_shape(blob: caffe_pb2.BlobProto) -> bool:
    return any(blob.HasField(f) for f in ("num", "channels", "height", "width"))


def call_layer(fn, args: Sequence[torch.Tensor], where: str) -> tuple[torch.Tensor, ...]:
    """``fn(*args)`` as a tuple of tops; errors name the layer(s) ``where`` describes.

    A :class:`CaffeConversionError` is raised again with ``where`` in front of its
    message; PyTorch's own ``RuntimeError`` / ``ValueError`` keep their type and get a
    note ``in Caffe <where>``.
    """
    try:
        tops = fn(*args)
    except CaffeConversionError as exc:
        raise CaffeConversionError(f"{where}: {exc}") from None
    except (RuntimeError, ValueError) as exc:
        exc.add_note(f"in Caffe {where}")
        raise
    return (tops,) if isinstance(tops, torch.Tensor) else tuple(tops)


class CaffeNet(nn.Module):
    """A Caffe net (prototxt + optional caffemodel) as one differentiable module.

    Args:
        net: the parsed prototxt (modern or V1).
        weights: a parsed caffemodel (modern or V1; a ``NetParameter`` or a
            :class:`toolkit.caffe.CaffemodelLayers`), or None to initialise every
            blob from the prototxt's fillers.  Not kept: only its blobs are copied.
        phase: ``"TEST"`` (default) or ``"TRAIN"``: selects layers by their
            include / exclude rules and BatchNorm's default statistics; the
            module starts in ``train()`` mode for TRAIN, ``eval()`` for TEST.
        level, stages: the rest of Caffe's ``NetState`` (default: the net's ``state``).
        input_shapes: shapes of input blobs (tops of ``Input`` layers or
            net-level inputs), overriding or supplying the declared ones.  Layer
            parameters are sized from them (as Caffe's set-up does); later
            inputs may differ where the layers allow (e.g. other H, W).
        strict: a caffemodel layer with blobs that is not in the net is an
            error; with ``strict=False`` it is ignored as Caffe does, and listed
            in :attr:`ignored_weights`.

    Attributes:
        definition: the prototxt as text (without blobs), for checkpoints.
        layer_specs: the active layers in order (:class:`LayerSpec`).
        caffe_names: module attribute name -> Caffe layer name (and
            ``module_names`` the inverse).
        input_names, input_shapes: the input blobs and their shapes.
        blob_shapes: every blob's shape as inferred at construction
            (DetectionOutput's row count is data-dependent: 1 here).
        outputs: blobs no layer consumes (Caffe's net outputs).
        loss_weights: top blob -> loss weight (loss layers default to 1).
        shared_params: ``(layer, blob index)`` -> ``(owner layer, blob index)``.
        param_multipliers: state-dict key -> ``(lr_mult, decay_mult)``; a blob
            with ``lr_mult: 0`` is a Parameter with ``requires_grad=False``.
        ignored_weights: caffemodel layers left unused (``strict=False``).

    Raises:
        CaffeConversionError: see the module docstring.
    """

    def __init__(
        self,
        net: caffe_pb2.NetParameter,
        weights: Optional[caffe_pb2.NetParameter] = None,
        *,
        phase: str = "TEST",
        level: Optional[int] = None,
        stages: Optional[Sequence[str]] = None,
        input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
        strict: bool = True,
        _init_blobs: bool = True,
    ) -> None:
        super().__init__()
        phase = str(phase).upper()
        if phase not in _PHASES:
            raise CaffeConversionError(f"phase must be TRAIN or TEST, got {phase!r}")
        self.phase = phase
        self.level = int(net.state.level if level is None else level)
        self.stages = tuple(net.state.stage if stages is None else stages)
        self.definition = _definition_text(net)
        self.name = net.name
        self.ignored_weights: tuple[str, ...] = ()
        self.shared_params: dict[tuple[str, int], tuple[str, int]] = {}
        self.param_multipliers: dict[str, tuple[float, float]] = {}
        self.caffe_names: dict[str, str] = {}
        self.module_names: dict[str, str] = {}
        # Set before any module is registered, so that no layer name can take these attributes.
        self.layer_specs: tuple[LayerSpec, ...] = ()
        self.blob_shapes: dict[str, Shape] = {}
        self.input_shapes: dict[str, Shape] = {}
        self.input_names: tuple[str, ...] = ()
        self.outputs: tuple[str, ...] = ()
        self.loss_weights: dict[str, float] = {}

        layers = [layer for layer in modern_layers(net) if layer_included(layer, phase, self.level, self.stages)]
        self._check_structure(layers)
        specs, blob_shapes, input_shapes_out = self._build(layers, dict(input_shapes or {}))
        self.layer_specs = tuple(specs)
        self.blob_shapes = blob_shapes
        self.input_shapes = input_shapes_out
        self.input_names = tuple(input_shapes_out)
        self.outputs = self._net_outputs()
        self.loss_weights = self._loss_weights(layers)
        owned = self._share_params(layers)
        if weights is not None:
            loaded = self._load_weights(weights, owned, strict)
        else:
            loaded = set()
        if _init_blobs:
            for spec in self.layer_specs:
                module = getattr(self, spec.module_name)
                for i, (attr, filler) in enumerate(zip(module.blob_names, module.blob_fillers)):
                    if (spec.name, i) in owned and spec.name not in loaded:
                        fill_(getattr(module, attr), filler)
        self.train(phase == "TRAIN")

    # -- construction ------------------------------------------------------

    def _check_structure(self, layers: list[caffe_pb2.LayerParameter]) -> None:
        problems = []
        unsupported = [f"{layer.name!r} ({layer.type})" for layer in layers if layer.type not in LAYER_TYPES]
        if unsupported:
            hint = ""
            if any(layer.type.endswith("Data") for layer in layers if layer.type not in LAYER_TYPES):
                hint = " (data layers are not run: use a deploy net with Input layers)"
            problems.append(f"unsupported layer types: {', '.join(unsupported)}{hint}")
        duplicates = sorted(n for n, k in Counter(layer.name for layer in layers).items() if k > 1)
        if duplicates:
            problems.append(f"duplicate layer names (weights are matched by name): {duplicates}")
        producer: dict[str, str] = {}
        for layer in layers:
            for b in layer.bottom:
                if b not in producer:
                    problems.append(f"layer {layer.name!r} ({layer.type}): bottom {b!r} is never produced "
                                    "by an earlier layer or input")
            for j, t in enumerate(layer.top):
                in_place = j < len(layer.bottom) and layer.bottom[j] == t
                if t in producer and not in_place:
                    problems.append(f"layer {layer.name!r} ({layer.type}): top {t!r} is already produced by "
                                    f"layer {producer[t]!r} (only in-place layers may reuse a blob name)")
                producer[t] = layer.name
        if problems:
            raise CaffeConversionError(f"net {self.name!r} cannot be interpreted:\n  " + "\n  ".join(problems))

    def _register(self, caffe_name: str, module: nn.Module) -> str:
        base = _sanitize(caffe_name)
        name, k = base, 0
        while name in self._modules or hasattr(self, name):
            k += 1
            name = f"{base}_{k}"
        self.add_module(name, module)
        self.caffe_names[name] = caffe_name
        self.module_names[caffe_name] = name
        return name

    def _build(self, layers, overrides: dict[str, Sequence[int]]):
        """Build every module on the meta device, propagating shapes as Caffe's set-up does,
        then allocate the blobs (uninitialised) on the CPU."""
        input_tops = [t for layer in layers if layer.type == "Input" for t in layer.top]
        unknown = sorted(set(overrides) - set(input_tops))
        if unknown:
            raise CaffeConversionError(f"input_shapes names {unknown}, which are not inputs of the net "
                                       f"(inputs: {input_tops})")
        values: dict[str, torch.Tensor] = {}
        specs: list[LayerSpec] = []
        inputs: dict[str, Shape] = {}
        with torch.device("meta"), torch.no_grad():
            for layer in layers:
                where = f"layer {layer.name!r} ({layer.type})"
                bottoms = [values[b] for b in layer.bottom]
                module = build_layer(layer, [tuple(b.shape) for b in bottoms], self.phase)
                module.eval()
                if isinstance(module, Input):
                    tops = []
                    for top, declared in zip(layer.top, module.shapes):
                        shape = overrides.get(top, declared)
                        if shape is None:
                            raise CaffeConversionError(f"{where}: input {top!r} has no declared shape; "
                                                       "give it in input_shapes")
                        inputs[top] = tuple(int(d) for d in shape)
                        tops.append(torch.empty(inputs[top]))
                else:
                    try:
                        tops = module.meta_forward(*bottoms)
                    except CaffeConversionError as exc:
                        raise CaffeConversionError(f"{where}: {exc}") from None
                    except (RuntimeError, ValueError, IndexError) as exc:
                        shapes = [tuple(b.shape) for b in bottoms]
                        raise CaffeConversionError(f"{where}: does not run on bottoms of shapes {shapes}: {exc}") \
                            from None
                tops = (tops,) if isinstance(tops, torch.Tensor) else tuple(tops)
                if len(tops) != len(layer.top):
                    raise CaffeConversionError(f"{where}: gives {len(tops)} tops, the prototxt names {len(layer.top)}")
                for name, value in zip(layer.top, tops):
                    values[name] = value
                module_name = self._register(layer.name, module)
                specs.append(LayerSpec(layer.name, layer.type, tuple(layer.bottom), tuple(layer.top), module_name))
        self.to_empty(device="cpu")
        return specs, {k: tuple(v.shape) for k, v in values.items()}, inputs

    def _net_outputs(self) -> tuple[str, ...]:
        available: dict[str, None] = {}
        for spec in self.layer_specs:
            for b in spec.bottoms:
                available.pop(b, None)
            for t in spec.tops:
                available[t] = None
        return tuple(available)

    @staticmethod
    def _loss_weights(layers) -> dict[str, float]:
        weights = {}
        for layer in layers:
            given = list(layer.loss_weight)
            if not given and layer.type.endswith("Loss") and len(layer.top):
                given = [1.0]  # Caffe: a loss layer's first top has loss weight 1 by default
            for top, w in zip(layer.top, given):
                if w:
                    weights[top] = float(w)
        return weights

    def _share_params(self, layers) -> set[tuple[str, int]]:
        """Tie blobs named alike in ``param { name }``; set requires_grad from lr_mult.
        Returns the ``(layer, blob index)`` pairs that own their blob."""
        owners: dict[str, tuple[str, int, torch.Tensor]] = {}
        owned: set[tuple[str, int]] = set()
        problems = []
        for layer, spec in zip(layers, self.layer_specs):
            module: CaffeLayer = getattr(self, spec.module_name)
            if len(layer.param) > len(module.blob_names) and module.blob_names:
                problems.append(f"layer {layer.name!r}: {len(layer.param)} param entries for "
                                f"{len(module.blob_names)} blobs")
            for i, attr in enumerate(module.blob_names):
                param = layer.param[i] if i < len(layer.param) else caffe_pb2.ParamSpec()
                tensor = getattr(module, attr)
                key = param.name
                if key and key in owners:
                    owner_layer, owner_index, owner = owners[key]
                    permissive = param.share_mode == caffe_pb2.ParamSpec.PERMISSIVE
                    if tuple(owner.shape) != tuple(tensor.shape):
                        kind = "PERMISSIVE sharing of differently shaped blobs is not supported" if permissive and \
                            owner.numel() == tensor.numel() else "shapes differ"
                        problems.append(f"layer {layer.name!r} blob {i} ({tuple(tensor.shape)}) shares param "
                                        f"{key!r} with layer {owner_layer!r} blob {owner_index} "
                                        f"({tuple(owner.shape)}): {kind}")
                        continue
                    setattr(module, attr, owner)
                    self.shared_params[(layer.name, i)] = (owner_layer, owner_index)
                    continue
                if key:
                    owners[key] = (layer.name, i, tensor)
                owned.add((layer.name, i))
                if isinstance(tensor, nn.Parameter):
                    tensor.requires_grad_(param.lr_mult != 0)
                    self.param_multipliers[f"{spec.module_name}.{attr}"] = (float(param.lr_mult),
                                                                             float(param.decay_mult))
        if problems:
            raise CaffeConversionError(f"net {self.name!r}: bad weight sharing:\n  " + "\n  ".join(problems))
        return owned

    def _load_weights(self, weights: "caffe_pb2.NetParameter | CaffemodelLayers", owned: set[tuple[str, int]], strict: bool) -> set[str]:
        """Copy the caffemodel's blobs, matched by layer name; returns the layers loaded."""
        if isinstance(weights, CaffemodelLayers):
            sources = weights  # decoded one layer at a time (CaffemodelLayers checked the structure)
        else:
            if len(weights.layer) and len(weights.layers):
                raise CaffeConversionError(f"caffemodel {weights.name!r} has both 'layer' and V1 'layers' entries; "
                                           "Caffe refuses such files")
            sources = weights.layer if len(weights.layer) else weights.layers
        specs = {s.name: s for s in self.layer_specs}
        seen: set[str] = set()
        loaded: set[str] = set()
        extra, mismatched = [], []
        for source in sources:
            name = source.name
            if name in seen:
                mismatched.append(f"{name!r}: appears twice in the caffemodel")
                continue
            seen.add(name)
            spec = specs.get(name)
            if spec is None:
                if len(source.blobs):
                    extra.append(name)
                continue
            module: CaffeLayer = getattr(self, spec.module_name)
            targets = module.blobs()
            if len(source.blobs) != len(targets):
                if len(source.blobs) or any((name, i) in owned for i in range(len(targets))):
                    mismatched.append(f"{name!r}: {len(source.blobs)} blobs in the caffemodel, "
                                      f"the net's {spec.type} has {len(targets)}")
                continue
            problems = []
            arrays = []
            for i, (blob, target) in enumerate(zip(source.blobs, targets)):
                try:
                    array = blob_to_numpy(blob, layer=name, index=i)
                except CaffeFormatError as exc:
                    problems.append(str(exc))
                    continue
                expected = tuple(target.shape)
                if _legacy_shape(blob):
                    # Legacy 4-d blobs are compared right-aligned (blob.cpp ShapeEquals).
                    ok = len(expected) <= 4 and (1,) * (4 - len(expected)) + expected == array.shape
                    stored = f"{array.shape} (legacy num/channels/height/width)"
                else:
                    ok = array.shape == expected
                    stored = str(array.shape)
                if not ok:
                    problems.append(f"{name!r} blob {i}: caffemodel shape {stored}, the net's {spec.type} "
                                    f"needs {expected}")
                arrays.append(array)
            if problems:
                mismatched.extend(problems)
                continue
            with torch.no_grad():
                for array, target in zip(arrays, targets):
                    target.copy_(torch.from_numpy(array.reshape(tuple(target.shape))))
            loaded.add(name)
        missing = sorted({s.name for s in self.layer_specs
                          for i in range(len(getattr(self, s.module_name).blob_names))
                          if (s.name, i) in owned and s.name not in seen})
        problems = []
        if missing:
            problems.append(f"missing in the caffemodel: {missing}")
        if extra and strict:
            problems.append(f"in the caffemodel with blobs but not in the net: {extra} "
                            "(Caffe ignores these; strict=False does the same)")
        if mismatched:
            problems.append("blobs that do not fit:\n    " + "\n    ".join(mismatched))
        if problems:
            raise CaffeConversionError(f"weights do not fit net {self.name!r} ({self.phase}):\n  "
                                       + "\n  ".join(problems))
        if extra:
            logger.info("caffemodel layers not in the net, ignored: %s", extra)
        self.ignored_weights = tuple(extra)
        return loaded

    # -- running -----------------------------------------------------------

    def layer(self, caffe_name: str) -> CaffeLayer:
        """The module of the Caffe layer ``caffe_name``."""
        if caffe_name not in self.module_names:
            raise CaffeConversionError(f"net {self.name!r} has no active layer {caffe_name!r}")
        return getattr(self, self.module_names[caffe_name])

    def _plan(self, blobs: Optional[Sequence[str]]) -> tuple[list[LayerSpec], set[str]]:
        """The layers to run for ``blobs`` (all when None) and the blobs they read or give."""
        if blobs is None:
            return list(self.layer_specs), set(self.blob_shapes)
        unknown = [b for b in blobs if b not in self.blob_shapes]
        if unknown:
            raise CaffeConversionError(f"net {self.name!r} has no blob(s) {unknown}")
        needed = set(blobs)
        plan = []
        for spec in reversed(self.layer_specs):
            if needed.intersection(spec.tops):
                plan.append(spec)
                needed.update(spec.bottoms)
        return plan[::-1], needed

    def forward(self, inputs: Mapping[str, torch.Tensor],
                blobs: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
        """Run the net.

        Args:
            inputs: one tensor per input blob (:attr:`input_names`), keyed by
                blob name; float, NCHW as Caffe holds them (image inputs BGR).
            blobs: the blobs wanted; only the layers they depend on run.  None:
                every blob.
        Returns:
            ``{blob name: tensor}``: every top of every layer run (inputs
            included) in Caffe's shapes, each blob's value after its last
            writer (in-place layers), or just ``blobs`` in the order asked.
        Raises:
            CaffeConversionError: missing or unknown inputs, unknown blob names,
                or a layer that cannot run on the given shapes.
        """
        plan, needed = self._plan(blobs)
        needed_inputs = [t for spec in plan if spec.type == "Input" for t in spec.tops if t in needed]
        unknown = [k for k in inputs if k not in self.input_names]
        missing = [k for k in needed_inputs if k not in inputs]
        if unknown or missing:
            raise CaffeConversionError(f"net {self.name!r} takes inputs {list(self.input_names)}; "
                                       f"missing {missing}, unknown {unknown}")
        values: dict[str, torch.Tensor] = {}
        for spec in plan:
            module = getattr(self, spec.module_name)
            if spec.type == "Input":
                for t in spec.tops:
                    if t in inputs:
                        values[t] = torch.as_tensor(inputs[t])
                continue
            tops = call_layer(module, [values[b] for b in spec.bottoms], f"layer {spec.name!r} ({spec.type})")
            for t, v in zip(spec.tops, tops):
                values[t] = v
        return values if blobs is None else {b: values[b] for b in blobs}

    # -- checkpoints -------------------------------------------------------

    def checkpoint(self) -> dict:
        """Everything needed to rebuild this net: the prototxt text, the net state, the input shapes
        and ``state_dict()``; plain types and tensors, so ``torch.load(weights_only=True)`` reads it."""
        return {
            "format": CHECKPOINT_FORMAT,
            "prototxt": self.definition,
            "phase": self.phase,
            "level": self.level,
            "stages": list(self.stages),
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "state_dict": self.state_dict(),
        }

    @classmethod
    def from_definition(
        cls,
        text: str,
        state_dict: Optional[Mapping[str, torch.Tensor]] = None,
        *,
        phase: str = "TEST",
        level: Optional[int] = None,
        stages: Optional[Sequence[str]] = None,
        input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    ) -> "CaffeNet":
        """Rebuild from prototxt text (:attr:`definition`) and a ``state_dict()`` of the same net
        (None: blobs from the fillers)."""
        net = parse_net_definition(text)
        model = cls(net, phase=phase, level=level, stages=stages, input_shapes=input_shapes,
                    _init_blobs=state_dict is None)
        if state_dict is not None:
            try:
                model.load_state_dict(state_dict, strict=True)
            except RuntimeError as exc:
                raise CaffeConversionError(f"the state dict does not fit net {model.name!r}: {exc}") from None
        return model

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping) -> "CaffeNet":
        """Rebuild from :meth:`checkpoint`'s dict (e.g. after ``torch.load(path, weights_only=True)``)."""
        if not isinstance(checkpoint, Mapping) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            found = checkpoint.get("format") if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
            raise CaffeConversionError(f"not a CaffeNet checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
        return cls.from_definition(checkpoint["prototxt"], checkpoint["state_dict"], phase=checkpoint["phase"],
                                   level=checkpoint["level"], stages=checkpoint["stages"],
                                   input_shapes=checkpoint["input_shapes"])


def load_caffe_net(
    prototxt: PathLike,
    caffemodel: Optional[PathLike] = None,
    phase: str = "TEST",
    *,
    strict: bool = True,
    input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    level: Optional[int] = None,
    stages: Optional[Sequence[str]] = None,
) -> CaffeNet:
    """Read a prototxt (and caffemodel) into a :class:`CaffeNet`; see its arguments.

    The caffemodel is read through :class:`toolkit.caffe.CaffemodelLayers`: memory-mapped
    and decoded one layer at a time, so the peak is the net's own tensors plus one layer
    (not the whole decoded file beside them).

    Raises:
        CaffeConversionError: unreadable or malformed files (the message names
            the file) and every problem :class:`CaffeNet` reports.
    """
    try:
        net = read_prototxt(prototxt)
    except CaffeFormatError as exc:
        raise CaffeConversionError(f"cannot read the net definition: {exc}") from exc
    weights = None
    if caffemodel is not None:
        try:
            weights = CaffemodelLayers(caffemodel)
        except CaffeFormatError as exc:
            raise CaffeConversionError(f"cannot read the weights: {exc}") from exc
    files = f"{prototxt}" + (f" + {caffemodel}" if caffemodel is not None else "")
    try:
        return CaffeNet(net, weights, phase=phase, level=level, stages=stages, input_shapes=input_shapes,
                        strict=strict)
    except CaffeConversionError as exc:
        raise CaffeConversionError(f"{files}: {exc}") from None
    except CaffeFormatError as exc:  # a layer of the caffemodel that does not decode
        raise CaffeConversionError(f"cannot read the weights: {exc}") from None
    finally:
        del weights
