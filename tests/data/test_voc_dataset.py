"""VOC reading against the 60 real VOC2012 XMLs (checked with an independent DOM parse),
the coordinate convention, named splits, and the errors on bad input."""

from __future__ import annotations

import shutil
import xml.dom.minidom

import numpy as np
import pytest
import torch

from toolkit.data import DATASETS, VOC_SPLITS, build_dataset
from toolkit.data.errors import AnnotationError, DatasetNotFoundError, ImageReadError
from toolkit.data.voc import VOC_CLASSES, VOCDetection, parse_voc_xml, voc_to_xyxy, xyxy_to_voc


def _dom_objects(path):
    """Independent reading: minidom, direct <object> children of the root, their direct <bndbox>."""
    doc = xml.dom.minidom.parse(str(path))
    root = doc.documentElement
    out = []
    for obj in (n for n in root.childNodes if n.nodeName == "object"):
        def child(node, tag):
            return next(n for n in node.childNodes if n.nodeName == tag)

        name = child(obj, "name").firstChild.data.strip()
        bnd = child(obj, "bndbox")
        box = [float(child(bnd, t).firstChild.data) for t in ("xmin", "ymin", "xmax", "ymax")]
        diff_nodes = [n for n in obj.childNodes if n.nodeName == "difficult"]
        difficult = bool(int(diff_nodes[0].firstChild.data)) if diff_nodes else False
        out.append((name, box, difficult))
    size = child(root, "size")
    w = int(child(size, "width").firstChild.data)
    h = int(child(size, "height").firstChild.data)
    return out, (h, w)


def test_all_60_real_xmls_parse(voc_mini):
    files = sorted((voc_mini / "VOCdevkit/VOC2012/Annotations").glob("*.xml"))
    assert len(files) == 60
    n_objects = n_difficult = 0
    for path in files:
        ann = parse_voc_xml(path)
        expected, (h, w) = _dom_objects(path)
        assert (ann.height, ann.width) == (h, w)
        got = [(o.name, list(o.bbox_voc), o.difficult) for o in ann.objects]
        assert got == expected, path.name
        n_objects += len(got)
        n_difficult += sum(d for _, _, d in got)
    assert n_objects > 60 and n_difficult > 0  # the fixture has difficult objects


def test_dataset_targets_follow_the_convention(voc_mini):
    ds = VOCDetection(voc_mini / "VOCdevkit", [("VOC2012", "val")])
    assert len(ds) == 60
    assert ds.classes == ("background", *VOC_CLASSES)
    for i in (0, 7, 31, 59):
        image, target = ds[i]
        expected, (h, w) = _dom_objects(ds.annotation_path(i))
        assert image.shape == (h, w, 3) and image.dtype == np.uint8
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert target["difficult"].dtype == torch.bool
        voc = np.array([b for _, b, _ in expected]).reshape(-1, 4)
        # 1-based inclusive → continuous: (xmin - 1, ymin - 1, xmax, ymax)
        np.testing.assert_array_equal(target["boxes"].numpy(), voc - np.array([1, 1, 0, 0]))
        assert target["labels"].tolist() == [VOC_CLASSES.index(n) + 1 for n, _, _ in expected]
        assert target["difficult"].tolist() == [d for _, _, d in expected]
        assert target["orig_size"].tolist() == [h, w]
        assert target["image_id"] == ds.image_ids[i]
        assert (target["boxes"][:, 2:] <= torch.tensor([w, h])).all() and (target["boxes"] >= 0).all()


def test_keep_difficult_false_drops_them(voc_mini):
    keep = VOCDetection(voc_mini / "VOCdevkit", [("VOC2012", "val")])
    drop = VOCDetection(voc_mini / "VOCdevkit", [("VOC2012", "val")], keep_difficult=False)
    total_keep = sum(len(keep.get_annotation(i)["labels"]) for i in range(len(keep)))
    total_drop = sum(len(drop.get_annotation(i)["labels"]) for i in range(len(drop)))
    n_difficult = sum(int(keep.get_annotation(i)["difficult"].sum()) for i in range(len(keep)))
    assert total_drop == total_keep - n_difficult and n_difficult > 0


def test_conversion_roundtrip():
    voc = np.array([[1, 1, 10, 20], [5.5, 3, 7, 9]])
    xyxy = voc_to_xyxy(voc)
    np.testing.assert_array_equal(xyxy, [[0, 0, 10, 20], [4.5, 2, 7, 9]])
    np.testing.assert_array_equal(xyxy_to_voc(xyxy), voc)
    # VOC's +1 area equals the continuous area.
    assert (voc[0, 2] - voc[0, 0] + 1) * (voc[0, 3] - voc[0, 1] + 1) == (xyxy[0, 2] - xyxy[0, 0]) * (xyxy[0, 3] - xyxy[0, 1])


