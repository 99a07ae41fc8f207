"""Tests of the SHAPES generator (toolkit.data.shapes): determinism, VOC compatibility,
box correctness against the rendered masks, reuse/regeneration and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.data import shapes
from toolkit.data.errors import DatasetError
from toolkit.data.voc import VOCDetection, parse_voc_xml, read_image_bgr, read_image_set

SMALL = {"num_train": 12, "num_test": 4, "progress": False}


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "shapes"
    shapes.generate_shapes(root, seed=0, **SMALL)
    return root


def test_same_seed_is_byte_identical_and_other_seed_differs(small_root, tmp_path):
    again = tmp_path / "again"
    shapes.generate_shapes(again, seed=0, **SMALL)
    first, second = _digests(small_root), _digests(again)
    assert first == second
    assert "MANIFEST.json" in first and len(first) == 2 * (12 + 4) + 3 + 1 + 1

    # Two rendering processes write the same bytes as one.
    parallel = tmp_path / "parallel"
    shapes.generate_shapes(parallel, seed=0, workers=2, **SMALL)
    assert _digests(parallel) == first

    other = tmp_path / "other"
    shapes.generate_shapes(other, seed=1, **SMALL)
    third = _digests(other)
    jpgs = [k for k in first if k.endswith(".jpg")]
    assert all(first[k] != third[k] for k in jpgs)


def test_manifest_records_every_file_and_counts(small_root):
    manifest = json.loads((small_root / "MANIFEST.json").read_text())
    assert manifest["generator_version"] == shapes.GENERATOR_VERSION
    assert manifest["seed"] == 0
    assert manifest["params"]["num_train"] == 12 and manifest["params"]["num_test"] == 4
    on_disk = {k: v for k, v in _digests(small_root).items() if k != "MANIFEST.json"}
    assert manifest["files"] == on_disk
    assert manifest["total_bytes"] == sum((small_root / k).stat().st_size for k in on_disk)
    assert manifest["counts"]["train"]["images"] == 12
    assert manifest["counts"]["test"]["images"] == 4


def test_layout_is_voc_and_readable(small_root):
    folder = small_root / "VOCdevkit" / "SHAPES"
    train = read_image_set(small_root / "VOCdevkit", "SHAPES", "train")
    test = read_image_set(small_root / "VOCdevkit", "SHAPES", "test")
    assert train == [f"shapes_train_{i:06d}" for i in range(12)]
    assert test == [f"shapes_test_{i:06d}" for i in range(4)]
    assert read_image_set(small_root / "VOCdevkit", "SHAPES", "trainval") == train
    assert sorted(p.stem for p in (folder / "JPEGImages").iterdir()) == sorted(train + test)
    assert sorted(p.stem for p in (folder / "Annotations").iterdir()) == sorted(train + test)

    for image_id in train + test:
        ann = parse_voc_xml(folder / "Annotations" / f"{image_id}.xml")
        assert ann.filename == f"{image_id}.jpg"
        assert ann.depth == 3
        assert 200 <= ann.width <= 400 and 200 <= ann.height <= 400
        assert ann.objects, "every image has at least one annotated object"
        image = read_image_bgr(folder / "JPEGImages" / f"{image_id}.jpg")
        assert image.shape == (ann.height, ann.width, 3)
        for obj in ann.objects:
            assert obj.name in shapes.SHAPES_CLASSES
            xmin, ymin, xmax, ymax = obj.bbox_voc
            assert all(float(v).is_integer() for v in obj.bbox_voc)
            assert 1 <= xmin <= xmax <= ann.width and 1 <= ymin <= ymax <= ann.height


def test_voc_detection_over_generated_root(small_root):
    for split, n in (("train", 12), ("test", 4)):
        ds = VOCDetection(small_root / "VOCdevkit", [("SHAPES", split)], classes=shapes.SHAPES_CLASSES)
        assert len(ds) == n
        for i in range(len(ds)):
            image, target = ds[i]
            h, w = image.shape[:2]
            boxes = target["boxes"]
            assert boxes.dtype == torch.float32 and boxes.shape[1] == 4 and len(boxes) > 0
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
            assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert ((target["labels"] >= 1) & (target["labels"] <= 6)).all()
            assert target["difficult"].dtype == torch.bool and len(target["difficult"]) == len(boxes)


def test_shapes_dataset_builds_voc_detection(small_root):
    ds = shapes.shapes_dataset(small_root, split="test", seed=0, **SMALL)
    assert isinstance(ds, VOCDetection)
    assert len(ds) == 4 and ds.classes == ("background", *shapes.SHAPES_CLASSES)
    n_all = sum(len(ds.get_annotation(i)["labels"]) for i in range(len(ds)))
    easy = shapes.shapes_dataset(small_root, split="test", keep_difficult=False, seed=0, **SMALL)
    n_easy = sum(len(easy.get_annotation(i)["labels"]) for i in range(len(easy)))
    n_difficult = sum(int(ds.get_annotation(i)["difficult"].sum()) for i in range(len(ds)))
    assert n_easy == n_all - n_difficult


def _bbox_voc(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Naive reference: 1-based inclusive box of the True pixels (VOC convention)."""
    ys, xs = np.nonzero(mask)
    return xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("split,index", [("train", i) for i in range(40)] + [("test", i) for i in range(10)])
