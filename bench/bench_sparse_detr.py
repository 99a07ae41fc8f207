"""Inference latency and GFLOPs: Sparse DETR (rho 0.1) against Deformable DETR (box refinement + two-stage).

Both with ResNet-50, 4 levels, 6 + 6 layers, 300 queries, 91 classes, random
weights (latency does not depend on the values: Sparse DETR keeps a fixed share
of tokens), one 640x640 image, float32, eval mode, ``torch.no_grad``.  Rounds
time the two models back to back after a warm-up; the ratio of each round is
reported with the median and range.  GFLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` (multiply-adds counted as 2); the
deformable attention op registers its own formula with the counter
(``toolkit.ops.ms_deform_attn``): per sampled channel, 4 bilinear taps (8) and
the attention weighting (2).  The Sparse
DETR paper reports 38% fewer GFLOPs and 1.42x the FPS on a GPU.

Run from the repository root::

    .venv/bin/python bench/bench_sparse_detr.py [--threads 2] [--rounds 5] [--size 640]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# benchutil also puts the repo root on sys.path if needed
from benchutil import OtherLoad, cpu_name


def build(sparse: bool):
    from toolkit.models.detr import DeformableDETRConfig, build_deformable_detr

    options = dict(family="sparse", rho=0.1, use_enc_aux_loss=True, eff_query_init=True,
                   eff_specific_head=True) if sparse else {}
    cfg = DeformableDETRConfig(with_box_refine=True, two_stage=True, **options)
    torch.manual_seed(0)
    return build_deformable_detr(cfg, train_backbone=False).eval()


def gflops(model, images) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=640)
    args = parser.parse_args()

    import toolkit.ops as ops

    if not ops.has_ops():
        raise SystemExit(f"the compiled kernels are not built ({ops.load_error()}); {ops.BUILD_HINT}")
    torch.set_num_threads(args.threads)
    images = torch.randn(1, 3, args.size, args.size)
    models = {"Deformable DETR (+refine, two-stage)": build(False), "Sparse DETR (rho 0.1)": build(True)}
    print(f"inference on one {args.size}x{args.size} image, float32, {cpu_name()}, {args.threads} threads, "
          f"torch {torch.__version__}")
    flops = {name: gflops(model, images) for name, model in models.items()}
    times = {name: [] for name in models}
    load = OtherLoad()
    with torch.no_grad():
        for model in models.values():
            model(images)  # warm-up
        for _ in range(args.rounds):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(images)
                times[name].append(time.perf_counter() - t0)
    print(f"  {'model':38} {'GFLOPs':>7} {'median ms':>10} {'min ms':>8}")
    for name in models:
        print(f"  {name:38} {flops[name]:7.1f} {statistics.median(times[name]) * 1e3:10.0f} "
              f"{min(times[name]) * 1e3:8.0f}")
    dense, sparse = list(models)
    ratios = sorted(d / s for d, s in zip(times[dense], times[sparse]))
    print(f"Sparse / Deformable: {100 * (1 - flops[sparse] / flops[dense]):.0f}% fewer GFLOPs; speed "
          f"{statistics.median(ratios):.2f}x (rounds {ratios[0]:.2f}x to {ratios[-1]:.2f}x)")
    cores = load.cores()
    if cores is not None:
        print(f"other processes used {cores:.2f} cores during the measurements")


if __name__ == "__main__":
    main()
