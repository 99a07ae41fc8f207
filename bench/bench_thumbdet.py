"""ThumbDet: full size against bicubic and learned 2x / 4x thumbnails -- VOC07 mAP, parameters, GFLOPs, latency.

Each variant is a ``toolkit.train`` checkpoint (the full-size teacher, or a
``--distill thumbdet`` student); its mAP is the ``metrics.json`` beside it (the
run's final evaluation on the test split).  Latency is end to end on one
full-size test image, batch 1: the test transform's output in, detections out
(down-sampler, detector and post-processing: DetectionOutput's NMS for the SSD
family, top-k for DETR), float32, eval mode, ``torch.no_grad``, trained weights
(the NMS workload depends on them).  Rounds time the variants back to back
after a warm-up, each once for the network alone (down-sampler and detector, no
post-processing) and once end to end; each variant's speed-ups over the
full-size model are the medians of the per-round ratios, with their range.
GFLOPs: ``torch.utils.flop_counter`` (multiply-adds count 2; the deformable
attention op by the formula it registers, see ``toolkit.ops.ms_deform_attn``),
post-processing left out.

``--compile`` times each variant through ``torch.compile`` (inductor, its default mode: fused
kernels, fewer per-operation costs) instead of eager PyTorch; each variant compiles once before
the warm-up, GFLOPs are still counted on the eager model.  It asks whether the speed-ups are
bounded by per-operation overheads, which compilation removes, or by work that does not shrink
with the input (a DETR's decoder queries).

``--figure PATH`` also draws the thumbnails of a few test images, each
variant's beside the others (nearest-neighbour enlarged to one size, so their
pixels show), under the full-size input.

``--untrained PRESET`` times a preset's architecture instead of trained
checkpoints: the preset at full size and with bicubic and learned 2x / 4x
thumbnails, freshly initialised (seed 0), on the dataset's test image at the
preset's own input size (e.g. ``dsod300`` at 300 px, ``deformable_detr`` at
800 px on the short side, 1,333 at most): what a thumbnail buys where the
convolutions, not the per-layer overheads of a 160-px CPU preset, dominate.
An untrained SSD-family head spreads its scores over the classes (on
``shapes``' 6 classes, ``dsod300``'s lowest is 0.015), so every score clears
DetectionOutput's 0.01 threshold, every class keeps its 400 top candidates and
200 detections come out, in every variant: the NMS workload of a trained model
is lighter, and the end-to-end speed-ups conservative.  A DETR's top-k does not
depend on the weights.

Run from the repository root, e.g.::

    .venv/bin/python bench/bench_thumbdet.py --dataset shapes full=runs/main/checkpoint.pth \\
        bicubic2=runs/td_b2/checkpoint.pth learned2=runs/td_l2/checkpoint.pth \\
        bicubic4=runs/td_b4/checkpoint.pth learned4=runs/td_l4/checkpoint.pth [--threads 2] [--rounds 30] \
        [--figure docs/thumbdet_thumbnails.png] [--compile]
    .venv/bin/python bench/bench_thumbdet.py --dataset shapes --untrained dsod300 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

# benchutil also puts the repo root on sys.path if needed
from benchutil import OtherLoad, cpu_name


def model_inputs(images):
    """What the model's forward takes, from a collated batch (DETR: images and mask)."""
    return images if isinstance(images, (tuple, list)) else (images,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", metavar="NAME=CHECKPOINT",
                        help="the first is the full-size reference of the speed-ups")
    parser.add_argument("--untrained", metavar="PRESET",
                        help="time this preset's architecture, untrained, at full size and with each thumbnail")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--image-index", type=int, default=0, help="which test image to time")
    parser.add_argument("--figure", type=Path, help="write the thumbnails of --figure-images test images here (PNG)")
    parser.add_argument("--figure-images", type=int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="time each variant through torch.compile (inductor) instead of eager PyTorch")
    args = parser.parse_args()

    from torch.utils.flop_counter import FlopCounterMode

    from toolkit.data import build_dataset
    from toolkit.engine import inference_setup, load_trained_model, predict_batch
    from toolkit.models.thumbnail import find_thumbnailer

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if bool(args.variants) == bool(args.untrained):
        parser.error("give either NAME=CHECKPOINT variants or --untrained PRESET")
    if args.untrained and args.figure is not None:
        parser.error("--figure draws trained thumbnails: it does not go with --untrained")
    if args.untrained:
        num_classes = len(build_dataset(args.dataset, "test", root=args.data_root).classes)
        variants = untrained_variants(args.untrained, num_classes)
    else:
        variants = {}
        for item in args.variants:
            name, _, path = item.partition("=")
            if not path:
                raise SystemExit(f"give NAME=CHECKPOINT, got {item!r}")
            model, classes, model_name = load_trained_model(path, device)
            metrics = Path(path).with_name("metrics.json")
            mAP = json.loads(metrics.read_text()).get("mAP") if metrics.is_file() else None
            variants[name] = (model, model_name, len(classes), mAP)
    _, model_name, num_classes, _ = next(iter(variants.values()))
    setup = inference_setup(model_name, num_classes)
    test = build_dataset(args.dataset, "test", root=args.data_root, transform=setup.transform)
    inputs, _ = setup.collate([test[args.image_index]])
    size = "x".join(map(str, model_inputs(inputs)[0].shape[-2:]))
    print(f"{model_name}{' (untrained)' if args.untrained else ''} on one {args.dataset} test image at {size}, "
          f"batch 1, float32, {cpu_name()}, {args.threads} threads, torch {torch.__version__}"
          f"{', torch.compile (inductor)' if args.compile else ', eager'}")

    rows = {}
    for name, (model, _, _, mAP) in variants.items():
        thumb = find_thumbnailer(model)
        counter = FlopCounterMode(display=False)
        with counter:  # not under no_grad: the counter's module hooks fail on DETR's no_grad parameter views
            model(*model_inputs(inputs))
        rows[name] = dict(mAP=mAP, params=sum(p.numel() for p in model.parameters()),
                          gflops=counter.get_total_flops() / 1e9,
                          thumb="full" if thumb is None else f"{thumb.mode} {thumb.scale}x")
    timed = {name: v[0] for name, v in variants.items()}
    if args.compile:
        with torch.no_grad():
            for name, model in timed.items():
                t0 = time.perf_counter()
                timed[name] = torch.compile(model)
                timed[name](*model_inputs(inputs))
                print(f"  compiled {name} in {time.perf_counter() - t0:.0f} s")
    # per round and variant: the network alone (down-sampler and detector), then end to end
    network = {name: [] for name in variants}
    times = {name: [] for name in variants}
    load = OtherLoad()
    with torch.no_grad():
        for model in timed.values():
            predict_batch(model, inputs, device, setup.predict_fn, setup.params)  # warm-up
        for _ in range(args.rounds):
            for name, model in timed.items():
                t0 = time.perf_counter()
                model(*model_inputs(inputs))
                network[name].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                predict_batch(model, inputs, device, setup.predict_fn, setup.params)
                times[name].append(time.perf_counter() - t0)
    reference = next(iter(variants))

    def speedup(samples: dict, name: str) -> str:
        ratios = sorted(r / t for r, t in zip(samples[reference], samples[name]))
        return f"{statistics.median(ratios):5.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f}x)"

    print(f"  {'variant':12} {'input':>12} {'VOC07 mAP':>9} {'params':>10} {'GFLOPs':>7} {'network ms':>10} "
          f"{'speed-up (range)':>20} {'end-to-end ms':>13} {'speed-up (range)':>20}")
    for name, row in rows.items():
        mAP = "-" if row["mAP"] is None else f"{100 * row['mAP']:.1f}"
        print(f"  {name:12} {row['thumb']:>12} {mAP:>9} {row['params']:>10,} {row['gflops']:7.3f} "
              f"{statistics.median(network[name]) * 1e3:10.2f} {speedup(network, name):>20} "
              f"{statistics.median(times[name]) * 1e3:13.2f} {speedup(times, name):>20}")
    cores = load.cores()
    if cores is not None:
        print(f"other processes used {cores:.2f} cores during the measurements")
    if args.figure is not None:
        students = {name: find_thumbnailer(v[0]) for name, v in variants.items()}
        students = {name: t for name, t in students.items() if t is not None}
        if not students:
            raise SystemExit("--figure needs at least one thumbnail student among the variants")
        batch, _ = setup.collate([test[i] for i in range(args.figure_images)])
        draw_thumbnails(students, model_inputs(batch)[0], rows, args.figure)
        print(f"wrote {args.figure}")


