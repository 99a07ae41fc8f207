"""DSOD: Deeply Supervised Object Detectors trained from scratch (Shen et al., ICCV 2017).

The structure is that of the DSOD300 prototxt written by DSOD's own generator
(``../shared/fixtures/caffe/prototxt/dsod300_voc0712``):

- **stem**: three 3x3 Conv-BN-ReLU (64 s2, 64, 128) and a 2x2 max pool;
- **dense blocks** of pre-activation layers (BN-ReLU-Conv1x1 to the bottleneck
  width 192, BN-ReLU-Conv3x3 to the growth rate 48), each layer's output
  concatenated to its input;
- **transitions** BN-ReLU-Conv1x1, with a 2x2 max pool after the first block
  and *without* pooling after the others ("transition w/o pooling"):
  block 1 (6 layers) → 416 + pool; block 2 (8) → 800 = **First** (38x38);
  pool; block 3 (8) → 1184; block 4 (8) → 256;
- the **prediction structure**: *Second* (19x19) concatenates the last
  transition (learned half) with BN-ReLU-Conv1x1(pool(First)) (re-used half);
  each further scale (*Third* 10x10, *Fourth* 5x5, *Fifth* 3x3, *Sixth* 2x2)
  concatenates a re-used half BN-ReLU-Conv1x1(pool(previous)) with a learned
  half BN-ReLU-Conv1x1 → BN-ReLU-Conv3x3 stride 2 of the previous scale;
- every source goes through ``Normalize`` (L2, scale 20) before the 3x3 loc and
  conf convolutions (no bias).

Max pools use Caffe's ceil mode (75 → 38, 19 → 10, 5 → 3, 3 → 2).

Module names are semantic; :attr:`DSODBackbone.caffe_names` maps every module
with parameters to the Caffe layer(s) it replaces, in Caffe's numbering
(``Convolution<i>``, ``BatchNorm<j>`` + ``Scale<j>``, ``First``), so that a
DSOD caffemodel maps onto the model one to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from toolkit.models.layers import BNReLUConv, ConvBNReLU, DenseLayer, caffe_max_pool

SOURCE_NAMES = ("First", "Second", "Third", "Fourth", "Fifth", "Sixth")


@dataclass(frozen=True)
class DSODConfig:
    """DSOD backbone widths. The defaults are DSOD300's.

    Attributes:
        stem_channels: the three stem convolutions.
        growth_rate / bottleneck: dense-layer widths (3x3 output / 1x1 output).
        block_layers: layers of dense blocks 1–4.
        transition_channels: outputs of the transitions after blocks 1–4; the
            second one is the first source ("First").
        reuse_channels: width of the re-used half of Second (from pool(First)).
        extra_channels: width of each half of the scales after Second.
        bn_momentum: PyTorch BatchNorm momentum (Caffe's moving average with
            fraction 0.999 corresponds to about 0.001; short CPU runs need more).
        fine_channels: 0 (DSOD) or the width of an extra, finer source for
            small objects (our addition for the small CPU presets, not in the
            paper): **Fine** = ``cat(transition 1 output before its pool,
            upsample(BN-ReLU-Conv1x1(First) to fine_channels))``, at stride 4.
    """

    stem_channels: tuple[int, int, int] = (64, 64, 128)
    growth_rate: int = 48
    bottleneck: int = 192
    block_layers: tuple[int, int, int, int] = (6, 8, 8, 8)
    transition_channels: tuple[int, int, int, int] = (416, 800, 1184, 256)
    reuse_channels: int = 256
    extra_channels: tuple[int, ...] = (256, 128, 128, 128)
    bn_momentum: float = 0.1
    fine_channels: int = 0

    @property
    def source_channels(self) -> tuple[int, ...]:
        """Channels of (Fine,) First, Second, ... (computed)."""
        second = self.transition_channels[3] + self.reuse_channels
        sources = (self.transition_channels[1], second, *(2 * c for c in self.extra_channels))
        if self.fine_channels:
            return (self.transition_channels[0] + self.fine_channels, *sources)
        return sources


class _Namer:
    """Hands out Caffe layer names in the DSOD generator's numbering."""

    def __init__(self) -> None:
        self.conv = 0
        self.bn = 0
        self.names: dict[str, tuple[str, ...]] = {}

    def next_bn(self) -> tuple[str, str]:
        self.bn += 1
        return (f"BatchNorm{self.bn}", f"Scale{self.bn}")

    def next_conv(self, special: Optional[str] = None) -> tuple[str]:
        if special is not None:
            return (special,)
        self.conv += 1
        return (f"Convolution{self.conv}",)

    def pre_act(self, path: str, unit: BNReLUConv, special: Optional[str] = None) -> BNReLUConv:
        self.names[f"{path}.bn"] = self.next_bn()
        self.names[f"{path}.conv"] = self.next_conv(special)
        return unit

    def post_act(self, path: str, unit: ConvBNReLU) -> ConvBNReLU:
        self.names[f"{path}.conv"] = self.next_conv()
        self.names[f"{path}.bn"] = self.next_bn()
        return unit


