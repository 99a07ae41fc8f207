"""The exportable DetectionOutput against the per-class reference, real SSD-Caffe and onnxruntime."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch

from conftest import require_fixture
from toolkit.models.box_coder import CodeType
from toolkit.models.graph_postprocess import (GraphPostprocessError, detection_output_graph, non_max_suppression,
                                              stable_topk)
from toolkit.models.postprocess import DetectionOutputParams, detection_output, to_caffe_detection_blob
from toolkit.models.priors import split_caffe_priorbox_blob

ort = pytest.importorskip("onnxruntime")


def _reference(loc, conf, priors, variances, params):
    return to_caffe_detection_blob(detection_output(loc, conf, priors, variances, params))


def _case(seed: int, n: int = 2, p: int = 60, c: int = 4, share: bool = True, levels: int = 0):
    """Random priors, offsets and probabilities; ``levels > 0`` quantizes the scores (many ties) and repeats
    boxes (IoU 1 between equal-score candidates)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(p, 2, generator=g) * 0.8 + 0.1
    size = torch.rand(p, 2, generator=g) * 0.3 + 0.05
    priors = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    variances = torch.tensor([0.1, 0.1, 0.2, 0.2]).expand(p, 4).clone()
    loc = torch.randn(n, p, 4 if share else c * 4, generator=g) * 0.5
    logits = torch.randn(n, p, c, generator=g) * 2
    conf = torch.softmax(logits, dim=-1)
    if levels:
        conf = torch.round(conf * levels) / levels
        priors[p // 2:] = priors[: p - p // 2]
        loc[:, p // 2:] = loc[:, : p - p // 2]
    return loc.reshape(n, -1), conf.reshape(n, -1), priors, variances


PARAMS = {
    "caffe_ssd": DetectionOutputParams(4, True, 0, 0.45, 20, 1.0, 10, 0.01, CodeType.CENTER_SIZE),
    "no_threshold_no_cuts": DetectionOutputParams(4, True, 0, 0.3, -1, 1.0, -1, None, CodeType.CENTER_SIZE),
    "corner_per_class_bg2": DetectionOutputParams(4, False, 2, 0.5, 15, 1.0, 12, 0.1, CodeType.CORNER),
    "corner_size_vit": DetectionOutputParams(4, True, 0, 0.45, 30, 1.0, 25, 0.05, CodeType.CORNER_SIZE, True),
    "no_background": DetectionOutputParams(4, True, -1, 0.45, 8, 1.0, 5, 0.2, CodeType.CENTER_SIZE),
    "adaptive_eta": DetectionOutputParams(4, True, 0, 0.7, 30, 0.8, 20, 0.01, CodeType.CENTER_SIZE),
    "adaptive_per_class": DetectionOutputParams(4, False, 1, 0.9, -1, 0.9, -1, 0.05, CodeType.CORNER),
}


@pytest.mark.parametrize("levels", [0, 8])
@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_graph_equals_the_reference(name, seed, levels):
    params = PARAMS[name]
    loc, conf, priors, variances = _case(seed, share=params.share_location, levels=levels)
    got = detection_output_graph(loc, conf, priors, variances, params)
    expected = _reference(loc, conf, priors, variances, params)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_graph_nothing_found_and_one_image_empty():
    params = PARAMS["caffe_ssd"]
    loc, conf, priors, variances = _case(3)
    low = torch.full_like(conf, 0.001)
    got = detection_output_graph(loc, low, priors, variances, params)
    torch.testing.assert_close(got, _reference(loc, low, priors, variances, params), rtol=0, atol=0)
    assert got.shape == (1, 1, 2, 7) and got[0, 0, :, 0].tolist() == [0, 1] and (got[0, 0, :, 1:] == -1).all()
    half = conf.clone()
    half[1] = 0.001
    got = detection_output_graph(loc, half, priors, variances, params)
    torch.testing.assert_close(got, _reference(loc, half, priors, variances, params), rtol=0, atol=0)
    assert (got[0, 0, :, 0] == 0).all()


def test_inverted_boxes_neither_suppress_nor_are_suppressed():
    # CORNER code: a large negative offset turns a prior inside out; Caffe's IoU with it is 0.
    params = DetectionOutputParams(2, True, 0, 0.3, -1, 1.0, -1, None, CodeType.CORNER, True)
    priors = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5]])
    loc = torch.tensor([[[0, 0, 0, 0], [0.5, 0, -0.5, 0], [0, 0, 0, 0.01]]], dtype=torch.float32)
    conf = torch.tensor([[[0.1, 0.9], [0.2, 0.8], [0.3, 0.7]]])
    got = detection_output_graph(loc, conf, priors, torch.ones(3, 4), params)
    expected = _reference(loc, conf, priors, torch.ones(3, 4), params)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.shape[2] == 2  # the inverted box kept, its near-duplicate suppressed


