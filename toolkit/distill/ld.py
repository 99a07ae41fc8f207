"""Localization distillation's term (Zheng et al., CVPR 2022; HikariTJU/LD, ``kd_loss.py``).

The teacher's and the student's distributions of one box edge (GFL's ``reg_max + 1`` bins) are softened with a
temperature ``T``; the loss is ``KL(teacher || student)`` averaged over the bins, times ``T ** 2``, per edge
(LD's ``knowledge_distillation_kl_div_loss``: ``F.kl_div(log_softmax(s / T), softmax(t / T)).mean(1) * T * T``).
The same term on class scores is LD's classification KD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
