"""apps.compare, the demo's logic without the UI: each scale's detections against toolkit.predict run on an
equivalent checkpoint, speed-ups from a fake clock, the filters against a naive loop, the image checks."""

from __future__ import annotations

import json
from itertools import count

import numpy as np
import pytest
import torch

from apps.compare import LoadedModel, at_scale, compare_scales, filter_detections, prepare_image, scales_for
from toolkit.data.shapes import SHAPES_CLASSES
from toolkit.data.voc import read_image_bgr
from toolkit.engine import load_trained_model
from toolkit.predict import main as predict_main


def _loaded(path) -> LoadedModel:
    model, classes, name = load_trained_model(path)
    return LoadedModel(model, name, tuple(classes), str(path))


def _predicted(checkpoint, image, out, threshold=0.05):
    """toolkit.predict's detections for ``image``: the independent path to compare a scale's run with."""
    assert predict_main(["--checkpoint", str(checkpoint), str(image), "--out", str(out), "--score-threshold",
                         str(threshold)]) == 0
    record = json.loads((out / "detections.json").read_text())["detections"][0]
    return np.array(record["boxes"]).reshape(-1, 4), np.array(record["scores"]), np.array(record["labels"])


def _assert_same(run, predicted, threshold=0.05):
    """The same detections up to toolkit.predict's rounding (boxes to 0.01 px, scores to 1e-4): each of its rows
    matched to one of the run's (many scores tie once rounded, so rows are matched, not sorted)."""
    boxes, scores, labels = predicted
    keep = run.scores >= threshold
    assert keep.sum() == len(scores) > 0
    free = list(np.flatnonzero(keep))
    for box, score, label in zip(boxes, scores, labels):
        match = [i for i in free if run.labels[i] == label and abs(run.scores[i] - score) <= 1e-4
                 and np.abs(run.boxes[i] - box).max() <= 0.01]
        assert match, f"toolkit.predict's {label} {score} {box} is not among the run's detections"
        free.remove(match[0])


