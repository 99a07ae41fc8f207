"""``python -m converters.caffe convert | run | verify`` against real SSD-Caffe's blobs, and its error lines."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from caffe_compare import assert_blobs_match
from conftest import REPO_ROOT, require_fixture
from converters.caffe import CaffeNet, load_caffe_net
from converters.caffe.__main__ import main
from converters.caffe.cli import compare_blob, one_line
from toolkit.caffe import read_caffemodel

MULTIBOX = ["dsod", "empty", "v1_nodifficult_bipartite", "v2_nomining_l2_corner_crossboundary",
            "v3_predmatch_varintarget"]


def cli(capsys, *argv):
    """``main(argv)`` -> (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _tensors(npz):
    return {k: torch.from_numpy(npz[k]) for k in npz.keys()}


def _storage(t: torch.Tensor) -> tuple[int, int]:
    return t.untyped_storage().data_ptr(), t.storage_offset()


# ---------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["dense_block_inplace", "mini_ssd"])
def test_convert_small_net_round_trip(case, tmp_path, capsys):
    folder = require_fixture(f"caffe/layer_zoo/{case}")
    out = tmp_path / "net.pth"
    code, stdout, err = cli(capsys, "convert", folder / "deploy.prototxt", folder / "weights.caffemodel", "-o", out)
    assert code == 0, err
    assert "layers" in stdout and "parameter values" in stdout and "inputs:" in stdout and "outputs:" in stdout
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed

    checkpoint = torch.load(out, weights_only=True)
    net = CaffeNet.from_checkpoint(checkpoint)
    with torch.no_grad():
        got = net(_tensors(np.load(folder / "input.npz")))
    assert_blobs_match(net, got, np.load(folder / "output.npz"))

    # caffe_blobs: Caffe's layer names and blob order, the very values of weights.npz, the state dict's storage.
    stored = np.load(folder / "weights.npz")
    assert sorted(checkpoint["caffe_blobs"]) == sorted({k.rsplit("/", 1)[0] for k in stored.keys()})
    for key in stored.keys():
        layer, index = key.rsplit("/", 1)
        np.testing.assert_array_equal(checkpoint["caffe_blobs"][layer][int(index)].numpy(), stored[key])
    state_storages = {_storage(t) for t in checkpoint["state_dict"].values()}
    assert all(_storage(t) in state_storages for blobs in checkpoint["caffe_blobs"].values() for t in blobs)


@pytest.fixture(scope="module")
def dsod300(tmp_path_factory):
    folder = require_fixture("caffe/dsod300")
    out = tmp_path_factory.mktemp("dsod300") / "dsod300.pth"
    assert main(["convert", str(folder / "deploy.prototxt"), str(folder / "random_init.caffemodel"),
                 "-o", str(out)]) == 0
    return folder, out


def test_dsod300_converted_checkpoint_reproduces_caffe(dsod300):
    folder, out = dsod300
    checkpoint = torch.load(out, weights_only=True)
    n_values = sum(t.numel() for t in checkpoint["state_dict"].values())
    assert n_values == 14_795_828
    # caffe_blobs shares the state dict's storage: the file holds the values once (plus pickled metadata).
    assert sum(t.numel() for blobs in checkpoint["caffe_blobs"].values() for t in blobs) == n_values
    assert out.stat().st_size < 4 * n_values * 1.02
    assert len(checkpoint["caffe_blobs"]) == 282 and len(checkpoint["caffe_blobs"]["BatchNorm1"]) == 3
    first_bn = checkpoint["caffe_blobs"]["BatchNorm1"][2]  # Caffe's moving-average factor blob, (1,)
    assert first_bn.shape == (1,) and _storage(first_bn) in {_storage(t) for t in checkpoint["state_dict"].values()}

    net = CaffeNet.from_checkpoint(checkpoint)
    ref = np.load(folder / "forward_2007_000027.npz")
    with torch.no_grad():
        got = net({"data": torch.from_numpy(ref["data"])}, blobs=[k for k in ref.keys() if k != "data"])
    assert_blobs_match(net, got, ref, names=[k for k in ref.keys() if k != "data"])


def test_dsod300_verify_passes_with_the_default_tolerance(dsod300, capsys):
    folder, _ = dsod300
    code, out, err = cli(capsys, "verify", folder / "deploy.prototxt", folder / "random_init.caffemodel",
                         "--reference", folder / "forward_2007_000027.npz")
    assert code == 0, out + err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("blob"))
    assert lines[header].split()[:2] == ["blob", "shape"] and "max abs diff" in lines[header]
    rows = {line.split()[0]: line for line in lines[header + 1:] if line and not line.startswith(("ok", "FAIL"))}
    expected = [k for k in np.load(folder / "forward_2007_000027.npz").keys() if k != "data"]
    assert sorted(rows) == sorted(expected)  # every stored blob but the input, each "ok"
    assert all(" ok" in row and "FAIL" not in row for row in rows.values())
    assert "(1, 1, 200, 7)" in rows["detection_out"]


