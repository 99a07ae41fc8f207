"""onnxruntime as a backend: the same detections as PyTorch, through toolkit.predict and toolkit.evaluate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from toolkit import evaluate as evaluate_mod
from toolkit import export as export_mod
from toolkit import predict as predict_mod
from toolkit.data.voc import read_image_bgr
from toolkit.engine import inference_setup, load_trained_model, predict_batch
from toolkit.onnx_backend import load_onnxruntime_detector, onnx_inference_setup

pytest.importorskip("onnxruntime")


def _detections(model, setup, image):
    inputs, _ = setup.collate([setup.transform(image, export_mod.no_boxes())])
    return predict_batch(model, inputs, torch.device("cpu"), setup.predict_fn, setup.params)[0]


def _assert_same(got, expected, atol=1e-4):
    assert len(got["scores"]) == len(expected["scores"])
    np.testing.assert_array_equal(got["labels"].numpy(), expected["labels"].numpy())
    np.testing.assert_allclose(got["scores"].numpy(), expected["scores"].numpy(), rtol=0, atol=atol)
    np.testing.assert_allclose(got["boxes"].numpy(), expected["boxes"].numpy(), rtol=0, atol=atol)


@pytest.mark.parametrize("kind", ["checkpoint", "raw.onnx", "postprocessed.onnx"])
def test_ssd_family_detections_equal_pytorchs(tiny_dsod_checkpoints, mini_shapes_image, tmp_path, kind):
    checkpoint = tiny_dsod_checkpoints["student"]  # a ThumbDet student: its down-sampler in the graph too
    source = checkpoint
    if kind != "checkpoint":
        source = tmp_path / kind
        flags = ["--with-postprocess"] if kind.startswith("post") else []
        assert export_mod.main(["--checkpoint", str(checkpoint), "-o", str(source), "--dynamic-batch", *flags]) == 0
    detector = load_onnxruntime_detector(source)
    model, classes, name = load_trained_model(checkpoint)
    assert detector.classes == classes and detector.model_name == name
    image = read_image_bgr(mini_shapes_image)
    got = _detections(detector, onnx_inference_setup(detector), image)
    expected = _detections(model, inference_setup(name, len(classes)), image)
    assert len(expected["scores"]) > 0
    _assert_same(got, expected)


def test_detr_onnx_detections_equal_pytorchs_at_the_export_size(mini_shapes_root, mini_shapes_image,
                                                                tmp_path, train_tiny):
    checkpoint = train_tiny(mini_shapes_root, tmp_path / "detr", "deformable_detr_tiny")
    for flags in ([], ["--with-postprocess"]):
        path = tmp_path / f"detr{len(flags)}.onnx"
        assert export_mod.main(["--checkpoint", str(checkpoint), "-o", str(path), "--input-size", "128", "160",
                                *flags]) == 0
        detector = load_onnxruntime_detector(path)
        setup = onnx_inference_setup(detector)
        assert setup.batch_size == 1 and detector.input_hw == (128, 160)
        image = read_image_bgr(mini_shapes_image)
        got = _detections(detector, setup, image)
        # PyTorch on the same warped input, through the PyTorch post-processing.
        model, _, _ = load_trained_model(checkpoint)
        from toolkit.models.detr.training import detr_postprocess

        inputs, _ = setup.collate([setup.transform(image, export_mod.no_boxes())])
        with torch.no_grad():
            expected = detr_postprocess(model(inputs))[0]
        _assert_same(got, expected)


def test_evaluate_and_predict_with_onnxruntime(tiny_dsod_checkpoints, mini_shapes_root, mini_shapes_image, tmp_path,
                                               capsys):
    checkpoint = tiny_dsod_checkpoints["teacher"]
    results = {}
    for backend in ("pytorch", "onnxruntime"):
        out = tmp_path / f"{backend}.json"
        assert evaluate_mod.main(["--checkpoint", str(checkpoint), "--dataset", "shapes", "--data-root",
                                  str(mini_shapes_root), "--backend", backend, "--json", str(out)]) == 0
        results[backend] = json.loads(out.read_text())
        assert predict_mod.main(["--checkpoint", str(checkpoint), str(mini_shapes_image), "--out",
                                 str(tmp_path / backend), "--backend", backend, "--score-threshold", "0.05"]) == 0
    assert "(onnxruntime)" in capsys.readouterr().out
    assert results["onnxruntime"]["mAP"] == pytest.approx(results["pytorch"]["mAP"], abs=1e-3)
    got, expected = (json.loads((tmp_path / b / "detections.json").read_text())["detections"][0]
                     for b in ("onnxruntime", "pytorch"))
    assert got["labels"] == expected["labels"]
    np.testing.assert_allclose(got["scores"], expected["scores"], atol=2e-4)


def test_backend_errors(tiny_dsod_checkpoints, mini_shapes_image, tmp_path, capsys):
    plain = tmp_path / "plain.onnx"
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, plain)
    assert predict_mod.main(["--checkpoint", str(plain), str(mini_shapes_image), "--out", str(tmp_path / "p")]) == 2
    assert "without legacy_det metadata" in capsys.readouterr().err
    checkpoint = str(tiny_dsod_checkpoints["student"])
    assert predict_mod.main(["--checkpoint", checkpoint, str(mini_shapes_image), "--out", str(tmp_path / "p"),
                             "--backend", "onnxruntime", "--save-thumbnails"]) == 2
    assert "--save-thumbnails needs the PyTorch backend" in capsys.readouterr().err
    post = tmp_path / "post.onnx"
    assert export_mod.main(["--checkpoint", checkpoint, "-o", str(post), "--with-postprocess"]) == 0
    capsys.readouterr()
    assert predict_mod.main(["--checkpoint", str(post), str(mini_shapes_image), "--out", str(tmp_path / "p"),
                             "--nms", "voting_cluster_diou"]) == 2
    assert "holds its own post-processing" in capsys.readouterr().err
