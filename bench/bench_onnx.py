"""onnxruntime against PyTorch on the CPU: latency of the network, float and int8, and the presets' VOC07 mAP.

Each model is a checkpoint (``toolkit.train``; a ``converters.caffe convert`` checkpoint of a native preset with
``--model``-style ``NAME=PATH@PRESET``).  For each, the script exports the raw network (``python -m toolkit.export``'s
code: outputs checked against PyTorch within 1e-4 first), quantizes it to int8 (onnxruntime's static QDQ
quantization, calibrated on ``--calibration-images`` training images of ``--dataset``), and times, batch 1, on one
test image preprocessed for the model, the network alone (raw outputs in, no post-processing: the same Python
post-processing follows every backend): PyTorch (eval, ``no_grad``, float32), onnxruntime float32 and onnxruntime
int8, all with ``--threads`` threads, in rounds back to back after a warm-up.  It prints medians and ranges and the
per-round ratios PyTorch / onnxruntime (median and range).  With ``--map``, models whose classes are the
dataset's also get their VOC07 mAP on its test split in the three forms (PyTorch and onnxruntime through the same
post-processing).

Run from the repository root on an idle machine, e.g.::

    .venv/bin/python bench/bench_onnx.py dsod_tiny=runs/main/checkpoint.pth \\
        dsod_tiny_thumb2=runs/thumb2/checkpoint.pth dsod300=dsod300.pth@dsod300 --map --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

# benchutil also puts the repo root on sys.path if needed
from benchutil import OtherLoad, cpu_name


def _median_range(values) -> str:
    return f"{statistics.median(values):8.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="NAME=CHECKPOINT[@PRESET]")
    parser.add_argument("--dataset", default="shapes", help="calibration (train split) and mAP (test split)")
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--map", action="store_true", help="also the VOC07 mAP of each form on the test split")
    args = parser.parse_args()

    import onnxruntime as ort

    from toolkit.data import build_dataset
    from toolkit.data.voc import VOC_CLASSES
    from toolkit.engine import evaluate_detector, inference_setup, load_trained_model
    from toolkit.export import export, no_boxes, quantize_int8, spec_for_checkpoint
    from toolkit.onnx_backend import OnnxRuntimeDetector, evaluate_onnx, onnx_inference_setup

    torch.set_num_threads(args.threads)
    load = OtherLoad()
    print(f"network latency, batch 1, {cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}; {args.rounds} rounds after {args.warmup} warm-up runs")
    rows, maps = [], []
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as folder:
        for item in args.models:
            name, _, rest = item.partition("=")
            path, _, preset = rest.partition("@")
            if not path:
                raise SystemExit(f"give NAME=CHECKPOINT[@PRESET], got {item!r}")
            # A converted Caffe checkpoint (with @PRESET) without names: VOC's, as toolkit.export assumes.
            voc = ("background", *VOC_CLASSES) if preset else None
            model, classes, model_name = load_trained_model(path, model_name=preset or None, classes=voc)
            float_path = Path(folder) / f"{name}.onnx"
            export(spec_for_checkpoint(Path(path), preset or None), float_path)
            int8_file = quantize_int8(float_path, Path(folder) / f"{name}.int8.onnx", args.dataset,
                                      args.calibration_images, args.data_root)
            forms = {"onnxruntime": OnnxRuntimeDetector(float_path, args.threads, spin=False),
                     "onnxruntime int8": OnnxRuntimeDetector(int8_file, args.threads, spin=False)}
            setup = inference_setup(model_name, len(classes))
            test = build_dataset(args.dataset, "test", root=args.data_root, transform=setup.transform)
            # The exported file's input (a DETR: warped to its export size, unpadded) for all three forms.
            image = onnx_inference_setup(forms["onnxruntime"]).transform(_raw_image(test, 0), no_boxes())[0][None]
            runners = {"pytorch": lambda: model(image)}
            for label, detector in forms.items():
                runners[label] = (lambda d: lambda: d(image))(detector)
            times = {label: [] for label in runners}
            with torch.no_grad():
                for _ in range(args.warmup):
                    for run in runners.values():
                        run()
                for _ in range(args.rounds):
                    for label, run in runners.items():
                        start = time.perf_counter()
                        run()
                        times[label].append((time.perf_counter() - start) * 1e3)
            rows.append((name, model_name, times))
            if args.map and tuple(test.classes) == tuple(classes):
                loader = torch.utils.data.DataLoader(test, batch_size=setup.batch_size, collate_fn=setup.collate)
                torch_map = evaluate_detector(model, test, loader, setup.params, torch.device("cpu"),
                                              predict_fn=setup.predict_fn)[0].mAP
                onnx_maps = [evaluate_onnx(d, args.dataset, args.data_root).mAP for d in forms.values()]
                maps.append((name, torch_map, *onnx_maps))
    print(f"{'model':<22} {'PyTorch ms':>22} {'onnxruntime ms':>22} {'int8 ms':>22}   PyTorch/ORT   PyTorch/int8")
    for name, model_name, times in rows:
        t, f, q = times["pytorch"], times["onnxruntime"], times["onnxruntime int8"]
        ratio_f = [a / b for a, b in zip(t, f)]
        ratio_q = [a / b for a, b in zip(t, q)]
        print(f"{name + ' (' + model_name + ')':<22} {_median_range(t):>22} {_median_range(f):>22} "
              f"{_median_range(q):>22}   {statistics.median(ratio_f):.2f}x ({min(ratio_f):.2f}-{max(ratio_f):.2f})"
              f"   {statistics.median(ratio_q):.2f}x ({min(ratio_q):.2f}-{max(ratio_q):.2f})")
    if maps:
        print(f"\nVOC07 mAP on the {args.dataset} test split")
        print(f"{'model':<22} {'PyTorch':>8} {'ORT':>8} {'int8':>8}")
        for name, a, b, c in maps:
            print(f"{name:<22} {a:8.4f} {b:8.4f} {c:8.4f}")
    cores = load.cores()
    if cores is not None:
        print(f"other processes used {cores:.2f} cores during the measurements")


def _raw_image(dataset, index: int):
    """The decoded image of a dataset entry before any transform."""
    transform, dataset.transform = dataset.transform, None
    try:
        return dataset[index][0]
    finally:
        dataset.transform = transform


if __name__ == "__main__":
    main()
