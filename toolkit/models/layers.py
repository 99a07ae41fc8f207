"""Building blocks shared by the SSD-family models, with the Caffe layer(s) each one replaces."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class L2Norm(nn.Module):
    """Caffe ``Normalize`` (SSD fork) with ``across_spatial: false``.

    ``y[n, c, h, w] = x[n, c, h, w] / sqrt(sum_c x[n, :, h, w]^2 + eps) * scale[c]``
    (``eps`` inside the square root, as Caffe's ``normalize_layer.cpp``).
    ``channel_shared`` makes ``scale`` a single value. SSD and DSOD initialise the scale to 20.

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(self, channels: int, init_scale: float = 20.0, eps: float = 1e-10, channel_shared: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((1 if channel_shared else channels,), float(init_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.sqrt(x.pow(2).sum(dim=1, keepdim=True) + self.eps)
        # In x's dtype: under bfloat16 autocast a float32 scale would promote the whole
        # map to float32, and each following convolution would cast it back.
        return x / norm * self.weight.to(x.dtype).view(1, -1, 1, 1)


class StridedConv2d(nn.Conv2d):
    """``nn.Conv2d`` with stride > 1 that runs in float32 under CPU autocast where an output side is 1.

    PyTorch's CPU (oneDNN) bfloat16 convolution returns garbage weight gradients (up to 1e36, different on each
    call; forward and input gradient are right) when the stride is above 1 and the output is one pixel tall or
    wide: SSD extra layers reach exactly that on thumbnails (``dsod_tiny`` at 80 px maps 1x1 to 1x1 with a 3x3,
    stride 2, pad 1 convolution) and the run diverges.  Measured on torch 2.14.1 (Intel AVX-512); see
    ``tests/models/test_layers.py``.  Those maps are tiny, so float32 costs nothing.  Same parameters and
    state-dict keys as a plain ``nn.Conv2d`` (:func:`guard_strided_convs` converts them).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and self._one_pixel_side(x):
            with torch.autocast("cpu", enabled=False):
                return self._conv_forward(x.float(), self.weight, self.bias)
        return super().forward(x)

    def _one_pixel_side(self, x: torch.Tensor) -> bool:
        for size, k, s, p, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation):
            if (size + 2 * p - d * (k - 1) - 1) // s + 1 == 1:
                return True
        return False


def guard_strided_convs(model: nn.Module) -> int:
    """Make every plain ``nn.Conv2d`` of ``model`` with a stride above 1 (numeric padding, zeros mode) a
    :class:`StridedConv2d` in place; returns how many changed.  The trainer does it for
    ``--amp`` on the CPU."""
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Conv2d and max(module.stride) > 1 and not isinstance(module.padding, str) \
                and module.padding_mode == "zeros":
            module.__class__ = StridedConv2d  # the same object: parameters, hooks and optimizer state stay
            swapped += 1
    return swapped


class BNReLUConv(nn.Module):
    """Pre-activation unit of DenseNet / DSOD: Caffe ``BatchNorm`` + ``Scale`` + ``ReLU`` + ``Convolution``.

    The Caffe BatchNorm (mean, variance, moving-average factor) and Scale (gamma, beta)
    pair is one ``nn.BatchNorm2d`` (running statistics = blobs / factor, affine = Scale).
    Shapes: ``(N, in_channels, H, W) -> (N, out_channels, H', W')``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels, eps=1e-5, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.relu(self.bn(x)))


class ConvBNReLU(nn.Module):
    """Post-activation unit (DSOD's stem): ``Convolution`` + ``BatchNorm`` + ``Scale`` + ``ReLU``.

    Shapes: ``(N, in_channels, H, W) -> (N, out_channels, H', W')``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class DenseLayer(nn.Module):
    """A DenseNet layer: ``unit`` 1x1 to ``bottleneck`` → ``unit`` 3x3 to ``growth``, concatenated
    to the input. ``unit(c_in, c_out, kernel, padding=...)`` builds the pre-activation
    (DSOD) or post-activation (GRP-DSOD) convolution unit.

    Shapes: ``(N, C, H, W) -> (N, C + growth, H, W)``.
    """

    def __init__(self, in_channels: int, bottleneck: int, growth: int, unit: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.reduce = unit(in_channels, bottleneck, 1)
        self.grow = unit(bottleneck, growth, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.grow(self.reduce(x))], dim=1)


def caffe_max_pool(kernel_size: int = 2, stride: int = 2) -> nn.MaxPool2d:
    """Caffe ``Pooling`` MAX without padding: output ``ceil((in - k) / s) + 1`` (ceil mode)."""
    return nn.MaxPool2d(kernel_size, stride, ceil_mode=True)
