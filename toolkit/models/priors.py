"""SSD prior (default) boxes with SSD-Caffe's ``PriorBox`` semantics.

Boxes are ``xyxy`` **normalized** by the image size (``[0, 1]`` unless not
clipped), in Caffe's order: for every feature-map cell (row-major, ``h`` then
``w``), for every ``min_size``: the ``min_size`` square, then (if
``max_sizes``) the ``sqrt(min * max)`` square, then one box per extra aspect
ratio.  Caffe behaviours reproduced (``prior_box_layer.cpp``):

- ``min_size`` / ``max_size`` are truncated to ``int`` before use
  (``15.5 -> 15``; GRP-DSOD's ``118.4 -> 118``);
- the aspect-ratio list starts with 1; a ratio within 1e-6 of one already in
  the list is skipped; with ``flip`` the reciprocal follows each kept ratio;
- the step is ``step`` (or ``step_h`` / ``step_w``), else ``image / feature``
  as a float; the centre of cell ``(h, w)`` is ``((w + offset) * step_w,
  (h + offset) * step_h)``;
- ``clip`` clamps every coordinate to ``[0, 1]``;
- variances: none → ``0.1`` for all four, one value → all four, four values → per coordinate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class PriorBoxSpec:
    """The ``prior_box_param`` of one PriorBox layer (Caffe's field names and defaults)."""

    min_sizes: tuple[float, ...]
    max_sizes: tuple[float, ...] = ()
    aspect_ratios: tuple[float, ...] = ()
    flip: bool = True
    clip: bool = False
    variances: tuple[float, ...] = ()
    step: Optional[float] = None
    step_h: Optional[float] = None
    step_w: Optional[float] = None
    img_size: Optional[int] = None
    img_h: Optional[int] = None
    img_w: Optional[int] = None
    offset: float = 0.5

    def __post_init__(self) -> None:
        if not self.min_sizes:
            raise ValueError("PriorBox needs at least one min_size")
        if self.max_sizes and len(self.max_sizes) != len(self.min_sizes):
            raise ValueError(f"max_sizes must match min_sizes in length, got {self.max_sizes} vs {self.min_sizes}")
        for lo, hi in zip(self.min_sizes, self.max_sizes):
            if hi <= lo:
                raise ValueError(f"max_size {hi} must be greater than min_size {lo}")
        if len(self.variances) not in (0, 1, 4):
            raise ValueError(f"give 0, 1 or 4 variances, got {len(self.variances)}")

    @property
    def expanded_aspect_ratios(self) -> tuple[float, ...]:
        """Caffe's ``aspect_ratios_`` list: 1 first, duplicates skipped, reciprocals after each with flip."""
        out = [1.0]
        for ar in self.aspect_ratios:
            if any(abs(ar - e) < 1e-6 for e in out):
                continue
            out.append(float(ar))
            if self.flip:
                out.append(1.0 / ar)
        return tuple(out)

    @property
    def num_priors(self) -> int:
        """Boxes per feature-map cell."""
        return len(self.expanded_aspect_ratios) * len(self.min_sizes) + len(self.max_sizes)

    @classmethod
    def from_caffe(cls, param) -> "PriorBoxSpec":
        """The spec of a ``caffe_pb2.PriorBoxParameter`` (a PriorBox layer's ``prior_box_param``).

        Presence matters as in Caffe: ``img_h`` / ``img_w`` (both) override
        ``img_size``; ``step_h`` / ``step_w`` (both) override ``step``; unset ones
        fall back to the bottom shapes.

        Raises:
            ValueError: Caffe would refuse the parameters (no ``min_size``, a
                ``max_size`` not above its ``min_size``, only one of ``img_h`` /
                ``img_w`` or of ``step_h`` / ``step_w``, 2 or 3 variances).
        """
        has = param.HasField
        if has("img_h") != has("img_w"):
            raise ValueError("PriorBox: give both img_h and img_w, or neither")
        if has("step_h") != has("step_w"):
            raise ValueError("PriorBox: give both step_h and step_w, or neither")
        return cls(
            min_sizes=tuple(float(v) for v in param.min_size),
            max_sizes=tuple(float(v) for v in param.max_size),
            aspect_ratios=tuple(float(v) for v in param.aspect_ratio),
            flip=bool(param.flip),
            clip=bool(param.clip),
            variances=tuple(float(v) for v in param.variance),
            step=float(param.step) if has("step") else None,
            step_h=float(param.step_h) if has("step_h") else None,
            step_w=float(param.step_w) if has("step_w") else None,
            img_size=int(param.img_size) if has("img_size") else None,
            img_h=int(param.img_h) if has("img_h") else None,
            img_w=int(param.img_w) if has("img_w") else None,
            offset=float(param.offset),
        )

    def variance_vector(self) -> tuple[float, float, float, float]:
        if not self.variances:
            return (0.1, 0.1, 0.1, 0.1)
        if len(self.variances) == 1:
            return (self.variances[0],) * 4  # type: ignore[return-value]
        return tuple(self.variances)  # type: ignore[return-value]


def prior_boxes(
    spec: PriorBoxSpec, feature_hw: tuple[int, int], image_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prior boxes of one feature map.

    Args:
        spec: the layer's parameters.
        feature_hw: ``(H, W)`` of the feature map (PriorBox's bottom 0).
        image_hw: ``(H, W)`` of the network input (bottom 1); overridden by
            ``spec.img_size`` / ``img_h`` / ``img_w`` when set.
    Returns:
        ``(priors_xyxy, variances)``, both float32 ``(H * W * num_priors, 4)``;
        boxes normalized by the image size.
    """
    layer_h, layer_w = feature_hw
    img_h, img_w = image_hw
    if spec.img_h is not None and spec.img_w is not None:
        img_h, img_w = spec.img_h, spec.img_w
    elif spec.img_size is not None:
        img_h = img_w = spec.img_size
    if spec.step_h is not None and spec.step_w is not None:
        step_h, step_w = spec.step_h, spec.step_w
    elif spec.step is not None:
        step_h = step_w = spec.step
    else:
        step_h, step_w = img_h / layer_h, img_w / layer_w
    # Half-extents (in pixels) of the boxes of one cell, in Caffe's order.
    half = []
    ratios = spec.expanded_aspect_ratios
    for s, min_size in enumerate(spec.min_sizes):
        m = int(min_size)  # Caffe: int min_size_ = min_sizes_[s]
        half.append((m / 2.0, m / 2.0))
        if spec.max_sizes:
            side = math.sqrt(m * int(spec.max_sizes[s]))
            half.append((side / 2.0, side / 2.0))
        for ar in ratios:
            if abs(ar - 1.0) < 1e-6:
                continue
            half.append((m * math.sqrt(ar) / 2.0, m / math.sqrt(ar) / 2.0))
    half_wh = np.array(half, dtype=np.float64)  # (K, 2)
    cy, cx = np.meshgrid((np.arange(layer_h) + spec.offset) * step_h,
                         (np.arange(layer_w) + spec.offset) * step_w, indexing="ij")
    centres = np.stack([cx.ravel(), cy.ravel()], axis=1)[:, None, :]  # (HW, 1, 2)
    boxes = np.concatenate([centres - half_wh, centres + half_wh], axis=2)  # (HW, K, 4) pixels
    boxes = boxes.reshape(-1, 4) / np.array([img_w, img_h, img_w, img_h], dtype=np.float64)
    if spec.clip:
        boxes = np.clip(boxes, 0.0, 1.0)
    variances = np.broadcast_to(np.array(spec.variance_vector(), dtype=np.float32), boxes.shape)
    return torch.from_numpy(boxes.astype(np.float32)), torch.from_numpy(variances.copy())


def caffe_priorbox_blob(priors_xyxy: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """Caffe's PriorBox top layout ``(1, 2, P * 4)``: channel 0 boxes, channel 1 variances."""
    return torch.stack([priors_xyxy.reshape(-1), variances.reshape(-1)]).unsqueeze(0)


def split_caffe_priorbox_blob(blob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`caffe_priorbox_blob`: ``(1, 2, P * 4)`` → two ``(P, 4)`` tensors."""
    if blob.dim() != 3 or blob.shape[1] != 2 or blob.shape[2] % 4:
        raise ValueError(f"expected a PriorBox blob of shape (1, 2, P*4), got {tuple(blob.shape)}")
    return blob[0, 0].reshape(-1, 4), blob[0, 1].reshape(-1, 4)


@dataclass(frozen=True)
class PriorGenerator:
    """Priors of a whole SSD head: one :class:`PriorBoxSpec` per feature map, concatenated
    in order (Caffe's ``mbox_priorbox`` Concat on axis 2)."""

    specs: tuple[PriorBoxSpec, ...] = field(default_factory=tuple)

    def num_priors_per_cell(self) -> list[int]:
        return [s.num_priors for s in self.specs]

    def __call__(
        self, feature_hws: Sequence[tuple[int, int]], image_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(priors_xyxy (P, 4), variances (P, 4))`` for the given feature-map sizes."""
        if len(feature_hws) != len(self.specs):
            raise ValueError(f"{len(self.specs)} prior specs but {len(feature_hws)} feature maps")
        parts = [prior_boxes(s, hw, image_hw) for s, hw in zip(self.specs, feature_hws)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def prior_maps(per_prior: torch.Tensor, shapes: Sequence[Sequence[int]], per_cell: Sequence[int]
               ) -> list[torch.Tensor]:
    """Per-prior outputs ``(N, P, C)`` of the SSD family (levels one after another, each row-major over its cells,
    then the cell's priors) -> one map ``(N, A_l * C, h_l, w_l)`` per level (channels prior-major, as the head's
    convolution wrote them).

    Raises:
        ValueError: levels of ``shapes`` and ``per_cell`` priors per cell that do not hold ``P`` priors.
    """
    n, total, c = per_prior.shape
    counts = [h * w * a for (h, w), a in zip(shapes, per_cell)]
    if sum(counts) != total:
        raise ValueError(f"{total} priors, but the levels {list(shapes)} with {list(per_cell)} priors per cell hold "
                         f"{sum(counts)}")
    return [part.reshape(n, h, w, a * c).permute(0, 3, 1, 2)
            for part, (h, w), a in zip(per_prior.split(counts, dim=1), shapes, per_cell)]
