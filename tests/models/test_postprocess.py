"""DetectionOutput post-processing against real SSD-Caffe outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import require_fixture
from toolkit.models.box_coder import CodeType, decode_boxes, encode_boxes
from toolkit.models.postprocess import DetectionOutputParams, detection_output, to_caffe_detection_blob
from toolkit.models.priors import split_caffe_priorbox_blob

DESIGNED = ["a_center_size_share", "b_corner_perclass_vit", "c_perclass_nobg_eta", "d_corner_size_nothr",
            "e_empty", "f_vit_bg2", "g_one_image_empty"]


def _run(inputs, params, conf_key="mbox_conf"):
    priors, variances = split_caffe_priorbox_blob(torch.from_numpy(inputs["mbox_priorbox"]))
    results = detection_output(torch.from_numpy(inputs["mbox_loc"]), torch.from_numpy(inputs[conf_key]),
                               priors, variances, params)
    return to_caffe_detection_blob(results).numpy()


def _assert_caffe_rows(got, expected):
    assert got.shape == expected.shape
    # image id, label and score exact (scores are copied from the input), boxes to 1e-6.
    np.testing.assert_array_equal(got[..., :3], expected[..., :3])
    np.testing.assert_allclose(got[..., 3:], expected[..., 3:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", DESIGNED)
def test_designed_detection_output_cases(case):
    folder = require_fixture(f"caffe/layer_zoo/detection_output_{case}")
    cfg = json.loads((folder / "meta.json").read_text())["config"]
    params = DetectionOutputParams(
        num_classes=cfg["C"], share_location=cfg["share"], background_label_id=cfg["bg"],
        nms_threshold=cfg["nms"], top_k=cfg["top_k"], eta=cfg["eta"], keep_top_k=cfg["keep_top_k"],
        confidence_threshold=None if cfg["thr"] < -1e38 else cfg["thr"],
        code_type=CodeType(cfg["code"]), variance_encoded_in_target=cfg["vit"],
    )
    _assert_caffe_rows(_run(np.load(folder / "input.npz"), params),
                       np.load(folder / "output.npz")["detection_out"])


def test_mini_ssd_detection_output():
    folder = require_fixture("caffe/layer_zoo/mini_ssd")
    out = np.load(folder / "output.npz")
    params = DetectionOutputParams(4, True, 0, 0.45, 50, 1.0, 30, 0.2, CodeType.CENTER_SIZE)
    _assert_caffe_rows(_run(out, params, "mbox_conf_flatten"), out["detection_out"])


def test_dsod300_real_detection_output():
    out = np.load(require_fixture("caffe/dsod300/forward_2007_000027.npz"))
    params = DetectionOutputParams(21, True, 0, 0.45, 400, 1.0, 200, 0.01, CodeType.CENTER_SIZE)
    _assert_caffe_rows(_run(out, params, "mbox_conf_flatten"), out["detection_out"])


@pytest.mark.parametrize("code", list(CodeType))
@pytest.mark.parametrize("vit", [False, True])
def test_encode_decode_roundtrip(code, vit):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 0.6
    priors = torch.cat([xy, xy + 0.05 + torch.rand(50, 2, generator=g) * 0.3], 1).double()
    xy = torch.rand(50, 2, generator=g) * 0.6
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(50, 2, generator=g) * 0.3], 1).double()
    var = torch.tensor([0.1, 0.1, 0.2, 0.2], dtype=torch.float64).expand(50, 4)
    loc = encode_boxes(boxes, priors, var, code, vit)
    torch.testing.assert_close(decode_boxes(loc, priors, var, code, vit), boxes)
