"""SSD box coding: SSD-Caffe's ``EncodeBBox`` / ``DecodeBBox`` for the three code types.

Boxes are normalized ``xyxy`` (Caffe's ``NormalizedBBox``); ``p`` a prior with
width ``pw = p.xmax - p.xmin``, height ``ph``, centre ``(pcx, pcy)``; ``v`` its
four variances; ``l`` the network's location output.

Decoding (``DecodeBBox``; never clipped)::

    CENTER_SIZE   cx = v0 * l0 * pw + pcx        cy = v1 * l1 * ph + pcy
                  w  = exp(v2 * l2) * pw         h  = exp(v3 * l3) * ph
    CORNER        xmin = p.xmin + v0 * l0  (ymin, xmax, ymax likewise with v1, v2, v3)
    CORNER_SIZE   xmin = p.xmin + v0 * l0 * pw   ymin = p.ymin + v1 * l1 * ph
                  xmax = p.xmax + v2 * l2 * pw   ymax = p.ymax + v3 * l3 * ph

Encoding is the inverse (``tx = (bcx - pcx) / pw / v0``, ``tw = log(bw / pw) / v2``
for CENTER_SIZE, ...).  With ``variance_encoded_in_target`` the variances are
taken as 1: the targets (and the network) already carry them.
"""

from __future__ import annotations

from enum import Enum

import torch


class CodeType(str, Enum):
    """Caffe ``PriorBoxParameter.CodeType``."""

    CORNER = "CORNER"
    CENTER_SIZE = "CENTER_SIZE"
    CORNER_SIZE = "CORNER_SIZE"


def _prior_geometry(priors_xyxy: torch.Tensor):
    pw = priors_xyxy[..., 2] - priors_xyxy[..., 0]
    ph = priors_xyxy[..., 3] - priors_xyxy[..., 1]
    pcx = (priors_xyxy[..., 0] + priors_xyxy[..., 2]) / 2
    pcy = (priors_xyxy[..., 1] + priors_xyxy[..., 3]) / 2
    return pw, ph, pcx, pcy


def decode_boxes(
    loc: torch.Tensor,
    priors_xyxy: torch.Tensor,
    variances: torch.Tensor,
    code_type: CodeType | str = CodeType.CENTER_SIZE,
    variance_encoded_in_target: bool = False,
) -> torch.Tensor:
    """Location outputs → normalized xyxy boxes.

    Args:
        loc: ``(..., P, 4)`` network outputs.
        priors_xyxy: ``(P, 4)`` normalized priors.
        variances: ``(P, 4)`` prior variances (ignored with ``variance_encoded_in_target``).
    Returns:
        ``(..., P, 4)`` normalized xyxy boxes.
    """
    code_type = CodeType(code_type)
    v = torch.ones_like(variances) if variance_encoded_in_target else variances
    if code_type is CodeType.CORNER:
        return priors_xyxy + v * loc
    pw, ph, pcx, pcy = _prior_geometry(priors_xyxy)
    if code_type is CodeType.CORNER_SIZE:
        scale = torch.stack([pw, ph, pw, ph], dim=-1)
        return priors_xyxy + v * loc * scale
    cx = v[..., 0] * loc[..., 0] * pw + pcx
    cy = v[..., 1] * loc[..., 1] * ph + pcy
    w = torch.exp(v[..., 2] * loc[..., 2]) * pw
    h = torch.exp(v[..., 3] * loc[..., 3]) * ph
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def encode_boxes(
    boxes_xyxy: torch.Tensor,
    priors_xyxy: torch.Tensor,
    variances: torch.Tensor,
    code_type: CodeType | str = CodeType.CENTER_SIZE,
    variance_encoded_in_target: bool = False,
) -> torch.Tensor:
    """Normalized xyxy boxes → location targets for their priors (row by row).

    Args:
        boxes_xyxy, priors_xyxy, variances: ``(M, 4)`` each (a box and its prior per row).
    Returns:
        ``(M, 4)`` targets.
    """
    code_type = CodeType(code_type)
    v = torch.ones_like(variances) if variance_encoded_in_target else variances
    if code_type is CodeType.CORNER:
        return (boxes_xyxy - priors_xyxy) / v
    pw, ph, pcx, pcy = _prior_geometry(priors_xyxy)
    if code_type is CodeType.CORNER_SIZE:
        scale = torch.stack([pw, ph, pw, ph], dim=-1)
        return (boxes_xyxy - priors_xyxy) / scale / v
    bw, bh, bcx, bcy = _prior_geometry(boxes_xyxy)
    return torch.stack(
        [
            (bcx - pcx) / pw / v[..., 0],
            (bcy - pcy) / ph / v[..., 1],
            torch.log(bw / pw) / v[..., 2],
            torch.log(bh / ph) / v[..., 3],
        ],
        dim=-1,
    )


def jaccard_normalized(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of normalized boxes, Caffe's ``JaccardOverlap`` (no ``+1``): ``(..., A, 4) x (..., B, 4) → (..., A, B)``
    (leading dimensions broadcast, e.g. a batch of images).

    Disjoint boxes have IoU 0; a box with ``xmax < xmin`` or ``ymax < ymin`` has size 0.
    The result may be a transposed view: the longer list of boxes is laid along the last,
    contiguous axis (thousands of priors against a few ground-truth boxes), which does
    not change a single bit of the values since every step of the formula is symmetric.
    """
    if boxes_a.shape[-2] > boxes_b.shape[-2]:
        return _jaccard(boxes_b, boxes_a).transpose(-1, -2)
    return _jaccard(boxes_a, boxes_b)


def _jaccard(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    # Coordinate planes: a's as (..., A, 1) columns, b's contiguous as (..., 1, B) rows.
    ax0, ay0, ax1, ay1 = (c.unsqueeze(-1) for c in boxes_a.unbind(-1))
    bx0, by0, bx1, by1 = (c.unsqueeze(-2) for c in boxes_b.movedim(boxes_b.dim() - 1, 0).contiguous())
    ix0 = torch.maximum(ax0, bx0)
    iy0 = torch.maximum(ay0, by0)
    ix1 = torch.minimum(ax1, bx1)
    iy1 = torch.minimum(ay1, by1)
    disjoint = (ix1 < ix0) | (iy1 < iy0)
    inter = (ix1 - ix0) * (iy1 - iy0)

    def size(x0, y0, x1, y1):
        w = x1 - x0
        h = y1 - y0
        return torch.where((w < 0) | (h < 0), torch.zeros_like(w), w * h)

    union = size(ax0, ay0, ax1, ay1) + size(bx0, by0, bx1, by1) - inter
    iou = inter / union
    return torch.where(disjoint | (union <= 0), torch.zeros_like(iou), iou)
