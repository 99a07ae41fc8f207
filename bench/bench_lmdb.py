"""Read + decode throughput: SSD LMDB (``LMDBDetection``) against a VOC JPEG folder (``VOCDetection``).

What it measures
----------------
1. ``--num-images`` 500x375 JPEGs with VOC XMLs are written (SHAPES renders
   resized to VOC's typical size, as ``bench_data_pipeline.py`` writes them), and
   from them an SSD LMDB of encoded records with ``converters.lmdb`` ``from-voc``
   (what ``convert_annoset`` writes: the same JPEG bytes inside
   ``AnnotatedDatum`` records).  So both sides decode identical JPEG bytes, and
   the script checks that they yield identical images and targets.
2. Images/s of iterating ``DataLoader(dataset, batch_size, shuffle=True,
   num_workers=W, collate_fn=list)`` with no transform, i.e. what each reader
   costs: VOC = read the XML and parse it + read the JPEG file + decode;
   LMDB = one LMDB lookup + protobuf parse + decode (boxes were indexed when the
   dataset was built; that scan is timed separately).  As in
   ``bench_data_pipeline.py`` the first batch of the run is a warm-up and is not
   counted, and the two datasets alternate within each repeat; best of
   ``--repeat``.
3. In this process, the mean time per image of each reader's stages.

Workers send each target's tensors back through ``torch.multiprocessing``:
with PyTorch's default strategy on Linux (``file_descriptor``, one descriptor
passed per tensor) that costs more than reading and decoding, for both readers
alike; ``--sharing-strategy file_system`` (the default here) removes most of it.

Both the files and the LMDB are read from the page cache after the first pass
(they are in a temporary folder or ``--root``): this compares the readers'
CPU cost, not disks.  The goal is LMDB / VOC >= 1.0.

Run from the repository root::

    .venv/bin/python bench/bench_lmdb.py
    .venv/bin/python bench/bench_lmdb.py --num-images 512 --epochs 3 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

from benchutil import OtherLoad, cpu_name  # also puts the repo root on sys.path if needed

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from bench_data_pipeline import IMAGE_HEIGHT, IMAGE_WIDTH, SPLIT, write_dataset
from converters.lmdb.annoset import AnnosetOptions, convert_annoset
from toolkit.data.caffe_lmdb import LMDBDetection, SkippedRecordsWarning, decode_datum_image
from toolkit.data.shapes import SHAPES_CLASSES, SUBDIR, labelmap_text
from toolkit.data.voc import VOCDetection, parse_voc_xml


def build(root: Path, num_images: int, seed: int) -> tuple[VOCDetection, LMDBDetection, float]:
    """The VOC folder (written or reused by ``bench_data_pipeline.write_dataset``), its LMDB, and
    the seconds ``LMDBDetection`` took to index the LMDB."""
    devkit = write_dataset(root / "voc", num_images, seed)
    folder = devkit / SUBDIR
    ids = (folder / "ImageSets" / "Main" / f"{SPLIT}.txt").read_text().split()
    (root / "list.txt").write_text("".join(f"JPEGImages/{i}.jpg Annotations/{i}.xml\n" for i in ids))
    (root / "labelmap.prototxt").write_text(labelmap_text())
    lmdb_dir = root / "lmdb"
    convert_annoset(folder, root / "list.txt", lmdb_dir, root / "labelmap.prototxt", AnnosetOptions(),
                    overwrite=True, progress=False)
    voc = VOCDetection(devkit, [(SUBDIR, SPLIT)], classes=SHAPES_CLASSES)
    start = time.perf_counter()
    lmdb_ds = LMDBDetection(lmdb_dir, labelmap=root / "labelmap.prototxt")
    return voc, lmdb_ds, time.perf_counter() - start


def _rows(target: dict) -> np.ndarray:
    # convert_annoset groups the boxes by label; compare as sets of (label, box, difficult) rows.
    rows = np.column_stack([target["labels"].numpy(), target["boxes"].numpy(), target["difficult"].numpy()])
    return rows[np.lexsort(rows.T[::-1])]


def check_same(voc: VOCDetection, lmdb_ds: LMDBDetection, count: int = 8) -> None:
    """Fail unless both readers give the same images and boxes (the comparison is fair)."""
    assert len(voc) == len(lmdb_ds), (len(voc), len(lmdb_ds))
    for i in np.linspace(0, len(voc) - 1, min(count, len(voc))).astype(int):
        image_a, target_a = voc[i]
        image_b, target_b = lmdb_ds[i]
        if not (np.array_equal(image_a, image_b) and np.array_equal(_rows(target_a), _rows(target_b))):
            raise SystemExit(f"error: item {i} differs between the VOC folder and the LMDB")


def _as_list(batch):
    return batch


def _worker_init(worker_id: int) -> None:
    # As in bench_data_pipeline.py: parallelism across images, so OpenCV runs serially in workers.
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def measure_loader(dataset, workers: int, batch_size: int, epochs: int, seed: int) -> dict:
    """Images/s of iterating the DataLoader, leaving out the run's first batch (warm-up)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=_as_list,
                        worker_init_fn=_worker_init if workers > 0 else None,
                        generator=torch.Generator().manual_seed(seed), persistent_workers=False)
    start = time.perf_counter()
    timed_from: Optional[float] = None
    images = total = 0
    for _ in range(epochs):
        for batch in loader:
            total += len(batch)
            if timed_from is None:
                timed_from = time.perf_counter()
                continue
            images += len(batch)
    end = time.perf_counter()
    assert timed_from is not None
    return {"images_per_s": images / (end - timed_from), "end_to_end_per_s": total / (end - start)}


