"""The demo's logic apart from the UI: one detector run at several input scales, side by side.

For a loaded model (any family :mod:`toolkit` loads) and one image, :func:`compare_scales` runs

- ``full``: the detector on the full-size input (a ThumbDet student without its down-sampler);
- ``bicubic 1/2`` and ``bicubic 1/4``: the same detector behind an antialiased bicubic thumbnail
  (:class:`toolkit.models.thumbnail.Thumbnailer`, the ThumbDet baseline; the SSD family's priors computed for
  the smaller input, as :func:`toolkit.models.build.add_thumbnail` does);
- ``learned 1/s``: a ThumbDet student as trained, with its learned down-sampler (``bicubic_aliased 1/s`` for a
  student trained behind a bicubic resize without anti-aliasing, ``toolkit.train --thumb-mode bicubic_aliased``),

and returns per scale the detections (boxes in the image's pixels), the thumbnail the detector saw, the latency
(median of several runs after a warm-up, batch 1: preprocessed input in, detections out), the GFLOPs of the
forward pass (``torch.utils.flop_counter``, multiply-adds count 2, post-processing left out) and the speed-up over
``full``.  :func:`filter_detections` applies a score threshold and a class filter afterwards, so the UI redraws
without rerunning the model.

Each scale also runs in onnxruntime, timed in the same rounds on the same inputs through the same prediction
path (:func:`onnx_at_scale`: the scale's detector exported by :func:`toolkit.export.export`, once per scale and
input size).  An ONNX file as the source (:func:`apps.sources.load_onnx`) turns this round: onnxruntime runs the
file and gives the detections, and the PyTorch side is the same file converted by onnx2torch.  Where one side
cannot run (an export or a conversion that fails), its cells are n/a and a note says why.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from toolkit.engine import InferenceSetup, add_ssd_thumbnail, inference_setup, predict_batch, to_image_pixels
from toolkit.models.thumbnail import Thumbnailer, find_thumbnailer, thumbnail_size
from toolkit.onnx_backend import OnnxRuntimeDetector

MAX_SIDE = 2048  # larger images are downscaled first (a note says so)
SCALE_NAMES = {1: "full", 2: "1/2", 4: "1/4"}
ONNX_SIZES_KEPT = 2  # input sizes whose onnxruntime variants stay loaded (a DETR's size follows the image)


@dataclass
class LoadedModel:
    """A detector and what running it needs: the preset name (``model_name``), its classes (``"background"``
    first) and where it came from (``source``, shown in the UI).

    ``setup`` replaces the preset's test-time pipeline (:func:`toolkit.engine.inference_setup`) for a model that
    is no preset (a converted Caffe net run as it is, an ONNX file); ``fixed_input``: it runs at its own input
    size only (a Caffe net's PriorBox layers are written in its input's pixels, an ONNX file's input size was
    fixed by its export, so neither has thumbnail scales).

    An ONNX file: ``model`` is its :class:`~toolkit.onnx_backend.OnnxRuntimeDetector`; ``imported`` the same
    file converted by onnx2torch with the same interface (``forward(images) -> {output name: tensor}``), the
    PyTorch side of the comparison, or None and ``import_error`` says why.
    """

    model: nn.Module
    model_name: str
    classes: tuple[str, ...]
    source: str
    setup: Optional[InferenceSetup] = None
    fixed_input: bool = False
    imported: Optional[nn.Module] = None
    import_error: Optional[str] = None
    # (scale, mode) -> the detector at that scale (see at_scale), built once
    variants: dict = field(default_factory=dict, repr=False)
    # (scale, mode, input (h, w)) -> that variant run by onnxruntime, or why there is none (see onnx_at_scale)
    onnx_variants: dict = field(default_factory=dict, repr=False)

    @property
    def is_onnx(self) -> bool:
        return isinstance(self.model, OnnxRuntimeDetector)

    @property
    def is_detr(self) -> bool:
        from toolkit.models.detr import DeformableDETR

        return isinstance(self.model, DeformableDETR)

    @property
    def thumbnail(self) -> Optional[tuple[int, str]]:
        """``(scale, mode)`` of the model's own thumbnail (a ThumbDet student), else None."""
        t = find_thumbnailer(self.model)
        return None if t is None else (t.scale, t.mode)


