"""python -m toolkit.evaluate on submission files and COCO results: neither torch nor matplotlib
imported (matplotlib only to plot), and the ground-truth cache flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cocoeval import synthetic_coco
from test_voc_gt import make_voc

from toolkit.data.voc import VOC_CLASSES
from toolkit.evaluate import main as evaluate_main
from toolkit.evaluation.submission import read_voc_submission, write_voc_submission
from toolkit.evaluation.voc import ClassDetections
from toolkit.evaluation.voc_gt import read_voc_ground_truth

REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs the command line as `python -m toolkit.evaluate ARGS` does, then reports which heavy modules
# the process imported.
WRAPPER = """
import json, runpy, sys
sys.argv = ["toolkit.evaluate", *sys.argv[1:]]
try:
    runpy.run_module("toolkit.evaluate", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exc:
    code = exc.code
heavy = ("torch", "matplotlib", "pycocotools", "cv2", "torchvision")
print(json.dumps({"rc": code, "imported": sorted(m for m in heavy if m in sys.modules)}))
"""


def run_cli(args: list[str], tmp_path: Path) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def random_detections(gt, rng: np.random.Generator) -> dict[str, ClassDetections]:
    ids = list(gt)
    out = {}
    for name in VOC_CLASSES[:6]:
        n = 40
        xy = rng.uniform(1, 50, (n, 2))
        boxes = np.hstack([xy, xy + rng.uniform(1, 40, (n, 2))]).round(1)
        out[name] = ClassDetections([ids[i] for i in rng.integers(0, len(ids), n)], rng.random(n).round(3), boxes)
    return out


@pytest.fixture
def voc_problem(tmp_path):
    devkit = make_voc(tmp_path / "data", num_images=30)
    gt = read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES)
    write_voc_submission(tmp_path / "dets", "test", random_detections(gt, np.random.default_rng(0)))
    return devkit, tmp_path / "dets"


def test_voc_path_imports_neither_torch_nor_matplotlib(voc_problem, tmp_path):
    devkit, dets = voc_problem
    common = ["--voc-root", devkit, "--detections", dets, "--json", tmp_path / "map.json"]
    out = run_cli(common, tmp_path)
    assert out["rc"] == 0
    assert "torch" not in out["imported"] and "matplotlib" not in out["imported"], out
    assert json.loads((tmp_path / "map.json").read_text())["metric"] == "voc07"
    # Plotting needs matplotlib, still not torch.
    out = run_cli([*common, "--plot", tmp_path / "pr.png"], tmp_path)
    assert out["rc"] == 0 and "matplotlib" in out["imported"] and "torch" not in out["imported"], out


def test_coco_path_imports_neither_torch_nor_matplotlib(tmp_path):
    dataset, results = synthetic_coco(np.random.default_rng(1), num_images=10)
    (tmp_path / "instances.json").write_text(json.dumps(dataset))
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = run_cli(["--coco-annotations", tmp_path / "instances.json", "--detections", tmp_path / "results.json",
                   "--json", tmp_path / "coco.json"], tmp_path)
    assert out["rc"] == 0
    assert not {"torch", "matplotlib", "pycocotools"} & set(out["imported"]), out
    assert json.loads((tmp_path / "coco.json").read_text())["metric"] == "coco"


def test_import_alone_is_light():
    code = ("import sys, toolkit.evaluate, toolkit.evaluation.coco, toolkit.evaluation.voc_gt; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'pycocotools') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cache_flags(voc_problem, tmp_path, monkeypatch):
    devkit, dets = voc_problem
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    common = ["--voc-root", str(devkit), "--detections", str(dets), "--metric", "voc12"]
    outputs = []
    mine = ["--cache-dir", str(tmp_path / "mine")]
    for extra in (["--no-cache"], [], [], mine, mine):
        out = tmp_path / f"map{len(outputs)}.json"
        assert evaluate_main([*common, *extra, "--json", str(out)]) == 0
        outputs.append(json.loads(out.read_text()))
    assert all(o == outputs[0] for o in outputs)
    assert len(list((tmp_path / "xdg" / "legacy-det" / "voc-gt").glob("*.npz"))) == 1
    assert len(list((tmp_path / "mine" / "voc-gt").glob("*.npz"))) == 1
    # The command line's result is evaluate_voc's on what the readers give.
    from toolkit.evaluation.voc import evaluate_voc

    gt = read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES)
    with pytest.warns(UserWarning, match="no detections for 14 class"):
        detections = read_voc_submission(dets, "test", VOC_CLASSES)
    direct = evaluate_voc(gt, detections, VOC_CLASSES, "voc12")
    assert outputs[0] == json.loads(json.dumps(direct.to_json()))
