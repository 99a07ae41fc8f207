"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021): the op and its module.

Each query attends, in each of ``M`` heads, to ``P`` points on each of ``L``
feature levels around a reference point: the value of a head at a point is
bilinearly interpolated from its level's map, and the ``L * P`` values are
summed with softmax-normalized attention weights.

* :func:`ms_deform_attn_reference` -- the specification, in plain PyTorch
  (``F.grid_sample``), and the fallback;
* :func:`ms_deform_attn` -- the op: the compiled kernels (``torch.ops.legacy_det.ms_deform_attn``,
  C++ on the CPU, CUDA on the GPU; see ``csrc/``) where they are built, else the reference;
* :class:`MSDeformAttn` -- the attention layer with Deformable DETR's parameter
  names and initialisation, so the official checkpoints load into it.

Tensor conventions (Deformable DETR's ``models/ops``): ``value`` ``(N, S, M, D)``
with ``S = sum_l H_l * W_l`` positions of every level flattened row-major and
concatenated; ``value_spatial_shapes`` int64 ``(L, 2)`` rows ``(H_l, W_l)``;
``value_level_start_index`` int64 ``(L,)``, where each level starts in ``S``;
``sampling_locations`` ``(N, Lq, M, L, P, 2)`` as ``(x, y)`` normalized to
``[0, 1]`` over each level's map (pixel centres at ``(i + 0.5) / W``, i.e.
``align_corners=False``; points outside read zeros); ``attention_weights``
``(N, Lq, M, L, P)``; the output is ``(N, Lq, M * D)``.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.ops import _extension

OP_NAME = "legacy_det::ms_deform_attn"
KERNEL_DTYPES = (torch.float32, torch.float64)


def ms_deform_attn_reference(value: torch.Tensor, value_spatial_shapes: torch.Tensor,
                             value_level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                             attention_weights: torch.Tensor) -> torch.Tensor:
    """The op in plain PyTorch: its specification, and the fallback where no kernel is built.

    For every level, ``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``)
    samples each head's ``(D, H_l, W_l)`` map at the ``Lq * P`` points (the grid is
    ``2 * loc - 1``); the samples are weighted and summed over levels and points.
    ``value_level_start_index`` is implied by the shapes (levels are consecutive)
    and not read.  Shapes as in the module docstring; differentiable in
    ``value``, ``sampling_locations`` and ``attention_weights``.
    """
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in value_spatial_shapes.tolist()]
    per_level = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (h, w) in enumerate(value_spatial_shapes.tolist()):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        maps = per_level[level].flatten(2).transpose(1, 2).reshape(n * m, d, int(h), int(w))
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N*M, D, Lq, L*P) weighted by (N*M, 1, Lq, L*P), summed over levels and points.
    stacked = torch.stack(samples, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    out = (stacked * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def _check(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights) -> None:
    """Shape errors that name the argument, before any kernel runs (the kernels check again)."""
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, M, D), got {tuple(value.shape)}")
    n, s, m, _ = value.shape
    if value_spatial_shapes.dim() != 2 or value_spatial_shapes.shape[1] != 2:
        raise ValueError(f"ms_deform_attn: value_spatial_shapes must be (L, 2), got "
                         f"{tuple(value_spatial_shapes.shape)}")
    n_levels = value_spatial_shapes.shape[0]
    if tuple(value_level_start_index.shape) != (n_levels,):
        raise ValueError(f"ms_deform_attn: value_level_start_index must be ({n_levels},), got "
                         f"{tuple(value_level_start_index.shape)}")
    loc_shape = tuple(sampling_locations.shape)
    if len(loc_shape) != 6 or (loc_shape[0], loc_shape[2], loc_shape[3], loc_shape[5]) != (n, m, n_levels, 2):
        raise ValueError(f"ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2) = ({n}, Lq, {m}, "
                         f"{n_levels}, P, 2), got {tuple(sampling_locations.shape)}")
    expected = tuple(sampling_locations.shape[:5])
    if tuple(attention_weights.shape) != expected:
        raise ValueError(f"ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = {expected}, got "
                         f"{tuple(attention_weights.shape)}")
    if value_spatial_shapes.device.type == "cpu" and not torch.compiler.is_compiling():
        total = int((value_spatial_shapes[:, 0] * value_spatial_shapes[:, 1]).sum())
        if total != s:
            raise ValueError(f"ms_deform_attn: the levels' H * W sum to {total}, value has S = {s} positions")


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"toolkit.ops.ms_deform_attn: {reason}; running the PyTorch reference (slower). "
                      f"{_extension.BUILD_HINT}", RuntimeWarning, stacklevel=3)


def _kernel_available(device: torch.device) -> Optional[str]:
    """None when a compiled kernel serves ``device``, else why not."""
    if not _extension.has_ops():
        return f"the compiled kernels are not loaded ({_extension.load_error()})"
    if device.type == "cuda" and not _extension.has_cuda_kernels():
        return "the compiled kernels were built without CUDA"
    if device.type not in ("cpu", "cuda"):
        return f"no kernel for device {device.type!r}"
    return None


