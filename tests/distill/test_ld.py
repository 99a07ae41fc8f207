"""LD's losses on the GFL head against a plain loop written from LD's ``LDHead.loss_single``, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from toolkit.distill.ld import LD_IMAGES_PER_GPU, LDParams, ld_losses, vlr_regions
from toolkit.models.atss import atss_vlr_region
from toolkit.models.gfl import GFLTargets


def _kl(student, teacher, t):
    """T^2 * mean over bins of q * (log q - log p), q = softmax(teacher / T), p = softmax(student / T)."""
    def softmax(v):
        m = max(v)
        e = [math.exp((x - m) / t) for x in v]
        return [x / sum(e) for x in e]

    q, p = softmax(teacher), softmax(student)
    return t * t * sum(qi * (math.log(qi) - math.log(pi)) for qi, pi in zip(q, p)) / len(q)


def _naive(student, teacher, labels, vlr, hws, params):
    """LD's terms for one GPU's batch: sums over positives / region, per-level means for KD, levels summed."""
    s_cls, s_reg = student["cls_logits"].tolist(), student["reg_logits"].tolist()
    t_cls, t_reg = teacher["cls_logits"].tolist(), teacher["reg_logits"].tolist()
    n, c = len(s_cls), len(s_cls[0][0])
    ld = ld_vlr = kd = 0.0
    start = 0
    for h, w in hws:
        level_kd, level_pos = 0.0, 0
        for i in range(n):
            for loc in range(start, start + h * w):
                weight = max(1 / (1 + math.exp(-x)) for x in s_cls[i][loc])
                for edge in range(4):
                    kl = _kl(s_reg[i][loc][edge], t_reg[i][loc][edge], params.temperature)
                    if labels[i][loc] < c:
                        ld += weight * kl / 4
                    if vlr[i][loc] > 0:
                        ld_vlr += vlr[i][loc] * _kl(s_reg[i][loc][edge], t_reg[i][loc][edge],
                                                    params.vlr_temperature) / 16
                if labels[i][loc] < c:
                    level_kd += _kl(s_cls[i][loc], t_cls[i][loc], params.kd_temperature)
                    level_pos += 1
        if level_pos:
            kd += level_kd / level_pos
        start += h * w
    return {"loss_ld": params.weight * ld, "loss_ld_vlr": params.vlr_weight * ld_vlr, "loss_kd": params.kd_weight * kd}


def _batch(n, seed, hws=((4, 4), (2, 2), (1, 1)), c=3, bins=5):
    gen = torch.Generator().manual_seed(seed)
    p = sum(h * w for h, w in hws)

    def out():
        return {"cls_logits": torch.randn(n, p, c, generator=gen, dtype=torch.float64) * 2,
                "reg_logits": torch.randn(n, p, 4, bins, generator=gen, dtype=torch.float64) * 3,
                "feature_hws": list(hws)}

    labels = torch.full((n, p), c, dtype=torch.int64)
    pick = torch.rand(n, p, generator=gen) < 0.25
    labels[pick] = torch.randint(0, c, (int(pick.sum()),), generator=gen)
    labels[0, 0] = 1  # at least one positive
    vlr = torch.rand(n, p, generator=gen, dtype=torch.float64) * (torch.rand(n, p, generator=gen) < 0.3)
    assigned = GFLTargets(labels, torch.zeros(n, p, 4, dtype=torch.float64), torch.zeros(n, p, dtype=torch.float64),
                          (labels < c).sum(dim=1))
    return out(), out(), assigned, vlr


@pytest.mark.parametrize("seed", [0, 1])
def test_ld_losses_equal_lds_loop_on_one_gpus_batch(seed):
    student, teacher, assigned, vlr = _batch(LD_IMAGES_PER_GPU, seed)
    params = LDParams(temperature=10.0, vlr_temperature=4.0)
    got = ld_losses(student, teacher, assigned, vlr, params)
    want = _naive(student, teacher, assigned.labels.tolist(), vlr.tolist(), student["feature_hws"], params)
    for key, value in want.items():
        assert got[key].item() == pytest.approx(value, rel=1e-10), key
        assert value > 0


def test_larger_batches_are_lds_loss_averaged_over_gpus_of_three_images():
    student, teacher, assigned, vlr = _batch(2 * LD_IMAGES_PER_GPU, 2)
    got = ld_losses(student, teacher, assigned, vlr)
    halves = []
    for part in (slice(0, 3), slice(3, 6)):
        halves.append(_naive({k: v[part] if torch.is_tensor(v) else v for k, v in student.items()},
                             {k: v[part] if torch.is_tensor(v) else v for k, v in teacher.items()},
                             assigned.labels[part].tolist(), vlr[part].tolist(), student["feature_hws"], LDParams()))
    for key in ("loss_ld", "loss_ld_vlr"):
        assert got[key].item() == pytest.approx((halves[0][key] + halves[1][key]) / 2, rel=1e-10)


def test_the_teacher_gets_no_gradient_and_the_student_does():
    student, teacher, assigned, vlr = _batch(2, 3)
    for out in (student, teacher):
        for key in ("cls_logits", "reg_logits"):
            out[key].requires_grad_(True)
    losses = ld_losses(student, teacher, assigned, vlr)
    sum(losses.values()).backward()
    assert teacher["cls_logits"].grad is None and teacher["reg_logits"].grad is None
    assert student["reg_logits"].grad.abs().sum() > 0 and student["cls_logits"].grad.abs().sum() > 0


def test_no_positives_and_no_region_give_zeros_and_mismatched_teachers_are_refused():
    student, teacher, assigned, vlr = _batch(2, 4)
    assigned.labels.fill_(3)
    losses = ld_losses(student, teacher, assigned, torch.zeros_like(vlr))
    assert all(v.item() == 0 for v in losses.values())
    smaller = {**teacher, "reg_logits": teacher["reg_logits"][:, :-1]}
    with pytest.raises(ValueError, match="one to one"):
        ld_losses(student, smaller, assigned, vlr)


def test_vlr_regions_leave_difficult_boxes_out():
    anchors = torch.tensor([[0, 0, 8, 8], [8, 0, 16, 8], [0, 8, 8, 16], [8, 8, 16, 16], [0, 0, 16, 16]],
                           dtype=torch.float32)
    out = {"anchors": anchors, "feature_hws": [(2, 2), (1, 1)]}
    boxes = torch.tensor([[1.0, 1.0, 12.0, 9.0], [4.0, 6.0, 14.0, 16.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2]), "difficult": torch.tensor([False, True])}]
    got = vlr_regions(out, targets)
    torch.testing.assert_close(got[0], atss_vlr_region(anchors, [4, 1], boxes[:1]))
    both = vlr_regions(out, targets, use_difficult_gt=True)[0]
    torch.testing.assert_close(both, atss_vlr_region(anchors, [4, 1], boxes))
    assert not torch.equal(both, got[0])
