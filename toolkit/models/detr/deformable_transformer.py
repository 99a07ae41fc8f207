"""Deformable DETR's transformer: multi-scale deformable encoder, decoder, two-stage proposals.

Follows ``models/deformable_transformer.py`` of fundamentalvision/Deformable-DETR,
with its module names (so its state dicts load) and its arithmetic, including the
places where it computes in float32 whatever the model's dtype (reference
points, valid ratios, proposal grids and their encoding's frequencies): those are
reproduced, so a float64 run equals the official float64 run.

Boxes are ``(cx, cy, w, h)`` normalized to the padded image; "unactivated"
coordinates are their inverse sigmoid.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.ops import MSDeformAttn


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to [0, 1] and both terms to at least ``eps`` (the official helper)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then a feed-forward block (post-norm)."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        """``src``, ``pos`` ``(B, S, C)``; ``reference_points`` ``(B, S, L, 2)`` -> ``(B, S, C)``."""
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        return self.norm2(src + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(src))))))


class DeformableEncoder(nn.Module):
    def __init__(self, layer: DeformableEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers

    @staticmethod
    def reference_points(spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor) -> torch.Tensor:
        """Every token's pixel centre, normalized by its level's valid size, then mapped to every level:
        float32 ``(B, S, L, 2)`` (the official code computes these in float32)."""
        points = []
        for level, (h, w) in enumerate(spatial_shapes.tolist()):
            ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=valid_ratios.device),
                                    torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=valid_ratios.device),
                                    indexing="ij")
            ys = ys.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
            xs = xs.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            points.append(torch.stack((xs, ys), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos, padding_mask=None):
        reference_points = self.reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableDecoderLayer(nn.Module):
    """Query self-attention, deformable cross-attention into the encoder's memory, feed-forward (post-norm)."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, src, spatial_shapes, level_start_index, padding_mask=None):
        """``tgt``, ``query_pos`` ``(B, Q, C)``; ``reference_points`` ``(B, Q, L, 2 or 4)`` -> ``(B, Q, C)``."""
        q = k = (tgt + query_pos).transpose(0, 1)
        attended = self.self_attn(q, k, tgt.transpose(0, 1))[0].transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(tgt + query_pos, reference_points, src, spatial_shapes, level_start_index,
                                   padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        return self.norm3(tgt + self.dropout4(self.linear2(self.dropout3(F.relu(self.linear1(tgt))))))


class DeformableDecoder(nn.Module):
    """Decoder layers; with box refinement (``bbox_embed`` set by the detector) each layer's box head moves the
    reference points of the next, through a detached inverse-sigmoid update."""

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers
        # Set by DeformableDETR: the official "hack" keeps the detector's heads here too (and so in the state dict).
        self.bbox_embed: Optional[nn.ModuleList] = None
        self.class_embed: Optional[nn.ModuleList] = None

    def forward(self, tgt, reference_points, src, spatial_shapes, level_start_index, valid_ratios, query_pos,
                padding_mask=None):
        """Returns every layer's output ``(num_layers, B, Q, C)`` and reference points ``(num_layers, B, Q, 2|4)``."""
        outputs, references = [], []
        for index, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                scaled = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                scaled = reference_points[:, :, None] * valid_ratios[:, None]
            tgt = layer(tgt, query_pos, scaled, src, spatial_shapes, level_start_index, padding_mask)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[index](tgt)
                if reference_points.shape[-1] == 4:
                    refined = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    refined = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]],
                                        -1).sigmoid()
                reference_points = refined.detach()
            outputs.append(tgt)
            references.append(reference_points)
        return torch.stack(outputs), torch.stack(references)


