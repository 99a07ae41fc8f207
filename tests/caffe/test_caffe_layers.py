"""Caffe layer modules against real SSD-Caffe (layer_zoo, multibox_loss), a naive pooling loop and gradcheck."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compare import assert_blobs_match, error_ratio
from conftest import fixtures_root, require_fixture
from toolkit.caffe import caffe_pb2, read_prototxt
from toolkit.caffe.errors import CaffeConversionError
from toolkit.caffe.layers import BatchNorm, Filler, build_layer, caffe_pool2d, fill_
from toolkit.caffe.net import load_caffe_net

LAYER_ZOO = [
    "activations", "bn_scale", "concat", "conv", "deconv", "dense_block_inplace",
    "detection_output_a_center_size_share", "detection_output_b_corner_perclass_vit",
    "detection_output_c_perclass_nobg_eta", "detection_output_d_corner_size_nothr", "detection_output_e_empty",
    "detection_output_f_vit_bg2", "detection_output_g_one_image_empty", "eltwise", "grp_gate", "innerproduct",
    "lrn", "mini_ssd", "normalize", "pool", "priorbox", "shape_ops", "slice_crop", "softmax",
]
MULTIBOX = ["dsod", "empty", "v1_nodifficult_bipartite", "v2_nomining_l2_corner_crossboundary",
            "v3_predmatch_varintarget"]


def _tensors(npz) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(npz[k]) for k in npz.keys()}


def test_every_layer_zoo_fixture_is_listed():
    root = fixtures_root() / "caffe" / "layer_zoo"
    if not root.exists():
        require_fixture("caffe/layer_zoo")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(LAYER_ZOO)


@pytest.mark.parametrize("case", LAYER_ZOO)
def test_layer_zoo_every_top(case):
    """Every top of output.npz from input.npz (+ weights.caffemodel), at the MANIFEST's tolerances."""
    folder = require_fixture(f"caffe/layer_zoo/{case}")
    weights = folder / "weights.caffemodel"
    net = load_caffe_net(folder / "deploy.prototxt", weights if weights.exists() else None)
    expected = np.load(folder / "output.npz")
    with torch.no_grad():
        got = net(_tensors(np.load(folder / "input.npz")))
    assert set(expected.keys()) <= set(got)
    assert_blobs_match(net, got, expected)
    if weights.exists():  # every stored blob landed where Caffe has it, in Caffe's modern shape
        stored = np.load(folder / "weights.npz")
        for key in stored.keys():
            layer, index = key.rsplit("/", 1)
            np.testing.assert_array_equal(net.layer(layer).blobs()[int(index)].detach().numpy(), stored[key],
                                          err_msg=key)


def test_mini_ssd_detection_output_exact_from_stored_inputs():
    """DetectionOutput fed Caffe's own mbox_loc / mbox_conf_flatten / mbox_priorbox: rows as Caffe's."""
    folder = require_fixture("caffe/layer_zoo/mini_ssd")
    net = load_caffe_net(folder / "deploy.prototxt", folder / "weights.caffemodel")
    out = np.load(folder / "output.npz")
    rows = net.layer("detection_out")(*(torch.from_numpy(out[k]) for k in
                                        ("mbox_loc", "mbox_conf_flatten", "mbox_priorbox")))
    assert error_ratio(rows.numpy(), out["detection_out"], "detections-exact") <= 1


@pytest.mark.parametrize("case", MULTIBOX)
def test_multibox_loss_value_and_input_gradients(case):
    """TRAIN-phase net: Input -> identity Scale (filler 1) -> MultiBoxLoss; gradients by autograd on the inputs."""
    folder = require_fixture(f"caffe/multibox_loss/{case}")
    net = load_caffe_net(folder / "train.prototxt", phase="TRAIN")
    assert net.loss_weights == {"mbox_loss": 1.0} and net.training
    data = np.load(folder / "input.npz")
    expected = np.load(folder / "output.npz")
    inputs = {"mbox_loc_input": torch.from_numpy(data["mbox_loc"]).requires_grad_(),
              "mbox_conf_input": torch.from_numpy(data["mbox_conf"]).requires_grad_(),
              "mbox_priorbox": torch.from_numpy(data["mbox_priorbox"]), "label": torch.from_numpy(data["label"])}
    loss = net(inputs, blobs=["mbox_loss"])["mbox_loss"]
    assert loss.shape == expected["mbox_loss"].shape == ()
    loss.backward()
    assert loss.item() == pytest.approx(float(expected["mbox_loss"]), rel=1e-5, abs=1e-7)
    for blob, key in (("mbox_loc_input", "mbox_loc_diff"), ("mbox_conf_input", "mbox_conf_diff")):
        grad, ref = inputs[blob].grad.numpy(), expected[key]
        np.testing.assert_array_equal(grad != 0, ref != 0, err_msg=f"{key}: matched / mined rows")
        np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-6, err_msg=key)
    meta = json.loads((folder / "meta.json").read_text())
    assert net.layer("mbox_loss").params.normalization.value == meta["normalization"]


