"""The trainer: exact resumption after a kill, the non-finite-loss guard, the run report,
overfitting a few images, and DDP with two gloo processes equal to one process with accum."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import FirstImages, kill_after_checkpoint
from toolkit import train as train_mod
from toolkit.data.shapes import generate_shapes
from toolkit.engine import EpochSampler
from toolkit.models.multibox_loss import MultiBoxLoss


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_shapes(root / "shapes", seed=3, num_train=24, num_test=6, progress=False)
    return root


def _args(data_root, out, *extra):
    return ["--dataset", "shapes", "--model", "dsod_tiny", "--data-root", str(data_root), "--out", str(out),
            "--batch-size", "4", "--no-progress", *extra]


def _history(out):
    return torch.load(out / "checkpoint.pth", weights_only=True)["history"]


def test_resume_after_a_kill_reproduces_the_next_losses(data_root, tmp_path, monkeypatch):
    full = tmp_path / "full"
    # The full SSD augmentation: its random crops and distortions must repeat exactly too.
    assert train_mod.main(_args(data_root, full, "--iters", "6", "--workers", "0", "--augment", "ssd")) == 0
    reference = _history(full)
    assert [h["iteration"] for h in reference] == list(range(1, 7))

    killed = tmp_path / "killed"
    kill_after_checkpoint(monkeypatch, train_mod.Trainer, 3, lambda: train_mod.main(
        _args(data_root, killed, "--iters", "6", "--ckpt-every", "3", "--workers", "0", "--augment", "ssd")))
    assert torch.load(killed / "checkpoint.pth", weights_only=True)["iteration"] == 3
    # Resume with two DataLoader workers: per-sample generators make the data identical.
    assert train_mod.main(_args(data_root, killed, "--iters", "6", "--workers", "2", "--augment", "ssd",
                                "--resume")) == 0
    resumed = _history(killed)
    assert [h["iteration"] for h in resumed] == list(range(1, 7))
    for a, b in zip(reference, resumed):
        assert a == b  # exact: same floats, same learning rates


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_root, tmp_path, monkeypatch, capsys):
    real_forward = MultiBoxLoss.forward
    calls = {"n": 0}

    def forward(self, *a, **k):
        out = real_forward(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MultiBoxLoss, "forward", forward)
    out = tmp_path / "nan"
    rc = train_mod.main(_args(data_root, out, "--iters", "5", "--ckpt-every", "1", "--workers", "0"))
    assert rc == 3
    assert "non-finite loss nan at iteration 3" in capsys.readouterr().err
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_run_writes_the_report(data_root, tmp_path):
    out = tmp_path / "report"
    assert train_mod.main(_args(data_root, out, "--iters", "2", "--workers", "0")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "voc07" and 0.0 <= metrics["mAP"] <= 1.0
    assert set(metrics["ap"]) <= {"circle", "square", "triangle", "star", "hexagon", "cross"}
    for name in ("report.md", "loss.png", "pr_curves.png", "history.json"):
        assert (out / name).stat().st_size > 0
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    # A checkpoint of another model is refused with a clear message.
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    ckpt["model_name"] = "dsod300"
    torch.save(ckpt, tmp_path / "other.pth")
    assert train_mod.main(_args(data_root, out, "--iters", "2", "--workers", "0",
                                "--resume", str(tmp_path / "other.pth"))) == 2


def test_sampler_shards_batches_like_accumulation():
    single = EpochSampler(40, 4, True, seed=1, rank=0, world=1)
    ranks = [EpochSampler(40, 4, True, seed=1, rank=r, world=2) for r in range(2)]
    s = single.indices()
    r0, r1 = ranks[0].indices(), ranks[1].indices()
    for step in range(5):
        assert s[8 * step: 8 * step + 4] == r0[4 * step: 4 * step + 4]
        assert s[8 * step + 4: 8 * step + 8] == r1[4 * step: 4 * step + 4]
    single.set_epoch(0, start=12)
    assert list(single) == s[12:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, argv: list, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    args = train_mod.get_args_parser().parse_args(argv)
    info = train_mod.init_distributed("cpu")
    trainer = train_mod.Trainer(args, info)
    trainer.train()
    torch.save(trainer.model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_one_process_with_accumulation(data_root, tmp_path):
    # Every process keeps torch's default thread count: hard-negative mining is a discrete
    # choice, so a different reduction order (another thread count) can flip a selection.
    argv = _args(data_root, tmp_path / "ddp", "--iters", "3", "--workers", "0", "--batch-size", "2")
    mp.spawn(_ddp_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    single_out = tmp_path / "single"
    assert train_mod.main(_args(data_root, single_out, "--iters", "3", "--workers", "0", "--batch-size", "2",
                                "--accum", "2")) == 0
    single = torch.load(single_out / "checkpoint.pth", weights_only=True)["model"]
    params = [k for k, _ in train_mod.build_model("dsod_tiny", 7).named_parameters()]
    changed = 0
    for k in params:
        torch.testing.assert_close(rank0[k], rank1[k], rtol=0, atol=0)  # identical across ranks
        torch.testing.assert_close(rank0[k], single[k], rtol=1e-5, atol=1e-6)
        changed += int(not torch.equal(rank0[k], train_mod.build_model("dsod_tiny", 7).state_dict()[k]))
    assert changed > 0


def test_evaluate_and_predict_from_a_checkpoint(data_root, tmp_path, capsys):
    from toolkit.evaluate import main as evaluate_main
    from toolkit.predict import main as predict_main

    out = tmp_path / "run"
    assert train_mod.main(_args(data_root, out, "--iters", "2", "--workers", "0")) == 0
    trained = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(out / "checkpoint.pth"), "--dataset", "shapes",
                          "--data-root", str(data_root), "--json", str(tmp_path / "eval.json"),
                          "--write-detections", str(tmp_path / "dets"), "--split", "test"]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["metric"] == "voc07"
    assert evaluated["mAP"] == pytest.approx(trained["mAP"], abs=1e-9)
    # The written submission files give the same AP through the file-based evaluator.
    devkit = data_root / "shapes" / "VOCdevkit"
    assert evaluate_main(["--voc-root", str(devkit), "--subdir", "SHAPES", "--split", "test", "--detections",
                          str(tmp_path / "dets"), "--labelmap", str(data_root / "shapes" / "labelmap_shapes.prototxt"),
                          "--json", str(tmp_path / "files.json")]) == 0
    from_files = json.loads((tmp_path / "files.json").read_text())
    assert from_files["mAP"] == pytest.approx(evaluated["mAP"], abs=1e-6)
    images = sorted((devkit / "SHAPES" / "JPEGImages").glob("shapes_test_*.jpg"))[:2]
    assert predict_main(["--checkpoint", str(out / "checkpoint.pth"), *map(str, images), "--out",
                         str(tmp_path / "pred"), "--score-threshold", "0.0"]) == 0
    assert all((tmp_path / "pred" / f"{p.stem}.png").stat().st_size > 0 for p in images)
    records = json.loads((tmp_path / "pred" / "detections.json").read_text())["detections"]
    assert len(records) == 2 and all(len(r["boxes"]) == len(r["scores"]) for r in records)


def test_small_model_overfits_a_few_images(data_root):
    """No augmentation, 6 training images: the detector must learn them (train-set VOC07 mAP)."""
    from torch.utils.data import DataLoader, Subset

    from toolkit.data import build_dataset
    from toolkit.data.transforms import PREPROCESS_PRESETS, SSDTestTransform, collate_detection
    from toolkit.engine import evaluate_detector, normalized_targets
    from toolkit.models.build import build_model, default_postprocess
    from toolkit.models.multibox_loss import MultiBoxLossParams

    torch.manual_seed(0)
    dataset = build_dataset("shapes", "train", root=data_root,
                            transform=SSDTestTransform(160, PREPROCESS_PRESETS["dsod"]))
    subset = Subset(dataset, range(6))
    images, targets = collate_detection([subset[i] for i in range(len(subset))])
    model = build_model("dsod_tiny", 7)
    criterion = MultiBoxLoss(MultiBoxLossParams(num_classes=7))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    norm_targets = normalized_targets(targets, (160, 160), torch.device("cpu"))
    first = None
    for _ in range(150):
        out = model(images)
        loss = criterion(out["loc"], out["conf"], out["priors"], out["variances"], norm_targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.25 * first

    loader = DataLoader(subset, batch_size=6, collate_fn=collate_detection)
    result, _ = evaluate_detector(model, FirstImages(dataset, 6), loader, default_postprocess(7), torch.device("cpu"))
    assert result.mAP >= 0.9, result.ap


def test_every_model_has_a_solver_and_an_input_spec():
    from toolkit.models.build import INPUTS, MODELS
    from toolkit.models.detr.training import DETR_PRESETS

    assert set(MODELS) == set(INPUTS)
    assert set(train_mod.SOLVERS) == set(MODELS) | set(DETR_PRESETS)
    # Caffe's multistep: lr * gamma ** (#steps passed), with the warm-up on top.
    preset = train_mod.SolverPreset(0.1, (10, 20), 30, batch_size=2, warmup_iters=4)
    assert [round(train_mod.lr_factor(i, preset), 6) for i in (0, 3, 9, 10, 19, 20, 29)] == \
        [0.25, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]


def _shapes_as_coco(data_root, coco_root):
    """Write data_root's shapes splits as a COCO tree (train2017 / val2017) under coco_root."""
    from toolkit.data import build_dataset

    for split, folder in (("train", "train2017"), ("test", "val2017")):
        ds = build_dataset("shapes", split, root=data_root)
        (coco_root / folder).mkdir(parents=True)
        images, annotations = [], []
        for i in range(len(ds)):
            t = ds.get_annotation(i)
            os.symlink(ds.image_path(i), coco_root / folder / f"{t['image_id']}.jpg")
            h, w = t["orig_size"].tolist()
            images.append({"id": i + 1, "file_name": f"{t['image_id']}.jpg", "height": h, "width": w})
            for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
                x0, y0, x1, y1 = box
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 10 * label,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                    "iscrowd": 0})
        cats = [{"id": 10 * (k + 1), "name": n} for k, n in enumerate(ds.classes[1:])]
        (coco_root / "annotations").mkdir(exist_ok=True)
        (coco_root / "annotations" / f"instances_{folder}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": cats}))


