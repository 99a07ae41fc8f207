"""The demo's logic apart from the UI: one detector run at several input scales, side by side.

For a loaded model (any family :mod:`toolkit` loads) and one image, :func:`compare_scales` runs

- ``full``: the detector on the full-size input (a ThumbDet student without its down-sampler);
- ``bicubic 1/2`` and ``bicubic 1/4``: the same detector behind an antialiased bicubic thumbnail
  (:class:`toolkit.models.thumbnail.Thumbnailer`, the ThumbDet baseline; the SSD family's priors computed for
  the smaller input, as :func:`toolkit.models.build.add_thumbnail` does);
- ``learned 1/s``: a ThumbDet student as trained, with its learned down-sampler,

and returns per scale the detections (boxes in the image's pixels), the thumbnail the detector saw, the latency
(median of several runs after a warm-up, batch 1: preprocessed input in, detections out), the GFLOPs of the
forward pass (``torch.utils.flop_counter``, multiply-adds count 2, post-processing left out) and the speed-up over
``full``.  :func:`filter_detections` applies a score threshold and a class filter afterwards, so the UI redraws
without rerunning the model.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from toolkit.engine import InferenceSetup, add_ssd_thumbnail, inference_setup, predict_batch, to_image_pixels
from toolkit.models.thumbnail import Thumbnailer, find_thumbnailer, thumbnail_size

MAX_SIDE = 2048  # larger images are downscaled first (a note says so)
SCALE_NAMES = {1: "full", 2: "1/2", 4: "1/4"}


@dataclass
class LoadedModel:
    """A detector and what running it needs: the preset name (``model_name``), its classes (``"background"``
    first) and where it came from (``source``, shown in the UI).

    ``setup`` replaces the preset's test-time pipeline (:func:`toolkit.engine.inference_setup`) for a model that
    is no preset (a converted Caffe net run as it is); ``fixed_input``: it runs at its own input size only (a
    Caffe net's PriorBox layers are written in its input's pixels, so it has no thumbnail scales).
    """

    model: nn.Module
    model_name: str
    classes: tuple[str, ...]
    source: str
    setup: Optional[InferenceSetup] = None
    fixed_input: bool = False
    # (scale, mode) -> the detector at that scale (see at_scale), built once
    variants: dict = field(default_factory=dict, repr=False)

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
        label: ``"full"``, ``"bicubic 1/2"``, ``"bicubic 1/4"`` or ``"learned 1/s"``.
        scale, mode: the thumbnail's scale (1: full size) and mode (``None`` at full size).
        input_hw: ``(h, w)`` the detector's backbone sees.
        boxes: ``float32 (K, 4)`` xyxy in continuous pixels of the image; ``scores`` ``(K,)``; ``labels`` ``(K,)``
            int64 indices into the classes (background excluded), sorted by descending score.
        thumbnail: ``uint8 (h, w, 3)`` RGB, the down-sampled image the detector saw (None at full size).
        times_ms: each timed run; ``latency_ms`` their median.
        gflops: the forward pass (post-processing left out).
        speedup: the full-size median latency over this one's.
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
    latency_ms: float = field(init=False)

    def __post_init__(self) -> None:
        self.latency_ms = statistics.median(self.times_ms)


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
    """The ``(scale, mode)`` pairs to run: full size, bicubic 1/2 and 1/4, and the model's learned thumbnail
    (full size alone for a ``fixed_input`` model)."""
    if loaded.fixed_input:
        return [(1, None)]
    pairs: list[tuple[int, Optional[str]]] = [(1, None), (2, "bicubic"), (4, "bicubic")]
    if loaded.thumbnail is not None and loaded.thumbnail[1] == "learned":
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
        raise ValueError(f"{loaded.source} runs at its own input size only (a Caffe net's priors are in its "
                         "input's pixels)")
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
    return variant.to(next(loaded.model.parameters()).device).eval()


def _label(scale: int, mode: Optional[str]) -> str:
    return "full" if scale == 1 else f"{mode} {SCALE_NAMES[scale]}"


def _forward_inputs(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def compare_scales(loaded: LoadedModel, image_bgr: np.ndarray, rounds: int = 5, warmup: int = 1,
                   scales: Optional[Sequence[tuple[int, Optional[str]]]] = None,
                   clock: Callable[[], float] = time.perf_counter) -> Comparison:
    """Run ``loaded`` on ``image_bgr`` at each of ``scales`` (default :func:`scales_for`).

    Args:
        image_bgr: ``uint8 (H, W, 3)`` BGR (checked and, if huge, downscaled by :func:`prepare_image`).
        rounds: timed runs per scale, interleaved scale by scale so that a change of machine load touches every
            scale alike; before them ``warmup`` untimed runs (at least one: the run whose detections are returned).
        clock: seconds (tests pass a fake one).
    Returns:
        A :class:`Comparison`; every detection, whatever its score (filter with :func:`filter_detections`).
    """
    from torch.utils.flop_counter import FlopCounterMode

    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    image, notes = prepare_image(image_bgr)
    setup = loaded.setup or inference_setup(loaded.model_name, len(loaded.classes))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    inputs, _ = setup.collate([setup.transform(image, empty)])
    device = next(loaded.model.parameters()).device
    pairs = list(scales) if scales is not None else scales_for(loaded)
    models = [at_scale(loaded, s, m) for s, m in pairs]
    images = _forward_inputs(inputs)[0]
    full_hw = tuple(images.shape[-2:])

    def run(model):
        return predict_batch(model, inputs, device, setup.predict_fn, setup.params)[0]

    times: list[list[float]] = [[] for _ in models]
    detections = []
    with torch.no_grad():
        for model in models:
            detections.append(run(model))
            for _ in range(warmup - 1):
                run(model)
        for _ in range(rounds):
            for i, model in enumerate(models):
                start = clock()
                run(model)
                times[i].append((clock() - start) * 1e3)
        runs = []
        for (scale, mode), model, det, t in zip(pairs, models, detections, times):
            counter = FlopCounterMode(display=False)
            # With gradients on: the counter's module tracker hooks every module input that requires grad, and a
            # view of a parameter made under no_grad (DETR's query embeddings) requires grad without a grad_fn.
            with counter, torch.enable_grad():
                model(*(x.to(device) for x in _forward_inputs(inputs)))
            thumb = None
            thumbnailer = find_thumbnailer(model)
            if thumbnailer is not None:
                pixels = thumbnailer(images.to(device))["downsample_input"][0].clamp(0, 1)
                thumb = (pixels * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            det = to_image_pixels(det, image.shape[:2])
            order = torch.argsort(det["scores"], descending=True, stable=True)
            runs.append(ScaleRun(
                label=_label(scale, mode), scale=scale, mode=mode,
                input_hw=full_hw if scale == 1 else thumbnail_size(*full_hw, scale),
                boxes=det["boxes"][order].float().numpy(), scores=det["scores"][order].float().numpy(),
                labels=det["labels"][order].long().numpy(), thumbnail=thumb, times_ms=t,
                gflops=counter.get_total_flops() / 1e9))
    full = next((r for r in runs if r.scale == 1), None)
    for r in runs:
        r.speedup = full.latency_ms / r.latency_ms if full is not None else float("nan")
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