# ---------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------


def test_verify_fails_on_a_perturbed_reference_and_names_missing_blobs(tmp_path, capsys):
    folder = require_fixture("caffe/layer_zoo/conv")
    ref = {**np.load(folder / "input.npz"), **np.load(folder / "output.npz")}
    ref["conv_rect"] = ref["conv_rect"] + np.float32(1e-3)
    np.savez(tmp_path / "ref.npz", **ref)
    args = ["verify", folder / "deploy.prototxt", folder / "weights.caffemodel", "--reference", tmp_path / "ref.npz"]
    code, out, _ = cli(capsys, *args)
    assert code == 1
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("conv_")}
    assert "FAIL" in rows["conv_rect"] and all("FAIL" not in v for k, v in rows.items() if k != "conv_rect")
    assert out.splitlines()[-1].startswith("FAIL: 1 of 7 blobs")
    # A looser tolerance passes; a blob the net does not produce fails as missing.
    assert cli(capsys, *args, "--atol", "2e-3")[0] == 0
    ref["ghost"] = ref["conv_rect"]
    np.savez(tmp_path / "ref.npz", **ref)
    code, out, _ = cli(capsys, *args, "--atol", "2e-3")
    assert code == 1 and "not produced by the net" in next(li for li in out.splitlines() if li.startswith("ghost"))


def test_compare_blob_criterion():
    ref = np.array([0.0, 1.0, -100.0, np.nan], dtype=np.float32)
    max_abs, max_rel, passed = compare_blob(ref + np.array([0, 1e-5, 1e-2, 0], dtype=np.float32), ref, 1e-4, 1e-5)
    assert passed and max_abs == pytest.approx(1e-2, rel=1e-3) and max_rel == pytest.approx(1e-4, rel=1e-2)
    assert not compare_blob(ref + np.float32(2e-5), ref, 1e-4, 1e-5)[2]  # the zero element: 2e-5 > atol
    assert compare_blob(np.ones(2), np.zeros(2), 1e-4, 1e-5)[1] == np.inf
    assert not compare_blob(np.array([np.nan]), np.array([1.0]), 1e-4, 1e-5)[2]


def test_verify_yuface_compares_caffe_split_copies(capsys):
    """yufacedetectnet's first convolutions reach |x| = 427 (raw pixels): at the default atol 1e-5 the
    float32 rounding of conv1_1 .. conv3_2 (up to 9e-5) fails; the net tests' 1e-5 + 1e-6 * 427 passes."""
    folder = require_fixture("caffe/yufacedetectnet_v1")
    code, out, err = cli(capsys, "verify", folder / "yufacedetectnet-open-v1.prototxt",
                         folder / "yufacedetectnet-open-v1.caffemodel",
                         "--reference", folder / "forward_keliamoniz1_320x240.npz", "--atol", "4.4e-4")
    assert code == 0, out + err
    split_rows = [line for line in out.splitlines() if "split copy of" in line]
    assert len(split_rows) == 23 and all(" ok " in line for line in split_rows)


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------


