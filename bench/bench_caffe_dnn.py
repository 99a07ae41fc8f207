"""Latency of a converted Caffe net against OpenCV DNN running the same files, side by side.

What it measures
----------------
DSOD300 (``dsod300/deploy.prototxt`` + ``random_init.caffemodel`` of the shared
Caffe fixtures) at batch 1, 300x300, on the fixture's input, computing
``mbox_loc``, ``mbox_conf`` and ``detection_out``:

* **OpenCV**: ``cv2.dnn.readNetFromCaffe``, ``DNN_BACKEND_OPENCV`` on the CPU;
* **ours, plain**: :class:`converters.caffe.CaffeNet` (the layer-by-layer
  interpreter) under ``torch.inference_mode``, only the layers the three blobs need;
* **ours, optimized**: :func:`converters.caffe.optimize.optimize_for_inference`
  of that net for the three blobs.

Both libraries get ``--threads`` threads (default 2).  After ``--warmup`` runs
of each, the three are timed in turn, ``--iters`` rounds (so that machine noise
hits all of them alike); the medians and their ratios to OpenCV are printed,
with the CPU other processes took meanwhile.  The outputs are checked too: max
abs difference of each blob between OpenCV and ours, and against real Caffe's
(the fixture).  OpenCV lists detections by descending score, Caffe by label
then score: rows are compared in Caffe's order.

Fixtures: ``$TOOLKIT_FIXTURES/caffe/dsod300`` (default ``../shared/fixtures``
beside the repository).

Run from the repository root::

    .venv/bin/python bench/bench_caffe_dnn.py
    .venv/bin/python bench/bench_caffe_dnn.py --iters 10 --no-plain
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from benchutil import OtherLoad, cpu_name  # also puts the repo root on sys.path if needed

import cv2
import numpy as np
import torch

from converters.caffe import load_caffe_net
from converters.caffe.optimize import mkldnn_conv_available, optimize_for_inference

REPO_ROOT = Path(__file__).resolve().parents[1]
BLOBS = ["mbox_loc", "mbox_conf", "detection_out"]


def fixtures_root() -> Path:
    return Path(os.environ.get("TOOLKIT_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


def caffe_order(rows: np.ndarray) -> np.ndarray:
    """``detection_out`` rows ``(1, 1, R, 7)`` sorted as Caffe lists them: image, label, descending score."""
    r = rows.reshape(-1, 7)
    return r[np.lexsort((-r[:, 2], r[:, 1], r[:, 0]))]


def max_abs_diff(name: str, a: np.ndarray, b: np.ndarray) -> str:
    if name == "detection_out":
        a, b = caffe_order(a), caffe_order(b)
    if a.shape != b.shape:
        return f"shapes differ {a.shape} vs {b.shape}"
    return f"{np.abs(a.astype(np.float64) - b.astype(np.float64)).max():.2e}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=30, help="timed rounds (each runs every contender once)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="threads of torch and of OpenCV")
    p.add_argument("--no-plain", action="store_true", help="skip the (slow) plain interpreter")
    args = p.parse_args()

    folder = fixtures_root() / "caffe" / "dsod300"
    files = [folder / "deploy.prototxt", folder / "random_init.caffemodel", folder / "forward_2007_000027.npz"]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        print(f"error: fixture files not found: {', '.join(missing)}\n"
              "set TOOLKIT_FIXTURES to the shared fixtures folder (default ../shared/fixtures beside the repository)",
              file=sys.stderr)
        return 2
    prototxt, caffemodel, sample = files

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    reference = np.load(sample)
    image = np.ascontiguousarray(reference["data"])

    t = time.perf_counter()
    cv_net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv_net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    cv_load = time.perf_counter() - t
    t = time.perf_counter()
    net = load_caffe_net(prototxt, caffemodel)
    load = time.perf_counter() - t
    t = time.perf_counter()
    fast = optimize_for_inference(net, BLOBS)
    build = time.perf_counter() - t
    inputs = {"data": torch.from_numpy(image)}

    def run_opencv() -> dict[str, np.ndarray]:
        cv_net.setInput(image)
        return dict(zip(BLOBS, cv_net.forward(BLOBS)))

    def run_plain() -> dict[str, np.ndarray]:
        with torch.inference_mode():
            return {k: v.numpy() for k, v in net(inputs, blobs=BLOBS).items()}

    def run_fast() -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in fast(inputs).items()}

    contenders = {"OpenCV DNN": run_opencv, "ours, plain interpreter": run_plain, "ours, optimized": run_fast}
    if args.no_plain:
        del contenders["ours, plain interpreter"]

    print(f"DSOD300, batch 1, 3x300x300 -> {', '.join(BLOBS)}; {args.threads} threads each; "
          f"{args.iters} rounds after {args.warmup} warm-up runs")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores")
    print(f"python {platform.python_version()}, torch {torch.__version__} (oneDNN convolution "
          f"{'on' if mkldnn_conv_available() else 'off'}), opencv {cv2.__version__}")
    print(f"set-up: OpenCV read the net in {cv_load:.2f} s; ours loaded it in {load:.2f} s and optimized it in "
          f"{build:.2f} s ({fast.summary['layers in the net']} layers -> {fast.summary['steps in the plan']} steps)")

    outputs = {name: run() for name, run in contenders.items()}
    for _ in range(args.warmup - 1):
        for run in contenders.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    load_meter = OtherLoad()
    for _ in range(args.iters):
        for name, run in contenders.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    other = load_meter.cores()

    base = statistics.median(times["OpenCV DNN"])
    print(f"\n{'':26}{'median ms':>10}{'min ms':>9}{'vs OpenCV':>11}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:26}{med * 1e3:>10.1f}{min(ts) * 1e3:>9.1f}{med / base:>10.2f}x")
    print(f"ratio optimized / OpenCV: {statistics.median(times['ours, optimized']) / base:.2f}x (goal <= 0.80x)")
    if other is not None:
        print(f"other processes used {other:.2f} of {os.cpu_count()} cores during the measurements")
        if other > 0.2 and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
            print("warning: with other load, torch's OpenMP threads wait for scheduler slices at every parallel op "
                  "(libgomp spin-waits) while OpenCV's pool does not: these ratios are not meaningful; measure on "
                  "an idle machine, or set OMP_WAIT_POLICY=PASSIVE to see figures under load")

    print("\nmax abs difference of the outputs (detection_out rows in Caffe's order)")
    print(f"  {'blob':16}{'OpenCV vs ours':>16}{'Caffe vs ours':>16}{'Caffe vs OpenCV':>17}")
    ours = outputs["ours, optimized"]
    cv_out = outputs["OpenCV DNN"]
    for blob in BLOBS:
        print(f"  {blob:16}{max_abs_diff(blob, cv_out[blob], ours[blob]):>16}"
              f"{max_abs_diff(blob, reference[blob], ours[blob]):>16}"
              f"{max_abs_diff(blob, reference[blob], cv_out[blob]):>17}")
    if "ours, plain interpreter" in outputs:
        plain = outputs["ours, plain interpreter"]
        diffs = ", ".join(f"{b} {max_abs_diff(b, plain[b], ours[b])}" for b in BLOBS)
        print(f"  optimized vs plain: {diffs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
