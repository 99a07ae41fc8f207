"""Feature-richness distillation (Du et al., NeurIPS 2021; duzhixing/FRS, ``detectors/distill_frs_single.py``).

At each location of each pyramid level the *feature richness* is the teacher's highest class probability there
(over every anchor and class of the level's classification map).  It weights, per level,

- the squared difference of the teacher's features and the student's (after an adaptation layer when their
  channels differ): ``sum((t - s)^2 * mask) / sum(mask)``;
- the binary cross-entropy of the student's class probabilities against the teacher's:
  ``sum(BCE(p_s, p_t) * mask) / sum(mask)``,

and the levels are summed, as the official ``forward_train`` does.  For sigmoid heads (FRS's RetinaNet, GFL) the
probabilities are the sigmoids of the class map; for the SSD family's softmax heads they are each prior's softmax
without the background column (``kind="softmax"``), so that the mask means the same: how sure the teacher is
that some object is there.

In the toolkit the features are the detector's sources (the maps its head reads, before the head's L2Norm) and
the student's go through FRS's adaptation layer (``ADAP``: a 3x3 convolution with a bias per level, no
activation, trained with the student and kept out of its checkpoint's model); the teacher's levels must have the
student's sizes.  The official weights: feature 0.1 and classification 0.05 for GFL (FRS's GFL config), 0.005 and
0.02 for RetinaNet's anchor head, which the SSD heads take; both terms ramp up linearly over the first 500
iterations (``distill_warm_step``: ``iteration / 500`` times the loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.models.gfl import level_maps
from toolkit.models.priors import prior_maps

KINDS = ("sigmoid", "softmax")


def class_probabilities(cls_map: torch.Tensor, kind: str, num_classes: int, background: int = 0) -> torch.Tensor:
    """A level's class map ``(B, A * K, H, W)`` (``A`` anchors of ``K`` logits each) -> the foreground
    probabilities ``(B, A * C, H, W)``: sigmoids (``K = C = num_classes``), or each anchor's softmax over its ``K``
    logits with the ``background`` column dropped (``C = K - 1``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown FRS head kind {kind!r}; choose from {KINDS}")
    b, channels, h, w = cls_map.shape
    if channels % num_classes:
        raise ValueError(f"a class map of {channels} channels is not a whole number of {num_classes}-way anchors")
    if kind == "sigmoid":
        return cls_map.sigmoid()
    anchors = channels // num_classes
    probs = cls_map.reshape(b, anchors, num_classes, h, w).softmax(dim=2)
    keep = [c for c in range(num_classes) if c != background]
    return probs[:, :, keep].reshape(b, anchors * len(keep), h, w)


def richness_mask(teacher_probs: torch.Tensor) -> torch.Tensor:
    """``(B, A * C, H, W)`` teacher foreground probabilities -> ``(B, H, W)``, their maximum (no gradient)."""
    return teacher_probs.detach().max(dim=1).values


def frs_losses(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
               student_probs: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(feature loss, classification loss)`` summed over levels (unweighted; FRS's weights multiply them).

    Args:
        student_feats: per level ``(B, D, H, W)``, already adapted to the teacher's channels.
        teacher_feats: per level ``(B, D, H, W)``.
        student_probs, teacher_probs: per level ``(B, A * C, H, W)`` from :func:`class_probabilities`.
    """
    if not (len(student_feats) == len(teacher_feats) == len(student_probs) == len(teacher_probs)) \
            or not student_feats:
        raise ValueError("FRS needs the same, non-zero number of levels of features and class maps")
    feat_loss = student_feats[0].new_zeros(())
    cls_loss = student_feats[0].new_zeros(())
    for level, (s, t, ps, pt) in enumerate(zip(student_feats, teacher_feats, student_probs, teacher_probs)):
        if s.shape != t.shape or ps.shape != pt.shape:
            raise ValueError(f"level {level}: student {tuple(s.shape)} / {tuple(ps.shape)} and teacher "
                             f"{tuple(t.shape)} / {tuple(pt.shape)} differ")
        mask = richness_mask(pt)
        t, pt = t.detach(), pt.detach()
        feat_loss = feat_loss + ((t - s) ** 2 * mask[:, None]).sum() / mask.sum()
        bce = F.binary_cross_entropy(ps, pt, reduction="none")
        cls_loss = cls_loss + (bce * mask[:, None]).sum() / mask.sum()
    return feat_loss, cls_loss


# (feature, classification) weights of FRS's configs: GFL's for sigmoid GFL heads, RetinaNet's (the anchor head
# with several anchors per location) for the SSD family's softmax heads.
FRS_WEIGHTS = {"sigmoid": (0.1, 0.05), "softmax": (0.005, 0.02)}


@dataclass(frozen=True)
class FRSParams:
    """FRS's configuration: the weights of the two terms and the linear warm-up length in iterations (GFL's
    defaults; :meth:`for_head` picks a head kind's)."""

    feat_weight: float = FRS_WEIGHTS["sigmoid"][0]
    cls_weight: float = FRS_WEIGHTS["sigmoid"][1]
    warmup_iters: int = 500

    @classmethod
    def for_head(cls, kind: str, feat_weight: Optional[float] = None, cls_weight: Optional[float] = None,
                 warmup_iters: int = 500) -> "FRSParams":
        """The official weights of head ``kind`` (:data:`FRS_WEIGHTS`) where a weight is ``None``.

        Raises:
            ValueError: an unknown kind or a negative warm-up.
        """
        if kind not in FRS_WEIGHTS:
            raise ValueError(f"unknown FRS head kind {kind!r}; choose from {KINDS}")
        if warmup_iters < 0:
            raise ValueError(f"the FRS warm-up must be >= 0 iterations, got {warmup_iters}")
        feat, cls_ = FRS_WEIGHTS[kind]
        return cls(feat if feat_weight is None else feat_weight, cls_ if cls_weight is None else cls_weight,
                   warmup_iters)

    def ramp(self, iteration: int) -> float:
        """FRS's ``distill_warm_step``: ``iteration / warmup_iters`` until the warm-up ends, then 1."""
        return min(1.0, iteration / self.warmup_iters) if self.warmup_iters else 1.0


class FeatureAdaptation(nn.Module):
    """FRS's ``ADAP``: per level, a 3x3 convolution (bias, no activation) from the student's channels to the
    teacher's; ``forward(list of (B, C_s, H, W)) -> list of (B, C_t, H, W)``."""

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int]) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(f"the student has {len(student_channels)} feature levels, the teacher "
                             f"{len(teacher_channels)}")
        self.convs = nn.ModuleList(nn.Conv2d(s, t, 3, padding=1) for s, t in zip(student_channels, teacher_channels))

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.convs, feats)]


