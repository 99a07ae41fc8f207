"""``python -m toolkit.export``: every family to ONNX, onnxruntime against PyTorch and against real Caffe."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import require_fixture
from toolkit import export as export_mod

ort = pytest.importorskip("onnxruntime")


def run_export(capsys, *argv) -> tuple[int, str, str]:
    code = export_mod.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def round_trip(path, capsys) -> str:
    """``python -m converters.onnx import`` of an export: onnx2torch's module against onnxruntime (at batch 1, and 2
    when the batch axis is dynamic); returns the report."""
    from converters.onnx.__main__ import main as onnx_main

    code = onnx_main(["import", str(path), "-o", str(path.with_suffix(".pth"))])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


# ------------------------------------------------------------------------------------------ SSD family
@pytest.fixture(scope="module", params=["ssd_tiny", "grp_dsod_tiny"])
def tiny_ssd(request, mini_shapes_root, tmp_path_factory, train_tiny):
    return train_tiny(mini_shapes_root, tmp_path_factory.mktemp(request.param), request.param)


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_dsod_tiny_raw_and_postprocessed(tiny_dsod_checkpoints, mini_shapes_image, tmp_path, capsys, kind):
    """Raw heads at batch 1 and 2; the post-processed graph equals the toolkit's DetectionOutput on other images."""
    from toolkit.engine import load_trained_model, predict
    from toolkit.models.build import default_postprocess
    from toolkit.models.postprocess import to_caffe_detection_blob

    checkpoint = tiny_dsod_checkpoints[kind]
    raw, post = tmp_path / "raw.onnx", tmp_path / "post.onnx"
    code, out, err = run_export(capsys, "--checkpoint", checkpoint, "-o", raw, "--dynamic-batch", "--image",
                                mini_shapes_image)
    assert code == 0, err
    assert "batch 2: loc" in out and "opset 17" in out
    names = [o.name for o in session(raw).get_outputs()]
    assert names == ["loc", "conf", "priors", "variances"]
    meta = metadata(raw)
    assert meta["legacy_det.family"] == "ssd" and meta["legacy_det.model"] == "dsod_tiny"
    assert json.loads(meta["legacy_det.classes"])[0] == "background"

    code, out, err = run_export(capsys, "--checkpoint", checkpoint, "-o", post, "--dynamic-batch",
                                "--with-postprocess")
    assert code == 0, err
    model, classes, _ = load_trained_model(checkpoint)
    images = torch.randn(3, 3, 160, 160) * 40  # other inputs than the export's own
    (got,) = session(post).run(None, {"images": images.numpy()})
    expected = to_caffe_detection_blob(predict(model, images, default_postprocess(len(classes)))).numpy()
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got[..., :2], expected[..., :2])
    np.testing.assert_allclose(got[..., 2:], expected[..., 2:], rtol=0, atol=1e-4)
    for path in (raw, post):
        assert "batch 2" in round_trip(path, capsys)


@pytest.mark.parametrize("mode", ["bicubic", "bicubic_aliased"])
def test_bicubic_student_exports(mode, tiny_dsod_checkpoints, mini_shapes_root, tmp_path, capsys, train_tiny):
    """A ThumbDet student behind a bicubic thumbnail: PyTorch's antialiased bicubic as ONNX Resize with
    ``antialias=1`` (opset 18), the aliased one as a plain cubic Resize; the export's own onnxruntime check (batch 2)
    holds the graph to PyTorch."""
    student = train_tiny(mini_shapes_root, tmp_path / mode, "dsod_tiny", "--distill", "thumbdet", "--teacher",
                         str(tiny_dsod_checkpoints["teacher"]), "--thumb-scale", "2", "--thumb-mode", mode)
    code, out, err = run_export(capsys, "--checkpoint", student, "-o", tmp_path / "b.onnx", "--dynamic-batch")
    assert code == 0, err
    assert "batch 2: loc" in out
    resizes = [{a.name: a for a in n.attribute} for n in onnx.load(str(tmp_path / "b.onnx")).graph.node
               if n.op_type == "Resize"]
    cubic = [attributes for attributes in resizes if attributes["mode"].s == b"cubic"]
    assert len(cubic) == 1  # the thumbnail; the detector's own upsampling is nearest
    attributes = cubic[0]
    if mode == "bicubic":
        assert "opset 18" in out and attributes["antialias"].i == 1
    else:
        assert "antialias" not in attributes or attributes["antialias"].i == 0


