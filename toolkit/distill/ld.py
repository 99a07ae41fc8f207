"""Localization distillation's term (Zheng et al., CVPR 2022; HikariTJU/LD, ``kd_loss.py``).

The teacher's and the student's distributions of one box edge (GFL's ``reg_max + 1`` bins) are softened with a
temperature ``T``; the loss is ``KL(teacher || student)`` averaged over the bins, times ``T ** 2``, per edge
(LD's ``knowledge_distillation_kl_div_loss``: ``F.kl_div(log_softmax(s / T), softmax(t / T)).mean(1) * T * T``).
The same term on class scores is LD's classification KD.

:func:`ld_losses` puts LD's head (``LDHead.loss_single``) together on the toolkit's GFL head
(:mod:`toolkit.models.gfl`): the main distillation region (the positives of the ATSS assignment), the valuable
localization region (:func:`~toolkit.models.atss.atss_vlr_region`) and KD of the class scores at the positives.
The teacher must have the student's locations (the same levels on the same input; its widths may differ).
Self-LD is the same with a trained teacher of the student's own architecture; a teacher-assistant chain is two
runs, the second taught by the first's student.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from toolkit.models.atss import atss_vlr_region
from toolkit.models.gfl import GFLTargets


def ld_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 10.0) -> torch.Tensor:
    """Per row of ``(N, K)`` logits (edges x bins, or locations x classes) -> ``(N,)``; the teacher carries no
    gradient.

    Raises:
        ValueError: shapes that differ, or a temperature below 1 (LD asserts ``T >= 1``).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits "
                         "must have the same shape")
    if temperature < 1:
        raise ValueError(f"the LD temperature must be >= 1, got {temperature}")
    target = F.softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), target, reduction="none")
    return kl.mean(dim=1) * temperature ** 2


# LD's configs train with samples_per_gpu=3 and sum the localization terms over a GPU's positives; the gradients of
# the GPUs are averaged.  The toolkit sums over each image and scales the mean over the batch by this number, which
# equals LD's loss for a batch split over GPUs of 3 images and keeps the terms' balance with the task loss whatever
# the batch size.
LD_IMAGES_PER_GPU = 3


@dataclass(frozen=True)
class LDParams:
    """LD's loss configuration (``LDHead``'s defaults and the LD configs).

    Attributes:
        temperature, weight: the main-region LD term (``loss_ld``: T 10, weight 0.25).
        vlr_temperature, vlr_weight: the valuable-localization-region term (``loss_ld_vlr``: T 10, weight 0.25).
        kd_temperature, kd_weight: KD of the class scores at the positives (``loss_kd``: T 2, weight 10; the
            trainer's ``--ld-kd-weight`` defaults to 1, see its help).
        vlr_lower: the region's lower DIoU bound as a fraction of the ATSS threshold (0.25).
        topk: ATSS candidates per level (the assignment's, 9).
    """

    temperature: float = 10.0
    weight: float = 0.25
    vlr_temperature: float = 10.0
    vlr_weight: float = 0.25
    kd_temperature: float = 2.0
    kd_weight: float = 10.0
    vlr_lower: float = 0.25
    topk: int = 9


def vlr_regions(out: dict, targets: Sequence[dict], params: LDParams = LDParams(),
                use_difficult_gt: bool = False) -> torch.Tensor:
    """Each image's valuable localization region (:func:`~toolkit.models.atss.atss_vlr_region`) on a GFL model's
    anchors -> ``(N, P)`` IoU weights (0 outside).  ``targets`` as :func:`~toolkit.models.gfl.gfl_targets` takes
    them (pixels of the network input); difficult boxes are left out, as the assignment leaves them out."""
    anchors = out["anchors"]
    counts = [h * w for h, w in out["feature_hws"]]
    rows = []
    for t in targets:
        boxes = t["boxes"].to(device=anchors.device, dtype=anchors.dtype).reshape(-1, 4)
        if not use_difficult_gt and "difficult" in t:
            boxes = boxes[~t["difficult"].to(device=anchors.device, dtype=torch.bool).reshape(-1)]
        rows.append(atss_vlr_region(anchors, counts, boxes, params.topk, params.vlr_lower))
    return torch.stack(rows) if rows else anchors.new_zeros(0, anchors.shape[0])


