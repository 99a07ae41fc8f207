"""CPU training steps with glibc's default allocator settings against
``toolkit.engine.keep_freed_memory`` (what ``toolkit.train`` calls on the CPU).

Each measurement runs in a fresh child process (allocator settings are per
process and only affect later allocations), alternating the two settings
``--rounds`` times so that both see the same machine load.  A child builds
``--model``, prepares ``--steps`` augmented batches of shapes images, and times
``--steps`` training steps (forward + MultiBoxLoss + backward + SGD) with bfloat16
autocast and channels-last, as the main job trains, after two warm-up steps.
It also reports the minor page faults of the timed steps: with the defaults,
freed activations go back to the kernel and come back as zeroed pages.

Run from the repository root::

    .venv/bin/python bench/bench_allocator.py
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchutil import cpu_name  # also puts the repo root on sys.path if needed


def child(args) -> dict:
    import torch

    from toolkit.data import build_dataset
    from toolkit.data.transforms import PREPROCESS_PRESETS, SSD_BATCH_SAMPLERS, SSDTrainTransform, collate_detection
    from toolkit.engine import AugmentedDataset, keep_freed_memory, normalized_targets
    from toolkit.models.build import INPUTS, build_model
    from toolkit.models.multibox_loss import MultiBoxLoss, MultiBoxLossParams

    applied = keep_freed_memory() if args.child == "keep" else False
    spec = INPUTS[args.model]
    dataset = build_dataset("shapes", "train", root=args.data_root)
    transform = SSDTrainTransform(spec.size, PREPROCESS_PRESETS[spec.preprocess], distort=None, expand=None,
                                  samplers=SSD_BATCH_SAMPLERS[:1])
    train_set = AugmentedDataset(dataset, transform, seed=0)
    b = args.batch_size
    batches = [collate_detection([train_set[k * b + i] for i in range(b)]) for k in range(args.steps)]
    torch.manual_seed(0)
    model = build_model(args.model, len(dataset.classes)).train().to(memory_format=torch.channels_last)
    criterion = MultiBoxLoss(MultiBoxLossParams(num_classes=len(dataset.classes)))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def step(images, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images.contiguous(memory_format=torch.channels_last))
        loss = criterion(out["loc"].float(), out["conf"].float(), out["priors"], out["variances"],
                         normalized_targets(targets, (spec.size, spec.size), torch.device("cpu")))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for images, targets in batches[:2]:
        step(images, targets)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    for images, targets in batches:
        step(images, targets)
    seconds = (time.perf_counter() - t) / len(batches)
    return {"applied": applied, "step_s": seconds,
            "faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / len(batches)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dsod_tiny")
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--steps", type=int, default=10, help="timed steps per child")
    p.add_argument("--rounds", type=int, default=3, help="children per setting, alternating")
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--child", choices=("default", "keep"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0

    import torch

    print(f"model {args.model}, batch {args.batch_size}, {args.steps} steps per child, {args.rounds} rounds; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}")
    results = {"default": [], "keep": []}
    for _ in range(args.rounds):
        for setting in ("default", "keep"):
            cmd = [sys.executable, __file__, "--child", setting, "--model", args.model,
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
            if args.data_root:
                cmd += ["--data-root", str(args.data_root)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[setting].append(json.loads(out.strip().splitlines()[-1]))
    if not all(r["applied"] for r in results["keep"]):
        print("keep_freed_memory() changed nothing here (not glibc): both columns use the defaults")
    print(f"{'':28}{'s / step':>10}{'page faults / step':>20}")
    for setting, label in (("default", "glibc defaults"), ("keep", "keep_freed_memory()")):
        rows = results[setting]
        print(f"{label:28}{statistics.median(r['step_s'] for r in rows):>10.3f}"
              f"{statistics.median(r['faults_per_step'] for r in rows):>20.0f}")
    ratio = (statistics.median(r["step_s"] for r in results["default"])
             / statistics.median(r["step_s"] for r in results["keep"]))
    print(f"speed-up with keep_freed_memory(): {ratio:.2f}x (medians of {args.rounds} children each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