def test_dsod300_multibox_loss_layer_from_the_real_train_prototxt():
    """The mbox_loss layer of DSOD's generated train.prototxt on real DSOD300 predictions and label blob."""
    net_def = read_prototxt(require_fixture("caffe/prototxt/dsod300_voc0712/train.prototxt"))
    layer = next(layer for layer in net_def.layer if layer.type == "MultiBoxLoss")
    data = np.load(require_fixture("caffe/dsod300/multibox_loss_2007_000027.npz"))
    bottoms = [torch.from_numpy(data[k]) for k in ("mbox_loc", "mbox_conf", "mbox_priorbox", "label")]
    module = build_layer(layer, [tuple(b.shape) for b in bottoms], "TRAIN")
    assert module.propagate_down == (True, True)
    bottoms[0].requires_grad_()
    bottoms[1].requires_grad_()
    loss = module(*bottoms)
    loss.backward()
    assert loss.item() == pytest.approx(float(data["mbox_loss"]), rel=1e-5)
    for tensor, key in ((bottoms[0], "mbox_loc_diff"), (bottoms[1], "mbox_conf_diff")):
        np.testing.assert_array_equal(tensor.grad.numpy() != 0, data[key] != 0, err_msg=key)
        np.testing.assert_allclose(tensor.grad.numpy(), data[key], rtol=1e-4, atol=1e-6, err_msg=key)


# ---------------------------------------------------------------------------
# Pooling against a naive loop over Caffe's rules
# ---------------------------------------------------------------------------