def ld_losses(student: dict, teacher: dict, assigned: GFLTargets, vlr: torch.Tensor,
              params: LDParams = LDParams()) -> dict[str, torch.Tensor]:
    """LD's three terms for a batch, weighted (``LDHead.loss_single``, summed over levels).

    - ``loss_ld``: at the positives of the assignment, the KL term of each edge's distribution (temperature
      ``params.temperature``), weighted by the student's highest class probability there (GFL's box weight, no
      gradient), summed and divided by 4 (LD's ``avg_factor=4.0``);
    - ``loss_ld_vlr``: the same term over the valuable localization region, weighted by the region's IoU values,
      summed and divided by 16;
    - ``loss_kd``: per level, the KL term of the class logits (softmax over the ``C`` classes at
      ``params.kd_temperature``) averaged over the level's positives; the levels summed.

    The two sums are LD's per-GPU sums as :data:`LD_IMAGES_PER_GPU` explains: ``sum / N * 3`` for a batch of
    ``N`` images.

    Args:
        student, teacher: :class:`~toolkit.models.gfl.GFLDetector` outputs of the same locations (float32):
            ``cls_logits`` ``(N, P, C)``, ``reg_logits`` ``(N, P, 4, R + 1)``, ``feature_hws``.
        assigned: the batch's ATSS assignment (:func:`~toolkit.models.gfl.gfl_targets`).
        vlr: ``(N, P)`` from :func:`vlr_regions`.
    Raises:
        ValueError: teacher outputs of another shape (another layout of levels, classes or bins).
    """
    s_cls, s_reg = student["cls_logits"], student["reg_logits"]
    t_cls, t_reg = teacher["cls_logits"].detach(), teacher["reg_logits"].detach()
    for name, s, t in (("cls_logits", s_cls, t_cls), ("reg_logits", s_reg, t_reg)):
        if s.shape != t.shape:
            raise ValueError(f"LD pairs the student's and the teacher's locations one to one: the student's {name} "
                             f"is {tuple(s.shape)}, the teacher's {tuple(t.shape)} (levels {student['feature_hws']} "
                             f"and {teacher['feature_hws']})")
    n, p, c = s_cls.shape
    bins = s_reg.shape[-1]
    per_gpu = LD_IMAGES_PER_GPU / max(n, 1)
    labels = assigned.labels
    pos = labels < c  # (N, P)
    weight = s_cls.detach().sigmoid().max(dim=2).values  # (N, P)
    zero = s_reg.sum() * 0  # keeps every parameter in the graph (DDP)
    loss_ld = zero
    if pos.any():
        kl = ld_kl_loss(s_reg[pos].reshape(-1, bins), t_reg[pos].reshape(-1, bins), params.temperature)
        loss_ld = (kl.reshape(-1, 4) * weight[pos][:, None]).sum() / 4.0 * per_gpu
    region = vlr > 0
    loss_vlr = zero
    if region.any():
        kl = ld_kl_loss(s_reg[region].reshape(-1, bins), t_reg[region].reshape(-1, bins), params.vlr_temperature)
        loss_vlr = (kl.reshape(-1, 4) * vlr[region][:, None]).sum() / 16.0 * per_gpu
    loss_kd = zero
    start = 0
    for h, w in student["feature_hws"]:
        level = slice(start, start + h * w)
        start += h * w
        level_pos = pos[:, level]
        if level_pos.any():
            kl = ld_kl_loss(s_cls[:, level][level_pos], t_cls[:, level][level_pos], params.kd_temperature)
            loss_kd = loss_kd + kl.mean()
    return {"loss_ld": params.weight * loss_ld, "loss_ld_vlr": params.vlr_weight * loss_vlr,
            "loss_kd": params.kd_weight * loss_kd}
