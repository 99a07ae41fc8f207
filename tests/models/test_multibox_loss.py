"""MultiBoxLoss value and gradients against real SSD-Caffe MultiBoxLoss (forward + backward)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import require_fixture
from toolkit.models.box_coder import CodeType
from toolkit.models.multibox_loss import (
    LocLossType,
    MatchType,
    MiningType,
    MultiBoxLoss,
    MultiBoxLossParams,
    Normalization,
    match_priors,
    targets_from_caffe_labels,
)
from toolkit.models.priors import split_caffe_priorbox_blob

DSOD_PARAMS = dict(num_classes=21, loc_loss_type=LocLossType.SMOOTH_L1, match_type=MatchType.PER_PREDICTION,
                   overlap_threshold=0.5, use_prior_for_matching=True, background_label_id=0, use_difficult_gt=True,
                   neg_pos_ratio=3.0, neg_overlap=0.5, code_type=CodeType.CENTER_SIZE,
                   mining_type=MiningType.MAX_NEGATIVE, normalization=Normalization.VALID)


def _params_from_meta(meta: dict) -> MultiBoxLossParams:
    m = meta["multibox_loss_param"]

    def flag(key, default):
        return m[key] in ("true", True) if key in m else default

    return MultiBoxLossParams(
        num_classes=meta["num_classes"],
        loc_loss_type=LocLossType(m.get("loc_loss_type", "SMOOTH_L1")),
        loc_weight=float(m.get("loc_weight", 1.0)),
        match_type=MatchType(m.get("match_type", "PER_PREDICTION")),
        overlap_threshold=float(m.get("overlap_threshold", 0.5)),
        use_prior_for_matching=flag("use_prior_for_matching", True),
        background_label_id=int(m.get("background_label_id", 0)),
        use_difficult_gt=flag("use_difficult_gt", True),
        neg_pos_ratio=float(m.get("neg_pos_ratio", 3.0)),
        neg_overlap=float(m.get("neg_overlap", 0.5)),
        code_type=CodeType(m.get("code_type", "CENTER_SIZE")),
        encode_variance_in_target=flag("encode_variance_in_target", False),
        ignore_cross_boundary_bbox=flag("ignore_cross_boundary_bbox", False),
        mining_type=MiningType(m.get("mining_type", "MAX_NEGATIVE")),
        normalization=Normalization(meta["normalization"]),
    )


def _check(inputs, params, loss_ref, loc_grad_ref, conf_grad_ref):
    n = inputs["mbox_loc"].shape[0]
    priors, variances = split_caffe_priorbox_blob(torch.from_numpy(inputs["mbox_priorbox"]))
    p = priors.shape[0]
    loc = torch.from_numpy(inputs["mbox_loc"]).reshape(n, p, 4).requires_grad_()
    conf = torch.from_numpy(inputs["mbox_conf"]).reshape(n, p, -1).requires_grad_()
    targets = targets_from_caffe_labels(torch.from_numpy(inputs["label"]), n)
    out = MultiBoxLoss(params)(loc, conf, priors, variances, targets)
    out["loss"].backward()
    assert out["loss"].item() == pytest.approx(float(loss_ref), rel=1e-5, abs=1e-7)
    for got, ref in ((loc.grad.reshape(n, -1).numpy(), loc_grad_ref), (conf.grad.reshape(n, -1).numpy(), conf_grad_ref)):
        np.testing.assert_array_equal(got != 0, ref != 0)  # matched positives / mined negatives exactly
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    return out


@pytest.mark.parametrize("case", ["dsod", "empty", "v1_nodifficult_bipartite",
                                  "v2_nomining_l2_corner_crossboundary", "v3_predmatch_varintarget"])
def test_multibox_loss_variants(case):
    folder = require_fixture(f"caffe/multibox_loss/{case}")
    meta = json.loads((folder / "meta.json").read_text())
    out = np.load(folder / "output.npz")
    _check(np.load(folder / "input.npz"), _params_from_meta(meta), out["mbox_loss"],
           out["mbox_loc_diff"], out["mbox_conf_diff"])


def test_dsod300_real_loss_and_gradients():
    data = np.load(require_fixture("caffe/dsod300/multibox_loss_2007_000027.npz"))
    out = _check(data, MultiBoxLossParams(**DSOD_PARAMS), data["mbox_loss"], data["mbox_loc_diff"],
                 data["mbox_conf_diff"])
    assert int(out["num_neg"]) == 3 * int(out["num_pos"]) > 0


def test_bipartite_ties_and_per_prediction_threshold():
    priors = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.4, 0.4, 0.9, 0.9]])
    gt = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    match, overlaps = match_priors(priors, gt, MatchType.BIPARTITE)
    # Priors 0 and 1 tie for gt 0: the lowest prior index wins; prior 3 is not matched.
    assert match.tolist() == [0, -1, 1, -1]
    match, _ = match_priors(priors, gt, MatchType.PER_PREDICTION, overlap_threshold=0.5)
    assert match.tolist() == [0, 0, 1, -1]  # prior 3's best IoU (0.47) is below 0.5
    assert overlaps[3] == pytest.approx(0.16 / 0.34)


def test_background_label_in_targets_is_an_error():
    loss = MultiBoxLoss(MultiBoxLossParams(num_classes=3))
    priors = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    with pytest.raises(ValueError, match="background label"):
        loss(torch.zeros(1, 1, 4), torch.zeros(1, 1, 3), priors, torch.full((1, 4), 0.1),
             [{"boxes": priors, "labels": torch.tensor([0])}])


@pytest.mark.parametrize("seed", range(6))
def test_batched_matching_equals_the_per_image_matcher(seed):
    """Random images (some without ground truth), coordinates on a coarse grid so that IoU ties
    and duplicate boxes occur, priors crossing the border: the batched matcher must pick
    exactly the per-image reference's matches and overlaps."""
    from toolkit.models.multibox_loss import MatchType, match_priors, match_priors_batched

    g = torch.Generator().manual_seed(seed)
    priors = torch.randint(-2, 12, (300, 2), generator=g).float() / 10
    priors = torch.cat([priors, priors + torch.randint(1, 5, (300, 2), generator=g).float() / 10], 1)
    counts = [int(c) for c in torch.randint(0, 6, (5,), generator=g)]
    gt = torch.zeros(5, max(counts), 4)
    valid = torch.zeros(5, max(counts), dtype=torch.bool)
    for i, c in enumerate(counts):
        xy = torch.randint(0, 8, (c, 2), generator=g).float() / 10
        boxes = torch.cat([xy, xy + torch.randint(1, 4, (c, 2), generator=g).float() / 10], 1)
        if c > 2:
            boxes[1] = boxes[0]  # a duplicate: equal IoUs with every prior
        gt[i, :c], valid[i, :c] = boxes, True
    for match_type in (MatchType.PER_PREDICTION, MatchType.BIPARTITE):
        for cross in (False, True):
            match, overlaps = match_priors_batched(priors, gt, valid, match_type, 0.5, cross)
            for i, c in enumerate(counts):
                ref_match, ref_overlaps = match_priors(priors, gt[i, :c], match_type, 0.5, cross)
                assert torch.equal(match[i], ref_match), (match_type, cross, i)
                torch.testing.assert_close(overlaps[i], ref_overlaps, rtol=0, atol=0)
