"""A GFL-style head for the SSD / DSOD family (Generalized Focal Loss, Li et al., NeurIPS 2020), the head that
localization distillation (LD) needs.

The facts reproduced are those of mmdetection 2.x's ``GFLHead`` as LD's code base (HikariTJU/LD,
``mmdet/models/dense_heads/gfl_head.py`` and ``configs/gfl/*.py``) has it:

- **one anchor per location**; the anchor only serves the ATSS assignment (:func:`~toolkit.models.atss.atss_assign`:
  top-9 per level by centre distance, mean + std IoU threshold, centre inside the box) and its centre is the
  reference point of the four predicted edge distances;
- per location, **class logits** (sigmoid, no background column) whose target is the *quality* of the location's
  box: the IoU of the decoded prediction with its ground truth at positives, 0 elsewhere
  (:func:`~toolkit.models.gfl_losses.quality_focal_loss`, QFL, beta 2);
- per location and edge (left, top, right, bottom), **a distribution over ``reg_max + 1`` bins** (``0..reg_max``,
  in units of the level's stride); the distance is its expectation (GFL's ``Integral``: softmax dotted with
  ``0..reg_max``), trained with :func:`~toolkit.models.gfl_losses.distribution_focal_loss` (DFL) on the two bins
  around the target distance (clamped to ``reg_max - 0.01``) and with GIoU on the decoded box, both weighted by
  the predicted quality (the highest sigmoid score of the location, no gradient) and averaged over the sum of
  those weights (DFL over the four edges as well); QFL is summed over classes and averaged over the number of
  positives (at least one per image);
- loss weights QFL 1, DFL 0.25, box 2 (GFL's configs; LD's VOC configs use CIoU for the box term, its COCO
  configs GIoU: GIoU here);
- post-processing (``test_cfg``): sigmoid scores; per level, the ``nms_pre`` (1000) locations of highest score
  over classes; decode, clip to the input; every class score above ``score_thr`` (0.05) is a candidate; NMS per
  class at IoU 0.6; the 100 highest scores per image.

What differs from mmdetection's head, and why:

- **sources instead of an FPN**: the DSOD sources have different widths, so each level has its own predictors
  (GFL shares a 4-conv tower and its predictors over FPN levels and rescales each level's regression with a
  learnable ``Scale``; with predictors of its own per level that scale would be redundant and is left out).
  Each source first goes through DSOD's ``Normalize`` (L2, scale 20), as in DSOD's head: the sources are
  concatenations of unnormalised feature maps of very different magnitudes.  ``tower_convs`` optional
  3x3 Conv-BN-ReLU layers per branch and level stand in for GFL's tower (BatchNorm: the DSOD family trains from
  scratch with it).  The presets' predictors are DSOD's (``batch_norm``: convolution + BatchNorm, its bias
  initialised as GFL's): with GFL's plain convolutions ``gfl_dsod_tiny`` diverged at a learning rate of 0.1,
  with DSOD's it trains with ``dsod_tiny``'s recipe (0.2);
- **anchor sizes from the preset's priors**: GFL's anchor is ``8 x stride`` on FPN levels P3-P7 of 800-pixel
  images.  On the DSOD sources (strides 4..160 on a 160-pixel input) that rule gives anchors of 32..1280
  pixels: every object of the small presets would go to the two finest levels and the coarse levels' anchors
  would be larger than the image.  Each level's anchor is instead the square of side ``sqrt(min_size *
  max_size)`` of its SSD prior spec (Caffe's second square prior: the middle of the size range the preset gave
  that level), so ATSS splits objects over the levels as the preset was tuned to (see
  :func:`level_anchor_sizes`);
- **cell-centred anchors**: a location's centre is ``((x + 0.5) * stride_x, (y + 0.5) * stride_y)``, as the SSD
  priors (``offset 0.5``); mmdetection 2.x's ``AnchorGenerator`` puts it at the cell's corner
  (``center_offset 0``).  The stride of a level is the input size over the map size (Caffe's ``PriorBox``
  step when none is given), in x and y: left / right distances are in units of ``stride_x``, top / bottom of
  ``stride_y`` (the same for the square inputs of every preset);
- difficult ground-truth boxes are left out of training (mmdetection's VOC reader makes them ignored boxes,
  which its ATSS assigner does not use).

For distillers (LD, FRS): the model's output holds the per-location class logits (``cls_logits``), each edge's
distribution logits (``reg_logits``, ``(N, P, 4, reg_max + 1)``: LD's KL term works on ``reshape(-1, reg_max +
1)``), the anchors and strides, and the source maps (``sources``); :func:`level_maps` gives per-level maps (FRS's
masks), :func:`gfl_targets` the ATSS assignment (positives: ``labels < C``), which :func:`gfl_loss` takes as
``assigned=`` so that the task loss and the distillation share one assignment.

Box conventions: anchors, targets and decoded boxes are ``xyxy`` in continuous pixels of the network input;
:func:`gfl_postprocess` returns boxes normalized by the input size, as the SSD family's post-processing does.
Labels: the head's class ``c`` (``0..C-1``) is the dataset's label ``c + 1`` (label 0 is the background).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torchvision
from torch import nn

from toolkit.models.atss import atss_assign
from toolkit.models.gfl_losses import distribution_focal_loss, quality_focal_loss
from toolkit.models.layers import ConvBNReLU, L2Norm
from toolkit.models.postprocess import NMS_KINDS, voting_cluster_diou_nms
from toolkit.models.priors import PriorBoxSpec
from toolkit.models.ssd import ConvBN, _fused_conv_bn


def level_anchor_sizes(prior_specs: Sequence[PriorBoxSpec]) -> tuple[float, ...]:
    """The side (pixels) of each level's single square anchor: ``sqrt(int(min_size) * int(max_size))`` of the
    level's first prior size (Caffe truncates both to integers), or ``int(min_size)`` without a ``max_size``."""
    sizes = []
    for spec in prior_specs:
        lo = int(spec.min_sizes[0])
        sizes.append(math.sqrt(lo * int(spec.max_sizes[0])) if spec.max_sizes else float(lo))
    return tuple(sizes)


