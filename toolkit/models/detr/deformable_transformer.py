"""Deformable DETR's transformer: multi-scale deformable encoder, decoder, two-stage proposals, and Sparse DETR.

Follows ``models/deformable_transformer.py`` of fundamentalvision/Deformable-DETR,
with its module names (so its state dicts load) and its arithmetic, including the
places where it computes in float32 whatever the model's dtype (reference
points, valid ratios, proposal grids and their encoding's frequencies): those are
reproduced, so a float64 run equals the official float64 run.

Sparse DETR (Roh et al., ICLR 2022; kakaobrain/sparse-detr) adds, with the same
names: a scoring network (``enc_mask_predictor``) that rates every backbone token;
an encoder that updates only the top ``rho`` share of tokens of each image (they
attend to all tokens, and are written back into the full memory after each
layer); auxiliary detection heads on the encoder layers; two-stage queries
initialised from the selected memory (``eff_query_init``) and scored with the
class-specific head (``eff_specific_head``).

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

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None, tgt=None):
        """``src`` ``(B, S, C)``; ``pos``, ``reference_points`` ``(B, T, C)`` / ``(B, T, L, 2)`` for the tokens
        updated: every token (``tgt`` None, T = S), or Sparse DETR's selected tokens ``tgt`` ``(B, T, C)``, which
        attend to all of ``src``.  Returns the updated tokens ``(B, T, C)``."""
        query = src if tgt is None else tgt
        attended = self.self_attn(query + pos, reference_points, src, spatial_shapes, level_start_index,
                                  padding_mask)
        query = self.norm1(query + self.dropout1(attended))
        return self.norm2(query + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(query))))))


class DeformableEncoder(nn.Module):
    def __init__(self, layer: DeformableEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers
        # Sparse DETR's auxiliary heads on layers 0..num_layers-2 (set by the detector, as officially).
        self.aux_heads = False
        self.class_embed: Optional[nn.ModuleList] = None
        self.bbox_embed: Optional[nn.ModuleList] = None

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

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos, padding_mask=None,
                topk_inds: Optional[torch.Tensor] = None, output_proposals: Optional[torch.Tensor] = None,
                sparse_token_nums: Optional[torch.Tensor] = None):
        """Encode.  With ``topk_inds`` ``(B, k)`` (Sparse DETR) only those tokens are updated; image ``b`` writes
        back its first ``sparse_token_nums[b]``.  With auxiliary heads, ``output_proposals`` ``(B, S, 4)`` are
        the unactivated proposal boxes the heads' offsets apply to.

        Returns:
            ``(memory (B, S, C), auxiliary class logits per layer, auxiliary boxes per layer)`` (empty lists
            without auxiliary heads).
        """
        output = src
        reference_points = self.reference_points(spatial_shapes, valid_ratios)
        tgt = None
        if topk_inds is not None:
            b, _, n_levels, two = reference_points.shape
            reference_points = torch.gather(reference_points.view(b, reference_points.shape[1], -1), 1,
                                            topk_inds.unsqueeze(-1).repeat(1, 1, n_levels * two)
                                            ).view(b, -1, n_levels, two)
            tgt = torch.gather(output, 1, topk_inds.unsqueeze(-1).repeat(1, 1, output.size(-1)))
            pos = torch.gather(pos, 1, topk_inds.unsqueeze(-1).repeat(1, 1, pos.size(-1)))
            if output_proposals is not None:
                output_proposals = output_proposals.gather(1, topk_inds.unsqueeze(-1).repeat(
                    1, 1, output_proposals.size(-1)))
        aux_classes, aux_boxes = [], []
        for index, layer in enumerate(self.layers):
            tgt = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask,
                        tgt=tgt if topk_inds is not None else None)
            if topk_inds is None:
                output = tgt
            elif sparse_token_nums is None:
                output = output.scatter(1, topk_inds.unsqueeze(-1).repeat(1, 1, tgt.size(-1)), tgt)
            else:
                # Image b writes back its first sparse_token_nums[b] tokens; the others rewrite what is there (one
                # scatter for the batch: no per-image loop, which a traced export would fix to the traced batch).
                index_ = topk_inds.unsqueeze(-1).repeat(1, 1, tgt.size(-1))
                written = torch.arange(topk_inds.shape[1], device=tgt.device)[None, :] \
                    < sparse_token_nums[:, None].to(topk_inds.dtype)
                kept = torch.gather(output, 1, index_)
                output = output.scatter(1, index_, torch.where(written[..., None], tgt, kept))
            if self.aux_heads and index < self.num_layers - 1:
                aux_classes.append(self.class_embed[index](tgt))
                aux_boxes.append((output_proposals + self.bbox_embed[index](tgt)).sigmoid())
        return output, aux_classes, aux_boxes


class MaskPredictor(nn.Module):
    """Sparse DETR's scoring network: a token's saliency from its own features and the image's mean feature.

    ``LayerNorm -> Linear -> GELU``, then the second half of the channels is
    replaced by its mean over the image's tokens, then three ``Linear`` layers with
    GELU between them down to one score per token.
    """

    def __init__(self, in_dim: int, h_dim: int) -> None:
        super().__init__()
        self.h_dim = h_dim
        self.layer1 = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, h_dim), nn.GELU())
        self.layer2 = nn.Sequential(nn.Linear(h_dim, h_dim // 2), nn.GELU(), nn.Linear(h_dim // 2, h_dim // 4),
                                    nn.GELU(), nn.Linear(h_dim // 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, S, C)`` -> ``(B, S, 1)``."""
        z = self.layer1(x)
        local, image = torch.split(z, self.h_dim // 2, dim=-1)
        image = image.mean(dim=1, keepdim=True).expand(-1, local.shape[1], -1)
        return self.layer2(torch.cat([local, image], dim=-1))


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

    def forward(self, tgt, query_pos, reference_points, src, spatial_shapes, level_start_index, padding_mask=None,
                self_attn_mask=None):
        """``tgt``, ``query_pos`` ``(B, Q, C)``; ``reference_points`` ``(B, Q, L, 2 or 4)``; ``self_attn_mask``
        bool ``(Q, Q)``, True where a query may not attend to another (None: all may) -> ``(tgt (B, Q, C),
        the cross-attention's sampling locations (B, Q, M, L, P, 2) and weights (B, Q, M, L, P))``."""
        q = k = (tgt + query_pos).transpose(0, 1)
        attended = self.self_attn(q, k, tgt.transpose(0, 1), attn_mask=self_attn_mask)[0].transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended, locations, weights = self.cross_attn(tgt + query_pos, reference_points, src, spatial_shapes,
                                                       level_start_index, padding_mask, return_sampling=True)
        tgt = self.norm1(tgt + self.dropout1(attended))
        tgt = self.norm3(tgt + self.dropout4(self.linear2(self.dropout3(F.relu(self.linear1(tgt))))))
        return tgt, locations, weights


class DeformableDecoder(nn.Module):
    """Decoder layers; with box refinement (``bbox_embed`` set by the detector) each layer's box head moves the
    reference points of the next, through a detached inverse-sigmoid update.  ``look_forward_twice`` (H-DETR's
    option, from DINO): the returned references are the refined boxes before the detach, so the next layer's box
    loss also reaches this layer's box head (the next layer's input stays detached)."""

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, look_forward_twice: bool = False) -> None:
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers
        self.look_forward_twice = look_forward_twice
        # Set by DeformableDETR: the official "hack" keeps the detector's heads here too (and so in the state dict).
        self.bbox_embed: Optional[nn.ModuleList] = None
        self.class_embed: Optional[nn.ModuleList] = None

    def forward(self, tgt, reference_points, src, spatial_shapes, level_start_index, valid_ratios, query_pos,
                padding_mask=None, self_attn_mask=None):
        """Returns every layer's output ``(num_layers, B, Q, C)``, reference points ``(num_layers, B, Q, 2|4)``,
        and its cross-attention's sampling locations ``(B, num_layers, Q, M, L, P, 2)`` and weights
        ``(B, num_layers, Q, M, L, P)``."""
        outputs, references, all_locations, all_weights = [], [], [], []
        for index, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                scaled = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                scaled = reference_points[:, :, None] * valid_ratios[:, None]
            tgt, locations, weights = layer(tgt, query_pos, scaled, src, spatial_shapes, level_start_index,
                                            padding_mask, self_attn_mask)
            all_locations.append(locations)
            all_weights.append(weights)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[index](tgt)
                if reference_points.shape[-1] == 4:
                    refined = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    refined = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]],
                                        -1).sigmoid()
                reference_points = refined.detach()
            outputs.append(tgt)
            references.append(refined if self.look_forward_twice and self.bbox_embed is not None
                              else reference_points)
        return (torch.stack(outputs), torch.stack(references), torch.stack(all_locations, dim=1),
                torch.stack(all_weights, dim=1))


