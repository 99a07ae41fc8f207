"""``python -m converters.caffe recipe``: the real DSOD / GRP-DSOD / SSD solvers read as toolkit.train commands.

Two independent readings are compared: the command printed from the Caffe
files and the presets ``toolkit.train.SOLVERS`` written by hand from them; the
JSON's priors and loss are checked against the prototxt read directly.
"""

from __future__ import annotations

import json
import shlex
import shutil

import numpy as np
import pytest

from conftest import require_fixture
from converters.caffe.__main__ import main
from converters.caffe.recipe import read_recipe
from toolkit.caffe import read_prototxt

RECIPES = {  # fixture folder -> the toolkit.train preset it should equal (None: no preset of its own)
    "dsod300_voc0712": "dsod300",
    "grp_dsod320_voc0712": "grp_dsod320",
    "ssd300_vgg16_voc0712": "ssd300",
    "dsod300_voc0712plus": None,
}


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _train_args(stdout: str):
    """The printed command, parsed by toolkit.train's own parser."""
    from toolkit.train import get_args_parser

    line = next(li for li in stdout.splitlines() if li.startswith("python -m toolkit.train"))
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "toolkit.train"]
    return get_args_parser().parse_args(argv[3:])


def _f32(values):
    return np.asarray(values, dtype=np.float32)


@pytest.mark.parametrize("case", list(RECIPES))
def test_fixture_solvers_read_as_the_toolkit_presets(case, tmp_path, capsys):
    from toolkit.train import SOLVERS

    folder = require_fixture(f"caffe/prototxt/{case}")
    out = tmp_path / "recipe.json"
    code, stdout, err = cli(capsys, "recipe", folder / "solver.prototxt", folder / "train.prototxt", "-o", out)
    assert code == 0, err
    args = _train_args(stdout)
    assert args.dataset == "voc0712" and args.warmup_iters == 0 and args.augment == "ssd" and args.max_expand == 4
    preset_name = RECIPES[case]
    if preset_name is not None:
        preset = SOLVERS[preset_name]
        assert args.model == preset_name
        assert (args.lr, args.iters, args.batch_size, args.accum) == (preset.base_lr, preset.max_iter,
                                                                      preset.batch_size, preset.accum)
        assert (args.gamma, args.momentum, args.weight_decay) == (preset.gamma, preset.momentum, preset.weight_decay)
        # A milestone at max_iter never fires (iterations run 0 .. max_iter - 1): the recipe leaves such a
        # stepvalue out, SOLVERS keeps it for ssd300 (120000) and drops it for dsod300 (100000).
        assert args.steps == [s for s in preset.steps if s < preset.max_iter]
    else:  # 07+12+test: 120k iterations, steps up to 100k
        assert args.model == "dsod300" and (args.lr, args.iters, args.batch_size, args.accum) == (0.1, 120000, 4, 4)
        assert args.steps == [20000, 40000, 60000, 80000, 100000]
        assert "voc0712plus" in stdout  # the file names say 07+12+test, the LMDB source 07+12: said so

    recipe = json.loads(out.read_text())
    assert recipe["train_args"]["steps"] == args.steps and recipe["command"] in stdout
    net = read_prototxt(folder / "train.prototxt")
    prior_layers = [layer for layer in net.layer if layer.type == "PriorBox"]
    assert [p["layer"] for p in recipe["priors"]] == [layer.name for layer in prior_layers] and len(prior_layers) == 6
    for entry, layer in zip(recipe["priors"], prior_layers):
        p, spec = layer.prior_box_param, entry["spec"]
        for ours, theirs in ((spec["min_sizes"], p.min_size), (spec["max_sizes"], p.max_size),
                             (spec["aspect_ratios"], p.aspect_ratio), (spec["variances"], p.variance),
                             ([spec["step"]], [p.step]), ([spec["offset"]], [p.offset])):
            np.testing.assert_array_equal(_f32(ours), _f32(list(theirs)), err_msg=layer.name)
        assert (spec["flip"], spec["clip"]) == (p.flip, p.clip)
    assert "PriorBox layers equal the" in stdout  # the model's own priors match too

    loss_layer = next(layer for layer in net.layer if layer.type == "MultiBoxLoss")
    m, loss = loss_layer.multibox_loss_param, recipe["loss"]
    assert loss["num_classes"] == m.num_classes == 21 and loss["normalization"] == "VALID"
    assert _f32(loss["overlap_threshold"]) == _f32(m.overlap_threshold)
    assert _f32(loss["neg_pos_ratio"]) == _f32(m.neg_pos_ratio) and loss["mining_type"] == "MAX_NEGATIVE"
    data = next(layer for layer in net.layer if layer.type == "AnnotatedData")
    assert recipe["data"]["batch_size"] == data.data_param.batch_size
    assert len(recipe["augmentation"]["batch_samplers"]) == len(data.annotated_data_param.batch_sampler) == 7
    assert recipe["augmentation"]["expand"] == {"prob": 0.5, "max_expand_ratio": 4.0}