@dataclass
class ScaleRun:
    """One scale's results.

    Attributes:
        label: ``"full"``, ``"bicubic 1/2"``, ``"bicubic 1/4"``, ``"learned 1/s"`` or ``"bicubic_aliased 1/s"``.
        scale, mode: the thumbnail's scale (1: full size) and mode (``None`` at full size).
        input_hw: ``(h, w)`` the detector's backbone sees.
        boxes: ``float32 (K, 4)`` xyxy in continuous pixels of the image; ``scores`` ``(K,)``; ``labels`` ``(K,)``
            int64 indices into the classes (background excluded), sorted by descending score.
        thumbnail: ``uint8 (h, w, 3)`` RGB, the down-sampled image the detector saw (None at full size).
        times_ms: each timed PyTorch run; ``latency_ms`` their median (NaN when PyTorch did not run:
            ``pytorch_error`` says why).
        gflops: the PyTorch forward pass (post-processing left out); NaN without a PyTorch side.
        speedup: the full-size median latency over this one's, of the side whose detections these are.
        ort_times_ms: each timed onnxruntime run; ``ort_latency_ms`` their median (NaN when onnxruntime did not
            run: ``ort_error`` says why).
        detections_from: ``"pytorch"`` or ``"onnxruntime"`` (an ONNX file's detections are onnxruntime's).
    """

    label: str
    scale: int
    mode: Optional[str]
    input_hw: tuple[int, int]
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    thumbnail: Optional[np.ndarray]
    times_ms: list[float]
    gflops: float
    speedup: float = 1.0
    ort_times_ms: list[float] = field(default_factory=list)
    pytorch_error: Optional[str] = None
    ort_error: Optional[str] = None
    detections_from: str = "pytorch"
    latency_ms: float = field(init=False)
    ort_latency_ms: float = field(init=False)

    def __post_init__(self) -> None:
        self.latency_ms = statistics.median(self.times_ms) if self.times_ms else math.nan
        self.ort_latency_ms = statistics.median(self.ort_times_ms) if self.ort_times_ms else math.nan

    @property
    def pytorch_over_ort(self) -> float:
        """PyTorch's median latency over onnxruntime's (above 1: onnxruntime is faster); NaN if either is."""
        return self.latency_ms / self.ort_latency_ms

    @property
    def shown_latency_ms(self) -> float:
        """The median latency of the side whose detections these are."""
        return self.ort_latency_ms if self.detections_from == "onnxruntime" else self.latency_ms


@dataclass
class Comparison:
    """:func:`compare_scales`'s result: the (possibly downscaled) image as run, the runs, notes for the user."""

    image_bgr: np.ndarray
    runs: list[ScaleRun]
    notes: list[str]


def prepare_image(image_bgr: np.ndarray, max_side: int = MAX_SIDE) -> tuple[np.ndarray, list[str]]:
    """Check an image and downscale it (area interpolation) when its longer side exceeds ``max_side``.

    Args:
        image_bgr: ``uint8 (H, W, 3)`` BGR (a grey ``(H, W)`` or BGRA ``(H, W, 4)`` image is converted).
    Returns:
        ``(uint8 (H', W', 3) BGR, notes)``.
    Raises:
        ValueError: not an image array.
    """
    image = np.asarray(image_bgr)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
        raise ValueError(f"not an 8-bit image: an array of {image.dtype} with shape {image.shape}")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif image.shape[2] != 3:
        raise ValueError(f"an image with {image.shape[2]} channels; give a grey, colour or colour+alpha image")
    notes = []
    h, w = image.shape[:2]
    if max(h, w) > max_side:
        factor = max_side / max(h, w)
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        notes.append(f"the {w}x{h} image was downscaled to {size[0]}x{size[1]} (longer side at most {max_side})")
    return np.ascontiguousarray(image), notes


def scales_for(loaded: LoadedModel) -> list[tuple[int, Optional[str]]]:
    """The ``(scale, mode)`` pairs to run: full size, bicubic 1/2 and 1/4, and the model's own thumbnail when it is
    another kind (learned, or bicubic without anti-aliasing; full size alone for a ``fixed_input`` model)."""
    if loaded.fixed_input:
        return [(1, None)]
    pairs: list[tuple[int, Optional[str]]] = [(1, None), (2, "bicubic"), (4, "bicubic")]
    if loaded.thumbnail is not None and loaded.thumbnail[1] != "bicubic":
        pairs.append(loaded.thumbnail)
    return pairs


