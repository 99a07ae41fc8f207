"""Backbones for the DETR family, with a padding mask per output level.

``ResNetBody``: the official ResNet with frozen batch norm.  ``Joiner`` reproduces
the official module tree (``backbone.0.body.<torchvision ResNet names>``,
``backbone.1`` the position encoding), so that official checkpoints load by name.
No weights are downloaded: the ResNet is built empty, then filled from a
checkpoint or from a local torchvision file.

``DSODBody``: not in the official code; the toolkit's DSOD backbone (built to
train from scratch), for the CPU presets, with the same interface.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from toolkit.data.detr_transforms import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from toolkit.data.transforms import PREPROCESS_PRESETS
from toolkit.models.build import DSOD_TINY
from toolkit.models.detr.position_encoding import SinePositionEncoding
from toolkit.models.dsod import DSODBackbone, DSODConfig
from toolkit.models.state_dict import state_dict_mismatch
from toolkit.models.thumbnail import Thumbnailer


def downsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Padding mask bool ``(B, H, W)`` -> ``(B, h, w)`` by nearest sampling (the official
    ``F.interpolate(mask[None].float(), size).bool()``)."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


class ResNetBody(nn.Module):
    """A torchvision ResNet with ``FrozenBatchNorm2d`` (eps 1e-5, statistics and affine frozen), returning C3-C5
    (strides 8, 16, 32) or C5 alone.

    Frozen batch norm and a frozen stem suit an ImageNet-pretrained backbone (the
    official setting).  A backbone trained from scratch (no weights can be
    downloaded here) needs its normalization to learn: ``from_scratch`` uses
    ``BatchNorm2d`` and trains every layer.

    Args:
        name: ``resnet50`` or ``resnet101`` (any torchvision ResNet with bottleneck blocks).
        multi_scale: return C3, C4, C5 (else C5 only).
        dilation: replace C5's stride with dilation (stride 16).
        train_backbone: leave C2-C5's parameters trainable (the stem and C1 are frozen, as officially).
        from_scratch: ``BatchNorm2d`` and every layer trainable (no pretrained weights).
        weights: a local torchvision ResNet state dict file to start from (nothing is downloaded).
        thumb_scale: 2 or 4: ThumbDet's thumbnail in front of the ResNet (``down_sample``, its official name; see
            :mod:`toolkit.models.thumbnail`); 1: none.
        thumb_mode: ``"learned"`` (ThumbDet), ``"bicubic"`` or ``"bicubic_aliased"`` (the baselines).
    """

    def __init__(self, name: str = "resnet50", multi_scale: bool = True, dilation: bool = False,
                 train_backbone: bool = True, weights: Optional[str | os.PathLike] = None,
                 from_scratch: bool = False, thumb_scale: int = 1, thumb_mode: str = "learned") -> None:
        super().__init__()
        resnet = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=[False, False, dilation],
                                                   norm_layer=nn.BatchNorm2d if from_scratch else FrozenBatchNorm2d)
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            missing, unexpected = resnet.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing:
                raise ValueError(f"{weights}: not a torchvision {name} state dict (missing {missing[:5]} ...)")
        for pname, parameter in resnet.named_parameters():
            trainable = from_scratch or any(layer in pname for layer in ("layer2", "layer3", "layer4"))
            if not train_backbone or not trainable:
                parameter.requires_grad_(False)
        if multi_scale:
            layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
            self.strides, self.num_channels = [8, 16, 32], [512, 1024, 2048]
        else:
            layers = {"layer4": "0"}
            self.strides, self.num_channels = [32], [2048]
        if dilation:
            self.strides[-1] //= 2
        if name in ("resnet18", "resnet34"):  # basic blocks: a quarter of the channels
            self.num_channels = [c // 4 for c in self.num_channels]
        self.body = IntermediateLayerGetter(resnet, return_layers=layers)
        # ThumbDet: the images are ImageNet-normalized RGB here, so the thumbnailer's constants are the defaults.
        self.down_sample = Thumbnailer(thumb_scale, thumb_mode) if thumb_scale > 1 else None

    def forward(self, images: torch.Tensor, mask: torch.Tensor
                ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
        """``images`` ``(B, 3, H, W)``, ``mask`` bool ``(B, H, W)`` -> ``([(features (B, C, h, w), mask (B, h, w))]
        from the finest level to the coarsest, thumbnail outputs)``.

        With a thumbnail the ResNet sees it, and the thumbnail outputs are ``src_input`` and ``downsample_input``
        (:class:`~toolkit.models.thumbnail.Thumbnailer`); the masks still come from the full-size ``mask``, sampled
        at each level's size (ThumbDet's ``BackboneBase.forward``).  Without one they are empty.
        """
        extras: dict[str, torch.Tensor] = {}
        if self.down_sample is not None:
            extras = self.down_sample(images)
            images = extras.pop("images")
        out = []
        for _, feature in sorted(self.body(images).items()):
            out.append((feature, downsample_mask(mask, feature.shape[-2:])))
        return out, extras


# dsod_tiny's backbone without Fine and with two of its four extra scales: First, Second, Third, Fourth at strides
# 8, 16, 32, 64, 128 / 128 / 128 / 64 channels (every layer one of dsod_tiny's, so its checkpoints fill it).
DSOD_BACKBONES: dict[str, DSODConfig] = {
    "dsod_tiny": replace(DSOD_TINY, fine_channels=0, extra_channels=DSOD_TINY.extra_channels[:2]),
}


class DSODBody(nn.Module):
    """A DSOD backbone (batch norm, trained from scratch or from a toolkit DSOD detector) returning its sources as
    the DETR's levels.

    The DETR's images are ImageNet-normalized RGB; the body turns them into the DSOD family's own input (BGR,
    ``(x - (104, 117, 123)) * 0.017`` on 0-255 pixels) with a fixed per-channel affine map, so that the backbone of
    a trained ``dsod_tiny`` sees what it was trained on.  (DETR's padding, 0 after ImageNet normalization, maps to
    within 0.02 of 0.)

    Args:
        name: a key of :data:`DSOD_BACKBONES`.
        multi_scale: return every source, finest first (else the stride-32 one alone).
        weights: a toolkit checkpoint (``toolkit.train``'s) of a DSOD detector whose backbone holds every layer of
            this one (e.g. ``dsod_tiny``'s, the main job's): its ``backbone.*`` tensors are loaded; the rest is
            ignored.
        thumb_scale, thumb_mode: ThumbDet's thumbnail in front, as in :class:`ResNetBody`.
    """

    def __init__(self, name: str = "dsod_tiny", multi_scale: bool = True,
                 weights: Optional[str | os.PathLike] = None, thumb_scale: int = 1,
                 thumb_mode: str = "learned") -> None:
        super().__init__()
        if name not in DSOD_BACKBONES:
            raise ValueError(f"unknown DSOD backbone {name!r}; choose from {sorted(DSOD_BACKBONES)}")
        cfg = DSOD_BACKBONES[name]
        self.body = DSODBackbone(cfg)
        if weights is not None:
            load_dsod_backbone(self.body, weights)
        channels = list(cfg.source_channels)
        strides = [8 * 2 ** i for i in range(len(channels))]
        self.levels = list(range(len(channels))) if multi_scale else [2]
        self.strides = [strides[i] for i in self.levels]
        self.num_channels = [channels[i] for i in self.levels]
        self.down_sample = Thumbnailer(thumb_scale, thumb_mode) if thumb_scale > 1 else None
        caffe = PREPROCESS_PRESETS["dsod"]
        mean_rgb, std_rgb = torch.tensor(IMAGENET_MEAN_RGB) * 255, torch.tensor(IMAGENET_STD_RGB) * 255
        mean_bgr = torch.tensor(caffe.mean_bgr)
        # BGR channel c takes RGB channel 2 - c: x_bgr = (x_rgb * std + mean)[flipped]; y = (x_bgr - mean_bgr) * s.
        self.register_buffer("input_scale", (std_rgb.flip(0) * caffe.scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((mean_rgb.flip(0) - mean_bgr) * caffe.scale).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, images: torch.Tensor, mask: torch.Tensor
                ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
        """As :meth:`ResNetBody.forward`."""
        extras: dict[str, torch.Tensor] = {}
        if self.down_sample is not None:
            extras = self.down_sample(images)
            images = extras.pop("images")
        images = images.flip(1) * self.input_scale.to(images.dtype) + self.input_shift.to(images.dtype)
        sources = self.body(images)
        return [(sources[i], downsample_mask(mask, sources[i].shape[-2:])) for i in self.levels], extras


def load_dsod_backbone(body: DSODBackbone, path: str | os.PathLike) -> None:
    """Fill ``body`` from the ``backbone.*`` tensors of a toolkit DSOD checkpoint (``{"model": state_dict, ...}``).

    Raises:
        ValueError: not a toolkit checkpoint, or a layer of ``body`` missing from it or of another shape (named).
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({str(exc).splitlines()[0]})") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path}: not a toolkit checkpoint (no 'model' state dict)")
    own = body.state_dict()
    # Layers of the checkpoint's backbone that this one leaves out (Fine, later scales) are not a mismatch.
    source = {key: v for k, v in ckpt["model"].items()
              if k.startswith("backbone.") and (key := k[len("backbone."):]) in own}
    problems = state_dict_mismatch(own, source)
    if problems:
        raise ValueError(f"{path}: the backbone of model {ckpt.get('model_name', '?')!r} does not fit this DSOD "
                         f"backbone ({'; '.join(problems)})")
    body.load_state_dict(source)


class Joiner(nn.Sequential):
    """``[ResNetBody, SinePositionEncoding]``: features, masks and position encodings per level."""

    def __init__(self, body: ResNetBody, position: SinePositionEncoding) -> None:
        super().__init__(body, position)
        self.strides = body.strides
        self.num_channels = body.num_channels

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        """-> ``(levels [(features, mask)], positions [(B, 2F, h, w) in the features' dtype], thumbnail outputs
        (see :meth:`ResNetBody.forward`))``."""
        levels, extras = self[0](images, mask)
        return levels, [self[1](m).to(f.dtype) for f, m in levels], extras