def measure_stages(voc: VOCDetection, lmdb_ds: LMDBDetection) -> dict[str, dict[str, float]]:
    """Mean seconds per image of each reader's stages, in this process."""
    n = len(voc)
    v = {"read + parse XML": 0.0, "read JPEG file": 0.0, "decode": 0.0}
    m = {"LMDB get + protobuf parse": 0.0, "decode": 0.0}
    for i in range(n):
        t0 = time.perf_counter()
        parse_voc_xml(voc.annotation_path(i))
        t1 = time.perf_counter()
        data = np.fromfile(voc.image_path(i), dtype=np.uint8)  # as read_image_bgr, which VOCDetection uses
        t2 = time.perf_counter()
        cv2.imdecode(data, cv2.IMREAD_COLOR)
        t3 = time.perf_counter()
        record = lmdb_ds.read_record(i)
        t4 = time.perf_counter()
        decode_datum_image(record.datum, record.key)
        t5 = time.perf_counter()
        v["read + parse XML"] += t1 - t0
        v["read JPEG file"] += t2 - t1
        v["decode"] += t3 - t2
        m["LMDB get + protobuf parse"] += t4 - t3
        m["decode"] += t5 - t4
    return {"VOC": {k: t / n for k, t in v.items()}, "LMDB": {k: t / n for k, t in m.items()}}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "bench_lmdb.py",
        description="Read + decode images/s: SSD LMDB against a VOC JPEG folder, with 0 and 2 DataLoader workers.",
        add_help=add_help,
    )
    parser.add_argument("--num-images", type=int, default=512, help="images in the dataset (default 512)")
    parser.add_argument("--epochs", type=int, default=2, help="passes per measurement (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts (default 0 2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per reader and worker count, best kept")
    parser.add_argument("--root", type=Path, default=None, help="folder to write/reuse the data in (default: temp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sharing-strategy", choices=("file_system", "file_descriptor"), default="file_system",
                        help="torch.multiprocessing sharing strategy for the tensors workers send back (default "
                             "file_system; PyTorch's default on Linux, file_descriptor, passes one file descriptor "
                             "per target tensor and halves both readers' throughput with workers)")
    return parser