def head_kind(out: dict) -> str:
    """``"sigmoid"`` for a GFL head's output (``cls_logits``), ``"softmax"`` for the SSD family's (``conf``)."""
    if "cls_logits" in out:
        return "sigmoid"
    if "conf" in out:
        return "softmax"
    raise ValueError(f"FRS needs a GFL or SSD head's output; got keys {sorted(out)}")


def level_probabilities(out: dict, priors_per_cell: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
    """A detector's class maps as per-level foreground probabilities ``(B, A * C, H, W)`` (:func:`class_probabilities`).

    Args:
        out: a :class:`~toolkit.models.gfl.GFLDetector` output (``cls_logits`` ``(B, P, C)``, ``feature_hws``) or an
            :class:`~toolkit.models.ssd.SSDDetector` one (``conf`` ``(B, P, K)`` with the background at 0,
            ``sources`` for the level sizes).
        priors_per_cell: the SSD head's priors per cell of each level.
    """
    kind = head_kind(out)
    if kind == "sigmoid":
        maps = level_maps(out["cls_logits"], out["feature_hws"])
        return [class_probabilities(m, kind, m.shape[1]) for m in maps]
    if priors_per_cell is None:
        raise ValueError("an SSD head's class maps need its priors per cell")
    shapes = [tuple(s.shape[-2:]) for s in out["sources"]]
    k = out["conf"].shape[-1]
    return [class_probabilities(m, kind, k) for m in prior_maps(out["conf"], shapes, priors_per_cell)]