def test_refuses_what_has_no_graph_form():
    loc, conf, priors, variances = _case(0)
    with pytest.raises(GraphPostprocessError, match="voting_cluster_diou"):
        detection_output_graph(loc, conf, priors, variances,
                               DetectionOutputParams(4, nms="voting_cluster_diou"))


CAFFE_CASES = ["a_center_size_share", "b_corner_perclass_vit", "c_perclass_nobg_eta", "d_corner_size_nothr",
               "e_empty", "f_vit_bg2", "g_one_image_empty"]


@pytest.mark.parametrize("case", CAFFE_CASES)
def test_graph_equals_real_caffe(case):
    """SSD-Caffe's own DetectionOutput on designed inputs (adaptive NMS, eta < 1, included)."""
    folder = require_fixture(f"caffe/layer_zoo/detection_output_{case}")
    cfg = json.loads((folder / "meta.json").read_text())["config"]
    params = DetectionOutputParams(
        num_classes=cfg["C"], share_location=cfg["share"], background_label_id=cfg["bg"], nms_threshold=cfg["nms"],
        top_k=cfg["top_k"], eta=cfg["eta"], keep_top_k=cfg["keep_top_k"],
        confidence_threshold=None if cfg["thr"] < -1e38 else cfg["thr"], code_type=CodeType(cfg["code"]),
        variance_encoded_in_target=cfg["vit"])
    inputs = np.load(folder / "input.npz")
    priors, variances = split_caffe_priorbox_blob(torch.from_numpy(inputs["mbox_priorbox"]))
    got = detection_output_graph(torch.from_numpy(inputs["mbox_loc"]), torch.from_numpy(inputs["mbox_conf"]),
                                 priors, variances, params).numpy()
    expected = np.load(folder / "output.npz")["detection_out"]
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got[..., :3], expected[..., :3])
    np.testing.assert_allclose(got[..., 3:], expected[..., 3:], rtol=0, atol=1e-6)


class _Head(torch.nn.Module):
    def __init__(self, priors, variances, params):
        super().__init__()
        self.register_buffer("priors", priors)
        self.register_buffer("variances", variances)
        self.params = params

    def forward(self, loc, conf):
        return detection_output_graph(loc, conf, self.priors, self.variances, self.params)


def _onnx_session(module, example):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buffer, dynamo=False, input_names=["loc", "conf"],
                          output_names=["detection_out"], opset_version=17,
                          dynamic_axes={"loc": {0: "batch"}, "conf": {0: "batch"}, "detection_out": {2: "rows"}})
    return ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", ["caffe_ssd", "corner_per_class_bg2", "no_threshold_no_cuts", "adaptive_eta"])
def test_onnxruntime_equals_the_reference(name):
    """One export, run on other batches: random, tied, empty (onnxruntime's own TopK and NonMaxSuppression)."""
    params = PARAMS[name]
    loc, conf, priors, variances = _case(0, share=params.share_location)
    session = _onnx_session(_Head(priors, variances, params).eval(), (loc, conf))
    for seed, n, levels in ((1, 1, 0), (2, 2, 0), (3, 3, 8), (4, 2, 4)):
        loc, conf, _, _ = _case(seed, n=n, share=params.share_location, levels=levels)
        for c in (conf, torch.full_like(conf, 0.001)):
            (got,) = session.run(None, {"loc": loc.numpy(), "conf": c.numpy()})
            expected = _reference(loc, c, priors, variances, params).numpy()
            assert got.shape == expected.shape, (seed, n, levels)
            np.testing.assert_array_equal(got[..., :3], expected[..., :3])
            np.testing.assert_allclose(got[..., 3:], expected[..., 3:], rtol=0, atol=1e-6)


def test_stable_topk_and_nms_follow_onnx():
    x = torch.tensor([[0.5, 0.75, 0.5, 0.75, 0.25]])
    values, index = stable_topk(x, 4)
    assert index.tolist() == [[1, 3, 0, 2]] and values.tolist() == [[0.75, 0.75, 0.5, 0.5]]
    boxes = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 0.5], [2, 2, 3, 3], [0, 0, 1, 0.9]]], dtype=torch.float32)
    scores = torch.tensor([[[4.0, 3.0, 2.0, 1.0]]])
    # IoU 0.5 is not > 0.5: kept (Caffe keeps a box whose overlap is <= the threshold); 0.9 > 0.5: dropped.
    assert non_max_suppression(boxes, scores, 0.5, 0.0)[:, 2].tolist() == [0, 1, 2]
    assert non_max_suppression(boxes, scores, 0.5, 2.0)[:, 2].tolist() == [0, 1]  # strict: 2.0 is out
