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
    # A student trained behind the aliased resize runs as trained, beside the antialiased thumbnails.
    aliased_ckpt = _with_thumbnail(tiny_dsod_checkpoints["student"], tmp_path, {"scale": 4, "mode": "bicubic_aliased"})
    aliased = _loaded(aliased_ckpt)
    assert scales_for(aliased) == [(1, None), (2, "bicubic"), (4, "bicubic"), (4, "bicubic_aliased")]
    own = compare_scales(aliased, read_image_bgr(mini_shapes_image), rounds=1, scales=[(4, "bicubic_aliased")])
    assert [r.label for r in own.runs] == ["bicubic_aliased 1/4"] and own.runs[0].input_hw == (40, 40)
    _assert_same(own.runs[0], _predicted(aliased_ckpt, mini_shapes_image, tmp_path / "aliased"))
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
    # A DETR takes any input size; each scale's export is for this image's.
    assert all(r.ort_error is None and r.ort_latency_ms > 0 for r in result.runs)
    assert set(loaded.onnx_variants) == {(1, None, full_hw), (2, "bicubic", full_hw), (4, "bicubic", full_hw)}


def test_the_onnxruntime_variants_of_two_input_sizes_are_kept(tiny_dsod_checkpoints, monkeypatch):
    import apps.compare
    from apps.compare import ONNX_SIZES_KEPT, onnx_at_scale

    made = []

    def fake_export(loaded, model, input_hw):
        made.append(input_hw)
        if input_hw == (9, 9):
            raise ValueError("no ONNX export: refused")
        return object()

    monkeypatch.setattr(apps.compare, "_export_variant", fake_export)
    loaded = _loaded(tiny_dsod_checkpoints["teacher"])
    first = onnx_at_scale(loaded, 1, None, (100, 120))
    assert onnx_at_scale(loaded, 1, None, (100, 120)) is first and made == [(100, 120)]
    with pytest.raises(ValueError, match="refused"):
        onnx_at_scale(loaded, 1, None, (9, 9))
    with pytest.raises(ValueError, match="refused"):  # kept: not exported again
        onnx_at_scale(loaded, 1, None, (9, 9))
    assert made == [(100, 120), (9, 9)] and ONNX_SIZES_KEPT == 2
    onnx_at_scale(loaded, 2, "bicubic", (7, 7))  # a third size: the oldest goes
    assert {k[2] for k in loaded.onnx_variants} == {(9, 9), (7, 7)}
    assert onnx_at_scale(loaded, 1, None, (100, 120)) is not first and made[-1] == (100, 120)


def test_speedups_are_ratios_of_median_latencies(tiny_dsod_checkpoints, mini_shapes_image):
    """A fake clock: in round r, scale i's PyTorch run lasts durations[i] + r ms and its onnxruntime run, timed
    right after it, ort_durations[i] + r ms, so the medians and the ratios are known exactly."""
    durations, ort_durations = [40.0, 20.0, 10.0], [16.0, 8.0, 5.0]
    ticks = count()

    def clock():
        k = next(ticks)  # two calls per timed run: start, end
        run, end = divmod(k, 2)
        r, rest = divmod(run, 2 * len(durations))
        i, side = divmod(rest, 2)  # each scale: PyTorch, then onnxruntime
        return (run * 1000.0 + ((ort_durations if side else durations)[i] + r) * end) / 1e3

    loaded = _loaded(tiny_dsod_checkpoints["teacher"])
    result = compare_scales(loaded, read_image_bgr(mini_shapes_image), rounds=3, clock=clock)
    for run, d, o in zip(result.runs, durations, ort_durations):
        assert run.times_ms == pytest.approx([d, d + 1, d + 2])
        assert run.latency_ms == pytest.approx(d + 1)
        assert run.ort_times_ms == pytest.approx([o, o + 1, o + 2])
        assert run.ort_latency_ms == pytest.approx(o + 1)
        assert run.pytorch_over_ort == pytest.approx((d + 1) / (o + 1))
        assert run.speedup == pytest.approx(41.0 / (d + 1))  # PyTorch's: the detections shown are PyTorch's


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


