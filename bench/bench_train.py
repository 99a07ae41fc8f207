"""Training throughput of a model against its data loader, side by side.

What it measures
----------------
1. **Training images/s**: forward + MultiBoxLoss + backward + SGD step of
   ``--model`` (default ``dsod300``) at its input size on pre-built batches of
   ``--batch-size`` (default 4) augmented images, so that no data loading is
   timed (best of ``--repeat`` windows of ``--steps`` steps, after warm-up).
2. **Loader images/s**: iterating the training ``DataLoader`` (VOC-style
   dataset → ``SSDTrainTransform`` → collate) with ``--workers`` workers, no model.

The ratio ``loader / training`` says whether the loader keeps up: above 1 it is
not the bottleneck (on a machine with spare cores for the workers).

The dataset is ``shapes`` (generated under ``--data-root`` if missing).

Run from the repository root::

    .venv/bin/python bench/bench_train.py
    .venv/bin/python bench/bench_train.py --model dsod_tiny --batch-size 24
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchutil import cpu_name  # also puts the repo root on sys.path if needed

import numpy as np
import torch
from torch.utils.data import DataLoader

from toolkit.data import build_dataset
from toolkit.data.transforms import PREPROCESS_PRESETS, SSDTrainTransform, collate_detection
from toolkit.engine import AugmentedDataset, EpochSampler, normalized_targets
from toolkit.models.build import INPUTS, MODELS, build_model
from toolkit.models.multibox_loss import MultiBoxLoss, MultiBoxLossParams


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dsod300", choices=sorted(MODELS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="training steps per timed window")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loader-batches", type=int, default=30)
    p.add_argument("--data-root", type=Path, default=None)
    args = p.parse_args()

    spec = INPUTS[args.model]
    dataset = build_dataset("shapes", "train", root=args.data_root)
    transform = SSDTrainTransform(spec.size, PREPROCESS_PRESETS[spec.preprocess])
    train_set = AugmentedDataset(dataset, transform, seed=0)
    classes = len(dataset.classes)
    print(f"model {args.model} ({spec.size}x{spec.size}), batch {args.batch_size}, {classes} classes; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}")

    # 1. training on ready batches
    batches = [collate_detection([train_set[(b * args.batch_size + i) % len(train_set)]
                                  for i in range(args.batch_size)]) for b in range(args.steps)]
    model = build_model(args.model, classes).train()
    criterion = MultiBoxLoss(MultiBoxLossParams(num_classes=classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def step(images, targets):
        out = model(images)
        loss = criterion(out["loc"], out["conf"], out["priors"], out["variances"],
                         normalized_targets(targets, (spec.size, spec.size), torch.device("cpu")))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(*batches[0])  # warm-up
    best = float("inf")
    for _ in range(args.repeat):
        t = time.perf_counter()
        for images, targets in batches:
            step(images, targets)
        best = min(best, time.perf_counter() - t)
    train_ips = args.steps * args.batch_size / best

    # 2. the loader alone
    sampler = EpochSampler(len(train_set), args.batch_size, True, 0)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        collate_fn=collate_detection, drop_last=True)
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not timed
    t = time.perf_counter()
    n = 0
    for _ in range(args.loader_batches):
        images, _ = next(it)
        n += images.shape[0]
    loader_ips = n / (time.perf_counter() - t)

    print(f"{'':24}{'images/s':>10}")
    print(f"{'training step':24}{train_ips:>10.1f}")
    print(f"{'loader (' + str(args.workers) + ' workers)':24}{loader_ips:>10.1f}")
    print(f"ratio loader / training: {loader_ips / train_ips:.2f}x "
          f"({'the loader keeps up' if loader_ips >= train_ips else 'the loader is the bottleneck'})")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