def test_dsod_scale_and_ssd_bias_multipliers_are_reported(capsys, tmp_path):
    folder = require_fixture("caffe/prototxt/ssd300_vgg16_voc0712")
    recipe = read_recipe(folder / "solver.prototxt")  # train_net found by its file name beside the solver
    assert recipe.train_net_path.endswith("train.prototxt")
    assert any(m.startswith("lr_mult 2 / decay_mult 0 on 35 blobs") for m in recipe.not_expressible)
    dsod = read_recipe(require_fixture("caffe/prototxt/dsod300_voc0712/solver.prototxt"))
    assert any("scales by 0.017" in m for m in dsod.not_expressible)  # the prototxt's transform has no scale
    assert any("stepvalue [100000] not below max_iter" in m for m in dsod.notes)


def test_yuface_solver_poly_policy_unknown_model_and_foreign_field(tmp_path, capsys):
    folder = require_fixture("caffe/yufacedetectnet_v1")
    out = tmp_path / "yu.json"
    code, stdout, err = cli(capsys, "recipe", folder / "yufacedetectnet-open-v1.solver.prototxt", "-o", out)
    assert code == 0
    assert err.startswith("warning:") and "store_blobs_in_old_format" in err  # an NVCaffe-era solver field
    args = _train_args(stdout)
    assert args.steps == [] and args.lr == 0.001 and args.iters == 200000 and args.batch_size == 16
    command = next(li for li in stdout.splitlines() if li.startswith("python -m toolkit.train"))
    assert "--model" not in command and "--dataset" not in command  # omitted ...
    recipe = json.loads(out.read_text())
    cannot = " ".join(recipe["not_expressible"])
    assert "no --model" in cannot and "'poly'" in cannot and "power 2" in cannot  # ... and said why
    assert "loc_loss_type L2" in cannot and "overlap_threshold 0.35" in cannot
    assert [p["spec"]["min_sizes"] for p in recipe["priors"]] == [[10, 16, 24], [32, 48], [64, 96], [128, 192, 256]]


def _solver(tmp_path, text: str):
    path = tmp_path / "solver.prototxt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,steps,cannot", [
    ('lr_policy: "step" stepsize: 1000 gamma: 0.5 base_lr: 0.01 max_iter: 3500', [1000, 2000, 3000], None),
    ('lr_policy: "fixed" base_lr: 0.01 max_iter: 3500', [], None),
    ('lr_policy: "exp" gamma: 0.999 base_lr: 0.01 max_iter: 3500', [], "lr_policy 'exp'"),
    ('lr_policy: "multistep" stepvalue: 100 stepvalue: 200 gamma: 0.1 base_lr: 0.01 max_iter: 3500 type: "Adam"',
     [100, 200], "solver type Adam"),
])
def test_lr_policies(tmp_path, text, steps, cannot):
    recipe = read_recipe(_solver(tmp_path, text))
    assert recipe.train_args["steps"] == steps and recipe.train_args["iters"] == 3500
    assert recipe.train_args["lr"] == 0.01 and recipe.train_args["accum"] == 1
    assert ("gamma" in recipe.train_args) == bool(steps)
    assert any("no train net" in m for m in recipe.not_expressible)
    if cannot:
        assert any(m.startswith(cannot) for m in recipe.not_expressible)
    else:
        assert not any("lr_policy" in m for m in recipe.not_expressible)


def test_missing_train_net_default_output_path_and_bad_files(tmp_path, capsys):
    folder = require_fixture("caffe/prototxt/dsod300_voc0712")
    solver = tmp_path / "my_solver.prototxt"
    shutil.copy(folder / "solver.prototxt", solver)  # its train_net is nowhere near
    code, stdout, _ = cli(capsys, "recipe", solver)
    assert code == 0 and "--batch-size" not in stdout and "was not found (give TRAIN.prototxt)" in stdout
    assert (tmp_path / "my_solver.recipe.json").is_file()  # <solver stem>.recipe.json beside the solver

    code, _, err = cli(capsys, "recipe", folder / "deploy.prototxt", "-o", tmp_path / "x.json")
    assert code == 2 and err.startswith("error: ") and "not a Caffe solver" in err and err.count("\n") == 1
    bad = _solver(tmp_path, 'base_lr: 0.1\nlr_policy "fixed"\n')
    code, _, err = cli(capsys, "recipe", bad, "-o", tmp_path / "x.json")
    assert code == 2 and "solver.prototxt:2:" in err and err.count("\n") == 1
    code, _, err = cli(capsys, "recipe", folder / "solver.prototxt", tmp_path / "nowhere.prototxt",
                       "-o", tmp_path / "x.json")
    assert code == 2 and "nowhere.prototxt: cannot read" in err
    assert not (tmp_path / "x.json").exists()
