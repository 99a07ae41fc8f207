"""One ``nn.Module`` per Caffe layer type, with the semantics of the SSD fork of Caffe.

Every module here is a :class:`CaffeLayer`:

* ``forward(*bottoms)`` takes the layer's bottom blobs in prototxt order and
  returns its top blob (one tensor) or tops (a tuple), float NCHW exactly as
  Caffe holds them (``(N, C, H, W)`` images, ``(N, K)`` flat blobs, PriorBox's
  ``(1, 2, P * 4)``, DetectionOutput's ``(1, 1, R, 7)``);
* ``blob_names`` lists, in Caffe's blob order, the attributes holding the
  layer's stored blobs (``layer.blobs[i]`` of a caffemodel), each a tensor of
  **Caffe's blob shape**: learnable ones are ``nn.Parameter``, BatchNorm's
  statistics are buffers;
* ``blob_fillers`` are the prototxt's fillers for those blobs (Caffe's
  per-layer defaults where the prototxt gives none); ``reset_blobs()``
  applies them.

``build_layer(layer, bottom_shapes, phase)`` builds the module of one
``caffe_pb2.LayerParameter`` (modern form; :mod:`toolkit.caffe.net`
upgrades V1 layers first) given the shapes of its bottoms, as Caffe's
``LayerSetUp`` does.  ``LAYER_TYPES`` maps each supported Caffe type name to
its class.

All operations are differentiable PyTorch ops (gradients reach the bottoms and
the parameters), except PriorBox (no input values are read) and
DetectionOutput (a post-processing step, run without gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from toolkit.caffe.errors import CaffeConversionError
from toolkit.models.multibox_loss import MultiBoxLoss as _MultiBoxLossFn
from toolkit.models.multibox_loss import MultiBoxLossParams, targets_from_caffe_labels
from toolkit.models.postprocess import DetectionOutputParams, detection_output, to_caffe_detection_blob
from toolkit.models.priors import PriorBoxSpec, caffe_priorbox_blob, prior_boxes, split_caffe_priorbox_blob

Shape = tuple[int, ...]


# ---------------------------------------------------------------------------
# Fillers (used only for blobs that no caffemodel provides)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Filler:
    """A ``caffe_pb2.FillerParameter``: how Caffe initialises a blob that no caffemodel provides."""

    type: str = "constant"
    value: float = 0.0
    min: float = 0.0
    max: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    variance_norm: str = "FAN_IN"

    @classmethod
    def from_caffe(cls, param) -> "Filler":
        norm = param.DESCRIPTOR.fields_by_name["variance_norm"].enum_type.values_by_number[param.variance_norm].name
        return cls(param.type, float(param.value), float(param.min), float(param.max), float(param.mean),
                   float(param.std), norm)


def _filler(layer, param_name: str, field: str, default: Filler) -> Filler:
    param = getattr(layer, param_name)
    return Filler.from_caffe(getattr(param, field)) if param.HasField(field) else default


def _fans(shape: Shape) -> tuple[float, float]:
    # Caffe's fillers: fan_in = count / shape[0], fan_out = count / shape[1].
    count = math.prod(shape)
    fan_in = count / shape[0] if shape else 1.0
    fan_out = count / shape[1] if len(shape) > 1 else float(count)
    return fan_in, fan_out


def fill_(tensor: torch.Tensor, filler: Filler, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Fill ``tensor`` in place as Caffe's filler of that type would (same distribution, not the same numbers).

    Supported: ``constant``, ``uniform``, ``gaussian``, ``xavier``, ``msra``,
    ``bilinear`` (the upsampling kernel of FCN-style Deconvolution) and
    ``positive_unitball``.
    """
    shape = tuple(tensor.shape)
    kind = filler.type
    with torch.no_grad():
        if kind == "constant":
            return tensor.fill_(filler.value)
        if kind == "uniform":
            return tensor.uniform_(filler.min, filler.max, generator=generator)
        if kind == "gaussian":
            return tensor.normal_(filler.mean, filler.std, generator=generator)
        if kind in ("xavier", "msra"):
            fan_in, fan_out = _fans(shape)
            n = {"FAN_IN": fan_in, "FAN_OUT": fan_out, "AVERAGE": (fan_in + fan_out) / 2}[filler.variance_norm]
            if kind == "xavier":  # U(-sqrt(3/n), sqrt(3/n))
                bound = math.sqrt(3.0 / n)
                return tensor.uniform_(-bound, bound, generator=generator)
            return tensor.normal_(0.0, math.sqrt(2.0 / n), generator=generator)  # msra: N(0, 2/n)
        if kind == "bilinear":
            if len(shape) != 4 or shape[2] != shape[3]:
                raise CaffeConversionError(f"bilinear filler needs a 4-d blob with square kernels, got {shape}")
            k = shape[3]
            f = math.ceil(k / 2.0)
            c = (2 * f - 1 - f % 2) / (2.0 * f)
            ramp = 1 - np.abs(np.arange(k) / f - c)
            kernel = torch.from_numpy(np.outer(ramp, ramp).astype(np.float32))
            return tensor.copy_(kernel.expand(shape))
        if kind == "positive_unitball":
            tensor.uniform_(0.0, 1.0, generator=generator)
            flat = tensor.view(shape[0] if shape else 1, -1)
            return flat.div_(flat.sum(dim=1, keepdim=True)).view(shape)
    raise CaffeConversionError(f"unknown filler type {kind!r}")


# ---------------------------------------------------------------------------
# Base class and helpers
# ---------------------------------------------------------------------------


class CaffeLayer(nn.Module):
    """Base of every layer module: stored blobs in Caffe order, their fillers, shape inference."""

    caffe_type = ""

    def __init__(self) -> None:
        super().__init__()
        self.blob_names: tuple[str, ...] = ()
        self.blob_fillers: tuple[Filler, ...] = ()

    def _add_blob(self, name: str, shape: Shape, filler: Filler, learnable: bool = True) -> None:
        tensor = torch.empty(shape)
        if learnable:
            self.register_parameter(name, nn.Parameter(tensor))
        else:
            self.register_buffer(name, tensor)
        self.blob_names += (name,)
        self.blob_fillers += (filler,)

    def blobs(self) -> list[torch.Tensor]:
        """The stored blobs, in Caffe's order and shapes."""
        return [getattr(self, n) for n in self.blob_names]

    def reset_blobs(self, generator: Optional[torch.Generator] = None) -> None:
        """Initialise every stored blob with its filler (meta tensors are left alone)."""
        for name, filler in zip(self.blob_names, self.blob_fillers):
            tensor = getattr(self, name)
            if not tensor.is_meta:
                fill_(tensor, filler, generator)

    def meta_forward(self, *bottoms: torch.Tensor):
        """The forward pass on meta tensors (shapes only), used to infer top shapes at construction."""
        return self(*bottoms)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={tuple(getattr(self, n).shape)}" for n in self.blob_names)


def _fail(layer, message: str) -> CaffeConversionError:
    return CaffeConversionError(f"layer {layer.name!r} ({layer.type}): {message}")


