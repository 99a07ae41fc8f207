"""VOC evaluation against the reference evaluator's recorded mAPs, and the fast matcher
against the plain per-detection loop."""

from __future__ import annotations

import json

import numpy as np
import pytest

from toolkit.data.voc import VOC_CLASSES, VOCDetection
from toolkit.evaluate import main as evaluate_main
from toolkit.evaluation.submission import (
    SubmissionFormatError,
    detections_from_predictions,
    ground_truth_from_voc,
    read_voc_submission,
    read_voc_submission_file,
    write_voc_submission,
)
from toolkit.evaluation.voc import (
    ClassDetections,
    ImageGT,
    evaluate_voc,
    match_class,
    match_class_loop,
    voc_ap,
)


@pytest.fixture(scope="module")
def mini(voc_mini):
    dataset = VOCDetection(voc_mini / "VOCdevkit", [("VOC2012", "val")])
    gt = ground_truth_from_voc(dataset)
    dets = read_voc_submission(voc_mini / "detections", "val", VOC_CLASSES)
    expected = json.loads((voc_mini / "expected_map.json").read_text())
    return gt, dets, expected


@pytest.mark.parametrize("metric", ["voc07", "voc12"])
@pytest.mark.parametrize("matcher", [match_class, match_class_loop], ids=["vectorised", "loop"])
def test_reproduces_reference_evaluator(mini, metric, matcher):
    gt, dets, expected = mini
    result = evaluate_voc(gt, dets, VOC_CLASSES, metric, matcher=matcher)
    assert set(result.ap) == set(expected[metric]["ap"])
    for name, ap in expected[metric]["ap"].items():
        assert result.ap[name] == pytest.approx(ap, abs=1e-6), name
    assert result.mAP == pytest.approx(expected[metric]["mAP"], abs=1e-6)


