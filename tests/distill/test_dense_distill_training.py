"""toolkit.train --distill ld | frs: the teacher stays frozen, the student keeps its own initialisation and learns
from the teacher's outputs, the FRS adaptation layer trains with the student and resumes, and a distilled
checkpoint runs without its teacher."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import kill_after_checkpoint
from toolkit import train as train_mod
from toolkit.data.shapes import generate_shapes
from toolkit.engine import DistInfo, load_trained_model
from toolkit.evaluate import main as evaluate_main
from toolkit.models.build import build_model


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_shapes(root / "shapes", seed=6, num_train=8, num_test=2, progress=False)
    return root


def _args(data_root, model, out, *extra):
    return ["--dataset", "shapes", "--model", model, "--data-root", str(data_root), "--out", str(out),
            "--batch-size", "2", "--no-progress", "--workers", "0", *extra]


@pytest.fixture(scope="module")
def teachers(data_root, tmp_path_factory):
    """A GFL and an SSD teacher of the tiny presets, two iterations each."""
    found = {}
    for model in ("gfl_dsod_tiny", "dsod_tiny"):
        out = tmp_path_factory.mktemp(model)
        assert train_mod.main(_args(data_root, model, out, "--iters", "2")) == 0
        found[model] = out / "checkpoint.pth"
    return found


def _trainer(argv):
    return train_mod.Trainer(train_mod.get_args_parser().parse_args(argv), DistInfo())


@pytest.mark.parametrize("method, student, teacher", [("ld", "gfl_dsod_nano", "gfl_dsod_tiny"),
                                                      ("ld", "gfl_dsod_tiny", "gfl_dsod_tiny"),  # Self-LD
                                                      ("frs", "gfl_dsod_nano", "gfl_dsod_tiny"),
                                                      ("frs", "dsod_nano", "dsod_tiny")])
def test_the_teacher_is_frozen_and_the_student_learns_from_it(method, student, teacher, teachers, data_root,
                                                              tmp_path):
    ckpt = teachers[teacher]
    trainer = _trainer(_args(data_root, student, tmp_path / "s", "--iters", "2", "--distill", method, "--teacher",
                             str(ckpt), "--frs-warmup", "0"))
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    # The student keeps the undistilled run's initialisation (not the teacher's weights).
    torch.manual_seed(0)
    fresh = build_model(student, len(trainer.classes)).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in trainer.model.state_dict().items())
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    inputs, targets = next(iter(trainer._loader(0, 0)))
    losses = trainer._micro_step(inputs, targets, 1.0)
    keys = ("loss_ld", "loss_ld_vlr", "loss_kd") if method == "ld" else ("loss_frs_feat", "loss_frs_cls")
    assert all(losses[k].item() > 0 for k in keys)
    assert losses["loss"].item() == pytest.approx(sum(losses[k].item() for k in trainer.loss_keys[1:]), rel=1e-5)
    assert all(p.grad is None for p in trainer.teacher.parameters())
    # The distillation terms alone move the student (and FRS's adaptation layer).
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer._forward(trainer.model, inputs)
    out = trainer._forward(trainer.ddp, inputs)
    from toolkit.models.gfl import gfl_targets

    assigned = gfl_targets(out, targets) if method == "ld" else None
    sum(trainer._dense_distill_losses(out, inputs, targets, assigned).values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.backbone.parameters())
    if method == "frs":
        assert all(p.grad is not None for p in trainer.adaptation.parameters())
        in_optimizer = {p for g in trainer.optimizer.param_groups for p in g["params"]}
        assert set(trainer.adaptation.parameters()) <= in_optimizer
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.train()
    assert all(torch.equal(v, trainer.teacher.state_dict()[k]) for k, v in before.items())


def test_frs_ramps_up_over_its_warm_up(teachers, data_root, tmp_path):
    trainer = _trainer(_args(data_root, "dsod_nano", tmp_path / "s", "--iters", "1", "--distill", "frs",
                             "--teacher", str(teachers["dsod_tiny"]), "--frs-warmup", "4",
                             "--frs-feat-weight", "2", "--frs-cls-weight", "3"))
    assert (trainer.frs_params.feat_weight, trainer.frs_params.cls_weight) == (2.0, 3.0)
    inputs, targets = next(iter(trainer._loader(0, 0)))
    out = trainer._forward(trainer.ddp, inputs)
    values = []
    for iteration in (0, 1, 4, 9):
        trainer.iteration = iteration
        values.append(trainer._dense_distill_losses(out, inputs, targets, None)["loss_frs_feat"].item())
    assert values[0] == 0 and values[1] == pytest.approx(values[2] / 4, rel=1e-6) and values[3] == values[2]
    defaults = _trainer(_args(data_root, "gfl_dsod_nano", tmp_path / "g", "--iters", "1", "--distill", "frs",
                              "--teacher", str(teachers["gfl_dsod_tiny"])))
    assert (defaults.frs_params.feat_weight, defaults.frs_params.cls_weight, defaults.frs_params.warmup_iters) == (
        0.1, 0.05, 500)


def test_a_distilled_checkpoint_runs_without_its_teacher_and_resumes_exactly(
        teachers, data_root, tmp_path, monkeypatch):
    student = ("--iters", "4", "--distill", "frs", "--teacher", str(teachers["gfl_dsod_tiny"]), "--frs-warmup", "2")
    assert train_mod.main(_args(data_root, "gfl_dsod_nano", tmp_path / "full", *student)) == 0
    ckpt = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)
    assert ckpt["frs_adaptation"] is not None
    assert set(ckpt["model"]) == set(build_model("gfl_dsod_nano", 7).state_dict())  # no teacher, no adaptation
    model, classes, name = load_trained_model(tmp_path / "full" / "checkpoint.pth")
    assert name == "gfl_dsod_nano" and len(classes) == 7
    assert evaluate_main(["--checkpoint", str(tmp_path / "full" / "checkpoint.pth"), "--dataset", "shapes",
                          "--data-root", str(data_root), "--json", str(tmp_path / "map.json")]) == 0
    assert json.loads((tmp_path / "map.json").read_text())["mAP"] == pytest.approx(
        json.loads((tmp_path / "full" / "metrics.json").read_text())["mAP"])
    assert "FRS from" in (tmp_path / "full" / "report.md").read_text()

    kill_after_checkpoint(monkeypatch, train_mod.Trainer, 2, lambda: train_mod.main(
        _args(data_root, "gfl_dsod_nano", tmp_path / "killed", *student, "--ckpt-every", "2")))
    assert train_mod.main(_args(data_root, "gfl_dsod_nano", tmp_path / "killed", *student, "--resume")) == 0
    reference = ckpt["history"]
    resumed = torch.load(tmp_path / "killed" / "checkpoint.pth", weights_only=True)["history"]
    assert resumed == reference


def test_ld_and_frs_errors(teachers, data_root, tmp_path, capsys):
    gfl, ssd = str(teachers["gfl_dsod_tiny"]), str(teachers["dsod_tiny"])
    cases = [("dsod_nano", ("--distill", "ld", "--teacher", ssd), "the student needs a GFL head"),
             ("gfl_dsod_nano", ("--distill", "ld", "--teacher", ssd), "needs a teacher with a GFL head"),
             ("gfl_dsod_nano", ("--distill", "frs", "--teacher", ssd), "pairs heads of one kind"),
             ("ssd_tiny", ("--distill", "frs", "--teacher", ssd), "both must see the same batch"),
             ("gfl_dsod_nano", ("--distill", "ld"), "needs --teacher"),
             ("gfl_dsod_nano", ("--distill", "frs", "--teacher", gfl, "--frs-warmup", "-1"), "--frs-warmup")]
    for model, extra, message in cases:
        capsys.readouterr()
        assert train_mod.main(_args(data_root, model, tmp_path / "s", "--iters", "1", *extra)) == 2
        assert message in capsys.readouterr().err, (model, extra)
