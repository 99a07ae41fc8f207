"""``python -m converters.detr convert | run`` on the official fixtures' checkpoints, and their errors."""

from __future__ import annotations

import argparse
from pathlib import PurePosixPath

import numpy as np
import pytest
import torch

from conftest import require_fixture, voc_subset
from converters.detr.__main__ import main
from detr_fixtures import assert_reproduces, load_official, write_official_checkpoint


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def refine_two_stage(tmp_path_factory):
    return write_official_checkpoint("deformable_detr_refine_twostage",
                                     tmp_path_factory.mktemp("official") / "official.pth")


def test_convert_then_run_reproduces_the_official_outputs(refine_two_stage, tmp_path, capsys):
    root = require_fixture("detr/deformable_detr_refine_twostage")
    converted = tmp_path / "toolkit.pth"
    code, out, err = cli(capsys, "convert", refine_two_stage, "-o", converted)
    assert code == 0, err
    assert "box refinement+two-stage" in out and "91 classes" in out
    checkpoint = torch.load(converted, weights_only=True)  # plain types and tensors only
    assert checkpoint["format"] == "legacy-det/detr/1" and checkpoint["config"]["two_stage"] is True
    for source in (converted, refine_two_stage):  # the converted file, and the official one directly
        code, _, err = cli(capsys, "run", source, "--input", root / "input.npz", "--out", tmp_path / "out.npz",
                           "--float64")
        assert code == 0, err
        assert_reproduces(dict(np.load(tmp_path / "out.npz")), np.load(root / "output.npz"))
    # float32 by default: the same outputs to float32 precision.
    code, _, err = cli(capsys, "run", converted, "--input", root / "input.npz", "--out", tmp_path / "f32.npz")
    assert code == 0, err
    f32, ref = np.load(tmp_path / "f32.npz"), np.load(root / "output.npz")
    assert f32["pred_boxes"].dtype == np.float32
    np.testing.assert_allclose(f32["pred_boxes"], ref["pred_boxes"], atol=1e-4)


def test_errors_are_one_line_naming_the_keys(refine_two_stage, tmp_path, capsys):
    official = load_official(refine_two_stage)
    cases = {}
    broken = dict(official, model={k: v for k, v in official["model"].items() if "level_embed" not in k})
    broken["model"]["extra.weight"] = torch.zeros(1)
    cases["missing_key.pth"] = (broken, "1 missing: transformer.level_embed; 1 unexpected: extra.weight")
    args = vars(official["args"]).copy()
    args["dim_feedforward"] = 2048
    cases["other_args.pth"] = (dict(official, args=argparse.Namespace(**args)), "of another shape: "
                               "transformer.encoder.layers.0.linear1.weight (1024, 256) vs (2048, 256)")
    thumbdet = vars(official["args"]).copy()
    thumbdet["use_kd_loss"] = True
    cases["thumbdet.pth"] = (dict(official, args=argparse.Namespace(**thumbdet)), "a ThumbDet checkpoint without its "
                             "down-sampler: missing backbone.0.down_sample.0.weight, backbone.0.down_sample.2.weight")
    odd = dict(official["model"], **{"backbone.0.down_sample.0.weight": torch.zeros(12, 3, 7, 7),
                                     "backbone.0.down_sample.2.weight": torch.zeros(3, 12, 7, 7)})
    cases["thumbdet_7x7.pth"] = (dict(official, model=odd, args=argparse.Namespace(**thumbdet)),
                                 "a ThumbDet down-sampler of unknown shape: backbone.0.down_sample.0.weight "
                                 "(12, 3, 7, 7)")
    swin = vars(official["args"]).copy()
    swin["backbone"] = "swin-t"
    cases["swin.pth"] = (dict(official, args=argparse.Namespace(**swin)), "backbone 'swin-t' (ResNet backbones only)")
    cases["no_args.pth"] = ({"model": official["model"]}, "no 'args'")
    cases["object.pth"] = ({"model": {}, "args": PurePosixPath("x")}, "Unsupported global")
    for name, (payload, message) in cases.items():
        torch.save(payload, tmp_path / name)
        code, _, err = cli(capsys, "convert", tmp_path / name, "-o", tmp_path / "out.pth")
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert message in err, (name, err)
        assert not (tmp_path / "out.pth").exists()
    caffemodel = require_fixture("caffe/dsod300/random_init.caffemodel")
    code, _, err = cli(capsys, "convert", caffemodel, "-o", tmp_path / "out.pth")
    assert code == 2 and "not a PyTorch checkpoint" in err
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((1, 3, 8, 8), np.float32))
    code, _, err = cli(capsys, "run", refine_two_stage, "--input", tmp_path / "bad.npz", "--out", tmp_path / "o.npz")
    assert code == 2 and "no 'images' array" in err


