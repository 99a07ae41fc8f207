"""GRP-DSOD: DSOD with gated recurrent feature pyramids (Shen et al., "Learning Object
Detectors from Scratch with Gated Recurrent Feature Pyramids", 2017).

The structure is that of the GRP-DSOD320 prototxt written by GRP-DSOD's own generator
(``../shared/fixtures/caffe/prototxt/grp_dsod320_voc0712``). Unlike DSOD300, every unit
is **post-activation** (Convolution → BatchNorm ``eps 1e-4`` → Scale → ReLU):

- **stem**: three 3x3 units (64 s2, 64, 128) and a 2x2 max pool;
- **dense blocks** of layers 1x1 unit (bottleneck 192) → 3x3 unit (growth 48), each
  layer's output concatenated to its input; blocks of 6, 8, 8, 8 layers;
- **transitions**: a 1x1 unit keeping the width after blocks 1–3 (416, 800, 1184),
  171 after block 4; 2x2 max pools after the first two;
- **First** (40x40 at 320): ``cat(transition 2 (800), unit1x1(maxpool 4x4/s4(stem)) (128),
  unit1x1(maxpool(transition 1)) (128))`` = 1056 channels;
- **Second** (20x20): ``cat(transition 4 (171), unit1x1(maxpool(First)) (171))``;
  block 3 starts from ``maxpool(transition 2)``, not from First;
- **Third** (10), **Fourth** (5), **Fifth** (3) and **Recurrent6** (2): ``cat(unit1x1(maxpool(prev)),
  unit3x3 stride 2(unit1x1(prev)))`` with halves of 86, 86, 86, 128 channels;
- the **top-down path**: ``Recurrent_k = cat(Deconv(scale_{k+1}), scale_k)`` for k = 1–5
  (scale_6 = Recurrent6), each Deconvolution (stride 2, no bias) followed by BN-Scale-ReLU;
  its width is the branch width of the level it joins (128, 171, 86, 86, 86);
- a **gate** on each ``Recurrent_k`` (:class:`RecurrentGate`); the gated maps are the sources.

Caffe details reproduced:

- Max pools use Caffe's ceil mode (``caffe_max_pool``); the 4x4/s4 pool too: with no
  padding and ``kernel >= stride`` PyTorch's ceil-mode size equals Caffe's
  ``ceil((in - k) / s) + 1`` (the last window always starts inside the input), 160 → 40 at 320.
- Deconvolution output is ``(in - 1) * s + k`` (no padding), as PyTorch's ConvTranspose2d
  without ``output_padding``; the generator picks ``k`` so that it equals the Concat
  partner: 2 doubles the size, 1 gives ``2 * in - 1`` (20→40, 10→20, 5→10 with k 2;
  3→5 and 2→3 with k 1 at 320). Here ``k = out - 2 * (in - 1)`` is computed from the input size.
- Deconvolution weights are filled by Caffe's ``bilinear`` filler and frozen (``lr_mult: 0,
  decay_mult: 0``). The layer has **no** ``group``, so the SSD fork's filler
  (``f = ceil(k / 2)``, ``c = (2f - 1 - f % 2) / (2f)``) writes the same kernel to every
  (input, output) channel pair: ``[[1, 0], [0, 0]]`` for k 2, ``[[1]]`` for k 1. Every output
  channel is thus the channel sum of the input, placed at the top-left of each 2x2 cell
  (identical channels until the BatchNorm-Scale after it).
- ``PyTorch ConvTranspose2d.weight`` is ``(C_in, C_out, kh, kw)``, Caffe's Deconvolution blob layout.

Module names are semantic; :attr:`GRPDSODBackbone.caffe_names` maps every module with
parameters to the Caffe layer(s) it replaces, in Caffe's numbering (``Convolution<i>``,
``BatchNorm<j>`` + ``Scale<j>``, ``Deconvolution<k>``, ``Recurrent<r>_fc``, ``InnerProduct<m>``).
The gates' Scale layers (``Scale88`` … ``Scale99``) multiply by a second bottom and have no blobs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from toolkit.models.layers import DenseLayer, caffe_max_pool

#: Caffe names of the gated sources (the head's layers are ``<name>_norm``, ``<name>_norm_mbox_loc`` ...).
GATED_SOURCE_NAMES = tuple(f"Recurrent{k}_gate" for k in range(1, 7))


@dataclass(frozen=True)
class GRPDSODConfig:
    """GRP-DSOD backbone widths. The defaults are GRP-DSOD320's.

    Attributes:
        stem_channels: the three stem convolutions.
        growth_rate / bottleneck: dense-layer widths (3x3 output / 1x1 output).
        block_layers: layers of dense blocks 1–4. Transitions 1–3 keep their block's width.
        first_branch_channels: width of each of First's two pooled branches (from the stem and
            from transition 1); also the width of the deconvolution into Recurrent1.
        second_channels: width of each half of Second (transition 4 and the pooled First branch).
        extra_channels: width of each half of Third, Fourth, Fifth, Recurrent6.
        gate_reduction: the gates' squeeze layer has ``max(1, C // gate_reduction)`` outputs.
        bn_eps: the BatchNorm ``eps`` of the backbone (the generator writes 1e-4).
        bn_momentum: PyTorch BatchNorm momentum (Caffe's moving average fraction 0.999 is
            about 0.001; short CPU runs need more).
        train_deconv: ``False`` (Caffe: ``lr_mult: 0``) keeps the bilinear-filled
            deconvolution weights fixed.
    """

    stem_channels: tuple[int, int, int] = (64, 64, 128)
    growth_rate: int = 48
    bottleneck: int = 192
    block_layers: tuple[int, int, int, int] = (6, 8, 8, 8)
    first_branch_channels: int = 128
    second_channels: int = 171
    extra_channels: tuple[int, int, int, int] = (86, 86, 86, 128)
    gate_reduction: int = 16
    bn_eps: float = 1e-4
    bn_momentum: float = 0.1
    train_deconv: bool = False

    @property
    def block_channels(self) -> tuple[int, int, int, int]:
        """Output widths of dense blocks 1–4 (computed): block 3 starts from transition 2."""
        out, c = [], self.stem_channels[2]
        for n in self.block_layers:
            c += n * self.growth_rate
            out.append(c)
        return tuple(out)  # type: ignore[return-value]

    @property
    def scale_channels(self) -> tuple[int, ...]:
        """Channels of First, Second, Third, Fourth, Fifth, Recurrent6 before the top-down path."""
        first = self.block_channels[1] + 2 * self.first_branch_channels
        return (first, 2 * self.second_channels, *(2 * c for c in self.extra_channels))

    @property
    def deconv_channels(self) -> tuple[int, ...]:
        """Width of Deconvolution1–5: the branch width of the level each one joins."""
        return (self.first_branch_channels, self.second_channels, *self.extra_channels[:3])

    @property
    def source_channels(self) -> tuple[int, ...]:
        """Channels of Recurrent1 … Recurrent6 (= of the gated sources)."""
        s = self.scale_channels
        return (*(d + c for d, c in zip(self.deconv_channels, s[:5])), s[5])


def scale_sizes(image_size: int) -> tuple[int, ...]:
    """Side of First … Recurrent6 for a square input, with Caffe's output-size rules.

    Convolution 3x3 s2 p1: ``(n - 1) // 2 + 1``; max pool 2x2 s2 (ceil mode): ``ceil((n - 2) / 2) + 1``.
    320 → (40, 20, 10, 5, 3, 2); 160 → (20, 10, 5, 3, 2, 1).
    """

    def conv_s2(n: int) -> int:
        return (n + 2 - 3) // 2 + 1

    def pool(n: int) -> int:
        return math.ceil((n - 2) / 2) + 1

    sizes = [pool(pool(conv_s2(image_size)))]  # conv1 s2, pool1, pool2: First
    for _ in range(5):
        # Second pools First; the later scales concatenate a pooled and a 3x3 s2 branch,
        # which have the same size (both ceil(n / 2)).
        sizes.append(pool(sizes[-1]))
    return tuple(sizes)


def caffe_bilinear_(weight: torch.Tensor) -> torch.Tensor:
    """Fill ``(C_in, C_out, k, k)`` in place like the SSD fork's ``BilinearFiller`` (every channel pair alike)."""
    k = weight.shape[-1]
    f = math.ceil(k / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    w1 = 1.0 - torch.abs(torch.arange(k, dtype=torch.float64) / f - c)
    with torch.no_grad():
        weight.copy_(torch.outer(w1, w1).to(weight.dtype).expand_as(weight))
    return weight


class PostAct(nn.Module):
    """``conv`` → BatchNorm(+Scale) → ReLU; Caffe: Convolution / Deconvolution + BatchNorm + Scale + ReLU.

    Shapes: ``(N, C_in, H, W) -> (N, C_out, H', W')`` as ``conv``.
    """

    def __init__(self, conv: nn.Module, out_channels: int, eps: float, momentum: float) -> None:
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class DownScale(nn.Module):
    """One scale after Second: ``cat(unit1x1(maxpool(x)), unit3x3 s2(unit1x1(x)))``.

    Shapes: ``(N, C_in, H, W) -> (N, 2c, ceil(H / 2), ceil(W / 2))``.
    """

    def __init__(self, in_channels: int, channels: int, unit) -> None:
        super().__init__()
        self.pool = caffe_max_pool()
        self.reuse = unit(in_channels, channels, 1)
        self.learn_reduce = unit(in_channels, channels, 1)
        self.learn_down = unit(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.reuse(self.pool(x)), self.learn_down(self.learn_reduce(x))], dim=1)


