"""Model presets and builders: ``build_model(name, num_classes)``.

Constants (prior sizes, widths) live here, in the builders; values that can be
derived (feature-map sizes, priors per cell) are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

from torch import nn

from toolkit.models.box_coder import CodeType
from toolkit.models.dsod import SOURCE_NAMES, DSODBackbone, DSODConfig
from toolkit.models.gfl import GFLDetector, GFLHead, level_anchor_sizes
from toolkit.models.grp_dsod import GATED_SOURCE_NAMES, GRPDSODBackbone, GRPDSODConfig
from toolkit.models.postprocess import DetectionOutputParams
from toolkit.models.priors import PriorBoxSpec, PriorGenerator
from toolkit.models.ssd import SSDDetector, SSDHead
from toolkit.models.thumbnail import Thumbnailer
from toolkit.models.vgg_ssd import SOURCES as VGG_SOURCES
from toolkit.models.vgg_ssd import VGGBackbone, VGGConfig

VARIANCES = (0.1, 0.1, 0.2, 0.2)


def _specs(min_sizes, max_sizes, ratios, steps) -> tuple[PriorBoxSpec, ...]:
    return tuple(
        PriorBoxSpec((float(lo),), (float(hi),), tuple(float(r) for r in ar), flip=True, clip=False,
                     variances=VARIANCES, step=float(step), offset=0.5)
        for lo, hi, ar, step in zip(min_sizes, max_sizes, ratios, steps)
    )


# DSOD300 (DSOD300_pascal.py): min_dim 300, min_ratio 20, max_ratio 90 → sizes 30, 60, 111, 162, 213, 264, 315.
DSOD300_PRIORS = _specs((30, 60, 111, 162, 213, 264), (60, 111, 162, 213, 264, 315),
                        ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)), (8, 16, 32, 64, 100, 300))


def _dsod_head_names(sources) -> dict[str, tuple[str, ...]]:
    names = {}
    for k, src in enumerate(sources):
        names[f"head.norms.{k}"] = (f"{src}_norm",)
        for kind in ("loc", "conf"):
            layer = f"{src}_norm_mbox_{kind}"
            names[f"head.{kind}.{k}.conv"] = (layer,)
            names[f"head.{kind}.{k}.bn"] = (f"{layer}_bn", f"{layer}_scale")
    return names


def _dense_detector(backbone, source_names, num_classes: int, image_size: int,
                    prior_specs: tuple[PriorBoxSpec, ...], bn_momentum: float) -> SSDDetector:
    """DSOD-family head on ``backbone``: L2Norm on every source, loc / conf convolutions with BatchNorm."""
    n_sources = len(backbone.out_channels)
    if len(prior_specs) != n_sources:
        raise ValueError(f"{len(prior_specs)} prior specs for {n_sources} sources")
    head = SSDHead(backbone.out_channels, [s.num_priors for s in prior_specs], num_classes,
                   normalize=[True] * n_sources, batch_norm=True, bn_momentum=bn_momentum)
    names = {f"backbone.{k}": v for k, v in backbone.caffe_names.items()}
    names.update(_dsod_head_names(source_names[:n_sources]))
    return SSDDetector(backbone, head, prior_specs, (image_size, image_size), names)


def build_dsod(num_classes: int, cfg: DSODConfig = DSODConfig(), image_size: int = 300,
               prior_specs: tuple[PriorBoxSpec, ...] = DSOD300_PRIORS) -> SSDDetector:
    """A DSOD detector (DSOD300 with the defaults).

    ``caffe_names`` maps module paths to DSOD's Caffe layer names (one to one).
    """
    names = ("Fine", *SOURCE_NAMES) if cfg.fine_channels else SOURCE_NAMES
    return _dense_detector(DSODBackbone(cfg), names, num_classes, image_size, prior_specs, cfg.bn_momentum)


# SSD300 (ssd_pascal.py): the same sizes and ratios as DSOD300, conv9_2 is 1x1.
SSD300_PRIORS = DSOD300_PRIORS


def build_ssd_vgg(num_classes: int, cfg: VGGConfig = VGGConfig(), image_size: int = 300,
                  prior_specs: tuple[PriorBoxSpec, ...] = SSD300_PRIORS) -> SSDDetector:
    """SSD with the reduced VGG16 backbone (SSD300 with the defaults); only conv4_3 is L2-normalised."""
    backbone = VGGBackbone(cfg)
    head = SSDHead(backbone.out_channels, [s.num_priors for s in prior_specs], num_classes,
                   normalize=[True] + [False] * (len(prior_specs) - 1), batch_norm=False)
    names = {f"backbone.{k}": v for k, v in backbone.caffe_names.items()}
    prefixes = ["conv4_3_norm", *VGG_SOURCES[1:]]
    names["head.norms.0"] = ("conv4_3_norm",)
    for k, prefix in enumerate(prefixes):
        names[f"head.loc.{k}"] = (f"{prefix}_mbox_loc",)
        names[f"head.conf.{k}"] = (f"{prefix}_mbox_conf",)
    return SSDDetector(backbone, head, prior_specs, (image_size, image_size), names)


# Small presets of the same family for CPU runs: fewer layers and channels, smaller input.
# dsod_tiny: 160x160 input → sources 40 (Fine), 20, 10, 5, 3, 2, 1.  A third of the
# shapes test objects are under 12 px at this scale: Fine and its 8 px priors are for them.
# (6 px priors matched twice as many objects under 6 px at IoU 0.5 but cost 5 mAP points.)
DSOD_TINY = DSODConfig(stem_channels=(16, 16, 32), growth_rate=16, bottleneck=48, block_layers=(2, 3, 3, 3),
                       transition_channels=(64, 128, 160, 64), reuse_channels=64, extra_channels=(64, 32, 32, 32),
                       fine_channels=32)
DSOD_TINY_PRIORS = _specs((8, 16, 32, 59, 86, 113, 140), (16, 32, 59, 86, 113, 140, 168),
                          ((), (2,), (2, 3), (2, 3), (2, 3), (2,), (2,)), (4, 8, 16, 32, 53.3333, 80, 160))

# The students of the distillation figures (issue 15): DSOD_TINY's layout (the same sources, strides and priors on
# the same 160-pixel input, so teacher and student locations pair one to one) at about a third of its parameters.
DSOD_NANO = DSODConfig(stem_channels=(16, 16, 24), growth_rate=8, bottleneck=32, block_layers=(1, 2, 2, 2),
                       transition_channels=(32, 64, 96, 32), reuse_channels=32, extra_channels=(32, 16, 16, 16),
                       fine_channels=16)

# ssd_tiny: 160x160 input, narrower VGG, three extra stages → sources 20, 10, 5, 3, 1.
SSD_TINY = VGGConfig(stages=(16, 32, 64, 96, 96), fc=128, fc6_dilation=3, extras=((32, 64), (32, 64), (32, 64)))
SSD_TINY_PRIORS = _specs((16, 32, 59, 86, 113), (32, 59, 86, 113, 140), ((2,), (2, 3), (2, 3), (2, 3), (2,)),
                         (8, 16, 32, 53.3333, 160))

# GRP-DSOD320 (the GRP-DSOD generator's PriorBox layers): 320x320 input, sources 40, 20, 10, 5, 3, 2;
# sizes 0.1 * 320 then steps of 0.17 * 320 (Caffe truncates 118.4 to 118 etc.); aspect ratios 1.6, 2 (, 3).
GRP_DSOD320_PRIORS = _specs((32, 64, 118.4, 172.8, 227.2, 281.6), (64, 118.4, 172.8, 227.2, 281.6, 336),
                            ((1.6, 2, 3),) * 4 + ((1.6, 2),) * 2, (8, 16, 32, 64, 100, 320))


def build_grp_dsod(num_classes: int, cfg: GRPDSODConfig = GRPDSODConfig(), image_size: int = 320,
                   prior_specs: tuple[PriorBoxSpec, ...] = GRP_DSOD320_PRIORS) -> SSDDetector:
    """A GRP-DSOD detector (GRP-DSOD320 with the defaults); the gated sources go through
    Normalize and 3x3 loc / conf convolutions with BatchNorm (head ``eps 0.001``, as DSOD's).

    ``image_size`` fixes the deconvolution kernels of the top-down path (see
    :class:`~toolkit.models.grp_dsod.GRPDSODBackbone`). ``caffe_names`` maps module paths
    to GRP-DSOD's Caffe layer names (one to one).
    """
    return _dense_detector(GRPDSODBackbone(cfg, image_size), GATED_SOURCE_NAMES, num_classes, image_size,
                           prior_specs, cfg.bn_momentum)


# grp_dsod_tiny: 160x160 input → sources 20, 10, 5, 3, 2, 1 (deconvolution kernels 2, 2, 1, 1, 2).
GRP_DSOD_TINY = GRPDSODConfig(stem_channels=(16, 16, 32), growth_rate=16, bottleneck=48, block_layers=(2, 3, 3, 3),
                              first_branch_channels=32, second_channels=48, extra_channels=(32, 32, 32, 48))
GRP_DSOD_TINY_PRIORS = _specs((16, 32, 59.2, 86.4, 113.6, 140.8), (32, 59.2, 86.4, 113.6, 140.8, 168),
                              ((1.6, 2, 3),) * 4 + ((1.6, 2),) * 2, (8, 16, 32, 53.3333, 80, 160))


def build_gfl_dsod(num_classes: int, cfg: DSODConfig = DSODConfig(), image_size: int = 300,
                   prior_specs: tuple[PriorBoxSpec, ...] = DSOD300_PRIORS, reg_max: int = 16,
                   tower_convs: int = 0, batch_norm: bool = True) -> GFLDetector:
    """A DSOD backbone with the GFL-style head (:mod:`toolkit.models.gfl`; GFL-DSOD300 with the defaults).

    ``num_classes`` includes the background (the head predicts the others).  ``prior_specs`` are the SSD preset's
    priors of the same backbone: each level's single anchor is the middle of its size range
    (:func:`~toolkit.models.gfl.level_anchor_sizes`).  ``caffe_names`` covers the backbone (DSOD's numbering).
    """
    backbone = DSODBackbone(cfg)
    if len(prior_specs) != len(backbone.out_channels):
        raise ValueError(f"{len(prior_specs)} prior specs for {len(backbone.out_channels)} sources")
    head = GFLHead(backbone.out_channels, num_classes - 1, reg_max, normalize=True, tower_convs=tower_convs,
                   batch_norm=batch_norm, bn_momentum=cfg.bn_momentum)
    names = {f"backbone.{k}": v for k, v in backbone.caffe_names.items()}
    return GFLDetector(backbone, head, level_anchor_sizes(prior_specs), (image_size, image_size), names)


# The GFL-head presets (toolkit.models.gfl): their own loss and post-processing (toolkit.train, toolkit.engine).
GFL_MODELS = ("gfl_dsod300", "gfl_dsod_tiny", "gfl_dsod_nano")

MODELS: dict[str, Callable[[int], nn.Module]] = {
    "dsod300": lambda num_classes: build_dsod(num_classes),
    "ssd300": lambda num_classes: build_ssd_vgg(num_classes),
    "ssd_tiny": lambda num_classes: build_ssd_vgg(num_classes, SSD_TINY, 160, SSD_TINY_PRIORS),
    "dsod_tiny": lambda num_classes: build_dsod(num_classes, DSOD_TINY, 160, DSOD_TINY_PRIORS),
    "dsod_nano": lambda num_classes: build_dsod(num_classes, DSOD_NANO, 160, DSOD_TINY_PRIORS),
    "grp_dsod320": lambda num_classes: build_grp_dsod(num_classes),
    "grp_dsod_tiny": lambda num_classes: build_grp_dsod(num_classes, GRP_DSOD_TINY, 160, GRP_DSOD_TINY_PRIORS),
    "gfl_dsod300": lambda num_classes: build_gfl_dsod(num_classes),
    "gfl_dsod_tiny": lambda num_classes: build_gfl_dsod(num_classes, DSOD_TINY, 160, DSOD_TINY_PRIORS),
    "gfl_dsod_nano": lambda num_classes: build_gfl_dsod(num_classes, DSOD_NANO, 160, DSOD_TINY_PRIORS),
}


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: square input ``size`` and a Caffe preprocessing preset name
    (a key of ``toolkit.data.transforms.PREPROCESS_PRESETS``)."""

    size: int
    preprocess: str


INPUTS: dict[str, InputSpec] = {
    "dsod300": InputSpec(300, "dsod"),
    "dsod_tiny": InputSpec(160, "dsod"),
    "dsod_nano": InputSpec(160, "dsod"),
    "ssd300": InputSpec(300, "ssd"),
    "ssd_tiny": InputSpec(160, "ssd"),
    "grp_dsod320": InputSpec(320, "dsod"),
    "grp_dsod_tiny": InputSpec(160, "dsod"),
    "gfl_dsod300": InputSpec(300, "dsod"),
    "gfl_dsod_tiny": InputSpec(160, "dsod"),
    "gfl_dsod_nano": InputSpec(160, "dsod"),
}


def default_postprocess(num_classes: int) -> DetectionOutputParams:
    """The DetectionOutput of the SSD / DSOD test prototxts (NMS 0.45, top_k 400, keep_top_k 200, threshold 0.01)."""
    return DetectionOutputParams(num_classes=num_classes, nms_threshold=0.45, top_k=400, keep_top_k=200,
                                 confidence_threshold=0.01, code_type=CodeType.CENTER_SIZE)


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build a model preset by name (see :data:`MODELS`); ``num_classes`` includes the background."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](num_classes)


def add_thumbnail(model: SSDDetector, scale: int, mode: str, mean_bgr: Sequence[float], pixel_scale: float,
                  channel_order: str = "bgr") -> SSDDetector:
    """Put ThumbDet's thumbnailer (:class:`~toolkit.models.thumbnail.Thumbnailer`) in front of ``model``, in place.

    The model keeps taking Caffe-preprocessed images (``(x - mean_bgr) * pixel_scale`` on 0-255 pixels, in
    ``channel_order``) of its full size; the backbone sees a ``scale``-times smaller thumbnail.  The priors are
    computed for the student's own input: each level keeps its stride (``step``, in the thumbnail's pixels) and
    its min / max sizes are divided by ``scale`` (Caffe then truncates them to integers), so every level's priors
    cover the same share of the image as the full-size model's and a teacher's per-prior predictions pair with
    them (:func:`toolkit.distill.thumbdet.ssd_kd_loss`).  ``scale`` 1 leaves the model as it is.
    """
    if scale == 1:
        return model
    if channel_order not in ("bgr", "rgb"):
        raise ValueError(f"channel_order must be 'bgr' or 'rgb', got {channel_order!r}")
    mean = [m / 255.0 for m in mean_bgr]  # the mean is subtracted in BGR order, before an RGB swap
    model.down_sample = Thumbnailer(scale, mode, mean=mean if channel_order == "bgr" else mean[::-1],
                                    std=[1.0 / (255.0 * pixel_scale)] * 3, bgr=channel_order == "bgr")
    model.prior_generator = PriorGenerator(tuple(
        replace(spec, min_sizes=tuple(v / scale for v in spec.min_sizes),
                max_sizes=tuple(v / scale for v in spec.max_sizes))
        for spec in model.prior_generator.specs))
    model._prior_cache.clear()
    return model


def presets_for_caffe_layers(layers_with_blobs) -> list[str]:
    """The presets whose Caffe rename table names exactly ``layers_with_blobs`` (the Caffe layers
    that hold weights, e.g. the keys of a converted checkpoint's ``caffe_blobs``).

    Only names are compared (the models are built on the meta device, nothing is
    allocated); whether the shapes fit is for the loader to check.
    """
    import torch

    wanted = set(layers_with_blobs)
    found = []
    for name in MODELS:
        with torch.device("meta"):
            model = build_model(name, 2)
        if {n for names in model.caffe_names.values() for n in names} == wanted:
            found.append(name)
    return found
