"""toolkit.train --distill thumbdet for both families: the two phases switch where configured, the teacher stays
frozen, the student starts from the teacher, and a student's checkpoint round-trips through evaluate and predict."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import kill_after_checkpoint
from toolkit import train as train_mod
from toolkit.data.shapes import generate_shapes
from toolkit.engine import DistInfo, load_trained_model
from toolkit.evaluate import main as evaluate_main
from toolkit.models.thumbnail import find_thumbnailer
from toolkit.predict import main as predict_main


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_shapes(root / "shapes", seed=5, num_train=16, num_test=4, progress=False)
    return root


def _args(data_root, model, out, *extra):
    return ["--dataset", "shapes", "--model", model, "--data-root", str(data_root), "--out", str(out),
            "--batch-size", "2", "--no-progress", "--workers", "0", *extra]


def _history(out):
    return torch.load(out / "checkpoint.pth", weights_only=True)["history"]


@pytest.fixture(scope="module", params=["dsod_tiny", "deformable_detr_tiny"])
def teacher(request, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"teacher_{request.param}")
    assert train_mod.main(_args(data_root, request.param, out, "--iters", "2")) == 0
    return request.param, out / "checkpoint.pth"


def test_phases_switch_where_configured_and_the_teacher_stays_frozen(teacher, data_root, tmp_path):
    model, teacher_ckpt = teacher
    out = tmp_path / "student"
    argv = _args(data_root, model, out, "--iters", "4", "--distill", "thumbdet", "--teacher", str(teacher_ckpt),
                 "--thumb-scale", "4", "--downsample-phase", "0.5")
    trainer = train_mod.Trainer(train_mod.get_args_parser().parse_args(argv), DistInfo())
    teacher_state = torch.load(teacher_ckpt, weights_only=True)["model"]
    # The student starts from the teacher; only its down-sampler is new.
    student_state = trainer.model.state_dict()
    assert {k for k in student_state if k not in teacher_state} == {k for k in student_state if "down_sample." in k}
    assert all(torch.equal(student_state[k].cpu(), v) for k, v in teacher_state.items())
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    assert find_thumbnailer(trainer.teacher) is None and find_thumbnailer(trainer.model).scale == 4

    # A first-phase step trains the down-sampler alone: no other parameter gets a gradient.
    inputs, targets = next(iter(trainer._loader(0, 0)))
    losses = trainer._micro_step(inputs, targets, 1.0)
    assert losses["loss_downsample"].item() > 0 and losses["loss_kd"].item() == losses["loss_fm"].item() == 0
    with_grad = {n for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert with_grad and all("down_sample." in n for n in with_grad)
    trainer.optimizer.zero_grad(set_to_none=True)

    # Under the SSD family's SGD the down-sampler has an Adam of its own; the DETR family's AdamW trains it with
    # the backbone, as officially.
    down_params = set(find_thumbnailer(trainer.model).parameters())
    main_params = {p for group in trainer.optimizer.param_groups for p in group["params"]}
    if model == "dsod_tiny":
        assert set(trainer.thumb_optimizer.param_groups[0]["params"]) == down_params
        assert not down_params & main_params and len(main_params) + len(down_params) == len(
            list(trainer.model.parameters()))
    else:
        assert trainer.thumb_optimizer is None and down_params <= main_params

    trainer.train()
    if model == "dsod_tiny":  # Adam stepped the down-sampler on every iteration, SGD the rest from phase 2 on
        assert all(int(trainer.thumb_optimizer.state[p]["step"]) == 4 for p in down_params)
        assert trainer.schedulers[1].last_epoch == 4
    history = trainer.history
    assert [h["iteration"] for h in history] == [1, 2, 3, 4]
    task = trainer.loss_keys[1]  # loss_cls / loss_ce
    for h in history[:2]:  # phase 1: the down-sample loss alone
        assert h["loss_downsample"] > 0 and h[task] == h["loss_kd"] == h["loss_fm"] == 0
        assert h["loss"] == pytest.approx(h["loss_downsample"])
    for h in history[2:]:  # phase 2: task loss + distillation
        assert h[task] > 0 and h["loss_kd"] > 0 and h["loss_fm"] > 0 and h["loss_downsample"] > 0
    # The teacher did not move.
    assert all(torch.equal(v.cpu(), teacher_state[k]) for k, v in trainer.teacher.state_dict().items())


def test_a_student_checkpoint_evaluates_and_predicts_at_full_size(teacher, data_root, tmp_path, capsys):
    model, teacher_ckpt = teacher
    out = tmp_path / "student"
    assert train_mod.main(_args(data_root, model, out, "--iters", "2", "--distill", "thumbdet", "--teacher",
                                str(teacher_ckpt), "--thumb-scale", "2")) == 0
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["thumbnail"] == {"scale": 2, "mode": "learned"}
    assert any("down_sample." in k for k in checkpoint["model"])
    assert evaluate_main(["--checkpoint", str(out / "checkpoint.pth"), "--dataset", "shapes", "--data-root",
                          str(data_root), "--json", str(tmp_path / "map.json")]) == 0
    assert json.loads((tmp_path / "map.json").read_text())["mAP"] == pytest.approx(
        json.loads((out / "metrics.json").read_text())["mAP"])
    image = next((data_root / "shapes" / "VOCdevkit" / "SHAPES" / "JPEGImages").glob("*.jpg"))
    assert predict_main(["--checkpoint", str(out / "checkpoint.pth"), str(image), "--out", str(tmp_path / "pred"),
                         "--save-thumbnails"]) == 0
    import cv2

    thumb = cv2.imread(str(tmp_path / "pred" / f"{image.stem}_thumbnail.png"))
    full = cv2.imread(str(tmp_path / "pred" / f"{image.stem}.png"))
    assert thumb is not None and thumb.shape[0] < full.shape[0]
    capsys.readouterr()
    # The teacher has no thumbnail to save.
    assert predict_main(["--checkpoint", str(teacher_ckpt), str(image), "--out", str(tmp_path / "p2"),
                         "--save-thumbnails"]) == 2
    assert "needs a thumbnail model" in capsys.readouterr().err


def test_bicubic_and_full_size_baselines_start_at_the_second_phase(data_root, tmp_path):
    teacher_out = tmp_path / "teacher"
    assert train_mod.main(_args(data_root, "dsod_tiny", teacher_out, "--iters", "1")) == 0
    for flags in (("--thumb-mode", "bicubic"), ("--thumb-mode", "bicubic_aliased"), ("--thumb-scale", "1")):
        out = tmp_path / "_".join(flags).strip("-")
        assert train_mod.main(_args(data_root, "dsod_tiny", out, "--iters", "4", "--distill", "thumbdet",
                                    "--teacher", str(teacher_out / "checkpoint.pth"), "--downsample-phase", "0.5",
                                    *flags)) == 0
        history = _history(out)
        assert [h["iteration"] for h in history] == [3, 4]
        assert all(h["loss_downsample"] == 0 and h["loss_kd"] > 0 for h in history)
        state = torch.load(out / "checkpoint.pth", weights_only=True)
        assert not any("down_sample." in k for k in state["model"])  # nothing learned in front of the detector
        if flags[0] == "--thumb-mode":  # the checkpoint rebuilds the same resize
            assert state["thumbnail"] == {"scale": 4, "mode": flags[1]}
            model, _, _ = load_trained_model(out / "checkpoint.pth")
            assert find_thumbnailer(model).mode == flags[1]


def test_a_killed_student_resumes_exactly(data_root, tmp_path, monkeypatch):
    """The down-sampler's own optimizer and schedule (SSD family) come back with the checkpoint."""
    teacher_out = tmp_path / "teacher"
    assert train_mod.main(_args(data_root, "dsod_tiny", teacher_out, "--iters", "1")) == 0
    student = ("--iters", "6", "--distill", "thumbdet", "--teacher", str(teacher_out / "checkpoint.pth"),
               "--downsample-phase", "0.34", "--thumb-scale", "2")
    assert train_mod.main(_args(data_root, "dsod_tiny", tmp_path / "full", *student)) == 0
    reference = _history(tmp_path / "full")
    # Killed one step into the second phase.
    kill_after_checkpoint(monkeypatch, train_mod.Trainer, 3, lambda: train_mod.main(
        _args(data_root, "dsod_tiny", tmp_path / "killed", *student, "--ckpt-every", "3")))
    assert torch.load(tmp_path / "killed" / "checkpoint.pth", weights_only=True)["thumb_optimizer"] is not None
    assert train_mod.main(_args(data_root, "dsod_tiny", tmp_path / "killed", *student, "--resume")) == 0
    resumed = _history(tmp_path / "killed")
    assert [h["iteration"] for h in resumed] == list(range(1, 7))
    assert resumed == reference  # exact: same floats, same learning rates


