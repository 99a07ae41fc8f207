"""Thumbnail inputs: a detector that sees a 2x or 4x smaller image (ThumbDet, Zhang et al., Pattern Recognition 2023).

ThumbDet (zhangyin1996/ThumbDet, ``models/backbone.py``) puts a learned
down-sampler in front of the backbone's normalization: on the [0, 1] RGB image,

- 4x (the official default): ``Conv2d(3, 12, 3, stride 2, pad 1, no bias) -> ReLU ->
  Conv2d(12, 3, 3, stride 2, pad 1, no bias) -> ReLU``;
- 2x (the README's hand edit, its "ds_2" block): ``Conv2d(3, 12, 5, stride 1, pad 1, no bias) -> ReLU ->
  Conv2d(12, 3, 5, stride 2, pad 1, no bias) -> ReLU``: one stride-2 stage; a side ``n`` becomes
  ``(n - 5) // 2 + 1``, a little under half.

Its output, the thumbnail, is normalized as an image would be and fed to the
detector.  :class:`Thumbnailer` does this for any detector whose input is a
per-channel affine normalization of the [0, 1] image (DETR's ImageNet mean and
std on RGB; Caffe's ``(x - mean) * scale`` on BGR 0-255): it maps the normalized
input back to [0, 1] RGB, makes the thumbnail, and normalizes it again, so the
data pipeline, the evaluator and the full-size teacher keep one input
convention.  ``mode="bicubic"`` is the baseline: an antialiased bicubic resize to
the learned thumbnail's size (clamped to [0, 1], as a stored image would be);
``mode="bicubic_aliased"`` the same resize without anti-aliasing (the 4x4-tap
bicubic of ``cv2.resize(..., interpolation=cv2.INTER_CUBIC)`` and of
``F.interpolate``'s default at any scale, where the antialiased resize stretches
the kernel to ``4 * scale`` taps per axis).
ThumbDet's paper compares with "bicubic" thumbnails made by a script that is not
in its repository, so which of the two it used is not known.

The learned down-sampler starts at PyTorch's default initialisation, as officially;
:meth:`Thumbnailer.init_antialias` (``toolkit.train --thumb-init antialias``)
starts it instead as a fixed anti-aliasing filter, so that learning begins from a
proper downsampled image rather than from random colour mixtures.

State-dict keys: the learned layers are ``0.weight`` and ``2.weight`` of the
module (``nn.Sequential`` numbering), so a DETR's ``backbone.0.down_sample.*``
equal the official keys; the normalization constants are not saved.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

THUMB_SCALES = (2, 4)
THUMB_MODES = ("learned", "bicubic", "bicubic_aliased")
THUMB_INITS = ("default", "antialias")
# (kernel, stride, padding) of each convolution of the learned down-sampler, per scale.
_LAYERS = {4: ((3, 2, 1), (3, 2, 1)), 2: ((5, 1, 1), (5, 2, 1))}


def thumbnail_size(height: int, width: int, scale: int) -> tuple[int, int]:
    """The thumbnail's ``(h, w)`` for an image of ``(height, width)``: the learned down-sampler's convolution
    arithmetic (the bicubic baseline resizes to the same size).

    Raises:
        ValueError: a scale other than 2 or 4, or an image too small for the down-sampler.
    """
    if scale not in THUMB_SCALES:
        raise ValueError(f"thumbnail scale must be one of {THUMB_SCALES}, got {scale}")
    h, w = height, width
    for k, s, p in _LAYERS[scale]:
        h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    if h < 1 or w < 1:
        raise ValueError(f"an image of {height}x{width} is too small for the {scale}x down-sampler")
    return h, w


class Thumbnailer(nn.Sequential):
    """Normalized images -> normalized thumbnails, learned or bicubic.

    Args:
        scale: 2 or 4.
        mode: ``"learned"`` (ThumbDet's down-sampler), ``"bicubic"`` (antialiased) or ``"bicubic_aliased"``
            (without anti-aliasing); the bicubic modes have no parameters.
        mean, std: the detector's input normalization, per input channel: ``input = (pixel - mean) / std`` with
            ``pixel`` in [0, 1] (DETR: the ImageNet mean and std; Caffe's ``(x - m) * s`` on 0-255 pixels:
            ``mean = m / 255``, ``std = 1 / (255 * s)``).
        bgr: the input's channels are BGR (the down-sampler always sees RGB, as in ThumbDet).
    """

    def __init__(self, scale: int, mode: str = "learned", mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), bgr: bool = False) -> None:
        if scale not in THUMB_SCALES:
            raise ValueError(f"thumbnail scale must be one of {THUMB_SCALES}, got {scale}")
        if mode not in THUMB_MODES:
            raise ValueError(f"thumbnail mode must be one of {THUMB_MODES}, got {mode!r}")
        layers: list[nn.Module] = []
        if mode == "learned":
            (k1, s1, p1), (k2, s2, p2) = _LAYERS[scale]
            layers = [nn.Conv2d(3, 12, k1, stride=s1, padding=p1, bias=False), nn.ReLU(),
                      nn.Conv2d(12, 3, k2, stride=s2, padding=p2, bias=False), nn.ReLU()]
        super().__init__(*layers)
        self.scale, self.mode, self.bgr = scale, mode, bgr
        # Plain floats, made into tensors of the input's dtype at each call: a float32 buffer would round 0.485
        # before a float64 run sees it (1e-8 relative, the fixtures' whole tolerance).
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    @torch.no_grad()
    def init_antialias(self) -> "Thumbnailer":
        """Start the learned down-sampler as a binomial (Gaussian-pyramid) low-pass filter with its stride, in place.

        On a [0, 1] image every intermediate value is non-negative, so both ReLUs pass it and the down-sampler
        computes, per colour channel, a fixed linear filter:

        - 2x: the first convolution copies each channel (a centred 5x5 delta: the ``n - 2`` inner pixels), the
          second applies the separable binomial ``[1, 4, 6, 4, 1] / 16`` at stride 2 (Burt and Adelson's pyramid
          kernel);
        - 4x: each convolution applies ``[1, 2, 1] / 4`` separably at stride 2.

        The first convolution's other 9 output channels keep their random initialisation and the second
        convolution reads them with zero weights: the output is exactly the filter, those zero weights get
        gradients at once (they read non-zero inputs), and once they have moved the 9 channels' own weights do
        too; none is left dead.  Zero padding darkens the border row and column as it would any convolution.

        Raises:
            ValueError: on a bicubic thumbnailer (nothing to initialise).
        """
        if self.mode != "learned":
            raise ValueError("init_antialias: a bicubic thumbnailer has no down-sampler to initialise")
        first, second = self[0], self[2]
        if self.scale == 2:
            kernel1 = torch.zeros(5, 5, dtype=torch.float64)
            kernel1[2, 2] = 1.0
            taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16
        else:
            taps = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64) / 4
            kernel1 = torch.outer(taps, taps)
        kernel2 = torch.outer(taps, taps)
        first.weight[:3] = 0
        second.weight.zero_()
        for c in range(3):
            first.weight[c, c] = kernel1.to(first.weight)
            second.weight[c, c] = kernel2.to(second.weight)
        return self

    def _constants(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def make(values):
            return torch.tensor(values, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return make(self.mean), make(self.std)

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized input ``(B, 3, H, W)`` -> [0, 1] RGB (the images the down-sampler sees)."""
        mean, std = self._constants(images)
        pixels = images * std + mean
        return pixels.flip(1) if self.bgr else pixels

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB ``(B, 3, h, w)`` -> the detector's normalized input."""
        mean, std = self._constants(pixels)
        if self.bgr:
            pixels = pixels.flip(1)
        return (pixels - mean) / std

    def downsample(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB ``(B, 3, H, W)`` -> the thumbnail ``(B, 3, h, w)`` (:func:`thumbnail_size`)."""
        if self.mode == "learned":
            for layer in self:
                pixels = layer(pixels)
            return pixels
        size = thumbnail_size(*pixels.shape[-2:], self.scale)
        return F.interpolate(pixels, size=size, mode="bicubic", align_corners=False,
                             antialias=self.mode == "bicubic").clamp(0, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images`` normalized ``(B, 3, H, W)`` -> ``{"images": the normalized thumbnail (B, 3, h, w),
        "src_input": the [0, 1] RGB image (B, 3, H, W), "downsample_input": the thumbnail in [0, 1] RGB}``
        (the last two under ThumbDet's names: its down-sample loss compares them)."""
        pixels = self.to_pixels(images)
        thumb = self.downsample(pixels)
        return {"images": self.from_pixels(thumb), "src_input": pixels, "downsample_input": thumb}

    def __bool__(self) -> bool:
        # nn.Sequential's truth is its length: the bicubic thumbnailer, with no layers, would read as "none".
        return True

    def extra_repr(self) -> str:
        return f"scale={self.scale}, mode={self.mode!r}, bgr={self.bgr}"


def find_thumbnailer(model: nn.Module) -> "Thumbnailer | None":
    """A detector's thumbnailer (``down_sample`` of an SSD detector or of a DETR's backbone body), or None."""
    for name, module in model.named_modules():
        if isinstance(module, Thumbnailer) and name.split(".")[-1] == "down_sample":
            return module
    return None
