"""OptimizedCaffeNet against real SSD-Caffe's blobs and against the plain CaffeNet; fast_detection_output
against toolkit's reference detection_output.  No timings here: bench/bench_caffe_dnn.py measures speed."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compare import assert_blobs_match
from conftest import require_fixture
from converters.caffe import CaffeConversionError, CaffeNet, load_caffe_net
from converters.caffe.__main__ import main
from converters.caffe.optimize import fast_detection_output, mkldnn_conv_available, optimize_for_inference
from toolkit.caffe import caffe_pb2
from toolkit.models.box_coder import CodeType
from toolkit.models.postprocess import DetectionOutputParams, detection_output, to_caffe_detection_blob

# Every variant of the plan: oneDNN (where this torch has it) or F.conv2d, channels_last or NCHW.
VARIANTS = [dict(use_mkldnn=m, channels_last=c) for m in (True, False) for c in (True, False)]
VARIANT_IDS = [f"{'onednn' if v['use_mkldnn'] else 'conv2d'}-{'cl' if v['channels_last'] else 'nchw'}"
               for v in VARIANTS]


def _tensors(npz) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(npz[k]) for k in npz.keys()}


def _assert_close_to_plain(got: dict, plain: dict) -> None:
    """The brief's tolerance between the two forms of the same net: 1e-4 relative + 1e-5 absolute."""
    for key, value in got.items():
        np.testing.assert_allclose(value.numpy(), plain[key].numpy(), rtol=1e-4, atol=1e-5, err_msg=key)


def _zoo(case: str):
    folder = require_fixture(f"caffe/layer_zoo/{case}")
    weights = folder / "weights.caffemodel"
    net = load_caffe_net(folder / "deploy.prototxt", weights if weights.exists() else None)
    return net, _tensors(np.load(folder / "input.npz")), np.load(folder / "output.npz")


# ---------------------------------------------------------------------------
# DSOD300: every stored blob, against Caffe and against the plain interpreter
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dsod300():
    folder = require_fixture("caffe/dsod300")
    net = load_caffe_net(folder / "deploy.prototxt", folder / "random_init.caffemodel")
    ref = np.load(folder / "forward_2007_000027.npz")
    blobs = [k for k in ref.keys() if k != "data"]
    fast = optimize_for_inference(net, blobs)
    inputs = {"data": torch.from_numpy(ref["data"])}
    with torch.no_grad():
        plain = net(inputs, blobs=blobs)
    return net, fast, ref, fast(inputs), plain


def test_dsod300_optimized_equals_caffe_and_the_plain_net(dsod300):
    net, fast, ref, got, plain = dsod300
    assert list(got) == [k for k in ref.keys() if k != "data"]  # First..Sixth, First_norm, mbox_*, detection_out
    assert all(v.is_contiguous() and v.dtype == torch.float32 for v in got.values())
    # Caffe's blobs at the fixtures' tolerances (detection_out: same rows, labels exact, values 1e-5).
    assert_blobs_match(net, got, ref, names=list(got))
    _assert_close_to_plain(got, plain)


def test_dsod300_plan_folds_every_batchnorm_and_relu(dsod300):
    net, fast, *_ = dsod300
    s = fast.summary
    assert s["BatchNorm/Scale merged into one affine"] == 92  # each BatchNorm with its Scale
    # Post-activation BNs (stem, bottlenecks, transitions, heads) go into their convolution; the 43
    # pre-activation ones (BN -> Scale -> ReLU -> Conv on a concat or pooled map) stay affine + ReLU.
    assert s["affines folded into a Convolution"] == 49
    assert s["ReLUs fused into the layer before"] == 80
    assert s["Concats writing into a dense-block buffer"] == 30  # 4 dense blocks: 6 + 8 + 8 + 8 layers
    assert s["shape-only layers cached (PriorBox and its data movement)"] == 7  # 6 PriorBox + mbox_priorbox
    assert s["steps in the plan"] <= s["layers in the net"] / 2


def test_dsod300_detection_out_alone(dsod300):
    net, _, ref, _, _ = dsod300
    fast = optimize_for_inference(net)  # the net's outputs: detection_out
    assert fast.output_names == ("detection_out",)
    got = fast({"data": torch.from_numpy(ref["data"])})
    assert_blobs_match(net, got, ref, names=["detection_out"])


