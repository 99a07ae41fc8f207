"""FRS's richness mask and losses against values computed by hand from the official definition."""

from __future__ import annotations

import math

import pytest
import torch

from toolkit.distill.frs import class_probabilities, frs_losses, richness_mask


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