class DeformableTransformer(nn.Module):
    """Flattens the levels, encodes them, and decodes ``num_queries`` queries (learned, or, two-stage, the
    top-scoring encoder proposals).

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: the usual sizes.
        num_feature_levels, enc_n_points, dec_n_points: levels ``L`` and sampling points ``P``.
        two_stage: queries and reference boxes from the encoder's proposals.
        two_stage_num_proposals: how many proposals become queries.
        rho: Sparse DETR's share of tokens the encoder updates (0: all, Deformable DETR; needs ``two_stage``).
        use_enc_aux_loss: Sparse DETR's detection heads on encoder layers (set by the detector).
        eff_query_init: two-stage queries' content from the selected memory, position from the proposals.
        eff_specific_head: rank proposals by their best class score (else the first class's).
        look_forward_twice: see :class:`DeformableDecoder` (needs the detector's box refinement to matter).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, num_feature_levels: int = 4,
                 dec_n_points: int = 4, enc_n_points: int = 4, two_stage: bool = False,
                 two_stage_num_proposals: int = 300, rho: float = 0.0, use_enc_aux_loss: bool = False,
                 eff_query_init: bool = False, eff_specific_head: bool = False,
                 look_forward_twice: bool = False) -> None:
        super().__init__()
        if (rho or use_enc_aux_loss or eff_query_init) and not two_stage:
            raise ValueError("Sparse DETR's rho, use_enc_aux_loss and eff_query_init need two_stage (the proposal "
                             "projection they use is the two-stage one)")
        self.d_model = d_model
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.rho = rho
        self.use_enc_aux_loss = use_enc_aux_loss
        self.eff_query_init = eff_query_init
        self.eff_specific_head = eff_specific_head
        self.enc_mask_predictor = MaskPredictor(d_model, d_model) if rho else None
        self.encoder = DeformableEncoder(DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                                nhead, enc_n_points), num_encoder_layers)
        decoder_layer = DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead,
                                               dec_n_points)
        self.decoder = DeformableDecoder(decoder_layer, num_decoder_layers, look_forward_twice)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            query_dims = d_model if eff_query_init else d_model * 2
            self.pos_trans = nn.Linear(d_model * 2, query_dims)
            self.pos_trans_norm = nn.LayerNorm(query_dims)
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
    def proposal_position_encoding(proposals: torch.Tensor, num_pos_feats: int = 128) -> torch.Tensor:
        """Unactivated boxes ``(B, K, 4)`` -> sine encoding ``(B, K, 4 * num_pos_feats)``: ``num_pos_feats``
        frequencies per coordinate of ``sigmoid(box) * 2 pi`` (frequencies in float32, as the official code,
        which fixes 128: ``d_model // 2`` for its 256 channels)."""
        k = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        freq = 10000 ** (2 * (k // 2) / num_pos_feats)
        pos = proposals.sigmoid()[:, :, :, None] * (2 * math.pi) / freq
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def encoder_proposals(self, memory: torch.Tensor, padding_mask: torch.Tensor, spatial_shapes: torch.Tensor,
                          project: bool = True):
        """Two-stage: one proposal per token, a box of size ``0.05 * 2**level`` at its pixel centre (normalized by
        the valid size), unactivated; padding tokens and proposals outside (0.01, 0.99) get ``inf`` and (with
        ``project``) zeroed memory, then ``enc_output`` and ``enc_output_norm``.  Returns ``(memory (B, S, C),
        proposals (B, S, 4))``."""
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
        if project:
            memory = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0).masked_fill(~inside, 0.0)
            memory = self.enc_output_norm(self.enc_output(memory))
        return memory, proposals

    def forward(self, srcs, masks, pos_embeds, query_embed: Optional[torch.Tensor] = None,
                self_attn_mask: Optional[torch.Tensor] = None, num_proposals: Optional[int] = None) -> dict:
        """Encode the levels and decode the queries.

        Args:
            srcs: per level ``(B, C, H_l, W_l)``; masks: bool ``(B, H_l, W_l)``, True on padding; pos_embeds: like srcs.
            query_embed: ``(Q, 2C)`` (position half, content half); None with two-stage.
            self_attn_mask: bool ``(Q, Q)`` for the decoder's self-attention, True where a query may not attend
                to another (hybrid matching keeps its query groups apart); None: no mask.
            num_proposals: two-stage: proposals that become queries (None: ``two_stage_num_proposals``).
        Returns:
            ``hs`` (num_decoder_layers, B, Q, C), ``init_reference`` (B, Q, 2|4), ``references`` (per layer);
            two-stage: ``enc_class`` (B, S, K) and ``enc_coord_unact`` (B, S, 4); Sparse DETR:
            ``mask_prediction`` (B, S), ``sparse_token_nums`` int32 (B,), ``topk_inds`` (B, k),
            ``enc_aux_classes`` / ``enc_aux_boxes`` (lists); always ``dec_locations``, ``dec_weights`` (the decoder's
            cross-attention), ``spatial_shapes``, ``level_start_index``, ``padding_mask`` (B, S), ``memory``
            (B, S, C) (the encoder's output).
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
        out: dict = {"spatial_shapes": spatial_shapes, "level_start_index": level_start_index,
                     "padding_mask": padding}

        # Sparse DETR: score the backbone tokens (projected as two-stage proposals are) and keep the top rho.
        topk_inds = sparse_token_nums = backbone_proposals = None
        if self.rho or self.use_enc_aux_loss:
            backbone_memory, backbone_proposals = self.encoder_proposals(src + pos, padding, spatial_shapes,
                                                                         project=bool(self.rho))
        if self.rho:
            valid_tokens = (~padding).sum(axis=-1)
            # In float32 then truncated, as the official code: (valid * rho).int() + 1 tokens per image.
            sparse_token_nums = (valid_tokens * self.rho).int() + 1
            k = min(int(max(sparse_token_nums)), backbone_memory.shape[1])
            prediction = self.enc_mask_predictor(backbone_memory).squeeze(-1)
            prediction = prediction.masked_fill(padding, prediction.min())
            topk_inds = torch.topk(prediction, k, dim=1)[1]
            out.update(mask_prediction=prediction, sparse_token_nums=sparse_token_nums, topk_inds=topk_inds)
        memory, aux_classes, aux_boxes = self.encoder(
            src, spatial_shapes, level_start_index, valid_ratios, pos, padding, topk_inds=topk_inds,
            output_proposals=backbone_proposals if self.use_enc_aux_loss else None,
            sparse_token_nums=sparse_token_nums)
        if self.use_enc_aux_loss:
            out.update(enc_aux_classes=aux_classes, enc_aux_boxes=aux_boxes)

        bs, _, c = memory.shape
        if self.two_stage:
            output_memory, proposals = self.encoder_proposals(memory, padding, spatial_shapes)
            # The detector's extra heads (index num_layers) score and regress the proposals (the official "hack").
            enc_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_coord_unact = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + proposals
            scores = enc_class.topk(1, dim=2).values[..., 0] if self.eff_specific_head else enc_class[..., 0]
            topk = torch.topk(scores, num_proposals or self.two_stage_num_proposals, dim=1)[1]
            topk_coords = torch.gather(enc_coord_unact, 1, topk.unsqueeze(-1).repeat(1, 1, 4)).detach()
            reference_points = topk_coords.sigmoid()
            pos_trans = self.pos_trans_norm(self.pos_trans(self.proposal_position_encoding(topk_coords,
                                                                                           self.d_model // 2)))
            if self.eff_query_init:
                tgt = torch.gather(memory, 1, topk.unsqueeze(-1).repeat(1, 1, memory.size(-1)))
                query_pos = pos_trans
            else:
                query_pos, tgt = torch.split(pos_trans, c, dim=2)
            out.update(enc_class=enc_class, enc_coord_unact=enc_coord_unact)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
            tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        hs, references, locations, weights = self.decoder(tgt, reference_points, memory, spatial_shapes,
                                                          level_start_index, valid_ratios, query_pos, padding,
                                                          self_attn_mask)
        out.update(hs=hs, init_reference=reference_points, references=references, dec_locations=locations,
                   dec_weights=weights, memory=memory)
        return out