def _canonical_axis(axis: int, ndim: int, what: str = "axis") -> int:
    """Caffe's ``CanonicalAxisIndex``: ``-ndim <= axis < ndim``, negative counted from the end."""
    if not -ndim <= axis < ndim:
        raise CaffeConversionError(f"{what} {axis} is out of range for a blob with {ndim} axes")
    return axis % ndim


def _enum_name(message, field: str) -> str:
    return message.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[getattr(message, field)].name


def _expect_bottoms(layer, bottom_shapes: Sequence[Shape], counts: Sequence[int]) -> None:
    if len(bottom_shapes) not in counts:
        wanted = " or ".join(str(c) for c in counts)
        raise _fail(layer, f"takes {wanted} bottom(s), got {len(bottom_shapes)}")


def _expect_tops(layer, counts: Sequence[int]) -> None:
    if len(layer.top) not in counts:
        wanted = " or ".join(str(c) for c in counts)
        raise _fail(layer, f"gives {wanted} top(s), got {len(layer.top)}")


def _expect_ndim(layer, shape: Shape, ndims: Sequence[int], what: str = "bottom 0") -> None:
    if len(shape) not in ndims:
        wanted = f"at least {ndims.start}" if isinstance(ndims, range) else " or ".join(map(str, ndims))
        raise _fail(layer, f"{what} must have {wanted} axes, got shape {shape}")


def _broadcast_view(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """``t`` (the axes ``[axis, axis + t.dim())`` of a blob of ``ndim`` axes) shaped to broadcast against it."""
    return t.reshape((1,) * axis + tuple(t.shape) + (1,) * (ndim - axis - t.dim()))


# ---------------------------------------------------------------------------
# Data movement
# ---------------------------------------------------------------------------


class Input(CaffeLayer):
    """Caffe ``Input``: its tops are the net's inputs (passed through unchanged).

    ``shapes`` are the declared ``input_param`` shapes (None where undeclared).
    """

    caffe_type = "Input"

    def __init__(self, shapes: Sequence[Optional[Shape]]) -> None:
        super().__init__()
        self.shapes = tuple(shapes)

    def forward(self, *inputs: torch.Tensor):
        return inputs[0] if len(inputs) == 1 else tuple(inputs)

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (0,))
        shapes = [tuple(int(d) for d in s.dim) for s in layer.input_param.shape]
        tops = len(layer.top)
        if len(shapes) not in (0, 1, tops):
            raise _fail(layer, f"{len(shapes)} shapes for {tops} tops (give one, or one per top)")
        if len(shapes) == 1:
            shapes = shapes * tops
        return cls(shapes or [None] * tops)


class Split(CaffeLayer):
    """Caffe ``Split``: the bottom, once per top."""

    caffe_type = "Split"

    def __init__(self, num_tops: int) -> None:
        super().__init__()
        self.num_tops = num_tops

    def forward(self, x: torch.Tensor):
        return x if self.num_tops == 1 else (x,) * self.num_tops

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        return cls(len(layer.top))


class Concat(CaffeLayer):
    """Caffe ``Concat`` along ``axis`` (the deprecated ``concat_dim``, a non-negative axis, wins when set)."""

    caffe_type = "Concat"

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return xs[0] if len(xs) == 1 else torch.cat(xs, dim=self.axis)

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_tops(layer, (1,))
        if not bottom_shapes:
            raise _fail(layer, "needs at least one bottom")
        p = layer.concat_param
        ndim = len(bottom_shapes[0])
        # concat_layer.cpp: has_concat_dim() -> that axis; otherwise CanonicalAxisIndex(axis).
        axis = int(p.concat_dim) if p.HasField("concat_dim") else int(p.axis)
        try:
            axis = _canonical_axis(axis, ndim)
        except CaffeConversionError as exc:
            raise _fail(layer, str(exc)) from None
        for i, s in enumerate(bottom_shapes[1:], start=1):
            if len(s) != ndim or any(a != b for k, (a, b) in enumerate(zip(s, bottom_shapes[0])) if k != axis):
                raise _fail(layer, f"bottom {i} shape {s} does not fit bottom 0 shape {bottom_shapes[0]} "
                                   f"outside axis {axis}")
        return cls(axis)


