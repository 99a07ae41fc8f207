"""GFL's QFL and DFL, and LD's KL term, against values computed by hand from their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from toolkit.distill.ld import ld_kl_loss
from toolkit.models.gfl_losses import distribution_focal_loss, quality_focal_loss


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _bce(x: float, y: float) -> float:
    p = _sigmoid(x)
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_quality_focal_loss_by_hand():
    logits = torch.tensor([[0.5, -1.0, 2.0], [-0.3, 0.8, 0.1]], dtype=torch.float64)
    labels = torch.tensor([2, 3])  # the first location is a positive of class 2 (quality 0.6); the second negative
    quality = torch.tensor([0.6, 0.9], dtype=torch.float64)
    got = quality_focal_loss(logits, labels, quality)
    first = (_bce(0.5, 0) * _sigmoid(0.5) ** 2 + _bce(-1.0, 0) * _sigmoid(-1.0) ** 2
             + _bce(2.0, 0.6) * abs(0.6 - _sigmoid(2.0)) ** 2)
    second = sum(_bce(x, 0) * _sigmoid(x) ** 2 for x in (-0.3, 0.8, 0.1))
    torch.testing.assert_close(got, torch.tensor([first, second], dtype=torch.float64), rtol=1e-12, atol=0)
    # beta 1 and a negative written -1.
    got = quality_focal_loss(logits, torch.tensor([0, -1]), quality, beta=1.0)
    first = _bce(0.5, 0.6) * abs(0.6 - _sigmoid(0.5)) + _bce(-1.0, 0) * _sigmoid(-1.0) + _bce(2.0, 0) * _sigmoid(2.0)
    torch.testing.assert_close(got[0], torch.tensor(first, dtype=torch.float64), rtol=1e-12, atol=0)
    # A positive predicted exactly at its quality costs nothing in its own class.
    exact = quality_focal_loss(torch.tensor([[math.log(0.6 / 0.4)]], dtype=torch.float64), torch.tensor([0]),
                               torch.tensor([0.6], dtype=torch.float64))
    assert float(exact) == pytest.approx(0.0, abs=1e-15)


def test_distribution_focal_loss_by_hand():
    logits = torch.tensor([[0.2, 1.0, -0.5, 0.3], [2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([1.25, 0.0], dtype=torch.float64)
    got = distribution_focal_loss(logits, target)

    def ce(row, k):
        return -(row[k] - math.log(sum(math.exp(v) for v in row)))

    rows = logits.tolist()
    want = [0.75 * ce(rows[0], 1) + 0.25 * ce(rows[0], 2), 1.0 * ce(rows[1], 0)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        distribution_focal_loss(logits, torch.tensor([3.0, 0.5], dtype=torch.float64))


def test_ld_kl_loss_by_hand():
    student = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[3.0, 0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    t = 2.0

    def softmax(row):
        e = [math.exp(v / t) for v in row]
        return [v / sum(e) for v in e]

    p, q = softmax([3.0, 0.0, 1.0]), softmax([1.0, 2.0, 0.5])
    want = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)) / 3 * t * t
    got = ld_kl_loss(student, teacher, t)
    torch.testing.assert_close(got, torch.tensor([want], dtype=torch.float64), rtol=1e-12, atol=0)
    got.sum().backward()
    assert teacher.grad is None and student.grad is not None  # the teacher is a target only
    assert float(ld_kl_loss(teacher.detach(), teacher.detach(), 10.0)) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match=">= 1"):
        ld_kl_loss(student, teacher, 0.5)
