"""Sparse DETR's decoder cross-attention map (DAM): where the decoder looked, as a weight per encoder token.

Every decoder sampling point spreads its attention weight bilinearly over the
four tokens around it, summed over layers, heads, queries and points; the top
tokens of this map are the targets of the scoring network
(``loss_mask_prediction``), and its overlap with the tokens the encoder kept is
logged (``corr_*``).  Arithmetic as kakaobrain/sparse-detr ``util/dam.py``, which
places a point at ``loc * W`` (not ``loc * W - 0.5`` where the attention sampled
it): reproduced as it is.
"""

from __future__ import annotations

import torch


def decoder_attention_map(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                          sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Splat every sampling point's attention weight onto the token grid.

    Args:
        spatial_shapes: int64 ``(L, 2)`` ``(H, W)``; level_start_index: int64 ``(L,)``.
        sampling_locations: ``(N, layers, Lq, M, L, P, 2)`` ``(x, y)`` normalized.
        attention_weights: ``(N, layers, Lq, M, L, P)``.
    Returns:
        ``(N, layers, M, S)`` in the weights' dtype.
    """
    n, n_layers, _, n_heads = sampling_locations.shape[:4]
    # (N * layers * M, Lq * P, L, 2) and (N * layers * M, Lq * P, L)
    locations = sampling_locations.permute(0, 1, 3, 2, 5, 4, 6).flatten(0, 2).flatten(1, 2)
    weights = attention_weights.permute(0, 1, 3, 2, 5, 4).flatten(0, 2).flatten(1, 2)
    size_xy = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], dim=-1)
    xy = locations * size_xy
    low = xy.floor().to(torch.int64)
    zero = torch.zeros(*low.shape[:-1], dtype=torch.int64, device=low.device)
    one = torch.ones_like(zero)
    corner_01 = low + torch.stack([zero, one], dim=-1)  # (x, y + 1)
    corner_10 = low + torch.stack([one, zero], dim=-1)  # (x + 1, y)
    corner_11 = low + 1
    # Each corner's bilinear weight is the area of the opposite corner's rectangle.
    area_00 = (xy - low).prod(dim=-1)
    area_01 = -(xy - corner_01).prod(dim=-1)
    area_10 = -(xy - corner_10).prod(dim=-1)
    area_11 = (xy - corner_11).prod(dim=-1)
    total = int(torch.sum(spatial_shapes[..., 0] * spatial_shapes[..., 1]))
    grid = torch.zeros((weights.shape[0], total), dtype=weights.dtype, device=weights.device)
    for corner, area in ((low, area_11), (corner_01, area_10), (corner_10, area_01), (corner_11, area_00)):
        valid = ((corner[..., 0] >= 0) & (corner[..., 0] < size_xy[..., 0])
                 & (corner[..., 1] >= 0) & (corner[..., 1] < size_xy[..., 1]))
        index = corner[..., 1] * spatial_shapes[..., 1] + corner[..., 0] + level_start_index
        grid.scatter_add_(1, (index * valid).flatten(1, 2), (weights * valid * area).flatten(1))
    return grid.reshape(n, n_layers, n_heads, -1)


def tokens_to_grid(spatial_shapes: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """``(N, k)`` token indices -> float32 ``(N, S)`` with 1 at those tokens (the official float32 grid)."""
    total = int(torch.sum(spatial_shapes[..., 0] * spatial_shapes[..., 1]))
    grid = torch.zeros((token_index.shape[0], total), device=token_index.device, dtype=torch.float32)
    return grid.scatter_(1, token_index.to(torch.int64), 1)


def attention_map_correlation(selected: torch.Tensor, attention_map: torch.Tensor,
                              spatial_shapes: torch.Tensor) -> list[torch.Tensor]:
    """Share of the decoder's attention that falls on the selected tokens: over all levels, then per level.

    Args:
        selected: ``(N, S)`` 0/1; attention_map: ``(N, S)``.
    Returns:
        ``[(N,) all levels, (N,) level 0, ...]``.
    """
    out = [(selected * attention_map).sum(-1) / attention_map.sum(-1)]
    start = 0
    for h, w in spatial_shapes.tolist():
        part = slice(start, start + h * w)
        out.append((selected[:, part] * attention_map[:, part]).sum(-1) / attention_map[:, part].sum(-1))
        start += h * w
    return out