class Slice(CaffeLayer):
    """Caffe ``Slice``: cut ``axis`` at ``slice_points``, or into ``num_tops`` equal parts when none are given."""

    caffe_type = "Slice"

    def __init__(self, axis: int, slice_points: Sequence[int], num_tops: int) -> None:
        super().__init__()
        self.axis = axis
        self.slice_points = tuple(slice_points)
        self.num_tops = num_tops

    def _sizes(self, dim: int) -> list[int]:
        if self.slice_points:
            bounds = (0,) + self.slice_points + (dim,)
            return [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        if dim % self.num_tops:
            raise CaffeConversionError(f"Slice: axis {self.axis} of size {dim} does not split into "
                                       f"{self.num_tops} equal parts")
        return [dim // self.num_tops] * self.num_tops

    def forward(self, x: torch.Tensor):
        parts = torch.split(x, self._sizes(x.shape[self.axis]), dim=self.axis)
        return parts[0] if self.num_tops == 1 else tuple(parts)

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        p = layer.slice_param
        axis = int(p.slice_dim) if p.HasField("slice_dim") else int(p.axis)  # slice_dim: the deprecated spelling
        try:
            axis = _canonical_axis(axis, len(bottom_shapes[0]))
        except CaffeConversionError as exc:
            raise _fail(layer, str(exc)) from None
        points = [int(v) for v in p.slice_point]
        tops = len(layer.top)
        dim = bottom_shapes[0][axis]
        if points:
            if len(points) != tops - 1:
                raise _fail(layer, f"{len(points)} slice points for {tops} tops (need {tops - 1})")
            if any(b <= a for a, b in zip([0] + points, points + [dim])):
                raise _fail(layer, f"slice points {points} must increase strictly inside axis {axis} of size {dim}")
        elif dim % tops:
            raise _fail(layer, f"axis {axis} of size {dim} does not split into {tops} equal parts")
        return cls(axis, points, tops)


class Crop(CaffeLayer):
    """Caffe ``Crop``: bottom 0 cut to bottom 1's shape on axes ``axis..``, starting at ``offsets``."""

    caffe_type = "Crop"

    def __init__(self, axis: int, offsets: Sequence[int]) -> None:
        super().__init__()
        self.axis = axis
        self.offsets = tuple(offsets)  # one per cropped axis

    def forward(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        index = [slice(None)] * self.axis
        for k, off in enumerate(self.offsets):
            size = reference.shape[self.axis + k]
            if off + size > x.shape[self.axis + k]:
                raise CaffeConversionError(f"Crop: offset {off} + size {size} exceeds axis {self.axis + k} "
                                           f"of size {x.shape[self.axis + k]}")
            index.append(slice(off, off + size))
        return x[tuple(index)]

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (2,))
        x, ref = bottom_shapes
        if len(x) != len(ref):
            raise _fail(layer, f"bottoms have {len(x)} and {len(ref)} axes")
        try:
            axis = _canonical_axis(int(layer.crop_param.axis), len(x))
        except CaffeConversionError as exc:
            raise _fail(layer, str(exc)) from None
        given = [int(v) for v in layer.crop_param.offset]
        n = len(x) - axis
        # crop_layer.cpp: no offset -> 0, one offset -> every cropped axis, else one per cropped axis.
        if len(given) not in (0, 1, n):
            raise _fail(layer, f"{len(given)} offsets for {n} cropped axes")
        offsets = given * n if len(given) == 1 else (given or [0] * n)
        for k, off in enumerate(offsets):
            if off + ref[axis + k] > x[axis + k]:
                raise _fail(layer, f"offset {off} + size {ref[axis + k]} exceeds axis {axis + k} of bottom 0 {x}")
        return cls(axis, offsets)


class Flatten(CaffeLayer):
    """Caffe ``Flatten``: axes ``axis..end_axis`` (inclusive) merged into one."""

    caffe_type = "Flatten"

    def __init__(self, axis: int = 1, end_axis: int = -1) -> None:
        super().__init__()
        self.axis, self.end_axis = axis, end_axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = _canonical_axis(self.axis, x.dim())
        end = _canonical_axis(self.end_axis, x.dim())
        return torch.flatten(x, start, end)

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        p = layer.flatten_param  # V1 nets have no flatten_param: axis 1 .. end
        return cls(int(p.axis), int(p.end_axis))


class Reshape(CaffeLayer):
    """Caffe ``Reshape``: axes ``[axis, axis + num_axes)`` replaced by ``dims``.

    In ``dims`` a ``0`` copies the input dimension at the same position of the
    replaced range and ``-1`` (at most one) is inferred; ``num_axes=-1`` means
    "to the end", ``num_axes=0`` inserts axes.
    """

    caffe_type = "Reshape"

    def __init__(self, dims: Sequence[int], axis: int = 0, num_axes: int = -1) -> None:
        super().__init__()
        self.dims, self.axis, self.num_axes = tuple(dims), axis, num_axes

    def output_shape(self, shape: Shape) -> Shape:
        ndim = len(shape)
        # reshape_layer.cpp: a negative axis counts from ndim + 1 (so -1 appends).
        start = self.axis if self.axis >= 0 else ndim + self.axis + 1
        if not 0 <= start <= ndim:
            raise CaffeConversionError(f"Reshape: axis {self.axis} out of range for {ndim} axes")
        end = ndim if self.num_axes == -1 else start + self.num_axes
        if end > ndim:
            raise CaffeConversionError(f"Reshape: axis {self.axis} + num_axes {self.num_axes} exceeds {ndim} axes")
        middle = []
        for i, d in enumerate(self.dims):
            if d == 0:
                if start + i >= ndim:
                    raise CaffeConversionError(f"Reshape: dim {i} is 0 but the input has no axis {start + i}")
                middle.append(shape[start + i])
            else:
                middle.append(d)
        out = list(shape[:start]) + middle + list(shape[end:])
        if -1 in out:
            known = math.prod(d for d in out if d != -1)
            total = math.prod(shape)
            if known == 0 or total % known:
                raise CaffeConversionError(f"Reshape: cannot infer -1 of {self.dims} for input shape {shape}")
            out[out.index(-1)] = total // known
        if math.prod(out) != math.prod(shape):
            raise CaffeConversionError(f"Reshape: {shape} ({math.prod(shape)} values) cannot become {tuple(out)}")
        return tuple(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.output_shape(tuple(x.shape)))

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        p = layer.reshape_param
        dims = [int(d) for d in p.shape.dim]
        if dims.count(-1) > 1:
            raise _fail(layer, f"at most one dim can be -1, got {dims}")
        if any(d < -1 for d in dims):
            raise _fail(layer, f"dims must be >= -1, got {dims}")
        if p.num_axes < -1:
            raise _fail(layer, f"num_axes must be >= -1, got {p.num_axes}")
        return cls(dims, int(p.axis), int(p.num_axes))


class Permute(CaffeLayer):
    """SSD ``Permute``: axes reordered by ``order``; axes not named are appended in increasing order."""

    caffe_type = "Permute"

    def __init__(self, order: Sequence[int]) -> None:
        super().__init__()
        self.order = tuple(order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = list(self.order) + [a for a in range(x.dim()) if a not in self.order]
        return x.permute(full)

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        ndim = len(bottom_shapes[0])
        order = [int(v) for v in layer.permute_param.order]
        if len(set(order)) != len(order) or any(o >= ndim for o in order):
            raise _fail(layer, f"order {order} must name distinct axes below {ndim}")
        return cls(order)


class Dropout(CaffeLayer):
    """Caffe ``Dropout``: the identity in evaluation mode (Caffe's TEST phase, no rescaling);
    in training mode zeroes with probability ``ratio`` and scales by ``1 / (1 - ratio)``, as Caffe's TRAIN."""

    caffe_type = "Dropout"

    def __init__(self, ratio: float = 0.5) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.ratio, training=True) if self.training else x

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        return cls(float(layer.dropout_param.dropout_ratio))


# ---------------------------------------------------------------------------
# Element-wise
# ---------------------------------------------------------------------------


class ReLU(CaffeLayer):
    """Caffe ``ReLU``: ``max(x, 0) + negative_slope * min(x, 0)``."""

    caffe_type = "ReLU"

    def __init__(self, negative_slope: float = 0.0) -> None:
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, self.negative_slope) if self.negative_slope else F.relu(x)

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        return cls(float(layer.relu_param.negative_slope))


class PReLU(CaffeLayer):
    """Caffe ``PReLU``: ``max(x, 0) + a * min(x, 0)`` with a learned slope per channel (axis 1),
    or one slope (blob of shape ``()``) with ``channel_shared``."""

    caffe_type = "PReLU"

    def __init__(self, channels: int, channel_shared: bool = False, filler: Filler = Filler(value=0.25)) -> None:
        super().__init__()
        self._add_blob("weight", () if channel_shared else (channels,), filler)
        self.reset_blobs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slope = self.weight if self.weight.dim() == 0 else _broadcast_view(self.weight, 1, x.dim())
        return torch.where(x > 0, x, x * slope)

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        _expect_ndim(layer, bottom_shapes[0], range(2, 33))
        p = layer.prelu_param
        # prelu_layer.cpp: the default filler is constant 0.25.
        return cls(bottom_shapes[0][1], bool(p.channel_shared), _filler(layer, "prelu_param", "filler",
                                                                         Filler(value=0.25)))


class Sigmoid(CaffeLayer):
    """Caffe ``Sigmoid``: ``1 / (1 + exp(-x))``."""

    caffe_type = "Sigmoid"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        return cls()


class TanH(CaffeLayer):
    """Caffe ``TanH``."""

    caffe_type = "TanH"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        return cls()


class Power(CaffeLayer):
    """Caffe ``Power``: ``(shift + scale * x) ** power``."""

    caffe_type = "Power"

    def __init__(self, power: float = 1.0, scale: float = 1.0, shift: float = 0.0) -> None:
        super().__init__()
        self.power, self.scale, self.shift = power, scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.scale if self.scale != 1 else x
        if self.shift:
            y = y + self.shift
        return y if self.power == 1 else torch.pow(y, self.power)

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        p = layer.power_param
        return cls(float(p.power), float(p.scale), float(p.shift))


class Eltwise(CaffeLayer):
    """Caffe ``Eltwise``: ``SUM`` (weighted by ``coeff``, one per bottom, default 1), ``PROD`` or ``MAX``."""

    caffe_type = "Eltwise"

    def __init__(self, operation: str = "SUM", coeffs: Sequence[float] = ()) -> None:
        super().__init__()
        self.operation, self.coeffs = operation, tuple(coeffs)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.operation == "PROD":
            out = xs[0]
            for x in xs[1:]:
                out = out * x
            return out
        if self.operation == "MAX":
            out = xs[0]
            for x in xs[1:]:
                out = torch.maximum(out, x)
            return out
        coeffs = self.coeffs or (1.0,) * len(xs)
        # eltwise_layer.cpp: top = sum_i coeff_i * bottom_i, accumulated in bottom order.
        out = xs[0] if coeffs[0] == 1 else coeffs[0] * xs[0]
        for c, x in zip(coeffs[1:], xs[1:]):
            out = out + (x if c == 1 else c * x)
        return out

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_tops(layer, (1,))
        if len(bottom_shapes) < 2:
            raise _fail(layer, f"needs at least 2 bottoms, got {len(bottom_shapes)}")
        if any(s != bottom_shapes[0] for s in bottom_shapes[1:]):
            raise _fail(layer, f"bottoms must have equal shapes, got {list(bottom_shapes)}")
        p = layer.eltwise_param
        op = _enum_name(p, "operation")
        coeffs = [float(c) for c in p.coeff]
        if coeffs and op != "SUM":
            raise _fail(layer, "coeff applies to SUM only")
        if coeffs and len(coeffs) != len(bottom_shapes):
            raise _fail(layer, f"{len(coeffs)} coeffs for {len(bottom_shapes)} bottoms")
        return cls(op, coeffs)


# ---------------------------------------------------------------------------
# Layers with weights
# ---------------------------------------------------------------------------


def _conv_geometry(layer) -> tuple[Shape, Shape, Shape, Shape]:
    """``(kernel, stride, pad, dilation)`` as (h, w) pairs from a ConvolutionParameter (2-d only)."""
    p = layer.convolution_param

    def pair(repeated, h_field: str, w_field: str, default: int, what: str) -> Shape:
        if p.HasField(h_field) or p.HasField(w_field):
            if not (p.HasField(h_field) and p.HasField(w_field)):
                raise _fail(layer, f"give both {h_field} and {w_field}")
            if len(repeated):
                raise _fail(layer, f"give either {what} or {h_field}/{w_field}, not both")
            return int(getattr(p, h_field)), int(getattr(p, w_field))
        values = [int(v) for v in repeated]
        if not values:
            return default, default
        if len(values) == 1:
            return values[0], values[0]
        if len(values) == 2:
            return values[0], values[1]
        raise _fail(layer, f"{len(values)} values of {what}: only 2-d convolution is supported")

    if not len(p.kernel_size) and not p.HasField("kernel_h"):
        raise _fail(layer, "kernel_size (or kernel_h and kernel_w) is required")
    kernel = pair(p.kernel_size, "kernel_h", "kernel_w", 0, "kernel_size")
    stride = pair(p.stride, "stride_h", "stride_w", 1, "stride")
    pad = pair(p.pad, "pad_h", "pad_w", 0, "pad")
    dilation = [int(v) for v in p.dilation]
    if len(dilation) > 2:
        raise _fail(layer, f"{len(dilation)} values of dilation: only 2-d convolution is supported")
    dil = (1, 1) if not dilation else (dilation[0], dilation[-1])
    if min(kernel) <= 0 or min(stride) <= 0 or min(dil) <= 0:
        raise _fail(layer, f"kernel {kernel}, stride {stride} and dilation {dil} must be positive")
    if p.axis != 1:
        raise _fail(layer, f"axis {p.axis}: only channel axis 1 is supported")
    return kernel, stride, pad, dil


def _conv_common(layer, bottom_shapes):
    _expect_bottoms(layer, bottom_shapes, (1,))
    _expect_tops(layer, (1,))
    _expect_ndim(layer, bottom_shapes[0], (4,))
    p = layer.convolution_param
    if not p.num_output:
        raise _fail(layer, "num_output is required")
    groups = int(p.group)
    c_in, c_out = bottom_shapes[0][1], int(p.num_output)
    if groups < 1 or c_in % groups or c_out % groups:
        raise _fail(layer, f"group {groups} must divide the input channels {c_in} and num_output {c_out}")
    weight_filler = _filler(layer, "convolution_param", "weight_filler", Filler())
    bias_filler = _filler(layer, "convolution_param", "bias_filler", Filler())
    return c_in, c_out, groups, bool(p.bias_term), weight_filler, bias_filler


class Convolution(CaffeLayer):
    """Caffe ``Convolution`` (2-d): ``weight`` ``(C_out, C_in / group, kh, kw)``, ``bias`` ``(C_out,)``.

    Output ``(in + 2 * pad - dilation * (k - 1) - 1) // stride + 1`` per spatial axis.
    """

    caffe_type = "Convolution"

    def __init__(self, in_channels: int, out_channels: int, kernel: Shape, stride: Shape = (1, 1),
                 pad: Shape = (0, 0), dilation: Shape = (1, 1), groups: int = 1, bias: bool = True,
                 weight_filler: Filler = Filler(), bias_filler: Filler = Filler()) -> None:
        super().__init__()
        self.stride, self.pad, self.dilation, self.groups = tuple(stride), tuple(pad), tuple(dilation), groups
        self._add_blob("weight", (out_channels, in_channels // groups) + tuple(kernel), weight_filler)
        if bias:
            self._add_blob("bias", (out_channels,), bias_filler)
        self.reset_blobs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, getattr(self, "bias", None), self.stride, self.pad, self.dilation,
                        self.groups)

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        c_in, c_out, groups, bias, wf, bf = _conv_common(layer, bottom_shapes)
        kernel, stride, pad, dil = _conv_geometry(layer)
        return cls(c_in, c_out, kernel, stride, pad, dil, groups, bias, wf, bf)


class Deconvolution(CaffeLayer):
    """Caffe ``Deconvolution`` (2-d): ``weight`` ``(C_in, C_out / group, kh, kw)`` (PyTorch's transposed layout),
    ``bias`` ``(C_out,)``; output ``stride * (in - 1) + dilation * (k - 1) + 1 - 2 * pad`` per spatial axis."""

    caffe_type = "Deconvolution"

    def __init__(self, in_channels: int, out_channels: int, kernel: Shape, stride: Shape = (1, 1),
                 pad: Shape = (0, 0), dilation: Shape = (1, 1), groups: int = 1, bias: bool = True,
                 weight_filler: Filler = Filler(), bias_filler: Filler = Filler()) -> None:
        super().__init__()
        self.stride, self.pad, self.dilation, self.groups = tuple(stride), tuple(pad), tuple(dilation), groups
        self._add_blob("weight", (in_channels, out_channels // groups) + tuple(kernel), weight_filler)
        if bias:
            self._add_blob("bias", (out_channels,), bias_filler)
        self.reset_blobs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.weight, getattr(self, "bias", None), self.stride, self.pad, 0,
                                  self.groups, self.dilation)

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        c_in, c_out, groups, bias, wf, bf = _conv_common(layer, bottom_shapes)
        kernel, stride, pad, dil = _conv_geometry(layer)
        return cls(c_in, c_out, kernel, stride, pad, dil, groups, bias, wf, bf)


class InnerProduct(CaffeLayer):
    """Caffe ``InnerProduct``: axes ``axis..`` flattened to ``K``, then ``x @ W.T + b``.

    ``weight`` ``(N_out, K)``, or ``(K, N_out)`` with ``transpose``; ``bias`` ``(N_out,)``.
    Output ``shape[:axis] + (N_out,)``.
    """

    caffe_type = "InnerProduct"

    def __init__(self, in_features: int, out_features: int, axis: int = 1, bias: bool = True,
                 transpose: bool = False, weight_filler: Filler = Filler(), bias_filler: Filler = Filler()) -> None:
        super().__init__()
        self.axis, self.transpose = axis, transpose
        shape = (in_features, out_features) if transpose else (out_features, in_features)
        self._add_blob("weight", shape, weight_filler)
        if bias:
            self._add_blob("bias", (out_features,), bias_filler)
        self.reset_blobs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = _canonical_axis(self.axis, x.dim())
        flat = x.reshape(tuple(x.shape[:axis]) + (-1,))
        weight = self.weight.t() if self.transpose else self.weight
        return F.linear(flat, weight, getattr(self, "bias", None))

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        _expect_tops(layer, (1,))
        p = layer.inner_product_param
        if not p.num_output:
            raise _fail(layer, "num_output is required")
        try:
            axis = _canonical_axis(int(p.axis), len(bottom_shapes[0]))
        except CaffeConversionError as exc:
            raise _fail(layer, str(exc)) from None
        k = math.prod(bottom_shapes[0][axis:])
        return cls(k, int(p.num_output), axis, bool(p.bias_term), bool(p.transpose),
                   _filler(layer, "inner_product_param", "weight_filler", Filler()),
                   _filler(layer, "inner_product_param", "bias_filler", Filler()))


class BatchNorm(CaffeLayer):
    """Caffe ``BatchNorm`` (no affine part; Caffe pairs it with ``Scale``).

    Blobs (buffers, Caffe trains them with ``lr_mult: 0``): ``mean_sum`` ``(C,)``,
    ``var_sum`` ``(C,)``, ``scale_factor`` ``(1,)``: running sums and their
    moving-average factor ``f``.  With ``use_global_stats``
    (``batch_norm_layer.cpp``): ``s = 0 if f == 0 else 1 / f``, ``mean = mean_sum * s``,
    ``var = var_sum * s``; otherwise the batch mean and biased batch variance
    over every axis but 1.  ``y = (x - mean) / sqrt(var + eps)``.

    Batch statistics in training mode also update the sums as Caffe does
    (``f = f * maf + 1``, ``mean_sum = mean + maf * mean_sum``,
    ``var_sum = m / (m - 1) * var + maf * var_sum``, ``m`` values per channel).
    """

    caffe_type = "BatchNorm"

    def __init__(self, channels: int, use_global_stats: bool = True, eps: float = 1e-5,
                 moving_average_fraction: float = 0.999) -> None:
        super().__init__()
        self.use_global_stats, self.eps, self.moving_average_fraction = use_global_stats, eps, moving_average_fraction
        for name, shape in (("mean_sum", (channels,)), ("var_sum", (channels,)), ("scale_factor", (1,))):
            self._add_blob(name, shape, Filler(), learnable=False)  # batch_norm_layer.cpp: blobs start at 0
        self.reset_blobs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = [a for a in range(x.dim()) if a != 1]
        view = (1, -1) + (1,) * (x.dim() - 2) if x.dim() > 1 else (-1,)
        if self.use_global_stats:
            f = self.scale_factor[0]
            s = torch.where(f == 0, torch.zeros_like(f), 1 / f)
            mean, var = self.mean_sum * s, self.var_sum * s
            centred = x - mean.view(view)
        else:
            mean = x.mean(dim=axes) if axes else x
            centred = x - mean.view(view)
            var = centred.square().mean(dim=axes) if axes else torch.zeros_like(x)
            if self.training:
                channels = x.shape[1] if x.dim() > 1 else 1
                self._update_sums(mean.detach(), var.detach(), x.numel() // channels)
        return centred / torch.sqrt(var + self.eps).view(view)

    @torch.no_grad()
    def _update_sums(self, mean: torch.Tensor, var: torch.Tensor, m: int) -> None:
        maf = self.moving_average_fraction
        self.scale_factor.mul_(maf).add_(1)
        self.mean_sum.mul_(maf).add_(mean)
        self.var_sum.mul_(maf).add_(var * (m / (m - 1) if m > 1 else 1.0))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, use_global_stats={self.use_global_stats}, eps={self.eps}"

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        p = layer.batch_norm_param
        shape = bottom_shapes[0]
        channels = shape[1] if len(shape) > 1 else 1
        # Unset use_global_stats: true in TEST, false in TRAIN.  An explicit false normalises with
        # the batch statistics even in a TEST net (real Caffe; the bn_scale fixture pins it down).
        use_global = bool(p.use_global_stats) if p.HasField("use_global_stats") else phase == "TEST"
        return cls(channels, use_global, float(p.eps), float(p.moving_average_fraction))


def _scale_axes(layer, param, bottom_shapes) -> tuple[int, Shape]:
    """``(axis, blob shape)`` of Scale / Bias: bottom 1's shape, or the axes ``[axis, axis + num_axes)``."""
    x = bottom_shapes[0]
    if len(bottom_shapes) == 2:
        other = bottom_shapes[1]
        # With a second bottom, a 0-d one may sit at axis == ndim (scale_layer.cpp).
        axis = int(param.axis)
        axis = axis + len(x) if axis < 0 else axis
        if not 0 <= axis <= len(x) or tuple(x[axis:axis + len(other)]) != tuple(other):
            raise _fail(layer, f"bottom 1 shape {other} does not match bottom 0 shape {x} from axis {param.axis}")
        return axis, tuple(other)
    try:
        axis = _canonical_axis(int(param.axis), len(x)) if x else 0
    except CaffeConversionError as exc:
        raise _fail(layer, str(exc)) from None
    num_axes = int(param.num_axes)
    if num_axes < -1 or (num_axes >= 0 and axis + num_axes > len(x)):
        raise _fail(layer, f"num_axes {num_axes} from axis {axis} does not fit bottom shape {x}")
    end = len(x) if num_axes == -1 else axis + num_axes
    return axis, tuple(x[axis:end])


class Scale(CaffeLayer):
    """Caffe ``Scale``: ``x * scale (+ bias)``, broadcast over the axes ``[axis, axis + scale.dim())``.

    ``scale`` is the learned blob ``weight`` (shape ``x.shape[axis:axis + num_axes]``,
    ``()`` for ``num_axes: 0``) or, with two bottoms, bottom 1 (GRP-DSOD's gates,
    ``axis: 0``).  ``bias`` (``bias_term``) has the scale's shape.
    """

    caffe_type = "Scale"

    def __init__(self, axis: int, scale_shape: Shape, learned_scale: bool = True, bias: bool = False,
                 filler: Filler = Filler(value=1.0), bias_filler: Filler = Filler()) -> None:
        super().__init__()
        self.axis, self.scale_shape, self.learned_scale = axis, tuple(scale_shape), learned_scale
        if learned_scale:
            self._add_blob("weight", self.scale_shape, filler)
        if bias:
            self._add_blob("bias", self.scale_shape, bias_filler)
        self.reset_blobs()

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        if scale is None:
            scale = self.weight
        elif tuple(x.shape[self.axis:self.axis + scale.dim()]) != tuple(scale.shape):
            raise CaffeConversionError(f"Scale: bottom 1 shape {tuple(scale.shape)} does not match bottom 0 "
                                       f"shape {tuple(x.shape)} from axis {self.axis}")
        y = x * _broadcast_view(scale, self.axis, x.dim())
        bias = getattr(self, "bias", None)
        return y if bias is None else y + _broadcast_view(bias, self.axis, x.dim())

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1, 2))
        p = layer.scale_param
        axis, shape = _scale_axes(layer, p, bottom_shapes)
        # scale_layer.cpp: without a filler the scale starts at 1; the bias filler defaults to 0.
        return cls(axis, shape, len(bottom_shapes) == 1, bool(p.bias_term),
                   _filler(layer, "scale_param", "filler", Filler(value=1.0)),
                   _filler(layer, "scale_param", "bias_filler", Filler()))


class Bias(CaffeLayer):
    """Caffe ``Bias``: ``x + bias`` broadcast over ``[axis, axis + bias.dim())``; the bias is the
    learned blob (shape ``x.shape[axis:axis + num_axes]``) or bottom 1."""

    caffe_type = "Bias"

    def __init__(self, axis: int, bias_shape: Shape, learned: bool = True, filler: Filler = Filler()) -> None:
        super().__init__()
        self.axis, self.bias_shape = axis, tuple(bias_shape)
        if learned:
            self._add_blob("bias", self.bias_shape, filler)
        self.reset_blobs()

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if bias is None:
            bias = self.bias
        elif tuple(x.shape[self.axis:self.axis + bias.dim()]) != tuple(bias.shape):
            raise CaffeConversionError(f"Bias: bottom 1 shape {tuple(bias.shape)} does not match bottom 0 "
                                       f"shape {tuple(x.shape)} from axis {self.axis}")
        return x + _broadcast_view(bias, self.axis, x.dim())

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1, 2))
        axis, shape = _scale_axes(layer, layer.bias_param, bottom_shapes)
        return cls(axis, shape, len(bottom_shapes) == 1, _filler(layer, "bias_param", "filler", Filler()))