def test_ssd_and_grp_dsod_fixed_batch(tiny_ssd, tmp_path, capsys):
    """SSD (VGG) and GRP-DSOD (its gates) at a fixed batch, opset 18, with the post-processing in the graph too."""
    code, out, err = run_export(capsys, "--checkpoint", tiny_ssd, "-o", tmp_path / "post.onnx", "--with-postprocess")
    assert code == 0, err
    code, out, err = run_export(capsys, "--checkpoint", tiny_ssd, "-o", tmp_path / "ssd.onnx", "--opset", "18")
    assert code == 0, err
    assert [i.shape for i in session(tmp_path / "ssd.onnx").get_inputs()] == [[1, 3, 160, 160]]
    assert "opset 18" in out and "batch 2" not in out
    assert "batch 1: detection_out" in round_trip(tmp_path / "post.onnx", capsys)


# ------------------------------------------------------------------------------------------ converted Caffe nets
def _convert(prototxt, caffemodel, out):
    from converters.caffe.cli import convert

    convert(prototxt, caffemodel, out)
    return out


@pytest.mark.parametrize("net", ["dsod300", "yufacedetectnet_v1"])
def test_converted_caffe_nets_give_caffes_blobs(net, tmp_path, capsys):
    """The graph keeps Caffe's blob names; onnxruntime on Caffe's own input gives Caffe's stored blobs, and every
    DetectionOutput row (all of them, not only those with scores >= 0.5) equals Caffe's."""
    if net == "dsod300":
        folder = require_fixture("caffe/dsod300")
        files = (folder / "deploy.prototxt", folder / "random_init.caffemodel")
        reference = np.load(folder / "forward_2007_000027.npz")
    else:
        folder = require_fixture("caffe/yufacedetectnet_v1")
        files = (folder / "yufacedetectnet-open-v1.prototxt", folder / "yufacedetectnet-open-v1.caffemodel")
        reference = np.load(folder / "forward_keliamoniz1_320x240.npz")
    checkpoint = _convert(*files, tmp_path / "net.pth")
    onnx_path = tmp_path / "net.onnx"
    code, out, err = run_export(capsys, "--checkpoint", checkpoint, "-o", onnx_path, "--dynamic-batch")
    assert code == 0, err
    s = session(onnx_path)
    assert [i.name for i in s.get_inputs()] == ["data"]
    names = [o.name for o in s.get_outputs()]
    assert names == ["detection_out", "mbox_loc", "mbox_conf_flatten", "mbox_priorbox"]
    got = dict(zip(names, s.run(None, {"data": reference["data"]})))
    for name in ("mbox_loc", "mbox_conf_flatten", "mbox_priorbox"):
        np.testing.assert_allclose(got[name], reference[name], rtol=0, atol=1e-4, err_msg=name)
    rows, caffe_rows = got["detection_out"][0, 0], reference["detection_out"][0, 0]
    assert rows.shape == caffe_rows.shape
    np.testing.assert_array_equal(rows[:, :2], caffe_rows[:, :2])
    np.testing.assert_allclose(rows[:, 2:], caffe_rows[:, 2:], rtol=0, atol=1e-5)
    if net == "yufacedetectnet_v1":
        assert (rows[:, 2] >= 0.5).sum() == 1  # the face
    assert "batch 2: detection_out" in round_trip(onnx_path, capsys)


def test_caffe_outputs_flag_and_its_errors(tmp_path, capsys):
    folder = require_fixture("caffe/yufacedetectnet_v1")
    checkpoint = _convert(folder / "yufacedetectnet-open-v1.prototxt", folder / "yufacedetectnet-open-v1.caffemodel",
                          tmp_path / "face.pth")
    code, out, err = run_export(capsys, "--checkpoint", checkpoint, "-o", tmp_path / "a.onnx", "--outputs",
                                "conv3_3_norm", "mbox_conf_softmax")
    assert code == 0, err
    assert [o.name for o in session(tmp_path / "a.onnx").get_outputs()] == ["conv3_3_norm", "mbox_conf_softmax"]
    code, _, err = run_export(capsys, "--checkpoint", checkpoint, "-o", tmp_path / "b.onnx", "--outputs", "nope")
    assert code == 1 and err.startswith("error:") and "'nope'" in err
    code, _, err = run_export(capsys, "--checkpoint", checkpoint, "-o", tmp_path / "c.onnx", "--with-postprocess")
    assert code == 1 and "--model" in err
    assert not (tmp_path / "b.onnx").exists() and not (tmp_path / "c.onnx").exists()


