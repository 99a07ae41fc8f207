"""FRS's richness mask and losses against values computed by hand from the official definition."""

from __future__ import annotations

import math

import pytest
import torch

from toolkit.distill.frs import (
    FRS_WEIGHTS,
    FeatureAdaptation,
    FRSParams,
    class_probabilities,
    frs_losses,
    head_kind,
    level_probabilities,
    richness_mask,
)


def test_softmax_heads_drop_the_background_and_sigmoid_heads_keep_every_class():
    # One location, two anchors of three classes (background first).
    logits = torch.tensor([1.0, 0.0, 2.0, 0.5, 3.0, 0.5], dtype=torch.float64).view(1, 6, 1, 1)
    probs = class_probabilities(logits, "softmax", 3)
    e1, e2 = [math.exp(v) for v in (1.0, 0.0, 2.0)], [math.exp(v) for v in (0.5, 3.0, 0.5)]
    want = [e1[1] / sum(e1), e1[2] / sum(e1), e2[1] / sum(e2), e2[2] / sum(e2)]
    torch.testing.assert_close(probs.flatten(), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    assert float(richness_mask(probs)) == pytest.approx(max(want))
    sig = class_probabilities(logits, "sigmoid", 3)
    torch.testing.assert_close(sig, logits.sigmoid())
    with pytest.raises(ValueError, match="whole number"):
        class_probabilities(logits, "softmax", 4)
    with pytest.raises(ValueError, match="unknown FRS head"):
        class_probabilities(logits, "tanh", 3)


def test_frs_losses_by_hand():
    # One level, one image, 2 locations (1 x 2), 1 feature channel, 1 anchor of 1 class (sigmoid head): the
    # richness mask is the teacher's probabilities, 0.9 and 0.2.
    s_feat = torch.tensor([[[[1.0, 2.0]]]], dtype=torch.float64, requires_grad=True)
    t_feat = torch.tensor([[[[0.0, 4.0]]]], dtype=torch.float64)
    p_s = torch.tensor([[[[0.3, 0.6]]]], dtype=torch.float64, requires_grad=True)
    p_t = torch.tensor([[[[0.9, 0.2]]]], dtype=torch.float64)
    feat, cls = frs_losses([s_feat], [t_feat], [p_s], [p_t])

    def bce(p, y):
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    want_feat = (1.0 * 0.9 + 4.0 * 0.2) / 1.1
    want_cls = (bce(0.3, 0.9) * 0.9 + bce(0.6, 0.2) * 0.2) / 1.1
    assert float(feat.detach()) == pytest.approx(want_feat, rel=1e-12)
    assert float(cls.detach()) == pytest.approx(want_cls, rel=1e-12)
    # Two levels add up; only the student gets gradients.
    feat2, cls2 = frs_losses([s_feat, s_feat], [t_feat, t_feat], [p_s, p_s], [p_t, p_t])
    assert float(feat2.detach()) == pytest.approx(2 * want_feat) and float(cls2.detach()) == pytest.approx(2 * want_cls)
    (feat + cls).backward()
    assert s_feat.grad is not None and p_s.grad is not None
    with pytest.raises(ValueError, match="level 0"):
        frs_losses([s_feat], [t_feat[..., :1]], [p_s], [p_t])


def test_level_probabilities_of_the_two_head_kinds_against_loops():
    gen = torch.Generator().manual_seed(0)
    hws, per_cell, k = [(2, 3), (1, 1)], [2, 3], 4
    # SSD head: conf (N, P, K), levels one after another, each cell's priors together; background at 0.
    p = sum(h * w * a for (h, w), a in zip(hws, per_cell))
    conf = torch.randn(2, p, k, generator=gen, dtype=torch.float64)
    out = {"conf": conf, "sources": [torch.zeros(2, 1, h, w) for h, w in hws]}
    assert head_kind(out) == "softmax"
    maps = level_probabilities(out, per_cell)
    row = 0
    for (h, w), a, m in zip(hws, per_cell, maps):
        assert m.shape == (2, a * (k - 1), h, w)
        for y in range(h):
            for x in range(w):
                for prior in range(a):
                    e = [math.exp(v) for v in conf[1, row].tolist()]
                    want = [v / sum(e) for v in e[1:]]
                    got = m[1, prior * (k - 1):(prior + 1) * (k - 1), y, x]
                    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
                    row += 1
    with pytest.raises(ValueError, match="priors per cell"):
        level_probabilities(out)
    # GFL head: cls_logits (N, P, C), one location per cell, sigmoid.
    cls = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64)
    gfl = {"cls_logits": cls, "feature_hws": hws}
    assert head_kind(gfl) == "sigmoid"
    maps = level_probabilities(gfl)
    assert [tuple(m.shape) for m in maps] == [(2, 3, 2, 3), (2, 3, 1, 1)]
    torch.testing.assert_close(maps[0][1, :, 1, 2], cls[1, 5].sigmoid())
    torch.testing.assert_close(maps[1][0, :, 0, 0], cls[0, 6].sigmoid())
    with pytest.raises(ValueError, match="GFL or SSD"):
        head_kind({"pred_logits": cls})


def test_feature_adaptation_maps_the_students_channels_to_the_teachers():
    adapt = FeatureAdaptation([4, 8], [6, 6])
    out = adapt([torch.zeros(1, 4, 5, 5), torch.zeros(1, 8, 2, 2)])
    assert [tuple(o.shape) for o in out] == [(1, 6, 5, 5), (1, 6, 2, 2)]
    assert all(c.kernel_size == (3, 3) and c.bias is not None for c in adapt.convs)
    with pytest.raises(ValueError, match="feature levels"):
        FeatureAdaptation([4], [6, 6])


def test_frs_params_take_each_heads_official_weights_and_ramp_linearly():
    assert (FRSParams.for_head("sigmoid").feat_weight, FRSParams.for_head("sigmoid").cls_weight) == (0.1, 0.05)
    assert (FRSParams.for_head("softmax").feat_weight, FRSParams.for_head("softmax").cls_weight) == (0.005, 0.02)
    assert FRS_WEIGHTS["softmax"] == (0.005, 0.02)
    mixed = FRSParams.for_head("softmax", cls_weight=3.0, warmup_iters=4)
    assert (mixed.feat_weight, mixed.cls_weight) == (0.005, 3.0)
    assert [mixed.ramp(i) for i in (0, 1, 4, 9)] == [0.0, 0.25, 1.0, 1.0]
    assert FRSParams(warmup_iters=0).ramp(0) == 1.0
    with pytest.raises(ValueError, match="unknown FRS head"):
        FRSParams.for_head("tanh")
    with pytest.raises(ValueError, match="warm-up"):
        FRSParams.for_head("sigmoid", warmup_iters=-1)
