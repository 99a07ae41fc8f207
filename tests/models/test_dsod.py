"""DSOD300 against the real Caffe DSOD300: one-to-one blob correspondence, and the
forward pass with the caffemodel's weights equal to real Caffe's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import require_fixture
from toolkit.models.build import build_model
from toolkit.models.caffe_import import CaffeWeightsError, load_caffe_blobs
from toolkit.models.postprocess import DetectionOutputParams, detection_output, to_caffe_detection_blob
from toolkit.models.box_coder import CodeType
from toolkit.models.priors import caffe_priorbox_blob


@pytest.fixture(scope="module")
def caffe_dsod():
    from toolkit.caffe import layer_blobs, read_caffemodel

    folder = require_fixture("caffe/dsod300")
    blobs = layer_blobs(read_caffemodel(folder / "random_init.caffemodel"))
    return folder, {k: v for k, v in blobs.items() if v}


def test_learnable_tensors_correspond_one_to_one(caffe_dsod):
    folder, blobs = caffe_dsod
    model = build_model("dsod300", 21)
    modules = dict(model.named_modules())
    used = [n for names in model.caffe_names.values() for n in names]
    assert sorted(used) == sorted(blobs), "every Caffe layer with blobs is mapped exactly once"
    for path, names in model.caffe_names.items():
        m = modules[path]
        if len(names) == 2:  # BatchNorm + Scale
            bn, scale = blobs[names[0]], blobs[names[1]]
            assert [b.shape for b in bn[:2]] == [tuple(m.running_mean.shape), tuple(m.running_var.shape)], path
            assert bn[2].size == 1  # the moving-average factor, folded into the running statistics
            assert [b.shape for b in scale] == [tuple(m.weight.shape), tuple(m.bias.shape)], path
        else:
            assert [b.shape for b in blobs[names[0]]] == [tuple(m.weight.shape)], path
    ours = sum(p.numel() for p in model.parameters())
    ours += sum(b.numel() for k, b in model.named_buffers() if not k.endswith("num_batches_tracked"))
    n_bn = sum(1 for names in model.caffe_names.values() if len(names) == 2)
    assert ours + n_bn == json.loads((folder / "blob_shapes.json").read_text())["n_params"]


def test_forward_equals_real_caffe(caffe_dsod):
    folder, blobs = caffe_dsod
    model = build_model("dsod300", 21).eval()
    mapping = load_caffe_blobs(model, model.caffe_names, blobs)
    assert mapping["Convolution1/0"] == "backbone.stem.0.conv.weight"
    ref = np.load(folder / "forward_2007_000027.npz")
    x = torch.from_numpy(ref["data"])
    with torch.no_grad():
        sources = model.backbone(x)
        out = model(x)
    got = dict(zip(["First", "Second", "Third", "Fourth", "Fifth", "Sixth"], sources))
    got["mbox_loc"] = out["loc"].reshape(1, -1)
    got["mbox_conf"] = out["conf"].reshape(1, -1)
    for name, tensor in got.items():
        np.testing.assert_allclose(tensor.numpy(), ref[name], rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(caffe_priorbox_blob(out["priors"], out["variances"]).numpy(), ref["mbox_priorbox"],
                               rtol=0, atol=1e-6)
    params = DetectionOutputParams(21, True, 0, 0.45, 400, 1.0, 200, 0.01, CodeType.CENTER_SIZE)
    probs = torch.softmax(out["conf"], dim=-1)
    blob = to_caffe_detection_blob(detection_output(out["loc"], probs, out["priors"], out["variances"], params))
    expected = ref["detection_out"]
    assert blob.shape == expected.shape
    np.testing.assert_array_equal(blob[0, 0, :, :2].numpy(), expected[0, 0, :, :2])
    np.testing.assert_allclose(blob[0, 0, :, 2:].numpy(), expected[0, 0, :, 2:], rtol=1e-4, atol=1e-5)


def test_loading_errors_name_the_layers(caffe_dsod):
    _, blobs = caffe_dsod
    model = build_model("dsod300", 21)
    broken = dict(blobs)
    del broken["Convolution5"]
    broken["Extra_layer"] = [np.zeros(3, np.float32)]
    with pytest.raises(CaffeWeightsError, match=r"Convolution5.*Extra_layer"):
        load_caffe_blobs(model, model.caffe_names, broken)
    wrong = dict(blobs)
    wrong["Convolution7"] = [np.zeros((48, 100, 3, 3), np.float32)]
    with pytest.raises(CaffeWeightsError, match=r"Convolution7/0: Caffe shape \(48, 100, 3, 3\)"):
        load_caffe_blobs(model, model.caffe_names, wrong)


def test_small_preset_shapes():
    model = build_model("dsod_tiny", 7).eval()
    with torch.no_grad():
        sources = model.backbone(torch.zeros(2, 3, 160, 160))
        out = model(torch.zeros(2, 3, 160, 160))
    sizes = [(40, 40), (20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]  # Fine (stride 4), First, ...
    assert [tuple(s.shape[-2:]) for s in sources] == sizes
    assert [s.shape[1] for s in sources] == list(model.backbone.out_channels)
    p = out["priors"].shape[0]
    assert out["loc"].shape == (2, p, 4) and out["conf"].shape == (2, p, 7)
    assert p == sum(h * w * n for (h, w), n in zip(sizes, model.prior_generator.num_priors_per_cell()))
    # The fine source is an addition: its layers come after DSOD's in the rename table.
    backbone = [k for k in model.caffe_names if k.startswith("backbone.")]
    assert backbone[-2:] == ["backbone.fine_reduce.bn", "backbone.fine_reduce.conv"]
    assert model.caffe_names["head.loc.0.conv"] == ("Fine_norm_mbox_loc",)