# ------------------------------------------------------------------------------------------- onnxruntime
def _export(checkpoint, out, *flags):
    """``python -m toolkit.export`` of a checkpoint (which checks the file with onnxruntime before writing it)."""
    from toolkit.export import main as export_main

    assert export_main(["--checkpoint", str(checkpoint), "-o", str(out), *flags]) == 0
    return out


def _with_an_op_onnx2torch_lacks(source, out):
    """A copy of an exported file whose ``loc`` output goes through ``Shrink(lambd=0, bias=0)``: the identity, in a
    node type onnxruntime runs and onnx2torch has no converter for."""
    import onnx

    model = onnx.load(str(source))
    for node in model.graph.node:
        node.input[:] = ["loc_raw" if name == "loc" else name for name in node.input]
        node.output[:] = ["loc_raw" if name == "loc" else name for name in node.output]
    model.graph.node.append(onnx.helper.make_node("Shrink", ["loc_raw"], ["loc"], lambd=0.0, bias=0.0))
    onnx.save(model, str(out))
    return out


def _normalized(run, image_hw):
    h, w = image_hw
    return run.boxes / np.array([w, h, w, h], np.float32)


def _assert_close(got, expected, image_hw, atol=1e-4):
    """The same detections within ``atol`` (scores, boxes normalized to the image), in the same order."""
    assert len(got.scores) == len(expected.scores) > 0
    np.testing.assert_array_equal(got.labels, expected.labels)
    np.testing.assert_allclose(got.scores, expected.scores, atol=atol, rtol=0)
    np.testing.assert_allclose(_normalized(got, image_hw), _normalized(expected, image_hw), atol=atol, rtol=0)


def test_every_scale_runs_in_onnxruntime_too(tiny_dsod_checkpoints, mini_shapes_image):
    from apps.compare import model_device, onnx_at_scale
    from toolkit.engine import inference_setup, predict_batch

    loaded = _loaded(tiny_dsod_checkpoints["student"])
    image = read_image_bgr(mini_shapes_image)
    result = compare_scales(loaded, image, rounds=2)
    assert [r.label for r in result.runs] == ["full", "bicubic 1/2", "bicubic 1/4", "learned 1/2"]
    for run in result.runs:
        assert run.ort_error is None and run.detections_from == "pytorch"
        assert len(run.ort_times_ms) == 2 and run.ort_latency_ms > 0
        assert run.pytorch_over_ort == pytest.approx(run.latency_ms / run.ort_latency_ms)
    assert result.notes[0].startswith("4 scale(s) exported to ONNX") and len(result.notes) == 1
    # One export per scale and input size, kept for the next image.
    assert set(loaded.onnx_variants) == {(1, None, (160, 160)), (2, "bicubic", (160, 160)),
                                         (4, "bicubic", (160, 160)), (2, "learned", (160, 160))}
    kept = dict(loaded.onnx_variants)
    again = compare_scales(loaded, image, rounds=1)
    assert not again.notes and all(loaded.onnx_variants[k] is v for k, v in kept.items())
    # onnxruntime through PyTorch's prediction path finds what PyTorch finds at every scale (the bicubic
    # thumbnails as ONNX Resize with antialiasing).
    setup = inference_setup(loaded.model_name, len(loaded.classes))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    inputs, _ = setup.collate([setup.transform(image, empty)])
    with torch.no_grad():
        for scale, mode in scales_for(loaded):
            ours = at_scale(loaded, scale, mode)
            ort = onnx_at_scale(loaded, scale, mode, (160, 160))
            ref = predict_batch(ours, inputs, model_device(ours), None, setup.params)[0]
            got = predict_batch(ort, inputs, model_device(ort), None, setup.params)[0]
            keep = ref["scores"] >= 0.05
            assert keep.sum() > 0
            np.testing.assert_allclose(got["scores"][keep].numpy(), ref["scores"][keep].numpy(), atol=1e-4)
            np.testing.assert_allclose(got["boxes"][keep].numpy(), ref["boxes"][keep].numpy(), atol=1e-4)
            np.testing.assert_array_equal(got["labels"][keep].numpy(), ref["labels"][keep].numpy())