class Normalize(CaffeLayer):
    """SSD ``Normalize``: L2 normalisation, then a learned scale.

    ``norm = sqrt(sum(x ** 2) + eps)`` (eps inside the root, ``normalize_layer.cpp``)
    over ``(C, H, W)`` per sample with ``across_spatial``, else over ``C`` per
    ``(n, h, w)``; then times ``weight`` ``(C,)``, or ``()`` with ``channel_shared``.
    Shapes: ``(N, C, ...) -> (N, C, ...)``.
    """

    caffe_type = "Normalize"

    def __init__(self, channels: int, across_spatial: bool = True, channel_shared: bool = True,
                 eps: float = 1e-10, filler: Filler = Filler(value=1.0)) -> None:
        super().__init__()
        self.across_spatial, self.eps = across_spatial, eps
        self._add_blob("weight", () if channel_shared else (channels,), filler)
        self.reset_blobs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.across_spatial:
            dims = tuple(range(1, x.dim()))
            norm = torch.sqrt(x.square().sum(dim=dims, keepdim=True) + self.eps)
            y = x * (1 / norm)  # Caffe scales by the reciprocal here, divides in the other branch
        else:
            norm = torch.sqrt(x.square().sum(dim=1, keepdim=True) + self.eps)
            y = x / norm
        scale = self.weight if self.weight.dim() == 0 else _broadcast_view(self.weight, 1, x.dim())
        return y * scale

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        _expect_ndim(layer, bottom_shapes[0], range(2, 33))
        p = layer.norm_param
        return cls(bottom_shapes[0][1], bool(p.across_spatial), bool(p.channel_shared), float(p.eps),
                   _filler(layer, "norm_param", "scale_filler", Filler(value=1.0)))


