"""Deformable DETR and Sparse DETR: the detector, its heads and its builder.

``DeformableDETR(images, mask)`` returns raw tensors as the official model does
(``models/deformable_detr.py`` of fundamentalvision/Deformable-DETR): per query
class logits (sigmoid, no background class) and boxes ``(cx, cy, w, h)``
normalized to the padded image, for the last decoder layer and, as auxiliary
outputs, every earlier one; two-stage models also return the encoder's proposal
scores and boxes; Sparse DETR (kakaobrain/sparse-detr ``models/deformable_detr.py``)
also its token scores, how many tokens each image kept and which, and its
encoder layers' auxiliary predictions.  Module and parameter names equal the
official state-dict keys (shared heads appear under every name the official
model lists them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.models.detr.backbone import DSOD_BACKBONES, DSODBody, Joiner, ResNetBody, downsample_mask
from toolkit.models.detr.deformable_transformer import DeformableTransformer, _clones, inverse_sigmoid
from toolkit.models.detr.position_encoding import SinePositionEncoding
from toolkit.models.gfl import GFLHead, grid_anchors
from toolkit.models.thumbnail import THUMB_MODES


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the official box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip([input_dim] + dims, dims + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


@dataclass(frozen=True)
class DeformableDETRConfig:
    """The architecture, with the official ``main.py`` argument names and defaults."""

    num_classes: int = 91
    # A torchvision ResNet name, or (not official) a key of toolkit.models.detr.backbone.DSOD_BACKBONES: the
    # toolkit's DSOD backbone, batch norm trained with the rest (backbone_from_scratch does not apply).
    backbone: str = "resnet50"
    dilation: bool = False
    # Not an official argument: BatchNorm2d and a fully trainable ResNet, for training without pretrained weights.
    backbone_from_scratch: bool = False
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    num_feature_levels: int = 4
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300
    aux_loss: bool = True
    with_box_refine: bool = False
    two_stage: bool = False
    # Sparse DETR (family "sparse": kakaobrain/sparse-detr's wiring of the heads).
    family: str = "deformable"
    rho: float = 0.0
    use_enc_aux_loss: bool = False
    eff_query_init: bool = False
    eff_specific_head: bool = False
    # ThumbDet (zhangyin1996/ThumbDet): the backbone sees a thumbnail_scale-times smaller image made by a learned
    # down-sampler (thumb_mode "learned") or by bicubic resizing (the baselines "bicubic", antialiased, and
    # "bicubic_aliased"); 1: the full image.
    thumb_scale: int = 1
    thumb_mode: str = "learned"
    # H-DETR's hybrid matching (HDETR/H-Deformable-DETR, --num_queries_one2many): extra queries, trained only, with
    # one-to-many matching; 0: none.
    num_queries_one2many: int = 0
    # H-DETR's --look_forward_twice: a layer's refined boxes reach the next layer's predictions with their gradient.
    look_forward_twice: bool = False
    # Co-DETR's collaborative auxiliary dense head (Sense-X/Co-DETR), here the toolkit's GFL head with ATSS: in
    # training, the encoder's output maps (plus one stride-2 level) get a one-to-many dense loss; anchors of
    # aux_dense_anchor_scale x the level's stride (Co-DETR's ATSS head: 8).
    aux_dense_head: bool = False
    aux_dense_anchor_scale: float = 8.0

    def __post_init__(self) -> None:
        if self.family not in ("deformable", "sparse"):
            raise ValueError(f"family must be 'deformable' or 'sparse', got {self.family!r}")
        if self.num_feature_levels == 2:
            raise ValueError("num_feature_levels must be 1 (C5) or at least 3 (C3-C5, then stride-2 levels)")
        if self.family == "deformable" and (self.rho or self.use_enc_aux_loss or self.eff_query_init
                                            or self.eff_specific_head):
            raise ValueError("rho, use_enc_aux_loss, eff_query_init and eff_specific_head are Sparse DETR options "
                             "(family='sparse')")
        if self.thumb_scale not in (1, 2, 4) or self.thumb_mode not in THUMB_MODES:
            raise ValueError(f"thumb_scale must be 1, 2 or 4 and thumb_mode one of {THUMB_MODES}, got "
                             f"{self.thumb_scale} and {self.thumb_mode!r}")
        if self.aux_dense_anchor_scale <= 0:
            raise ValueError(f"aux_dense_anchor_scale must be positive, got {self.aux_dense_anchor_scale}")
        if self.num_queries_one2many < 0 or (self.num_queries_one2many and self.family != "deformable"):
            raise ValueError(f"num_queries_one2many (hybrid matching) must be >= 0 and is for Deformable DETR "
                             f"(family 'deformable'), got {self.num_queries_one2many} with family {self.family!r}")

    @classmethod
    def from_official_args(cls, args: Mapping, num_classes: int, thumb_scale: int = 1) -> "DeformableDETRConfig":
        """The architecture named by an official checkpoint's ``args`` (``vars(namespace)``); ``thumb_scale`` for a
        ThumbDet checkpoint (its args do not say it: the state dict's down-sampler does).

        Raises:
            ValueError: naming the arguments the toolkit does not build (``masks``, a learned position
                embedding).
        """
        unsupported = []
        if args.get("masks"):
            unsupported.append("masks (segmentation)")
        if args.get("position_embedding", "sine") not in ("sine", "v2"):
            unsupported.append(f"position_embedding {args.get('position_embedding')!r}")
        if not str(args.get("backbone", "resnet50")).startswith("resnet"):
            unsupported.append(f"backbone {args.get('backbone')!r} (ResNet backbones only)")
        if args.get("mixed_selection"):  # H-DETR's two-stage option
            unsupported.append("mixed_selection")
        if unsupported:
            raise ValueError(f"unsupported official arguments: {', '.join(unsupported)}")
        known = {f.name for f in fields(cls)}
        family = "sparse" if "rho" in args else "deformable"  # Sparse DETR's main.py has rho, Deformable DETR's not
        # (Sparse DETR's own backbone_from_scratch argument means something else: how its run initialised a
        # backbone whose weights the checkpoint holds anyway.)
        values = {k: v for k, v in args.items() if k in known and k not in ("num_classes", "family",
                                                                             "backbone_from_scratch", "thumb_scale",
                                                                             "thumb_mode")}
        if "num_queries_one2one" in args:  # H-DETR names the one-to-one queries so
            values["num_queries"] = args["num_queries_one2one"]
        return cls(**values, num_classes=num_classes, family=family, thumb_scale=thumb_scale)


class DeformableDETR(nn.Module):
    """Deformable DETR (single- or multi-scale; optional iterative box refinement and two-stage).

    Args:
        backbone: a :class:`~toolkit.models.detr.backbone.Joiner`.
        transformer: a :class:`~toolkit.models.detr.deformable_transformer.DeformableTransformer`.
        num_classes: logits per query (sigmoid classification: no background class; COCO: 91 ids).
        num_queries: queries (two-stage: proposals kept).
        num_feature_levels: levels fed to the transformer (the backbone's, plus stride-2 3x3 convolutions).
        aux_loss: also return every decoder layer's predictions.
        with_box_refine: one head per decoder layer; each layer refines the previous layer's boxes.
        two_stage: an extra head scores the encoder's tokens as proposals; the best become the queries.
        family: ``"deformable"`` or ``"sparse"``: how the heads are wired into the transformer.  Sparse DETR
            gives the decoder the box heads whenever it is two-stage (iterative refinement), and with
            ``transformer.use_enc_aux_loss`` one extra pair of heads per encoder layer but the last.
        aux_dense_anchor_scale: Co-DETR's auxiliary dense head on the encoder (see :meth:`dense_outputs`), with
            anchors of this many times each level's stride; None: no such head.
        num_queries_one2many: H-DETR's hybrid matching: in training mode, this many more queries (learned, or
            two-stage, the next-best proposals) run after the ``num_queries`` ones, and the decoder's
            self-attention keeps the two groups apart; their predictions come back under ``"one2many"`` for a
            one-to-many loss.  In eval mode only the ``num_queries`` run, so the model detects as one without them.
    """

    def __init__(self, backbone: Joiner, transformer: DeformableTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, with_box_refine: bool = False,
                 two_stage: bool = False, family: str = "deformable", num_queries_one2many: int = 0,
                 aux_dense_anchor_scale: Optional[float] = None) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.num_queries_one2many = num_queries_one2many
        self.transformer = transformer
        hidden = transformer.d_model
        class_embed = nn.Linear(hidden, num_classes)
        bbox_embed = MLP(hidden, hidden, 4, 3)
        self.num_feature_levels = num_feature_levels
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries + num_queries_one2many, hidden * 2)
        projections = []
        channels = backbone.num_channels
        for c in channels if num_feature_levels > 1 else channels[:1]:
            projections.append(nn.Sequential(nn.Conv2d(c, hidden, kernel_size=1), nn.GroupNorm(32, hidden)))
        in_channels = channels[-1]
        for _ in range(num_feature_levels - len(projections)):
            projections.append(nn.Sequential(nn.Conv2d(in_channels, hidden, kernel_size=3, stride=2, padding=1),
                                             nn.GroupNorm(32, hidden)))
            in_channels = hidden
        self.input_proj = nn.ModuleList(projections)
        self.backbone = backbone
        self.aux_dense_anchor_scale = aux_dense_anchor_scale
        if aux_dense_anchor_scale:
            # Co-DETR's extra level below the encoder's last (3x3 stride-2 convolution, GroupNorm), and its ATSS
            # head's single 3x3 tower convolution per branch (with GroupNorm, as mmdetection's); GFL's predictors.
            self.aux_dense_downsample = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
                                                      nn.GroupNorm(32, hidden))
            self.aux_dense = GFLHead([hidden] * (num_feature_levels + 1), num_classes, normalize=False,
                                     tower_convs=1, tower_groups=32)
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage

        # Initialisation as the official model's: class bias for a 0.01 prior, zero last box layer.
        prior = 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior) / prior))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        enc_aux = transformer.use_enc_aux_loss
        # Head order (the official lists): decoder layers, the two-stage encoder head, encoder layers 0..E-2.
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if enc_aux:
            num_pred += transformer.encoder.num_layers - 1
        if with_box_refine or enc_aux:
            self.class_embed = _clones(class_embed, num_pred)
            self.bbox_embed = _clones(bbox_embed, num_pred)
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            # One head shared by every layer, listed once per layer (as the official state dict has it).
            self.class_embed = nn.ModuleList([class_embed for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([bbox_embed for _ in range(num_pred)])
        refine = with_box_refine if family == "deformable" else two_stage
        transformer.decoder.bbox_embed = self.bbox_embed if refine else None
        if two_stage:
            transformer.decoder.class_embed = self.class_embed
            for head in self.bbox_embed:
                nn.init.zeros_(head.layers[-1].bias[2:])
        if enc_aux:
            n = transformer.encoder.num_layers - 1
            transformer.encoder.aux_heads = True
            transformer.encoder.class_embed = self.class_embed[-n:]
            transformer.encoder.bbox_embed = self.bbox_embed[-n:]
            for head in transformer.encoder.bbox_embed:
                nn.init.zeros_(head.layers[-1].bias[2:])

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> dict:
        """Detect.

        Args:
            images: ``(B, 3, H, W)``, RGB normalized with the ImageNet mean and std, padded bottom-right.
            mask: bool ``(B, H, W)``, True on padding (None: no padding).
        Returns:
            ``{"pred_logits": (B, Q, K), "pred_boxes": (B, Q, 4) cxcywh normalized, "aux_outputs": [{...}] for
            decoder layers 0..L-2, "enc_outputs": {...} (two-stage, one per encoder token), "srcs": the backbone's
            features [(B, C_l, h_l, w_l)] (ThumbDet's feature distillation pairs them)}``; with a thumbnail also
            ``"src_input"`` (the [0, 1] RGB input) and ``"downsample_input"`` (the thumbnail, [0, 1] RGB); hybrid
            matching in training mode: ``"one2many": {"pred_logits": (B, Q', K), "pred_boxes": (B, Q', 4),
            "aux_outputs": [...]}`` for the ``Q' = num_queries_one2many`` extra queries; the auxiliary dense head
            in training mode: ``"aux_dense"`` (:meth:`dense_outputs`).
        """
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        levels, pos, thumbnail = self.backbone(images, mask)
        srcs = [self.input_proj[k](feature) for k, (feature, _) in enumerate(levels)]
        masks = [m for _, m in levels]
        pos = list(pos)
        for k in range(len(srcs), self.num_feature_levels):
            src = self.input_proj[k](levels[-1][0] if k == len(levels) else srcs[-1])
            level_mask = downsample_mask(mask, src.shape[-2:])
            srcs.append(src)
            masks.append(level_mask)
            pos.append(self.backbone[1](level_mask).to(src.dtype))
        q = self.num_queries
        total = q + self.num_queries_one2many if self.training else q
        query_embed = None if self.two_stage else self.query_embed.weight[:total]
        attn_mask = None
        if total > q:  # the one-to-one and one-to-many queries do not see each other (H-DETR)
            attn_mask = torch.zeros(total, total, dtype=torch.bool, device=images.device)
            attn_mask[q:, :q] = True
            attn_mask[:q, q:] = True
        t = self.transformer(srcs, masks, pos, query_embed, self_attn_mask=attn_mask, num_proposals=total)

        classes, coords = [], []
        for layer in range(t["hs"].shape[0]):
            reference = inverse_sigmoid(t["init_reference"] if layer == 0 else t["references"][layer - 1])
            delta = self.bbox_embed[layer](t["hs"][layer])
            if reference.shape[-1] == 4:
                delta = delta + reference
            else:
                delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            classes.append(self.class_embed[layer](t["hs"][layer]))
            coords.append(delta.sigmoid())
        out = {}
        if total > q:
            many = [{"pred_logits": c[:, q:], "pred_boxes": b[:, q:]} for c, b in zip(classes, coords)]
            out["one2many"] = {**many[-1], "aux_outputs": many[:-1] if self.aux_loss else []}
            classes, coords = [c[:, :q] for c in classes], [b[:, :q] for b in coords]
        out.update(pred_logits=classes[-1], pred_boxes=coords[-1], srcs=[f for f, _ in levels], **thumbnail)
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b} for c, b in zip(classes[:-1], coords[:-1])]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": t["enc_class"], "pred_boxes": t["enc_coord_unact"].sigmoid()}
        if self.training and self.aux_dense_anchor_scale:
            out["aux_dense"] = self.dense_outputs(t, images.shape[-2:])
        if "mask_prediction" in t:
            out.update(backbone_mask_prediction=t["mask_prediction"], sparse_token_nums=t["sparse_token_nums"],
                       backbone_topk_proposals=t["topk_inds"])
        if "enc_aux_classes" in t:
            out["aux_outputs_enc"] = [{"pred_logits": c, "pred_boxes": b}
                                      for c, b in zip(t["enc_aux_classes"], t["enc_aux_boxes"])]
        # Where the decoder looked: Sparse DETR's decoder attention map (the scoring network's target) uses it.
        out["decoder_attention"] = {k: t[k] for k in ("spatial_shapes", "level_start_index", "padding_mask")}
        out["decoder_attention"].update(dec_locations=t["dec_locations"][:, :, :q],
                                        dec_weights=t["dec_weights"][:, :, :q])
        return out

    def dense_outputs(self, t: Mapping, image_hw) -> dict:
        """Co-DETR's auxiliary dense branch: the encoder's memory back into per-level maps, one more level from a
        stride-2 convolution of the last, and the GFL head on them, with one square anchor of
        ``aux_dense_anchor_scale x stride`` per location of the padded input.  Returns what
        :func:`toolkit.models.gfl.gfl_loss` takes: ``cls_logits`` ``(B, P, K)``, ``reg_logits`` ``(B, P, 4,
        reg_max + 1)``, ``anchors`` ``(P, 4)`` xyxy pixels of the padded input, ``strides`` ``(P, 2)``,
        ``feature_hws``, ``image_hw``."""
        memory = t["memory"]
        maps = memory_maps(memory, t["spatial_shapes"])
        maps.append(self.aux_dense_downsample(maps[-1]))
        cls_logits, reg_logits = self.aux_dense(maps)
        feature_hws = [tuple(m.shape[-2:]) for m in maps]
        image_hw = tuple(int(v) for v in image_hw)
        sizes = [self.aux_dense_anchor_scale * image_hw[1] / w for _, w in feature_hws]
        anchors, strides = grid_anchors(feature_hws, image_hw, sizes)
        return {"cls_logits": cls_logits, "reg_logits": reg_logits, "anchors": anchors.to(memory.device),
                "strides": strides.to(memory.device), "feature_hws": feature_hws, "image_hw": image_hw}


def memory_maps(memory: torch.Tensor, spatial_shapes: torch.Tensor) -> list[torch.Tensor]:
    """Flat encoder tokens ``(B, S, C)`` (levels one after another, row-major) -> one ``(B, C, H_l, W_l)`` map per
    level of ``spatial_shapes`` ``(L, 2)``."""
    shapes = [tuple(s) for s in spatial_shapes.tolist()]
    return [part.transpose(1, 2).reshape(memory.shape[0], memory.shape[2], h, w)
            for part, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)]


def build_deformable_detr(cfg: DeformableDETRConfig = DeformableDETRConfig(), train_backbone: bool = True,
                          backbone_weights: Optional[str] = None) -> DeformableDETR:
    """A Deformable or Sparse DETR of ``cfg`` (empty backbone unless ``backbone_weights`` names a local
    torchvision file)."""
    if cfg.backbone in DSOD_BACKBONES:
        body = DSODBody(cfg.backbone, multi_scale=cfg.num_feature_levels > 1, weights=backbone_weights,
                        thumb_scale=cfg.thumb_scale, thumb_mode=cfg.thumb_mode)
    else:
        body = ResNetBody(cfg.backbone, multi_scale=cfg.num_feature_levels > 1, dilation=cfg.dilation,
                          train_backbone=train_backbone, weights=backbone_weights,
                          from_scratch=cfg.backbone_from_scratch and backbone_weights is None,
                          thumb_scale=cfg.thumb_scale, thumb_mode=cfg.thumb_mode)
    backbone = Joiner(body, SinePositionEncoding(cfg.hidden_dim // 2))
    transformer = DeformableTransformer(cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.dec_layers,
                                        cfg.dim_feedforward, cfg.dropout, cfg.num_feature_levels, cfg.dec_n_points,
                                        cfg.enc_n_points, cfg.two_stage, cfg.num_queries, cfg.rho,
                                        cfg.use_enc_aux_loss, cfg.eff_query_init, cfg.eff_specific_head,
                                        cfg.look_forward_twice)
    return DeformableDETR(backbone, transformer, cfg.num_classes, cfg.num_queries, cfg.num_feature_levels,
                          cfg.aux_loss, cfg.with_box_refine, cfg.two_stage, cfg.family, cfg.num_queries_one2many,
                          cfg.aux_dense_anchor_scale if cfg.aux_dense_head else None)


def flatten_outputs(out: Mapping) -> dict[str, torch.Tensor]:
    """A DETR output dict as flat arrays under the official names: ``pred_logits``, ``pred_boxes``,
    ``aux_<i>_pred_*``, ``enc_pred_*``, ``enc_aux_<i>_pred_*``, and any other tensor entry as it is named;
    a thumbnail model's ``downsample_input`` and its backbone features as ``srcs_<l>`` (ThumbDet's names)."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in out.items():
        if key == "aux_outputs":
            for i, layer in enumerate(value):
                flat.update({f"aux_{i}_{k}": v for k, v in layer.items()})
        elif key == "enc_outputs":
            flat.update({f"enc_{k}": v for k, v in value.items()})
        elif key == "aux_outputs_enc":
            for i, layer in enumerate(value):
                flat.update({f"enc_aux_{i}_{k}": v for k, v in layer.items()})
        elif key == "srcs":
            if "downsample_input" in out:
                flat.update({f"srcs_{i}": v for i, v in enumerate(value)})
        elif key == "src_input":
            continue  # the input itself
        elif isinstance(value, torch.Tensor):
            flat[key] = value  # e.g. Sparse DETR's backbone_mask_prediction, sparse_token_nums
    return flat