# ---------------------------------------------------------------------------
# Folding on small layer_zoo nets, against real Caffe's outputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_dense_block_folds_conv_bn_scale_relu_and_shares_one_buffer(variant):
    """stem: Conv -> BN -> Scale -> ReLU (in place) folds into one convolution; b0/b1/trans: BN -> Scale ->
    ReLU -> Conv become affine + ReLU; b0_concat and b1_concat fill one buffer."""
    net, inputs, expected = _zoo("dense_block_inplace")
    fast = optimize_for_inference(net, ["b1_concat", "trans_pool"], **variant)
    s = fast.summary
    assert s["affines folded into a Convolution"] == 1
    assert s["BatchNorm/Scale merged into one affine"] == 4
    assert s["ReLUs fused into the layer before"] == 4
    assert s["Concats writing into a dense-block buffer"] == 2
    got = fast(inputs)
    assert list(got) == ["b1_concat", "trans_pool"]
    assert_blobs_match(net, got, expected, names=list(got))


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_dense_block_every_top_when_all_are_asked_for(variant):
    """Asking for a blob that a fold would hide (e.g. ``b0_bn``) keeps it: same tops as Caffe's."""
    net, inputs, expected = _zoo("dense_block_inplace")
    fast = optimize_for_inference(net, list(expected.keys()), **variant)
    assert fast.summary.get("affines folded into a Convolution", 0) == 1  # "stem" is asked for after its ReLU
    assert_blobs_match(net, fast(inputs), expected)


def test_bn_scale_merge_only_where_the_batchnorm_top_is_not_asked_for():
    net, inputs, expected = _zoo("bn_scale")
    fast = optimize_for_inference(net, ["scale_bias", "bn_batchstats"])
    assert fast.summary["BatchNorm/Scale merged into one affine"] == 1  # bn_global + scale_bias
    got = fast(inputs)
    assert_blobs_match(net, got, expected, names=list(got))  # bn_batchstats: batch statistics, not folded
    fast = optimize_for_inference(net, ["bn_global", "scale_bias"])
    assert fast.summary.get("BatchNorm/Scale merged into one affine", 0) == 0
    assert_blobs_match(net, fast(inputs), expected, names=["bn_global", "scale_bias"])


@pytest.mark.parametrize("case", ["mini_ssd", "detection_output_a_center_size_share",
                                  "detection_output_b_corner_perclass_vit", "detection_output_c_perclass_nobg_eta",
                                  "detection_output_e_empty", "detection_output_g_one_image_empty"])
def test_ssd_heads_and_detection_output(case):
    net, inputs, expected = _zoo(case)
    fast = optimize_for_inference(net, ["detection_out"])
    assert_blobs_match(net, fast(inputs), expected, names=["detection_out"])
    every = optimize_for_inference(net, list(expected.keys()))
    assert_blobs_match(net, every(inputs), expected)


def test_in_place_layers_keep_the_value_each_reader_saw():
    """A conv top read before an in-place BatchNorm overwrites it is not folded: the reader sees the conv."""
    text = """
        input: "x" input_shape { dim: 2 dim: 3 dim: 7 dim: 6 }
        layer { name: "conv" type: "Convolution" bottom: "x" top: "c"
                convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" }
                                    bias_filler { type: "gaussian" std: 0.5 } } }
        layer { name: "early" type: "Pooling" bottom: "c" top: "early"
                pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
        layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" }
        layer { name: "sc" type: "Scale" bottom: "c" top: "c" scale_param { bias_term: true
                filler { type: "uniform" min: -2 max: 2 } bias_filler { type: "gaussian" std: 1 } } }
        layer { name: "relu" type: "ReLU" bottom: "c" top: "c" }
        layer { name: "drop" type: "Dropout" bottom: "c" top: "c" }
        layer { name: "split" type: "Split" bottom: "c" top: "c1" top: "c2" }
        layer { name: "sum" type: "Eltwise" bottom: "c1" bottom: "c2" top: "sum" }
    """
    torch.manual_seed(0)
    net = CaffeNet(text_format.Parse(text, caffe_pb2.NetParameter()))
    bn = net.layer("bn")
    with torch.no_grad():
        bn.mean_sum.normal_()
        bn.var_sum.uniform_(0.5, 2)
        bn.scale_factor.fill_(0.5)
    x = {"x": torch.randn(2, 3, 7, 6)}
    fast = optimize_for_inference(net, ["early", "sum"])
    assert fast.summary.get("affines folded into a Convolution", 0) == 0  # "c" has two readers
    assert fast.summary["identity layers dropped (Split, Dropout)"] == 2
    with torch.no_grad():
        _assert_close_to_plain(fast(x), net(x, blobs=["early", "sum"]))