def untrained_variants(preset: str, num_classes: int) -> dict:
    """``{name: (model in eval mode, preset, num_classes, None)}``: ``preset`` freshly initialised (seed 0) at full
    size, then with bicubic and learned 2x and 4x thumbnails; ``num_classes`` includes the background."""
    from dataclasses import replace

    from toolkit.engine import add_ssd_thumbnail
    from toolkit.models.build import MODELS, build_model
    from toolkit.models.detr.training import DETR_PRESETS, build_detr_model, preset_config

    if preset not in MODELS and preset not in DETR_PRESETS:
        raise SystemExit(f"--untrained: unknown preset {preset!r}; choose from {sorted({*MODELS, *DETR_PRESETS})}")
    variants = {}
    for name, scale, mode in (("full", 1, "learned"), ("bicubic2", 2, "bicubic"), ("learned2", 2, "learned"),
                              ("bicubic4", 4, "bicubic"), ("learned4", 4, "learned")):
        torch.manual_seed(0)
        if preset in DETR_PRESETS:  # the DETR head counts foreground classes only
            cfg = replace(preset_config(preset, num_classes - 1), thumb_scale=scale, thumb_mode=mode)
            model = build_detr_model(cfg)
        else:
            model = add_ssd_thumbnail(build_model(preset, num_classes), preset, scale, mode)
        variants[name] = (model.eval(), preset, num_classes, None)
    return variants


def draw_thumbnails(students: dict, images: torch.Tensor, rows: dict, path: Path) -> None:
    """One row per image: the full-size input, then each student's thumbnail ([0, 1] RGB, clamped as a stored
    image would be), enlarged by nearest neighbour to the input's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(students.values()))
    with torch.no_grad():
        pixels = first.to_pixels(images)  # the normalized full-size batch back to [0, 1] RGB
        thumbs = {name: t.downsample(pixels).clamp(0, 1) for name, t in students.items()}
    n, cols = images.shape[0], 1 + len(students)
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.3 * n), squeeze=False)
    for i in range(n):
        panels = [("input " + "x".join(map(str, pixels.shape[-2:])), pixels[i])]
        for name, thumb in thumbs.items():
            mAP = rows[name]["mAP"]
            label = f"{rows[name]['thumb']} {'x'.join(map(str, thumb.shape[-2:]))}"
            panels.append((label + ("" if mAP is None else f"\nmAP {100 * mAP:.1f}"), thumb[i]))
        for ax, (title, image) in zip(axes[i], panels):
            ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