def test_an_onnx_file_finds_what_its_checkpoint_finds(tiny_dsod_checkpoints, mini_shapes_image, tmp_path):
    from apps.sources import load_source

    checkpoint = tiny_dsod_checkpoints["teacher"]
    image = read_image_bgr(mini_shapes_image)
    pytorch = compare_scales(_loaded(checkpoint), image, rounds=1, onnxruntime=False).runs[0]
    for flags in ([], ["--with-postprocess"]):
        loaded = load_source("onnx", str(_export(checkpoint, tmp_path / f"teacher{len(flags)}.onnx", *flags)))
        assert loaded.is_onnx and loaded.fixed_input and loaded.import_error is None
        assert loaded.classes == ("background", *SHAPES_CLASSES) and scales_for(loaded) == [(1, None)]
        result = compare_scales(loaded, image, rounds=2)
        assert not result.notes
        run, = result.runs
        assert run.label == "full" and run.input_hw == (160, 160) and run.thumbnail is None
        assert run.detections_from == "onnxruntime" and run.pytorch_error is None and run.ort_error is None
        # onnxruntime's detections (the shown ones) are the checkpoint's in PyTorch.
        _assert_close(run, pytorch, image.shape[:2])
        # Both sides timed; the PyTorch side (onnx2torch) counts the checkpoint's convolutions.
        assert len(run.times_ms) == len(run.ort_times_ms) == 2 and run.latency_ms > 0 and run.ort_latency_ms > 0
        assert run.gflops == pytest.approx(pytorch.gflops, rel=1e-6)
        assert run.speedup == 1.0
    with pytest.raises(ValueError, match="input size was fixed by its export"):
        compare_scales(loaded, image, rounds=1, scales=[(2, "bicubic")])


def test_an_onnx_file_onnx2torch_cannot_convert_still_runs(tiny_dsod_checkpoints, mini_shapes_image, tmp_path):
    from apps.sources import load_source

    checkpoint = tiny_dsod_checkpoints["teacher"]
    image = read_image_bgr(mini_shapes_image)
    path = _with_an_op_onnx2torch_lacks(_export(checkpoint, tmp_path / "teacher.onnx"), tmp_path / "shrink.onnx")
    loaded = load_source("onnx", str(path))
    assert loaded.imported is None and "Shrink" in loaded.import_error
    result = compare_scales(loaded, image, rounds=2)
    run, = result.runs
    assert run.times_ms == [] and np.isnan(run.latency_ms) and np.isnan(run.gflops) and np.isnan(run.pytorch_over_ort)
    assert len(run.ort_times_ms) == 2 and run.ort_latency_ms > 0 and run.speedup == 1.0
    assert "Shrink" in run.pytorch_error
    assert len(result.notes) == 1 and result.notes[0].startswith("PyTorch n/a (full): onnx2torch cannot convert")
    pytorch = compare_scales(_loaded(checkpoint), image, rounds=1, onnxruntime=False).runs[0]
    _assert_close(run, pytorch, image.shape[:2])


def test_an_export_that_fails_leaves_its_cells_empty(tiny_dsod_checkpoints, mini_shapes_image, monkeypatch):
    """A scale whose export fails (here: the exporter refuses the model) runs in PyTorch alone; the note says
    why, once for every scale it applies to; the failure is kept, not retried."""
    import toolkit.export
    from toolkit.export import ExportError

    calls = []

    def refuse(spec, out, **kwargs):
        calls.append(out)
        raise ExportError("the ONNX export failed: UnsupportedOperatorError: no such op\nTorch IR graph at exception")

    monkeypatch.setattr(toolkit.export, "export", refuse)
    loaded = _loaded(tiny_dsod_checkpoints["teacher"])
    for expected_calls in (3, 3):
        result = compare_scales(loaded, read_image_bgr(mini_shapes_image), rounds=1)
        assert len(calls) == expected_calls
        assert all(r.ort_times_ms == [] and np.isnan(r.ort_latency_ms) and len(r.times_ms) == 1 for r in result.runs)
        assert result.notes == ["onnxruntime n/a (full, bicubic 1/2, bicubic 1/4): no ONNX export: the ONNX export "
                                "failed: UnsupportedOperatorError: no such op"]
