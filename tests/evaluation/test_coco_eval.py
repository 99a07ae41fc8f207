"""COCO evaluation on a small COCO json built from the VOC fixture, against pycocotools
called directly; and the COCO dataset's label mapping, crowd and empty-image handling."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from toolkit.data.coco import COCODetection
from toolkit.data.voc import VOC_CLASSES, VOCDetection, xyxy_to_voc
from toolkit.evaluate import main as evaluate_main
from toolkit.evaluation.coco import evaluate_coco, predictions_to_coco, write_coco_results
from toolkit.evaluation.submission import read_voc_submission

# Category ids with gaps, as in COCO itself.
CAT_IDS = {name: 3 * i + 2 for i, name in enumerate(VOC_CLASSES)}


@pytest.fixture(scope="module")
def coco_files(voc_mini, tmp_path_factory):
    """(annotation json, results json, image dir, number of images) from voc2012_mini."""
    out = tmp_path_factory.mktemp("coco")
    dataset = VOCDetection(voc_mini / "VOCdevkit", [("VOC2012", "val")])
    images, annotations = [], []
    numeric_id = {}
    for i in range(len(dataset)):
        t = dataset.get_annotation(i)
        image_id = 1000 + i
        numeric_id[t["image_id"]] = image_id
        h, w = t["orig_size"].tolist()
        images.append({"id": image_id, "file_name": f"{t['image_id']}.jpg", "height": h, "width": w})
        for box, label, difficult in zip(t["boxes"].tolist(), t["labels"].tolist(), t["difficult"].tolist()):
            x0, y0, x1, y1 = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": CAT_IDS[VOC_CLASSES[label - 1]],
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                # Difficult VOC objects become crowd regions: ignored for training, "ignore" for COCOeval.
                "iscrowd": int(difficult),
            })
    # One extra image without annotations (kept for evaluation).
    images.append({"id": 999, "file_name": images[0]["file_name"], "height": images[0]["height"], "width": images[0]["width"]})
    categories = [{"id": CAT_IDS[n], "name": n, "supercategory": "voc"} for n in VOC_CLASSES]
    ann_path = out / "instances_val.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    dets = read_voc_submission(voc_mini / "detections", "val", VOC_CLASSES)
    results = []
    for name, d in dets.items():
        for image_id, score, box in zip(d.image_ids, d.scores, d.boxes_voc):
            x0, y0, x1, y1 = box[0] - 1, box[1] - 1, box[2], box[3]
            results.append({"image_id": numeric_id[image_id], "category_id": CAT_IDS[name],
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    res_path = write_coco_results(results, out / "results.json")
    return ann_path, res_path, voc_mini / "VOCdevkit" / "VOC2012" / "JPEGImages", len(images), annotations


def _pycocotools_direct(ann_path, res_path, cat_ids=None):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_path))
        dt = gt.loadRes(str(res_path))
        ev = COCOeval(gt, dt, "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_stats_equal_pycocotools(coco_files):
    ann, res, _, _, _ = coco_files
    ours = evaluate_coco(ann, res)
    direct = _pycocotools_direct(ann, res)
    np.testing.assert_allclose(list(ours.stats.values()), direct, rtol=0, atol=1e-12)
    assert 0.0 < ours.mAP < 1.0


def test_per_class_ap_equals_single_category_runs(coco_files):
    ann, res, _, _, _ = coco_files
    ours = evaluate_coco(ann, res)
    for name in ("person", "car", "aeroplane", "chair"):
        direct = _pycocotools_direct(ann, res, cat_ids=[CAT_IDS[name]])
        assert ours.ap[name] == pytest.approx(direct[0], abs=1e-12), name
        assert ours.ap50[name] == pytest.approx(direct[1], abs=1e-12), name


def test_cli_coco(coco_files, tmp_path):
    ann, res, _, _, _ = coco_files
    out = tmp_path / "coco.json"
    assert evaluate_main(["--coco-annotations", str(ann), "--detections", str(res), "--json", str(out),
                          "--plot", str(tmp_path / "pr.png")]) == 0
    got = json.loads(out.read_text())
    assert got["metric"] == "coco"
    assert got["mAP"] == pytest.approx(_pycocotools_direct(ann, res)[0], abs=1e-12)
    assert (tmp_path / "pr.png").stat().st_size > 0


def test_dataset_labels_crowd_and_empty_images(coco_files):
    ann, _, image_dir, n_images, annotations = coco_files
    ds = COCODetection(image_dir, ann)
    assert len(ds) == n_images  # the image without annotations is kept
    assert ds.classes[1:] == VOC_CLASSES  # sorted category ids keep the VOC order here
    assert ds.label_to_cat_id == {i + 1: CAT_IDS[n] for i, n in enumerate(VOC_CLASSES)}
    empty = ds.get_annotation(ds.ids.index(999))
    assert empty["boxes"].shape == (0, 4)
    train = COCODetection(image_dir, ann, remove_images_without_annotations=True)
    assert 999 not in train.ids
    # Crowd (here: difficult) annotations are not in the training target.
    image_id = 1000
    crowd = [a for a in annotations if a["image_id"] == image_id and a["iscrowd"]]
    kept = [a for a in annotations if a["image_id"] == image_id and not a["iscrowd"]]
    image, target = ds[ds.ids.index(image_id)]
    assert image.ndim == 3 and image.dtype == np.uint8
    assert len(target["boxes"]) == len(kept)
    expected = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                             for a in kept], dtype=torch.float32).reshape(-1, 4)
    torch.testing.assert_close(target["boxes"], expected)
    assert crowd or kept  # the fixture image has objects


def test_predictions_to_coco_roundtrip(coco_files):
    ann, res, image_dir, _, _ = coco_files
    ds = COCODetection(image_dir, ann)
    results = json.loads(res.read_text())
    # Group the results per image as toolkit predictions and convert back.
    per_image = {}
    for r in results:
        x, y, w, h = r["bbox"]
        p = per_image.setdefault(r["image_id"], {"image_id": r["image_id"], "boxes": [], "scores": [], "labels": []})
        p["boxes"].append([x, y, x + w, y + h])
        p["scores"].append(r["score"])
        p["labels"].append(ds.cat_id_to_label[r["category_id"]])
    preds = [{"image_id": k, "boxes": torch.tensor(v["boxes"], dtype=torch.float64),
              "scores": torch.tensor(v["scores"]), "labels": torch.tensor(v["labels"])} for k, v in per_image.items()]
    again = predictions_to_coco(preds, ds.label_to_cat_id)
    assert evaluate_coco(ann, again).stats == pytest.approx(evaluate_coco(ann, results).stats, abs=1e-9)
    assert xyxy_to_voc(np.array([[0.0, 0.0, 5.0, 5.0]])).tolist() == [[1.0, 1.0, 5.0, 5.0]]