def test_distillation_errors(data_root, tmp_path, capsys):
    teacher_out = tmp_path / "teacher"
    assert train_mod.main(_args(data_root, "dsod_tiny", teacher_out, "--iters", "1")) == 0
    ckpt = str(teacher_out / "checkpoint.pth")
    cases = [(("--distill", "thumbdet"), "needs --teacher"),
             (("--teacher", ckpt), "--teacher needs --distill (thumbdet | ld | frs)"),
             (("--distill", "thumbdet", "--teacher", ckpt, "--init-from", ckpt), "drop --init-from"),
             (("--distill", "thumbdet", "--teacher", ckpt, "--downsample-phase", "1"), "--downsample-phase"),
             (("--distill", "thumbdet", "--teacher", ckpt, "--thumb-mode", "bicubic", "--thumb-init", "antialias"),
              "only a learned thumbnail"),
             (("--thumb-init", "antialias"), "is for --distill thumbdet")]
    for extra, message in cases:
        capsys.readouterr()
        assert train_mod.main(_args(data_root, "dsod_tiny", tmp_path / "s", "--iters", "1", *extra)) == 2
        assert message in capsys.readouterr().err
    capsys.readouterr()
    assert train_mod.main(_args(data_root, "ssd_tiny", tmp_path / "s", "--iters", "1", "--distill", "thumbdet",
                                "--teacher", ckpt)) == 2
    assert "not a full-size ssd_tiny for this student" in capsys.readouterr().err