def test_sparse_detr_converts_and_runs(tmp_path, capsys):
    root = require_fixture("detr/sparse_detr_rho0.1")
    official = write_official_checkpoint("sparse_detr_rho0.1", tmp_path / "official.pth")
    converted = tmp_path / "sparse.pth"
    code, out, err = cli(capsys, "convert", official, "-o", converted)
    assert code == 0, err
    assert "Sparse DETR (box refinement+two-stage+rho 0.1+encoder aux heads+eff_query_init+eff_specific_head)" in out
    assert torch.load(converted, weights_only=True)["model_name"] == "sparse_detr"
    code, _, err = cli(capsys, "run", converted, "--input", root / "input.npz", "--out", tmp_path / "out.npz",
                       "--float64")
    assert code == 0, err
    got = dict(np.load(tmp_path / "out.npz"))
    assert got["sparse_token_nums"].dtype == np.int32 and got["backbone_topk_proposals"].dtype == np.int64
    assert_reproduces(got, np.load(root / "output.npz"))


def test_thumbdet_converts_and_runs(tmp_path, capsys):
    """An official ThumbDet checkpoint (4x down-sampler): convert names it; run takes [0, 1] RGB as the official model
    does and writes the thumbnail and the backbone features too, reproducing the fixture."""
    root = require_fixture("detr/thumbdet_4x")
    official = write_official_checkpoint("thumbdet_4x", tmp_path / "official.pth")
    converted = tmp_path / "thumbdet.pth"
    code, out, err = cli(capsys, "convert", official, "-o", converted)
    assert code == 0, err
    assert "ThumbDet 4x (learned thumbnail) on Deformable DETR" in out
    assert torch.load(converted, weights_only=True)["config"]["thumb_scale"] == 4
    code, _, err = cli(capsys, "run", converted, "--input", root / "input.npz", "--out", tmp_path / "out.npz",
                       "--float64")
    assert code == 0, err
    got = dict(np.load(tmp_path / "out.npz"))
    assert got["downsample_input"].shape == (2, 3, 96, 128)
    assert_reproduces(got, np.load(root / "output.npz"))
    # The README's 2x edit: 5x5 kernels, one stride-2 stage.
    official_2x = load_official(official)
    official_2x["model"]["backbone.0.down_sample.0.weight"] = torch.zeros(12, 3, 5, 5)
    official_2x["model"]["backbone.0.down_sample.2.weight"] = torch.zeros(3, 12, 5, 5)
    torch.save(official_2x, tmp_path / "official_2x.pth")
    code, out, err = cli(capsys, "convert", tmp_path / "official_2x.pth", "-o", converted)
    assert code == 0, err
    assert "ThumbDet 2x (learned thumbnail)" in out
    assert torch.load(converted, weights_only=True)["config"]["thumb_scale"] == 2


def test_a_converted_checkpoint_evaluates_predicts_and_initialises_training(refine_two_stage, tmp_path, capsys):
    """The COCO model's 91 class ids are matched to VOC's 20 classes by name (aeroplane = airplane ...) for
    toolkit.evaluate; toolkit.predict names COCO classes; toolkit.train --init-from keeps all but the class heads."""
    import json

    from toolkit import train as train_mod
    from toolkit.evaluate import main as evaluate_main
    from toolkit.predict import main as predict_main

    converted = tmp_path / "converted.pth"
    assert main(["convert", str(refine_two_stage), "-o", str(converted)]) == 0
    ids = voc_subset(tmp_path / "data", 2)
    voc = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(converted), "--dataset", "voc12val", "--data-root",
                          str(tmp_path / "data"), "--json", str(tmp_path / "map.json")]) == 0
    out = capsys.readouterr().out
    assert "60 model classes the dataset lacks are left out" in out
    assert 0.0 <= json.loads((tmp_path / "map.json").read_text())["mAP"] <= 1.0

    assert predict_main(["--checkpoint", str(converted), str(voc / "JPEGImages" / f"{ids[0]}.jpg"), "--out",
                         str(tmp_path / "pred"), "--score-threshold", "0"]) == 0
    names = json.loads((tmp_path / "pred" / "detections.json").read_text())["detections"][0]["classes"]
    assert names and set(names) <= set(torch.load(converted, weights_only=True)["classes"])

    lmdb = require_fixture("lmdb/VOC_trainval10_lmdb")
    code = train_mod.main(["--dataset", f"lmdb:{lmdb}", "--model", "deformable_detr", "--two-stage",
                           "--with-box-refine", "--init-from", str(converted), "--iters", "1", "--batch-size", "1",
                           "--workers", "0", "--no-progress", "--out", str(tmp_path / "ft")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "left at their initialisation: ['class_embed', 'transformer']" in printed