def ms_deform_attn(value: torch.Tensor, value_spatial_shapes: torch.Tensor, value_level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                   im2col_step: int = 64) -> torch.Tensor:
    """Multi-scale deformable attention (shapes in the module docstring) -> ``(N, Lq, M * D)``.

    Runs the compiled kernel of the tensors' device where it is built (float32
    and float64; half and bfloat16 inputs run it in float32 and the result is
    cast back), else :func:`ms_deform_attn_reference` with one warning saying how
    to build the kernels; during an ONNX export always the reference (``grid_sample``).  ``im2col_step`` is the number of images per CUDA
    launch, as in Deformable DETR's op; results do not depend on it (any batch
    size works, divisible or not).  Differentiable w.r.t. ``value``,
    ``sampling_locations`` and ``attention_weights``.
    """
    _check(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights)
    if int(im2col_step) <= 0:
        raise ValueError(f"ms_deform_attn: im2col_step must be positive, got {im2col_step}")
    if torch.onnx.is_in_onnx_export():  # the compiled op has no ONNX form; the reference is grid_sample
        return ms_deform_attn_reference(value, value_spatial_shapes, value_level_start_index, sampling_locations,
                                        attention_weights)
    reason = _kernel_available(value.device)
    if reason is not None:
        _warn_once(reason)
        return ms_deform_attn_reference(value, value_spatial_shapes, value_level_start_index, sampling_locations,
                                        attention_weights)
    dtype = value.dtype
    compute = dtype if dtype in KERNEL_DTYPES else torch.float32
    out = torch.ops.legacy_det.ms_deform_attn(
        value.to(compute), value_spatial_shapes.long(), value_level_start_index.long(),
        sampling_locations.to(compute), attention_weights.to(compute), int(im2col_step))
    return out.to(dtype)


def _register_python_parts() -> None:
    """The fake kernels, the autograd formula and the FLOP count of the compiled ops (after the library is
    loaded)."""

    @torch.library.register_fake(OP_NAME)
    def _(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights,
          im2col_step):
        n, _, m, d = value.shape
        return value.new_empty((n, sampling_locations.shape[1], m * d))

    @torch.library.register_fake(OP_NAME + "_backward")
    def _(grad_output, value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights,
          im2col_step):
        return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)

    def setup_context(ctx, inputs, output):
        value, shapes, starts, locations, weights, im2col_step = inputs
        ctx.save_for_backward(value, shapes, starts, locations, weights)
        ctx.im2col_step = im2col_step

    def backward(ctx, grad_output):
        value, shapes, starts, locations, weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = torch.ops.legacy_det.ms_deform_attn_backward(
            grad_output.contiguous(), value, shapes, starts, locations, weights, ctx.im2col_step)
        return grad_value, None, None, grad_locations, grad_weights, None

    torch.library.register_autograd(OP_NAME, backward, setup_context=setup_context)

    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.legacy_det.ms_deform_attn)
    def _(value_shape, spatial_shape, start_shape, loc_shape, weight_shape, *args, **kwargs) -> int:
        # torch.utils.flop_counter's count of the compiled op (it knows only its own ops): per sampled channel,
        # 4 bilinear taps (a multiply-add each: 8) and the attention weighting (2).  The PyTorch reference is
        # counted op by op.
        n, lq, m, levels, points, _ = loc_shape
        return n * lq * m * levels * points * value_shape[-1] * 10


if _extension.has_ops():
    _register_python_parts()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention layer (Deformable DETR's ``models/ops/modules/ms_deform_attn.py``).

    Parameters and their initialisation are the official ones, so its checkpoints
    load by name: ``sampling_offsets`` (``Linear(d_model, M * L * P * 2)``, zero
    weight, bias = head ``h``'s direction ``(cos, sin)(2 pi h / M)`` scaled so its
    larger coordinate is 1, times ``p + 1`` for point ``p``), ``attention_weights``
    (``Linear(d_model, M * L * P)``, zeros), ``value_proj`` and ``output_proj``
    (``Linear(d_model, d_model)``, Xavier-uniform weight, zero bias).

    Args:
        d_model: channels ``C`` (divisible by ``n_heads``).
        n_levels, n_heads, n_points: ``L``, ``M``, ``P``.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.im2col_step = 64
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = directions.view(self.n_heads, 1, 1, 2).expand(-1, self.n_levels, self.n_points, -1) * scale
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                input_spatial_shapes: torch.Tensor, input_level_start_index: torch.Tensor,
                input_padding_mask: Optional[torch.Tensor] = None, return_sampling: bool = False):
        """Attend from ``query`` to the multi-level ``input_flatten``.

        Args:
            query: ``(N, Lq, C)``.
            reference_points: ``(N, Lq, L, 2)`` points ``(x, y)`` normalized to ``[0, 1]``
                (top-left 0, bottom-right 1, padding included), offsets then in units of
                each level's pixels; or ``(N, Lq, L, 4)`` boxes ``(cx, cy, w, h)``, offsets
                then in units of half the box over ``P``.
            input_flatten: ``(N, S, C)``, every level's map flattened and concatenated.
            input_spatial_shapes: int64 ``(L, 2)``, ``(H_l, W_l)``.
            input_level_start_index: int64 ``(L,)``.
            input_padding_mask: bool ``(N, S)``, True on padding (those values are zeroed).
            return_sampling: also return where and how much each query looked (Sparse DETR's decoder
                attention map is built from them).
        Returns:
            ``(N, Lq, C)``; with ``return_sampling``, ``(output, sampling_locations (N, Lq, M, L, P, 2),
            attention_weights (N, Lq, M, L, P))``.
        """
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # (W_l, H_l): an offset of 1 is one pixel of its level.
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"MSDeformAttn: reference_points must end in 2 (points) or 4 (boxes), got "
                             f"{tuple(reference_points.shape)}")
        out = self.output_proj(ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations,
                                              weights, self.im2col_step))
        return (out, locations, weights) if return_sampling else out