def test_run_writes_every_top_or_the_named_blobs(tmp_path, capsys):
    folder = require_fixture("caffe/layer_zoo/mini_ssd")
    expected = np.load(folder / "output.npz")
    net_args = [folder / "deploy.prototxt", folder / "weights.caffemodel", "--input", folder / "input.npz"]
    code, out, err = cli(capsys, "run", *net_args, "--out", tmp_path / "all.npz")
    assert code == 0, err
    got = np.load(tmp_path / "all.npz")
    assert sorted(got.keys()) == sorted(expected.keys())  # every top of every non-Input layer
    assert all(got[k].dtype == np.float32 for k in got.keys())
    assert_blobs_match(load_caffe_net(folder / "deploy.prototxt"), _tensors(got), expected)  # net: tolerance classes

    code, _, err = cli(capsys, "run", *net_args, "--out", tmp_path / "two.npz", "--blobs", "mbox_conf_flatten,mbox_loc")
    assert code == 0, err
    two = np.load(tmp_path / "two.npz")
    assert list(two.keys()) == ["mbox_conf_flatten", "mbox_loc"]
    for key in two.keys():
        np.testing.assert_array_equal(two[key], got[key])


def test_run_from_a_converted_checkpoint_and_from_fillers(tmp_path, capsys):
    folder = require_fixture("caffe/layer_zoo/conv")
    assert cli(capsys, "convert", folder / "deploy.prototxt", folder / "weights.caffemodel", "-o",
               tmp_path / "conv.pth")[0] == 0
    expected = np.load(folder / "output.npz")
    code, _, err = cli(capsys, "run", folder / "deploy.prototxt", tmp_path / "conv.pth", "--input",
                       folder / "input.npz", "--out", tmp_path / "out.npz")
    assert code == 0, err
    got = np.load(tmp_path / "out.npz")
    for key in expected.keys():
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-5)

    code, out, err = cli(capsys, "run", folder / "deploy.prototxt", "--input", folder / "input.npz", "--out",
                         tmp_path / "fillers.npz")
    assert code == 0, err
    assert "fillers" in out
    fillers = np.load(tmp_path / "fillers.npz")
    assert all(fillers[k].shape == expected[k].shape and np.isfinite(fillers[k]).all() for k in expected.keys())


def test_run_takes_input_shapes_from_the_arrays_and_warns_about_extra_arrays(tmp_path, capsys):
    folder = require_fixture("caffe/layer_zoo/conv")
    np.savez(tmp_path / "in.npz", x=np.random.default_rng(0).normal(size=(1, 6, 20, 17)).astype(np.float32),
             unused=np.zeros(3, np.float32))
    code, _, err = cli(capsys, "run", folder / "deploy.prototxt", folder / "weights.caffemodel", "--input",
                       tmp_path / "in.npz", "--out", tmp_path / "out.npz", "--blobs", "conv_rect")
    assert code == 0 and err.startswith("warning:") and "['unused']" in err
    assert np.load(tmp_path / "out.npz")["conv_rect"].shape == (1, 3, 10, 17)


def test_run_blobs_need_only_their_inputs(tmp_path, capsys):
    folder = require_fixture("caffe/legacy_v1/branch_v1")  # V1 net; its caffemodel has a layer the net lacks
    np.savez(tmp_path / "a.npz", a=np.load(folder / "input.npz")["a"])
    net_args = [folder / "deploy.prototxt", folder / "weights.caffemodel", "--input", tmp_path / "a.npz"]
    code, _, err = cli(capsys, "run", *net_args, "--out", tmp_path / "o.npz", "--blobs", "conv_a")
    assert code == 0 and "ignored" in err  # ip_old: ignored with a warning, as Caffe ignores it
    np.testing.assert_allclose(np.load(tmp_path / "o.npz")["conv_a"], np.load(folder / "output.npz")["conv_a"],
                               rtol=1e-5, atol=1e-5)
    code, _, err = cli(capsys, "run", *net_args, "--out", tmp_path / "o.npz", "--blobs", "conv_b")
    assert code == 2 and re.search(r"a\.npz: no array for net input\(s\) \['b'\]", err)


