"""SSD300 with the reduced VGG16 backbone (Liu et al., ECCV 2016), as SSD's generator writes it
(``../shared/fixtures/caffe/prototxt/ssd300_vgg16_voc0712``).

- VGG16 ``conv1_1`` … ``conv5_3`` (3x3, ReLU) with 2x2 max pools in Caffe's ceil
  mode (75 → 38 after pool3), ``pool5`` 3x3 stride 1 pad 1;
- ``fc6`` as a 3x3 convolution with dilation 6 (1024), ``fc7`` 1x1 (1024): the
  "reduced" fully connected layers;
- extra layers ``conv6_1/2`` (256 → 512, stride 2), ``conv7_1/2`` (128 → 256,
  stride 2), ``conv8_1/2`` and ``conv9_1/2`` (128 → 256, 3x3 without padding);
- sources ``conv4_3`` (through Normalize, scale 20), ``fc7``, ``conv6_2``,
  ``conv7_2``, ``conv8_2``, ``conv9_2``; loc / conf 3x3 convolutions with bias.

Module names are the Caffe layer names (``features.conv4_3``), so
:attr:`VGGBackbone.caffe_names` is the identity on layer names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from toolkit.models.layers import caffe_max_pool

SOURCES = ("conv4_3", "fc7", "conv6_2", "conv7_2", "conv8_2", "conv9_2")


@dataclass(frozen=True)
class VGGConfig:
    """Channel widths; the defaults are SSD300's. ``stages`` are the VGG stages' widths
    (convolutions per stage 2, 2, 3, 3, 3); ``fc`` the width of fc6 / fc7; ``extras``
    ``(1x1 width, 3x3 width)`` of conv6 … conv9."""

    stages: tuple[int, int, int, int, int] = (64, 128, 256, 512, 512)
    fc: int = 1024
    fc6_dilation: int = 6
    extras: tuple[tuple[int, int], ...] = ((256, 512), (128, 256), (128, 256), (128, 256))

    @property
    def source_channels(self) -> tuple[int, ...]:
        return (self.stages[3], self.fc, *(e[1] for e in self.extras))


class VGGBackbone(nn.Module):
    """Reduced VGG16 + SSD extra layers: ``(N, 3, H, W)`` → the six sources.

    For 300x300: ``(N, 512, 38, 38)``, ``(N, 1024, 19, 19)``, ``(N, 512, 10, 10)``,
    ``(N, 256, 5, 5)``, ``(N, 256, 3, 3)``, ``(N, 256, 1, 1)``.
    """

    def __init__(self, cfg: VGGConfig = VGGConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        layers: dict[str, nn.Module] = {}
        in_ch = 3
        for stage, (width, n) in enumerate(zip(cfg.stages, (2, 2, 3, 3, 3)), start=1):
            for i in range(1, n + 1):
                layers[f"conv{stage}_{i}"] = nn.Conv2d(in_ch, width, 3, padding=1)
                layers[f"relu{stage}_{i}"] = nn.ReLU(inplace=True)
                in_ch = width
            layers[f"pool{stage}"] = nn.MaxPool2d(3, 1, 1) if stage == 5 else caffe_max_pool()
        d = cfg.fc6_dilation
        layers["fc6"] = nn.Conv2d(in_ch, cfg.fc, 3, padding=d, dilation=d)
        layers["relu6"] = nn.ReLU(inplace=True)
        layers["fc7"] = nn.Conv2d(cfg.fc, cfg.fc, 1)
        layers["relu7"] = nn.ReLU(inplace=True)
        self.features = nn.ModuleDict(layers)
        extras: dict[str, nn.Module] = {}
        in_ch = cfg.fc
        for k, (reduce, out) in enumerate(cfg.extras, start=6):
            # conv6 and conv7 halve the size (3x3 stride 2 pad 1); conv8 and conv9 shrink by 2 (no padding).
            stride, pad = (2, 1) if k < 8 else (1, 0)
            extras[f"conv{k}_1"] = nn.Conv2d(in_ch, reduce, 1)
            extras[f"conv{k}_2"] = nn.Conv2d(reduce, out, 3, stride=stride, padding=pad)
            in_ch = out
        self.extras = nn.ModuleDict(extras)
        self.out_channels = cfg.source_channels
        self.caffe_names = {f"features.{k}": (k,) for k, m in layers.items() if isinstance(m, nn.Conv2d)}
        self.caffe_names.update({f"extras.{k}": (k,) for k in extras})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        sources = []
        for name, layer in self.features.items():
            x = layer(x)
            if name == "relu4_3" or name == "relu7":
                sources.append(x)
        for name, layer in self.extras.items():
            x = torch.relu(layer(x))
            if name.endswith("_2"):
                sources.append(x)
        return sources