class RecurrentGate(nn.Module):
    """GRP-DSOD's gate: channel attention and a global gate, added to the input.

    With ``s = relu(fc(avgpool(x)))`` (Caffe: global AVE Pooling, InnerProduct ``Recurrent<k>_fc``, ReLU),
    ``a = sigmoid(channel_fc(s))`` ``(N, C)`` and ``g = sigmoid(global_fc(s))`` ``(N, 1)``::

        y = x + g[n] * relu(x * a[n, c])

    (Caffe: Scale ``axis: 0`` with the (N, C) bottom, in-place ReLU ``Recurrent<k>_att``,
    Reshape to (N,), Scale ``axis: 0``, Eltwise SUM — the prototxt's default operation.)

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, squeeze)
        self.channel_fc = nn.Linear(squeeze, channels)
        self.global_fc = nn.Linear(squeeze, 1)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(channel gate (N, C), global gate (N, 1))``, both in (0, 1)."""
        s = torch.relu(self.fc(x.mean(dim=(2, 3))))
        return torch.sigmoid(self.channel_fc(s)), torch.sigmoid(self.global_fc(s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel, glob = self.gates(x)
        attended = torch.relu(x * channel[:, :, None, None])
        return x + attended * glob[:, :, None, None]


class _Namer:
    """Hands out Caffe layer names in the GRP-DSOD generator's numbering."""

    def __init__(self) -> None:
        self.count = {"Convolution": 0, "BatchNorm": 0, "Deconvolution": 0, "InnerProduct": 0}
        self.names: dict[str, tuple[str, ...]] = {}

    def next(self, kind: str) -> str:
        self.count[kind] += 1
        return f"{kind}{self.count[kind]}"

    def unit(self, path: str, unit: PostAct) -> PostAct:
        kind = "Deconvolution" if isinstance(unit.conv, nn.ConvTranspose2d) else "Convolution"
        self.names[f"{path}.conv"] = (self.next(kind),)
        j = self.next("BatchNorm")
        self.names[f"{path}.bn"] = (j, j.replace("BatchNorm", "Scale"))
        return unit

    def gate(self, path: str, k: int, gate: RecurrentGate) -> RecurrentGate:
        self.names[f"{path}.fc"] = (f"Recurrent{k}_fc",)
        self.names[f"{path}.channel_fc"] = (self.next("InnerProduct"),)
        self.names[f"{path}.global_fc"] = (self.next("InnerProduct"),)
        return gate


class GRPDSODBackbone(nn.Module):
    """GRP-DSOD feature extractor: image ``(N, 3, S, S)`` → the six gated sources.

    For a 320x320 input the sources (Recurrent1_gate … Recurrent6_gate) are
    ``(N, 1184, 40, 40)``, ``(N, 513, 20, 20)``, ``(N, 258, 10, 10)``, ``(N, 258, 5, 5)``,
    ``(N, 258, 3, 3)``, ``(N, 256, 2, 2)``.

    Args:
        cfg: widths.
        image_size: the input side the top-down path is built for: it fixes the
            deconvolution kernels (see :func:`scale_sizes`); other inputs work only where
            they give the same kernels.
    """

    def __init__(self, cfg: GRPDSODConfig = GRPDSODConfig(), image_size: int = 320) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_size = image_size
        namer = _Namer()

        def unit(c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0) -> PostAct:
            conv = nn.Conv2d(c_in, c_out, k, stride, padding, bias=False)
            return PostAct(conv, c_out, cfg.bn_eps, cfg.bn_momentum)

        s0, s1, s2 = cfg.stem_channels
        self.stem = nn.Sequential(
            namer.unit("stem.0", unit(3, s0, 3, stride=2, padding=1)),
            namer.unit("stem.1", unit(s0, s1, 3, padding=1)),
            namer.unit("stem.2", unit(s1, s2, 3, padding=1)),
        )
        self.pool = caffe_max_pool()
        # Caffe Pooling 4x4/s4 without padding; ceil mode equals Caffe's rule here (kernel >= stride).
        self.stem_pool = caffe_max_pool(4, 4)
        blocks, transitions = [], []
        transition_out = (*cfg.block_channels[:3], cfg.second_channels)
        channels = s2
        fb = cfg.first_branch_channels
        for b, (n_layers, t_out) in enumerate(zip(cfg.block_layers, transition_out)):
            if b == 2:
                # Caffe builds First's two pooled branches between blocks 2 and 3.
                self.first_from_stem = namer.unit("first_from_stem", unit(s2, fb, 1))
                self.first_from_transition = namer.unit("first_from_transition", unit(cfg.block_channels[0], fb, 1))
            layers = []
            for i in range(n_layers):
                layer = DenseLayer(channels, cfg.bottleneck, cfg.growth_rate, unit)
                namer.unit(f"blocks.{b}.{i}.reduce", layer.reduce)
                namer.unit(f"blocks.{b}.{i}.grow", layer.grow)
                layers.append(layer)
                channels += cfg.growth_rate
            blocks.append(nn.Sequential(*layers))
            transitions.append(namer.unit(f"transitions.{b}", unit(channels, t_out, 1)))
            channels = t_out
        self.blocks = nn.ModuleList(blocks)
        self.transitions = nn.ModuleList(transitions)
        scale_ch = cfg.scale_channels
        self.second_reuse = namer.unit("second_reuse", unit(scale_ch[0], cfg.second_channels, 1))
        extras = []
        for k, c in enumerate(cfg.extra_channels):
            scale = DownScale(scale_ch[k + 1], c, unit)
            for part in ("reuse", "learn_reduce", "learn_down"):
                namer.unit(f"extras.{k}.{part}", getattr(scale, part))
            extras.append(scale)
        self.extras = nn.ModuleList(extras)

        sizes = scale_sizes(image_size)
        self.deconv_kernels = tuple(out - 2 * (n - 1) for out, n in zip(sizes[:-1], sizes[1:]))
        if min(self.deconv_kernels) < 1:
            raise ValueError(f"no stride-2 deconvolution maps sizes {sizes} onto each other")
        deconvs = []
        for k, (c_in, c_out, ksize) in enumerate(zip(scale_ch[1:], cfg.deconv_channels, self.deconv_kernels)):
            deconv = nn.ConvTranspose2d(c_in, c_out, ksize, stride=2, bias=False)
            caffe_bilinear_(deconv.weight)
            deconv.weight.requires_grad_(cfg.train_deconv)
            deconvs.append(namer.unit(f"deconvs.{k}", PostAct(deconv, c_out, cfg.bn_eps, cfg.bn_momentum)))
        self.deconvs = nn.ModuleList(deconvs)
        self.gates = nn.ModuleList(
            namer.gate(f"gates.{k}", k + 1, RecurrentGate(c, max(1, c // cfg.gate_reduction)))
            for k, c in enumerate(cfg.source_channels)
        )
        self.caffe_names: dict[str, tuple[str, ...]] = namer.names
        self.out_channels: tuple[int, ...] = cfg.source_channels

    def scales(self, x: torch.Tensor) -> list[torch.Tensor]:
        """First, Second, Third, Fourth, Fifth, Recurrent6 (before the top-down path and the gates)."""
        stem = self.stem(x)
        t1 = self.transitions[0](self.blocks[0](self.pool(stem)))
        t1_pooled = self.pool(t1)  # Caffe's Pooling2 and Pooling4 (identical layers on the same bottom)
        t2 = self.transitions[1](self.blocks[1](t1_pooled))
        first = torch.cat([t2, self.first_from_stem(self.stem_pool(stem)), self.first_from_transition(t1_pooled)], 1)
        x = self.transitions[2](self.blocks[2](self.pool(t2)))
        x = self.transitions[3](self.blocks[3](x))
        scales = [first, torch.cat([x, self.second_reuse(self.pool(first))], dim=1)]
        for scale in self.extras:
            scales.append(scale(scales[-1]))
        return scales

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(N, 3, S, S)`` → the six gated sources ``(N, C_k, H_k, W_k)`` (see the class docstring)."""
        scales = self.scales(x)
        recurrent = []
        for k, deconv in enumerate(self.deconvs):
            up = deconv(scales[k + 1])
            if up.shape[-2:] != scales[k].shape[-2:]:
                raise ValueError(f"Deconvolution{k + 1} gives {tuple(up.shape[-2:])}, its Concat partner is "
                                 f"{tuple(scales[k].shape[-2:])}: the model is built for {self.image_size}x"
                                 f"{self.image_size} inputs, got {tuple(x.shape[-2:])}")
            recurrent.append(torch.cat([up, scales[k]], dim=1))
        recurrent.append(scales[5])
        return [gate(r) for gate, r in zip(self.gates, recurrent)]
