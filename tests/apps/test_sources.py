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
        load_source("onnx", "model.onnx")
