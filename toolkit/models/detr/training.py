"""Training recipes of the DETR family: presets, optimizer groups, targets, post-processing.

The official recipe (Deformable DETR's ``main.py`` defaults, which Sparse DETR keeps):
AdamW, lr 2e-4, backbone lr 2e-5, the sampling offsets' and reference points'
projections at 0.1x the lr, weight decay 1e-4, gradient norm clipped at 0.1,
batch 2 per GPU, 50 epochs with the lr divided by 10 after 40.  The small presets
keep the recipe and shrink the model and the input for CPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch
from torch import nn
from torchvision.ops import box_convert

from toolkit.models.detr.deformable_detr import DeformableDETR, DeformableDETRConfig, build_deformable_detr


@dataclass(frozen=True)
class DETRPreset:
    """A model configuration (``num_classes`` set from the dataset) and its input sizes."""

    config: DeformableDETRConfig
    train_scales: tuple[int, ...]
    max_size: int
    crop_scales: tuple[int, ...]
    crop_min: int
    crop_max: int
    test_scale: int


_COCO_INPUT = dict(train_scales=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800), max_size=1333,
                   crop_scales=(400, 500, 600), crop_min=384, crop_max=600, test_scale=800)
# CPU presets: ResNet-18 trained from scratch (batch norm; nothing can be downloaded), 128 channels, 3 + 3
# layers, 50 queries (shapes images hold at most 6 objects), inputs of 144-208 px on the short side, 256 at most
# (shapes images are 200-400 px; a smaller padded batch is most of a CPU step's cost).
# With --aux-dense-head, anchors of 4x the stride, half Co-DETR's 8: the inputs are ~1/4 of COCO's 800 px, and at 8x
# the three coarser levels' anchors (256-1024 px) would all be larger than the image.
_TINY = dict(backbone="resnet18", backbone_from_scratch=True, hidden_dim=128, nheads=8, enc_layers=3,
             dec_layers=3, dim_feedforward=512, num_queries=50, dropout=0.0, aux_dense_anchor_scale=4.0)
_TINY_DSOD = {**_TINY, "backbone": "dsod_tiny", "backbone_from_scratch": False}
_TINY_INPUT = dict(train_scales=(144, 160, 176, 192, 208), max_size=256, crop_scales=(128, 160, 192), crop_min=112,
                   crop_max=192, test_scale=192)

DETR_PRESETS: dict[str, DETRPreset] = {
    "deformable_detr": DETRPreset(DeformableDETRConfig(), **_COCO_INPUT),
    # Sparse DETR's published model: rho 0.1 with every option.
    "sparse_detr": DETRPreset(DeformableDETRConfig(with_box_refine=True, two_stage=True, family="sparse", rho=0.1,
                                                   use_enc_aux_loss=True, eff_query_init=True,
                                                   eff_specific_head=True), **_COCO_INPUT),
    "deformable_detr_tiny": DETRPreset(DeformableDETRConfig(**_TINY, with_box_refine=True), **_TINY_INPUT),
    # The tiny presets with dsod_tiny's backbone (toolkit.models.detr.backbone.DSODBody), which --backbone-weights
    # can take from a trained dsod_tiny (the main job's): the CPU stand-in for the official pretrained ResNet.
    "deformable_detr_dsod": DETRPreset(DeformableDETRConfig(**_TINY_DSOD, with_box_refine=True), **_TINY_INPUT),
    "sparse_detr_tiny": DETRPreset(DeformableDETRConfig(**_TINY, with_box_refine=True, two_stage=True,
                                                        family="sparse", rho=0.1, use_enc_aux_loss=True,
                                                        eff_query_init=True, eff_specific_head=True),
                                   **_TINY_INPUT),
    "sparse_detr_dsod": DETRPreset(DeformableDETRConfig(**_TINY_DSOD, with_box_refine=True, two_stage=True,
                                                        family="sparse", rho=0.1, use_enc_aux_loss=True,
                                                        eff_query_init=True, eff_specific_head=True),
                                   **_TINY_INPUT),
}


def preset_config(name: str, num_classes: int, *, rho=None, with_box_refine=None, two_stage=None,
                  num_queries_one2many=None, look_forward_twice=None, aux_dense_head=None) -> DeformableDETRConfig:
    """The preset's configuration for ``num_classes`` (the dataset's foreground classes), flags applied.

    Raises:
        KeyError: an unknown preset.
        ValueError: a combination the model cannot build (e.g. ``rho`` on a Deformable DETR preset).
    """
    if name not in DETR_PRESETS:
        raise KeyError(f"unknown DETR preset {name!r}; choose from {sorted(DETR_PRESETS)}")
    cfg = replace(DETR_PRESETS[name].config, num_classes=num_classes)
    changes = {k: v for k, v in (("rho", rho), ("with_box_refine", with_box_refine), ("two_stage", two_stage),
                                 ("num_queries_one2many", num_queries_one2many),
                                 ("look_forward_twice", look_forward_twice), ("aux_dense_head", aux_dense_head))
               if v is not None}
    if changes.get("rho") and cfg.family != "sparse":
        raise ValueError(f"--rho applies to Sparse DETR presets, not {name!r}")
    return replace(cfg, **changes)


def build_detr_model(cfg: DeformableDETRConfig, backbone_weights=None) -> DeformableDETR:
    return build_deformable_detr(cfg, train_backbone=True, backbone_weights=backbone_weights)


def param_groups(model: nn.Module, lr: float, lr_backbone: float, lr_linear_proj_mult: float = 0.1,
                 backbone_names: Sequence[str] = ("backbone.0",),
                 linear_proj_names: Sequence[str] = ("reference_points", "sampling_offsets")) -> list[dict]:
    """The official optimizer groups: backbone at ``lr_backbone``, the sampling offsets' and reference points'
    projections at ``lr * lr_linear_proj_mult``, the rest at ``lr`` (frozen parameters left out)."""
    def match(name: str, keys: Iterable[str]) -> bool:
        return any(k in name for k in keys)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if not match(n, backbone_names) and not match(n, linear_proj_names)],
         "lr": lr},
        {"params": [p for n, p in named if match(n, backbone_names)], "lr": lr_backbone},
        {"params": [p for n, p in named if match(n, linear_proj_names)], "lr": lr * lr_linear_proj_mult},
    ]


def detr_targets(targets: Sequence[dict], device: torch.device) -> list[dict]:
    """Toolkit targets (``boxes`` xyxy pixels of the input image, ``labels`` 1..K, ``size`` (h, w)) -> DETR's
    (``boxes`` cxcywh normalized by the image size, ``labels`` 0..K-1)."""
    out = []
    for t in targets:
        h, w = (float(v) for v in t["size"])
        boxes = box_convert(t["boxes"].float(), "xyxy", "cxcywh") / torch.tensor([w, h, w, h])
        out.append({"labels": (t["labels"] - 1).to(device), "boxes": boxes.to(device)})
    return out


@torch.no_grad()
def detr_postprocess(outputs: dict, top_k: int = 100) -> list[dict]:
    """The official ``PostProcess``: the ``top_k`` best (query, class) pairs by sigmoid score.

    Returns per image ``boxes`` float32 ``(k, 4)`` xyxy normalized to the unpadded image, ``scores`` ``(k,)`` and
    ``labels`` int64 ``(k,)`` in the toolkit's 1..K (DETR's class + 1), highest score first.
    """
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    prob = logits.sigmoid().flatten(1)
    k = min(top_k, prob.shape[1])
    scores, index = torch.topk(prob, k, dim=1)
    query = torch.div(index, logits.shape[2], rounding_mode="floor")
    labels = index % logits.shape[2]
    xyxy = torch.gather(box_convert(boxes, "cxcywh", "xyxy"), 1, query.unsqueeze(-1).repeat(1, 1, 4))
    return [{"boxes": b.float().cpu(), "scores": s.float().cpu(), "labels": (lab + 1).cpu()}
            for b, s, lab in zip(xyxy, scores, labels)]


def detr_predict(model: nn.Module, inputs, device: torch.device) -> list[dict]:
    """Run a DETR on a padded batch ``(images, mask)`` and post-process (boxes normalized to each image)."""
    images, mask = inputs
    return detr_postprocess(model(images.to(device), mask.to(device)))