def test_training_on_coco_reports_coco_ap(data_root, tmp_path):
    from toolkit.evaluate import main as evaluate_main

    _shapes_as_coco(data_root, tmp_path / "coco")
    out = tmp_path / "run"
    argv = ["--dataset", "coco", "--model", "dsod_tiny", "--data-root", str(tmp_path), "--out", str(out),
            "--batch-size", "4", "--iters", "2", "--workers", "0", "--no-progress"]
    assert train_mod.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "coco" and 0.0 <= metrics["mAP"] <= 1.0
    assert (out / "pr_curves.png").stat().st_size > 0
    assert evaluate_main(["--checkpoint", str(out / "checkpoint.pth"), "--dataset", "coco", "--data-root",
                          str(tmp_path), "--json", str(tmp_path / "coco.json")]) == 0
    again = json.loads((tmp_path / "coco.json").read_text())
    assert again["metric"] == "coco" and again["mAP"] == pytest.approx(metrics["mAP"], abs=1e-12)


@pytest.mark.parametrize("augment", ["mirror", "light"])  # caches warped tensors / decoded BGR arrays
def test_cached_images_train_exactly_as_read_from_disk(data_root, tmp_path, augment):
    runs = []
    for name, extra in (("disk", ()), ("cached", ("--cache-images",))):
        out = tmp_path / name
        # 8 steps of 4 over 24 images: the second epoch reads cached items a second time.
        assert train_mod.main(_args(data_root, out, "--iters", "8", "--workers", "0", "--augment", augment,
                                    *extra)) == 0
        runs.append([h["loss"] for h in _history(out)])
    assert runs[0] == runs[1]


