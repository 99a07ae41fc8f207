"""Train-pipeline throughput at VOC's typical 500x375 image size, 0 vs 2 DataLoader workers.

What it measures
----------------
1. A VOCdevkit-shaped dataset of ``--num-images`` JPEGs of exactly 500x375 with
   VOC XML annotations is written (to a temporary folder, or ``--root``).  The
   images are SHAPES renders (:func:`toolkit.data.shapes.render_image`, sizes
   200..400 px) resized to 500x375; their boxes are scaled with them (see
   :func:`fixed_size_render`).  Deterministic: same ``--seed``, same bytes.
2. Images/s of iterating
   ``DataLoader(VOCDetection(..., transform=SSDTrainTransform(300)), batch_size,
   shuffle=True, num_workers=W, collate_fn=collate_detection, persistent_workers=False)``
   for every W of ``--workers`` over ``--epochs`` passes.  The first batch of the
   run is a warm-up and is not counted; later epochs do include the start-up of
   their (non-persistent) workers, because that is what training pays.
3. The time of each stage of one image, in this process, averaged over the
   images: XML parse, JPEG decode, photometric distortion, expand + batch
   sampling + crop, warp + mirror, preprocessing to a tensor.  The augmentation
   stages are timed by ``SSDTrainTransform.augment(timings=...)`` itself, so the
   breakdown is of the real transform.

Run from the repository root::

    .venv/bin/python bench/bench_data_pipeline.py
    .venv/bin/python bench/bench_data_pipeline.py --num-images 512 --epochs 3 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from benchutil import OtherLoad, cpu_name  # also puts the repo root on sys.path if needed

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from toolkit.data import transforms as T
from toolkit.data.shapes import (
    SHAPES_CLASSES,
    SUBDIR,
    RenderedImage,
    ShapeAnnotation,
    annotation_xml,
    encode_jpeg,
    render_image,
)
from toolkit.data.voc import VOCDetection, parse_voc_xml, read_image_bgr

IMAGE_WIDTH, IMAGE_HEIGHT = 500, 375  # the most common PASCAL VOC image size
SPLIT = "train"
_STAMP = "BENCH_DATASET.json"  # marks a --root this script wrote (and may reuse or rewrite)


# ---------------------------------------------------------------------------
# The fixed-size dataset
# ---------------------------------------------------------------------------


def fixed_size_render(seed: int, index: int, width: int = IMAGE_WIDTH, height: int = IMAGE_HEIGHT) -> RenderedImage:
    """SHAPES image ``index`` resized to ``width x height``, with its boxes scaled.

    A visible-pixel box covering 0-based columns ``c0..c1`` is the continuous
    interval ``[c0, c1 + 1)`` (see :mod:`toolkit.data.voc`); it is scaled by
    ``width / W`` and its edges rounded to whole pixels, then written back in
    VOC's 1-based inclusive integers (``xmin = e0 + 1``, ``xmax = e1``).  Every
    box keeps at least one pixel per side.
    """
    rendered = render_image(seed, SPLIT, index)
    sx, sy = width / rendered.width, height / rendered.height
    interp = cv2.INTER_AREA if min(sx, sy) < 1.0 else cv2.INTER_LINEAR
    image = cv2.resize(rendered.image_bgr, (width, height), interpolation=interp)
    annotations = []
    for ann in rendered.annotations:
        xmin, ymin, xmax, ymax = ann.bbox_voc
        x0, x1 = round((xmin - 1) * sx), round(xmax * sx)
        y0, y1 = round((ymin - 1) * sy), round(ymax * sy)
        x1, y1 = min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)
        annotations.append(
            ShapeAnnotation(ann.name, (x0 + 1, y0 + 1, x1, y1), ann.difficult, ann.truncated, ann.visible_fraction)
        )
    return RenderedImage(rendered.image_id, image, [], annotations)


def write_dataset(root: Path, num_images: int, seed: int) -> Path:
    """Write (or reuse) ``<root>/VOCdevkit/SHAPES`` with ``num_images`` 500x375 images.

    A folder written by this function carries ``BENCH_DATASET.json``; it is reused
    when that records the same parameters and rewritten otherwise.  A non-empty
    folder without it is never touched.

    Returns:
        The ``VOCdevkit`` folder.
    """
    params = {"seed": seed, "num_images": num_images, "size_wh": [IMAGE_WIDTH, IMAGE_HEIGHT], "split": SPLIT}
    stamp = root / _STAMP
    devkit = root / "VOCdevkit"
    if root.exists() and any(root.iterdir()):
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, ValueError):
            raise SystemExit(f"error: {root} is not empty and was not written by this benchmark; choose another --root")
        if recorded == params:
            return devkit
    folder = devkit / SUBDIR
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)  # written last: a killed run is not reused
    ids = []
    for index in range(num_images):
        rendered = fixed_size_render(seed, index)
        (folder / "JPEGImages" / f"{rendered.image_id}.jpg").write_bytes(encode_jpeg(rendered.image_bgr))
        (folder / "Annotations" / f"{rendered.image_id}.xml").write_text(annotation_xml(rendered))
        ids.append(rendered.image_id)
    (folder / "ImageSets" / "Main" / f"{SPLIT}.txt").write_text("".join(f"{i}\n" for i in ids))
    stamp.write_text(json.dumps(params) + "\n")
    return devkit


# ---------------------------------------------------------------------------
# DataLoader throughput
# ---------------------------------------------------------------------------


def _worker_init(worker_id: int) -> None:
    # Two cores: with W workers each busy on one image, OpenCV's own thread pool
    # (one thread per core by default, used by resize/cvtColor on large images)
    # would put 2 x W threads on 2 cores and make them preempt each other; the
    # parallelism we want is across images, so each worker runs OpenCV serially
    # (0 = "no threading" in OpenCV's API).  It also keeps OpenCV from starting a
    # thread pool inherited half-initialised across fork.  torch: the DataLoader
    # already calls torch.set_num_threads(1) in its workers; stated here so the
    # setting is visible where the other one is made.
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def measure_loader(dataset: VOCDetection, workers: int, batch_size: int, epochs: int, seed: int) -> dict:
    """Iterate the train DataLoader for ``epochs`` passes and time it two ways.

    ``images_per_s`` (the headline figure): images after the first batch of the
    run over the time from that batch's arrival to the last one.
    ``end_to_end_per_s``: every image over the whole iteration, worker start-up
    of every epoch included.  With W > 0 workers the first figure is biased up:
    while the excluded first batch was being built, the other W - 1 workers were
    building theirs, so that work lands inside the timed window for free.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the main process's augmentation stream (W = 0)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=T.collate_detection,
        persistent_workers=False,
        worker_init_fn=_worker_init if workers > 0 else None,
        generator=generator,
    )
    start = time.perf_counter()
    timed_from: Optional[float] = None
    images = total_images = 0
    for _ in range(epochs):
        for batch_images, _targets in loader:
            total_images += batch_images.shape[0]
            if timed_from is None:
                timed_from = time.perf_counter()
                continue
            images += batch_images.shape[0]
    end = time.perf_counter()
    assert timed_from is not None
    return {
        "workers": workers,
        "images": images,
        "seconds": end - timed_from,
        "images_per_s": images / (end - timed_from),
        "first_batch_s": timed_from - start,
        "end_to_end_per_s": total_images / (end - start),
    }