@pytest.mark.parametrize("case", MULTIBOX)
def test_run_backward_gives_caffes_multibox_loss_gradients(case, tmp_path, capsys):
    folder = require_fixture(f"caffe/multibox_loss/{case}")
    data = np.load(folder / "input.npz")
    # The fixture's Input blobs pass through identity Scale layers named like the stored blobs.
    np.savez(tmp_path / "in.npz", mbox_loc_input=data["mbox_loc"], mbox_conf_input=data["mbox_conf"],
             mbox_priorbox=data["mbox_priorbox"], label=data["label"])
    # Without --phase: the loss layer is TRAIN-only, so --backward runs the TRAIN net and says so.
    code, out, err = cli(capsys, "run", folder / "train.prototxt", "--input", tmp_path / "in.npz",
                         "--out", tmp_path / "out.npz", "--backward")
    assert code == 0, err
    assert "the TEST net has no loss; --backward runs the TRAIN net" in err
    got, expected = np.load(tmp_path / "out.npz"), np.load(folder / "output.npz")
    assert got["mbox_loss"].shape == () and "loss" in out
    assert float(got["mbox_loss"]) == pytest.approx(float(expected["mbox_loss"]), rel=1e-5, abs=1e-7)
    for blob in ("mbox_loc", "mbox_conf"):
        grad, ref = got[f"{blob}_input_grad"], expected[f"{blob}_diff"]
        np.testing.assert_array_equal(grad != 0, ref != 0, err_msg=f"{blob}: matched / mined rows")
        np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-6, err_msg=blob)
    assert not got["label_grad"].any() and not got["mbox_priorbox_grad"].any()


# ---------------------------------------------------------------------------
# Bad inputs: one error line, status 2
# ---------------------------------------------------------------------------


def _bad_files(tmp_path, folder):
    truncated = tmp_path / "truncated.caffemodel"
    truncated.write_bytes((folder / "weights.caffemodel").read_bytes()[:2000])
    (tmp_path / "syntax.prototxt").write_text(
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 } } }\n'
        'layer { name: "r" type "ReLU" bottom: "x" top: "r" }\n')
    (tmp_path / "unknown.prototxt").write_text(
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }\n'
        'layer { name: "up" type: "Interp" bottom: "x" top: "up" }\n')
    (tmp_path / "ghost.prototxt").write_text(
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }\n'
        'layer { name: "cat" type: "Concat" bottom: "x" bottom: "ghost" top: "cat" }\n')
    weights = read_caffemodel(folder / "weights.caffemodel")
    layers = {layer.name: layer for layer in weights.layer}
    layers["conv_1x1"].name = "conv_1x1_renamed"
    (tmp_path / "missing.caffemodel").write_bytes(weights.SerializeToString())
    weights = read_caffemodel(folder / "weights.caffemodel")
    next(layer for layer in weights.layer if layer.name == "conv_rect").blobs[0].shape.dim[:] = [3, 6, 1, 3]
    (tmp_path / "misshapen.caffemodel").write_bytes(weights.SerializeToString())
    np.savez(tmp_path / "no_x.npz", y=np.zeros((2, 6, 11, 13), np.float32))