class GFLHead(nn.Module):
    """Per source: optional ``Normalize``, optional towers, 3x3 class and distribution convolutions.

    Args:
        in_channels: channels of each source.
        num_classes: ``C``, the foreground classes (sigmoid outputs; no background).
        reg_max: the distributions have ``reg_max + 1`` bins (``0..reg_max`` strides).
        normalize: per source (or for all), whether DSOD's L2Norm (scale 20) comes first.
        tower_convs: 3x3 Conv-BN-ReLU layers in front of each predictor (a class and a box tower per level).
        tower_channels: their width (default: the source's).
        tower_groups: ``> 0``: the towers normalize with GroupNorm of this many groups instead of BatchNorm
            (mmdetection's ATSS / GFL heads: 32), for batches too small for batch statistics.
        batch_norm: ``False``: the predictors are 3x3 convolutions with a bias (GFL's); ``True``: without bias,
            each followed by BatchNorm (DSOD's head, :class:`~toolkit.models.ssd.ConvBN`), whose bias starts
            where GFL's would.
        prior_prob: initial foreground probability of every class (GFL's ``bias_init_with_prob(0.01)``).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, reg_max: int = 16,
                 normalize: Sequence[bool] | bool = True, tower_convs: int = 0, tower_channels: int = 0,
                 batch_norm: bool = False, bn_momentum: float = 0.1, prior_prob: float = 0.01,
                 tower_groups: int = 0) -> None:
        super().__init__()
        if isinstance(normalize, bool):
            normalize = [normalize] * len(in_channels)
        if len(normalize) != len(in_channels):
            raise ValueError("normalize needs one entry per source")
        if reg_max < 1:
            raise ValueError(f"reg_max must be >= 1, got {reg_max}")
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.norms = nn.ModuleList(L2Norm(c) if n else nn.Identity() for c, n in zip(in_channels, normalize))

        def tower(c: int) -> nn.Module:
            width = tower_channels or c
            if tower_groups:
                return nn.Sequential(*(nn.Sequential(nn.Conv2d(c if i == 0 else width, width, 3, padding=1, bias=False),
                                                     nn.GroupNorm(tower_groups, width), nn.ReLU(inplace=True))
                                       for i in range(tower_convs)))
            return nn.Sequential(*(ConvBNReLU(c if i == 0 else width, width, 3, 1, 1, bn_momentum)
                                   for i in range(tower_convs)))

        widths = [(tower_channels or c) if tower_convs else c for c in in_channels]
        self.cls_towers = nn.ModuleList(tower(c) for c in in_channels)
        self.reg_towers = nn.ModuleList(tower(c) for c in in_channels)

        def predictor(c_in: int, c_out: int) -> nn.Module:
            return ConvBN(c_in, c_out, bn_momentum) if batch_norm else nn.Conv2d(c_in, c_out, 3, padding=1)

        self.cls = nn.ModuleList(predictor(c, num_classes) for c in widths)
        self.reg = nn.ModuleList(predictor(c, 4 * (reg_max + 1)) for c in widths)
        # GFL's init_weights: N(0, 0.01) predictors; the class bias makes every score start at prior_prob, so the
        # many easy negatives do not swamp QFL's first steps.
        bias = -math.log((1 - prior_prob) / prior_prob)
        for modules, value in ((self.cls, bias), (self.reg, 0.0)):
            for m in modules:
                conv, shift = (m.conv, m.bn) if batch_norm else (m, m)
                nn.init.normal_(conv.weight, std=0.01)
                nn.init.constant_(shift.bias, value)

    def forward(self, sources: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``sources[k]``: ``(N, C_k, H_k, W_k)`` → ``cls_logits (N, P, C)`` and ``reg_logits (N, P, 4,
        reg_max + 1)`` (edges left, top, right, bottom), ``P = sum H_k W_k`` locations, level by level, row-major
        within a level."""
        cls_out, reg_out = [], []
        for x, norm, cls_tower, reg_tower, cls, reg in zip(sources, self.norms, self.cls_towers, self.reg_towers,
                                                           self.cls, self.reg):
            x = norm(x)
            n = x.shape[0]
            if isinstance(cls, ConvBN) and not len(cls_tower):  # both read x: one convolution (see ssd.py)
                y = _fused_conv_bn(x, cls, reg).permute(0, 2, 3, 1)
                cls_map, reg_map = y[..., :self.num_classes], y[..., self.num_classes:]
            else:
                cls_map = cls(cls_tower(x)).permute(0, 2, 3, 1)
                reg_map = reg(reg_tower(x)).permute(0, 2, 3, 1)
            cls_out.append(cls_map.reshape(n, -1, self.num_classes))
            reg_out.append(reg_map.reshape(n, -1, 4, self.reg_max + 1))
        return torch.cat(cls_out, dim=1), torch.cat(reg_out, dim=1)


