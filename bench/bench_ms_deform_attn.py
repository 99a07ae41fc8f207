"""Multi-scale deformable attention, forward + backward: the compiled kernel against the PyTorch reference.

Deformable DETR's shapes: batch 1, 8 heads x 32 channels, 4 levels from an
800x1066 image (100x134, 50x67, 25x34, 13x17), 4 points per level; queries: 900
(a decoder) and every token, 17,821 (the encoder).  Inputs are random with
sampling locations spread over and a little beyond the maps.  Each round times
the kernel and the reference back to back (forward, then backward of a random
upstream gradient w.r.t. value, sampling locations and attention weights), after
a warm-up; the ratio of each round is reported with the median and the spread
over rounds.  On a GPU the same runs on CUDA (``--device cuda``).

Run from the repository root::

    .venv/bin/python bench/bench_ms_deform_attn.py [--threads 2] [--rounds 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchutil import OtherLoad, cpu_name  # also puts the repo root on sys.path if needed

LEVELS = ((100, 134), (50, 67), (25, 34), (13, 17))


def inputs(queries: int, device: str, dtype=torch.float32, heads=8, channels=32, points=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS, dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(1, int(sizes.sum()), heads, channels, generator=g, dtype=dtype)
    loc = torch.rand(1, queries, heads, len(LEVELS), points, 2, generator=g, dtype=dtype) * 1.1 - 0.05
    weights = torch.rand(1, queries, heads, len(LEVELS), points, generator=g, dtype=dtype).softmax(-1)
    grad = torch.randn(1, queries, heads * channels, generator=g, dtype=dtype)
    return [t.to(device) for t in (value, shapes, starts, loc, weights, grad)]


def time_once(fn, args, device: str) -> tuple[float, float]:
    """(forward seconds, backward seconds) of ``fn`` on fresh leaf copies of ``args``."""
    value, shapes, starts, loc, weights, grad = args
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, weights)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    sync()
    t1 = time.perf_counter()
    torch.autograd.grad(out, leaves, grad)
    sync()
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per shape (default 5)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()

    import toolkit.ops as ops
    from toolkit.ops import ms_deform_attn_reference

    if not ops.has_ops():
        raise SystemExit(f"the compiled kernels are not built ({ops.load_error()}); {ops.BUILD_HINT}")
    torch.set_num_threads(args.threads)
    device = args.device
    where = torch.cuda.get_device_name() if device == "cuda" else f"{cpu_name()}, {args.threads} threads"
    print(f"ms_deform_attn forward + backward, float32, on {where}")
    print(f"torch {torch.__version__}; levels {' '.join(f'{h}x{w}' for h, w in LEVELS)}, 8 heads x 32 channels, "
          "4 points; after a warm-up, rounds of kernel and reference back to back")

    def kernel(value, shapes, starts, loc, weights):
        return torch.ops.legacy_det.ms_deform_attn(value, shapes, starts, loc, weights, 64)

    def reference(value, shapes, starts, loc, weights):
        return ms_deform_attn_reference(value, shapes, starts, loc, weights)

    load = OtherLoad()
    for name, queries in (("decoder, 900 queries", 900), ("encoder, 17,821 queries", 17821)):
        data = inputs(queries, device)
        with torch.no_grad():
            diff = (kernel(*data[:5]) - reference(*data[:5])).abs().max().item()
        for fn in (kernel, reference):
            time_once(fn, data, device)  # warm-up
        rows = {"kernel": [], "reference": []}
        for _ in range(args.rounds):
            rows["kernel"].append(time_once(kernel, data, device))
            rows["reference"].append(time_once(reference, data, device))
        print(f"\n{name} (outputs agree to {diff:.1e})")
        print(f"  {'':10} {'forward ms':>11} {'backward ms':>12} {'total ms':>9}   (medians of {args.rounds})")
        for label, times in rows.items():
            f = statistics.median(t[0] for t in times) * 1e3
            b = statistics.median(t[1] for t in times) * 1e3
            print(f"  {label:10} {f:11.1f} {b:12.1f} {f + b:9.1f}")
        ratios = sorted(sum(r) / sum(k) for r, k in zip(rows["reference"], rows["kernel"]))
        fwd = sorted(r[0] / k[0] for r, k in zip(rows["reference"], rows["kernel"]))
        print(f"  reference / kernel, forward + backward: {statistics.median(ratios):.2f}x "
              f"(rounds {ratios[0]:.2f}x to {ratios[-1]:.2f}x); forward alone {statistics.median(fwd):.2f}x")
    cores = load.cores()
    if cores is not None:
        print(f"\nother processes used {cores:.2f} cores during the measurements")


if __name__ == "__main__":
    main()