BAD = {
    "truncated caffemodel": (["convert", "{net}", "{tmp}/truncated.caffemodel", "-o", "{tmp}/o.pth"],
                             r"truncated\.caffemodel: .*truncated: layer \d+ starts at byte"),
    "JPEG as weights": (["convert", "{net}", "{jpeg}", "-o", "{tmp}/o.pth"], r"keliamoniz1\.jpg: .*JPEG image"),
    "prototxt as weights": (["run", "{net}", "{net}", "--input", "{input}", "--out", "{tmp}/o.npz"],
                            r"deploy\.prototxt: .*text file \(a prototxt\?\)"),
    "syntax error": (["run", "{tmp}/syntax.prototxt", "--input", "{input}", "--out", "{tmp}/o.npz"],
                     r"syntax\.prototxt:2:\d+: "),
    "unknown layer type": (["run", "{tmp}/unknown.prototxt", "--input", "{input}", "--out", "{tmp}/o.npz"],
                           r"unknown\.prototxt: .*unsupported layer types: 'up' \(Interp\)"),
    "bottom never produced": (["verify", "{tmp}/ghost.prototxt", "--reference", "{input}"],
                              r"ghost\.prototxt: .*layer 'cat' \(Concat\): bottom 'ghost' is never produced"),
    "missing weights": (["convert", "{net}", "{tmp}/missing.caffemodel", "-o", "{tmp}/o.pth"],
                        r"missing\.caffemodel: .*missing in the caffemodel: \['conv_1x1'\]"),
    "wrong weight shape": (["convert", "{net}", "{tmp}/misshapen.caffemodel", "-o", "{tmp}/o.pth"],
                           r"'conv_rect' blob 0: caffemodel shape \(3, 6, 1, 3\), the net's Convolution needs "
                           r"\(3, 6, 3, 1\)"),
    "missing input array": (["run", "{net}", "{weights}", "--input", "{tmp}/no_x.npz", "--out", "{tmp}/o.npz"],
                            r"no_x\.npz: no array for net input\(s\) \['x'\] .*holds \['y'\]"),
    "weights file missing": (["convert", "{net}", "{tmp}/nowhere.caffemodel", "-o", "{tmp}/o.pth"],
                             r"nowhere\.caffemodel: cannot read"),
    "caffemodel as npz": (["run", "{net}", "{weights}", "--input", "{weights}", "--out", "{tmp}/o.npz"],
                          r"weights\.caffemodel: not an \.npz archive"),
    "input of another shape": (["run", "{net}", "{weights}", "--input", "{deconv_input}", "--out", "{tmp}/o.npz"],
                               r"layer 'conv_depthwise' \(Convolution\): group 6 .*input shapes of .*x \(2, 4, 5, 6\) "
                               r"\(the prototxt declares \(2, 6, 11, 13\)\)"),
    "unknown blob": (["run", "{net}", "{weights}", "--input", "{input}", "--out", "{tmp}/o.npz", "--blobs", "nope"],
                     r"deploy\.prototxt: the TEST net has no blob\(s\) \['nope'\]"),
    "backward without loss": (["run", "{net}", "{weights}", "--input", "{input}", "--out", "{tmp}/o.npz",
                               "--backward"], r"--backward needs a loss.*--phase TRAIN"),
    "output folder missing": (["run", "{net}", "{weights}", "--input", "{input}", "--out", "{tmp}/no/o.npz"],
                              r"o\.npz: cannot write"),
    "usage": (["verify", "{net}"], r"required: --reference"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_give_one_error_line_and_status_2(case, tmp_path, capsys):
    folder = require_fixture("caffe/layer_zoo/conv")
    _bad_files(tmp_path, folder)
    paths = {"net": folder / "deploy.prototxt", "weights": folder / "weights.caffemodel",
             "input": folder / "input.npz", "tmp": tmp_path,
             "deconv_input": require_fixture("caffe/layer_zoo/deconv/input.npz"),
             "jpeg": require_fixture("caffe/yufacedetectnet_v1/keliamoniz1.jpg")}
    argv, pattern = BAD[case]
    code, out, err = cli(capsys, *[a.format(**paths) for a in argv])
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert "Traceback" not in err and not (tmp_path / "o.pth").exists() and not (tmp_path / "o.npz").exists()


def test_the_module_entry_point_prints_no_traceback(tmp_path):
    folder = require_fixture("caffe/layer_zoo/conv")
    truncated = tmp_path / "truncated.caffemodel"
    truncated.write_bytes((folder / "weights.caffemodel").read_bytes()[:2000])
    proc = subprocess.run([sys.executable, "-m", "converters.caffe", "convert", str(folder / "deploy.prototxt"),
                           str(truncated), "-o", str(tmp_path / "o.pth")], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: cannot read the weights: ") and proc.stderr.count("\n") == 1


def test_help_states_fillers_and_the_criterion(capsys):
    code, out, _ = cli(capsys, "run", "--help")
    assert code == 0 and "the blobs come from the prototxt's fillers" in " ".join(out.split())
    code, out, _ = cli(capsys, "verify", "--help")
    assert code == 0 and "atol + rtol * |ref|" in " ".join(out.split())


def test_one_line_folds_multi_problem_messages():
    assert one_line("net 'x' cannot be interpreted:\n  a\n  b") == "net 'x' cannot be interpreted: a; b"
    assert one_line("weights do not fit:\n  missing: [1]\n  blobs that do not fit:\n    p\n    q") == \
        "weights do not fit: missing: [1]; blobs that do not fit: p; q"
