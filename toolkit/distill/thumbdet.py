"""ThumbDet's losses (zhangyin1996/ThumbDet, ``models/deformable_detr.py``, ``SetCriterion``).

- :func:`downsample_loss` keeps the thumbnail image-like: per image and channel,
  the squared difference of the means plus 0.1 x that of the variances
  (unbiased), each averaged over images and channels, on images scaled by 1/255
  (the official ``loss_downsample`` divides its [0, 1] inputs by 255 again; kept,
  since the weight 1 was tuned with it).  Means and variances run over the whole
  padded tensor, as officially.
- :func:`kd_loss` (``loss_kd``): the cross-entropy of the student's class
  distribution against the teacher's, softmax over classes at temperature 1,
  ``-p_t * log p_s`` summed over queries then averaged over images and classes.
  ``log_softmax`` replaces the official ``log(softmax)`` (equal up to rounding,
  and finite where a probability underflows).  ``per_prior=True`` is the SSD
  family's form: an SSD has thousands of priors, mostly background, against
  DETR's 300 queries, so the cross-entropy is summed over classes and averaged
  over priors and images.
- :func:`fm_loss` (``loss_fm``): each student feature map resized to its
  teacher's size (bilinear, as torchvision's ``resize`` which the official code
  calls), the mean squared error per level, averaged over levels.

Official weights: classification 2, L1 5, GIoU 2, down-sample 1, KD 0.5, FM 0.1
(:data:`THUMBDET_WEIGHTS`); the first phase (5 of 50 epochs in the paper) trains
with the down-sample loss alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from toolkit.models.priors import prior_maps

THUMBDET_WEIGHTS = {"loss_downsample": 1.0, "loss_kd": 0.5, "loss_fm": 0.1}
DOWNSAMPLE_EPOCHS_FRACTION = 5 / 50  # the paper's first phase


def downsample_loss(src: torch.Tensor, thumb: torch.Tensor) -> torch.Tensor:
    """``src`` ``(B, 3, H, W)`` and ``thumb`` ``(B, 3, h, w)``, both [0, 1] RGB -> a scalar (see the module
    docstring)."""
    src, thumb = src / 255.0, thumb / 255.0
    mean_term = F.mse_loss(src.mean(dim=(2, 3)), thumb.mean(dim=(2, 3)))
    var_term = F.mse_loss(src.var(dim=(2, 3)), thumb.var(dim=(2, 3)))
    return mean_term + 0.1 * var_term


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            per_prior: bool = False) -> torch.Tensor:
    """Student and teacher logits ``(B, Q, K)`` (queries or priors, classes) -> a scalar.

    DETR form: ``sum_q -p_t . log p_s``, averaged over images and classes; ``per_prior``: summed over classes,
    averaged over priors and images.  The teacher's logits carry no gradient.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    p_t = torch.softmax(teacher_logits.detach() / temperature, dim=2)
    cross = -p_t * torch.log_softmax(student_logits / temperature, dim=2)
    if per_prior:
        return cross.sum(dim=2).mean()
    return cross.sum(dim=1).mean()


def resize_to(feature: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, C, *size)`` bilinearly (half-pixel centres; antialiased where it shrinks, as
    torchvision's ``resize`` on tensors)."""
    if tuple(feature.shape[-2:]) == tuple(size):
        return feature
    shrinks = size[0] < feature.shape[-2] or size[1] < feature.shape[-1]
    return F.interpolate(feature, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrinks)


def fm_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Student and teacher feature maps ``[(B, C_l, h_l, w_l)]``, paired level by level (same stride) -> the MSE of
    the resized student map against the teacher's, averaged over levels.  The teacher's maps carry no gradient."""
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(f"{len(student_features)} student and {len(teacher_features)} teacher feature levels: "
                         "they must pair one to one")
    losses = []
    for level, (s, t) in enumerate(zip(student_features, teacher_features)):
        if s.shape[:2] != t.shape[:2]:
            raise ValueError(f"level {level}: student features {tuple(s.shape)} and teacher features "
                             f"{tuple(t.shape)} differ in batch or channels")
        losses.append(F.mse_loss(resize_to(s, t.shape[-2:]), t.detach()))
    return sum(losses) / len(losses)


def ssd_kd_loss(student_conf: torch.Tensor, teacher_conf: torch.Tensor, student_shapes: Sequence[Sequence[int]],
                teacher_shapes: Sequence[Sequence[int]], priors_per_cell: Sequence[int],
                temperature: float = 1.0) -> torch.Tensor:
    """:func:`kd_loss` for the SSD family, whose student sees a smaller image and so has smaller maps.

    Levels pair by stride (level ``l`` of the student with level ``l`` of the teacher: the same layer of the same
    architecture), as ThumbDet pairs C3-C5.  Each student level's logits ``(A_l * C)`` per cell are resized
    bilinearly to the teacher's map, as :func:`fm_loss` resizes features, then each prior's softmax is held to the
    teacher's (``per_prior`` form).

    Args:
        student_conf, teacher_conf: ``(N, P_s, C)`` and ``(N, P_t, C)`` logits (softmax classes, background first).
        student_shapes, teacher_shapes: ``(h, w)`` of each level's map.
        priors_per_cell: priors per cell of each level (the same for both).
    """
    maps_s = prior_maps(student_conf, student_shapes, priors_per_cell)
    maps_t = prior_maps(teacher_conf, teacher_shapes, priors_per_cell)
    n, c = student_conf.shape[0], student_conf.shape[2]

    def rows(m: torch.Tensor) -> torch.Tensor:
        return m.permute(0, 2, 3, 1).reshape(n, -1, c)

    student = torch.cat([rows(resize_to(s, t.shape[-2:])) for s, t in zip(maps_s, maps_t)], dim=1)
    return kd_loss(student, torch.cat([rows(t) for t in maps_t], dim=1), temperature, per_prior=True)