# ---------------------------------------------------------------------------
# Pooling, LRN, Softmax
# ---------------------------------------------------------------------------


def caffe_pooled_size(size: int, kernel: int, stride: int, pad: int, clip: bool) -> int:
    """Caffe's pooling output size: ``ceil((size + 2 * pad - kernel) / stride) + 1``, minus one when
    ``clip`` (any padding) and the last window would start at or beyond ``size + pad``
    (``pooling_layer.cpp``: the last window must start inside the image or its leading padding)."""
    # Ceiling division with a non-negative numerator: a traced export turns ``//`` into ONNX's truncating
    # Div, which agrees with Python's flooring one only there.
    out = (size + 2 * pad - kernel + stride - 1) // stride + 1
    if clip and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def caffe_pool2d(x: torch.Tensor, method: str, kernel: Shape, stride: Shape, pad: Shape) -> torch.Tensor:
    """Caffe ``Pooling`` of ``(N, C, H, W)`` (MAX or AVE) with Caffe's ceil-mode output size.

    MAX never reads the padding (windows start at ``-FLT_MAX``).  AVE sums the
    window clipped to the image and divides by the window clipped to
    ``H + pad`` / ``W + pad`` (so padding counts, windows reaching past the
    padding do not).
    """
    # Python ints: a traced export (toolkit.export) then folds the sizes as the net's fixed input gives them,
    # instead of recording Shape arithmetic whose Python semantics ONNX does not share.
    h, w = (int(v) for v in x.shape[-2:])
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    clip = bool(ph or pw)  # Caffe applies the clip to both axes when either is padded
    out_h = caffe_pooled_size(h, kh, sh, ph, clip)
    out_w = caffe_pooled_size(w, kw, sw, pw, clip)
    # Explicit padding so that exactly out_h x out_w windows fit, whatever PyTorch's own rule.
    right_h = max(0, (out_h - 1) * sh + kh - ph - h)
    right_w = max(0, (out_w - 1) * sw + kw - pw - w)
    pads = (pw, right_w, ph, right_h)
    if method == "MAX":
        lowest = max(torch.finfo(x.dtype).min, -torch.finfo(torch.float32).max)  # Caffe's -FLT_MAX
        xp = F.pad(x, pads, value=lowest) if any(pads) else x
        return F.max_pool2d(xp, (kh, kw), (sh, sw))[..., :out_h, :out_w]
    xp = F.pad(x, pads) if any(pads) else x
    if torch.onnx.is_in_onnx_export():  # ONNX AveragePool has no divisor_override: the mean times the window
        sums = F.avg_pool2d(xp, (kh, kw), (sh, sw))[..., :out_h, :out_w] * (kh * kw)
    else:
        sums = F.avg_pool2d(xp, (kh, kw), (sh, sw), divisor_override=1)[..., :out_h, :out_w]
    hs = torch.arange(out_h, device=x.device, dtype=x.dtype) * sh - ph
    ws = torch.arange(out_w, device=x.device, dtype=x.dtype) * sw - pw
    # Window sizes before clipping to the image: min(start + k, size + pad) - start.
    dh = torch.clamp(hs + kh, max=h + ph) - hs
    dw = torch.clamp(ws + kw, max=w + pw) - ws
    return sums / (dh[:, None] * dw[None, :])