def _naive_caffe_pool(x: np.ndarray, method: str, kernel, stride, pad) -> np.ndarray:
    """pooling_layer.cpp, one window at a time (float64)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad

    def size(length, k, s, p):
        out = int(math.ceil((length + 2 * p - k) / s)) + 1
        if (ph or pw) and (out - 1) * s >= length + p:
            out -= 1
        return out

    oh, ow = size(h, kh, sh, ph), size(w, kw, sw, pw)
    y = np.empty((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * sh - ph, j * sw - pw
            he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
            pool_size = (he - hs) * (we - ws)
            window = x[:, :, max(hs, 0):min(he, h), max(ws, 0):min(we, w)]
            if method == "MAX":
                flat = window.reshape(n, c, -1)
                y[:, :, i, j] = np.maximum(flat.max(axis=2), -np.finfo(np.float32).max) if flat.shape[2] \
                    else -np.finfo(np.float32).max
            else:
                with np.errstate(invalid="ignore", divide="ignore"):
                    y[:, :, i, j] = window.sum(axis=(2, 3)) / pool_size
    return y


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("kernel,stride,pad", [
    ((3, 3), (2, 2), (1, 1)), ((2, 2), (2, 2), (0, 0)), ((3, 3), (3, 3), (1, 1)), ((5, 5), (2, 2), (2, 2)),
    ((3, 2), (1, 2), (1, 0)),  # pad on one axis only: Caffe's clip rule then applies to both axes
    ((2, 3), (2, 1), (0, 1)), ((1, 1), (3, 2), (0, 0)),
    ((1, 1), (4, 4), (0, 0)),  # stride > kernel, no pad: the last row of windows lies past the image
    ((3, 3), (2, 2), (2, 1)),
])
def test_pooling_equals_a_naive_loop(method, kernel, stride, pad):
    rng = np.random.default_rng(sum(kernel) * 7 + sum(stride) * 3 + sum(pad))
    x = rng.standard_normal((2, 3, 7, 9)) - 1.0  # mostly negative: padding read as 0 would show in MAX
    got = caffe_pool2d(torch.from_numpy(x), method, kernel, stride, pad).numpy()
    np.testing.assert_allclose(got, _naive_caffe_pool(x, method, kernel, stride, pad), rtol=1e-12, atol=1e-12,
                               equal_nan=True)


# ---------------------------------------------------------------------------
# Gradients (float64 gradcheck w.r.t. the bottoms) and layer details
# ---------------------------------------------------------------------------


def _layer(text: str, n_bottoms: int, n_tops: int = 1) -> caffe_pb2.LayerParameter:
    layer = text_format.Parse(f'name: "l" {text}', caffe_pb2.LayerParameter())
    layer.bottom.extend(f"b{i}" for i in range(n_bottoms))
    layer.top.extend(f"t{i}" for i in range(n_tops))
    return layer


GRADCHECK = {
    "conv": ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 2 group: 2 '
             'dilation: 1 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }', [(1, 2, 5, 4)]),
    "deconv": ('type: "Deconvolution" convolution_param { num_output: 2 kernel_size: 3 stride: 2 pad: 1 '
               'weight_filler { type: "xavier" } }', [(1, 3, 3, 2)]),
    "ip_transpose": ('type: "InnerProduct" inner_product_param { num_output: 3 transpose: true '
                     'weight_filler { type: "msra" } bias_filler { type: "uniform" } }', [(2, 2, 2, 3)]),
    "pool_ave_clip": ('type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }', [(1, 2, 5, 6)]),
    "pool_max_ceil": ('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 }', [(1, 2, 5, 5)]),
    "lrn_across": ('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 }', [(1, 4, 3, 3)]),
    "lrn_within": ('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 norm_region: WITHIN_CHANNEL }', [(1, 2, 4, 3)]),
    "normalize": ('type: "Normalize" norm_param { across_spatial: false channel_shared: false '
                  'scale_filler { type: "uniform" min: 1 max: 3 } }', [(1, 3, 2, 3)]),
    "normalize_across": ('type: "Normalize" norm_param { eps: 0.01 }', [(2, 3, 2, 2)]),
    "bn_batch_stats": ('type: "BatchNorm" batch_norm_param { use_global_stats: false }', [(2, 3, 2, 2)]),
    "scale_two_bottoms": ('type: "Scale" scale_param { axis: 0 bias_term: true }', [(2, 3, 2, 2), (2, 3)]),
    "bias_axis2": ('type: "Bias" bias_param { axis: 2 num_axes: 2 filler { type: "gaussian" } }', [(2, 3, 2, 2)]),
    "prelu": ('type: "PReLU" prelu_param { filler { type: "uniform" min: -0.5 max: 0.5 } }', [(2, 3, 2, 2)]),
    "eltwise_prod": ('type: "Eltwise" eltwise_param { operation: PROD }', [(2, 3, 2, 2)] * 3),
    "eltwise_sum": ('type: "Eltwise" eltwise_param { coeff: 0.5 coeff: -2 }', [(2, 3, 2, 2)] * 2),
    "power": ('type: "Power" power_param { power: 2 scale: 0.5 shift: 3 }', [(2, 3, 2, 2)]),
    "softmax": ('type: "Softmax" softmax_param { axis: 2 }', [(2, 3, 4)]),
    "crop": ('type: "Crop" crop_param { axis: 1 offset: 1 }', [(2, 4, 4, 4), (1, 2, 2, 3)]),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK))
def test_gradients_reach_the_bottoms(name):
    text, shapes = GRADCHECK[name]
    torch.manual_seed(0)
    module = build_layer(_layer(text, len(shapes)), shapes).double()
    bottoms = [(torch.randn(s, dtype=torch.float64) * 2).requires_grad_(name != "crop" or i == 0)
               for i, s in enumerate(shapes)]
    if name == "power":
        bottoms = [b.detach().abs().requires_grad_() for b in bottoms]
    assert torch.autograd.gradcheck(lambda *xs: module(*xs), tuple(bottoms))
    out = module(*bottoms)
    out.square().sum().backward()
    for pname, param in module.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), pname


def test_batchnorm_training_mode_updates_the_caffe_sums():
    """batch_norm_layer.cpp: f = f*maf + 1; mean_sum = mean + maf*mean_sum; var_sum = m/(m-1)*var + maf*var_sum."""
    bn = BatchNorm(3, use_global_stats=False, eps=1e-5, moving_average_fraction=0.9)
    with torch.no_grad():
        bn.mean_sum.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.var_sum.copy_(torch.tensor([4.0, 5.0, 6.0]))
        bn.scale_factor.fill_(2.0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    y = bn.double().train()(x)
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(y, (x - mean.view(1, 3, 1, 1)) / torch.sqrt(var + 1e-5).view(1, 3, 1, 1))
    torch.testing.assert_close(bn.scale_factor, torch.tensor([2.8], dtype=torch.float64))
    torch.testing.assert_close(bn.mean_sum, mean + 0.9 * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(bn.var_sum, 32 / 31 * var + 0.9 * torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64))
    bn.eval()(x)  # evaluation mode leaves the sums alone
    torch.testing.assert_close(bn.scale_factor, torch.tensor([2.8], dtype=torch.float64))


def test_default_fillers_are_caffes():
    """Without a caffemodel, blobs start as Caffe's layers initialise them."""
    shapes = [(1, 3, 2, 2)]
    assert build_layer(_layer('type: "Scale"', 1), shapes).weight.detach().eq(1).all()
    assert build_layer(_layer('type: "PReLU"', 1), shapes).weight.detach().eq(0.25).all()
    assert build_layer(_layer('type: "Normalize"', 1), shapes).weight.detach().eq(1).all()
    bn = build_layer(_layer('type: "BatchNorm"', 1), shapes)
    assert all(b.eq(0).all() for b in bn.blobs()) and bn.use_global_stats
    assert not build_layer(_layer('type: "BatchNorm"', 1), shapes, "TRAIN").use_global_stats
    # bilinear (FCN upsampling): k = 4 -> f = 2, c = 0.75, ramp [0.25, 0.75, 0.75, 0.25]
    kernel = fill_(torch.empty(2, 1, 4, 4), Filler("bilinear"))
    ramp = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(kernel[1, 0], torch.outer(ramp, ramp))
    xavier = fill_(torch.empty(64, 32, 3, 3), Filler("xavier"))
    assert xavier.abs().max() <= math.sqrt(3 / (32 * 9)) and xavier.std() > 0.5 * math.sqrt(1 / (32 * 9))


