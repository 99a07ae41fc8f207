"""The Gradio demo: one detector at several input scales, side by side, in the browser.

    python -m apps.demo [--host 127.0.0.1] [--port 7860] [--checkpoint CKPT ...] \\
        [--caffe NET.prototxt,WEIGHTS.caffemodel[,TRAIN.prototxt] ...] [--detr OFFICIAL.pth ...] \\
        [--onnx MODEL.onnx ...] [--labelmap LABELMAP] [--rounds 5] [--no-onnxruntime]

Pick a model and an image (a file, a webcam snapshot or a sample of the embedded ``shapes`` dataset); the detector
runs at full size, behind bicubic 1/2 and 1/4 thumbnails and, for a ThumbDet student, behind its own (learned, or
aliased bicubic) thumbnail (:mod:`apps.compare`), in PyTorch and, exported to ONNX, in onnxruntime. The page shows
the detections of each scale side by side, the thumbnails, a table of both latencies, their ratio, GFLOPs,
detections and speed-up, and a chart of latency and detections against scale; the score threshold and the class
filter redraw without running the model again. An ONNX file (``--onnx``, or uploaded) runs in onnxruntime at its
export size, beside the same file converted to PyTorch by onnx2torch. With no model flag the demo serves the
README's main job (``runs/main/checkpoint.pth``) or says, in the page, how to make it.

The same functions answer Gradio's API (``gradio_client``): ``/compare`` (model, image file, webcam image,
threshold, classes) returns what the page shows plus a JSON summary; ``/redraw`` re-filters the last result;
``/load_model`` adds a checkpoint or ONNX file.  See the README for an example call.
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import sys
import tempfile
import threading
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a local demo

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from apps.compare import Comparison, LoadedModel, ScaleRun, compare_scales, filter_detections  # noqa: E402
from apps.sources import load_source  # noqa: E402
from toolkit.data.errors import ImageReadError  # noqa: E402
from toolkit.data.voc import read_image_bgr  # noqa: E402
from toolkit.visualize import draw_detections  # noqa: E402

MAIN_JOB = Path("runs/main/checkpoint.pth")
MAIN_JOB_HINT = ("No model to serve yet. Train the README's main job first (`make run`, or "
                 "`python -m toolkit.train --dataset shapes --model dsod_tiny --amp --cache-images --workers 0 "
                 "--out runs/main`), or start the demo with `--checkpoint`, `--caffe`, `--detr` or `--onnx`.")
TABLE_HEADERS = ["scale", "input (h x w)", "PyTorch ms (median)", "PyTorch range ms", "onnxruntime ms (median)",
                 "onnxruntime range ms", "PyTorch / onnxruntime", "GFLOPs", "detections", "speed-up"]
NA = "n/a"  # a cell of a side that did not run (a note says why)


class MainThreadRunner:
    """Runs the demo's PyTorch work on the main thread (:meth:`serve` there; Gradio answers on worker threads).

    PyTorch's OpenMP keeps a thread pool per calling thread: once a worker thread and the main thread had both
    run models, every forward pass took about 2.5 times as long on the 2-core machine (measured: ``dsod_tiny``
    at full size 13 ms on the main thread, 28-33 ms on a worker), which would make the page's latencies wrong.
    """

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()

    def call(self, fn, *args):
        """``fn(*args)`` on the serving thread (directly when called there); its exception is raised here."""
        if threading.current_thread() is threading.main_thread():
            return fn(*args)
        done, box = threading.Event(), {}
        self.jobs.put((fn, args, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def serve(self, stop: threading.Event, poll_s: float = 0.2) -> None:
        """Run the queued calls until ``stop`` is set."""
        while not stop.is_set():
            try:
                fn, args, box, done = self.jobs.get(timeout=poll_s)
            except queue.Empty:
                continue
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # handed to the caller
                box["error"] = exc
            finally:
                done.set()


class ModelRegistry:
    """The loaded models by display name, and what failed to load (shown in the page)."""

    def __init__(self) -> None:
        self.models: dict[str, LoadedModel] = {}
        self.errors: list[str] = []
        self.lock = threading.Lock()  # one timed comparison at a time: the latencies would disturb each other

    def add(self, kind: str, spec: str, labelmap: Optional[str] = None) -> str:
        """Load and register; returns the display name.  Raises the loader's own error."""
        loaded = load_source(kind, spec, labelmap)
        thumb = loaded.thumbnail
        name = f"{loaded.model_name}{f' (ThumbDet {thumb[1]} {thumb[0]}x)' if thumb else ''}: {loaded.source}"
        base, k = name, 2
        while name in self.models:
            name, k = f"{base} #{k}", k + 1
        self.models[name] = loaded
        return name

    def try_add(self, kind: str, spec: str, labelmap: Optional[str] = None) -> Optional[str]:
        try:
            return self.add(kind, spec, labelmap)
        except Exception as exc:  # shown in the page: the loader's own message
            self.errors.append(f"{kind} {spec}: {error_text(exc)}")
            return None


