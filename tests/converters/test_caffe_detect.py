"""``python -m converters.caffe detect | evaluate`` against real SSD-Caffe's detections, and their errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import require_fixture
from converters.caffe.__main__ import main
from converters.caffe.detect import (
    evaluate_dataset,
    hints_from_flags,
    hints_from_prototxt,
    load_detector,
    match_classes,
    resolve_preprocessing,
)
from toolkit.caffe.errors import CaffeConversionError
from toolkit.data.labelmap import read_labelmap
from toolkit.data.voc import read_image_bgr
from toolkit.evaluation.submission import detections_from_predictions, ground_truth_from_voc
from toolkit.evaluation.voc import evaluate_voc

FACE = "caffe/yufacedetectnet_v1"
FACE_NET = "yufacedetectnet-open-v1.prototxt"
FACE_WEIGHTS = "yufacedetectnet-open-v1.caffemodel"


def cli(capsys, *argv):
    """``main(argv)`` -> (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _rows(record) -> np.ndarray:
    """A detections.json entry as DetectionOutput rows ``[label, score, x1/W, y1/H, x2/W, y2/H]``."""
    w, h = record["width"], record["height"]
    return np.array([[d["label"], d["score"], *(np.array(d["box_xyxy"]) / [w, h, w, h])]
                     for d in record["detections"]], dtype=np.float64).reshape(-1, 6)


def _face_labelmap(path):
    path.write_text('item { name: "none_of_the_above" label: 0 display_name: "background" }\n'
                    'item { name: "face" label: 1 display_name: "face" }\n')
    return path


# ---------------------------------------------------------------------------
# detect: real Caffe's detections
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("preprocessing", ["flags", "train_prototxt"])
def test_detect_finds_the_face_real_caffe_found(preprocessing, tmp_path, capsys):
    folder = require_fixture(FACE)
    ref = np.load(folder / "forward_keliamoniz1_320x240.npz")
    options = (["--mean", "104,117,123", "--input-size", "320x240"] if preprocessing == "flags"
               else ["--train-prototxt", folder / "yufacedetectnet-open-v1.train.prototxt"])
    code, out, err = cli(capsys, "detect", folder / FACE_NET, folder / FACE_WEIGHTS, folder / "keliamoniz1.jpg",
                         "--out", tmp_path, *options)
    assert code == 0, err
    # What was used is printed with its source.
    assert "mean 104,117,123" in out and "scale 1 (Caffe's default)" in out and "warp to 320x240" in out
    assert ("(--mean)" in out) == (preprocessing == "flags")
    records = json.loads((tmp_path / "detections.json").read_text())
    assert len(records) == 1
    record = records[0]
    assert record["image"] == str(folder / "keliamoniz1.jpg") and (record["width"], record["height"]) == (640, 480)
    assert set(record) == {"image", "width", "height", "detections"}
    assert set(record["detections"][0]) == {"label", "name", "score", "box_xyxy"}
    caffe = ref["detection_out"][0, 0]
    got = _rows(record)
    # Every row real Caffe gave, in its order; the face first, at 0.99887.
    assert got.shape == (len(caffe), 6)
    np.testing.assert_array_equal(got[:, 0], caffe[:, 1])
    np.testing.assert_allclose(got[:, 1], caffe[:, 2], atol=1e-5)
    face = record["detections"][0]
    assert face["score"] == pytest.approx(0.99887, abs=1e-5)
    np.testing.assert_allclose(face["box_xyxy"], caffe[0, 3:7] * [640, 480, 640, 480], atol=0.5)
    np.testing.assert_allclose(got[:, 2:], caffe[:, 3:7], atol=1e-4)
    assert (tmp_path / "keliamoniz1.png").is_file()


def test_preprocessing_reproduces_caffes_data_blob():
    """The warp + mean + scale that detect applies gives the very input blobs real Caffe was fed."""
    face = require_fixture(FACE)
    dsod = require_fixture("caffe/dsod300")
    image_face = read_image_bgr(face / "keliamoniz1.jpg")
    image_voc = read_image_bgr(require_fixture("lmdb/VOC/JPEGImages/2007_000027.jpg"))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    cases = [
        (image_face, hints_from_flags(mean="104,117,123", input_size="320x240"), None,
         np.load(face / "forward_keliamoniz1_320x240.npz")["data"]),
        (image_face, hints_from_prototxt(face / "yufacedetectnet-open-v1.train.prototxt").hints, (1, 3, 240, 320),
         np.load(face / "forward_keliamoniz1_320x240.npz")["data"]),
        (image_voc, hints_from_flags(mean="104,117,123", scale=0.017), (1, 3, 300, 300),
         np.load(dsod / "forward_2007_000027.npz")["data"]),
    ]
    for image, hints, declared, expected in cases:
        tensor, _ = resolve_preprocessing(hints, "data", declared).transform()(image, empty)
        np.testing.assert_array_equal(tensor[None].numpy(), expected)


@pytest.fixture(scope="module")
def dsod300_checkpoint(tmp_path_factory):
    """DSOD300 converted with its test prototxt, DSOD's 0.017 scale and the VOC labelmap stored."""
    root = require_fixture("caffe")
    out = tmp_path_factory.mktemp("dsod") / "dsod300.pth"
    assert main(["convert", str(root / "dsod300/deploy.prototxt"), str(root / "dsod300/random_init.caffemodel"),
                 "-o", str(out), "--train-prototxt", str(root / "prototxt/dsod300_voc0712/test.prototxt"),
                 "--scale", "0.017", "--labelmap", str(root / "prototxt/labelmap_voc.prototxt")]) == 0
    return out


@pytest.mark.parametrize("fast", [False, True])
def test_detect_dsod300_reproduces_caffes_detection_rows(fast, tmp_path, capsys):
    folder = require_fixture("caffe/dsod300")
    image = require_fixture("lmdb/VOC/JPEGImages/2007_000027.jpg")
    code, out, err = cli(capsys, "detect", folder / "deploy.prototxt", folder / "random_init.caffemodel", image,
                         "--mean", "104,117,123", "--scale", "0.017", "--out", tmp_path, *(["--fast"] if fast else []))
    assert code == 0, err
    caffe = np.load(folder / "forward_2007_000027.npz")["detection_out"][0, 0]
    got = _rows(json.loads((tmp_path / "detections.json").read_text())[0])
    assert got.shape == (200, 6)
    np.testing.assert_array_equal(got[:, 0], caffe[:, 1])  # labels, in Caffe's row order
    np.testing.assert_allclose(got[:, 1], caffe[:, 2], atol=1e-5)
    # Boxes are DetectionOutput's, not clipped: some reach past the image as Caffe's do.
    np.testing.assert_allclose(got[:, 2:], caffe[:, 3:7], atol=1e-5)
    assert caffe[:, 3:7].min() < 0 and caffe[:, 3:7].max() > 1


def test_a_checkpoint_with_stored_preprocessing_needs_no_flags(dsod300_checkpoint, tmp_path, capsys):
    folder = require_fixture("caffe/dsod300")
    image = require_fixture("lmdb/VOC/JPEGImages/2007_000027.jpg")
    stored = torch.load(dsod300_checkpoint, weights_only=True)
    assert stored["classes"][:3] == ["background", "aeroplane", "bicycle"] and len(stored["classes"]) == 21
    assert stored["preprocessing"]["scale"] == {"value": 0.017, "source": "--scale"} or \
        stored["preprocessing"]["scale"]["value"] == pytest.approx(0.017)
    code, out, err = cli(capsys, "detect", dsod300_checkpoint, image, "--out", tmp_path)
    assert code == 0, err
    assert "dsod300.pth, from --scale" in out and "dsod300.pth, from test.prototxt 'data'" in out
    record = json.loads((tmp_path / "detections.json").read_text())[0]
    caffe = np.load(folder / "forward_2007_000027.npz")["detection_out"][0, 0]
    got = _rows(record)
    np.testing.assert_array_equal(got[:, 0], caffe[:, 1])
    np.testing.assert_allclose(got[:, 1:], caffe[:, 2:7], atol=1e-5)
    names = read_labelmap(require_fixture("caffe/prototxt/labelmap_voc.prototxt")).names
    assert [d["name"] for d in record["detections"]] == [names[int(k)] for k in caffe[:, 1]]
    # The prototxt may still be named; flags override what the checkpoint stores.
    code, out, err = cli(capsys, "detect", folder / "deploy.prototxt", dsod300_checkpoint, image, "--out", tmp_path,
                         "--scale", "1")
    assert code == 0, err
    assert "scale 1 (--scale)" in out
    assert not np.allclose(_rows(json.loads((tmp_path / "detections.json").read_text())[0])[:, 1], caffe[:, 2])


def test_face_checkpoint_with_train_prototxt_and_labelmap(tmp_path, capsys):
    folder = require_fixture(FACE)
    labelmap = _face_labelmap(tmp_path / "labelmap_face.prototxt")
    ckpt = tmp_path / "face.pth"
    code, out, err = cli(capsys, "convert", folder / FACE_NET, folder / FACE_WEIGHTS, "-o", ckpt,
                         "--train-prototxt", folder / "yufacedetectnet-open-v1.train.prototxt", "--labelmap", labelmap)
    assert code == 0, err
    assert "stored class names: background, face" in out
    code, out, err = cli(capsys, "detect", ckpt, folder / "keliamoniz1.jpg", "--out", tmp_path / "d",
                         "--score-threshold", "0.5")
    assert code == 0, err
    record = json.loads((tmp_path / "d" / "detections.json").read_text())[0]
    caffe = np.load(folder / "forward_keliamoniz1_320x240.npz")["detection_out"][0, 0]
    assert [d["name"] for d in record["detections"]] == ["face"]  # only the face is >= 0.5
    np.testing.assert_allclose(record["detections"][0]["box_xyxy"], caffe[0, 3:7] * [640, 480, 640, 480], atol=0.5)


def test_drawing_shows_the_boxes(tmp_path, capsys):
    folder = require_fixture(FACE)
    image = folder / "keliamoniz1.jpg"
    shutil.copy(image, tmp_path / "copy.jpg")
    code, _, err = cli(capsys, "detect", folder / FACE_NET, folder / FACE_WEIGHTS, image, tmp_path / "copy.jpg",
                       "--mean", "104", "--out", tmp_path / "d", "--draw-threshold", "0.9")
    assert code == 0, err
    original = read_image_bgr(image)
    drawn = read_image_bgr(tmp_path / "d" / "keliamoniz1.png")
    assert drawn.shape == original.shape
    box = np.round(json.loads((tmp_path / "d" / "detections.json").read_text())[0]["detections"][0]["box_xyxy"])
    x0, y0, x1, y1 = box.astype(int)
    changed = np.abs(drawn.astype(int) - original.astype(int)).sum(axis=2) > 0
    # The face's rectangle is drawn (its left edge and bottom edge), the inside of the box is untouched.
    assert changed[y0 + 10:y1 - 10, x0].all() and changed[y1 - 1, x0 + 5:x1 - 5].all()
    assert not changed[y0 + 10:y1 - 10, x0 + 10:x1 - 10].any()
    assert changed.mean() < 0.05  # only the face (>= 0.9) is drawn
    np.testing.assert_array_equal(read_image_bgr(tmp_path / "d" / "copy.png"), drawn)


def test_several_detection_outputs_need_output(tmp_path, capsys):
    folder = require_fixture("caffe/layer_zoo/mini_ssd")
    text = (folder / "deploy.prototxt").read_text()
    text += ('layer { name: "detection_out_strict" type: "DetectionOutput" bottom: "mbox_loc" '
             'bottom: "mbox_conf_flatten" bottom: "mbox_priorbox" top: "detection_strict" '
             'detection_output_param { num_classes: 4 share_location: true background_label_id: 0 '
             'nms_param { nms_threshold: 0.3 top_k: 20 } code_type: CENTER_SIZE keep_top_k: 5 '
             'confidence_threshold: 0.3 } }\n')
    net = tmp_path / "two_outputs.prototxt"
    net.write_text(text)
    image = require_fixture(f"{FACE}/keliamoniz1.jpg")
    code, _, err = cli(capsys, "detect", net, folder / "weights.caffemodel", image, "--out", tmp_path / "d")
    assert code == 2 and "2 DetectionOutput layers" in err and "--output" in err and "'detection_strict'" in err
    for top in ("detection_out", "detection_strict"):
        loaded = load_detector(net, folder / "weights.caffemodel", output=top, flags=hints_from_flags(scale=0.01))
        empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        tensor, _ = loaded.preprocessing.transform()(read_image_bgr(image), empty)
        with torch.no_grad():
            caffe_rows = loaded.detector.net({"data": tensor[None]}, blobs=[top])[top][0, 0].numpy()
        caffe_rows = caffe_rows[caffe_rows[:, 1] != -1]
        code, _, err = cli(capsys, "detect", net, folder / "weights.caffemodel", image, "--out", tmp_path / top,
                           "--output", top, "--scale", "0.01")
        assert code == 0, err
        got = _rows(json.loads((tmp_path / top / "detections.json").read_text())[0])
        np.testing.assert_allclose(got, caffe_rows[:, 1:], atol=1e-4)
        assert top != "detection_strict" or len(got) <= 5


# ---------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------


def _face_lmdb(tmp_path, folder, shift_x=0.0) -> str:
    """An SSD LMDB (written by ``converters.lmdb from-voc``) of the face photo, annotated with the face box real
    Caffe found (moved ``shift_x`` pixels sideways), classes from a face labelmap."""
    from converters.lmdb.__main__ import main as lmdb_main

    caffe = np.load(folder / "forward_keliamoniz1_320x240.npz")["detection_out"][0, 0, 0]
    x0, y0, x1, y1 = caffe[3:7] * [640, 480, 640, 480] + [shift_x, 0, shift_x, 0]
    root = tmp_path / f"voc{shift_x:g}"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    shutil.copy(folder / "keliamoniz1.jpg", root / "JPEGImages" / "face.jpg")
    (root / "Annotations" / "face.xml").write_text(
        "<annotation><filename>face.jpg</filename><size><width>640</width><height>480</height><depth>3</depth>"
        f"</size><object><name>face</name><difficult>0</difficult><bndbox><xmin>{x0 + 1:.0f}</xmin>"
        f"<ymin>{y0 + 1:.0f}</ymin><xmax>{x1:.0f}</xmax><ymax>{y1:.0f}</ymax></bndbox></object></annotation>")
    (root / "list.txt").write_text("JPEGImages/face.jpg Annotations/face.xml\n")
    labelmap = _face_labelmap(tmp_path / "labelmap_face.prototxt")
    assert lmdb_main(["from-voc", str(root), str(root / "list.txt"), str(root / "lmdb"), "--labelmap",
                      str(labelmap), "--quiet"]) == 0
    return f"lmdb:{root / 'lmdb'},labelmap={labelmap}"


def test_evaluate_the_face_detector_on_the_face_it_found(tmp_path, capsys):
    """AP 1 when the ground truth is the face real Caffe found; 0 when it is moved off the face."""
    folder = require_fixture(FACE)
    labelmap = _face_labelmap(tmp_path / "net_labelmap.prototxt")
    common = [folder / FACE_NET, folder / FACE_WEIGHTS, "--split", "train", "--mean", "104,117,123",
              "--input-size", "320x240", "--labelmap", labelmap, "--workers", "0"]
    code, out, err = cli(capsys, "evaluate", *common, "--dataset", _face_lmdb(tmp_path, folder),
                         "--json", tmp_path / "ap.json")
    assert code == 0, err
    result = json.loads((tmp_path / "ap.json").read_text())
    assert result["metric"] == "voc07" and result["ap"] == {"face": pytest.approx(1.0)}
    assert result["mAP"] == pytest.approx(1.0)
    assert "face" in out and "100.00" in out
    code, _, err = cli(capsys, "evaluate", *common, "--dataset", _face_lmdb(tmp_path, folder, shift_x=-250.0),
                       "--json", tmp_path / "ap.json", "--metric", "voc12")
    assert code == 0, err
    assert json.loads((tmp_path / "ap.json").read_text())["ap"] == {"face": 0.0}


def test_evaluate_dsod300_on_the_lmdb_fixture(dsod300_checkpoint, tmp_path, capsys):
    """On the trainval LMDB (which holds 2007_000027): the predictions are real Caffe's rows in pixels, and the
    AP is the VOC evaluator's on them with the ground truth of the VOC XML files."""
    lmdb = require_fixture("lmdb")
    caffe = np.load(require_fixture("caffe/dsod300/forward_2007_000027.npz"))["detection_out"][0, 0]
    name = f"lmdb:{lmdb / 'VOC_trainval10_lmdb'},labelmap={lmdb / 'labelmap_voc.prototxt'}"
    loaded = load_detector(None, dsod300_checkpoint)
    r = evaluate_dataset(loaded, name, split="train", batch_size=4, workers=0, progress=False)
    assert len(r.predictions) == 10
    p = next(p for p in r.predictions if str(p["image_id"]).endswith("/2007_000027.jpg"))
    w, h = 486, 500
    np.testing.assert_array_equal(p["labels"].numpy(), caffe[:, 1])
    np.testing.assert_allclose(p["scores"].numpy(), caffe[:, 2], atol=1e-5)
    np.testing.assert_allclose(p["boxes"].numpy(), np.clip(caffe[:, 3:7] * [w, h, w, h], 0, [w, h, w, h]),
                               atol=2e-3)

    # The same AP from the reference path: ground truth from the XML files, the evaluator called directly.
    from toolkit.data.voc import VOCDetection

    voc_root = tmp_path / "VOCdevkit" / "VOC2012"
    (voc_root / "ImageSets" / "Main").mkdir(parents=True)
    ids = [str(p["image_id"]).rsplit("/", 1)[-1].rsplit(".", 1)[0] for p in r.predictions]
    shutil.copytree(lmdb / "VOC" / "Annotations", voc_root / "Annotations")
    (voc_root / "ImageSets" / "Main" / "x.txt").write_text("\n".join(ids) + "\n")
    gt = ground_truth_from_voc(VOCDetection(tmp_path / "VOCdevkit", [("VOC2012", "x")]))
    renamed = [{**p, "image_id": i} for p, i in zip(r.predictions, ids)]
    classes = r.dataset.classes[1:]
    expected = evaluate_voc(gt, detections_from_predictions(renamed, classes), classes, "voc07")
    assert r.result.ap == pytest.approx(expected.ap) and r.result.mAP == pytest.approx(expected.mAP)

    # The command line gives the same figures, in batches of another size and through loader processes; an LMDB
    # named without test= is itself the set evaluated.
    code, out, err = cli(capsys, "evaluate", dsod300_checkpoint, "--dataset", name,
                         "--batch-size", "3", "--workers", "1", "--json", tmp_path / "ap.json")
    assert code == 0, err
    assert "evaluating its records" in err
    assert json.loads((tmp_path / "ap.json").read_text())["ap"] == pytest.approx(expected.ap)


def test_class_matching():
    names = ("background", "Aeroplane", "person", "dog")
    mapping, extra = match_classes(names, 0, ("background", "person", "aeroplane"), "net", "ds")
    assert mapping == {2: 1, 1: 2} and extra == ["dog"]
    expected = r"no net class for \['cat'\].*the net has \['Aeroplane', 'person', 'dog'\]"
    with pytest.raises(CaffeConversionError, match=expected):
        match_classes(names, 0, ("background", "person", "cat"), "net", "ds")


def test_evaluate_errors_name_the_classes(dsod300_checkpoint, tmp_path, capsys):
    folder = require_fixture(FACE)
    lmdb = require_fixture("lmdb")
    name = f"lmdb:{lmdb / 'VOC_trainval10_lmdb'}"
    code, _, err = cli(capsys, "evaluate", folder / FACE_NET, folder / FACE_WEIGHTS, "--dataset", name,
                       "--split", "train", "--labelmap", _face_labelmap(tmp_path / "f.prototxt"))
    assert code == 2 and err.count("\n") == 1
    assert "no net class for ['aeroplane'," in err and "the net has ['face']" in err
    code, _, err = cli(capsys, "evaluate", dsod300_checkpoint, "--dataset", "lmdb:/nonexistent/lmdb")
    assert code == 2 and "/nonexistent/lmdb" in err
    code, _, err = cli(capsys, "evaluate", dsod300_checkpoint, "--dataset", "nosuchset")
    assert code == 2 and "unknown dataset 'nosuchset'" in err


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def test_detect_errors_are_one_line(tmp_path, capsys):
    face = require_fixture(FACE)
    image = face / "keliamoniz1.jpg"
    classifier = require_fixture("caffe/layer_zoo/innerproduct")
    cases = [
        ((classifier / "deploy.prototxt", classifier / "weights.caffemodel", image), "no DetectionOutput layer"),
        ((face / FACE_NET, face / FACE_WEIGHTS, tmp_path / "missing.jpg"), "image(s) not found"),
        ((face / FACE_NET, face / FACE_WEIGHTS, image, "--output", "nothing"), "--output 'nothing'"),
        ((face / FACE_NET, face / FACE_WEIGHTS, image, "--input-size", "320"), "--input-size '320'"),
        ((face / FACE_NET, face / FACE_WEIGHTS, image, "--mean", "1,2"), "three values"),
        ((face / FACE_NET, face / FACE_WEIGHTS, image, "--labelmap",
          require_fixture("caffe/prototxt/labelmap_voc.prototxt")), "21 labels, the net's DetectionOutput has "
                                                                    "num_classes 2"),
        ((face / FACE_NET, image), "give at least one IMAGE after the net"),
        ((face / FACE_NET,), "needs its WEIGHTS"),
    ]
    for args, message in cases:
        code, _, err = cli(capsys, "detect", *args, "--out", tmp_path / "d")
        assert code == 2, (args, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err, (message, err)
    # A net whose input size is known from nowhere.
    text = (face / FACE_NET).read_text().replace("input_shape {\n  dim: 1\n  dim: 3\n  dim: 240\n  dim: 320\n}", "")
    assert "input_shape" not in text
    (tmp_path / "noshape.prototxt").write_text(text)
    code, _, err = cli(capsys, "detect", tmp_path / "noshape.prototxt", face / FACE_WEIGHTS, image, "--out", tmp_path)
    assert code == 2 and "give --input-size" in err


def test_an_unreadable_image_is_named_and_the_others_are_written(tmp_path, capsys):
    face = require_fixture(FACE)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    code, out, err = cli(capsys, "detect", face / FACE_NET, face / FACE_WEIGHTS, bad, face / "keliamoniz1.jpg",
                         "--mean", "104,117,123", "--out", tmp_path / "d")
    assert code == 2 and str(bad) in err and "could not be read" in err and err.count("\n") == 1
    records = json.loads((tmp_path / "d" / "detections.json").read_text())
    assert [r["image"] for r in records] == [str(face / "keliamoniz1.jpg")]
    assert (tmp_path / "d" / "keliamoniz1.png").is_file() and not (tmp_path / "d" / "broken.png").exists()


def test_train_prototxt_transforms_that_cannot_be_reproduced_are_refused(tmp_path):
    def data_layer(transform: str) -> str:
        return ('layer { name: "data" type: "AnnotatedData" top: "data" top: "label" include { phase: TEST } '
                f'transform_param {{ {transform} }} }}\n')

    cases = {
        'mean_file: "mean.binaryproto"': "mean_file",
        "crop_size: 224": "crop_size",
        "force_gray: true": "force_gray",
        "resize_param { resize_mode: FIT_SMALL_SIZE height: 300 width: 300 }": "resize_mode FIT_SMALL_SIZE",
        "mean_value: 1 mean_value: 2": "2 mean_value entries",
    }
    for transform, message in cases.items():
        path = tmp_path / "train.prototxt"
        path.write_text(data_layer(transform))
        with pytest.raises(CaffeConversionError, match=message):
            hints_from_prototxt(path)
    # A TEST data layer wins over a TRAIN one; one mean value serves the three channels.
    path.write_text(data_layer("mean_value: 7 scale: 0.5").replace("TEST", "TRAIN")
                    + data_layer("mean_value: 9 resize_param { height: 30 width: 40 interp_mode: CUBIC }")
                    .replace('"data"', '"test_data"'))
    hints = hints_from_prototxt(path).hints
    assert hints["mean_bgr"][0] == (9.0, 9.0, 9.0) and "scale" not in hints
    assert hints["resize_hw"][0] == (30, 40) and hints["interpolation"][0] == "CUBIC"
    prep = resolve_preprocessing(hints, "data", None)
    assert prep.input_hw == (30, 40) and prep.sources["input_hw"] == "train.prototxt 'test_data'"
    with pytest.raises(CaffeConversionError, match="no data layer"):
        path.write_text('layer { name: "x" type: "Input" top: "x" }\n')
        hints_from_prototxt(path)


def test_toolkit_commands_point_to_converters_caffe_for_other_nets(tmp_path, capsys):
    from toolkit.evaluate import main as evaluate_main
    from toolkit.predict import main as predict_main

    face = require_fixture(FACE)
    ckpt = tmp_path / "face.pth"
    assert main(["convert", str(face / FACE_NET), str(face / FACE_WEIGHTS), "-o", str(ckpt)]) == 0
    capsys.readouterr()
    assert predict_main(["--checkpoint", str(ckpt), str(face / "keliamoniz1.jpg"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "map onto none of the native models" in err
    assert f"python -m converters.caffe detect {ckpt} IMAGE... --out DIR" in err
    assert evaluate_main(["--checkpoint", str(ckpt), "--dataset", "voc07"]) == 2
    assert f"python -m converters.caffe evaluate {ckpt} --dataset NAME" in capsys.readouterr().err
