"""CaffeNet against real SSD-Caffe on whole nets (legacy V1, DSOD300, yufacedetectnet), and its error paths."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compare import assert_blobs_match, error_ratio
from conftest import require_fixture
from toolkit.caffe import caffe_pb2, read_caffemodel, read_prototxt
from toolkit.caffe.errors import CaffeConversionError
from toolkit.caffe.net import CaffeNet, layer_included, load_caffe_net

LEGACY = ["branch_v1", "ssd_base_v1", "vgg_lrn_v1"]
# (definition, weights): V1 + V1, the SSD situation (modern prototxt + V1 weights), Caffe's own upgrades.
LEGACY_FILES = [("deploy.prototxt", "weights.caffemodel"), ("deploy_modern.prototxt", "weights.caffemodel"),
                ("upgraded.prototxt", "upgraded.caffemodel"), ("deploy.prototxt", "upgraded.caffemodel")]
IGNORED = {"branch_v1": ("ip_old",), "ssd_base_v1": ("fc8",), "vgg_lrn_v1": ()}


def _run(net, npz, **kwargs):
    with torch.no_grad():
        return net({k: torch.from_numpy(npz[k]) for k in npz.keys()}, **kwargs)


# ---------------------------------------------------------------------------
# Legacy V1 nets
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("files", LEGACY_FILES, ids=lambda f: f"{f[0]}+{f[1]}")
@pytest.mark.parametrize("case", LEGACY)
def test_legacy_v1_every_output(case, files):
    folder = require_fixture(f"caffe/legacy_v1/{case}")
    # Caffe ignores caffemodel layers the net lacks; strict=False does the same and lists them.
    net = load_caffe_net(folder / files[0], folder / files[1], strict=False)
    assert net.ignored_weights == IGNORED[case]
    expected = np.load(folder / "output.npz")
    got = _run(net, np.load(folder / "input.npz"))
    assert_blobs_match(net, got, expected)
    stored = np.load(folder / "weights.npz")  # blobs in Caffe's modern shapes, from the legacy 4-d ones
    for key in stored.keys():
        layer, index = key.rsplit("/", 1)
        np.testing.assert_array_equal(net.layer(layer).blobs()[int(index)].detach().numpy(), stored[key])


def test_legacy_v1_shared_weights_and_phase_rules():
    folder = require_fixture("caffe/legacy_v1/branch_v1")
    net = load_caffe_net(folder / "deploy.prototxt", folder / "weights.caffemodel", strict=False)
    assert net.shared_params == {("conv_b", 0): ("conv_a", 0), ("conv_b", 1): ("conv_a", 1)}
    assert net.layer("conv_b").weight is net.layer("conv_a").weight  # one Parameter, as Caffe's one blob
    assert net.param_multipliers["conv_a.bias"] == (2.0, 0.0)  # blobs_lr 2, weight_decay 0
    names = [s.name for s in net.layer_specs]
    assert names[0] == "input" and "train_only_relu" not in names and "not_in_test_relu" not in names
    assert net.input_shapes == {"a": (2, 4, 6, 5), "b": (2, 4, 6, 5)} and net.outputs == ("prob",)
    train = load_caffe_net(folder / "deploy.prototxt", folder / "weights.caffemodel", phase="TRAIN", strict=False)
    assert "prob" not in train.blob_shapes and train.outputs == ("ip",)
    ip_train = _run(train, np.load(folder / "input.npz"))["ip"].numpy()
    ip_test = np.load(folder / "output.npz")["ip"]
    assert (ip_test < 0).any()
    np.testing.assert_allclose(ip_train, np.maximum(ip_test, 0), rtol=1e-5, atol=1e-5)  # the two ReLUs ran


@pytest.mark.parametrize("rules,state,included", [
    ("", ("TEST", 0, ()), True),
    ("include { phase: TRAIN }", ("TEST", 0, ()), False),
    ("include { phase: TRAIN } include { phase: TEST }", ("TEST", 0, ()), True),
    ("exclude { phase: TEST }", ("TRAIN", 0, ()), True),
    ("include { min_level: 1 }", ("TEST", 0, ()), False),
    ("include { min_level: 1 max_level: 2 }", ("TEST", 2, ()), True),
    ('include { stage: "deploy" }', ("TEST", 0, ("deploy",)), True),
    ('include { stage: "deploy" stage: "fast" }', ("TEST", 0, ("deploy",)), False),
    ('exclude { not_stage: "deploy" }', ("TEST", 0, ()), False),
])
def test_net_state_rules(rules, state, included):
    """net.cpp FilterNet / StateMeetsRule: phase, level and stage conditions, include or exclude."""
    layer = text_format.Parse(f'name: "l" type: "ReLU" {rules}', caffe_pb2.LayerParameter())
    assert layer_included(layer, *state) is included


def test_extra_caffemodel_layers_are_an_error_when_strict():
    folder = require_fixture("caffe/legacy_v1/branch_v1")
    with pytest.raises(CaffeConversionError, match=r"not in the net: \['ip_old'\].*strict=False"):
        load_caffe_net(folder / "deploy.prototxt", folder / "weights.caffemodel")


def _vgg_weights(folder, change):
    weights = read_caffemodel(folder / "weights.caffemodel")
    change({layer.name: layer for layer in weights.layers})
    return weights


def _set_dims(blob, dims):
    blob.num, blob.channels, blob.height, blob.width = dims


@pytest.mark.parametrize("variant,message", [
    # legacy_v1/MANIFEST.md: real Caffe aborts on each of these ("shape mismatch", "Incompatible number of blobs").
    ("conv_bias_as_Nx1x1x1", r"'conv1_1' blob 1: caffemodel shape \(8, 1, 1, 1\) \(legacy .*needs \(8,\)"),
    ("ip_weight_as_NxKx1x1", r"'fc6' blob 0: caffemodel shape \(24, 64, 1, 1\) \(legacy .*needs \(24, 64\)"),
    ("ip_bias_missing", r"'fc6': 1 blobs in the caffemodel, the net's InnerProduct has 2"),
])
def test_legacy_shape_rules_refuse_what_caffe_refuses(variant, message):
    folder = require_fixture("caffe/legacy_v1/vgg_lrn_v1")
    changes = {
        "conv_bias_as_Nx1x1x1": lambda layers: _set_dims(layers["conv1_1"].blobs[1], (8, 1, 1, 1)),
        "ip_weight_as_NxKx1x1": lambda layers: _set_dims(layers["fc6"].blobs[0], (24, 64, 1, 1)),
        "ip_bias_missing": lambda layers: layers["fc6"].blobs.pop(),
    }
    with pytest.raises(CaffeConversionError, match=message):
        CaffeNet(read_prototxt(folder / "deploy.prototxt"), _vgg_weights(folder, changes[variant]))


def test_other_input_sizes_resize_the_layers_and_check_the_weights():
    folder = require_fixture("caffe/legacy_v1/vgg_lrn_v1")
    deploy = folder / "deploy.prototxt"
    net = load_caffe_net(deploy, folder / "weights.caffemodel", input_shapes={"data": (1, 3, 22, 22)})
    # 22 -> 11 -> 5 -> 2: pool3 (k3 s3 p1) gives ceil(4/3) + 1 = 3 windows, clipped to 2 since 2*3 >= 5 + 1
    assert net.blob_shapes["pool3"] == (1, 16, 2, 2)  # so fc6's (24, 64) still fits
    out = net({"data": torch.randn(1, 3, 22, 22)})
    assert out["prob"].shape == (1, 10)
    with pytest.raises(CaffeConversionError, match=r"'fc6' blob 0: .*needs \(24, 144\)"):
        load_caffe_net(deploy, folder / "weights.caffemodel", input_shapes={"data": (1, 3, 29, 29)})


# ---------------------------------------------------------------------------
# DSOD300 (random init, real Caffe's every stored blob)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dsod300():
    folder = require_fixture("caffe/dsod300")
    net = load_caffe_net(folder / "deploy.prototxt", folder / "random_init.caffemodel")
    ref = np.load(folder / "forward_2007_000027.npz")
    return folder, net, ref, _run(net, {"data": ref["data"]}, blobs=list(ref.keys()))


def test_dsod300_every_stored_blob(dsod300):
    _, net, ref, got = dsod300
    ratios = assert_blobs_match(net, got, ref)  # the MANIFEST's 1e-5 + 1e-5 |x| holds through 300+ layers
    assert max(ratios.values()) < 0.5


def test_dsod300_detection_out(dsod300):
    _, net, ref, got = dsod300
    # From our own forward: rows in the same order with the same labels, scores and boxes within 1e-5.
    assert error_ratio(got["detection_out"].numpy(), ref["detection_out"], "detections") <= 1
    # From Caffe's own inputs: scores copied exactly, boxes within 1e-6.
    rows = net.layer("detection_out")(*(torch.from_numpy(ref[k]) for k in
                                        ("mbox_loc", "mbox_conf_flatten", "mbox_priorbox")))
    assert error_ratio(rows.numpy(), ref["detection_out"], "detections-exact") <= 1


def test_dsod300_blob_count_and_shapes(dsod300):
    folder, net, ref, _ = dsod300
    shapes = json.loads((folder / "blob_shapes.json").read_text())
    n_values = sum(t.numel() for t in net.state_dict().values())
    assert n_values == shapes.pop("n_params") == 14_795_828
    for name, shape in shapes.items():
        if name != "detection_out":  # (1, 1, 1, 7) at set-up; the row count is data-dependent
            assert net.blob_shapes[name] == tuple(shape), name
    counts = {}
    for spec in net.layer_specs:
        counts[spec.type] = counts.get(spec.type, 0) + 1
    assert counts["BatchNorm"] == counts["Scale"] == counts["Convolution"] == 92


# ---------------------------------------------------------------------------
# yufacedetectnet (a real trained net; every blob Caffe held, its auto-inserted splits included)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def yuface():
    folder = require_fixture("caffe/yufacedetectnet_v1")
    net = load_caffe_net(folder / "yufacedetectnet-open-v1.prototxt", folder / "yufacedetectnet-open-v1.caffemodel")
    ref = np.load(folder / "forward_keliamoniz1_320x240.npz")
    return net, ref, _run(net, {"data": ref["data"]})


def test_yuface_every_blob(yuface):
    net, ref, got = yuface
    # Caffe's Split copies are named "<blob>_<producer>_<top index>_split_<k>"; they hold the producer's value.
    split_source = {f"{t}_{s.name}_{i}_split_": t for s in net.layer_specs for i, t in enumerate(s.tops)}

    def source(key):
        m = re.fullmatch(r"(.*_split_)\d+", key)
        return split_source[m.group(1)] if m else key

    assert sum(1 for k in ref.keys() if source(k) != k) == 23  # data x5, conv{3,4,5}_3 x2, 4 norms x3
    assert_blobs_match(net, got, ref, deep=True, source=source)


def test_yuface_finds_the_face(yuface):
    _, ref, got = yuface
    rows = got["detection_out"][0, 0].numpy()
    assert rows.shape == ref["detection_out"].shape[2:] == (23, 7)
    face = rows[0]
    assert face[:2].tolist() == [0.0, 1.0] and face[2] == pytest.approx(0.99887, abs=2e-5)
    np.testing.assert_allclose(face[3:], ref["detection_out"][0, 0, 0, 3:], atol=1e-5)
    assert (rows[1:, 2] < 0.2).all()


def test_yuface_detection_output_exact_from_stored_inputs(yuface):
    net, ref, _ = yuface
    rows = net.layer("detection_out")(*(torch.from_numpy(ref[k]) for k in
                                        ("mbox_loc", "mbox_conf_flatten", "mbox_priorbox")))
    assert error_ratio(rows.numpy(), ref["detection_out"], "detections-exact") <= 1


# ---------------------------------------------------------------------------
# Running: blobs, gradients, checkpoints, names
# ---------------------------------------------------------------------------


def test_only_the_layers_a_requested_blob_needs_run():
    folder = require_fixture("caffe/legacy_v1/branch_v1")
    net = load_caffe_net(folder / "deploy.prototxt", folder / "weights.caffemodel", strict=False)
    a = torch.from_numpy(np.load(folder / "input.npz")["a"])
    out = net({"a": a}, blobs=["conv_a"])  # conv_a (after its in-place ReLU) needs neither b nor the rest
    assert list(out) == ["conv_a"]
    np.testing.assert_allclose(out["conv_a"].detach().numpy(), np.load(folder / "output.npz")["conv_a"],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(CaffeConversionError, match=r"missing \['b'\]"):
        net({"a": a}, blobs=["conv_b"])
    with pytest.raises(CaffeConversionError, match=r"unknown \['c'\]"):
        net({"a": a, "b": a, "c": a})
    with pytest.raises(CaffeConversionError, match=r"no blob\(s\) \['nope'\]"):
        net({"a": a}, blobs=["nope"])


def test_end_to_end_gradients_reach_the_input_and_every_weight():
    folder = require_fixture("caffe/layer_zoo/mini_ssd")
    net = load_caffe_net(folder / "deploy.prototxt", folder / "weights.caffemodel")
    data = torch.from_numpy(np.load(folder / "input.npz")["data"]).requires_grad_()
    out = net({"data": data})
    assert out["detection_out"].shape[2] == 60 and not out["detection_out"].requires_grad
    (out["mbox_loc"].square().sum() + out["mbox_conf_flatten"].log().sum()).backward()
    assert data.grad is not None and bool(data.grad.abs().sum() > 0)
    for name, param in net.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name


def test_checkpoint_round_trip(tmp_path):
    folder = require_fixture("caffe/legacy_v1/branch_v1")
    net = load_caffe_net(folder / "deploy.prototxt", folder / "weights.caffemodel", strict=False)
    path = tmp_path / "branch_v1.pt"
    torch.save(net.checkpoint(), path)
    rebuilt = CaffeNet.from_checkpoint(torch.load(path, weights_only=True))
    assert rebuilt.layer("conv_b").weight is rebuilt.layer("conv_a").weight  # sharing survives
    inputs = np.load(folder / "input.npz")
    before, after = _run(net, inputs), _run(rebuilt, inputs)
    assert set(before) == set(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    # The bare state dict round-trips too, and rebuilding from the definition alone uses the fillers.
    torch.save(net.state_dict(), tmp_path / "state.pt")
    again = CaffeNet.from_definition(net.definition, torch.load(tmp_path / "state.pt", weights_only=True))
    assert torch.equal(_run(again, inputs)["prob"], before["prob"])
    assert torch.isfinite(_run(CaffeNet.from_definition(net.definition), inputs)["prob"]).all()
    with pytest.raises(CaffeConversionError, match="not a CaffeNet checkpoint"):
        CaffeNet.from_checkpoint({"state_dict": {}})
    with pytest.raises(CaffeConversionError, match="does not fit"):
        CaffeNet.from_definition(net.definition, {"conv_a.weight": torch.zeros(1)})


def _write(tmp_path, text, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return path


INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n'


def test_module_names_are_sanitized_and_map_back(tmp_path):
    path = _write(tmp_path, INPUT + "".join(
        f'layer {{ name: "{n}" type: "ReLU" bottom: "data" top: "{n}" }}\n'
        for n in ("conv1/relu", "conv1_relu", "forward", "inception.3a")))
    net = load_caffe_net(path)
    assert list(net.caffe_names.items())[1:] == [("conv1_relu", "conv1/relu"), ("conv1_relu_1", "conv1_relu"),
                                                 ("forward_1", "forward"), ("inception_3a", "inception.3a")]
    assert net.module_names["conv1/relu"] == "conv1_relu" and isinstance(net.layer("forward"), torch.nn.Module)
    assert set(net(dict(data=torch.randn(1, 3, 8, 8)))) == {"data", "conv1/relu", "conv1_relu", "forward",
                                                             "inception.3a"}


# ---------------------------------------------------------------------------
# Errors: one per problem kind, naming every layer at fault
# ---------------------------------------------------------------------------


def test_unsupported_layers_and_missing_bottoms_in_one_error(tmp_path):
    path = _write(tmp_path, INPUT + """