class DeformableTransformer(nn.Module):
    """Flattens the levels, encodes them, and decodes ``num_queries`` queries (learned, or, two-stage, the
    top-scoring encoder proposals).

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: the usual sizes.
        num_feature_levels, enc_n_points, dec_n_points: levels ``L`` and sampling points ``P``.
        two_stage: queries and reference boxes from the encoder's proposals.
        two_stage_num_proposals: how many proposals become queries.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, num_feature_levels: int = 4,
                 dec_n_points: int = 4, enc_n_points: int = 4, two_stage: bool = False,
                 two_stage_num_proposals: int = 300) -> None:
        super().__init__()
        self.d_model = d_model
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.encoder = DeformableEncoder(DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                                nhead, enc_n_points), num_encoder_layers)
        self.decoder = DeformableDecoder(DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                                nhead, dec_n_points), num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: Xavier for every matrix, MSDeformAttn's own, normal level embeddings."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """Share of each image's width and height that is not padding: float32 ``(B, 2)`` as ``(w, h)``."""
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    @staticmethod
    def proposal_position_encoding(proposals: torch.Tensor) -> torch.Tensor:
        """Unactivated boxes ``(B, K, 4)`` -> sine encoding ``(B, K, 512)``: 128 frequencies per coordinate of
        ``sigmoid(box) * 2 pi`` (frequencies in float32, as the official code)."""
        k = torch.arange(128, dtype=torch.float32, device=proposals.device)
        freq = 10000 ** (2 * (k // 2) / 128)
        pos = proposals.sigmoid()[:, :, :, None] * (2 * math.pi) / freq
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def encoder_proposals(self, memory: torch.Tensor, padding_mask: torch.Tensor, spatial_shapes: torch.Tensor):
        """Two-stage: one proposal per token, a box of size ``0.05 * 2**level`` at its pixel centre (normalized by
        the valid size), unactivated; padding tokens and proposals outside (0.01, 0.99) get ``inf`` and zeroed
        memory.  Returns ``(projected memory (B, S, C), proposals (B, S, 4))``."""
        n = memory.shape[0]
        proposals, start = [], 0
        for level, (h, w) in enumerate(spatial_shapes.tolist()):
            mask = padding_mask[:, start:start + h * w].view(n, h, w, 1)
            valid_h = torch.sum(~mask[:, :, 0, 0], 1)
            valid_w = torch.sum(~mask[:, 0, :, 0], 1)
            ys, xs = torch.meshgrid(torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device),
                                    torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device),
                                    indexing="ij")
            grid = torch.cat([xs.unsqueeze(-1), ys.unsqueeze(-1)], -1)
            scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** level)
            proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        inside = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
        proposals = proposals.masked_fill(~inside, float("inf"))
        memory = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0).masked_fill(~inside, 0.0)
        return self.enc_output_norm(self.enc_output(memory)), proposals

    def forward(self, srcs, masks, pos_embeds, query_embed: Optional[torch.Tensor] = None):
        """Encode the levels and decode the queries.

        Args:
            srcs: per level ``(B, C, H_l, W_l)``; masks: bool ``(B, H_l, W_l)``, True on padding; pos_embeds: like srcs.
            query_embed: ``(Q, 2C)`` (position half, content half); None with two-stage.
        Returns:
            ``(hs (num_decoder_layers, B, Q, C), initial reference (B, Q, 2|4), per-layer references, encoder class
            logits (B, S, K) or None, encoder unactivated boxes (B, S, 4) or None)``.
        """
        flat, flat_masks, flat_pos, shapes = [], [], [], []
        for level, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append(src.shape[-2:])
            flat.append(src.flatten(2).transpose(1, 2))
            flat_masks.append(mask.flatten(1))
            flat_pos.append(pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
        src = torch.cat(flat, 1)
        padding = torch.cat(flat_masks, 1)
        pos = torch.cat(flat_pos, 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.valid_ratio(m) for m in masks], 1)

        memory = self.encoder(src, spatial_shapes, level_start_index, valid_ratios, pos, padding)

        bs, _, c = memory.shape
        enc_class = enc_coord_unact = None
        if self.two_stage:
            output_memory, proposals = self.encoder_proposals(memory, padding, spatial_shapes)
            # The detector's extra (last) heads score and regress the proposals (the official "hack").
            enc_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_coord_unact = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + proposals
            topk = torch.topk(enc_class[..., 0], self.two_stage_num_proposals, dim=1)[1]
            topk_coords = torch.gather(enc_coord_unact, 1, topk.unsqueeze(-1).repeat(1, 1, 4)).detach()
            reference_points = topk_coords.sigmoid()
            query_pos, tgt = torch.split(self.pos_trans_norm(self.pos_trans(self.proposal_position_encoding(
                topk_coords))), c, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
            tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        hs, references = self.decoder(tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios,
                                      query_pos, padding)
        return hs, reference_points, references, enc_class, enc_coord_unact
