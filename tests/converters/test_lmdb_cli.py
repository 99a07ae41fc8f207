"""``python -m converters.lmdb`` against LMDBs that real SSD-Caffe ``convert_annoset`` wrote.

Independent references: the fixture LMDBs and their ``*.records.json`` (every
record decoded by real SSD ``caffe_pb2``), written by ``convert_annoset`` with the
flags in ``COMMANDS.txt`` from the fixture ``VOC/`` folder; the read-back goes
through the toolkit's VOC and COCO readers (pycocotools).  The ``convert_annoset``
quirks that the fixtures do not exercise are checked against small XMLs written
here, as SSD's ``ReadXMLToAnnotatedDatum`` source reads them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest

from conftest import REPO_ROOT, require_fixture
from converters.lmdb.__main__ import main
from converters.lmdb.annoset import AnnosetOptions, convert_annoset, ptree_int
from toolkit.caffe import caffe_pb2
from toolkit.data.caffe_lmdb import LMDBDetection, iter_lmdb
from toolkit.data.coco import COCODetection
from toolkit.data.errors import AnnotationError
from toolkit.data.labelmap import read_labelmap
from toolkit.data.voc import VOCDetection

FIXTURES = {
    "VOC_trainval10_lmdb": ("trainval.txt", []),
    "VOC_test10_lmdb": ("test.txt", []),
    "VOC_test10_raw300_lmdb": ("test.txt", ["--raw", "--resize-height", "300", "--resize-width", "300"]),
}


def _fx(relative: str) -> Path:
    return require_fixture(f"lmdb/{relative}")


def _records(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def _no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ---------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_inspect_json_equals_the_fixture_records(name, tmp_path):
    out = tmp_path / "records.json"
    assert main(["inspect", str(_fx(name)), "--json", str(out), "--quiet"]) == 0
    expected = _fx(f"{name}.records.json")
    assert _records(out) == _records(expected)
    assert out.read_bytes() == expected.read_bytes()  # the same layout, too


def test_inspect_summary(capsys):
    assert main(["inspect", str(_fx("VOC_test10_lmdb")), "--labelmap", str(_fx("labelmap_voc.prototxt"))]) == 0
    text = capsys.readouterr().out
    assert "10 record(s)" in text and "10 AnnotatedDatum" in text and "10 JPEG" in text
    assert "boxes: 24 (5 difficult)" in text
    person = next(line for line in text.splitlines() if "person" in line)
    assert person.split()[-2:] == ["8", "1"]
    assert main(["inspect", str(_fx("VOC_test10_raw300_lmdb"))]) == 0
    assert "10 raw 3-channel" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# from-voc: convert_annoset, record for record
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_from_voc_reproduces_convert_annoset(name, tmp_path):
    list_name, flags = FIXTURES[name]
    root = _fx("VOC").parent
    out = tmp_path / "out_lmdb"
    argv = ["from-voc", str(root), str(_fx(list_name)), str(out), "--labelmap", str(_fx("labelmap_voc.prototxt")),
            "--quiet", *flags]
    assert main(argv) == 0
    assert _no_temporaries(tmp_path)
    assert main(["inspect", str(out), "--json", str(tmp_path / "ours.json"), "--quiet"]) == 0
    ours, caffe = _records(tmp_path / "ours.json"), _records(_fx(f"{name}.records.json"))
    # Decoded records: keys, datum headers, data hashes (encoded: the JPEG files' own bytes;
    # raw: the OpenCV LINEAR resize, planar BGR), normalized boxes, instance ids, groups.
    strip = [{k: v for k, v in r.items() if not k.startswith("value_")} for r in ours]
    assert strip == [{k: v for k, v in r.items() if not k.startswith("value_")} for r in caffe]
    # And the serialized values are byte-identical to convert_annoset's.
    assert [r["value_sha256"] for r in ours] == [r["value_sha256"] for r in caffe]


def test_command_line_errors_are_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    ok = subprocess.run(
        [sys.executable, "-m", "converters.lmdb", "inspect", str(_fx("VOC_test10_lmdb")), "--json",
         str(tmp_path / "r.json"), "--quiet"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert _records(tmp_path / "r.json") == _records(_fx("VOC_test10_lmdb.records.json"))
    bad = subprocess.run(
        [sys.executable, "-m", "converters.lmdb", "from-voc", str(_fx("VOC").parent), str(_fx("test.txt")),
         str(tmp_path / "db"), "--labelmap", str(tmp_path / "missing.prototxt")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: ") and "missing.prototxt" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "db").exists()


def test_usage_errors(tmp_path, capsys):
    base = ["from-voc", str(_fx("VOC").parent), str(_fx("test.txt")), str(tmp_path / "db"),
            "--labelmap", str(_fx("labelmap_voc.prototxt")), "--quiet"]
    assert main(base + ["--raw", "--encode-type", "png"]) == 1
    assert main(base + ["--resize-height", "300"]) == 1
    err = capsys.readouterr().err
    assert "--encode-type" in err and "both height and width" in err
    with pytest.raises(SystemExit):
        main(base + ["--raw", "--encoded"])
    assert not (tmp_path / "db").exists()


# ---------------------------------------------------------------------------
# Outputs appear complete or not at all
# ---------------------------------------------------------------------------


def _voc_copy(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "src"
    shutil.copytree(_fx("VOC"), root / "VOC")
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.copy(_fx("test.txt"), root / "test.txt")
    return root, root / "test.txt"


def test_failed_conversion_leaves_no_lmdb(tmp_path, capsys):
    root, list_file = _voc_copy(tmp_path)
    xml = root / "VOC/Annotations/2007_000241.xml"  # the 5th line of test.txt
    xml.write_text(xml.read_text().replace("<name>boat</name>", "<name>spaceship</name>", 1))
    out = tmp_path / "db"
    assert main(["from-voc", str(root), str(list_file), str(out), "--labelmap", str(_fx("labelmap_voc.prototxt")),
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "2007_000241.xml" in err and "spaceship" in err
    assert not out.exists() and _no_temporaries(tmp_path)


_KILL_SCRIPT = """
import os, signal, sys
import converters.lmdb.annoset as annoset
annoset.COMMIT_EVERY = 2  # some records are committed to the temporary LMDB before the kill
put, count = annoset._Writer.put, [0]
def killing_put(self, key, value):
    put(self, key, value)
    count[0] += 1
    if count[0] == 5:
        os.kill(os.getpid(), signal.SIGKILL)