class DownScale(nn.Module):
    """One scale of DSOD's prediction structure: ``cat(reused half, learned half)``.

    re-used: max pool → BN-ReLU-Conv1x1(c); learned: BN-ReLU-Conv1x1(c) → BN-ReLU-Conv3x3 stride 2 (c).
    Shapes: ``(N, C_in, H, W) -> (N, 2c, ceil(H / 2), ceil(W / 2))``.
    """

    def __init__(self, in_channels: int, channels: int, momentum: float) -> None:
        super().__init__()
        self.pool = caffe_max_pool()
        self.reuse = BNReLUConv(in_channels, channels, 1, bn_momentum=momentum)
        self.learn_reduce = BNReLUConv(in_channels, channels, 1, bn_momentum=momentum)
        self.learn_down = BNReLUConv(channels, channels, 3, stride=2, padding=1, bn_momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.reuse(self.pool(x)), self.learn_down(self.learn_reduce(x))], dim=1)


class DSODBackbone(nn.Module):
    """DSOD feature extractor: image ``(N, 3, H, W)`` → the six sources (First … Sixth),
    preceded by Fine when ``cfg.fine_channels`` is set.

    For a 300x300 input the sources are ``(N, 800, 38, 38)``, ``(N, 512, 19, 19)``,
    ``(N, 512, 10, 10)``, ``(N, 256, 5, 5)``, ``(N, 256, 3, 3)``, ``(N, 256, 2, 2)``.
    """

    def __init__(self, cfg: DSODConfig = DSODConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        m = cfg.bn_momentum
        namer = _Namer()
        s0, s1, s2 = cfg.stem_channels
        self.stem = nn.Sequential(
            namer.post_act("stem.0", ConvBNReLU(3, s0, 3, stride=2, padding=1, bn_momentum=m)),
            namer.post_act("stem.1", ConvBNReLU(s0, s1, 3, padding=1, bn_momentum=m)),
            namer.post_act("stem.2", ConvBNReLU(s1, s2, 3, padding=1, bn_momentum=m)),
            caffe_max_pool(),
        )
        channels = s2
        blocks, transitions = [], []

        def pre_act_unit(c_in: int, c_out: int, k: int, padding: int = 0) -> BNReLUConv:
            return BNReLUConv(c_in, c_out, k, padding=padding, bn_momentum=m)

        for b, (n_layers, t_out) in enumerate(zip(cfg.block_layers, cfg.transition_channels)):
            layers = []
            for i in range(n_layers):
                layer = DenseLayer(channels, cfg.bottleneck, cfg.growth_rate, pre_act_unit)
                namer.pre_act(f"blocks.{b}.{i}.reduce", layer.reduce)
                namer.pre_act(f"blocks.{b}.{i}.grow", layer.grow)
                layers.append(layer)
                channels += cfg.growth_rate
            blocks.append(nn.Sequential(*layers))
            if b == 3:
                # Second's learned half is built before its re-used half (Caffe's order).
                transitions.append(namer.pre_act(f"transitions.{b}", BNReLUConv(channels, t_out, 1, bn_momentum=m)))
                self.second_reuse = namer.pre_act(
                    "second_reuse", BNReLUConv(cfg.transition_channels[1], cfg.reuse_channels, 1, bn_momentum=m))
            else:
                transitions.append(namer.pre_act(f"transitions.{b}", BNReLUConv(channels, t_out, 1, bn_momentum=m),
                                                 special="First" if b == 1 else None))
            channels = t_out
        self.blocks = nn.ModuleList(blocks)
        self.transitions = nn.ModuleList(transitions)
        self.pool = caffe_max_pool()
        extras = []
        in_ch = cfg.source_channels[1]
        for k, c in enumerate(cfg.extra_channels):
            scale = DownScale(in_ch, c, m)
            namer.pre_act(f"extras.{k}.reuse", scale.reuse)
            namer.pre_act(f"extras.{k}.learn_reduce", scale.learn_reduce)
            namer.pre_act(f"extras.{k}.learn_down", scale.learn_down)
            extras.append(scale)
            in_ch = 2 * c
        self.extras = nn.ModuleList(extras)
        # Built last so that DSOD's own layers keep the generator's numbering.
        self.fine_reduce = namer.pre_act(
            "fine_reduce", BNReLUConv(cfg.transition_channels[1], cfg.fine_channels, 1, bn_momentum=m)
        ) if cfg.fine_channels else None
        self.caffe_names: dict[str, tuple[str, ...]] = namer.names
        self.out_channels: tuple[int, ...] = cfg.source_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        early = self.transitions[0](self.blocks[0](x))
        first = self.transitions[1](self.blocks[1](self.pool(early)))
        x = self.transitions[2](self.blocks[2](self.pool(first)))
        x = self.transitions[3](self.blocks[3](x))
        sources = [first, torch.cat([x, self.second_reuse(self.pool(first))], dim=1)]
        for scale in self.extras:
            sources.append(scale(sources[-1]))
        if self.fine_reduce is not None:
            up = F.interpolate(self.fine_reduce(first), size=early.shape[-2:], mode="nearest")
            sources.insert(0, torch.cat([early, up], dim=1))
        return sources
