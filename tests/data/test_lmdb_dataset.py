"""The SSD-Caffe LMDB dataset against what real Caffe wrote and computed.

Independent references: the LMDBs real ``convert_annoset`` wrote from 20 VOC images
(their XMLs read through :mod:`toolkit.data.voc`, the JPEG files decoded by OpenCV),
and the output blobs of the real ``AnnotatedData`` layer over ``VOC_test10_lmdb``.
Temporary LMDBs for the error cases are written here with ``lmdb`` directly.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from conftest import require_fixture
from toolkit.caffe import caffe_pb2
from toolkit.data import DATASETS, build_dataset
from toolkit.data.caffe_lmdb import (
    LMDBDetection,
    SkippedRecordsWarning,
    caffe_label_blob,
    decode_datum_image,
    decode_record,
    encoded_image_size,
    iter_lmdb,
    normalized_to_pixels,
    pixels_to_normalized,
    record_problem,
)
from toolkit.data.errors import CorruptRecordError, DatasetError, DatasetNotFoundError
from toolkit.data.transforms import PREPROCESS_PRESETS, SSDTestTransform
from toolkit.data.voc import VOC_CLASSES, parse_voc_xml, voc_to_xyxy

ENCODED = ("VOC_trainval10_lmdb", "VOC_test10_lmdb")


def _lmdb(name: str) -> Path:
    return require_fixture(f"lmdb/{name}")


def _labelmap() -> Path:
    return require_fixture("lmdb/labelmap_voc.prototxt")


def _voc_reference(image_rel: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (continuous pixels, via toolkit.data.voc), labels and difficult flags of the XML
    of one list entry, in convert_annoset's order: grouped by label in order of first appearance."""
    root = _lmdb("VOC_test10_lmdb").parent
    xml = root / image_rel.replace("JPEGImages", "Annotations").rsplit(".", 1)[0]
    ann = parse_voc_xml(f"{xml}.xml")
    labels = np.array([VOC_CLASSES.index(o.name) + 1 for o in ann.objects], dtype=np.int64)
    first = {label: i for i, label in reversed(list(enumerate(labels.tolist())))}
    order = sorted(range(len(labels)), key=lambda i: (first[labels[i]], i))
    boxes = voc_to_xyxy(np.array([o.bbox_voc for o in ann.objects]))
    difficult = np.array([o.difficult for o in ann.objects], dtype=bool)
    return boxes[order], labels[order], difficult[order]


def write_lmdb(path: Path, records: list[tuple[bytes, bytes]]) -> Path:
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, value in records:
            txn.put(key, value)
    env.close()
    return path


def fixture_records(name: str = "VOC_test10_lmdb") -> list[tuple[bytes, bytes]]:
    # Through the toolkit's shared environment: py-lmdb refuses a second one in this process.
    return list(iter_lmdb(_lmdb(name)))


def small_record(encoded: bool = True, groups=((3, [(0.1, 0.2, 0.5, 0.6, False)]),), hw=(24, 32)) -> bytes:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    rec = caffe_pb2.AnnotatedDatum(type=caffe_pb2.AnnotatedDatum.BBOX)
    d = rec.datum
    d.channels, d.height, d.width, d.label = 3, hw[0], hw[1], -1
    if encoded:
        d.data, d.encoded = cv2.imencode(".jpg", image)[1].tobytes(), True
    else:
        d.data = np.ascontiguousarray(image.transpose(2, 0, 1)).tobytes()
    for label, boxes in groups:
        g = rec.annotation_group.add(group_label=label)
        for i, (x0, y0, x1, y1, diff) in enumerate(boxes):
            a = g.annotation.add(instance_id=i)
            a.bbox.xmin, a.bbox.ymin, a.bbox.xmax, a.bbox.ymax, a.bbox.difficult = x0, y0, x1, y1, diff
    return rec.SerializeToString()


