"""The array COCO evaluator (toolkit.evaluation.cocoeval) against pycocotools' COCOeval, called
directly: all 12 statistics and the whole precision / recall arrays, on random problems built to
hit every rule (crowd boxes, area ranges, tied scores, tied IoUs, more than 100 results per image,
annotation id 0, repeated annotation ids, unknown categories) and on a 5,000-image set."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest

from toolkit.evaluation.coco import evaluate_coco
from toolkit.evaluation.cocoeval import evaluate_bbox


def synthetic_coco(rng: np.random.Generator, num_images: int, num_cats: int = 6, max_gt: int = 8,
                   dets_per_image: tuple[int, int] = (0, 30), crowd_fraction: float = 0.05) -> tuple[dict, list]:
    """A random COCO annotation dict and results list (seeded by ``rng``).

    Category ids with gaps, image ids unsorted; boxes of all sizes (small, medium, large areas);
    about half the results are jittered copies of a ground-truth box (sometimes exact copies,
    so IoUs tie), scores partly rounded to 2 decimals (ties), annotation ``area`` fields that
    differ from ``w * h`` (as segmentation areas do).
    """
    cat_ids = [3 * k + 2 for k in range(num_cats)]
    image_ids = rng.permutation(num_images * 2)[:num_images] + 1
    images, annotations, results = [], [], []
    for image_id in image_ids.tolist():
        width, height = int(rng.integers(64, 640)), int(rng.integers(64, 480))
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": width, "height": height})
        n = int(rng.integers(0, max_gt + 1))
        scale = rng.choice([8.0, 40.0, 150.0], size=n)
        w = rng.uniform(0.3, 1.5, n) * scale
        h = rng.uniform(0.3, 1.5, n) * scale
        x, y = rng.uniform(0, width, n), rng.uniform(0, height, n)
        cats = rng.integers(0, num_cats, n)
        gts = []
        for i in range(n):
            box = [float(x[i]), float(y[i]), float(w[i]), float(h[i])]
            if rng.random() < 0.1 and gts:  # a duplicate box: equal IoUs against it
                box = list(gts[-1][0])
            gts.append((box, int(cats[i])))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_ids[cats[i]],
                                "bbox": box, "area": float(box[2] * box[3] * rng.uniform(0.6, 1.0)),
                                "iscrowd": int(rng.random() < crowd_fraction)})
        d = int(rng.integers(dets_per_image[0], dets_per_image[1] + 1))
        for _ in range(d):
            if gts and rng.random() < 0.5:
                box, cat = gts[int(rng.integers(len(gts)))]
                if rng.random() < 0.8:
                    box = [box[0] + rng.normal(0, 0.1 * box[2]), box[1] + rng.normal(0, 0.1 * box[3]),
                           box[2] * rng.uniform(0.8, 1.25), box[3] * rng.uniform(0.8, 1.25)]
                if rng.random() < 0.1:
                    cat = int(rng.integers(num_cats))
            else:
                s = rng.choice([8.0, 40.0, 150.0])
                box = [rng.uniform(0, width), rng.uniform(0, height), s * rng.uniform(0.3, 1.5),
                       s * rng.uniform(0.3, 1.5)]
                cat = int(rng.integers(num_cats))
            score = float(np.float32(rng.random()))
            if rng.random() < 0.3:
                score = round(score, 2)
            results.append({"image_id": image_id, "category_id": cat_ids[cat],
                            "bbox": [round(float(v), 2) for v in box], "score": score})
    order = rng.permutation(len(results))  # results in no particular order
    results = [results[i] for i in order]
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in cat_ids]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def pycocotools_eval(dataset: dict, results: list):
    """COCOeval on deep copies (pycocotools adds fields to the dicts it is given)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(dataset)
        gt.createIndex()
        if results:
            dt = gt.loadRes(copy.deepcopy(results))
        else:  # loadRes cannot take an empty list: an empty results COCO by hand
            dt = COCO()
            dt.dataset = {"images": dataset["images"], "categories": dataset["categories"], "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def assert_same(dataset: dict, results: list) -> None:
    ours = evaluate_bbox(dataset, results)
    ref = pycocotools_eval(dataset, results)
    np.testing.assert_allclose(ours.stats, ref.stats, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.precision, ref.eval["precision"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.recall, ref.eval["recall"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_equals_pycocotools_on_random_problems(seed):
    rng = np.random.default_rng(seed)
    dataset, results = synthetic_coco(rng, num_images=40, crowd_fraction=0.1 if seed % 2 else 0.0)
    assert_same(dataset, results)


def test_more_than_100_results_per_image_and_category():
    """maxDets: only each (image, category)'s 100 best results are evaluated; 1 and 10 subsets."""
    rng = np.random.default_rng(11)
    dataset, results = synthetic_coco(rng, num_images=6, num_cats=2, max_gt=12, dets_per_image=(150, 260))
    assert_same(dataset, results)


def test_annotation_id_zero_and_repeated_ids_follow_pycocotools():
    """pycocotools stores the matched box's id as the match, so a box with id 0 leaves its result
    unmatched; and it loads annotations by id, so a repeated id reads the last annotation."""
    rng = np.random.default_rng(3)
    dataset, results = synthetic_coco(rng, num_images=15)
    anns = dataset["annotations"]
    anns[0]["id"] = 0
    anns[5]["id"] = anns[9]["id"]
    anns[12]["id"] = anns[len(anns) // 2]["id"]
    assert_same(dataset, results)


def test_unknown_categories_images_without_boxes_and_empty_results():
    rng = np.random.default_rng(5)
    dataset, results = synthetic_coco(rng, num_images=20)
    results[0]["category_id"] = 999  # not a category of the file: left out, as pycocotools does
    dataset["annotations"][0]["category_id"] = 998
    dataset["images"].append({"id": 10 ** 6, "file_name": "x.jpg", "width": 10, "height": 10})
    assert_same(dataset, results)
    assert_same(dataset, [])


def test_result_on_an_unknown_image_is_an_error():
    rng = np.random.default_rng(6)
    dataset, results = synthetic_coco(rng, num_images=5, dets_per_image=(1, 3))
    results.append({"image_id": -7, "category_id": dataset["categories"][0]["id"], "bbox": [1, 1, 2, 2],
                    "score": 0.5})
    with pytest.raises(ValueError, match="-7"):
        evaluate_bbox(dataset, results)
    bad = [dict(r) for r in results[:-1]]
    del bad[0]["score"]
    with pytest.raises(ValueError, match="result 0 has no 'score'"):
        evaluate_bbox(dataset, bad)


@pytest.mark.slow
def test_equals_pycocotools_on_5000_images():
    """The issue's size: 5,000 images (sparse, so that pycocotools takes a few seconds)."""
    rng = np.random.default_rng(2026)
    dataset, results = synthetic_coco(rng, num_images=5000, num_cats=10, max_gt=3, dets_per_image=(0, 4))
    assert len(dataset["images"]) == 5000 and len(results) > 5000
    assert_same(dataset, results)


def test_evaluate_coco_accepts_a_path_a_dict_or_a_pycocotools_coco(tmp_path):
    import json

    rng = np.random.default_rng(9)
    dataset, results = synthetic_coco(rng, num_images=10)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(dataset))
    ref = pycocotools_eval(dataset, results)
    for gt in (path, dataset, ref.cocoGt):
        got = evaluate_coco(gt, results)
        np.testing.assert_allclose(list(got.stats.values()), ref.stats, rtol=0, atol=1e-12)
    assert "maxDets=100" in got.summary and len(got.summary.splitlines()) == 12