@pytest.mark.parametrize("metric", ["voc07", "voc12"])
def test_cli_contract(voc_mini, tmp_path, metric, capsys):
    out = tmp_path / "out.json"
    plot = tmp_path / "pr.png"
    rc = evaluate_main([
        "--voc-root", str(voc_mini / "VOCdevkit"), "--year", "2012", "--split", "val",
        "--detections", str(voc_mini / "detections"), "--metric", metric, "--json", str(out),
        "--plot", str(plot),
    ])
    assert rc == 0
    got = json.loads(out.read_text())
    expected = json.loads((voc_mini / "expected_map.json").read_text())[metric]
    assert set(got) == {"metric", "mAP", "ap"}
    assert got["metric"] == metric
    assert got["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert got["ap"] == pytest.approx(expected["ap"], abs=1e-6)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "aeroplane" in printed and f"{100 * expected['mAP']:.2f}" in printed


def test_cli_missing_dataset_names_path(tmp_path, capsys):
    rc = evaluate_main(["--voc-root", str(tmp_path), "--year", "2012", "--split", "val",
                        "--detections", str(tmp_path), "--metric", "voc07"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "data/README.md" in err


def test_submission_roundtrip_preserves_ap(mini, tmp_path):
    gt, dets, _ = mini
    write_voc_submission(tmp_path, "val", dets)
    again = read_voc_submission(tmp_path, "val", VOC_CLASSES)
    for metric in ("voc07", "voc12"):
        a = evaluate_voc(gt, dets, VOC_CLASSES, metric)
        b = evaluate_voc(gt, again, VOC_CLASSES, metric)
        assert a.ap == b.ap


def test_predictions_in_toolkit_boxes_match_submission(mini):
    """Continuous xyxy boxes converted by detections_from_predictions give the same AP."""
    gt, dets, _ = mini
    predictions = {}
    for label, name in enumerate(VOC_CLASSES, start=1):
        d = dets.get(name)
        if d is None:
            continue
        for image_id, score, box in zip(d.image_ids, d.scores, d.boxes_voc):
            p = predictions.setdefault(image_id, {"image_id": image_id, "boxes": [], "scores": [], "labels": []})
            p["boxes"].append([box[0] - 1, box[1] - 1, box[2], box[3]])  # VOC → continuous
            p["scores"].append(score)
            p["labels"].append(label)
    preds = [{k: (np.array(v) if k != "image_id" else v) for k, v in p.items()} for p in predictions.values()]
    converted = detections_from_predictions(preds, VOC_CLASSES)
    for metric in ("voc07", "voc12"):
        a = evaluate_voc(gt, dets, VOC_CLASSES, metric).ap
        b = evaluate_voc(gt, converted, VOC_CLASSES, metric).ap
        assert a == pytest.approx(b, abs=1e-12)


def test_malformed_submission_names_file_and_line(tmp_path):
    path = tmp_path / "comp4_det_val_cat.txt"
    path.write_text("img1 0.5 1 2 3 4\nimg2 0.4 1 2 3\n")
    with pytest.raises(SubmissionFormatError, match=r"comp4_det_val_cat.txt:2"):
        read_voc_submission_file(path)


def test_unknown_image_id_is_an_error():
    gt = {"a": ImageGT([[1, 1, 10, 10]], [1], [False])}
    dets = {"cat": ClassDetections(["b"], [0.9], [[1, 1, 10, 10]])}
    with pytest.raises(KeyError, match="not in the ground truth"):
        evaluate_voc(gt, dets, ["cat"])


def test_voc_ap_hand_computed():
    # Two positives; detections: TP, FP, TP → recall .5 .5 1, precision 1 .5 .667
    rec = np.array([0.5, 0.5, 1.0])
    prec = np.array([1.0, 0.5, 2 / 3])
    # voc12: envelope 1 for recall ≤ .5, 2/3 up to 1 → 0.5 + 0.5 * 2/3
    assert voc_ap(rec, prec, "voc12") == pytest.approx(0.5 + 0.5 * 2 / 3)
    # voc07: thresholds 0..0.5 (6 points) → 1, 0.6..1.0 (5 points) → 2/3
    assert voc_ap(rec, prec, "voc07") == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)


def test_matching_rules_by_hand():
    """Duplicates are FPs, a difficult match is ignored, IoU uses the +1 convention."""
    gt = {
        "a": ImageGT([[1, 1, 10, 10], [21, 21, 30, 30]], [1, 1], [False, True]),
        "b": ImageGT(np.zeros((0, 4)), [], []),
    }
    dets = {"cat": ClassDetections(
        ["a", "a", "a", "b", "a"],
        [0.9, 0.8, 0.7, 0.6, 0.5],
        [[1, 1, 10, 10],      # TP
         [1, 1, 10, 10],      # duplicate → FP
         [21, 21, 30, 30],    # on a difficult box → ignored
         [1, 1, 10, 10],      # image without objects → FP
         [1, 1, 5, 10]],      # IoU (5*10)/(10*10) = 0.5, not > 0.5 → FP
    )}
    for matcher in (match_class, match_class_loop):
        tp, fp = matcher({"a": (gt["a"].boxes_voc, gt["a"].difficult)}, dets["cat"])
        assert tp.tolist() == [1, 0, 0, 0, 0]
        assert fp.tolist() == [0, 1, 0, 1, 1]
    result = evaluate_voc(gt, dets, ["cat"], "voc12")
    assert result.per_class["cat"].num_gt == 1
    assert result.ap["cat"] == pytest.approx(1.0)


def test_class_without_positive_gt_is_left_out():
    gt = {"a": ImageGT([[1, 1, 10, 10], [1, 1, 10, 10]], [1, 2], [False, True])}
    result = evaluate_voc(gt, {}, ["cat", "dog"], "voc07")
    assert set(result.ap) == {"cat"}
    assert result.ap["cat"] == 0.0
    assert result.mAP == 0.0


def _random_problem(rng: np.random.Generator, n_images: int, n_classes: int):
    gt = {}
    for i in range(n_images):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(1, 200, size=(n, 2))
        wh = rng.uniform(5, 100, size=(n, 2))
        gt[f"img{i}"] = ImageGT(np.hstack([xy, xy + wh]).round(), rng.integers(1, n_classes + 1, n), rng.random(n) < 0.15)
    dets = {}
    ids = list(gt)
    for c in range(n_classes):
        d = int(rng.integers(0, 40 * n_images // n_classes + 1))
        image_ids = np.array([ids[k] for k in rng.integers(0, n_images, d)], dtype=object)
        boxes = np.empty((d, 4))
        for j, image_id in enumerate(image_ids):
            g = gt[image_id]
            if len(g.boxes_voc) and rng.random() < 0.7:
                base = g.boxes_voc[rng.integers(len(g.boxes_voc))]
                boxes[j] = base + rng.normal(0, 6, 4)
            else:
                xy = rng.uniform(1, 200, 2)
                boxes[j] = np.concatenate([xy, xy + rng.uniform(5, 100, 2)])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
        # Quantised scores create ties, which both matchers must order the same way.
        dets[f"c{c}"] = ClassDetections(image_ids, rng.integers(0, 20, d) / 20.0, boxes)
    return gt, dets, [f"c{c}" for c in range(n_classes)]


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_equals_loop_on_random_problems(seed):
    rng = np.random.default_rng(seed)
    gt, dets, classes = _random_problem(rng, n_images=60, n_classes=4)
    for name in classes:
        label = classes.index(name) + 1
        class_gt = {k: (g.boxes_voc[g.labels == label], g.difficult[g.labels == label])
                    for k, g in gt.items() if (g.labels == label).any()}
        tp_a, fp_a = match_class(class_gt, dets[name], chunk_elements=37)  # force many chunks
        tp_b, fp_b = match_class_loop(class_gt, dets[name])
        np.testing.assert_array_equal(tp_a, tp_b)
        np.testing.assert_array_equal(fp_a, fp_b)
    for metric in ("voc07", "voc12"):
        assert evaluate_voc(gt, dets, classes, metric).ap == evaluate_voc(gt, dets, classes, metric, matcher=match_class_loop).ap