class Pooling(CaffeLayer):
    """Caffe ``Pooling``, MAX or AVE (see :func:`caffe_pool2d`); ``global_pooling`` pools the whole map.

    Shapes: ``(N, C, H, W) -> (N, C, H_out, W_out)`` (``(N, C, 1, 1)`` when global).
    """

    caffe_type = "Pooling"

    def __init__(self, method: str, kernel: Shape = (1, 1), stride: Shape = (1, 1), pad: Shape = (0, 0),
                 global_pooling: bool = False) -> None:
        super().__init__()
        self.method, self.kernel, self.stride, self.pad = method, tuple(kernel), tuple(stride), tuple(pad)
        self.global_pooling = global_pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = tuple(int(v) for v in x.shape[-2:]) if self.global_pooling else self.kernel
        return caffe_pool2d(x, self.method, kernel, self.stride, self.pad)

    def extra_repr(self) -> str:
        if self.global_pooling:
            return f"{self.method}, global"
        return f"{self.method}, kernel={self.kernel}, stride={self.stride}, pad={self.pad}"

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        _expect_tops(layer, (1,))  # no argmax mask top
        _expect_ndim(layer, bottom_shapes[0], (4,))
        p = layer.pooling_param
        method = _enum_name(p, "pool")
        if method not in ("MAX", "AVE"):
            raise _fail(layer, f"pool: {method} is not supported")
        pad = (int(p.pad_h), int(p.pad_w)) if p.HasField("pad_h") or p.HasField("pad_w") else (int(p.pad),) * 2
        stride = ((int(p.stride_h), int(p.stride_w)) if p.HasField("stride_h") or p.HasField("stride_w")
                  else (int(p.stride),) * 2)
        if p.global_pooling:
            if any(pad) or stride != (1, 1):
                raise _fail(layer, "global_pooling takes no pad and stride 1")
            return cls(method, tuple(bottom_shapes[0][2:]), stride, pad, True)
        if p.HasField("kernel_size"):
            kernel = (int(p.kernel_size),) * 2
        elif p.HasField("kernel_h") and p.HasField("kernel_w"):
            kernel = (int(p.kernel_h), int(p.kernel_w))
        else:
            raise _fail(layer, "kernel_size (or kernel_h and kernel_w) is required")
        if min(kernel) <= 0 or min(stride) <= 0:
            raise _fail(layer, f"kernel {kernel} and stride {stride} must be positive")
        if pad[0] >= kernel[0] or pad[1] >= kernel[1]:
            raise _fail(layer, f"pad {pad} must be smaller than the kernel {kernel}")
        return cls(method, kernel, stride, pad)