def error_text(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, (ValueError, FileNotFoundError, ImageReadError)) else \
        f"{type(exc).__name__}: {text}"


def sample_images(limit: int = 4) -> list[str]:
    """A few test images of the embedded ``shapes`` dataset (``data/shapes``; generated into a temporary folder
    when it is not there)."""
    from toolkit.data.shapes import generate_shapes

    folder = Path("data/shapes/VOCdevkit/SHAPES/JPEGImages")
    images = sorted(folder.glob("shapes_test_*.jpg"))[:limit] if folder.is_dir() else []
    if not images:
        root = Path(tempfile.mkdtemp(prefix="legacy-det-samples-")) / "shapes"
        generate_shapes(root, seed=0, num_train=1, num_test=limit, progress=False, workers=1)
        images = sorted((root / "VOCdevkit" / "SHAPES" / "JPEGImages").glob("shapes_test_*.jpg"))[:limit]
    return [str(p) for p in images]


# ------------------------------------------------------------------------- rendering (no model runs here)
def render(comparison: Comparison, loaded: LoadedModel, threshold: float, keep_classes: Optional[Sequence[str]]):
    """``(gallery items, thumbnail items, table rows, figure, JSON summary)`` of a comparison at a threshold and
    class filter."""
    classes = loaded.classes
    gallery, thumbs, rows, summary, counts = [], [], [], [], []
    for run in comparison.runs:
        kept = filter_detections(run, threshold, classes, keep_classes)
        drawn = draw_detections(comparison.image_bgr, kept["boxes"], kept["scores"], kept["labels"], classes)
        gallery.append((cv2.cvtColor(drawn, cv2.COLOR_BGR2RGB), f"{run.label}: {len(kept['scores'])} detections"))
        if run.thumbnail is not None:
            h, w = run.thumbnail.shape[:2]
            thumbs.append((run.thumbnail, f"{run.label} thumbnail, {w}x{h}"))
        counts.append(int(len(kept["scores"])))
        rows.append([run.label, f"{run.input_hw[0]} x {run.input_hw[1]}", _cell(run.latency_ms, 2),
                     _span(run.times_ms), _cell(run.ort_latency_ms, 2), _span(run.ort_times_ms),
                     _cell(run.pytorch_over_ort, 2), _cell(run.gflops, 4), counts[-1], _cell(run.speedup, 2)])
        summary.append({"scale": run.label, "input_hw": list(run.input_hw), "latency_ms": _number(run.latency_ms),
                        "times_ms": run.times_ms, "onnxruntime_latency_ms": _number(run.ort_latency_ms),
                        "onnxruntime_times_ms": run.ort_times_ms,
                        "pytorch_over_onnxruntime": _number(run.pytorch_over_ort), "gflops": _number(run.gflops),
                        "speedup": _number(run.speedup), "detections_from": run.detections_from,
                        **({"pytorch_error": run.pytorch_error} if run.pytorch_error else {}),
                        **({"onnxruntime_error": run.ort_error} if run.ort_error else {}),
                        "detections": [{"box_xyxy": [round(float(v), 2) for v in box], "score": float(score),
                                        "class": classes[int(label)]}
                                       for box, score, label in zip(kept["boxes"], kept["scores"], kept["labels"])]})
    return (gallery, thumbs, rows, chart(comparison.runs, counts),
            {"model": loaded.source, "threshold": threshold, "scales": summary})


def _number(value: float) -> Optional[float]:
    """JSON has no NaN: None for a figure of a side that did not run."""
    return value if math.isfinite(value) else None


def _cell(value: float, digits: int):
    return round(value, digits) if math.isfinite(value) else NA


def _span(times_ms: Sequence[float]) -> str:
    return f"{min(times_ms):.2f}-{max(times_ms):.2f}" if times_ms else NA