def test_detr_training_resumes_exactly_and_its_checkpoint_evaluates_and_predicts(
        data_root, tmp_path, monkeypatch, capsys):
    """sparse_detr_tiny with the DETR recipe (AdamW groups, clipping, DETR augmentation, padded batches): a run killed
    after its checkpoint and resumed repeats the uninterrupted run's losses; toolkit.evaluate and toolkit.predict
    take the checkpoint."""
    from toolkit.evaluate import main as evaluate_main
    from toolkit.predict import main as predict_main

    def args(out, *extra):
        return ["--dataset", "shapes", "--model", "sparse_detr_tiny", "--data-root", str(data_root), "--out",
                str(out), "--batch-size", "2", "--no-progress", "--workers", "0", "--rho", "0.3", *extra]

    full = tmp_path / "full"
    assert train_mod.main(args(full, "--iters", "4")) == 0
    reference = _history(full)
    assert [h["iteration"] for h in reference] == [1, 2, 3, 4]
    assert set(reference[0]) == {"iteration", "lr", "loss", "loss_ce", "loss_bbox", "loss_giou"}
    checkpoint = torch.load(full / "checkpoint.pth", weights_only=True)
    assert checkpoint["model_config"]["rho"] == 0.3 and checkpoint["model_config"]["family"] == "sparse"
    assert json.loads((full / "metrics.json").read_text())["metric"] == "voc07"

    killed = tmp_path / "killed"
    kill_after_checkpoint(monkeypatch, train_mod.Trainer, 2,
                          lambda: train_mod.main(args(killed, "--iters", "4", "--ckpt-every", "2")))
    assert train_mod.main(args(killed, "--iters", "4", "--resume")) == 0
    for a, b in zip(reference, _history(killed)):
        assert a == b

    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(full / "checkpoint.pth"), "--dataset", "shapes", "--data-root",
                          str(data_root), "--json", str(tmp_path / "map.json")]) == 0
    assert json.loads((tmp_path / "map.json").read_text())["mAP"] == pytest.approx(
        json.loads((full / "metrics.json").read_text())["mAP"])
    image = next((data_root / "shapes" / "VOCdevkit" / "SHAPES" / "JPEGImages").glob("*.jpg"))
    assert predict_main(["--checkpoint", str(full / "checkpoint.pth"), str(image), "--out", str(tmp_path / "pred"),
                         "--score-threshold", "0"]) == 0
    records = json.loads((tmp_path / "pred" / "detections.json").read_text())["detections"]
    assert len(records[0]["scores"]) == 100  # the top-100 (query, class) pairs
    assert set(records[0]["classes"]) <= {"circle", "square", "triangle", "star", "hexagon", "cross"}


