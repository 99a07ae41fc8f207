"""Shared test helpers: where the recorded fixtures are, and how a missing one is handled.

``TOOLKIT_FIXTURES`` (default ``../shared/fixtures`` beside the repository)
holds files recorded from real Caffe and real reference evaluators.  Without
them a fixture test is skipped with the reason, except under ``CI=true``,
where a missing fixture fails the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The DETR fixtures hold the official code's float64 outputs, but that code computes a few values in float32 (the
# two-stage proposals' log), whose last bit MKL rounds differently on different CPUs (CPU-specific code paths; the
# fixtures come from its generic one: on an AVX-512 Intel CPU the default path misses them by 3e-8 relative).  MKL
# reads MKL_CBWR at its first call: set before any test runs, every CPU takes the reproducible path
# (``python -m converters.detr run --float64`` does the same).
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")


@pytest.fixture(autouse=True)
def _private_cache_home(tmp_path_factory, monkeypatch):
    """Every test's cache folder (toolkit.evaluate's parsed ground truth) is its own, never the user's.

    Here, not in a ``tests/<package>/conftest.py``: a second module named ``conftest`` would shadow this one for
    the tests that ``from conftest import ...``."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


def fixtures_root() -> Path:
    return Path(os.environ.get("TOOLKIT_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


def require_fixture(relative: str) -> Path:
    """Path of a fixture file or folder; skip (or fail under CI=true) when it is missing."""
    path = fixtures_root() / relative
    if not path.exists():
        message = f"fixture {path} not found (set TOOLKIT_FIXTURES to the shared fixtures folder)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def voc_mini() -> Path:
    """``voc2012_mini``: 60 real VOC2012 images, XMLs, detections and expected mAPs."""
    return require_fixture("voc2012_mini")


def voc_subset(data_root: Path, count: int) -> list[str]:
    """The first ``count`` images of ``voc2012_mini``'s val list copied as ``data_root/VOCdevkit/VOC2012`` (split
    ``val``: dataset ``voc12val`` with ``--data-root data_root``); returns their ids."""
    import shutil

    mini = require_fixture("voc2012_mini/VOCdevkit/VOC2012")
    ids = (mini / "ImageSets" / "Main" / "val.txt").read_text().split()[:count]
    voc = data_root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for i in ids:
        shutil.copy(mini / "JPEGImages" / f"{i}.jpg", voc / "JPEGImages")
        shutil.copy(mini / "Annotations" / f"{i}.xml", voc / "Annotations")
    (voc / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids) + "\n")
    return ids


class FirstImages:
    """The ground truth of a dataset's first ``count`` images, for ``evaluate_detector`` on a ``Subset``."""

    keep_difficult = True

    def __init__(self, dataset, count: int) -> None:
        self.dataset, self.count, self.classes = dataset, count, dataset.classes

    def __len__(self) -> int:
        return self.count

    def get_annotation(self, index: int):
        return self.dataset.get_annotation(index)


# -------------------------------------------------------------- tiny trained models (the apps tests)
def _train_tiny(data_root: Path, out: Path, model: str, *flags: str) -> Path:
    from toolkit import train as train_mod

    argv = ["--dataset", "shapes", "--model", model, "--data-root", str(data_root), "--out", str(out),
            "--batch-size", "2", "--no-progress", "--workers", "0", "--iters", "2", *flags]
    assert train_mod.main(argv) == 0
    return out / "checkpoint.pth"


@pytest.fixture(scope="session")
def train_tiny():
    """``train_tiny(data_root, out, model, *flags)`` -> the checkpoint of a two-iteration toolkit.train run."""
    return _train_tiny


@pytest.fixture(scope="session")
def mini_shapes_root(tmp_path_factory) -> Path:
    """A ``--data-root`` with an 8 + 2 image ``shapes`` dataset."""
    from toolkit.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("mini_shapes")
    generate_shapes(root / "shapes", seed=11, num_train=8, num_test=2, progress=False)
    return root


@pytest.fixture(scope="session")
def mini_shapes_image(mini_shapes_root) -> Path:
    return sorted((mini_shapes_root / "shapes" / "VOCdevkit" / "SHAPES" / "JPEGImages").glob("*.jpg"))[0]


@pytest.fixture(scope="session")
def tiny_dsod_checkpoints(mini_shapes_root, tmp_path_factory) -> dict:
    """Two-iteration ``dsod_tiny`` checkpoints: ``"teacher"`` (full size) and ``"student"`` (a ThumbDet 2x student
    of it, learned thumbnail)."""
    root = tmp_path_factory.mktemp("tiny_dsod")
    teacher = _train_tiny(mini_shapes_root, root / "teacher", "dsod_tiny")
    student = _train_tiny(mini_shapes_root, root / "student", "dsod_tiny", "--distill", "thumbdet", "--teacher",
                          str(teacher), "--thumb-scale", "2")
    return {"teacher": teacher, "student": student}


def kill_after_checkpoint(monkeypatch, trainer_cls, iteration: int, run) -> None:
    """Run ``run()`` with ``trainer_cls.checkpoint`` raising ``KeyboardInterrupt`` right after it has written the
    checkpoint of ``iteration`` (a run killed there), check that it died, and restore the method."""
    real_checkpoint = trainer_cls.checkpoint

    def checkpoint_then_die(self):
        real_checkpoint(self)
        if self.iteration == iteration:
            raise KeyboardInterrupt(f"simulated kill after the checkpoint at iteration {iteration}")

    monkeypatch.setattr(trainer_cls, "checkpoint", checkpoint_then_die)
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        monkeypatch.setattr(trainer_cls, "checkpoint", real_checkpoint)