layer { name: "up" type: "Interp" bottom: "data" top: "up" }
layer { name: "conv" type: "Convolution" bottom: "up" top: "conv" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "py" type: "Python" bottom: "conv" top: "py" }
layer { name: "cat" type: "Concat" bottom: "conv" bottom: "ghost" top: "cat" }
layer { name: "dup" type: "ReLU" bottom: "data" top: "conv" }
""")
    with pytest.raises(CaffeConversionError) as info:
        load_caffe_net(path)
    message = str(info.value)
    assert str(path) in message
    assert "unsupported layer types: 'up' (Interp), 'py' (Python)" in message
    assert "layer 'cat' (Concat): bottom 'ghost' is never produced" in message
    assert "layer 'dup' (ReLU): top 'conv' is already produced by layer 'conv'" in message


def test_data_layers_of_a_real_test_net_are_listed():
    with pytest.raises(CaffeConversionError, match=r"'data' \(AnnotatedData\).*'detection_eval' "
                                                   r"\(DetectionEvaluate\).*deploy net"):
        load_caffe_net(require_fixture("caffe/prototxt/dsod300_voc0712/test.prototxt"))


def test_missing_extra_and_misshapen_weights_in_one_error():
    folder = require_fixture("caffe/layer_zoo/conv")
    weights = read_caffemodel(folder / "weights.caffemodel")
    layers = {layer.name: layer for layer in weights.layer}
    layers["conv_1x1"].name = "conv_1x1_renamed"  # conv_1x1 missing, conv_1x1_renamed extra
    layers["conv_rect"].blobs[0].shape.dim[:] = [3, 6, 1, 3]  # (3, 6, 3, 1) in the net
    layers["conv_depthwise"].blobs.pop()  # the bias
    with pytest.raises(CaffeConversionError) as info:
        CaffeNet(read_prototxt(folder / "deploy.prototxt"), weights)
    message = str(info.value)
    assert "missing in the caffemodel: ['conv_1x1']" in message
    assert "in the caffemodel with blobs but not in the net: ['conv_1x1_renamed']" in message
    assert "'conv_rect' blob 0: caffemodel shape (3, 6, 1, 3), the net's Convolution needs (3, 6, 3, 1)" in message
    assert "'conv_depthwise': 1 blobs in the caffemodel, the net's Convolution has 2" in message


def test_unreadable_files_are_conversion_errors_naming_the_file(tmp_path):
    folder = require_fixture("caffe/layer_zoo/conv")
    with pytest.raises(CaffeConversionError, match=r"net definition: .*weights\.caffemodel: not a text prototxt"):
        load_caffe_net(folder / "weights.caffemodel")
    with pytest.raises(CaffeConversionError, match=r"weights: .*nowhere\.caffemodel: cannot read"):
        load_caffe_net(folder / "deploy.prototxt", tmp_path / "nowhere.caffemodel")
    bad = _write(tmp_path, 'layer { name: "x" type: "ReLU" bottomm: "y" }')
    with pytest.raises(CaffeConversionError, match=r"bad\.prototxt:1:\d+: .*bottomm"):
        load_caffe_net(_write(tmp_path, bad.read_text(), "bad.prototxt"))
    no_shape = _write(tmp_path, 'input: "data"\nlayer { name: "r" type: "ReLU" bottom: "data" top: "r" }')
    with pytest.raises(CaffeConversionError, match=r"input 'data' has no declared shape"):
        load_caffe_net(no_shape)
    assert load_caffe_net(no_shape, input_shapes={"data": (1, 2)}).blob_shapes["r"] == (1, 2)


def test_runtime_shape_errors_name_the_layer():
    folder = require_fixture("caffe/layer_zoo/slice_crop")
    net = load_caffe_net(folder / "deploy.prototxt")
    inputs = {k: torch.from_numpy(v) for k, v in np.load(folder / "input.npz").items()}
    inputs["ref"] = torch.zeros(1, 1, 50, 6)
    with pytest.raises(CaffeConversionError, match=r"layer 'crop_axis2' \(Crop\): .*exceeds"):
        net(inputs)