class LRN(CaffeLayer):
    """Caffe ``LRN``.

    ``ACROSS_CHANNELS``: ``x / (k + alpha / n * sum_{window of n channels} x^2) ** beta``
    (window centred, zero outside the channels).  ``WITHIN_CHANNEL``:
    ``x / (1 + alpha * AVE_{n x n, pad (n - 1) / 2}(x^2)) ** beta``, the average with
    Caffe's AVE pooling divisor (``lrn_layer.cpp`` builds it from a Pooling layer).
    """

    caffe_type = "LRN"

    def __init__(self, local_size: int = 5, alpha: float = 1.0, beta: float = 0.75, k: float = 1.0,
                 region: str = "ACROSS_CHANNELS") -> None:
        super().__init__()
        self.local_size, self.alpha, self.beta, self.k, self.region = local_size, alpha, beta, k, region

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.local_size
        pre = (n - 1) // 2
        sq = x.square()
        if self.region == "ACROSS_CHANNELS":
            padded = F.pad(sq, (0, 0, 0, 0, pre, n - pre - 1))
            channels = int(x.shape[1])
            # The window's sum as n shifted slices (not unfold: an ONNX export needs its sizes static).
            window = padded[:, :channels]
            for i in range(1, n):
                window = window + padded[:, i:i + channels]
            scale = self.k + (self.alpha / n) * window
        else:
            scale = 1 + self.alpha * caffe_pool2d(sq, "AVE", (n, n), (1, 1), (pre, pre))
        return x * torch.pow(scale, -self.beta)

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        _expect_ndim(layer, bottom_shapes[0], (4,))
        p = layer.lrn_param
        if p.local_size % 2 == 0:
            raise _fail(layer, f"local_size must be odd, got {p.local_size}")
        return cls(int(p.local_size), float(p.alpha), float(p.beta), float(p.k), _enum_name(p, "norm_region"))


class Softmax(CaffeLayer):
    """Caffe ``Softmax`` over ``axis``."""

    caffe_type = "Softmax"

    def __init__(self, axis: int = 1) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(x, dim=_canonical_axis(self.axis, x.dim()))

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (1,))
        try:
            _canonical_axis(int(layer.softmax_param.axis), len(bottom_shapes[0]))
        except CaffeConversionError as exc:
            raise _fail(layer, str(exc)) from None
        return cls(int(layer.softmax_param.axis))


# ---------------------------------------------------------------------------
# SSD: PriorBox, DetectionOutput, MultiBoxLoss
# ---------------------------------------------------------------------------


class PriorBox(CaffeLayer):
    """SSD ``PriorBox`` (:mod:`toolkit.models.priors`): ``(feature, image) -> (1, 2, H * W * num_priors * 4)``.

    Only the shapes of the bottoms are read: channel 0 of the top holds the
    normalized xyxy priors of the feature map ``(H, W)``, channel 1 their variances.
    """

    caffe_type = "PriorBox"

    def __init__(self, spec: PriorBoxSpec) -> None:
        super().__init__()
        self.spec = spec
        self._cache: dict = {}

    def forward(self, feature: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        key = (tuple(int(v) for v in feature.shape[-2:]), tuple(int(v) for v in image.shape[-2:]), feature.device,
               feature.dtype)
        if key not in self._cache:
            boxes, variances = prior_boxes(self.spec, key[0], key[1])
            self._cache = {key: caffe_priorbox_blob(boxes, variances).to(device=feature.device,
                                                                         dtype=feature.dtype)}
        # A copy: no caller can change the cache, and a traced export sees an operation producing the top.
        return self._cache[key].clone()

    def extra_repr(self) -> str:
        return repr(self.spec)

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (2,))
        for i, s in enumerate(bottom_shapes):
            _expect_ndim(layer, s, (4,), f"bottom {i}")
        try:
            return cls(PriorBoxSpec.from_caffe(layer.prior_box_param))
        except ValueError as exc:
            raise _fail(layer, str(exc)) from None


