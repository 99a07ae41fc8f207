"""An inference-only copy of a :class:`~toolkit.caffe.net.CaffeNet`, rewritten to run fast on the CPU.

:class:`CaffeNet` interprets the prototxt literally: one module call per layer,
a fresh tensor per top, ``torch.cat`` for every ``Concat``.  For a deploy net
that is slow: in DSOD300 every one of the 92 convolutions is followed by a
BatchNorm and a Scale (three passes over the data where one would do) and each
dense layer concatenates the whole growing block again.  :func:`optimize_for_inference`
(or :meth:`OptimizedCaffeNet.from_net`) builds a plan that computes the same
blobs with less work:

* **Only what is asked for.**  The plan is built for a list of output blobs
  (default: the net's outputs) and keeps only the layers they depend on.
  ``Split`` and TEST-phase ``Dropout`` are dropped (identities).
* **BatchNorm + Scale folded.**  A BatchNorm with global statistics, a
  learned per-channel ``Scale`` and a learned ``Bias`` are each a per-channel
  affine ``a * x + b``; consecutive affines merge into one, and an affine
  right after a ``Convolution`` whose output feeds nothing else is folded
  into the convolution's weight and bias (``W' = a W``, ``b' = a b + b_bn``;
  DSOD's stem, bottleneck and head convolutions).  The folding is done in
  float64.  DSOD's *pre-activation* ``BN -> Scale -> ReLU -> Conv`` cannot be
  folded into the convolution (the ReLU is in between): it becomes one affine
  followed by an in-place ReLU.
* **ReLU fused** into the convolution or affine before it (oneDNN's
  post-op, or an in-place ``relu_`` on the fresh output).
* **Dense blocks without re-concatenation.**  A chain of ``Concat`` layers
  in which each one extends the previous one along channels (DenseNet /
  DSOD: ``concat_k = cat(concat_{k-1}, conv_k)``) writes into one buffer of the
  chain's final width: each concat copies only its new part into its slice,
  and its value is a view of the buffer's leading channels (the
  memory-efficient DenseNet trick).  Quadratic copying becomes linear.
* **channels_last** activations (oneDNN's native layout; head ``Permute``
  ``(0, 2, 3, 1)`` + ``Flatten`` then are views), and convolution weights
  reordered once for oneDNN (``mkldnn._convolution_pointwise`` with a
  pre-packed weight, as TorchInductor's CPU freezing does).  Where that op is
  unavailable (a build without oneDNN, another device, another dtype) each
  convolution falls back to ``F.conv2d``: same results, less speed.
* **Shape-only blobs computed once.**  ``PriorBox`` reads only the shapes
  of its bottoms; its tops (and data movement of them, e.g. the
  ``mbox_priorbox`` Concat) are cached per input shape.
* **DetectionOutput** (shared locations, ``eta = 1``) thresholds, sorts and
  cuts ``top_k`` for all classes at once, then runs torchvision's ``nms``
  per class; its rows equal :func:`toolkit.models.postprocess.detection_output`'s
  (same stable order, same keep rule, see :func:`fast_detection_output`).
  Other configurations use that function unchanged.
* **MAX pooling** as one ``max_pool2d(ceil_mode=True)`` where PyTorch's
  output size is Caffe's (no padded copy of the input).
* ``torch.inference_mode`` throughout.

Everything else runs the net's own layer modules.  The plan runs eagerly, step
by step: no ``torch.compile`` / ``torch.jit.freeze``.  In a profile of DSOD300
the oneDNN convolutions take about 80% of the time, near the CPU's peak, so a
compiler could only win on the remaining element-wise work, at the price of
minutes of compilation on a small machine.  The outputs are float32 in
Caffe's shapes, NCHW-contiguous, equal to :class:`CaffeNet`'s up to float
rounding (re-associated BatchNorm arithmetic: about 1e-6 relative).  They
are inference tensors: no autograd.

The plan is built for the net's layer structure, not for one input shape:
other spatial sizes or batch sizes run as far as the layers allow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from toolkit.caffe.errors import CaffeConversionError
from toolkit.caffe.layers import (
    Bias, BatchNorm, CaffeLayer, Concat, Convolution, DetectionOutput, Dropout, Flatten, Permute, Pooling, PriorBox,
    ReLU, Reshape, Scale, Split, caffe_pooled_size,
)
from toolkit.caffe.net import CaffeNet, call_layer
from toolkit.models.box_coder import decode_boxes
from toolkit.models.postprocess import DetectionOutputParams, detection_output, to_caffe_detection_blob
from toolkit.models.priors import split_caffe_priorbox_blob

logger = logging.getLogger(__name__)

__all__ = ["OptimizedCaffeNet", "fast_detection_output", "mkldnn_conv_available", "optimize_for_inference"]

# Layers that only move data: a tree of them over shape-only values is shape-only too.
_MOVEMENT = (Concat, Flatten, Reshape, Permute)


def mkldnn_conv_available() -> bool:
    """Whether oneDNN's fused convolution with a pre-packed weight can run here (CPU, float32)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