def test_thumb_init_antialias_starts_the_student_behind_the_filter(data_root, tmp_path):
    teacher_out = tmp_path / "teacher"
    assert train_mod.main(_args(data_root, "dsod_tiny", teacher_out, "--iters", "1")) == 0
    argv = _args(data_root, "dsod_tiny", tmp_path / "s", "--iters", "2", "--distill", "thumbdet", "--teacher",
                 str(teacher_out / "checkpoint.pth"), "--thumb-scale", "4", "--thumb-init", "antialias")
    trainer = train_mod.Trainer(train_mod.get_args_parser().parse_args(argv), DistInfo())
    thumb = find_thumbnailer(trainer.model)
    pixels = torch.rand(1, 3, 32, 32)
    # The filter by hand: [1, 2, 1] / 4 per channel, stride 2, twice.
    expected = pixels
    kernel = torch.outer(torch.tensor([0.25, 0.5, 0.25]), torch.tensor([0.25, 0.5, 0.25])).expand(3, 1, 3, 3)
    for _ in range(2):
        expected = torch.nn.functional.conv2d(expected, kernel, stride=2, padding=1, groups=3)
    with torch.no_grad():
        assert torch.allclose(thumb.downsample(pixels.to(trainer.device)).cpu(), expected, atol=1e-6)
    assert "anti-aliasing filter" in trainer._distill_text("")