def test_adaptive_nms_exports_as_a_loop(tmp_path, capsys):
    """The face detector with eta 0.9: its DetectionOutput through an ONNX Loop, rows equal to PyTorch's."""
    folder = require_fixture("caffe/yufacedetectnet_v1")
    text = (folder / "yufacedetectnet-open-v1.prototxt").read_text()
    assert "nms_threshold" in text
    prototxt = tmp_path / "eta.prototxt"
    prototxt.write_text(text.replace("nms_threshold:", "eta: 0.9\n    nms_threshold:", 1))
    checkpoint = _convert(prototxt, folder / "yufacedetectnet-open-v1.caffemodel", tmp_path / "eta.pth")
    code, out, err = run_export(capsys, "--checkpoint", checkpoint, "-o", tmp_path / "eta.onnx", "--dynamic-batch",
                                "--image", folder / "keliamoniz1.jpg")
    assert code == 0, err
    assert "batch 2: detection_out" in out
    assert "Loop" in {n.op_type for n in onnx.load(str(tmp_path / "eta.onnx")).graph.node}


# ------------------------------------------------------------------------------------------ DETR family
@pytest.fixture(scope="module")
def tiny_detrs(mini_shapes_root, tmp_path_factory, train_tiny):
    root = tmp_path_factory.mktemp("detr")
    return {name: train_tiny(mini_shapes_root, root / name, name)
            for name in ("deformable_detr_tiny", "sparse_detr_tiny")}


@pytest.mark.parametrize("name", ["deformable_detr_tiny", "sparse_detr_tiny"])
def test_detr_raw_and_postprocessed(tiny_detrs, tmp_path, capsys, name):
    from toolkit.engine import load_trained_model
    from toolkit.models.detr.training import detr_postprocess

    checkpoint = tiny_detrs[name]
    code, out, err = run_export(capsys, "--checkpoint", checkpoint, "-o", tmp_path / "raw.onnx", "--dynamic-batch",
                                "--input-size", "128", "160")
    assert code == 0, err
    assert "batch 2: pred_logits" in out
    code, out, err = run_export(capsys, "--checkpoint", checkpoint, "-o", tmp_path / "post.onnx", "--dynamic-batch",
                                "--input-size", "128", "160", "--with-postprocess", "--top-k", "20")
    assert code == 0, err
    model, _, _ = load_trained_model(checkpoint)
    images = torch.randn(2, 3, 128, 160)
    scores, labels, boxes = session(tmp_path / "post.onnx").run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = detr_postprocess(model(images), top_k=20)
    for i, e in enumerate(expected):
        np.testing.assert_allclose(scores[i], e["scores"].numpy(), rtol=0, atol=1e-4)
        np.testing.assert_array_equal(labels[i], e["labels"].numpy())
        np.testing.assert_allclose(boxes[i], e["boxes"].numpy(), rtol=0, atol=1e-4)
    for path in (tmp_path / "raw.onnx", tmp_path / "post.onnx"):
        assert "batch 2" in round_trip(path, capsys)


def test_official_sparse_detr_through_converters_detr(tmp_path, capsys):
    from converters.detr.__main__ import main as detr_main
    from detr_fixtures import write_official_checkpoint

    official = write_official_checkpoint("sparse_detr_rho0.1", tmp_path / "official.pth")
    assert detr_main(["convert", str(official), "-o", str(tmp_path / "sparse.pth")]) == 0
    code, _, err = run_export(capsys, "--checkpoint", tmp_path / "sparse.pth", "-o", tmp_path / "sparse.onnx",
                              "--input-size", "96", "128")  # 256 encoder tokens, 300 two-stage proposals
    assert code == 1 and "does not run on images (1, 3, 96, 128)" in err
    code, out, err = run_export(capsys, "--checkpoint", tmp_path / "sparse.pth", "-o", tmp_path / "sparse.onnx",
                                "--input-size", "160", "192")
    assert code == 0, err
    assert metadata(tmp_path / "sparse.onnx")["legacy_det.family"] == "detr"


# ------------------------------------------------------------------------------------------ failures
def test_a_failed_check_writes_nothing(tiny_dsod_checkpoints, tmp_path, capsys):
    out = tmp_path / "never.onnx"
    code, _, err = run_export(capsys, "--checkpoint", tiny_dsod_checkpoints["teacher"], "-o", out, "--tolerance",
                              "0")
    assert code == 1 and "differs from PyTorch by" in err and "output 'loc'" in err
    assert list(tmp_path.iterdir()) == []  # neither the file nor its partial copy


def test_bad_arguments(tmp_path, capsys, tiny_dsod_checkpoints):
    code, _, err = run_export(capsys, "--checkpoint", tmp_path / "missing.pth", "-o", tmp_path / "x.onnx")
    assert code == 2 and "not found" in err
    code, _, err = run_export(capsys, "--checkpoint", tiny_dsod_checkpoints["teacher"], "-o", tmp_path / "x.onnx",
                              "--outputs", "mbox_loc")
    assert code == 1 and "--outputs applies to a converted Caffe net" in err
    code, _, err = run_export(capsys, "--checkpoint", tiny_dsod_checkpoints["teacher"], "-o", tmp_path / "x.onnx",
                              "--opset", "13")
    assert code == 2 and "--opset 13" in err


