"""Multi-scale deformable attention: the reference against a naive loop, the compiled kernels against the
reference (forward and the three gradients, float32 and float64), gradcheck, opcheck, tracing, the fallback."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import toolkit.ops as ops
from conftest import REPO_ROOT, require_fixture
from toolkit.ops import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference

op_module = sys.modules["toolkit.ops.ms_deform_attn"]  # the module (the package exports the function by its name)

CI = os.environ.get("CI", "").lower() == "true"
needs_kernels = pytest.mark.skipif(not ops.has_ops() and not CI,
                                   reason=f"compiled kernels not built ({ops.load_error()}); {ops.BUILD_HINT}")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def make_inputs(levels, n=2, m=3, d=5, lq=7, p=4, dtype=torch.float64, low=-0.2, high=1.2, seed=0, device="cpu"):
    """Random op inputs: ``levels`` is a list of (H, W); locations uniform in [low, high]."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(n, int(sizes.sum()), m, d, generator=g, dtype=dtype)
    loc = torch.rand(n, lq, m, len(levels), p, 2, generator=g, dtype=dtype) * (high - low) + low
    weights = torch.rand(n, lq, m, len(levels), p, generator=g, dtype=dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return [t.to(device) for t in (value, shapes, starts, loc, weights)]


def naive(value, shapes, starts, loc, weights):
    """The definition as a loop: bilinear interpolation at (x, y) = (loc_x * W - 0.5, loc_y * H - 0.5) between the
    four surrounding pixels, zero outside the map; weighted sum over levels and points."""
    n, _, m, d = value.shape
    lq, n_levels, n_points = loc.shape[1], loc.shape[3], loc.shape[4]
    out = torch.zeros(n, lq, m, d, dtype=value.dtype)
    for b in range(n):
        for q in range(lq):
            for h in range(m):
                for lev in range(n_levels):
                    height, width = (int(v) for v in shapes[lev])
                    start = int(starts[lev])
                    for pt in range(n_points):
                        x = loc[b, q, h, lev, pt, 0].item() * width - 0.5
                        y = loc[b, q, h, lev, pt, 1].item() * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(d, dtype=value.dtype)
                        for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= xi < width and 0 <= yi < height:
                                    sample += wy * wx * value[b, start + yi * width + xi, h]
                        out[b, q, h] += weights[b, q, h, lev, pt] * sample
    return out.reshape(n, lq, m * d)


CASES = {
    "generic": dict(levels=[(6, 8), (3, 4), (1, 1)]),
    "odd_channels": dict(levels=[(5, 7), (2, 3)], d=30, m=2),
    "single_pixel_levels": dict(levels=[(1, 1), (1, 1), (1, 1)], low=-0.5, high=1.5),
    "very_different_sizes": dict(levels=[(40, 56), (3, 2), (1, 1)], lq=11),
    "outside": dict(levels=[(4, 5), (2, 2)], low=-3.0, high=4.0),
}


def border_inputs(dtype=torch.float64, kinks=True):
    """Points exactly on the map's edges (loc 0 and 1), just inside and outside them, outside, far away; with
    ``kinks``, also points on pixel centres and at x = -1, W, where the interpolation is continuous but not
    differentiable (one-sided derivatives may differ there between implementations)."""
    value, shapes, starts, _, _ = make_inputs([(4, 6), (3, 3)], n=1, m=2, d=3, lq=1, dtype=dtype)
    coords = [0.0, 1.0, -1e-9, 1e-9, 1 - 1e-9, 1 + 1e-9, 0.37, -0.6, 1.4, -10.0, 1e6]
    if kinks:
        coords += [0.5 / 6, 1 - 0.5 / 6, 0.5, -0.5 / 6, 1 + 0.5 / 6, 2.0 / 6]
    grid = torch.tensor([(x, y) for x in coords for y in coords], dtype=dtype)  # every pair
    lq = grid.shape[0]
    loc = grid.view(1, lq, 1, 1, 1, 2).expand(1, lq, 2, 2, 1, 2).contiguous()
    weights = torch.full((1, lq, 2, 2, 1), 0.5, dtype=dtype)
    return value, shapes, starts, loc, weights


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("case", ["generic", "single_pixel_levels", "outside"])
def test_reference_equals_the_naive_loop(case):
    args = make_inputs(**{**CASES[case], "n": 2, "lq": 3, "p": 2})
    torch.testing.assert_close(ms_deform_attn_reference(*args), naive(*args), rtol=1e-12, atol=1e-12)


def test_reference_on_the_border_equals_the_naive_loop():
    args = border_inputs()
    torch.testing.assert_close(ms_deform_attn_reference(*args), naive(*args), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- the kernels


def test_kernels_are_built_by_the_install():
    """The README's test command builds the kernels (under CI: also the CUDA ones, FORCE_CUDA=1)."""
    if not CI and not ops.has_ops():
        pytest.skip(f"compiled kernels not built ({ops.load_error()})")
    assert ops.has_ops(), ops.load_error()
    if os.environ.get("FORCE_CUDA") == "1":
        assert ops.has_cuda_kernels()


class _CudaEmulated(torch.autograd.Function):
    """The CUDA kernels' per-thread code run serially on the CPU (``legacy_det_testing``), as an autograd op."""

    @staticmethod
    def forward(ctx, value, shapes, starts, loc, weights, im2col_step):
        ctx.save_for_backward(value, shapes, starts, loc, weights)
        ctx.im2col_step = im2col_step
        return torch.ops.legacy_det_testing.ms_deform_attn_cuda_emulated(value, shapes, starts, loc, weights,
                                                                         im2col_step)

    @staticmethod
    def backward(ctx, grad):
        value, shapes, starts, loc, weights = ctx.saved_tensors
        g_value, g_loc, g_weights = torch.ops.legacy_det_testing.ms_deform_attn_backward_cuda_emulated(
            grad, value, shapes, starts, loc, weights, ctx.im2col_step)
        return g_value, None, None, g_loc, g_weights, None


def _kernel(value, shapes, starts, loc, weights, im2col_step):
    return torch.ops.legacy_det.ms_deform_attn(value, shapes, starts, loc, weights, im2col_step)


def _compare(args, rtol, atol, im2col_step=64, gradients=True, op=_kernel):
    value, shapes, starts, loc, weights = [a.clone() for a in args]
    inputs = [value, loc, weights]
    for t in inputs:
        t.requires_grad_(True)
    out = op(value, shapes, starts, loc, weights, im2col_step)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref = ms_deform_attn_reference(ref_inputs[0], shapes, starts, ref_inputs[1], ref_inputs[2])
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    if not gradients:
        return
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad)
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}: {m}")


TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 2e-5)}


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_kernel_equals_the_reference(case, dtype):
    _compare(make_inputs(**CASES[case], dtype=dtype), *TOLERANCE[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_cpu_kernel_on_the_border(dtype):
    _compare(border_inputs(dtype), *TOLERANCE[dtype], gradients=False)
    _compare(border_inputs(dtype, kinks=False), *TOLERANCE[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_kernel_code_run_on_the_cpu_equals_the_reference(case, dtype):
    """What each CUDA thread computes (ms_deform_attn_kernels.h), every thread index of every im2col launch in
    turn; outputs start as NaN, so an index the decomposition misses fails."""
    _compare(make_inputs(**CASES[case], dtype=dtype), *TOLERANCE[dtype], op=_CudaEmulated.apply)
    _compare(make_inputs(**CASES[case], n=5, dtype=dtype), *TOLERANCE[dtype], im2col_step=2,
             op=_CudaEmulated.apply)
    _compare(border_inputs(dtype, kinks=False), *TOLERANCE[dtype], op=_CudaEmulated.apply)


@needs_kernels
def test_im2col_step_smaller_than_the_batch():
    args = make_inputs([(6, 8), (3, 4)], n=5)
    _compare(args, 1e-10, 1e-10, im2col_step=2)
    full = torch.ops.legacy_det.ms_deform_attn(*args, 64)
    torch.testing.assert_close(torch.ops.legacy_det.ms_deform_attn(*args, 3), full, rtol=0, atol=0)


@needs_kernels
def test_backward_does_not_depend_on_the_thread_count():
    """Race-free scatter-adds: the same bits with 1 thread and with several, run after run."""
    value, shapes, starts, loc, weights = make_inputs([(12, 16), (6, 8)], n=2, m=4, d=8, lq=200, dtype=torch.float32)
    grad = torch.randn(2, 200, 32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.legacy_det.ms_deform_attn_backward(grad, value, shapes, starts, loc, weights, 64)
        torch.set_num_threads(max(2, threads))
        for _ in range(3):
            many = torch.ops.legacy_det.ms_deform_attn_backward(grad, value, shapes, starts, loc, weights, 64)
            for a, b in zip(one, many):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_gradcheck_float64():
    value, shapes, starts, loc, weights = make_inputs([(3, 4), (2, 2), (1, 1)], n=2, m=2, d=3, lq=3, p=2)
    inputs = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), weights.requires_grad_())

    def op(value, shapes, starts, loc, weights):
        return torch.ops.legacy_det.ms_deform_attn(value, shapes, starts, loc, weights, 1)

    assert torch.autograd.gradcheck(op, inputs, eps=1e-6, atol=1e-7)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_opcheck(dtype):
    value, shapes, starts, loc, weights = make_inputs([(3, 4), (2, 2)], n=2, m=2, d=3, lq=3, p=2, dtype=dtype)
    for t in (value, loc, weights):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.legacy_det.ms_deform_attn.default, (value, shapes, starts, loc, weights, 64))
    grad = torch.randn(2, 3, 6, dtype=dtype)
    torch.library.opcheck(torch.ops.legacy_det.ms_deform_attn_backward.default,
                          (grad, value.detach(), shapes, starts, loc.detach(), weights.detach(), 64))


@needs_kernels
def test_traces_under_export_and_compile():
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2).double().eval()
    shapes = torch.tensor([[4, 5], [2, 3]])
    starts = torch.tensor([0, 20])
    src = torch.randn(1, 26, 16, dtype=torch.float64)
    query = torch.randn(1, 5, 16, dtype=torch.float64)
    ref_points = torch.rand(1, 5, 2, 2, dtype=torch.float64)
    args = (query, ref_points, src, shapes, starts)
    exported = torch.export.export(layer, args)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "legacy_det.ms_deform_attn.default" in targets
    torch.testing.assert_close(exported.module()(*args), layer(*args))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(*args)
    torch.testing.assert_close(out, layer(*args))
    out.sum().backward()
    assert layer.value_proj.weight.grad is not None


@needs_kernels
def test_half_inputs_run_the_kernel_in_float32():
    args = make_inputs([(6, 8), (3, 4)], dtype=torch.float32)
    low = [a.to(torch.bfloat16) if a.is_floating_point() else a for a in args]
    out = ms_deform_attn(*low)
    assert out.dtype == torch.bfloat16
    expected = ms_deform_attn_reference(*[a.float() if a.is_floating_point() else a for a in low])
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- CUDA (where a GPU is lent)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_kernel_equals_the_reference(case, dtype):
    assert ops.has_cuda_kernels(), "the kernels were built without CUDA"
    _compare(make_inputs(**CASES[case], dtype=dtype, device="cuda"), *TOLERANCE[dtype])
    _compare(make_inputs(**CASES[case], n=5, dtype=dtype, device="cuda"), *TOLERANCE[dtype], im2col_step=2)


@needs_gpu
def test_cuda_kernel_on_the_border_and_opcheck():
    _compare([a.cuda() for a in border_inputs()], 1e-10, 1e-10, gradients=False)
    _compare([a.cuda() for a in border_inputs(kinks=False)], 1e-10, 1e-10)
    value, shapes, starts, loc, weights = make_inputs([(3, 4), (2, 2)], n=2, m=2, d=3, lq=3, p=2, device="cuda")
    for t in (value, loc, weights):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.legacy_det.ms_deform_attn.default, (value, shapes, starts, loc, weights, 64))