# ---------------------------------------------------------------------------
# Real convert_annoset LMDBs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ENCODED)
def test_targets_equal_the_voc_xml(name):
    ds = LMDBDetection(_lmdb(name), labelmap=_labelmap())
    assert len(ds) == 10 and ds.classes == ("background", *VOC_CLASSES) and not ds.skipped
    root = _lmdb(name).parent
    for i in range(len(ds)):
        image, target = ds[i]
        image_rel = target["image_id"].split("_", 1)[1]
        assert target["image_id"].startswith(f"{i:08d}_")
        reference = cv2.imdecode(np.fromfile(root / image_rel, dtype=np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(image, reference)
        boxes, labels, difficult = _voc_reference(image_rel)
        # Exactly VOCDetection's pixels: convert_annoset's float32 quotients come back as the integers.
        np.testing.assert_array_equal(target["boxes"].numpy(), boxes)
        np.testing.assert_array_equal(target["labels"].numpy(), labels)
        np.testing.assert_array_equal(target["difficult"].numpy(), difficult)
        assert target["orig_size"].tolist() == list(image.shape[:2])
        annotation = ds.get_annotation(i)
        assert torch.equal(annotation["boxes"], target["boxes"]) and annotation["image_id"] == target["image_id"]


def test_keep_difficult_false_drops_them():
    ds = LMDBDetection(_lmdb("VOC_test10_lmdb"), keep_difficult=False)
    _, target = ds[0]
    assert len(target["labels"]) == 3 and not target["difficult"].any()


def test_raw_records_are_planar_bgr_resized_images():
    ds = LMDBDetection(_lmdb("VOC_test10_raw300_lmdb"), labelmap=_labelmap())
    root = _lmdb("VOC_test10_raw300_lmdb").parent
    for i, (key, value) in enumerate(fixture_records("VOC_test10_raw300_lmdb")):
        image, target = ds[i]
        source = cv2.imread(str(root / key.decode().split("_", 1)[1]))
        np.testing.assert_array_equal(image, cv2.resize(source, (300, 300), interpolation=cv2.INTER_LINEAR))
        stored = caffe_pb2.AnnotatedDatum.FromString(value)
        norm = np.array([[a.bbox.xmin, a.bbox.ymin, a.bbox.xmax, a.bbox.ymax]
                         for g in stored.annotation_group for a in g.annotation], dtype=np.float32)
        # The VOC convention's 1-pixel offset applies at the stored (resized) size; clipped to the image.
        expected = np.clip(norm.astype(np.float64) * 300 - [1, 1, 0, 0], 0, 300)
        np.testing.assert_allclose(target["boxes"].numpy(), expected, rtol=0, atol=1e-4)


def test_label_blob_equals_caffe_exactly():
    ds = LMDBDetection(_lmdb("VOC_test10_lmdb"), labelmap=_labelmap())
    caffe = np.load(require_fixture("lmdb/annotateddata_test_label_blob.npy"))
    targets = [ds.get_annotation(i) for i in range(len(ds))]
    ours = caffe_label_blob(targets, warp_hw=(300, 300))
    assert ours.shape == caffe.shape == (1, 1, 24, 8)
    np.testing.assert_array_equal(ours, caffe)
    # Without Caffe's float32 round trip through the 300x300 warp, a few values are 1 ulp off.
    plain = caffe_label_blob(targets)
    assert 0 < np.abs(plain - caffe).max() <= 6e-8


def test_label_blob_without_boxes_is_one_row_of_minus_one():
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "difficult": torch.zeros(0, dtype=torch.bool), "orig_size": torch.tensor([10, 20])}
    np.testing.assert_array_equal(caffe_label_blob([empty, empty]), np.full((1, 1, 1, 8), -1, np.float32))


def test_test_transform_reproduces_the_caffe_data_blob():
    """TEST phase: LINEAR warp to 300x300, mean 104/117/123, no scale.

    Measured on this machine (OpenCV 4.14 against the fixture's Caffe with OpenCV 4.6):
    max abs diff 0.0 over all 2.7 M values with ``caffe_reencode`` (the JPEG round trip
    Caffe's ``batch_sampler {}`` causes, see ``caffe_crop_reencode``), and up to 31 grey
    levels without it.  Tolerance: 2 grey levels max and 0.05 mean: OpenCV's uint8
    INTER_LINEAR is fixed-point and bit-exact across builds, libjpeg-turbo's default
    (ISLOW) codec is deterministic; the slack only covers a differently built libjpeg.
    """
    caffe = np.load(require_fixture("lmdb/annotateddata_test_data_blob.npy"))
    transform = SSDTestTransform(300, PREPROCESS_PRESETS["ssd"])
    ds = LMDBDetection(_lmdb("VOC_test10_lmdb"), transform=transform, caffe_reencode=True)
    ours = torch.stack([ds[i][0] for i in range(len(ds))]).numpy()
    assert ours.shape == caffe.shape == (10, 3, 300, 300)
    diff = np.abs(ours - caffe)
    assert diff.max() <= 2.0 and diff.mean() <= 0.05, (diff.max(), diff.mean())
    plain = LMDBDetection(_lmdb("VOC_test10_lmdb"), transform=transform)
    assert np.abs(plain[0][0].numpy() - caffe[0]).max() > 2.0  # the re-encode is what makes them agree


def test_box_conventions():
    norm = np.array([[0.25, 0.5, 0.75, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(normalized_to_pixels(norm, 100, 40, "voc"), [[9, 49, 30, 100]])
    np.testing.assert_array_equal(normalized_to_pixels(norm, 100, 40, "continuous"), [[10, 50, 30, 100]])
    for convention in ("voc", "continuous"):
        back = pixels_to_normalized(normalized_to_pixels(norm, 100, 40, convention), 100, 40, convention)
        np.testing.assert_array_equal(back, norm)
    # Clipped to the image (VOC's xmin = 0 would be pixel -1).
    np.testing.assert_array_equal(normalized_to_pixels(np.zeros((1, 4), np.float32), 10, 10, "voc"), [[0, 0, 0, 0]])
    with pytest.raises(ValueError):
        normalized_to_pixels(norm, 10, 10, "pascal")


def test_encoded_image_size_reads_jpeg_and_png_headers():
    value = fixture_records()[0][1]
    data = caffe_pb2.AnnotatedDatum.FromString(value).datum.data
    assert encoded_image_size(data) == (500, 334)
    png = cv2.imencode(".png", np.zeros((7, 11, 3), np.uint8))[1].tobytes()
    assert encoded_image_size(png) == (7, 11)
    assert encoded_image_size(b"BM....") is None and encoded_image_size(data[:100]) is None


# ---------------------------------------------------------------------------
# Plain Datum LMDBs, workers, build_dataset
# ---------------------------------------------------------------------------


def test_plain_datum_records(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    raw = caffe_pb2.Datum(channels=1, height=3, width=4, data=gray.tobytes(), label=7).SerializeToString()
    color = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    png = caffe_pb2.Datum(data=cv2.imencode(".png", color)[1].tobytes(), encoded=True, label=2).SerializeToString()
    ds = LMDBDetection(write_lmdb(tmp_path / "db", [(b"a", raw), (b"b", png)]))
    assert len(ds) == 2
    image, target = ds[0]
    np.testing.assert_array_equal(image, np.repeat(gray[:, :, None], 3, axis=2))
    assert target["boxes"].shape == (0, 4) and target["labels"].dtype == torch.int64
    image, _ = ds[1]
    np.testing.assert_array_equal(image, color)  # PNG is lossless
    assert ds.get_annotation(1)["orig_size"].tolist() == [5, 6]  # no header size: decoded to learn it
    assert decode_record(b"a", raw).annotated is False


class _Probe(Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        image, target = self.ds[i]
        return os.getpid(), self.ds._env_pid, target["image_id"], int(image.sum())


def _as_list(batch):
    return batch


def test_dataloader_workers_open_their_own_environment():
    ds = LMDBDetection(_lmdb("VOC_test10_lmdb"))
    expected = [(t["image_id"], int(im.sum())) for im, t in (ds[i] for i in range(len(ds)))]
    parent_env = ds._env
    assert ds._env_pid == os.getpid()  # the parent has one open: the workers must not use it
    loader = DataLoader(_Probe(ds), batch_size=2, num_workers=2, collate_fn=_as_list,
                        multiprocessing_context="fork")
    seen = [item for batch in loader for item in batch]
    assert [(key, total) for _, _, key, total in seen] == expected
    assert all(pid == env_pid != os.getpid() for pid, env_pid, _, _ in seen)
    assert len({pid for pid, *_ in seen}) == 2
    assert ds._env is parent_env and ds[3][1]["image_id"] == expected[3][0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._env is None and clone[5][1]["image_id"] == expected[5][0]


def test_build_dataset_lmdb_spec():
    train, test = _lmdb("VOC_trainval10_lmdb"), _lmdb("VOC_test10_lmdb")
    name = f"lmdb:{train},labelmap={_labelmap()},test={test}"
    # What toolkit/train.py does with --dataset.
    assert DATASETS[name].test == str(test) and name not in DATASETS
    assert DATASETS[f"lmdb:{train}"].test is None
    ds = build_dataset(name, "train", root="/nonexistent")
    assert isinstance(ds, LMDBDetection) and ds.path == train and ds.classes[1] == "aeroplane"
    assert build_dataset(name, "test").path == test
    with pytest.raises(ValueError, match="test=PATH"):
        build_dataset(f"lmdb:{train}", "test")
    with pytest.raises(ValueError, match="bad option"):
        build_dataset(f"lmdb:{train},labelmpa=x", "train")
    with pytest.raises(KeyError):
        DATASETS["lmdb"]
    assert build_dataset(f"lmdb:{train},strict=1,boxes=continuous").strict


def test_missing_and_foreign_paths(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="not found"):
        LMDBDetection(tmp_path / "nope")
    (tmp_path / "leveldb").mkdir()
    (tmp_path / "leveldb" / "CURRENT").write_text("MANIFEST-000001\n")
    with pytest.raises(DatasetNotFoundError, match="LevelDB"):
        LMDBDetection(tmp_path / "leveldb")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "data.mdb").write_bytes(b"not an lmdb" * 100)
    with pytest.raises(DatasetError, match="junk"):
        LMDBDetection(tmp_path / "junk")


# ---------------------------------------------------------------------------
# Corrupt records
# ---------------------------------------------------------------------------


def _corrupt_lmdb(tmp_path: Path) -> Path:
    good = fixture_records()[:3]
    short = caffe_pb2.AnnotatedDatum.FromString(small_record(encoded=False))
    short.datum.data = short.datum.data[:-50]
    undecodable = caffe_pb2.AnnotatedDatum.FromString(small_record())
    undecodable.datum.data = b"\xff\xd8\xff" + b"\x00" * 40
    records = good + [
        (b"00000003_bad_protobuf", b"\x0a\xff\xff\xff\x0f garbage"),
        (b"00000004_out_of_range", small_record(groups=((3, [(0.1, 0.2, 1.5, 0.6, False)]),))),
        (b"00000005_inverted", small_record(groups=((3, [(0.6, 0.2, 0.5, 0.6, False)]),))),
        (b"00000006_label_99", small_record(groups=((99, [(0.1, 0.2, 0.5, 0.6, False)]),))),
        (b"00000007_raw_too_short", short.SerializeToString()),
        (b"00000008_undecodable_image", undecodable.SerializeToString()),
        (b"00000009_good", small_record()),
    ]
    return write_lmdb(tmp_path / "db", records)


SCAN_CORRUPT = ("00000003_bad_protobuf", "00000004_out_of_range", "00000005_inverted", "00000006_label_99",
                "00000007_raw_too_short")


def test_corrupt_records_are_skipped_and_listed(tmp_path):
    path = _corrupt_lmdb(tmp_path)
    with pytest.warns(SkippedRecordsWarning) as caught:
        ds = LMDBDetection(path)
    message = str(caught[0].message)
    assert f"skipped {len(SCAN_CORRUPT)} corrupt record(s) of 10" in message
    for key in SCAN_CORRUPT:
        assert repr(key) in message and key in ds.skipped
    assert "out of range" in ds.skipped["00000004_out_of_range"]
    assert "inverted" in ds.skipped["00000005_inverted"]
    assert "1..20" in ds.skipped["00000006_label_99"]
    assert "needs 2304 bytes" in ds.skipped["00000007_raw_too_short"]
    assert len(ds) == 5 and ds.image_ids[3] == "00000008_undecodable_image"
    # The undecodable image is found when read: skipped with a warning naming it, the next record instead.
    with pytest.warns(SkippedRecordsWarning, match="00000008_undecodable_image"):
        _, target = ds[3]
    assert target["image_id"] == "00000009_good" and "00000008_undecodable_image" in ds.skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[3][1]["image_id"] == "00000009_good"  # remembered: no second warning


def test_strict_names_the_corrupt_record(tmp_path):
    path = _corrupt_lmdb(tmp_path)
    with pytest.raises(CorruptRecordError, match="'00000003_bad_protobuf'") as exc:
        LMDBDetection(path, strict=True)
    assert str(path) in str(exc.value) and isinstance(exc.value, DatasetError)
    with pytest.warns(SkippedRecordsWarning, match="00000008_undecodable_image"):
        LMDBDetection(path, validate_images=True)
    only_image = write_lmdb(tmp_path / "db2", [(b"a", small_record()),
                                               (b"b", _with_data(small_record(), b"\xff\xd8\xffjunk"))])
    ds = LMDBDetection(only_image, strict=True)
    with pytest.raises(CorruptRecordError, match="'b'.*cannot be decoded"):
        ds[1]


def _with_data(value: bytes, data: bytes) -> bytes:
    rec = caffe_pb2.AnnotatedDatum.FromString(value)
    rec.datum.data = data
    return rec.SerializeToString()


def test_image_header_disagreeing_with_the_datum_is_corrupt():
    rec = decode_record(b"k", small_record())
    rec.anno.datum.height = 99
    assert "says 99x32" in record_problem(rec)
    huge = bytearray(rec.datum.data)
    sof = huge.index(b"\xff\xc0")
    huge[sof + 5:sof + 9] = (30000).to_bytes(2, "big") * 2
    rec.anno.datum.data = bytes(huge)
    assert "30000x30000" in record_problem(rec)
    with pytest.raises(CorruptRecordError, match="more than"):
        decode_datum_image(rec.datum, "k")


# ---------------------------------------------------------------------------
# Fuzz: mutated records never crash the reader
# ---------------------------------------------------------------------------

_BASES = [
    small_record(groups=((3, [(0.1, 0.2, 0.5, 0.6, False), (0.0, 0.0, 1.0, 1.0, True)]), (7, []))),
    small_record(encoded=False, hw=(6, 5)),
    caffe_pb2.Datum(channels=1, height=2, width=3, data=bytes(6), label=4).SerializeToString(),
]


@st.composite
def mutated_value(draw):
    base = draw(st.sampled_from(_BASES))
    value = bytearray(base)
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(value) - 1))
        value[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        value = value[: draw(st.integers(0, len(value)))]
    if draw(st.integers(0, 3)) == 0:
        pos = draw(st.integers(0, len(value)))
        value[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(value)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(values=st.lists(mutated_value(), min_size=1, max_size=3), strict=st.booleans())
def test_fuzzed_records_raise_only_toolkit_errors(values, strict):
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedRecordsWarning)
        path = write_lmdb(Path(tmp) / "db", [(f"k{i}".encode(), v) for i, v in enumerate(values)])
        try:
            ds = LMDBDetection(path, strict=strict, labelmap=None)
        except DatasetError:
            return  # a corrupt record under strict, or nothing usable: the toolkit's own error
        for i in range(len(ds)):
            try:
                image, target = ds[i]
                assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
                assert target["boxes"].shape == (len(target["labels"]), 4)
                assert torch.isfinite(target["boxes"]).all()
                ds.get_annotation(i)
                caffe_label_blob([target])
            except DatasetError:
                pass
