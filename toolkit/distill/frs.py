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
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

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