def run(args: argparse.Namespace, root: Path, where: str) -> None:
    other = OtherLoad()
    start = time.perf_counter()
    voc, lmdb_ds, index_s = build(root, args.num_images, args.seed)
    print(f"(wrote / reused the data in {time.perf_counter() - start:.1f} s)")
    check_same(voc, lmdb_ds)
    lmdb_bytes = (lmdb_ds.path / "data.mdb").stat().st_size
    print(f"data: {len(voc)} JPEGs of {IMAGE_WIDTH}x{IMAGE_HEIGHT} in {where}: a VOC folder and the same JPEG bytes "
          f"in an SSD LMDB ({lmdb_bytes / 2**20:.1f} MiB, encoded AnnotatedDatum records)")
    print(f"LMDBDetection indexed the LMDB (every record's protobuf and boxes) in {index_s * 1e3:.0f} ms "
          f"({index_s / len(lmdb_ds) * 1e6:.0f} us per record), once, before any DataLoader")
    print(f"loader: DataLoader(dataset, batch {args.batch_size}, shuffle, collate=list), no transform, "
          f"{args.epochs} epoch(s), persistent_workers=False, tensor sharing strategy {args.sharing_strategy}")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores")
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"opencv {cv2.__version__}")

    stages = measure_stages(voc, lmdb_ds)
    print(f"\nPer-image stage time, in this process (mean over {len(voc)} images)")
    for reader, parts in stages.items():
        total = sum(parts.values())
        detail = ", ".join(f"{name} {t * 1e3:.3f}" for name, t in parts.items())
        print(f"  {reader:<5} {total * 1e3:6.3f} ms  ({detail})")
    print(f"  ratio VOC / LMDB time: {sum(stages['VOC'].values()) / sum(stages['LMDB'].values()):.2f}x")

    best: dict[tuple[str, int], dict] = {}
    for _ in range(args.repeat):
        for w in args.workers:
            for name, ds in (("VOC", voc), ("LMDB", lmdb_ds)):
                r = measure_loader(ds, w, args.batch_size, args.epochs, args.seed)
                if (name, w) not in best or r["images_per_s"] > best[name, w]["images_per_s"]:
                    best[name, w] = r
    print(f"\nDataLoader read + decode throughput (best of {args.repeat}; 'images/s' leaves out the first batch, "
          "'end-to-end' counts every batch and worker start-up)")
    print(f"  {'workers':>7}{'VOC img/s':>12}{'LMDB img/s':>12}{'LMDB/VOC':>10}"
          f"{'VOC e2e/s':>12}{'LMDB e2e/s':>12}{'LMDB/VOC':>10}")
    for w in args.workers:
        a, b = best["VOC", w], best["LMDB", w]
        print(f"  {w:>7}{a['images_per_s']:>12.1f}{b['images_per_s']:>12.1f}"
              f"{b['images_per_s'] / a['images_per_s']:>9.2f}x"
              f"{a['end_to_end_per_s']:>12.1f}{b['end_to_end_per_s']:>12.1f}"
              f"{b['end_to_end_per_s'] / a['end_to_end_per_s']:>9.2f}x")
    per_epoch = -(-len(voc) // args.batch_size)
    if per_epoch < 4 * max(args.workers):
        print(f"note: {per_epoch} batches per epoch for up to {max(args.workers)} workers: read 'end-to-end', "
              "or raise --num-images")
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
    warnings.simplefilter("error", SkippedRecordsWarning)  # a skipped record would make the comparison unfair
    # Both readers return targets as 4 small tensors per image; how workers share them dominates
    # the cost with workers, so it is one setting for both and printed.
    torch.multiprocessing.set_sharing_strategy(args.sharing_strategy)
    if args.root is not None:
        args.root.mkdir(parents=True, exist_ok=True)
        run(args, args.root, str(args.root))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_lmdb_") as tmp:
        run(args, Path(tmp), "a temporary folder")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