# ---------------------------------------------------------------------------
# Per-stage breakdown
# ---------------------------------------------------------------------------

STAGES = ("parse XML", "decode JPEG", "distort", "expand + crop", "warp + mirror", "preprocess")


def measure_stages(dataset: VOCDetection, transform: T.SSDTrainTransform, seed: int) -> dict[str, float]:
    """Mean seconds per image of every stage in :data:`STAGES`, over the whole dataset.

    The augmentation stages come from ``SSDTrainTransform.augment(timings=...)``, the
    transform's own instrumentation, so the breakdown is the code that trains.
    """
    totals = dict.fromkeys(STAGES, 0.0)
    for i in range(len(dataset)):
        t = time.perf_counter()
        ann = parse_voc_xml(dataset.annotation_path(i))
        totals["parse XML"] += time.perf_counter() - t
        t = time.perf_counter()
        image = read_image_bgr(dataset.image_path(i))
        totals["decode JPEG"] += time.perf_counter() - t
        target = dataset._target_from(ann, dataset.items[i][1], image.shape[:2])
        image, _ = transform.augment(image, target, rng=np.random.default_rng([seed, 1, i]), timings=totals)
        t = time.perf_counter()
        transform.preprocess(image)
        totals["preprocess"] += time.perf_counter() - t
    return {name: total / len(dataset) for name, total in totals.items()}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def environment() -> list[str]:
    return [
        f"CPU: {cpu_name()}, {os.cpu_count()} logical cores",
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"opencv {cv2.__version__}",
        f"threads in this process: torch {torch.get_num_threads()}, opencv {cv2.getNumThreads()}; "
        "in workers: torch 1, opencv 0 (serial)",
    ]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "bench_data_pipeline.py",
        description="SSD300 train-pipeline throughput on 500x375 JPEGs, with 0 and 2 DataLoader workers.",
        add_help=add_help,
    )
    parser.add_argument("--num-images", type=int, default=256, help="images in the dataset (default 256)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the dataset per worker count (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts to compare (default 0 2)")
    parser.add_argument("--root", type=Path, default=None, help="dataset folder to write/reuse (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per worker count, best kept (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=300, help="network input size (default 300)")
    return parser


def run(args: argparse.Namespace, devkit: Path, where: str) -> None:
    other = OtherLoad()
    transform = T.SSDTrainTransform(args.size)
    dataset = VOCDetection(devkit, [(SUBDIR, SPLIT)], classes=SHAPES_CLASSES, transform=transform)

    print(f"dataset: {len(dataset)} JPEGs of {IMAGE_WIDTH}x{IMAGE_HEIGHT} in {where}")
    print(f"pipeline: VOCDetection -> SSDTrainTransform({args.size}) -> collate_detection, batch {args.batch_size}, "
          f"shuffle, {args.epochs} epoch(s), persistent_workers=False")
    for line in environment():
        print(line)

    stages = measure_stages(dataset, transform, args.seed)
    total = sum(stages.values())
    print(f"\nPer-image stage time, in this process (mean over {len(dataset)} images)")
    print(f"  {'stage':<22}{'ms':>8}{'share':>8}")
    for name in STAGES:
        print(f"  {name:<22}{stages[name] * 1e3:>8.2f}{stages[name] / total:>8.1%}")
    print(f"  {'total':<22}{total * 1e3:>8.2f}{1:>8.1%}   (= {1 / total:.0f} images/s on one core, no DataLoader)")

    # Worker counts alternate within each repeat, so that a slow spell of a shared
    # machine hits all of them rather than one; the best repeat of each is kept.
    best: dict[int, dict] = {}
    for _ in range(args.repeat):
        for w in args.workers:
            r = measure_loader(dataset, w, args.batch_size, args.epochs, args.seed)
            if w not in best or r["images_per_s"] > best[w]["images_per_s"]:
                best[w] = r
    print(f"\nDataLoader throughput (best of {args.repeat}; 'images/s' excludes the run's first batch, "
          "'end-to-end' counts every batch and worker start-up)")
    print(f"  {'workers':>7}{'images':>8}{'seconds':>9}{'images/s':>10}{'ms/image':>10}"
          f"{'1st batch s':>13}{'end-to-end/s':>14}")
    for w in args.workers:
        r = best[w]
        print(f"  {w:>7}{r['images']:>8}{r['seconds']:>9.2f}{r['images_per_s']:>10.1f}"
              f"{1e3 / r['images_per_s']:>10.2f}{r['first_batch_s']:>13.2f}{r['end_to_end_per_s']:>14.1f}")
    if 0 in best:
        for w in args.workers:
            if w > 0:
                steady = best[w]["images_per_s"] / best[0]["images_per_s"]
                end_to_end = best[w]["end_to_end_per_s"] / best[0]["end_to_end_per_s"]
                print(f"ratio {w} workers / 0 workers: {steady:.2f}x images/s, {end_to_end:.2f}x end-to-end")
    per_epoch = -(-len(dataset) // args.batch_size)
    if per_epoch < 4 * max(args.workers):
        print(f"note: {per_epoch} batches per epoch for up to {max(args.workers)} workers: the 'images/s' "
              "figures are dominated by the warm-up bias; read 'end-to-end', or raise --num-images")
    busy = other.cores()
    if busy is not None:
        note = "" if busy < 0.1 else "  <- the machine was not idle: the figures above are not trustworthy"
        print(f"other processes used {busy:.2f} of {os.cpu_count()} cores during the measurements{note}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    batches = -(-args.num_images // args.batch_size) * args.epochs
    if batches < 2 or min(args.workers) < 0 or args.repeat < 1:
        print("error: need at least 2 batches in all (the first is a warm-up), --workers >= 0, --repeat >= 1",
              file=sys.stderr)
        return 2
    if args.root is not None:
        run(args, write_dataset(args.root, args.num_images, args.seed), str(args.root))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_data_pipeline_") as tmp:
        start = time.perf_counter()
        devkit = write_dataset(Path(tmp), args.num_images, args.seed)
        print(f"(wrote the dataset in {time.perf_counter() - start:.1f} s)")
        run(args, devkit, "a temporary folder")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
