"""The SSD detector frame: backbone sources → (optional L2 norm) → 3x3 loc / conf heads, priors.

The model emits raw tensors; :class:`~toolkit.models.multibox_loss.MultiBoxLoss`
owns matching and :func:`~toolkit.models.postprocess.detection_output` owns
decoding, thresholds and NMS (DETR's split).

Output layout follows Caffe's ``Permute(0, 2, 3, 1)`` + ``Flatten`` + ``Concat``:
for each source in order, for each cell (row-major), for each prior of the
cell — the same order as :class:`~toolkit.models.priors.PriorGenerator`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from toolkit.models.layers import L2Norm
from toolkit.models.priors import PriorBoxSpec, PriorGenerator


class ConvBN(nn.Module):
    """3x3 convolution without bias followed by BatchNorm (Caffe: Convolution + BatchNorm + Scale).

    DSOD's head BatchNorms use ``eps: 0.001`` (the backbone's use Caffe's default 1e-5).
    Shapes: ``(N, C_in, H, W) -> (N, C_out, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float = 0.1, bn_eps: float = 1e-3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SSDHead(nn.Module):
    """Per-source ``Normalize`` (optional) and 3x3 loc / conf convolutions.

    Args:
        in_channels: channels of each source.
        num_priors: priors per cell of each source.
        num_classes: including the background.
        normalize: per source, whether an L2Norm (scale 20) precedes the convolutions
            (DSOD: all sources; SSD300: conv4_3 only).
        batch_norm: ``False``: the loc / conf convolutions have a bias (SSD300);
            ``True``: no bias, each convolution is followed by BatchNorm + Scale
            (DSOD's ``*_mbox_loc_bn`` / ``*_mbox_loc_scale`` layers).
    """

    def __init__(self, in_channels: Sequence[int], num_priors: Sequence[int], num_classes: int,
                 normalize: Sequence[bool], batch_norm: bool, bn_momentum: float = 0.1) -> None:
        super().__init__()
        if not (len(in_channels) == len(num_priors) == len(normalize)):
            raise ValueError("in_channels, num_priors and normalize need one entry per source")
        self.num_classes = num_classes
        self.norms = nn.ModuleList(L2Norm(c) if n else nn.Identity() for c, n in zip(in_channels, normalize))

        def predictor(c_in: int, c_out: int) -> nn.Module:
            if batch_norm:
                return ConvBN(c_in, c_out, bn_momentum)
            return nn.Conv2d(c_in, c_out, 3, padding=1, bias=True)

        self.loc = nn.ModuleList(predictor(c, a * 4) for c, a in zip(in_channels, num_priors))
        self.conf = nn.ModuleList(predictor(c, a * num_classes) for c, a in zip(in_channels, num_priors))

    def forward(self, sources: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``sources[k]``: ``(N, C_k, H_k, W_k)`` → ``loc (N, P, 4)``, ``conf (N, P, num_classes)`` logits."""
        locs, confs = [], []
        for x, norm, loc, conf in zip(sources, self.norms, self.loc, self.conf):
            x = norm(x)
            n = x.shape[0]
            if isinstance(loc, ConvBN):
                y = _fused_conv_bn(x, loc, conf).permute(0, 2, 3, 1)
                a = loc.conv.out_channels
                locs.append(y[..., :a].reshape(n, -1, 4))
                confs.append(y[..., a:].reshape(n, -1, self.num_classes))
            else:
                locs.append(loc(x).permute(0, 2, 3, 1).reshape(n, -1, 4))
                confs.append(conf(x).permute(0, 2, 3, 1).reshape(n, -1, self.num_classes))
        return torch.cat(locs, dim=1), torch.cat(confs, dim=1)


def _fused_conv_bn(x: torch.Tensor, first: ConvBN, second: ConvBN) -> torch.Tensor:
    """``cat([first(x), second(x)], dim=1)`` as one convolution and one batch norm.

    Both read the same input and BatchNorm works channel by channel, so stacking the
    two weight tensors and the two BatchNorms changes nothing but the number of passes
    over ``x`` (the loc and conf heads of every source; a few percent of a ``dsod_tiny``
    training step).  In training the concatenated running statistics are written back.
    """
    b1, b2 = first.bn, second.bn
    settings = (b1.eps, b1.momentum, b1.affine, b1.track_running_stats, b1.training)
    if settings != (b2.eps, b2.momentum, b2.affine, b2.track_running_stats, b2.training):
        return torch.cat([first(x), second(x)], dim=1)
    y = F.conv2d(x, torch.cat([first.conv.weight, second.conv.weight]), None, first.conv.stride,
                 first.conv.padding, first.conv.dilation)
    weight = torch.cat([b1.weight, b2.weight]) if b1.affine else None
    bias = torch.cat([b1.bias, b2.bias]) if b1.affine else None
    if not b1.track_running_stats:
        return F.batch_norm(y, None, None, weight, bias, True, 0.0, b1.eps)
    mean = torch.cat([b1.running_mean, b2.running_mean])
    var = torch.cat([b1.running_var, b2.running_var])
    training = b1.training
    momentum = b1.momentum if b1.momentum is not None else 0.0
    if training:
        b1.num_batches_tracked.add_(1)
        b2.num_batches_tracked.add_(1)
        if b1.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            momentum = 1.0 / float(b1.num_batches_tracked)
    out = F.batch_norm(y, mean, var, weight, bias, training, momentum, b1.eps)
    if training:
        c = b1.num_features
        with torch.no_grad():
            b1.running_mean.copy_(mean[:c])
            b2.running_mean.copy_(mean[c:])
            b1.running_var.copy_(var[:c])
            b2.running_var.copy_(var[c:])
    return out


class SSDDetector(nn.Module):
    """Backbone + :class:`SSDHead` + priors.

    ``forward(images (N, 3, H, W))`` returns ``{"loc": (N, P, 4), "conf": (N, P, C)
    logits, "priors": (P, 4) normalized xyxy, "variances": (P, 4), "sources": the
    head's input maps [(N, C_k, H_k, W_k)]}``; priors follow the feature-map sizes
    of the input, so other input sizes work too.

    ``down_sample`` (None by default; see :func:`toolkit.models.build.add_thumbnail`)
    is ThumbDet's thumbnailer: the backbone then sees the thumbnail, the priors are
    those of the thumbnail's size, and the output adds ``src_input`` and
    ``downsample_input`` ([0, 1] RGB, the input and the thumbnail).
    """

    def __init__(self, backbone: nn.Module, head: SSDHead, prior_specs: Sequence[PriorBoxSpec],
                 image_size: tuple[int, int], caffe_names: Optional[dict[str, tuple[str, ...]]] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.prior_generator = PriorGenerator(tuple(prior_specs))
        self.image_size = tuple(image_size)
        self.num_classes = head.num_classes
        self.caffe_names: dict[str, tuple[str, ...]] = dict(caffe_names or {})
        self._prior_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.down_sample: Optional[nn.Module] = None

    def priors(self, feature_hws: Sequence[tuple[int, int]], image_hw: tuple[int, int],
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(feature_hws), tuple(image_hw), str(device))
        if key not in self._prior_cache:
            boxes, variances = self.prior_generator(feature_hws, image_hw)
            self._prior_cache[key] = (boxes.to(device), variances.to(device))
        return self._prior_cache[key]

    def forward(self, images: torch.Tensor) -> dict:
        extras: dict[str, torch.Tensor] = {}
        if self.down_sample is not None:
            extras = self.down_sample(images)
            images = extras.pop("images")
        sources = self.backbone(images)
        loc, conf = self.head(sources)
        priors, variances = self.priors([tuple(s.shape[-2:]) for s in sources], tuple(images.shape[-2:]), images.device)
        return {"loc": loc, "conf": conf, "priors": priors, "variances": variances, "sources": list(sources),
                **extras}