def _with_thumbnail(checkpoint, tmp_path, thumbnail):
    """A copy of a toolkit.train checkpoint whose ``thumbnail`` entry is ``thumbnail`` (down-sampler removed)."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("down_sample.")}
    ckpt["thumbnail"] = thumbnail
    path = tmp_path / f"{'full' if thumbnail is None else thumbnail['mode'] + str(thumbnail['scale'])}.pth"
    torch.save(ckpt, path)
    return path


def test_each_scale_equals_predict_on_the_equivalent_checkpoint(tiny_dsod_checkpoints, mini_shapes_image, tmp_path):
    loaded = _loaded(tiny_dsod_checkpoints["student"])
    assert loaded.thumbnail == (2, "learned")
    assert scales_for(loaded) == [(1, None), (2, "bicubic"), (4, "bicubic"), (2, "learned")]
    result = compare_scales(loaded, read_image_bgr(mini_shapes_image), rounds=2)
    runs = {r.label: r for r in result.runs}
    assert list(runs) == ["full", "bicubic 1/2", "bicubic 1/4", "learned 1/2"]
    assert runs["full"].input_hw == (160, 160) and runs["full"].thumbnail is None
    assert runs["bicubic 1/4"].input_hw == (40, 40) and runs["bicubic 1/4"].thumbnail.shape == (40, 40, 3)
    assert runs["learned 1/2"].input_hw == (78, 78) and runs["learned 1/2"].thumbnail.dtype == np.uint8
    # The student as trained; its detector without the down-sampler; and behind bicubic thumbnails: each as
    # toolkit.predict runs the checkpoint that says so.
    _assert_same(runs["learned 1/2"], _predicted(tiny_dsod_checkpoints["student"], mini_shapes_image, tmp_path / "l2"))
    for label, thumbnail in (("full", None), ("bicubic 1/2", {"scale": 2, "mode": "bicubic"}),
                             ("bicubic 1/4", {"scale": 4, "mode": "bicubic"})):
        variant = _with_thumbnail(tiny_dsod_checkpoints["student"], tmp_path, thumbnail)
        _assert_same(runs[label], _predicted(variant, mini_shapes_image, tmp_path / label.replace("/", "_")))
    # The variants are built once and kept for the next image.
    assert set(loaded.variants) == {(1, None), (2, "bicubic"), (4, "bicubic")}
    assert at_scale(loaded, 2, "bicubic") is loaded.variants[(2, "bicubic")]
    # The loaded model was not changed by the variants.
    assert _loaded(tiny_dsod_checkpoints["student"]).model.state_dict().keys() == loaded.model.state_dict().keys()
    assert loaded.thumbnail == (2, "learned")
    # GFLOPs fall with the input; every run was timed twice.
    assert runs["full"].gflops > runs["bicubic 1/2"].gflops > runs["bicubic 1/4"].gflops > 0
    assert all(len(r.times_ms) == 2 and r.latency_ms > 0 for r in result.runs)


def test_a_full_size_model_has_no_learned_scale(tiny_dsod_checkpoints, mini_shapes_image, tmp_path):
    loaded = _loaded(tiny_dsod_checkpoints["teacher"])
    assert loaded.thumbnail is None and len(scales_for(loaded)) == 3
    result = compare_scales(loaded, read_image_bgr(mini_shapes_image), rounds=1)
    _assert_same(result.runs[0], _predicted(tiny_dsod_checkpoints["teacher"], mini_shapes_image, tmp_path / "full"))
    with pytest.raises(ValueError, match="no learned 2x down-sampler"):
        compare_scales(loaded, read_image_bgr(mini_shapes_image), rounds=1, scales=[(2, "learned")])


def test_detr_scales(train_tiny, mini_shapes_root, mini_shapes_image, tmp_path):
    checkpoint = train_tiny(mini_shapes_root, tmp_path / "detr", "deformable_detr_tiny")
    loaded = _loaded(checkpoint)
    result = compare_scales(loaded, read_image_bgr(mini_shapes_image), rounds=1)
    runs = {r.label: r for r in result.runs}
    assert list(runs) == ["full", "bicubic 1/2", "bicubic 1/4"]
    predicted = _predicted(checkpoint, mini_shapes_image, tmp_path / "full", threshold=0.0)
    _assert_same(runs["full"], predicted, threshold=0.0)
    full_hw = runs["full"].input_hw
    assert runs["bicubic 1/4"].input_hw == ((full_hw[0] - 1) // 4 + 1, (full_hw[1] - 1) // 4 + 1)
    assert runs["bicubic 1/4"].thumbnail.shape[:2] == runs["bicubic 1/4"].input_hw
    assert runs["full"].gflops > runs["bicubic 1/4"].gflops > 0
    assert loaded.thumbnail is None  # the variants were copies


def test_speedups_are_ratios_of_median_latencies(tiny_dsod_checkpoints, mini_shapes_image):
    """A fake clock: each call of round r, scale i lasts durations[i] + r ms, so the medians and the ratios are
    known exactly."""
    durations = [40.0, 20.0, 10.0]
    ticks = count()

    def clock():
        k = next(ticks)  # two calls per timed run: start, end
        run, end = divmod(k, 2)
        r, i = divmod(run, len(durations))
        return (run * 1000.0 + (durations[i] + r) * end) / 1e3

    loaded = _loaded(tiny_dsod_checkpoints["teacher"])
    result = compare_scales(loaded, read_image_bgr(mini_shapes_image), rounds=3, clock=clock)
    for run, d in zip(result.runs, durations):
        assert run.times_ms == pytest.approx([d, d + 1, d + 2])
        assert run.latency_ms == pytest.approx(d + 1)
        assert run.speedup == pytest.approx(41.0 / (d + 1))


def test_filters_equal_a_naive_loop(tiny_dsod_checkpoints, mini_shapes_image):
    loaded = _loaded(tiny_dsod_checkpoints["teacher"])
    run = compare_scales(loaded, read_image_bgr(mini_shapes_image), rounds=1).runs[0]
    classes = loaded.classes
    assert classes[1:] == tuple(SHAPES_CLASSES)
    for threshold, keep in ((0.0, None), (0.05, None), (0.05, ["circle", "star"]), (1.1, None), (0.0, [])):
        got = filter_detections(run, threshold, classes, keep)
        expected = [i for i in range(len(run.scores)) if run.scores[i] >= threshold
                    and (keep is None or classes[run.labels[i]] in keep)]
        np.testing.assert_array_equal(got["scores"], run.scores[expected])
        np.testing.assert_array_equal(got["boxes"], run.boxes[expected].reshape(-1, 4))
        np.testing.assert_array_equal(got["labels"], run.labels[expected])
    with pytest.raises(ValueError, match="are not the model's"):
        filter_detections(run, 0.0, classes, ["zebra"])


def test_prepare_image():
    huge = np.zeros((3000, 4500, 3), np.uint8)
    image, notes = prepare_image(huge)
    assert image.shape == (1365, 2048, 3) and "downscaled to 2048x1365" in notes[0]
    grey, notes = prepare_image(np.full((10, 20), 7, np.uint8))
    assert grey.shape == (10, 20, 3) and (grey == 7).all() and not notes
    assert prepare_image(np.zeros((5, 6, 4), np.uint8))[0].shape == (5, 6, 3)
    for bad in (np.zeros((5, 6, 3), np.float32), np.zeros((5, 6, 2), np.uint8), np.zeros((0, 6, 3), np.uint8)):
        with pytest.raises(ValueError):
            prepare_image(bad)