@pytest.mark.parametrize("text,shapes,message", [
    ('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 }', [(1, 1, 4, 4)], "STOCHASTIC"),
    ('type: "Pooling" pooling_param { pool: MAX }', [(1, 1, 4, 4)], "kernel_size"),
    ('type: "Convolution" convolution_param { num_output: 3 kernel_size: 3 group: 2 }', [(1, 3, 4, 4)], "group 2"),
    ('type: "Convolution" convolution_param { num_output: 3 kernel_size: 3 kernel_size: 3 kernel_size: 3 }',
     [(1, 3, 4, 4)], "2-d"),
    ('type: "Eltwise" eltwise_param { operation: MAX coeff: 1 coeff: 2 }', [(1, 2), (1, 2)], "SUM only"),
    ('type: "Concat" concat_param { axis: 1 }', [(1, 2, 3), (1, 2, 4)], "does not fit"),
    ('type: "Reshape" reshape_param { shape { dim: -1 dim: -1 } }', [(2, 3)], "one dim"),
    ('type: "PriorBox" prior_box_param { min_size: 30 max_size: 20 }', [(1, 1, 2, 2), (1, 3, 8, 8)], "max_size"),
    ('type: "DetectionOutput" detection_output_param { share_location: true }', [(1, 8), (1, 4), (1, 2, 8)],
     "num_classes"),
    ('type: "MultiBoxLoss" multibox_loss_param { num_classes: 3 conf_loss_type: LOGISTIC }',
     [(1, 8), (1, 6), (1, 2, 8), (1, 1, 1, 8)], "LOGISTIC"),
    ('type: "LRN" lrn_param { local_size: 4 }', [(1, 4, 3, 3)], "odd"),
])
def test_parameters_caffe_refuses_name_the_layer(text, shapes, message):
    with pytest.raises(CaffeConversionError, match=rf"layer 'l' .*{message}"):
        build_layer(_layer(text, len(shapes)), shapes)
