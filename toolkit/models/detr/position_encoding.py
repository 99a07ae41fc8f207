"""Sine position encoding of a padded feature map (Deformable DETR's ``PositionEmbeddingSine``, normalized)."""

from __future__ import annotations

import math

import torch
from torch import nn


class SinePositionEncoding(nn.Module):
    """2-d sine / cosine encoding of the valid (unpadded) area of each image.

    Row and column indices of valid pixels are counted from 1 along each axis
    (a cumulative sum of the non-padding mask), normalized as Deformable DETR's
    variant does, ``(i - 0.5) / (n + 1e-6) * scale`` with ``n`` the valid length,
    then encoded with ``num_pos_feats`` frequencies ``temperature ** (2 * (k // 2)
    / num_pos_feats)``: sines at even, cosines at odd channels, y first then x.

    Computed in float32 whatever the features' dtype, as the official code does
    (it hard-codes float32); callers cast the result to the features' dtype.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` bool ``(B, H, W)``, True on padding -> float32 ``(B, 2 * num_pos_feats, H, W)``."""
        valid = ~mask
        y = valid.cumsum(1, dtype=torch.float32)
        x = valid.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y = (y - 0.5) / (y[:, -1:, :] + eps) * self.scale
        x = (x - 0.5) / (x[:, :, -1:] + eps) * self.scale
        k = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        freq = self.temperature ** (2 * (k // 2) / self.num_pos_feats)
        pos_x = x[:, :, :, None] / freq
        pos_y = y[:, :, :, None] / freq
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
