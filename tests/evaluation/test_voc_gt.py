"""The VOC ground truth of toolkit.evaluation.voc_gt: equal to what VOCDetection reads, and its
cache: reused while no XML file changes, never when one does (time or size), written atomically,
ignored and rewritten when corrupt."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from toolkit.data.errors import AnnotationError
from toolkit.data.voc import VOC_CLASSES, VOCDetection
from toolkit.evaluation import voc_gt
from toolkit.evaluation.submission import ground_truth_from_voc
from toolkit.evaluation.voc_gt import read_voc_ground_truth

OLD_NS = 1_600_000_000 * 10 ** 9  # 2020: far older than the racy window


def write_xml(path: Path, objects: list[tuple[str, tuple[int, int, int, int], int]]) -> None:
    body = "".join(
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b, difficult in objects
    )
    path.write_text(f"<annotation><filename>{path.stem}.jpg</filename><size><width>100</width>"
                    f"<height>80</height><depth>3</depth></size>{body}</annotation>")


def make_voc(root: Path, num_images: int = 12, seed: int = 0) -> Path:
    """``root/VOCdevkit/VOC2007`` with ``num_images`` random XML files and ``ImageSets/Main/test.txt``;
    every file's time set to 2020 (outside the racy window). Returns the devkit folder."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    ids = [f"{i:06d}" for i in range(num_images)]
    for image_id in ids:
        objects = []
        for _ in range(int(rng.integers(0, 5))):
            x0, y0 = int(rng.integers(1, 50)), int(rng.integers(1, 40))
            box = (x0, y0, x0 + int(rng.integers(0, 50)), y0 + int(rng.integers(0, 40)))
            objects.append((VOC_CLASSES[int(rng.integers(20))], box, int(rng.random() < 0.2)))
        write_xml(voc / "Annotations" / f"{image_id}.xml", objects)
        os.utime(voc / "Annotations" / f"{image_id}.xml", ns=(OLD_NS, OLD_NS))
    (voc / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    return root / "VOCdevkit"


def assert_equal_gt(a, b) -> None:
    assert list(a) == list(b)
    for image_id in a:
        np.testing.assert_array_equal(a[image_id].boxes_voc, b[image_id].boxes_voc)
        np.testing.assert_array_equal(a[image_id].labels, b[image_id].labels)
        np.testing.assert_array_equal(a[image_id].difficult, b[image_id].difficult)


@pytest.fixture
def parse_count(monkeypatch):
    """How many XML files voc_gt parses."""
    calls = []
    real = voc_gt.parse_voc_xml

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(voc_gt, "parse_voc_xml", counting)
    return calls


def test_equals_vocdetection_on_the_fixture(voc_mini, tmp_path):
    dataset = VOCDetection(voc_mini / "VOCdevkit", [("VOC2012", "val")])
    expected = ground_truth_from_voc(dataset)
    for cache in (None, tmp_path):
        for _ in range(2):  # parsed, then (with a cache) read from it
            got = read_voc_ground_truth(voc_mini / "VOCdevkit", "VOC2012", "val", VOC_CLASSES, cache)
            assert_equal_gt(got, expected)


def test_cache_hit_parses_nothing(tmp_path, parse_count):
    devkit = make_voc(tmp_path / "data")
    first = read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=tmp_path / "cache")
    assert len(parse_count) == 12
    assert len(list((tmp_path / "cache" / "voc-gt").glob("*.npz"))) == 1
    parse_count.clear()
    second = read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=tmp_path / "cache")
    assert parse_count == []
    assert_equal_gt(first, second)


def test_touched_or_resized_file_is_read_again(tmp_path, parse_count):
    devkit = make_voc(tmp_path / "data")
    cache = tmp_path / "cache"
    read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=cache)
    xml = devkit / "VOC2007" / "Annotations" / "000003.xml"

    # Same size, other content, another (old) time: the time tells.
    write_xml(xml, [("dog", (11, 12, 13, 14), 0)])
    text = xml.read_text()
    write_xml(xml, [("cat", (11, 12, 13, 14), 0)])
    assert len(xml.read_text()) == len(text)
    os.utime(xml, ns=(OLD_NS + 10 ** 9, OLD_NS + 10 ** 9))
    parse_count.clear()
    gt = read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=cache)
    assert parse_count == ["000003.xml"]
    assert gt["000003"].labels.tolist() == [VOC_CLASSES.index("cat") + 1]

    # Other size, time set back to the cached one: the size tells.
    write_xml(xml, [("cat", (11, 12, 13, 14), 0), ("bus", (1, 2, 30, 40), 1)])
    os.utime(xml, ns=(OLD_NS + 10 ** 9, OLD_NS + 10 ** 9))
    parse_count.clear()
    gt = read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=cache)
    assert parse_count == ["000003.xml"]
    assert gt["000003"].difficult.tolist() == [False, True]

    # A plain touch (time now) and nothing else changed.
    xml.touch()
    parse_count.clear()
    read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=cache)
    assert parse_count == ["000003.xml"]
    # Every result equals a parse without cache.
    assert_equal_gt(read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=cache),
                    read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES))