def test_named_splits_and_presets():
    assert VOC_SPLITS["voc0712"] == (("VOC2007", "trainval"), ("VOC2012", "trainval"))
    assert VOC_SPLITS["voc0712plus"] == (("VOC2007", "trainval"), ("VOC2007", "test"), ("VOC2012", "trainval"))
    for name in ("voc07trainval", "voc07test", "voc12trainval", "voc12val", "voc0712", "voc0712plus"):
        assert name in DATASETS
    assert DATASETS["voc0712"].test == "voc07test"


def _make_voc(tmp_path, voc_mini, n=3):
    src = voc_mini / "VOCdevkit/VOC2012"
    dst = tmp_path / "VOCdevkit/VOC2007"
    ids = (src / "ImageSets/Main/val.txt").read_text().split()[:n]
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (dst / sub).mkdir(parents=True)
    for i in ids:
        shutil.copy(src / f"Annotations/{i}.xml", dst / f"Annotations/{i}.xml")
        shutil.copy(src / f"JPEGImages/{i}.jpg", dst / f"JPEGImages/{i}.jpg")
    (dst / "ImageSets/Main/trainval.txt").write_text("\n".join(ids) + "\n")
    (dst / "ImageSets/Main/test.txt").write_text("\n".join(ids) + "\n")
    return dst, ids


def test_build_dataset_reads_the_layout(tmp_path, voc_mini):
    _make_voc(tmp_path, voc_mini)
    ds = build_dataset("voc07", "train", root=tmp_path)
    assert len(ds) == 3
    assert len(build_dataset("voc07test", "test", root=tmp_path)) == 3


def test_missing_dataset_names_path_and_readme(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("voc0712", "train", root=tmp_path)
    assert str(tmp_path / "VOCdevkit" / "VOC2007") in str(err.value)
    assert "data/README.md" in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="data/README.md"):
        build_dataset("coco", "test", root=tmp_path)
    with pytest.raises(ValueError, match="no test split"):
        build_dataset("voc0712plus", "test", root=tmp_path)


def test_missing_split_list_names_it(tmp_path, voc_mini):
    _make_voc(tmp_path, voc_mini)
    with pytest.raises(DatasetNotFoundError, match=r"ImageSets/Main/nosuch\.txt"):
        VOCDetection(tmp_path / "VOCdevkit", [("VOC2007", "nosuch")])


def test_malformed_xml_names_the_file(tmp_path, voc_mini):
    dst, ids = _make_voc(tmp_path, voc_mini)
    bad = dst / f"Annotations/{ids[1]}.xml"
    bad.write_text(bad.read_text()[:150])
    ds = VOCDetection(tmp_path / "VOCdevkit", [("VOC2007", "trainval")])
    ds[0]
    with pytest.raises(AnnotationError, match=rf"{ids[1]}\.xml: malformed XML"):
        ds[1]


def test_non_numeric_and_unknown_class_name_the_file(tmp_path, voc_mini):
    dst, ids = _make_voc(tmp_path, voc_mini)
    path = dst / f"Annotations/{ids[0]}.xml"
    text = path.read_text()
    start = text.index("<xmin>") + len("<xmin>")
    path.write_text(text[:start] + "abc" + text[text.index("</xmin>"):])
    with pytest.raises(AnnotationError, match=rf"{ids[0]}\.xml: <xmin> is not a number"):
        parse_voc_xml(path)
    path.write_text(text.replace("<name>", "<name>zebra_", 1))
    ds = VOCDetection(tmp_path / "VOCdevkit", [("VOC2007", "trainval")])
    with pytest.raises(AnnotationError, match=rf"{ids[0]}\.xml: unknown class 'zebra_"):
        ds[0]


def test_corrupt_or_missing_image_names_the_file(tmp_path, voc_mini):
    dst, ids = _make_voc(tmp_path, voc_mini)
    (dst / f"JPEGImages/{ids[0]}.jpg").write_bytes(b"not a jpeg at all")
    (dst / f"JPEGImages/{ids[1]}.jpg").unlink()
    ds = VOCDetection(tmp_path / "VOCdevkit", [("VOC2007", "trainval")])
    with pytest.raises(ImageReadError, match=rf"{ids[0]}\.jpg: not a decodable image"):
        ds[0]
    with pytest.raises(ImageReadError, match=rf"{ids[1]}\.jpg: cannot read image"):
        ds[1]


def test_class_names_from_a_caffe_labelmap(tmp_path, voc_mini):
    from conftest import require_fixture

    _make_voc(tmp_path, voc_mini)
    labelmap = require_fixture("caffe/prototxt/labelmap_voc.prototxt")
    ds = build_dataset("voc07", "train", root=tmp_path, labelmap=labelmap)
    assert ds.classes == ("background", *VOC_CLASSES)
    # A labelmap that lacks a class present in the XML is an error naming the file.
    short = tmp_path / "short.prototxt"
    short.write_text('item { name: "none_of_the_above" label: 0 display_name: "background" }\n'
                     'item { name: "cat" label: 1 display_name: "cat" }\n')
    ds = build_dataset("voc07", "train", root=tmp_path, labelmap=short)
    assert ds.classes == ("background", "cat")
    with pytest.raises(AnnotationError, match="unknown class"):
        for i in range(len(ds)):
            ds.get_annotation(i)