# ---------------------------------------------------------------------------
# DetectionOutput, vectorised over classes
# ---------------------------------------------------------------------------


def _ranked(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` first entries of each row of ``scores`` ``(R, P)`` in a *stable* descending sort
    (Caffe's ``std::stable_sort``: ties keep index order), ``(R, k)``.

    One ``topk`` over unique int64 keys instead of a stable sort of whole rows: the float32 bits mapped to
    an order-preserving integer, shifted left, with ``P - 1 - index`` in the low bits to break ties.
    """
    p = scores.shape[1]
    bits = (scores.float() + 0.0).contiguous().view(torch.int32).to(torch.int64)  # (+ 0.0: -0.0 ties with 0.0)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # IEEE order: negative floats reversed
    shift = max(1, (p - 1).bit_length())
    index = torch.arange(p, dtype=torch.int64)
    keys = (ordered << shift) | (p - 1 - index)
    return torch.topk(keys, k, dim=1, largest=True, sorted=True).indices


def fast_detection_output(loc: torch.Tensor, conf: torch.Tensor, priorbox: torch.Tensor,
                          params: DetectionOutputParams) -> torch.Tensor:
    """SSD-Caffe's ``DetectionOutput`` blob, the rows of :func:`~toolkit.models.postprocess.detection_output`.

    Args:
        loc: ``(N, P * 4)`` (shared locations), conf: ``(N, P * num_classes)``
            probabilities, priorbox: ``(1, 2, P * 4)`` (Caffe's blobs).
        params: the layer's parameters.
    Returns:
        ``(1, 1, R, 7)`` rows ``[image, label, score, xmin, ymin, xmax, ymax]``, as
        :func:`~toolkit.models.postprocess.to_caffe_detection_blob` lays them out.

    Per image the candidates of every class are taken in one stable descending
    sort of the ``(classes, P)`` score matrix (scores ``<= confidence_threshold``
    last), cut to ``top_k``, then each class's boxes go through torchvision's
    ``nms`` with strictly decreasing surrogate scores (Caffe's order, ties by
    prior index).  torchvision's keep rule is Caffe's (suppressed when
    IoU > threshold) only for boxes of non-negative size and without adaptive
    NMS: with ``eta < 1``, per-class locations, or an image with an inverted
    decoded box, the reference :func:`detection_output` runs instead.
    """
    n = conf.shape[0]
    priors, variances = split_caffe_priorbox_blob(priorbox)
    p, c = priors.shape[0], params.num_classes
    if not params.share_location or params.eta < 1.0:
        results = detection_output(loc.reshape(n, -1), conf.reshape(n, -1), priors, variances, params)
        return to_caffe_detection_blob(results)
    loc = loc.reshape(n, p, 4)
    conf = conf.reshape(n, p, c)
    decoded = decode_boxes(loc, priors, variances, params.code_type, params.variance_encoded_in_target)
    labels = torch.tensor([k for k in range(c) if k != params.background_label_id], dtype=torch.int64)
    threshold = params.confidence_threshold
    results = []
    for i in range(n):
        boxes_i = decoded[i]
        if not bool(((boxes_i[:, 2] >= boxes_i[:, 0]) & (boxes_i[:, 3] >= boxes_i[:, 1])).all()):
            results.extend(detection_output(loc[i:i + 1], conf[i:i + 1], priors, variances, params))
            continue
        scores = conf[i].t()[labels]  # (classes, P), ascending label
        if threshold is None:
            counts = [p] * len(labels)
        else:
            passed = scores > threshold
            counts = passed.sum(dim=1).tolist()
            # Failing scores (NaN included) rank after every passing one.
            scores = torch.where(passed, scores, torch.tensor(float("-inf"), dtype=scores.dtype))
        order = _ranked(scores, min(p, params.top_k) if params.top_k > -1 else p)
        kept_idx, kept_labels = [], []
        for row, (label, count) in enumerate(zip(labels.tolist(), counts)):
            if -1 < params.top_k < count:
                count = params.top_k
            if count == 0:
                continue
            idx = order[row, :count]
            surrogate = torch.arange(count, 0, -1, dtype=torch.float32)
            keep = torchvision.ops.nms(boxes_i[idx].float(), surrogate, params.nms_threshold)
            kept = idx[torch.sort(keep).values]
            kept_idx.append(kept)
            kept_labels.append(torch.full((len(kept),), label, dtype=torch.int64))
        if kept_idx:
            idx = torch.cat(kept_idx)
            lab = torch.cat(kept_labels)
            sc = conf[i, idx, lab]
            bx = boxes_i[idx]
        else:
            sc, bx, lab = torch.zeros(0), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
        if -1 < params.keep_top_k < len(sc):
            top = torch.sort(sc, descending=True, stable=True).indices[: params.keep_top_k]
            sel = torch.sort(top).values  # back to label order, score-descending within a label
            bx, sc, lab = bx[sel], sc[sel], lab[sel]
        results.append({"boxes": bx, "scores": sc, "labels": lab})
    return to_caffe_detection_blob(results)


# ---------------------------------------------------------------------------
# The plan: SSA nodes, rewritten by the passes below
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Node:
    """One operation of the plan on SSA values (integers; a Caffe blob written in place gets a new value)."""

    kind: str  # input | layer | conv | affine | relu | maxpool | concat | detection
    inputs: list[int]
    outputs: list[int]
    layers: list[str]  # the Caffe layers it stands for
    module: Optional[CaffeLayer] = None
    # conv: weight (O, I/g, kh, kw), bias (O,); affine: scale, shift (C,); float64 while folding
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    relu: bool = False
    ndim: int = 4
    extra: dict = field(default_factory=dict)


def _bn_affine(m: BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm with global statistics as ``(a, b)``: ``y = a x + b`` (batch_norm_layer.cpp's arithmetic)."""
    f = m.scale_factor.detach().double()[0]
    s = 0.0 if f == 0 else 1.0 / f
    mean, var = m.mean_sum.detach().double() * s, m.var_sum.detach().double() * s
    a = 1.0 / torch.sqrt(var + m.eps)
    return a, -mean * a


def _channel_vector(t: torch.Tensor, channels: int) -> Optional[torch.Tensor]:
    t = t.detach().double()
    if t.dim() == 0:
        return t.expand(channels).clone()
    return t if tuple(t.shape) == (channels,) else None


class _Planner:
    """Turns a CaffeNet into the list of nodes of an optimized plan (see the module docstring)."""

    def __init__(self, net: CaffeNet, outputs: Sequence[str]) -> None:
        self.net = net
        self.nodes: list[_Node] = []
        self.value_blob: list[str] = []  # value id -> Caffe blob name (for shapes and messages)
        self.counts: dict[str, int] = {}
        current: dict[str, int] = {}
        for spec in net.layer_specs:
            inputs = [current[b] for b in spec.bottoms]
            outs = []
            for t in spec.tops:
                outs.append(len(self.value_blob))
                self.value_blob.append(t)
                current[t] = outs[-1]
            kind = "input" if spec.type == "Input" else "layer"
            self.nodes.append(_Node(kind, inputs, outs, [spec.name], net.layer(spec.name)))
        unknown = [b for b in outputs if b not in current]
        if unknown:
            raise CaffeConversionError(f"net {net.name!r} has no blob(s) {unknown}")
        self.output_names = list(outputs)
        self.requested = [current[b] for b in outputs]
        self.input_values = {self.value_blob[v]: v for node in self.nodes if node.kind == "input" for v in node.outputs}

    # -- helpers ---------------------------------------------------------

    def shape(self, value: int) -> tuple[int, ...]:
        return self.net.blob_shapes[self.value_blob[value]]

    def _count(self, what: str, k: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + k

    def _consumers(self) -> dict[int, list[_Node]]:
        users: dict[int, list[_Node]] = {}
        for node in self.nodes:
            for v in node.inputs:
                users.setdefault(v, []).append(node)
        return users

    def _replace_value(self, old: int, new: int) -> None:
        for node in self.nodes:
            node.inputs = [new if v == old else v for v in node.inputs]
        self.requested = [new if v == old else v for v in self.requested]

    # -- passes ----------------------------------------------------------

    def prune(self) -> None:
        """Keep only the nodes the requested values depend on."""
        needed = set(self.requested)
        kept = []
        for node in reversed(self.nodes):
            if node.kind == "input" or needed.intersection(node.outputs):
                kept.append(node)
                needed.update(node.inputs)
        self._count("layers not needed for the outputs", len(self.nodes) - len(kept))
        self.nodes = kept[::-1]

    def drop_identities(self) -> None:
        """Split, Dropout (inference), one-bottom Concat: their tops are their bottom."""
        kept = []
        for node in self.nodes:
            m = node.module
            identity = node.kind == "layer" and (isinstance(m, (Split, Dropout)) or
                                                 (isinstance(m, Concat) and len(node.inputs) == 1))
            if identity:
                for v in node.outputs:
                    self._replace_value(v, node.inputs[0])
                self._count("identity layers dropped (Split, Dropout)")
            else:
                kept.append(node)
        self.nodes = kept

    def lower(self) -> None:
        """Layers with a faster form become conv / affine / relu / maxpool / concat / detection nodes."""
        for node in self.nodes:
            if node.kind != "layer":
                continue
            m = node.module
            shape = self.shape(node.inputs[0]) if node.inputs else ()
            if isinstance(m, Convolution) and len(shape) == 4:
                node.kind = "conv"
                node.weight = m.weight.detach().double()
                bias = getattr(m, "bias", None)
                node.bias = bias.detach().double() if bias is not None else None
                node.extra = {"stride": m.stride, "pad": m.pad, "dilation": m.dilation, "groups": m.groups}
            elif isinstance(m, BatchNorm) and m.use_global_stats and len(shape) >= 2:
                node.kind, node.ndim = "affine", len(shape)
                node.weight, node.bias = _bn_affine(m)
            elif isinstance(m, (Scale, Bias)) and len(node.inputs) == 1 and m.axis == 1 and len(shape) >= 2:
                channels = shape[1]
                if isinstance(m, Scale):
                    a = _channel_vector(m.weight, channels)
                    b = _channel_vector(m.bias, channels) if hasattr(m, "bias") else torch.zeros(channels,
                                                                                                  dtype=torch.float64)
                else:
                    a, b = torch.ones(channels, dtype=torch.float64), _channel_vector(m.bias, channels)
                if a is not None and b is not None:
                    node.kind, node.ndim, node.weight, node.bias = "affine", len(shape), a, b
            elif isinstance(m, ReLU) and m.negative_slope == 0:
                node.kind = "relu"
            elif isinstance(m, Pooling) and m.method == "MAX" and not m.global_pooling:
                node.kind = "maxpool"
            elif isinstance(m, Concat) and m.axis == 1 and len(shape) == 4:
                node.kind = "concat"
            elif isinstance(m, DetectionOutput):
                node.kind = "detection"

    def _fuse(self, first_kinds: tuple[str, ...], second_kind: str, merge, what: str) -> None:
        """Merge node B (``second_kind``) into node A (``first_kinds``) when B's only input is A's only output,
        read by B alone and not requested."""
        users = self._consumers()
        producer = {v: node for node in self.nodes for v in node.outputs}
        removed = set()
        for node in self.nodes:
            if node.kind != second_kind or len(node.inputs) != 1:
                continue
            v = node.inputs[0]
            first = producer.get(v)
            if first is None or first.kind not in first_kinds or id(first) in removed or len(first.outputs) != 1:
                continue
            if len(users.get(v, [])) != 1 or v in self.requested or not merge(first, node):
                continue
            first.outputs = node.outputs
            first.layers = first.layers + node.layers
            for out in node.outputs:
                producer[out] = first
            removed.add(id(node))
            self._count(what)
        self.nodes = [n for n in self.nodes if id(n) not in removed]

    @staticmethod
    def _merge_affines(a: _Node, b: _Node) -> bool:
        if a.relu:
            return False
        a.weight, a.bias = b.weight * a.weight, b.weight * a.bias + b.bias
        return True

    @staticmethod
    def _fold_into_conv(conv: _Node, affine: _Node) -> bool:
        if conv.relu or affine.ndim != 4:
            return False
        conv.weight = conv.weight * affine.weight.view(-1, 1, 1, 1)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(affine.bias)
        conv.bias = bias * affine.weight + affine.bias
        return True

    @staticmethod
    def _absorb_relu(node: _Node, relu: _Node) -> bool:
        if node.relu:
            return False
        node.relu = True
        return True

    def fuse(self) -> None:
        self._fuse(("affine",), "affine", self._merge_affines, "BatchNorm/Scale merged into one affine")
        self._fuse(("conv",), "affine", self._fold_into_conv, "affines folded into a Convolution")
        self._fuse(("conv", "affine"), "relu", self._absorb_relu, "ReLUs fused into the layer before")

    def mark_shape_only(self) -> None:
        """PriorBox tops, and data movement of nothing but those, depend only on shapes: cached per shape."""
        constant: set[int] = set()
        for node in self.nodes:
            m = node.module
            if node.kind == "layer" and isinstance(m, PriorBox):
                node.kind = "shape_only"
            elif node.kind in ("layer", "concat") and isinstance(m, _MOVEMENT) and node.inputs and \
                    all(v in constant for v in node.inputs):
                node.kind = "shape_only"
            if node.kind == "shape_only":
                constant.update(node.outputs)
                self._count("shape-only layers cached (PriorBox and its data movement)")

    def concat_chains(self) -> None:
        """Concat nodes that extend the previous concat of the same chain write into one shared buffer."""
        users = self._consumers()
        producer = {v: node for node in self.nodes for v in node.outputs}
        chain_of: dict[int, list[_Node]] = {}  # id(concat node) -> its chain
        for node in self.nodes:
            if node.kind != "concat":
                continue
            first = producer.get(node.inputs[0])
            extends = (first is not None and first.kind == "concat" and id(first) in chain_of and
                       sum(1 for u in users.get(node.inputs[0], []) if u.kind == "concat" and
                           u.inputs[0] == node.inputs[0]) == 1)
            if extends:
                chain = chain_of[id(first)]
                chain.append(node)
            else:
                chain = [node]
            chain_of[id(node)] = chain
        chains = {id(c[0]): c for c in chain_of.values() if len(c) > 1}
        for chain in chains.values():
            width = self.shape(chain[-1].outputs[0])[1]
            for k, node in enumerate(chain):
                node.kind = "concat_into"
                node.extra = {"width": width, "start": k == 0, "chain": id(chain[0])}
            self._count("Concats writing into a dense-block buffer", len(chain))


# ---------------------------------------------------------------------------
# Executable steps
# ---------------------------------------------------------------------------


class _Step(nn.Module):
    """One step of the plan: reads values ``inputs``, writes values ``outputs`` (slots of the value list)."""

    def __init__(self, node: _Node) -> None:
        super().__init__()
        self.inputs = tuple(node.inputs)
        self.outputs = tuple(node.outputs)
        self.layers = tuple(node.layers)
        self.release: tuple[int, ...] = ()  # values no later step reads (freed after this one)

    def describe(self) -> str:
        return "+".join(self.layers)

    def extra_repr(self) -> str:
        return self.describe()


class _LayerStep(_Step):
    """A layer module run as is."""

    def __init__(self, node: _Node) -> None:
        super().__init__(node)
        self.layer = node.module

    def forward(self, *xs):
        return self.layer(*xs)


class _ConvStep(_Step):
    """Convolution with folded BatchNorm/Scale and optional ReLU: oneDNN with a pre-packed weight, or F.conv2d."""

    def __init__(self, node: _Node, use_mkldnn: bool) -> None:
        super().__init__(node)
        self.register_buffer("weight", node.weight.float().contiguous())
        self.register_buffer("bias", node.bias.float() if node.bias is not None else None)
        self.stride, self.pad = list(node.extra["stride"]), list(node.extra["pad"])
        self.dilation, self.groups = list(node.extra["dilation"]), node.extra["groups"]
        self.relu = node.relu
        self.use_mkldnn = use_mkldnn
        # (input shape, weight version) -> the weight reordered for oneDNN; a cache, not state.
        self._packed: dict = {}

    def __getstate__(self):
        state = super().__getstate__()
        return {**state, "_packed": {}}  # oneDNN tensors do not copy or pickle: rebuilt on first use

    def _mkldnn(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), self.weight._version, self.weight.data_ptr())
        packed = self._packed.get(key)
        if packed is None:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(self.weight.to_mkldnn(), self.pad, self.stride,
                                                               self.dilation, self.groups, list(x.shape))
            self._packed = {key: packed}
        return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, self.pad, self.stride, self.dilation,
                                                       self.groups, "relu" if self.relu else "none", [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_mkldnn and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32 \
                and self.weight.is_cpu:
            try:
                return self._mkldnn(x)
            except RuntimeError as exc:  # e.g. a oneDNN without this primitive: the portable path below
                logger.debug("oneDNN convolution unavailable for %s (%s); using F.conv2d", self.describe(), exc)
                self.use_mkldnn = False
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.pad, self.dilation, self.groups)
        return y.relu_() if self.relu else y

    def extra_repr(self) -> str:
        return f"{self.describe()}: weight={tuple(self.weight.shape)}, relu={self.relu}"


class _AffineStep(_Step):
    """Per-channel ``a * x + b`` (merged BatchNorm / Scale / Bias), then an in-place ReLU if fused."""

    def __init__(self, node: _Node) -> None:
        super().__init__(node)
        view = (1, -1) + (1,) * (node.ndim - 2)
        self.register_buffer("scale", node.weight.float().reshape(view))
        self.register_buffer("shift", node.bias.float().reshape(view))
        self.relu = node.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addcmul(self.shift, x, self.scale)  # one pass; the output keeps x's memory format
        return y.relu_() if self.relu else y

    def extra_repr(self) -> str:
        return f"{self.describe()}: channels={self.scale.numel()}, relu={self.relu}"


class _ReLUStep(_Step):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class _MaxPoolStep(_Step):
    """Caffe MAX pooling as one ``max_pool2d(ceil_mode=True)`` where PyTorch's output size equals Caffe's
    (PyTorch also ignores the padding and clips the last window), else the layer's padded form."""

    def __init__(self, node: _Node) -> None:
        super().__init__(node)
        self.layer = node.module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layer
        (kh, kw), (sh, sw), (ph, pw) = m.kernel, m.stride, m.pad
        h, w = x.shape[-2:]
        clip = bool(ph or pw)
        caffe = (caffe_pooled_size(h, kh, sh, ph, clip), caffe_pooled_size(w, kw, sw, pw, clip))
        torch_size = tuple(_torch_pooled_size(s, k, st, p) for s, k, st, p in ((h, kh, sh, ph), (w, kw, sw, pw)))
        if caffe == torch_size and 2 * ph <= kh and 2 * pw <= kw:
            return F.max_pool2d(x, m.kernel, m.stride, m.pad, ceil_mode=True)
        return m(x)


def _torch_pooled_size(size: int, kernel: int, stride: int, pad: int) -> int:
    # ATen pooling_output_shape with ceil_mode: the last window must start inside the input or its left padding.
    out = -(-(size + 2 * pad - kernel) // stride) + 1
    if (out - 1) * stride >= size + pad:
        out -= 1
    return out


class _ConcatStep(_Step):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=1)


class _ConcatIntoStep(_Step):
    """A concat of a dense-block chain.  The chain's first concat allocates the buffer (the chain's final
    width) and copies all its bottoms in; each later one copies only its new bottoms after the previous
    concat's channels.  The top is the buffer's leading channels: a view, nothing moved.

    The buffer travels as an extra value (``buffer``) from step to step.
    """

    def __init__(self, node: _Node, buffer: int, width: int, start: bool, memory_format) -> None:
        super().__init__(node)
        self.buffer, self.width, self.start, self.memory_format = buffer, width, start, memory_format

    def forward(self, buf: Optional[torch.Tensor], *xs: torch.Tensor):
        if self.start:
            x = xs[0]
            buf = torch.empty((x.shape[0], self.width) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device,
                              memory_format=self.memory_format)
            offset, parts = 0, xs
        else:
            offset, parts = xs[0].shape[1], xs[1:]
        for x in parts:
            end = offset + x.shape[1]
            if end > self.width or x.shape[2:] != buf.shape[2:] or x.shape[0] != buf.shape[0]:
                raise CaffeConversionError(f"Concat: bottom of shape {tuple(x.shape)} does not fit the "
                                           f"dense-block buffer {tuple(buf.shape)} at channel {offset}")
            buf[:, offset:end].copy_(x)
            offset = end
        return buf[:, :offset], buf


class _ShapeOnlyStep(_Step):
    """A layer whose top depends only on the shapes of its bottoms: computed once per shape signature."""

    def __init__(self, node: _Node) -> None:
        super().__init__(node)
        self.layer = node.module
        self._cache: dict = {}

    def forward(self, *xs: torch.Tensor):
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in xs)
        if key not in self._cache:
            self._cache = {key: self.layer(*xs)}
        return self._cache[key]


class _DetectionStep(_Step):
    def __init__(self, node: _Node) -> None:
        super().__init__(node)
        self.layer = node.module

    def forward(self, loc, conf, priorbox, *unused):
        self.layer._check(loc, conf, priorbox)
        blob = fast_detection_output(loc.float().cpu(), conf.float().cpu(), priorbox.float().cpu(), self.layer.params)
        return blob.to(device=loc.device, dtype=loc.dtype)


# ---------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------


class OptimizedCaffeNet(nn.Module):
    """An inference-only plan of a :class:`CaffeNet` computing ``outputs`` (see the module docstring).

    Args:
        net: the net.  Convolution, BatchNorm, Scale and Bias weights are
            copied (folded); the other layers' modules are shared with ``net``.
        outputs: the blobs :meth:`forward` returns (default: ``net.outputs``,
            the blobs no layer consumes).  Only the layers they need are kept.
        channels_last: run 4-d activations in channels_last memory format.
        use_mkldnn: convolutions through oneDNN with pre-packed weights (None:
            where available); False: ``F.conv2d``.

    Attributes:
        output_names, input_names: as given / the net's inputs.
        summary: what the optimization did, ``{what: count}``.
        steps: the plan (``nn.ModuleList``), in execution order.
    """

    def __init__(self, net: CaffeNet, outputs: Optional[Sequence[str]] = None, *, channels_last: bool = True,
                 use_mkldnn: Optional[bool] = None) -> None:
        super().__init__()
        outputs = list(net.outputs if outputs is None else outputs)
        if not outputs:
            raise CaffeConversionError(f"net {net.name!r}: no outputs to compute")
        self.name = net.name
        self.channels_last = channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        use_mkldnn = mkldnn_conv_available() if use_mkldnn is None else bool(use_mkldnn and mkldnn_conv_available())
        plan = _Planner(net, outputs)
        plan.prune()
        plan.drop_identities()
        plan.lower()
        plan.fuse()
        plan.mark_shape_only()
        plan.concat_chains()
        self.output_names = tuple(outputs)
        self.input_names = tuple(net.input_names)
        self._output_values = tuple(plan.requested)
        self._input_values = {name: v for name, v in plan.input_values.items()}
        self.summary = dict(plan.counts)
        self.summary["layers in the net"] = len(net.layer_specs) - 1
        steps, buffers, n_values = [], {}, len(plan.value_blob)
        for node in plan.nodes:
            if node.kind == "input":
                continue
            if node.kind == "conv":
                step = _ConvStep(node, use_mkldnn)
            elif node.kind == "affine":
                step = _AffineStep(node)
            elif node.kind == "relu":
                step = _ReLUStep(node)
            elif node.kind == "maxpool":
                step = _MaxPoolStep(node)
            elif node.kind == "concat":
                step = _ConcatStep(node)
            elif node.kind == "concat_into":
                chain = node.extra["chain"]
                if node.extra["start"]:
                    buffers[chain] = n_values
                    n_values += 1
                step = _ConcatIntoStep(node, buffers[chain], node.extra["width"], node.extra["start"],
                                       self.memory_format)
                step.inputs = (buffers[chain],) + step.inputs
                step.outputs = step.outputs + (buffers[chain],)
            elif node.kind == "shape_only":
                step = _ShapeOnlyStep(node)
            elif node.kind == "detection":
                step = _DetectionStep(node)
            else:
                step = _LayerStep(node)
            steps.append(step)
        self.n_values = n_values
        last_use: dict[int, int] = {}
        for k, step in enumerate(steps):
            for v in step.inputs:
                last_use[v] = k
        keep = set(self._output_values)
        for k, step in enumerate(steps):
            step.release = tuple(v for v in set(step.inputs) if last_use[v] == k and v not in keep)
        self.steps = nn.ModuleList(steps)
        self.summary["steps in the plan"] = len(steps)
        read = {v for step in steps for v in step.inputs} | set(self._output_values)
        self._needed_inputs = tuple(name for name, v in self._input_values.items() if v in read)
        # Cached (shape-only) tops are handed out as copies, so that a caller cannot alter the cache.
        self._cached_values = frozenset(v for step in steps if isinstance(step, _ShapeOnlyStep) for v in step.outputs)
        self.eval()

    @classmethod
    def from_net(cls, net: CaffeNet, outputs: Optional[Sequence[str]] = None, **kwargs) -> "OptimizedCaffeNet":
        """Same as the constructor (and :func:`optimize_for_inference`)."""
        return cls(net, outputs, **kwargs)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the plan.

        Args:
            inputs: one tensor per input blob the outputs depend on, keyed by
                blob name; float, NCHW as Caffe holds them (any memory format).
        Returns:
            ``{blob: tensor}`` for :attr:`output_names`, in that order, in
            Caffe's shapes, contiguous (NCHW); inference tensors.
        Raises:
            CaffeConversionError: missing or unknown inputs, or a layer that
                cannot run on the given shapes.
        """
        unknown = [k for k in inputs if k not in self.input_names]
        missing = [k for k in self._needed_inputs if k not in inputs]
        if unknown or missing:
            raise CaffeConversionError(f"net {self.name!r} takes inputs {list(self.input_names)}; "
                                       f"missing {missing}, unknown {unknown}")
        with torch.inference_mode():
            values: list[Optional[torch.Tensor]] = [None] * self.n_values
            for name, v in self._input_values.items():
                if name in inputs:
                    x = torch.as_tensor(inputs[name])
                    values[v] = x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x
            for step in self.steps:
                tops = call_layer(step, [values[v] for v in step.inputs], f"layer(s) {step.describe()!r}")
                for v, t in zip(step.outputs, tops):
                    values[v] = t
                for v in step.release:
                    values[v] = None
            return {name: values[v].clone() if v in self._cached_values else values[v].contiguous()
                    for name, v in zip(self.output_names, self._output_values)}

    def extra_repr(self) -> str:
        return f"outputs={list(self.output_names)}, channels_last={self.channels_last}"


def optimize_for_inference(net: CaffeNet, outputs: Optional[Sequence[str]] = None, *, channels_last: bool = True,
                           use_mkldnn: Optional[bool] = None) -> OptimizedCaffeNet:
    """An :class:`OptimizedCaffeNet` of ``net`` computing ``outputs`` (default: the net's outputs).

    Example::

        net = load_caffe_net("deploy.prototxt", "weights.caffemodel")
        fast = optimize_for_inference(net, ["mbox_loc", "mbox_conf", "detection_out"])
        blobs = fast({"data": image_bchw})
    """
    if net.phase != "TEST" or net.training:
        raise CaffeConversionError(f"net {net.name!r}: only a TEST-phase net in eval() mode can be optimized "
                                   "for inference")
    return OptimizedCaffeNet(net, outputs, channels_last=channels_last, use_mkldnn=use_mkldnn)