def test_recently_modified_files_are_not_trusted(tmp_path, parse_count):
    """A file modified just before the cache's stat could change again within its timestamp's tick:
    it is parsed again until it is older than RACY_NS."""
    devkit = make_voc(tmp_path / "data", num_images=3)
    os.utime(devkit / "VOC2007" / "Annotations" / "000001.xml")  # now
    cache = tmp_path / "cache"
    read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=cache)
    parse_count.clear()
    read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=cache)
    assert parse_count == ["000001.xml"]


def test_split_list_changes_reuse_the_other_entries(tmp_path, parse_count):
    devkit = make_voc(tmp_path / "data")
    cache = tmp_path / "cache"
    read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=cache)
    listing = devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt"
    ids = listing.read_text().split()
    listing.write_text("\n".join(ids[::-1][:8] + [ids[-1]]) + "\n")  # reordered, shortened, one id twice
    parse_count.clear()
    gt = read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=cache)
    assert parse_count == []
    assert list(gt) == ids[::-1][:8]
    assert_equal_gt(gt, read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES))


def test_corrupt_or_foreign_cache_is_ignored_and_rewritten(tmp_path, parse_count):
    devkit = make_voc(tmp_path / "data")
    cache = tmp_path / "cache"
    expected = read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=cache)
    (path,) = (cache / "voc-gt").glob("*.npz")
    good = path.read_bytes()

    def changed(name, value) -> bytes:
        arrays = dict(np.load(io.BytesIO(good)))
        arrays[name] = value
        out = io.BytesIO()
        np.savez(out, **arrays)
        return out.getvalue()

    misfit = changed("offsets", np.zeros(3, dtype=np.int64))  # arrays that do not fit together
    other_format = changed("format", np.int64(voc_gt.CACHE_FORMAT + 1))
    for content in (misfit, other_format, good[: len(good) // 2], b"not a zip file", b""):
        path.write_bytes(content)
        parse_count.clear()
        assert_equal_gt(read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=cache), expected)
        assert len(parse_count) == 12
        assert path.read_bytes() != content
        parse_count.clear()
        read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=cache)
        assert parse_count == []  # rewritten whole


def test_a_killed_write_leaves_the_old_cache(tmp_path, monkeypatch, parse_count):
    devkit = make_voc(tmp_path / "data")
    cache = tmp_path / "cache"
    read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=cache)
    (path,) = (cache / "voc-gt").glob("*.npz")
    before = path.read_bytes()
    os.utime(devkit / "VOC2007" / "Annotations" / "000004.xml", ns=(OLD_NS + 5, OLD_NS + 5))

    def dies_midway(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(voc_gt.np, "savez", dies_midway)
    with pytest.warns(UserWarning, match="cannot write the ground-truth cache"):
        read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=cache)
    assert path.read_bytes() == before
    assert sorted(p.name for p in (cache / "voc-gt").iterdir()) == [path.name]  # no temporary file left


def test_errors_name_the_file(tmp_path):
    devkit = make_voc(tmp_path / "data", num_images=4)
    xml = devkit / "VOC2007" / "Annotations" / "000002.xml"
    write_xml(xml, [("unicorn", (1, 1, 5, 5), 0)])
    with pytest.raises(AnnotationError, match=r"000002\.xml: unknown class 'unicorn'"):
        read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=tmp_path / "cache")
    # The same file read from the cache (its objects are cached, labels are not) still names it.
    with pytest.raises(AnnotationError, match=r"000002\.xml: unknown class 'unicorn'"):
        read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=tmp_path / "cache")
    assert read_voc_ground_truth(devkit, "VOC2007", "test", ["unicorn", *VOC_CLASSES],
                                 cache_dir=tmp_path / "cache")["000002"].labels.tolist() == [1]
    xml.unlink()
    with pytest.raises(AnnotationError, match=r"000002\.xml: cannot read annotation"):
        read_voc_ground_truth(devkit, "VOC2007", "test", VOC_CLASSES, cache_dir=tmp_path / "cache")