class DetectionOutput(CaffeLayer):
    """SSD ``DetectionOutput`` (:func:`toolkit.models.postprocess.detection_output`).

    Bottoms: ``loc`` ``(N, P * 4)`` (``(N, P * num_classes * 4)`` without
    ``share_location``), ``conf`` ``(N, P * num_classes)`` probabilities,
    ``priorbox`` ``(1, 2, P * 4)``; a fourth bottom (the image) is ignored.
    Top: ``(1, 1, R, 7)`` rows ``[image, label, score, xmin, ymin, xmax, ymax]``
    (normalized, not clipped), ordered by image, label, descending score; when no
    image has a detection, one row ``[i, -1, ..., -1]`` per image.  Runs
    without gradient.
    """

    caffe_type = "DetectionOutput"

    def __init__(self, params: DetectionOutputParams) -> None:
        super().__init__()
        self.params = params

    def _check(self, loc: torch.Tensor, conf: torch.Tensor, priorbox: torch.Tensor) -> None:
        prm = self.params
        if priorbox.dim() != 3 or priorbox.shape[1] != 2 or priorbox.shape[2] % 4:
            raise CaffeConversionError(f"DetectionOutput: priorbox must be (1, 2, P*4), got {tuple(priorbox.shape)}")
        p = priorbox.shape[2] // 4
        loc_classes = 1 if prm.share_location else prm.num_classes
        if loc.shape[0] != conf.shape[0] or loc[0].numel() != p * loc_classes * 4 \
                or conf[0].numel() != p * prm.num_classes:
            raise CaffeConversionError(
                f"DetectionOutput: {p} priors and {prm.num_classes} classes need loc (N, {p * loc_classes * 4}) "
                f"and conf (N, {p * prm.num_classes}), got {tuple(loc.shape)} and {tuple(conf.shape)}")

    def forward(self, loc: torch.Tensor, conf: torch.Tensor, priorbox: torch.Tensor, *unused) -> torch.Tensor:
        self._check(loc, conf, priorbox)
        if torch.onnx.is_in_onnx_export():
            # The same rows from whole-tensor operations that have ONNX forms (toolkit.export).
            from toolkit.models.graph_postprocess import detection_output_graph

            priors, variances = split_caffe_priorbox_blob(priorbox)
            return detection_output_graph(loc, conf, priors, variances, self.params).to(loc.dtype)
        with torch.no_grad():
            priors, variances = split_caffe_priorbox_blob(priorbox)
            results = detection_output(loc.reshape(loc.shape[0], -1), conf.reshape(conf.shape[0], -1),
                                       priors, variances, self.params)
        results = [{k: v.cpu() for k, v in r.items()} for r in results]
        return to_caffe_detection_blob(results).to(device=loc.device, dtype=loc.dtype)

    def meta_forward(self, loc, conf, priorbox, *unused):
        self._check(loc, conf, priorbox)
        # detection_output_layer.cpp sizes the top (1, 1, 1, 7) at set-up; rows are data-dependent.
        return torch.empty((1, 1, 1, 7), device=loc.device, dtype=loc.dtype)

    def extra_repr(self) -> str:
        return repr(self.params)

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (3, 4))
        try:
            return cls(DetectionOutputParams.from_caffe(layer.detection_output_param))
        except ValueError as exc:
            raise _fail(layer, str(exc)) from None


class MultiBoxLoss(CaffeLayer):
    """SSD ``MultiBoxLoss`` (:class:`toolkit.models.multibox_loss.MultiBoxLoss`).

    Bottoms: ``loc`` ``(N, P * 4)``, ``conf`` ``(N, P * num_classes)`` logits,
    ``priorbox`` ``(1, 2, P * 4)``, ``label`` ``(1, 1, G, 8)`` rows
    ``[item_id, group_label, instance_id, xmin, ymin, xmax, ymax, difficult]``
    (normalized; ``item_id == -1`` rows skipped).  Top: the loss, a 0-d tensor
    (Caffe's loss blob), differentiable w.r.t. ``loc`` and ``conf`` unless
    ``propagate_down`` is false for them.
    """

    caffe_type = "MultiBoxLoss"

    def __init__(self, params: MultiBoxLossParams, propagate_down: Sequence[bool] = (True, True)) -> None:
        super().__init__()
        self.params = params
        self.propagate_down = tuple(propagate_down)
        self.loss = _MultiBoxLossFn(params)

    def forward(self, loc: torch.Tensor, conf: torch.Tensor, priorbox: torch.Tensor,
                label: torch.Tensor) -> torch.Tensor:
        loc = loc if self.propagate_down[0] else loc.detach()
        conf = conf if self.propagate_down[1] else conf.detach()
        n = loc.shape[0]
        priors, variances = split_caffe_priorbox_blob(priorbox.detach())
        p = priors.shape[0]
        if loc[0].numel() != p * 4 or conf[0].numel() != p * self.params.num_classes:
            raise CaffeConversionError(
                f"MultiBoxLoss: {p} priors and {self.params.num_classes} classes need loc (N, {p * 4}) and "
                f"conf (N, {p * self.params.num_classes}), got {tuple(loc.shape)} and {tuple(conf.shape)}")
        targets = targets_from_caffe_labels(label.detach().to(loc.dtype), n)
        out = self.loss(loc.reshape(n, p, 4), conf.reshape(n, p, -1), priors, variances, targets)
        return out["loss"]

    def meta_forward(self, loc, conf, priorbox, label):
        return torch.empty((), device=loc.device, dtype=loc.dtype)

    def extra_repr(self) -> str:
        return repr(self.params)

    @classmethod
    def from_caffe(cls, layer, bottom_shapes, phase):
        _expect_bottoms(layer, bottom_shapes, (4,))
        label = bottom_shapes[3]
        if len(label) != 4 or label[-1] != 8:
            raise _fail(layer, f"the label bottom must be (1, 1, G, 8), got {label}")
        try:
            params = MultiBoxLossParams.from_caffe(layer.multibox_loss_param, layer.loss_param)
        except ValueError as exc:
            raise _fail(layer, str(exc)) from None
        down = list(layer.propagate_down) or [True, True]
        return cls(params, down[:2])


# ---------------------------------------------------------------------------
# Type table
# ---------------------------------------------------------------------------

LAYER_TYPES: dict[str, type[CaffeLayer]] = {
    cls.caffe_type: cls
    for cls in (Input, Split, Concat, Slice, Crop, Flatten, Reshape, Permute, Dropout, ReLU, PReLU, Sigmoid,
                TanH, Power, Eltwise, Convolution, Deconvolution, InnerProduct, BatchNorm, Scale, Bias, Normalize,
                Pooling, LRN, Softmax, PriorBox, DetectionOutput, MultiBoxLoss)
}


def build_layer(layer, bottom_shapes: Sequence[Shape], phase: str = "TEST") -> CaffeLayer:
    """The module of one modern ``caffe_pb2.LayerParameter``, given its bottoms' shapes.

    Args:
        layer: the layer (V1 layers must be upgraded first, see :mod:`toolkit.caffe.net`).
        bottom_shapes: one shape per bottom, as Caffe's ``LayerSetUp`` sees them.
        phase: ``"TEST"`` or ``"TRAIN"`` (BatchNorm's default statistics depend on it).
    Returns:
        The module, its blobs initialised from the prototxt's fillers.
    Raises:
        CaffeConversionError: an unsupported type, or parameters Caffe would
            refuse (the message names the layer).
    """
    cls = LAYER_TYPES.get(layer.type)
    if cls is None:
        raise CaffeConversionError(f"layer {layer.name!r}: unsupported type {layer.type!r}")
    return cls.from_caffe(layer, [tuple(int(d) for d in s) for s in bottom_shapes], phase)