def grid_anchors(feature_hws: Sequence[tuple[int, int]], image_hw: tuple[int, int], sizes: Sequence[float]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One square anchor per location of every level.

    Args:
        feature_hws: ``(H_k, W_k)`` of each level.
        image_hw: ``(H, W)`` of the network input (pixels).
        sizes: the side of each level's anchor (pixels).
    Returns:
        ``(anchors_xyxy (P, 4), strides (P, 2))`` float32: the anchors in pixels, centred on the cells, and the
        ``(stride_x, stride_y)`` of each location's level (``W / W_k``, ``H / H_k``), level by level, row-major.
    """
    if len(feature_hws) != len(sizes):
        raise ValueError(f"{len(sizes)} anchor sizes for {len(feature_hws)} levels")
    boxes, strides = [], []
    for (fh, fw), size in zip(feature_hws, sizes):
        sx, sy = image_hw[1] / fw, image_hw[0] / fh
        cy, cx = torch.meshgrid((torch.arange(fh, dtype=torch.float64) + 0.5) * sy,
                                (torch.arange(fw, dtype=torch.float64) + 0.5) * sx, indexing="ij")
        cx, cy = cx.reshape(-1), cy.reshape(-1)
        half = size / 2
        boxes.append(torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1))
        strides.append(torch.tensor([[sx, sy]], dtype=torch.float64).expand(fh * fw, 2))
    return torch.cat(boxes).float(), torch.cat(strides).float()


def distribution_expectation(reg_logits: torch.Tensor) -> torch.Tensor:
    """GFL's ``Integral``: ``(..., 4, reg_max + 1)`` logits → ``(..., 4)`` expected distances (in strides)."""
    bins = torch.arange(reg_logits.shape[-1], dtype=reg_logits.dtype, device=reg_logits.device)
    return reg_logits.softmax(dim=-1) @ bins


def distances_to_boxes(distances: torch.Tensor, anchors_xyxy: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Edge distances ``(..., P, 4)`` (left, top, right, bottom, in strides) from the anchors' centres → ``(..., P,
    4)`` xyxy pixels (not clipped).  ``anchors_xyxy`` ``(P, 4)``, ``strides`` ``(P, 2)`` as :func:`grid_anchors`."""
    centres = (anchors_xyxy[:, :2] + anchors_xyxy[:, 2:]) / 2
    scale = strides.repeat(1, 2)
    d = distances * scale
    return torch.cat([centres - d[..., :2], centres + d[..., 2:]], dim=-1)


def boxes_to_distances(boxes_xyxy: torch.Tensor, anchors_xyxy: torch.Tensor, strides: torch.Tensor,
                       reg_max: Optional[int] = None) -> torch.Tensor:
    """The inverse of :func:`distances_to_boxes` row by row (``(M, 4)`` each, ``strides`` ``(M, 2)``); with
    ``reg_max`` clamped to ``[0, reg_max - 0.01]``, as GFL's ``bbox2distance`` makes DFL targets."""
    centres = (anchors_xyxy[:, :2] + anchors_xyxy[:, 2:]) / 2
    scale = strides.repeat(1, 2)
    d = torch.cat([centres - boxes_xyxy[:, :2], boxes_xyxy[:, 2:] - centres], dim=1) / scale
    return d if reg_max is None else d.clamp(min=0, max=reg_max - 0.01)


def aligned_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (``(M, 4)`` xyxy each) → ``(M,)``; the union is floored at ``eps`` (as
    mmdetection's ``bbox_overlaps(is_aligned=True)``)."""
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    return inter / (area_a + area_b - inter).clamp(min=eps)


class GFLDetector(nn.Module):
    """Backbone + :class:`GFLHead` + one anchor per location.

    ``forward(images (N, 3, H, W))`` returns a dict:

    - ``cls_logits`` ``(N, P, C)``: class-quality logits (sigmoid; head class ``c`` is label ``c + 1``);
    - ``reg_logits`` ``(N, P, 4, reg_max + 1)``: each edge's distribution logits (left, top, right, bottom; bin
      ``i`` is a distance of ``i`` strides from the anchor's centre);
    - ``anchors`` ``(P, 4)`` xyxy pixels of the input and ``strides`` ``(P, 2)`` (``stride_x, stride_y``), as
      :func:`grid_anchors`;
    - ``feature_hws``: the ``(H_k, W_k)`` of each level (``P = sum H_k W_k``; :func:`level_maps` splits the flat
      outputs back into maps); ``image_hw``: ``(H, W)``;
    - ``sources``: the head's input maps ``[(N, C_k, H_k, W_k)]`` (before the head's L2Norm).

    ``num_classes`` counts the background, as :class:`~toolkit.models.ssd.SSDDetector`'s (the head has
    ``num_classes - 1`` outputs).  ``caffe_names`` maps the backbone's modules to Caffe layer names (a converted
    DSOD backbone can initialise it); the head is new.
    """

    def __init__(self, backbone: nn.Module, head: GFLHead, anchor_sizes: Sequence[float],
                 image_size: tuple[int, int], caffe_names: Optional[dict[str, tuple[str, ...]]] = None) -> None:
        super().__init__()
        if len(anchor_sizes) != len(head.cls):
            raise ValueError(f"{len(anchor_sizes)} anchor sizes for a head of {len(head.cls)} levels")
        self.backbone = backbone
        self.head = head
        self.anchor_sizes = tuple(float(s) for s in anchor_sizes)
        self.image_size = tuple(image_size)
        self.num_classes = head.num_classes + 1
        self.reg_max = head.reg_max
        self.caffe_names: dict[str, tuple[str, ...]] = dict(caffe_names or {})
        self._anchor_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def anchors(self, feature_hws: Sequence[tuple[int, int]], image_hw: tuple[int, int], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`grid_anchors` for this model's sizes, cached per shape and device."""
        key = (tuple(feature_hws), tuple(image_hw), str(device))
        if key not in self._anchor_cache:
            anchors, strides = grid_anchors(feature_hws, image_hw, self.anchor_sizes)
            self._anchor_cache[key] = (anchors.to(device), strides.to(device))
        return self._anchor_cache[key]

    def forward(self, images: torch.Tensor) -> dict:
        sources = self.backbone(images)
        cls_logits, reg_logits = self.head(sources)
        feature_hws = [tuple(s.shape[-2:]) for s in sources]
        image_hw = tuple(images.shape[-2:])
        anchors, strides = self.anchors(feature_hws, image_hw, images.device)
        return {"cls_logits": cls_logits, "reg_logits": reg_logits, "anchors": anchors, "strides": strides,
                "feature_hws": feature_hws, "image_hw": image_hw, "sources": list(sources)}


def level_maps(flat: torch.Tensor, feature_hws: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Flat per-location outputs ``(N, P, ...)`` → one ``(N, K, H_k, W_k)`` map per level (``K`` the product of
    the trailing dimensions: ``C`` for class logits, ``4 * (reg_max + 1)`` for distributions, edge-major)."""
    n = flat.shape[0]
    counts = [h * w for h, w in feature_hws]
    if sum(counts) != flat.shape[1]:
        raise ValueError(f"{flat.shape[1]} locations, but the levels hold {sum(counts)}")
    return [part.reshape(n, h, w, -1).permute(0, 3, 1, 2)
            for part, (h, w) in zip(flat.split(counts, dim=1), feature_hws)]


# ----------------------------------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class GFLLossParams:
    """GFL's training configuration (``train_cfg`` and the loss weights of its configs)."""

    topk: int = 9               # ATSS candidates per level
    beta: float = 2.0           # QFL's modulation exponent
    cls_weight: float = 1.0     # QFL
    box_weight: float = 2.0     # GIoU
    dfl_weight: float = 0.25    # DFL
    use_difficult_gt: bool = False


@dataclass
class GFLTargets:
    """The ATSS assignment of a batch.

    Attributes:
        labels: ``(N, P)`` int64: the head's class ``0..C-1`` at positives, ``C`` at negatives.
        boxes: ``(N, P, 4)`` xyxy pixels (the anchors' dtype): the assigned ground truth (zeros at negatives).
        anchor_iou: ``(N, P)``: the anchor's IoU with its assigned box (0 at negatives).
        num_pos: ``(N,)`` int64 positives per image.
    """

    labels: torch.Tensor
    boxes: torch.Tensor
    anchor_iou: torch.Tensor
    num_pos: torch.Tensor


def gfl_targets(out: dict, targets: Sequence[dict], params: GFLLossParams = GFLLossParams()) -> GFLTargets:
    """ATSS assignment of every image's ground truth to the model's anchors.

    Args:
        out: the model's output (``anchors``, ``feature_hws``, ``cls_logits`` for ``C`` and the device).
        targets: per image ``boxes`` ``(G, 4)`` xyxy pixels of the network input, ``labels`` ``(G,)`` int64 in
            ``1..C`` (0 is the background), optionally ``difficult`` ``(G,)`` bool.
    """
    anchors = out["anchors"]
    num_per_level = [h * w for h, w in out["feature_hws"]]
    n, p, c = out["cls_logits"].shape
    device = anchors.device
    labels = torch.full((n, p), c, dtype=torch.int64, device=device)
    boxes = anchors.new_zeros(n, p, 4)
    anchor_iou = anchors.new_zeros(n, p)
    for i, t in enumerate(targets):
        gt_boxes = t["boxes"].to(device=device, dtype=anchors.dtype).reshape(-1, 4)
        gt_labels = t["labels"].to(device=device, dtype=torch.int64).reshape(-1)
        if not params.use_difficult_gt and "difficult" in t:
            keep = ~t["difficult"].to(device=device, dtype=torch.bool).reshape(-1)
            gt_boxes, gt_labels = gt_boxes[keep], gt_labels[keep]
        if gt_labels.numel() and (gt_labels.min() < 1 or gt_labels.max() > c):
            raise ValueError(f"image {i}: ground-truth labels must lie in 1..{c}, got {gt_labels.tolist()}")
        assigned, iou = atss_assign(anchors, num_per_level, gt_boxes, params.topk)
        pos = assigned >= 0
        labels[i, pos] = gt_labels[assigned[pos]] - 1
        boxes[i, pos] = gt_boxes[assigned[pos]]
        anchor_iou[i] = iou
    return GFLTargets(labels, boxes, anchor_iou, (labels < c).sum(dim=1))


def gfl_loss(out: dict, targets: Sequence[dict], params: GFLLossParams = GFLLossParams(),
             assigned: Optional[GFLTargets] = None) -> dict[str, torch.Tensor]:
    """GFL's loss of a batch (see the module docstring for the terms and their normalisation).

    Args:
        out: the output of :class:`GFLDetector` (float32).
        targets: as :func:`gfl_targets` (pixels of the network input).
        assigned: the batch's assignment, when already computed (a distiller's).
    Returns:
        ``{"loss": the weighted sum, "loss_cls": weighted QFL, "loss_box": weighted GIoU, "loss_dfl": weighted
        DFL}``, scalars (the components carry their weights, as mmdetection logs them).
    """
    if assigned is None:
        assigned = gfl_targets(out, targets, params)
    cls_logits, reg_logits = out["cls_logits"], out["reg_logits"]
    n, p, c = cls_logits.shape
    reg_max = reg_logits.shape[-1] - 1
    cls_flat = cls_logits.reshape(-1, c)
    labels = assigned.labels.reshape(-1)
    pos = torch.nonzero(labels < c).flatten()
    quality = cls_flat.new_zeros(n * p)
    # mmdetection's num_total_samples: at least one positive per image.
    num_total = assigned.num_pos.clamp(min=1).sum().to(cls_flat.dtype)
    if pos.numel():
        location = pos % p
        anchors, strides = out["anchors"][location], out["strides"][location]
        pred_logits = reg_logits.reshape(-1, 4, reg_max + 1)[pos]
        pred_boxes = distances_to_boxes(distribution_expectation(pred_logits), anchors, strides)
        target_boxes = assigned.boxes.reshape(-1, 4)[pos]
        quality[pos] = aligned_iou(pred_boxes.detach(), target_boxes)
        weight = cls_flat.detach().sigmoid().max(dim=1).values[pos]
        # A positive's weight is a sigmoid: positive unless it underflows; the floor keeps 0 / 0 out.
        weight_sum = weight.sum().clamp(min=torch.finfo(weight.dtype).tiny)
        giou = torchvision.ops.generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none")
        loss_box = (weight * giou).sum() / weight_sum
        target_d = boxes_to_distances(target_boxes, anchors, strides, reg_max)
        dfl = distribution_focal_loss(pred_logits.reshape(-1, reg_max + 1), target_d.reshape(-1)).reshape(-1, 4)
        loss_dfl = (weight[:, None] * dfl).sum() / 4 / weight_sum
    else:
        loss_box = loss_dfl = reg_logits.sum() * 0  # keeps every parameter in the graph (DDP)
    loss_cls = quality_focal_loss(cls_flat, labels, quality, params.beta).sum() / num_total
    losses = {"loss_cls": params.cls_weight * loss_cls, "loss_box": params.box_weight * loss_box,
              "loss_dfl": params.dfl_weight * loss_dfl}
    return {"loss": losses["loss_cls"] + losses["loss_box"] + losses["loss_dfl"], **losses}


class GFLLoss:
    """:func:`gfl_loss` with fixed parameters: ``criterion(out, targets) -> dict``."""

    def __init__(self, params: GFLLossParams = GFLLossParams()) -> None:
        self.params = params

    def __call__(self, out: dict, targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        return gfl_loss(out, targets, self.params)


# ---------------------------------------------------------------------------------------------- post-process
@dataclass(frozen=True)
class GFLPostprocessParams:
    """GFL's ``test_cfg`` (its defaults).  ``nms``: ``"greedy"`` (per-class NMS at ``nms_threshold``) or
    ``"voting_cluster_diou"`` (LD's score-voting cluster DIoU-NMS at ``nms_threshold``, LD's test configuration);
    ``nms_pre <= 0`` keeps every location."""

    score_threshold: float = 0.05
    nms_pre: int = 1000
    nms_threshold: float = 0.6
    max_per_image: int = 100
    nms: str = "greedy"

    def __post_init__(self) -> None:
        if self.nms not in NMS_KINDS:
            raise ValueError(f"unknown NMS {self.nms!r}; choose from {NMS_KINDS}")


def gfl_postprocess(cls_logits: torch.Tensor, reg_logits: torch.Tensor, anchors_xyxy: torch.Tensor,
                    strides: torch.Tensor, feature_hws: Sequence[tuple[int, int]], image_hw: tuple[int, int],
                    params: GFLPostprocessParams = GFLPostprocessParams()) -> list[dict[str, torch.Tensor]]:
    """Detections of a batch (GFL's ``_get_bboxes`` + ``multiclass_nms``).

    Args:
        cls_logits: ``(N, P, C)``; ``reg_logits``: ``(N, P, 4, reg_max + 1)``; ``anchors_xyxy`` ``(P, 4)`` and
            ``strides`` ``(P, 2)`` as :class:`GFLDetector` returns them; ``image_hw``: the input's ``(H, W)``.
    Returns:
        One dict per image: ``boxes`` float32 ``(K, 4)`` xyxy normalized by the input size (clipped to it),
        ``scores`` ``(K,)``, ``labels`` int64 ``(K,)`` in ``1..C``; by descending score, ``K <= max_per_image``.
    """
    h, w = image_hw
    counts = [fh * fw for fh, fw in feature_hws]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    results = []
    with torch.no_grad():
        scores_all = cls_logits.float().sigmoid()
        distances = distribution_expectation(reg_logits.float())
        for i in range(cls_logits.shape[0]):
            boxes, scores, start = [], [], 0
            for count in counts:
                idx = torch.arange(start, start + count)
                level_scores = scores_all[i, start:start + count]
                if 0 < params.nms_pre < count:
                    idx = idx[level_scores.max(dim=1).values.topk(params.nms_pre).indices]
                boxes.append(distances_to_boxes(distances[i, idx], anchors_xyxy[idx], strides[idx]))
                scores.append(scores_all[i, idx])
                start += count
            boxes, scores = torch.cat(boxes), torch.cat(scores)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            rows, classes = torch.nonzero(scores > params.score_threshold, as_tuple=True)
            cand_boxes, cand_scores = boxes[rows], scores[rows, classes]
            if params.nms == "greedy":
                keep = torchvision.ops.batched_nms(cand_boxes, cand_scores, classes, params.nms_threshold)
                keep = keep[:params.max_per_image]
                kept_boxes, kept_scores, kept_labels = cand_boxes[keep], cand_scores[keep], classes[keep]
            else:
                kept_boxes, kept_scores, kept_labels = voting_cluster_diou_nms(cand_boxes, cand_scores, classes,
                                                                               params.nms_threshold)
                kept_boxes, kept_scores, kept_labels = (kept_boxes[:params.max_per_image],
                                                        kept_scores[:params.max_per_image],
                                                        kept_labels[:params.max_per_image])
            results.append({"boxes": kept_boxes / scale, "scores": kept_scores, "labels": kept_labels + 1})
    return results


@torch.no_grad()
def predict_gfl(model: nn.Module, images: torch.Tensor, device: torch.device,
                params: GFLPostprocessParams = GFLPostprocessParams()) -> list[dict[str, torch.Tensor]]:
    """Run a :class:`GFLDetector` on a batch and post-process on the CPU (a ``predict_fn`` of
    :func:`toolkit.engine.predict_batch`): boxes normalized xyxy, labels ``1..C``."""
    out = model(images.to(device))
    return gfl_postprocess(out["cls_logits"].cpu(), out["reg_logits"].cpu(), out["anchors"].cpu(),
                           out["strides"].cpu(), out["feature_hws"], out["image_hw"], params)