def test_annotations_match_rendered_masks(split, index):
    rendered = shapes.render_image(0, split, index)
    image = rendered.image_bgr
    assert image.dtype == np.uint8 and image.shape[2] == 3
    kept = iter(rendered.annotations)
    for j, obj in enumerate(rendered.objects):
        # Occlusion, recomputed from the drawn masks: later shapes cover earlier ones.
        covered = np.zeros_like(obj.drawn_mask)
        for later in rendered.objects[j + 1 :]:
            covered |= later.drawn_mask
        visible = obj.drawn_mask & ~covered
        np.testing.assert_array_equal(obj.visible_mask, visible)
        # The masks are the painted pixels: every visible pixel has the object's colour.
        assert (image[visible] == np.array(obj.colour_bgr, dtype=np.uint8)).all()
        assert obj.drawn_mask.sum() <= obj.area_px
        assert obj.truncated == (obj.drawn_mask.sum() < obj.area_px)

        fraction = visible.sum() / obj.area_px
        if fraction < shapes.DROP_VISIBLE_BELOW:
            continue
        ann = next(kept)
        assert ann.name == obj.name
        assert ann.bbox_voc == _bbox_voc(visible)
        xmin, ymin, xmax, ymax = ann.bbox_voc
        short_side = min(xmax - xmin + 1, ymax - ymin + 1)
        assert ann.difficult == (fraction < shapes.DIFFICULT_VISIBLE_BELOW or short_side < shapes.DIFFICULT_MIN_SIDE_PX)
        assert ann.truncated == obj.truncated
    assert next(kept, None) is None
    # The last shape is never occluded and its centre lies inside the image.
    assert rendered.annotations


def test_written_files_are_the_rendered_image(small_root):
    folder = small_root / "VOCdevkit" / "SHAPES"
    for split, index in (("train", 0), ("train", 11), ("test", 3)):
        rendered = shapes.render_image(0, split, index)
        decoded = read_image_bgr(folder / "JPEGImages" / f"{rendered.image_id}.jpg")
        assert decoded.shape == rendered.image_bgr.shape
        # JPEG at quality 95 stays close to the source.
        assert np.abs(decoded.astype(np.int16) - rendered.image_bgr).mean() < 6
        ann = parse_voc_xml(folder / "Annotations" / f"{rendered.image_id}.xml")
        assert [(o.name, tuple(int(v) for v in o.bbox_voc), o.difficult, o.truncated) for o in ann.objects] == [
            (a.name, a.bbox_voc, a.difficult, a.truncated) for a in rendered.annotations
        ]


def test_objects_cover_all_classes_and_sizes():
    names, sides = set(), []
    for index in range(60):
        for ann in shapes.render_image(0, "train", index).annotations:
            names.add(ann.name)
            xmin, ymin, xmax, ymax = ann.bbox_voc
            sides.append(max(xmax - xmin + 1, ymax - ymin + 1))
    assert names == set(shapes.SHAPES_CLASSES)
    assert min(sides) <= 12 and max(sides) >= 150