def chart(runs: Sequence[ScaleRun], counts: Sequence[int]):
    """Latency (bars, PyTorch's and onnxruntime's median with the range) and detections (``counts``, line)
    against scale.  A bare ``Figure`` (no pyplot, whose global state Gradio's threads would share)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    x = np.arange(len(runs))
    width = 0.38
    for offset, name, color, medians, times in (
            (-width / 2, "PyTorch", "tab:blue", [r.latency_ms for r in runs], [r.times_ms for r in runs]),
            (width / 2, "onnxruntime", "tab:green", [r.ort_latency_ms for r in runs], [r.ort_times_ms for r in runs])):
        ran = [i for i, t in enumerate(times) if t]  # a side that did not run gets no bar
        if not ran:
            continue
        m = np.array([medians[i] for i in ran])
        err = [m - [min(times[i]) for i in ran], [max(times[i]) for i in ran] - m]
        ax.bar(x[ran] + offset, m, width, color=color, alpha=0.8, label=f"{name} (median, ms)", yerr=err,
               capsize=3)
    ax.set_xticks(x, [r.label for r in runs])
    ax.set_ylabel("latency (ms)")
    ax2 = ax.twinx()
    ax2.plot(x, list(counts), "o-", color="tab:red", label="detections")
    ax2.set_ylabel("detections")
    ax2.set_ylim(bottom=0)
    fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------- the app
def build_app(registry: ModelRegistry, rounds: int = 5, samples: Sequence[str] = (),
              runner: Optional[MainThreadRunner] = None, onnxruntime: bool = True):
    """The Gradio app.  ``runner``: where the models run (:class:`MainThreadRunner`); None: on Gradio's threads.
    ``onnxruntime``: False: PyTorch latencies only (no exports; an ONNX file still runs in onnxruntime)."""
    import gradio as gr

    def on_torch_thread(fn, *args):
        return runner.call(fn, *args) if runner is not None else fn(*args)

    def class_choices(model_key):
        """Another model: its classes in the filter; the last result (another model's) is dropped."""
        loaded = registry.models.get(model_key)
        names = list(loaded.classes[1:]) if loaded else []
        return gr.update(choices=names, value=names), None

    def status(messages: Sequence[str], error: bool = False) -> str:
        if not messages:
            return ""
        prefix = "**Error:** " if error else ""
        return "\n\n".join(prefix + m for m in messages)

    def read_input(image_file, webcam):
        if image_file:
            return read_image_bgr(image_file)
        if webcam is not None:
            return cv2.cvtColor(np.asarray(webcam, dtype=np.uint8), cv2.COLOR_RGB2BGR)
        raise ValueError("give an image: a file, a webcam snapshot or a sample")

    empty = ([], [], [], None, {})

    def run(model_key, image_file, webcam, threshold, keep_classes):
        loaded = registry.models.get(model_key)
        if loaded is None:
            return (None, *empty, status([MAIN_JOB_HINT if not registry.models else "pick a model"], True))
        try:
            image = read_input(image_file, webcam)
            with registry.lock:
                comparison = on_torch_thread(partial(compare_scales, rounds=rounds, onnxruntime=onnxruntime),
                                             loaded, image)
            outputs = render(comparison, loaded, threshold, keep_classes)
        except Exception as exc:  # the page shows the message, never a traceback
            return (None, *empty, status([error_text(exc)], True))
        notes = list(comparison.notes)
        return ((model_key, comparison), *outputs, status(notes))

    def redraw(state, threshold, keep_classes):
        if not state:
            return (*empty, "")
        model_key, comparison = state
        loaded = registry.models.get(model_key)
        try:
            return (*render(comparison, loaded, threshold, keep_classes), status(comparison.notes))
        except Exception as exc:
            return (*empty, status([error_text(exc)], True))

    def load_model(model_file):
        if not model_file:
            return gr.update(), status(["choose a model file"], True)
        kind = "onnx" if Path(model_file).suffix.lower() == ".onnx" else "checkpoint"
        try:
            name = on_torch_thread(registry.add, kind, model_file)
        except Exception as exc:
            return gr.update(), status([f"{Path(model_file).name}: {error_text(exc)}"], True)
        messages = [f"loaded {name}"]
        if registry.models[name].import_error:
            messages.append(f"PyTorch n/a (onnx2torch cannot convert it): {registry.models[name].import_error}")
        return gr.update(choices=list(registry.models), value=name), status(messages)

    names = list(registry.models)
    with gr.Blocks(title="legacy-det: detections across input scales") as app:
        gr.Markdown("# legacy-det: one detector at several input scales\n"
                    "Full size, bicubic thumbnails (1/2, 1/4) and, for a ThumbDet student, its own thumbnail "
                    "(learned, or bicubic without anti-aliasing): "
                    "detections, latency in PyTorch and in onnxruntime (each scale exported to ONNX; median of "
                    "several interleaved runs after a warm-up, batch 1, preprocessed image in, detections out), "
                    "GFLOPs of the forward pass and the speed-up over full size.  An ONNX file runs in onnxruntime "
                    "at its export size; its PyTorch latency and GFLOPs are those of the file converted by "
                    "onnx2torch.")
        startup = [MAIN_JOB_HINT] if not registry.models else []
        page_status = gr.Markdown(status(startup + registry.errors, bool(startup or registry.errors)),
                                  elem_id="status")
        with gr.Row():
            model = gr.Dropdown(names, value=names[0] if names else None, label="Model", elem_id="model",
                                scale=3)
            model_file = gr.File(label="Load another model (checkpoint .pth or ONNX .onnx)", type="filepath",
                                 elem_id="model_file", scale=2)
        with gr.Row():
            with gr.Column():
                image_file = gr.File(label="Image file", type="filepath", elem_id="image_file")
                webcam = gr.Image(sources=["webcam"], type="numpy", label="or a webcam snapshot", elem_id="webcam")
                if samples:
                    gr.Examples([[s] for s in samples], inputs=[image_file],
                                label="Samples from the embedded shapes dataset")
            with gr.Column():
                threshold = gr.Slider(0.0, 1.0, value=0.3, step=0.01, label="Score threshold", elem_id="threshold")
                first = registry.models.get(names[0]) if names else None
                class_names = list(first.classes[1:]) if first else []
                keep = gr.CheckboxGroup(class_names, value=class_names, label="Classes", elem_id="classes")
                button = gr.Button("Run at every scale", variant="primary", elem_id="run")
        gallery = gr.Gallery(label="Detections by scale", columns=4, height="auto", elem_id="detections")
        thumbs = gr.Gallery(label="Thumbnails the detector saw", columns=4, height="auto", elem_id="thumbnails")
        table = gr.Dataframe(headers=TABLE_HEADERS, label="Per scale", elem_id="table", interactive=False)
        plot = gr.Plot(label="Latency and detections against scale", elem_id="chart")
        with gr.Accordion("JSON summary", open=False):
            summary = gr.JSON(elem_id="summary")
        state = gr.State(None)

        model.change(class_choices, model, [keep, state], api_visibility="private")
        model_file.upload(load_model, model_file, [model, page_status], api_name="load_model")
        button.click(run, [model, image_file, webcam, threshold, keep],
                     [state, gallery, thumbs, table, plot, summary, page_status], api_name="compare",
                     concurrency_limit=1)
        for control in (threshold, keep):
            control.change(redraw, [state, threshold, keep], [gallery, thumbs, table, plot, summary, page_status],
                           api_name="redraw" if control is threshold else None,
                           api_visibility="public" if control is threshold else "private")
    return app


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m apps.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--checkpoint", action="append", default=[], metavar="CKPT",
                   help="a toolkit.train, converters.caffe or converters.detr checkpoint (repeatable)")
    p.add_argument("--caffe", action="append", default=[],
                   metavar="NET.prototxt,WEIGHTS.caffemodel[,TRAIN.prototxt]",
                   help="a Caffe SSD-fork detector, converted on loading; the train prototxt gives its preprocessing "
                        "and labelmap (repeatable)")
    p.add_argument("--detr", action="append", default=[], metavar="OFFICIAL.pth",
                   help="an official Deformable DETR, Sparse DETR or ThumbDet checkpoint (repeatable)")
    p.add_argument("--onnx", action="append", default=[], metavar="MODEL.onnx",
                   help="a file python -m toolkit.export wrote, run in onnxruntime at its export size beside its "
                        "onnx2torch conversion (repeatable)")
    p.add_argument("--labelmap", help="Caffe labelmap: class names for converted Caffe models (and ONNX files that "
                                      "name none)")
    p.add_argument("--rounds", type=int, default=5, help="timed runs per scale (default 5)")
    p.add_argument("--no-onnxruntime", dest="onnxruntime", action="store_false",
                   help="time PyTorch only: no ONNX export of each scale (an --onnx file still runs in onnxruntime)")
    return p


def make_registry(args) -> ModelRegistry:
    registry = ModelRegistry()
    sources = ([("checkpoint", c) for c in args.checkpoint] + [("caffe", c) for c in args.caffe]
               + [("detr", c) for c in args.detr] + [("onnx", c) for c in args.onnx])
    if not sources and MAIN_JOB.is_file():
        sources = [("checkpoint", str(MAIN_JOB))]
    for kind, spec in sources:
        registry.try_add(kind, spec, args.labelmap)
    return registry


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.rounds < 1:
        print("error: --rounds must be at least 1", file=sys.stderr)
        return 2
    registry = make_registry(args)
    for message in registry.errors:
        print(f"error: {message}", file=sys.stderr)
    runner = MainThreadRunner()
    app = build_app(registry, args.rounds, sample_images(), runner, args.onnxruntime)
    app.launch(server_name=args.host, server_port=args.port, show_error=False, prevent_thread_lock=True)
    print(f"serving {len(registry.models)} model(s) on http://{args.host}:{args.port} (Ctrl+C stops)")
    stop = threading.Event()
    try:
        runner.serve(stop)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        app.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