def test_detr_trains_under_amp_with_its_learning_rate_flags(data_root, tmp_path):
    """--amp on a DETR (bfloat16 autocast on the CPU; the matcher and criterion run in float32 on the cast outputs)
    trains with finite losses; --lr keeps the backbone's ratio to the base rate, --lr-backbone sets it."""
    out = tmp_path / "amp"
    assert train_mod.main(["--dataset", "shapes", "--model", "deformable_detr_tiny", "--data-root", str(data_root),
                           "--out", str(out), "--batch-size", "2", "--no-progress", "--workers", "0", "--iters", "2",
                           "--amp", "--lr", "1e-4", "--lr-backbone", "3e-5"]) == 0
    history = _history(out)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    groups = torch.load(out / "checkpoint.pth", weights_only=True)["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-4, 3e-5, 1e-5])  # rest, backbone, offsets x0.1

    solver = train_mod.SOLVERS["deformable_detr"]  # official: lr 2e-4, backbone 2e-5
    args = train_mod.get_args_parser().parse_args(["--model", "deformable_detr", "--lr", "1e-4"])
    plan = train_mod.resolve_plan(args, solver, train_len=100, world=1)
    assert (plan.solver.base_lr, plan.solver.lr_backbone) == pytest.approx((1e-4, 1e-5))
    args = train_mod.get_args_parser().parse_args(["--model", "dsod_tiny", "--lr-backbone", "1e-3"])
    with pytest.raises(ValueError, match="--lr-backbone"):
        train_mod.resolve_plan(args, train_mod.SOLVERS["dsod_tiny"], train_len=100, world=1)


def test_voting_cluster_diou_nms_in_training_evaluate_and_predict(data_root, tmp_path, capsys):
    from toolkit.evaluate import get_args_parser as evaluate_parser
    from toolkit.evaluate import main as evaluate_main
    from toolkit.models.postprocess import NMS_KINDS
    from toolkit.predict import main as predict_main

    # toolkit.evaluate spells the choices out (no torch to parse its arguments): they must stay NMS_KINDS.
    nms_action = next(a for a in evaluate_parser()._actions if a.dest == "nms")
    assert tuple(nms_action.choices) == NMS_KINDS
    out = tmp_path / "run"
    assert train_mod.main(_args(data_root, out, "--iters", "2", "--workers", "0", "--nms", "voting_cluster_diou")) == 0
    trained = json.loads((out / "metrics.json").read_text())["mAP"]
    common = ["--checkpoint", str(out / "checkpoint.pth"), "--dataset", "shapes", "--data-root", str(data_root)]
    results = {}
    for nms in ("voting_cluster_diou", "greedy"):
        assert evaluate_main([*common, "--nms", nms, "--json", str(tmp_path / f"{nms}.json"),
                              "--write-detections", str(tmp_path / nms)]) == 0
        results[nms] = json.loads((tmp_path / f"{nms}.json").read_text())["mAP"]
    assert results["voting_cluster_diou"] == pytest.approx(trained, abs=1e-9)  # the trainer's evaluation used it
    submission = sorted((tmp_path / "greedy").rglob("*.txt"))[0]
    voted = tmp_path / "voting_cluster_diou" / submission.relative_to(tmp_path / "greedy")
    assert submission.read_text() != voted.read_text()
    image = sorted((data_root / "shapes" / "VOCdevkit" / "SHAPES" / "JPEGImages").glob("*.jpg"))[0]
    for nms in ("voting_cluster_diou", "greedy"):
        assert predict_main(["--checkpoint", str(out / "checkpoint.pth"), str(image), "--out", str(tmp_path / nms),
                             "--score-threshold", "0.0", "--nms", nms]) == 0
    boxes = {nms: json.loads((tmp_path / nms / "detections.json").read_text())["detections"][0]["boxes"]
             for nms in ("voting_cluster_diou", "greedy")}
    assert boxes["voting_cluster_diou"] != boxes["greedy"]
    capsys.readouterr()
    assert evaluate_main(["--voc-root", str(data_root / "shapes" / "VOCdevkit"), "--subdir", "SHAPES",
                          "--detections", str(tmp_path / "greedy"), "--nms", "voting_cluster_diou"]) == 2
    assert "--nms applies to --checkpoint" in capsys.readouterr().err
    assert train_mod.main(_args(data_root, tmp_path / "detr", "--model", "deformable_detr_tiny", "--iters", "1",
                                "--nms", "voting_cluster_diou")) == 2
    assert "has no NMS" in capsys.readouterr().err


def test_gfl_head_trains_evaluates_and_predicts(mini_shapes_root, train_tiny, tmp_path, capsys):
    """gfl_dsod_tiny through toolkit.train, toolkit.evaluate (both NMS kinds) and toolkit.predict."""
    from toolkit.engine import load_trained_model
    from toolkit.evaluate import main as evaluate_main
    from toolkit.models.gfl import GFLDetector
    from toolkit.predict import main as predict_main

    out = tmp_path / "gfl"
    # Enough steps for scores above GFL's 0.05 threshold: the evaluations and drawings have detections to compare.
    checkpoint = train_tiny(mini_shapes_root, out, "gfl_dsod_tiny", "--iters", "12", "--warmup-iters", "0",
                            "--lr", "0.02", "--nms", "voting_cluster_diou")
    history = torch.load(checkpoint, weights_only=True)["history"]
    assert set(history[0]) >= {"loss", "loss_cls", "loss_box", "loss_dfl"}
    assert history[-1]["loss"] < history[0]["loss"]
    model, classes, name = load_trained_model(checkpoint)
    assert isinstance(model, GFLDetector) and name == "gfl_dsod_tiny" and len(classes) == 7
    trained = json.loads((out / "metrics.json").read_text())["mAP"]
    common = ["--checkpoint", str(checkpoint), "--dataset", "shapes", "--data-root", str(mini_shapes_root)]
    for nms in ("voting_cluster_diou", "greedy"):
        assert evaluate_main([*common, "--nms", nms, "--json", str(tmp_path / f"{nms}.json")]) == 0
    assert json.loads((tmp_path / "voting_cluster_diou.json").read_text())["mAP"] == pytest.approx(trained, abs=1e-9)
    image = sorted((mini_shapes_root / "shapes" / "VOCdevkit" / "SHAPES" / "JPEGImages").glob("*.jpg"))[0]
    assert predict_main(["--checkpoint", str(checkpoint), str(image), "--out", str(tmp_path / "pred"),
                         "--score-threshold", "0.0"]) == 0
    record = json.loads((tmp_path / "pred" / "detections.json").read_text())["detections"][0]
    assert 0 < len(record["boxes"]) <= 100 and min(record["scores"]) > 0.05  # GFL's threshold and cut
    assert set(record["labels"]) <= set(range(1, 7))
    capsys.readouterr()
    assert train_mod.main(["--dataset", "shapes", "--model", "gfl_dsod_tiny", "--data-root", str(mini_shapes_root),
                           "--out", str(tmp_path / "thumb"), "--distill", "thumbdet", "--teacher", str(checkpoint),
                           "--no-progress"]) == 2
    assert "GFL head" in capsys.readouterr().err


def test_detr_hybrid_matching_flags(data_root, tmp_path, capsys):
    """--num-queries-one2many trains the extra queries with their own logged losses; the checkpoint keeps them and
    detects with the one-to-one queries alone; the flag is refused where there is no Deformable DETR."""
    from toolkit.engine import load_trained_model

    out = tmp_path / "hybrid"
    assert train_mod.main(["--dataset", "shapes", "--model", "deformable_detr_tiny", "--data-root", str(data_root),
                           "--out", str(out), "--batch-size", "2", "--no-progress", "--workers", "0", "--iters", "2",
                           "--num-queries-one2many", "20", "--k-one2many", "2"]) == 0
    history = _history(out)
    assert all(math.isfinite(h["loss_ce_one2many"]) and h["loss_giou_one2many"] > 0 for h in history)
    model, _, _ = load_trained_model(out / "checkpoint.pth")
    assert model.query_embed.weight.shape[0] == 50 + 20 and not model.training
    with torch.no_grad():
        detections = model(torch.rand(1, 3, 128, 160))
    assert detections["pred_logits"].shape[1] == 50 and "one2many" not in detections
    capsys.readouterr()
    assert train_mod.main(_args(data_root, tmp_path / "ssd", "--iters", "1", "--num-queries-one2many", "10")) == 2
    assert "--num-queries-one2many (hybrid matching) is for Deformable DETR" in capsys.readouterr().err
    assert train_mod.main(_args(data_root, tmp_path / "sparse", "--model", "sparse_detr_tiny", "--iters", "1",
                                "--num-queries-one2many", "10")) == 2
    assert "num_queries_one2many" in capsys.readouterr().err


def test_detr_auxiliary_dense_head_flags(data_root, tmp_path, capsys):
    """--aux-dense-head adds the weighted GFL loss of the encoder's dense branch to the DETR loss (logged as
    loss_dense; the default weight is 2 x the decoder layers); the trained checkpoint detects without it."""
    from toolkit.engine import load_trained_model

    out = tmp_path / "dense"
    assert train_mod.main(["--dataset", "shapes", "--model", "deformable_detr_tiny", "--data-root", str(data_root),
                           "--out", str(out), "--batch-size", "2", "--no-progress", "--workers", "0", "--iters", "2",
                           "--aux-dense-head", "--aux-dense-weight", "0.5"]) == 0
    history = _history(out)
    assert all(h["loss_dense"] > 0 for h in history)
    assert all(h["loss"] > h["loss_dense"] for h in history)
    model, _, _ = load_trained_model(out / "checkpoint.pth")
    assert model.aux_dense_anchor_scale == 4.0 and not model.training
    with torch.no_grad():
        assert "aux_dense" not in model(torch.rand(1, 3, 128, 160))
    capsys.readouterr()
    assert train_mod.main(["--dataset", "shapes", "--model", "deformable_detr_tiny", "--data-root", str(data_root),
                           "--out", str(tmp_path / "bad"), "--no-progress", "--iters", "1",
                           "--aux-dense-weight", "3"]) == 2
    assert "--aux-dense-weight needs --aux-dense-head" in capsys.readouterr().err


def test_detr_with_the_dsod_backbone_starts_from_a_dsod_checkpoint(data_root, tmp_path, capsys):
    """deformable_detr_dsod --backbone-weights takes a toolkit dsod_tiny checkpoint's backbone (kept as it was
    under --lr-backbone 0), and its checkpoint evaluates without that file; a checkpoint that does not fit is
    refused by name."""
    from toolkit.engine import load_trained_model
    from toolkit.models.build import build_model

    torch.manual_seed(3)
    dsod = build_model("dsod_tiny", 7).state_dict()
    weights = tmp_path / "dsod_tiny.pth"
    torch.save({"model": dsod, "model_name": "dsod_tiny"}, weights)
    out = tmp_path / "detr_dsod"
    assert train_mod.main(["--dataset", "shapes", "--model", "deformable_detr_dsod", "--data-root", str(data_root),
                           "--out", str(out), "--batch-size", "2", "--no-progress", "--workers", "0", "--iters", "2",
                           "--backbone-weights", str(weights), "--lr-backbone", "0", "--aux-dense-head"]) == 0
    model, _, name = load_trained_model(out / "checkpoint.pth")
    assert name == "deformable_detr_dsod"
    body = model.backbone[0].body.state_dict()
    for key in ("stem.0.conv.weight", "blocks.2.1.grow.conv.weight", "extras.1.learn_down.conv.weight"):
        torch.testing.assert_close(body[key], dsod[f"backbone.{key}"], rtol=0, atol=0)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 128, 160))["pred_logits"].shape == (1, 50, 6)
    nano = tmp_path / "dsod_nano.pth"
    torch.save({"model": build_model("dsod_nano", 7).state_dict(), "model_name": "dsod_nano"}, nano)
    capsys.readouterr()
    assert train_mod.main(["--dataset", "shapes", "--model", "deformable_detr_dsod", "--data-root", str(data_root),
                           "--out", str(tmp_path / "bad"), "--no-progress", "--iters", "1",
                           "--backbone-weights", str(nano)]) == 2
    assert "dsod_nano.pth: the backbone of model 'dsod_nano' does not fit" in capsys.readouterr().err