def test_labelmap(small_root):
    text = (small_root / "labelmap_shapes.prototxt").read_text()
    items = re.findall(r'item\s*\{\s*name:\s*"([^"]+)"\s*label:\s*(\d+)\s*display_name:\s*"([^"]+)"\s*\}', text)
    assert [int(label) for _, label, _ in items] == list(range(7))
    assert items[0] == ("none_of_the_above", "0", "background")
    assert [(n, d) for n, _, d in items[1:]] == [(c, c) for c in shapes.SHAPES_CLASSES]


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_ensure_reuses_and_regenerates(tmp_path):
    root = tmp_path / "shapes"
    devkit = shapes.ensure_shapes(root, **SMALL)
    assert devkit == root / "VOCdevkit" and (devkit / "SHAPES").is_dir()
    before = _mtimes(root)

    # A matching dataset is reused, not rewritten.
    assert shapes.ensure_shapes(root, **SMALL) == devkit
    assert _mtimes(root) == before

    # Different parameters: regenerated with the new counts.
    shapes.ensure_shapes(root, num_train=5, num_test=2, progress=False)
    assert len(read_image_set(devkit, "SHAPES", "train")) == 5
    assert not (devkit / "SHAPES" / "JPEGImages" / "shapes_train_000011.jpg").exists()
    assert json.loads((root / "MANIFEST.json").read_text())["params"]["num_train"] == 5

    # Another generator version recorded: regenerated.
    manifest = json.loads((root / "MANIFEST.json").read_text())
    manifest["generator_version"] = shapes.GENERATOR_VERSION - 1
    (root / "MANIFEST.json").write_text(json.dumps(manifest))
    shapes.ensure_shapes(root, num_train=5, num_test=2, progress=False)
    assert shapes.read_manifest(root)["generator_version"] == shapes.GENERATOR_VERSION

    # No manifest (as after a manual deletion): regenerated.
    (root / "MANIFEST.json").unlink()
    shapes.ensure_shapes(root, num_train=5, num_test=2, progress=False)
    assert (root / "MANIFEST.json").is_file()

    # A file listed in the manifest is missing: regenerated.
    (devkit / "SHAPES" / "JPEGImages" / "shapes_test_000001.jpg").unlink()
    shapes.ensure_shapes(root, num_train=5, num_test=2, progress=False)
    assert (devkit / "SHAPES" / "JPEGImages" / "shapes_test_000001.jpg").is_file()


def test_stale_temp_folder_is_removed(tmp_path):
    root = tmp_path / "shapes"
    # A temp folder of a process that no longer exists (pid far above any pid_max).
    stale = tmp_path / "shapes.tmp-999999999"
    (stale / "VOCdevkit").mkdir(parents=True)
    # One of this process (an interrupted earlier call) is stale too.
    own = tmp_path / f"shapes.tmp-{os.getpid()}"
    own.mkdir()
    (own / "junk").write_text("x")
    unrelated = tmp_path / "shapes.tmp-notapid"
    unrelated.mkdir()

    shapes.ensure_shapes(root, **SMALL)
    assert not stale.exists()
    assert not (tmp_path / f"shapes.tmp-{os.getpid()}").exists()
    assert unrelated.exists()
    assert (root / "MANIFEST.json").is_file()

    # Also cleaned when the dataset itself is reused.
    stale.mkdir()
    shapes.ensure_shapes(root, **SMALL)
    assert not stale.exists()


def test_failed_generation_leaves_no_dataset(tmp_path, monkeypatch):
    root = tmp_path / "shapes"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(shapes, "encode_jpeg", boom)  # in this process: one rendering process
    with pytest.raises(RuntimeError):
        shapes.generate_shapes(root, workers=1, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_with_rendering_processes_leaves_no_dataset(tmp_path, monkeypatch):
    # The writer fails while two processes render: the pool is stopped and nothing stays.
    root = tmp_path / "shapes"
    calls = []

    def sha256(data):
        calls.append(len(data))
        if len(calls) == 5:
            raise OSError("disk full")
        return hashlib.sha256(data)

    monkeypatch.setattr(shapes, "hashlib", types.SimpleNamespace(sha256=sha256))
    with pytest.raises(OSError, match="disk full"):
        shapes.generate_shapes(root, workers=2, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_delete_foreign_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match="refusing"):
        shapes.generate_shapes(root, **SMALL)
    assert (root / "thesis.tex").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        shapes.generate_shapes(tmp_path / "x", seed=-1, **SMALL)
    with pytest.raises(ValueError):
        shapes.render_image(0, "val", 0)
    with pytest.raises(ValueError):
        shapes.shapes_dataset(tmp_path / "x", split="val")


def test_cli_generates_then_reuses(tmp_path, capsys):
    root = tmp_path / "cli"
    argv = ["--root", str(root), "--num-train", "6", "--num-test", "3", "--seed", "2", "--quiet"]
    assert shapes.main(argv) == 0
    out = capsys.readouterr().out
    assert "generated now" in out and str(root.resolve()) in out
    for name in shapes.SHAPES_CLASSES:
        assert name in out
    manifest = shapes.read_manifest(root)
    train_row = next(line for line in out.splitlines() if line.split()[:1] == ["train"])
    fields = train_row.split()
    assert int(fields[1]) == 6
    assert [int(v) for v in fields[5:]] == [manifest["counts"]["train"]["per_class"][c] for c in shapes.SHAPES_CLASSES]
    assert int(fields[2]) == manifest["counts"]["train"]["objects"]

    assert shapes.main(argv) == 0
    assert "reused" in capsys.readouterr().out