# --------------------------------------------------------------------------- the Python op and the fallback


def test_dispatch_errors_name_the_argument():
    value, shapes, starts, loc, weights = make_inputs([(6, 8), (3, 4)])
    with pytest.raises(ValueError, match="sampling_locations must be"):
        ms_deform_attn(value, shapes, starts, loc[..., :1], weights)
    with pytest.raises(ValueError, match="attention_weights must be"):
        ms_deform_attn(value, shapes, starts, loc, weights[..., :1])
    with pytest.raises(ValueError, match="sum to 60, value has S = 61"):
        ms_deform_attn(torch.cat([value, value[:, :1]], 1), shapes, starts, loc, weights)
    with pytest.raises(ValueError, match="im2col_step must be positive"):
        ms_deform_attn(value, shapes, starts, loc, weights, 0)


def test_fallback_warns_once_and_runs_the_reference(monkeypatch):
    monkeypatch.setattr(op_module._extension, "_error", "ImportError: simulated")
    monkeypatch.setattr(op_module, "_warned", set())
    args = make_inputs([(6, 8), (3, 4)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ms_deform_attn(*args)
        ms_deform_attn(*args)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "simulated" in messages[0] and "--no-build-isolation" in messages[0]
    torch.testing.assert_close(out, ms_deform_attn_reference(*args), rtol=0, atol=0)


def test_import_never_fails_without_the_build():
    code = ("import sys; sys.modules['toolkit.ops._C'] = None\n"
            "import warnings, torch, toolkit.ops as ops\n"
            "assert not ops.has_ops() and 'toolkit.ops._C' in ops.load_error()\n"
            "layer = ops.MSDeformAttn(16, 2, 2, 2)\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    out = layer(torch.randn(1, 3, 16), torch.rand(1, 3, 2, 2), torch.randn(1, 26, 16),\n"
            "                torch.tensor([[4, 5], [2, 3]]), torch.tensor([0, 20]))\n"
            "assert out.shape == (1, 3, 16) and len(w) == 1, [str(x.message) for x in w]\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# --------------------------------------------------------------------------- the module


def test_module_parameters_match_the_official_layer():
    """Names and shapes of Deformable DETR's encoder attention (the official checkpoint's keys, from the fixture's
    spec), and the official initialisation."""
    spec = json.loads(require_fixture("detr/deformable_detr/spec.json").read_text())
    prefix = "transformer.encoder.layers.0.self_attn."
    official = {name[len(prefix):]: tuple(shape) for name, shape, *_ in spec["tensors"] if name.startswith(prefix)}
    layer = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == official
    assert torch.count_nonzero(layer.sampling_offsets.weight) == 0
    bias = layer.sampling_offsets.bias.view(8, 4, 4, 2)
    # Head h points along angle 2*pi*h/8, its larger coordinate scaled to 1; point p at distance p + 1.
    torch.testing.assert_close(bias[0, 0, :, :], torch.tensor([[1.0, 0], [2, 0], [3, 0], [4, 0]]))
    torch.testing.assert_close(bias[1, 2, 0], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(bias[6, 3, 1], torch.tensor([2 * math.cos(3 * math.pi / 2), -2.0]), atol=1e-6,
                               rtol=0)
    assert torch.equal(bias[:, 0], bias[:, 3])  # the same for every level
    assert torch.count_nonzero(layer.attention_weights.weight) == 0
    assert torch.count_nonzero(layer.attention_weights.bias) == 0
    assert torch.count_nonzero(layer.value_proj.bias) == 0 and torch.count_nonzero(layer.output_proj.bias) == 0
    bound = math.sqrt(6 / (256 + 256))  # Xavier-uniform
    assert layer.value_proj.weight.abs().max() <= bound and layer.value_proj.weight.std() > bound / 2


@pytest.mark.parametrize("box", [False, True], ids=["points", "boxes"])
def test_module_forward_equals_its_definition(box):
    torch.manual_seed(0)
    n, lq, c, m, n_levels, n_points = 2, 5, 12, 3, 2, 2
    layer = MSDeformAttn(c, n_levels, m, n_points).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    shapes = torch.tensor([[4, 5], [2, 3]])
    starts = torch.tensor([0, 20])
    src = torch.randn(n, 26, c, dtype=torch.float64)
    mask = torch.zeros(n, 26, dtype=torch.bool)
    mask[1, 15:20] = True
    query = torch.randn(n, lq, c, dtype=torch.float64)
    ref = torch.rand(n, lq, n_levels, 4 if box else 2, dtype=torch.float64)
    out = layer(query, ref, src, shapes, starts, mask)
    # The definition, written out: value projection with padding zeroed, offsets scaled per level (points) or by
    # half the box over P (boxes), softmax over the L * P points of a head, then the output projection.
    value = (src @ layer.value_proj.weight.T + layer.value_proj.bias).masked_fill(mask[..., None], 0)
    value = value.view(n, 26, m, c // m)
    offsets = query @ layer.sampling_offsets.weight.T + layer.sampling_offsets.bias
    offsets = offsets.view(n, lq, m, n_levels, n_points, 2)
    logits = (query @ layer.attention_weights.weight.T + layer.attention_weights.bias).view(n, lq, m, -1)
    weights = logits.softmax(-1).view(n, lq, m, n_levels, n_points)
    if box:
        loc = ref[:, :, None, :, None, :2] + offsets / n_points * ref[:, :, None, :, None, 2:] * 0.5
    else:
        wh = torch.tensor([[5.0, 4.0], [3.0, 2.0]], dtype=torch.float64)
        loc = ref[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    expected = naive(value, shapes, starts, loc, weights) @ layer.output_proj.weight.T + layer.output_proj.bias
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@needs_kernels
def test_kernel_argument_checks():
    value, shapes, starts, loc, weights = make_inputs([(6, 8), (3, 4)])
    with pytest.raises(RuntimeError, match="does not fit in the 60 spatial positions"):
        torch.ops.legacy_det.ms_deform_attn(value, shapes, starts + 5, loc, weights, 64)
    with pytest.raises(RuntimeError, match="must share a dtype"):
        torch.ops.legacy_det.ms_deform_attn(value, shapes, starts, loc.float(), weights, 64)
    with pytest.raises(RuntimeError, match="must be int64"):
        torch.ops.legacy_det.ms_deform_attn(value, shapes.int(), starts, loc, weights, 64)
    with pytest.raises(RuntimeError, match=r"attention_weights must be \(N, Lq, M, L, P\)"):
        torch.ops.legacy_det.ms_deform_attn(value, shapes, starts, loc, weights[:, :3], 64)


@needs_kernels
def test_flop_counter_counts_the_compiled_op():
    """torch.utils.flop_counter knows the op through its registered formula: 2 images x 30 queries x 2 heads x
    2 levels x 3 points x 5 channels, 10 FLOPs each (4 bilinear multiply-adds and the weighting)."""
    from torch.utils.flop_counter import FlopCounterMode

    args = make_inputs([(6, 8), (3, 4)], n=2, m=2, d=5, lq=30, p=3)
    counter = FlopCounterMode(display=False)
    with counter:
        torch.ops.legacy_det.ms_deform_attn(*args, 64)
    assert counter.get_total_flops() == 2 * 30 * 2 * 2 * 3 * 5 * 10 == 36000