annoset._Writer.put = killing_put
from converters.lmdb.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_conversion_leaves_no_lmdb(tmp_path):
    out = tmp_path / "db"
    argv = ["from-voc", str(_fx("VOC").parent), str(_fx("test.txt")), str(out),
            "--labelmap", str(_fx("labelmap_voc.prototxt")), "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    killed = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, *argv], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".db.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "data.mdb").is_file()  # a kill -9 cannot clean up
    assert main(argv) == 0  # the next run removes the dead process's temporary
    assert out.is_dir() and _no_temporaries(tmp_path)
    assert len(list(iter_lmdb(out))) == 10


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "db"
    argv = ["from-voc", str(_fx("VOC").parent), str(_fx("trainval.txt")), str(out),
            "--labelmap", str(_fx("labelmap_voc.prototxt")), "--quiet"]
    assert main(argv) == 0
    assert main(argv[:2] + [str(_fx("test.txt"))] + argv[3:]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert next(iter_lmdb(out))[0].endswith(b"2007_000027.jpg")  # untouched
    assert main(argv[:2] + [str(_fx("test.txt"))] + argv[3:] + ["--overwrite"]) == 0
    assert next(iter_lmdb(out))[0].endswith(b"2007_000129.jpg") and _no_temporaries(tmp_path)


# ---------------------------------------------------------------------------
# to-voc / to-coco read back with the toolkit's readers
# ---------------------------------------------------------------------------


def test_to_voc_reads_back_with_vocdetection(tmp_path):
    labelmap = _fx("labelmap_voc.prototxt")
    out = tmp_path / "VOCX"
    assert main(["to-voc", str(_fx("VOC_test10_lmdb")), str(out), "--labelmap", str(labelmap), "--quiet"]) == 0
    lm = LMDBDetection(_fx("VOC_test10_lmdb"), labelmap=labelmap)
    voc = VOCDetection(out, [("VOCX", "trainval")], classes=read_labelmap(labelmap).foreground)
    assert len(voc) == len(lm) == 10
    for i in range(len(lm)):
        _, expected = lm[i]
        _, got = voc[i]
        assert got["image_id"] == Path(expected["image_id"].split("_", 1)[1]).stem
        for field in ("boxes", "labels", "difficult", "orig_size"):
            assert got[field].tolist() == expected[field].tolist(), (i, field)
        source = _fx("VOC").parent / expected["image_id"].split("_", 1)[1]
        assert voc.image_path(i).read_bytes() == source.read_bytes()  # JPEG records are copied as they are
    # The list from-voc takes rebuilds the same records (only the keys' paths differ).
    again = tmp_path / "again"
    assert main(["from-voc", str(out), str(out / "trainval_annoset.txt"), str(again), "--labelmap", str(labelmap),
                 "--quiet"]) == 0
    for (key_a, value_a), (key_b, value_b) in zip(iter_lmdb(_fx("VOC_test10_lmdb")), iter_lmdb(again), strict=True):
        assert key_a[:9] == key_b[:9] and value_a == value_b


@pytest.mark.parametrize("name", ["VOC_test10_lmdb", "VOC_test10_raw300_lmdb"])
def test_to_coco_reads_back_with_cocodetection(name, tmp_path):
    labelmap = _fx("labelmap_voc.prototxt")
    out, images = tmp_path / "instances.json", tmp_path / "images"
    assert main(["to-coco", str(_fx(name)), str(out), "--images-dir", str(images), "--labelmap", str(labelmap),
                 "--quiet"]) == 0
    lm = LMDBDetection(_fx(name), labelmap=labelmap)
    coco = COCODetection(images, out)
    assert coco.classes == lm.classes and len(coco) == len(lm)
    for i in range(len(lm)):
        image, expected = lm[i]
        got = coco.get_annotation(i)
        # COCO stores [x, y, w, h]; x + w comes back within float32 rounding.
        np.testing.assert_allclose(got["boxes"].numpy(), expected["boxes"].numpy(), rtol=0, atol=1e-4)
        assert got["labels"].tolist() == expected["labels"].tolist()
        assert got["orig_size"].tolist() == list(image.shape[:2])
    assert {a["difficult"] for a in coco.coco.dataset["annotations"]} == {False, True}


# ---------------------------------------------------------------------------
# Corrupt records in the CLI
# ---------------------------------------------------------------------------


def _corrupt_copy(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt_lmdb"
    env = lmdb.open(str(path), map_size=1 << 26)
    records = list(iter_lmdb(_fx("VOC_test10_lmdb")))[:3]
    undecodable = caffe_pb2.AnnotatedDatum.FromString(records[0][1])
    undecodable.datum.data = b"\xff\xd8\xff" + b"\x00" * 30
    with env.begin(write=True) as txn:
        for key, value in records:
            txn.put(key, value)
        txn.put(b"00000003_bad", b"\x0a\xff\xff\xff\x0f not a protobuf")
        txn.put(b"00000004_undecodable", undecodable.SerializeToString())
    env.close()
    return path


def test_corrupt_records_are_skipped_and_listed(tmp_path, capsys):
    path = _corrupt_copy(tmp_path)
    assert main(["inspect", str(path), "--json", str(tmp_path / "r.json"), "--quiet"]) == 0
    assert [r["key"] for r in _records(tmp_path / "r.json")][-1] == "00000004_undecodable"
    assert "'00000003_bad'" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CLI lists them itself, once
        assert main(["to-voc", str(path), str(tmp_path / "voc"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "wrote 3 image(s)" in captured.out
    assert "skipped 2 corrupt record(s)" in captured.err
    assert "'00000003_bad'" in captured.err and "'00000004_undecodable'" in captured.err
    assert main(["to-voc", str(path), str(tmp_path / "voc2"), "--strict", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'00000003_bad'" in err and not (tmp_path / "voc2").exists()
    assert main(["inspect", str(path), "--strict"]) == 1


# ---------------------------------------------------------------------------
# convert_annoset quirks (ReadXMLToAnnotatedDatum / ReadImageToDatum)
# ---------------------------------------------------------------------------


def _write_image(path: Path, hw=(20, 30), seed=0) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(path.suffix, image)[1].tobytes())
    return cv2.imread(str(path))


def _xml(objects: str, size: str = "<size><width>30</width><height>20</height><depth>3</depth></size>") -> str:
    return f"<annotation><filename>x.jpg</filename>{size}{objects}</annotation>"


def _obj(name: str, box=("1", "2", "10", "20"), difficult: str = "0", difficult_after: bool = False) -> str:
    bnd = "<bndbox>" + "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box)) + "</bndbox>"
    diff = f"<difficult>{difficult}</difficult>"
    return f"<object><name>{name}</name>{bnd + diff if difficult_after else diff + bnd}</object>"


def _convert(tmp_path: Path, lines: list[str], options=AnnosetOptions(), name="db") -> list:
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    convert_annoset(tmp_path, tmp_path / "list.txt", tmp_path / name, _fx("labelmap_voc.prototxt"), options,
                    progress=False)
    return [(k.decode(), caffe_pb2.AnnotatedDatum.FromString(v)) for k, v in iter_lmdb(tmp_path / name)]


def test_xml_reading_quirks(tmp_path):
    _write_image(tmp_path / "a.jpg")
    objects = (_obj("dog", ("1", "2", "10.5", "20")) + _obj("cat") + _obj("dog", difficult="1")
               + _obj("dog", difficult="1", difficult_after=True) + _obj("cat", difficult=" 1"))
    (tmp_path / "a.xml").write_text(_xml(objects))
    [(key, rec)] = _convert(tmp_path, ["a.jpg a.xml"])
    assert key == "00000000_a.jpg" and rec.type == caffe_pb2.AnnotatedDatum.BBOX and rec.datum.label == -1
    dog, cat = rec.annotation_group
    assert (dog.group_label, cat.group_label) == (12, 8)  # in order of first appearance
    assert [a.instance_id for a in dog.annotation] == [0, 1, 2] and [a.instance_id for a in cat.annotation] == [0, 1]
    first = dog.annotation[0].bbox
    assert first.xmax == 0.0  # "10.5" is not an integer: ptree's get(path, 0) gives 0
    assert (first.xmin, first.ymin, first.ymax) == (np.float32(1) / np.float32(30), np.float32(2) / np.float32(20), 1.0)
    # <difficult> applies to boxes after it; only the exact text "1" counts.
    assert [a.bbox.difficult for a in dog.annotation] == [False, True, False]
    assert [a.bbox.difficult for a in cat.annotation] == [False, False]


def test_missing_xml_size_unreadable_image_and_unknown_class(tmp_path):
    _write_image(tmp_path / "a.jpg", hw=(40, 50))
    _write_image(tmp_path / "c.jpg")
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    (tmp_path / "a.xml").write_text(_xml(_obj("person", ("5", "4", "25", "40")), size=""))
    records = _convert(tmp_path, ["a.jpg a.xml", "b.jpg b.xml", "c.jpg missing.xml"])
    # The unreadable image is skipped and its index is not reused; a missing XML gives no boxes.
    assert [k for k, _ in records] == ["00000000_a.jpg", "00000002_c.jpg"]
    bbox = records[0][1].annotation_group[0].annotation[0].bbox
    assert (bbox.xmin, bbox.ymax) == (np.float32(5) / np.float32(50), 1.0)  # normalized by the image's 50x40
    assert len(records[1][1].annotation_group) == 0
    (tmp_path / "a.xml").write_text(_xml(_obj("unicorn")))
    with pytest.raises(AnnotationError, match="unicorn"):
        _convert(tmp_path, ["a.jpg a.xml"], name="db2")
    assert not (tmp_path / "db2").exists()


def test_encodings_resize_and_shuffle(tmp_path):
    source = _write_image(tmp_path / "a.jpg", hw=(20, 30))
    (tmp_path / "a.xml").write_text(_xml(_obj("dog")))
    [(_, png)] = _convert(tmp_path, ["a.jpg a.xml"], AnnosetOptions(encode_type="png"), name="png")
    assert png.datum.encoded and png.datum.data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(png.datum.data, np.uint8), cv2.IMREAD_COLOR), source)
    [(_, small)] = _convert(tmp_path, ["a.jpg a.xml"], AnnosetOptions(resize_height=8, resize_width=12), name="rs")
    decoded = cv2.imdecode(np.frombuffer(small.datum.data, np.uint8), cv2.IMREAD_COLOR)
    assert (small.datum.height, small.datum.width) == decoded.shape[:2] == (8, 12)
    assert small.datum.data != (tmp_path / "a.jpg").read_bytes()
    # Boxes stay normalized by the XML's size, whatever the stored size.
    assert small.annotation_group[0].annotation[0].bbox.xmax == np.float32(10) / np.float32(30)
    for name in "bcde":
        shutil.copy(tmp_path / "a.jpg", tmp_path / f"{name}.jpg")
    lines = [f"{n}.jpg a.xml" for n in "abcde"]
    shuffled = [k for k, _ in _convert(tmp_path, lines, AnnosetOptions(shuffle=True, seed=3), name="s1")]
    again = [k for k, _ in _convert(tmp_path, lines, AnnosetOptions(shuffle=True, seed=3), name="s2")]
    assert shuffled == again and sorted(k[9:] for k in shuffled) == [f"{n}.jpg" for n in "abcde"]
    assert [k[:9] for k in shuffled] == [f"{i:08d}_" for i in range(5)]


def test_ptree_int():
    assert [ptree_int(t) for t in ("12", " 12\n", "+3", "-4", "1.0", "12a", "", None, "99999999999")] == [
        12, 12, 3, -4, None, None, None, None, None]


def test_inspect_plain_datum_records(tmp_path, capsys):
    path = tmp_path / "classification_lmdb"
    env = lmdb.open(str(path), map_size=1 << 24)
    datum = caffe_pb2.Datum(channels=1, height=2, width=3, data=bytes(range(6)), label=4)
    with env.begin(write=True) as txn:
        txn.put(b"00000000_a.png", datum.SerializeToString())
    env.close()
    assert main(["inspect", str(path), "--json", str(tmp_path / "r.json"), "--quiet"]) == 0
    [entry] = _records(tmp_path / "r.json")
    assert entry["type"] is None and entry["annotation_group"] == []
    assert entry["datum"] == {"channels": 1, "height": 2, "width": 3, "encoded": False, "label": 4, "data_len": 6,
                              "data_sha256": "17e88db187afd62c16e5debf3e6527cd006bc012bc90b51a810cd80c2d511f43"}
    assert main(["inspect", str(path)]) == 0
    assert "1 Datum" in capsys.readouterr().out
