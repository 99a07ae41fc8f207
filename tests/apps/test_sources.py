"""apps.sources: each model source the demo takes, held to what the reference software computed (real SSD-Caffe's
blobs for a Caffe DSOD300, the official code's float64 outputs for a Deformable DETR checkpoint)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apps.sources import load_source
from conftest import require_fixture
from detr_fixtures import write_official_checkpoint
from toolkit.data.voc import VOC_CLASSES


def test_a_caffe_net_converted_on_loading_computes_what_caffe_computed():
    root = require_fixture("caffe/dsod300")
    loaded = load_source("caffe", f"{root / 'deploy.prototxt'},{root / 'random_init.caffemodel'}")
    assert loaded.model_name == "dsod300" and loaded.classes == ("background", *VOC_CLASSES)
    assert loaded.thumbnail is None and "deploy.prototxt" in loaded.source
    ref = np.load(root / "forward_2007_000027.npz")
    with torch.no_grad():
        out = loaded.model(torch.from_numpy(ref["data"]))
    n = out["conf"].shape[0]
    np.testing.assert_allclose(out["loc"].reshape(n, -1).numpy(), ref["mbox_loc"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["conf"].reshape(n, -1).numpy(), ref["mbox_conf"], rtol=1e-4, atol=1e-5)


def test_an_official_detr_checkpoint_reproduces_the_official_outputs(tmp_path):
    root = require_fixture("detr/deformable_detr")
    loaded = load_source("detr", str(write_official_checkpoint("deformable_detr", tmp_path / "official.pth")))
    assert loaded.model_name == "deformable_detr" and loaded.is_detr
    assert len(loaded.classes) == loaded.model.class_embed[0].out_features + 1
    inputs, reference = np.load(root / "input.npz"), np.load(root / "output.npz")
    with torch.no_grad():
        out = loaded.model.double()(torch.from_numpy(inputs["images"]).double(), torch.from_numpy(inputs["mask"]))
    for key in ("pred_logits", "pred_boxes"):
        ref = reference[key]
        assert np.abs(out[key].numpy() - ref).max() <= 1e-8 * np.abs(ref).max(), key


def test_source_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="NET.prototxt,WEIGHTS.caffemodel"):
        load_source("caffe", "only_a_prototxt.prototxt")
    with pytest.raises(Exception, match="missing.prototxt"):
        load_source("caffe", f"{tmp_path / 'missing.prototxt'},{tmp_path / 'w.caffemodel'}")
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_source("checkpoint", str(tmp_path / "nothing.pth"))
    with pytest.raises(Exception, match="nothing.pth"):
        load_source("detr", str(tmp_path / "nothing.pth"))
    with pytest.raises(ValueError, match="unknown model source"):
        load_source("tflite", "model.tflite")
    with pytest.raises(FileNotFoundError, match="nothing.onnx"):
        load_source("onnx", str(tmp_path / "nothing.onnx"))
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(ValueError, match="text.onnx: onnxruntime cannot load it"):
        load_source("onnx", str(tmp_path / "text.onnx"))
    import onnx

    # An ONNX file python -m toolkit.export did not write: nothing says its preprocessing.
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "foreign.onnx"))
    with pytest.raises(ValueError, match="without legacy_det metadata"):
        load_source("onnx", str(tmp_path / "foreign.onnx"))


def test_a_caffe_net_of_no_preset_runs_as_it_is_and_finds_what_caffe_found(tmp_path):
    """The real-weights face detector (no native preset): full size only, its preprocessing and class names from
    the train prototxt, its detections those real Caffe computed."""
    from apps.compare import compare_scales, scales_for
    from toolkit.data.voc import read_image_bgr

    folder = require_fixture("caffe/yufacedetectnet_v1")
    labelmap = tmp_path / "labelmap_face.prototxt"
    labelmap.write_text('item { name: "none_of_the_above" label: 0 display_name: "background" }\n'
                        'item { name: "face" label: 1 display_name: "face" }\n')
    files = ("yufacedetectnet-open-v1.prototxt", "yufacedetectnet-open-v1.caffemodel",
             "yufacedetectnet-open-v1.train.prototxt")
    spec = ",".join(str(folder / f) for f in files)
    loaded = load_source("caffe", spec, str(labelmap))
    assert loaded.fixed_input and loaded.classes == ("background", "face") and scales_for(loaded) == [(1, None)]
    run, = compare_scales(loaded, read_image_bgr(folder / "keliamoniz1.jpg"), rounds=1).runs
    assert run.label == "full" and run.input_hw == (240, 320) and run.gflops > 0
    caffe = np.load(folder / "forward_keliamoniz1_320x240.npz")["detection_out"][0, 0]
    caffe = caffe[caffe[:, 2] >= 0.05]
    keep = run.scores >= 0.05
    assert keep.sum() == len(caffe) > 0
    np.testing.assert_allclose(run.scores[keep], caffe[:, 2], atol=1e-4)
    np.testing.assert_allclose(run.boxes[keep], np.clip(caffe[:, 3:7], 0, 1) * [640, 480, 640, 480], atol=0.5)
    assert (run.labels[keep] == caffe[:, 1]).all()
    with pytest.raises(ValueError, match="its own input size only"):
        compare_scales(loaded, read_image_bgr(folder / "keliamoniz1.jpg"), rounds=1, scales=[(2, "bicubic")])
    # The same net converted by python -m converters.caffe convert, given as a checkpoint: the same detections.
    from converters.caffe.__main__ import main as caffe_main

    ckpt = tmp_path / "face.pth"
    assert caffe_main(["convert", str(folder / files[0]), str(folder / files[1]), "-o", str(ckpt),
                       "--train-prototxt", str(folder / files[2]), "--labelmap", str(labelmap)]) == 0
    again = load_source("checkpoint", str(ckpt))
    assert again.fixed_input and again.classes == ("background", "face")
    rerun, = compare_scales(again, read_image_bgr(folder / "keliamoniz1.jpg"), rounds=1).runs
    np.testing.assert_array_equal(rerun.scores, run.scores)
    np.testing.assert_array_equal(rerun.boxes, run.boxes)


def test_a_zip_that_is_no_checkpoint_gets_the_loaders_message(tmp_path):
    import zipfile

    path = tmp_path / "archive.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")
    with pytest.raises(ValueError, match="archive.pth: not a readable PyTorch checkpoint"):
        load_source("checkpoint", str(path))
