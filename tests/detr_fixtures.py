"""Helpers for tests against ``shared/fixtures/detr``: official checkpoints written by the fixture's own script,
and the fixture README's comparison rule."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from conftest import require_fixture


def write_official_checkpoint(folder: str, out: Path) -> Path:
    """The fixture folder's official-format checkpoint, written by its make_checkpoint.py."""
    root = require_fixture("detr")
    subprocess.run([sys.executable, str(root / "make_checkpoint.py"), str(root / folder), str(out)], check=True)
    return out


def load_official(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


def assert_reproduces(outputs: dict, reference) -> None:
    """Every stored array, to 1e-8 of its largest magnitude (the fixture README's rule)."""
    assert sorted(outputs) == sorted(reference.files)
    for name in reference.files:
        ref = reference[name]
        ours = np.asarray(outputs[name])
        assert ours.shape == ref.shape, name
        assert np.abs(ours - ref).max() <= 1e-8 * np.abs(ref).max(), name