def at_scale(loaded: LoadedModel, scale: int, mode: Optional[str]) -> nn.Module:
    """The loaded detector behind a ``scale`` thumbnail of ``mode`` (``scale`` 1: the full-size input).

    The model itself when that is how it was trained; otherwise a copy, built once and kept in
    ``loaded.variants`` (the loaded model is not changed): a DETR's backbone gets another thumbnailer; an
    SSD-family model is rebuilt from its preset (priors for its input) with the detector's weights.

    Raises:
        ValueError: a learned thumbnail the model does not have.
    """
    own = loaded.thumbnail
    if (own is None and scale == 1) or own == (scale, mode):
        return loaded.model
    if (scale, mode) not in loaded.variants:
        loaded.variants[(scale, mode)] = _build_variant(loaded, scale, mode)
    return loaded.variants[(scale, mode)]


def _build_variant(loaded: LoadedModel, scale: int, mode: Optional[str]) -> nn.Module:
    if mode == "learned":
        raise ValueError(f"{loaded.source} has no learned {scale}x down-sampler")
    if loaded.fixed_input:
        why = "an ONNX file's input size was fixed by its export" if loaded.is_onnx else \
            "a Caffe net's priors are in its input's pixels"
        raise ValueError(f"{loaded.source} runs at its own input size only ({why})")
    if loaded.is_detr:
        variant = copy.deepcopy(loaded.model)
        body = variant.backbone[0]
        body.down_sample = Thumbnailer(scale, mode) if scale > 1 else None
        return variant.eval()
    from toolkit.models.build import build_model

    variant = build_model(loaded.model_name, len(loaded.classes))
    if scale > 1:
        add_ssd_thumbnail(variant, loaded.model_name, scale, mode)
    weights = {k: v for k, v in loaded.model.state_dict().items() if not k.startswith("down_sample.")}
    variant.load_state_dict(weights)
    return variant.to(model_device(loaded.model)).eval()


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are; the CPU for one without parameters (onnxruntime's CPU provider)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


# ----------------------------------------------------------------------------------- onnxruntime
def runtime_detector(path, threads: Optional[int] = None) -> OnnxRuntimeDetector:
    """The :class:`~toolkit.onnx_backend.OnnxRuntimeDetector` of an ONNX file, set up to be timed beside PyTorch:
    ``threads`` intra-op threads (default ``torch.get_num_threads()``, PyTorch's own) that do not spin-wait
    (measured: with onnxruntime's spinning threads the PyTorch run timed right after it took 210-266 ms instead
    of 96-130 ms, dsod_tiny, 2 threads on the 2-core machine; onnxruntime itself as fast either way).

    Raises:
        ValueError: not a file ``python -m toolkit.export`` wrote (the detector's message).
    """
    return OnnxRuntimeDetector(path, threads or torch.get_num_threads(), spin=False)


class OnnxRuntimeStandIn(nn.Module):
    """An exported detector run by onnxruntime in the PyTorch detector's place, so that the preset's prediction
    path (post-processing included) runs on it unchanged.

    ``forward(images float32 (1, 3, H, W)[, mask bool (1, H, W)])`` returns the PyTorch detector's raw outputs by
    name: ``loc`` / ``conf`` / ``priors`` / ``variances`` (SSD family) or ``pred_logits`` / ``pred_boxes``
    (DETR).  ``runtime``: the :class:`~toolkit.onnx_backend.OnnxRuntimeDetector`.
    """

    def __init__(self, runtime: OnnxRuntimeDetector) -> None:
        super().__init__()
        self.runtime = runtime

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        # The graph was traced without a mask (no padding), which a batch of one image has.
        if mask is not None and bool(mask.any()):
            raise ValueError("a padded batch: the exported detector takes unpadded images")
        return self.runtime(images)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message, short enough for a note (the exporter's carry the whole traced graph)."""
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def onnx_at_scale(loaded: LoadedModel, scale: int, mode: Optional[str], input_hw: Sequence[int]
                  ) -> OnnxRuntimeStandIn:
    """:func:`at_scale`'s detector exported for an ``input_hw`` ``(h, w)`` input (the full-size input; a
    thumbnail is made in the graph), batch 1, raw outputs, checked by :func:`toolkit.export.export`, and run by
    onnxruntime (:func:`runtime_detector`).

    Built once per ``(scale, mode, input_hw)`` and kept in ``loaded.onnx_variants``, a failure too (the export
    would fail again); the variants of the oldest input size go when a third size comes (a DETR's input size
    follows the image's aspect ratio, and each session holds the model's weights).

    Raises:
        ValueError: the variant has no export (why: the exporter's first line, or a model that is not exported
            here).
    """
    model = at_scale(loaded, scale, mode)
    key = (scale, mode, tuple(int(v) for v in input_hw))
    if key not in loaded.onnx_variants:
        sizes = list(dict.fromkeys(k[2] for k in loaded.onnx_variants))
        if key[2] not in sizes and len(sizes) >= ONNX_SIZES_KEPT:
            for old in [k for k in loaded.onnx_variants if k[2] == sizes[0]]:
                del loaded.onnx_variants[old]
        try:
            loaded.onnx_variants[key] = _export_variant(loaded, model, key[2])
        except ValueError as exc:
            loaded.onnx_variants[key] = str(exc)
    found = loaded.onnx_variants[key]
    if isinstance(found, str):
        raise ValueError(found)
    return found


def _export_variant(loaded: LoadedModel, model: nn.Module, input_hw: tuple[int, int]) -> OnnxRuntimeStandIn:
    from toolkit.export import export, spec_for_model

    if loaded.setup is not None:
        raise ValueError("a Caffe net run as it is is not exported here (its DetectionOutput runs in Python); "
                         "export its checkpoint with python -m toolkit.export and load the .onnx file")
    if model_device(model).type != "cpu":
        raise ValueError(f"the model is on {model_device(model)}; onnxruntime runs here on the CPU")
    with tempfile.TemporaryDirectory(prefix="legacy-det-demo-onnx-") as folder:
        try:
            spec = spec_for_model(model, loaded.classes, loaded.model_name, input_size=input_hw)
            path = export(spec, Path(folder) / "variant.onnx").path  # opset 18 for a bicubic thumbnail
            runtime = runtime_detector(path)  # the session holds the model: the file can go
        except Exception as exc:  # ExportError, or a model the exporter does not know: the comparison goes on
            raise ValueError(f"no ONNX export: {_first_line(exc)}") from None
    return OnnxRuntimeStandIn(runtime).eval()


# ----------------------------------------------------------------------------------- the comparison
def _label(scale: int, mode: Optional[str]) -> str:
    return "full" if scale == 1 else f"{mode} {SCALE_NAMES[scale]}"


def _forward_inputs(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


@dataclass
class _Sides:
    """One scale's two contenders; a side without a model has an error saying why."""

    pytorch: Optional[nn.Module]
    ort: Optional[nn.Module]
    pytorch_error: Optional[str] = None
    ort_error: Optional[str] = None
    shown: str = "pytorch"  # whose detections are returned


def _sides(loaded: LoadedModel, scale: int, mode: Optional[str], input_hw, onnxruntime: bool) -> _Sides:
    model = at_scale(loaded, scale, mode)  # raises for a scale the model cannot run at
    if loaded.is_onnx:
        return _Sides(loaded.imported, model, pytorch_error=None if loaded.imported is not None else
                      f"onnx2torch cannot convert the file: {loaded.import_error}", shown="onnxruntime")
    if not onnxruntime:
        return _Sides(model, None, ort_error="not run (PyTorch only)")
    try:
        return _Sides(model, onnx_at_scale(loaded, scale, mode, input_hw))
    except ValueError as exc:
        return _Sides(model, None, ort_error=str(exc))


def _na_notes(labels: Sequence[str], errors: Sequence[Optional[str]], side: str) -> list[str]:
    """One note per distinct reason, naming the scales it applies to."""
    by_reason: dict[str, list[str]] = {}
    for label, error in zip(labels, errors):
        if error is not None:
            by_reason.setdefault(error, []).append(label)
    return [f"{side} n/a ({', '.join(scales)}): {reason}" for reason, scales in by_reason.items()]


def compare_scales(loaded: LoadedModel, image_bgr: np.ndarray, rounds: int = 5, warmup: int = 1,
                   scales: Optional[Sequence[tuple[int, Optional[str]]]] = None,
                   clock: Callable[[], float] = time.perf_counter, onnxruntime: bool = True) -> Comparison:
    """Run ``loaded`` on ``image_bgr`` at each of ``scales`` (default :func:`scales_for`), in PyTorch and in
    onnxruntime.

    Args:
        image_bgr: ``uint8 (H, W, 3)`` BGR (checked and, if huge, downscaled by :func:`prepare_image`).
        rounds: timed runs per scale and side, interleaved (each round: every scale, PyTorch then onnxruntime) so
            that a change of machine load touches every scale and side alike; before them ``warmup`` untimed runs
            of each (at least one: the run whose detections are returned).
        clock: seconds (tests pass a fake one).
        onnxruntime: False: PyTorch alone (no exports); an ONNX file runs in onnxruntime whatever this says.
    Returns:
        A :class:`Comparison`; every detection, whatever its score (filter with :func:`filter_detections`): a
        model's PyTorch run's, an ONNX file's onnxruntime run's.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    image, notes = prepare_image(image_bgr)
    setup = loaded.setup or inference_setup(loaded.model_name, len(loaded.classes))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    inputs, _ = setup.collate([setup.transform(image, empty)])
    pairs = list(scales) if scales is not None else scales_for(loaded)
    images = _forward_inputs(inputs)[0]
    full_hw = tuple(images.shape[-2:])
    known = set(loaded.onnx_variants)
    started = time.perf_counter()
    sides = [_sides(loaded, s, m, full_hw, onnxruntime) for s, m in pairs]
    exported = [k for k, v in loaded.onnx_variants.items() if k not in known and not isinstance(v, str)]
    if exported:  # the first click at a new input size waits for them: say why
        notes.append(f"{len(exported)} scale(s) exported to ONNX for onnxruntime in "
                     f"{time.perf_counter() - started:.1f} s (once per scale and input size)")
    labels = [_label(s, m) for s, m in pairs]
    notes += _na_notes(labels, [c.pytorch_error for c in sides], "PyTorch")
    if onnxruntime or loaded.is_onnx:
        notes += _na_notes(labels, [c.ort_error for c in sides], "onnxruntime")

    def run(model):
        return predict_batch(model, inputs, model_device(model), setup.predict_fn, setup.params)[0]

    def contenders(c: _Sides):
        return [(name, model) for name, model in (("pytorch", c.pytorch), ("onnxruntime", c.ort))
                if model is not None]

    times: list[dict[str, list[float]]] = [{"pytorch": [], "onnxruntime": []} for _ in sides]
    detections = []
    with torch.no_grad():
        for c in sides:
            for name, model in contenders(c):
                det = run(model)
                if name == c.shown:
                    detections.append(det)
                for _ in range(warmup - 1):
                    run(model)
        for _ in range(rounds):
            for i, c in enumerate(sides):
                for name, model in contenders(c):
                    start = clock()
                    run(model)
                    times[i][name].append((clock() - start) * 1e3)
        runs = []
        for (scale, mode), label, c, det, t in zip(pairs, labels, sides, detections, times):
            gflops, thumb = math.nan, None
            if c.pytorch is not None:
                model, device = c.pytorch, model_device(c.pytorch)
                counter = FlopCounterMode(display=False)
                # With gradients on: the counter's module tracker hooks every module input that requires grad, and
                # a view of a parameter made under no_grad (DETR's query embeddings) requires grad without a
                # grad_fn.
                with counter, torch.enable_grad(), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "Using a non-tuple sequence", UserWarning)  # onnx2torch's Slice
                    model(*(x.to(device) for x in _forward_inputs(inputs)))
                gflops = counter.get_total_flops() / 1e9
                thumbnailer = find_thumbnailer(model)
                if thumbnailer is not None:
                    pixels = thumbnailer(images.to(device))["downsample_input"][0].clamp(0, 1)
                    thumb = (pixels * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            det = to_image_pixels(det, image.shape[:2])
            order = torch.argsort(det["scores"], descending=True, stable=True)
            runs.append(ScaleRun(
                label=label, scale=scale, mode=mode,
                input_hw=full_hw if scale == 1 else thumbnail_size(*full_hw, scale),
                boxes=det["boxes"][order].float().numpy(), scores=det["scores"][order].float().numpy(),
                labels=det["labels"][order].long().numpy(), thumbnail=thumb, times_ms=t["pytorch"],
                gflops=gflops, ort_times_ms=t["onnxruntime"], pytorch_error=c.pytorch_error,
                ort_error=c.ort_error, detections_from=c.shown))
    full = next((r for r in runs if r.scale == 1), None)
    for r in runs:
        r.speedup = full.shown_latency_ms / r.shown_latency_ms if full is not None else float("nan")
    return Comparison(image, runs, notes)


def filter_detections(run: ScaleRun, threshold: float, classes: Sequence[str],
                      keep_classes: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """``run``'s detections with ``score >= threshold`` and, when ``keep_classes`` is given, a class name in it.

    Returns:
        ``{"boxes": (K, 4), "scores": (K,), "labels": (K,)}`` in ``run``'s order.
    Raises:
        ValueError: a class name in ``keep_classes`` the model does not have.
    """
    keep = run.scores >= threshold
    if keep_classes is not None:
        unknown = [c for c in keep_classes if c not in classes]
        if unknown:
            raise ValueError(f"classes {unknown} are not the model's ({', '.join(classes[1:])})")
        wanted = {classes.index(c) for c in keep_classes}
        keep &= np.isin(run.labels, sorted(wanted))
    return {"boxes": run.boxes[keep], "scores": run.scores[keep], "labels": run.labels[keep]}