def test_copies_other_input_sizes_and_errors():
    net, inputs, expected = _zoo("dense_block_inplace")
    fast = optimize_for_inference(net, ["trans_pool"])
    twin = copy.deepcopy(fast)  # oneDNN's packed weights are a cache: not copied, rebuilt
    torch.testing.assert_close(twin(inputs)["trans_pool"], fast(inputs)["trans_pool"], rtol=0, atol=0)
    other = {"data": torch.randn(1, 8, 12, 7)}  # another batch and size than the prototxt's
    with torch.no_grad():
        _assert_close_to_plain(fast(other), net(other, blobs=["trans_pool"]))
    with pytest.raises(CaffeConversionError, match=r"missing \['data'\]"):
        fast({})
    with pytest.raises(CaffeConversionError, match="no blob"):
        optimize_for_inference(net, ["nope"])
    train = load_caffe_net(require_fixture("caffe/layer_zoo/dense_block_inplace") / "deploy.prototxt",
                           phase="TRAIN")
    with pytest.raises(CaffeConversionError, match="TEST-phase"):
        optimize_for_inference(train)


def test_onednn_is_used_where_available():
    net, inputs, _ = _zoo("dense_block_inplace")
    fast = optimize_for_inference(net, ["trans_pool"])
    fast(inputs)
    convs = [s for s in fast.steps if type(s).__name__ == "_ConvStep"]
    assert convs and all(c.use_mkldnn == mkldnn_conv_available() for c in convs)


# ---------------------------------------------------------------------------
# fast_detection_output == toolkit's detection_output, row for row
# ---------------------------------------------------------------------------


def _reference_blob(loc, conf, priorbox, params):
    priors, variances = priorbox[0, 0].reshape(-1, 4), priorbox[0, 1].reshape(-1, 4)
    return to_caffe_detection_blob(detection_output(loc, conf, priors, variances, params))


def test_fast_detection_output_on_dsod300_caffe_inputs(dsod300):
    net, _, ref, _, _ = dsod300
    loc, conf, priorbox = (torch.from_numpy(ref[k]) for k in ("mbox_loc", "mbox_conf_flatten", "mbox_priorbox"))
    params = net.layer("detection_out").params
    got = fast_detection_output(loc, conf, priorbox, params)
    assert torch.equal(got, _reference_blob(loc, conf, priorbox, params))
    assert got.shape == ref["detection_out"].shape


@pytest.mark.parametrize("threshold,top_k,keep_top_k", [(0.1, 30, 50), (None, -1, -1), (0.0, 5, -1), (0.3, -1, 7)])
def test_fast_detection_output_ties_and_cuts(threshold, top_k, keep_top_k):
    """Scores on a coarse grid (many exact ties, zeros and -0.0): the stable order of Caffe must hold."""
    g = torch.Generator().manual_seed(1)
    n, p, c = 2, 300, 5
    centres = torch.rand(p, 2, generator=g)
    sizes = torch.rand(p, 2, generator=g) * 0.3 + 0.05
    priors = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)
    priorbox = torch.stack([priors.reshape(-1), torch.tensor([0.1, 0.1, 0.2, 0.2]).repeat(p)])[None]
    loc = torch.randn(n, p * 4, generator=g) * 0.5
    conf = torch.round(torch.rand(n, p, c, generator=g) * 8) / 8
    conf[0, :10] = -0.0
    conf = conf.reshape(n, -1)
    params = DetectionOutputParams(num_classes=c, background_label_id=0, nms_threshold=0.45, top_k=top_k,
                                   keep_top_k=keep_top_k, confidence_threshold=threshold,
                                   code_type=CodeType.CENTER_SIZE)
    got = fast_detection_output(loc, conf, priorbox, params)
    assert got.shape[2] > 1
    assert torch.equal(got, _reference_blob(loc, conf, priorbox, params))


# ---------------------------------------------------------------------------
# python -m converters.caffe run --fast
# ---------------------------------------------------------------------------


def test_cli_run_fast(tmp_path, capsys):
    folder = require_fixture("caffe/layer_zoo/dense_block_inplace")
    net_args = [folder / "deploy.prototxt", folder / "weights.caffemodel", "--input", folder / "input.npz"]
    code = main([str(a) for a in ["run", *net_args, "--out", tmp_path / "o.npz", "--blobs", "trans_pool", "--fast"]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "optimized: 19 layers -> 10 steps" in out
    got = np.load(tmp_path / "o.npz")
    assert list(got.keys()) == ["trans_pool"]
    np.testing.assert_allclose(got["trans_pool"], np.load(folder / "output.npz")["trans_pool"], rtol=1e-5, atol=1e-5)
    code = main([str(a) for a in ["run", *net_args, "--out", tmp_path / "o.npz", "--fast", "--backward"]])
    assert code == 2 and "--fast runs a TEST-phase net forward only" in capsys.readouterr().err
