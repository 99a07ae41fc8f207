"""DetectionOutput post-processing against real SSD-Caffe outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import require_fixture
from toolkit.models.box_coder import CodeType, decode_boxes, encode_boxes
from toolkit.models.postprocess import DetectionOutputParams, detection_output, to_caffe_detection_blob
from toolkit.models.priors import split_caffe_priorbox_blob

DESIGNED = ["a_center_size_share", "b_corner_perclass_vit", "c_perclass_nobg_eta", "d_corner_size_nothr",
            "e_empty", "f_vit_bg2", "g_one_image_empty"]


def _run(inputs, params, conf_key="mbox_conf"):
    priors, variances = split_caffe_priorbox_blob(torch.from_numpy(inputs["mbox_priorbox"]))
    results = detection_output(torch.from_numpy(inputs["mbox_loc"]), torch.from_numpy(inputs[conf_key]),
                               priors, variances, params)
    return to_caffe_detection_blob(results).numpy()


def _assert_caffe_rows(got, expected):
    assert got.shape == expected.shape
    # image id, label and score exact (scores are copied from the input), boxes to 1e-6.
    np.testing.assert_array_equal(got[..., :3], expected[..., :3])
    np.testing.assert_allclose(got[..., 3:], expected[..., 3:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", DESIGNED)
def test_designed_detection_output_cases(case):
    folder = require_fixture(f"caffe/layer_zoo/detection_output_{case}")
    cfg = json.loads((folder / "meta.json").read_text())["config"]
    params = DetectionOutputParams(
        num_classes=cfg["C"], share_location=cfg["share"], background_label_id=cfg["bg"],
        nms_threshold=cfg["nms"], top_k=cfg["top_k"], eta=cfg["eta"], keep_top_k=cfg["keep_top_k"],
        confidence_threshold=None if cfg["thr"] < -1e38 else cfg["thr"],
        code_type=CodeType(cfg["code"]), variance_encoded_in_target=cfg["vit"],
    )
    _assert_caffe_rows(_run(np.load(folder / "input.npz"), params),
                       np.load(folder / "output.npz")["detection_out"])


def test_mini_ssd_detection_output():
    folder = require_fixture("caffe/layer_zoo/mini_ssd")
    out = np.load(folder / "output.npz")
    params = DetectionOutputParams(4, True, 0, 0.45, 50, 1.0, 30, 0.2, CodeType.CENTER_SIZE)
    _assert_caffe_rows(_run(out, params, "mbox_conf_flatten"), out["detection_out"])


def test_dsod300_real_detection_output():
    out = np.load(require_fixture("caffe/dsod300/forward_2007_000027.npz"))
    params = DetectionOutputParams(21, True, 0, 0.45, 400, 1.0, 200, 0.01, CodeType.CENTER_SIZE)
    _assert_caffe_rows(_run(out, params, "mbox_conf_flatten"), out["detection_out"])


@pytest.mark.parametrize("code", list(CodeType))
@pytest.mark.parametrize("vit", [False, True])
def test_encode_decode_roundtrip(code, vit):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 0.6
    priors = torch.cat([xy, xy + 0.05 + torch.rand(50, 2, generator=g) * 0.3], 1).double()
    xy = torch.rand(50, 2, generator=g) * 0.6
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(50, 2, generator=g) * 0.3], 1).double()
    var = torch.tensor([0.1, 0.1, 0.2, 0.2], dtype=torch.float64).expand(50, 4)
    loc = encode_boxes(boxes, priors, var, code, vit)
    torch.testing.assert_close(decode_boxes(loc, priors, var, code, vit), boxes)


# ---------------------------------------------------------------------------------- voting cluster DIoU-NMS
def _naive_voting(boxes, scores, labels, threshold):
    """LD's score-voting cluster DIoU-NMS written from its definition, one pair at a time in Python floats:
    boxes offset by label x 4000, DIoU with the centre term to the power 0.8, cluster NMS iterated to its fixed
    point, then each kept box the weighted mean of itself and the later boxes with DIoU > 0.7."""
    import math

    order = sorted(range(len(scores)), key=lambda k: -float(scores[k]))  # Python's sort is stable
    b = [[float(v) + 4000.0 * int(labels[k]) for v in boxes[k]] for k in order]
    raw = [[float(v) for v in boxes[k]] for k in order]
    s = [float(scores[k]) for k in order]

    def diou(p, q):
        iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
        ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
        inter = iw * ih
        union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
        dist = ((p[0] + p[2]) / 2 - (q[0] + q[2]) / 2) ** 2 + ((p[1] + p[3]) / 2 - (q[1] + q[3]) / 2) ** 2
        diag = (max(p[2], q[2]) - min(p[0], q[0])) ** 2 + (max(p[3], q[3]) - min(p[1], q[1])) ** 2
        return inter / union - (dist / (diag + 1e-7)) ** 0.8

    n = len(s)
    d = [[diou(b[i], b[j]) for j in range(n)] for i in range(n)]
    keep = [True] * n
    while True:
        new = [max([0.0] + [d[i][j] for i in range(j) if keep[i]]) <= threshold for j in range(n)]
        if new == keep:
            break
        keep = new
    out_boxes, out_scores, out_labels = [], [], []
    for i in range(n):
        if not keep[i]:
            continue
        votes = [(math.exp(-(1 - d[i][j]) ** 2 / 0.025) * s[j], j) for j in range(i, n) if d[i][j] > 0.7]
        total = sum(w for w, _ in votes)
        out_boxes.append([sum(w * raw[j][c] for w, j in votes) / total for c in range(4)])
        out_scores.append(s[i])
        out_labels.append(int(labels[order[i]]))
    return np.array(out_boxes).reshape(-1, 4), np.array(out_scores), np.array(out_labels)


def _clustered_boxes(gen, n, num_labels, tie_every=0):
    centres = torch.rand(6, 2, generator=gen) * 300
    pick = torch.randint(0, 6, (n,), generator=gen)
    xy = centres[pick] + torch.randn(n, 2, generator=gen) * 6
    wh = 40 + torch.rand(n, 2, generator=gen) * 30
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=1).double()
    scores = torch.rand(n, generator=gen, dtype=torch.float64)
    if tie_every:
        scores[::tie_every] = 0.5  # ties keep the input order
    return boxes, scores, torch.randint(0, num_labels, (n,), generator=gen)


@pytest.mark.parametrize("seed, n, num_labels, threshold",
                         [(0, 60, 1, 0.6), (1, 80, 3, 0.6), (2, 50, 2, 0.3), (3, 40, 4, 0.8), (4, 1, 1, 0.6)])
def test_voting_cluster_diou_nms_equals_the_naive_loop(seed, n, num_labels, threshold):
    from toolkit.models.postprocess import voting_cluster_diou_nms

    boxes, scores, labels = _clustered_boxes(torch.Generator().manual_seed(seed), n, num_labels, tie_every=7)
    got = voting_cluster_diou_nms(boxes, scores, labels, threshold)
    want = _naive_voting(boxes.numpy(), scores.numpy(), labels.numpy(), threshold)
    assert len(got[1]) == len(want[1]) > 0
    np.testing.assert_array_equal(got[1].numpy(), want[1])
    np.testing.assert_array_equal(got[2].numpy(), want[2])
    # The published weights keep exp(-40) x score for the boxes outside the vote: 1e-17 of the result.
    np.testing.assert_allclose(got[0].numpy(), want[0], rtol=1e-12, atol=1e-9)
    if n > 1 and threshold <= 0.6:
        assert len(got[1]) < n  # the clusters were suppressed


def test_voting_keeps_classes_apart_and_handles_nothing():
    from toolkit.models.postprocess import voting_cluster_diou_nms

    box = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    boxes, scores, labels = voting_cluster_diou_nms(box.repeat(2, 1), torch.tensor([0.9, 0.8]), torch.tensor([1, 2]))
    assert labels.tolist() == [1, 2] and torch.equal(boxes, box.repeat(2, 1))  # same box, two classes: both kept
    empty = voting_cluster_diou_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert [t.shape[0] for t in empty] == [0, 0, 0]


def test_diou_matrix_equals_torchvision():
    from torchvision.ops import distance_box_iou

    from toolkit.models.postprocess import diou_matrix

    a, _, _ = _clustered_boxes(torch.Generator().manual_seed(5), 30, 1)
    b, _, _ = _clustered_boxes(torch.Generator().manual_seed(6), 20, 1)
    torch.testing.assert_close(diou_matrix(a, b), distance_box_iou(a, b, eps=1e-7), rtol=1e-12, atol=1e-12)


def test_detection_output_with_voting_is_voting_over_the_candidates():
    """The candidates of every class (score above the threshold, per-class top_k), voted over together; then
    keep_top_k by score; rows by label, then score."""
    from toolkit.models.postprocess import VOTING_IOU_THRESHOLD

    gen = torch.Generator().manual_seed(9)
    p, c = 300, 4
    priors = torch.rand(p, 2, generator=gen) * 0.8
    priors = torch.cat([priors, priors + 0.1 + torch.rand(p, 2, generator=gen) * 0.1], dim=1)
    variances = torch.tensor([0.1, 0.1, 0.2, 0.2]).expand(p, 4)
    loc = torch.randn(1, p, 4, generator=gen) * 0.5
    conf = torch.softmax(torch.randn(1, p, c, generator=gen) * 3, dim=-1)
    params = DetectionOutputParams(num_classes=c, nms_threshold=0.45, top_k=50, keep_top_k=20,
                                   confidence_threshold=0.05, code_type=CodeType.CENTER_SIZE,
                                   nms="voting_cluster_diou")
    got = detection_output(loc, conf, priors, variances, params)[0]
    decoded = decode_boxes(loc, priors, variances, CodeType.CENTER_SIZE, False)[0]
    cand_boxes, cand_scores, cand_labels = [], [], []
    for label in range(1, c):
        ranked = sorted((k for k in range(p) if conf[0, k, label] > 0.05), key=lambda k: -float(conf[0, k, label]))
        for k in ranked[:50]:
            cand_boxes.append(decoded[k].tolist())
            cand_scores.append(float(conf[0, k, label]))
            cand_labels.append(label)
    boxes, scores, labels = _naive_voting(np.array(cand_boxes), np.array(cand_scores), np.array(cand_labels),
                                          VOTING_IOU_THRESHOLD)
    boxes, scores, labels = boxes[:20], scores[:20], labels[:20]
    by_label = np.argsort(labels, kind="stable")
    np.testing.assert_array_equal(got["labels"].numpy(), labels[by_label])
    np.testing.assert_allclose(got["scores"].numpy(), scores[by_label], rtol=1e-6)
    np.testing.assert_allclose(got["boxes"].numpy(), boxes[by_label], atol=1e-5)
    with pytest.raises(ValueError, match="unknown NMS"):
        DetectionOutputParams(num_classes=c, nms="soft")