# ------------------------------------------------------------------------------------------ int8
def test_int8_quantization(tiny_dsod_checkpoints, mini_shapes_root, tmp_path, capsys):
    """onnxruntime's static int8 model: quantized convolutions, the float model's metadata, outputs near the float
    model's, and both mAPs reported."""
    out = tmp_path / "raw.onnx"
    code, printed, err = run_export(capsys, "--checkpoint", tiny_dsod_checkpoints["teacher"], "-o", out,
                                    "--quantize", "int8", "--dataset", "shapes", "--data-root", mini_shapes_root,
                                    "--calibration-images", "4")
    assert code == 0, err
    int8 = tmp_path / "raw.int8.onnx"
    assert "float VOC07 mAP on the shapes test split" in printed and "int8  VOC07 mAP" in printed
    model = onnx.load(str(int8))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    meta = metadata(int8)
    assert meta["legacy_det.model"] == "dsod_tiny" and json.loads(meta["legacy_det.quantized"])["type"] == "int8"
    from toolkit.data.transforms import PREPROCESS_PRESETS, SSDTestTransform

    image = export_mod.parity_image(None)
    images = SSDTestTransform(160, PREPROCESS_PRESETS["dsod"])(image, export_mod.no_boxes())[0][None].numpy()
    float_out = session(out).run(None, {"images": images})
    int8_out = session(int8).run(None, {"images": images})
    for name, f, q in zip(("loc", "conf"), float_out[:2], int8_out[:2]):
        assert np.abs(q - f).mean() < 0.1 * f.std(), name  # quantization error, not another network
    np.testing.assert_array_equal(float_out[2], int8_out[2])  # the priors are constants


def test_int8_needs_a_dataset(tmp_path, capsys):
    folder = require_fixture("caffe/yufacedetectnet_v1")
    checkpoint = _convert(folder / "yufacedetectnet-open-v1.prototxt", folder / "yufacedetectnet-open-v1.caffemodel",
                          tmp_path / "face.pth")
    code, _, err = run_export(capsys, "--checkpoint", checkpoint, "-o", tmp_path / "f.onnx", "--quantize", "int8")
    assert code == 2 and "give --dataset" in err


# ------------------------------------------------------------------------------------------ every Caffe layer
ZOO = ["activations", "bn_scale", "concat", "conv", "deconv", "dense_block_inplace", "eltwise", "grp_gate",
       "innerproduct", "lrn", "mini_ssd", "normalize", "pool", "priorbox", "shape_ops", "slice_crop", "softmax"]


@pytest.mark.parametrize("net", [f"layer_zoo/{n}" for n in ZOO]
                         + [f"legacy_v1/{n}" for n in ("branch_v1", "ssd_base_v1", "vgg_lrn_v1")])
def test_every_supported_caffe_layer_exports(net, tmp_path, capsys):
    """Each layer-zoo and V1 net (every layer type the interpreter supports), exported on its recorded input
    (--input) at batch 1 and 2: onnxruntime gives real Caffe's recorded outputs."""
    from toolkit.caffe.net import load_caffe_net

    folder = require_fixture(f"caffe/{net}")
    prototxt = next(folder.glob("*.prototxt"))
    weights = next(folder.glob("*.caffemodel"), None)
    checkpoint = tmp_path / "net.pth"
    if weights is not None:
        _convert(prototxt, weights, checkpoint)
    else:
        torch.save(load_caffe_net(prototxt, None).checkpoint(), checkpoint)
    onnx_path = tmp_path / "net.onnx"
    code, _, err = run_export(capsys, "--checkpoint", checkpoint, "-o", onnx_path, "--input", folder / "input.npz",
                              "--dynamic-batch")
    assert code == 0, err
    s = session(onnx_path)
    feeds = dict(np.load(folder / "input.npz"))
    got = s.run(None, {i.name: feeds[i.name].astype(np.float32) for i in s.get_inputs()})
    reference = np.load(folder / "output.npz")
    compared = 0
    for value, array in zip(s.get_outputs(), got):
        if value.name in reference.files:
            expected = reference[value.name]
            np.testing.assert_allclose(array, expected, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(expected).max()),
                                       err_msg=value.name)
            compared += 1
    assert compared == len(got)


def test_gfl_head_is_refused_by_name(mini_shapes_root, tmp_path, capsys, train_tiny):
    checkpoint = train_tiny(mini_shapes_root, tmp_path / "gfl", "gfl_dsod_tiny")
    code, _, err = run_export(capsys, "--checkpoint", checkpoint, "-o", tmp_path / "g.onnx")
    assert code == 1 and "gfl_dsod_tiny: the GFL head has no ONNX export yet" in err
    assert not (tmp_path / "g.onnx").exists()
