"""Official Deformable DETR, Sparse DETR and ThumbDet checkpoints -> toolkit models and checkpoints.

An official checkpoint (the ``main.py`` of fundamentalvision/Deformable-DETR,
kakaobrain/sparse-detr and zhangyin1996/ThumbDet save ``{"model": state_dict, "args":
argparse.Namespace, "epoch", ...}``) is read with ``weights_only=True``:
``argparse.Namespace`` is the only class allowed besides tensors and plain
types, so no arbitrary object is unpickled.  The architecture
comes from ``args`` (the number of classes from the class head), the state dict
loads by name (the toolkit's modules carry the official names), and every key
is accounted for: missing, unexpected or misshapen keys are one error naming them.

A toolkit checkpoint (:func:`write_toolkit_checkpoint`) is plain types and
tensors: ``{"format", "model_name", "config", "model", "classes", "source"}``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Optional

import torch

from toolkit.engine import DETR_CHECKPOINT_FORMAT
from toolkit.models.detr import DeformableDETR, DeformableDETRConfig, build_deformable_detr
from toolkit.models.state_dict import state_dict_mismatch

PathLike = str | os.PathLike
TOOLKIT_FORMAT = DETR_CHECKPOINT_FORMAT


class DETRConversionError(ValueError):
    """An official checkpoint that cannot be read or mapped; the message names the file and the keys."""


def _load(path: PathLike):
    path = Path(path)
    if not path.is_file():
        raise DETRConversionError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise DETRConversionError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive; this file "
                                      "is not one)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # The unpickler's message says which class it refused ("Unsupported global: GLOBAL module.Class").
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line or "Unpickler error" in line),
                      lines[0] if lines else type(exc).__name__)
        raise DETRConversionError(f"{path}: does not load with weights_only=True (only tensors, plain types and "
                                  f"argparse.Namespace are allowed): {reason}") from None


def official_config(checkpoint: Mapping, source: str) -> DeformableDETRConfig:
    """The architecture of an official checkpoint: its ``args``, the class count of its class head.

    Raises:
        DETRConversionError: no ``args`` / ``model``, a ThumbDet checkpoint without a down-sampler it knows, or
            arguments the toolkit does not build.
    """
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
        raise DETRConversionError(f"{source}: not an official DETR checkpoint (no 'model' state dict)")
    args = checkpoint.get("args")
    if args is None:
        raise DETRConversionError(f"{source}: no 'args': the architecture cannot be known (official checkpoints "
                                  "save main.py's arguments)")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    state = checkpoint["model"]
    head = state.get("class_embed.0.weight", state.get("class_embed.weight"))
    if head is None:
        raise DETRConversionError(f"{source}: no class head ('class_embed.0.weight') in the state dict")
    thumb_scale = 1
    if "use_kd_loss" in args or "down_sample_epoch" in args:  # ThumbDet's main.py
        thumb_scale = thumbdet_scale(state, source)
    try:
        return DeformableDETRConfig.from_official_args(args, int(head.shape[0]), thumb_scale=thumb_scale)
    except (TypeError, ValueError) as exc:
        raise DETRConversionError(f"{source}: {exc}") from None


def thumbdet_scale(state: Mapping[str, torch.Tensor], source: str) -> int:
    """A ThumbDet checkpoint's thumbnail scale, from its down-sampler's kernels (its args do not record it): 3x3
    kernels are the official 4x down-sampler, 5x5 the README's 2x edit (``toolkit.models.thumbnail``).

    Raises:
        DETRConversionError: no ``backbone.0.down_sample.{0,2}.weight``, or kernels of another shape.
    """
    keys = ("backbone.0.down_sample.0.weight", "backbone.0.down_sample.2.weight")
    missing = [k for k in keys if k not in state]
    if missing:
        raise DETRConversionError(f"{source}: a ThumbDet checkpoint without its down-sampler: missing "
                                  f"{', '.join(missing)}")
    shapes = tuple(tuple(state[k].shape) for k in keys)
    known = {((12, 3, 3, 3), (3, 12, 3, 3)): 4, ((12, 3, 5, 5), (3, 12, 5, 5)): 2}
    if shapes not in known:
        raise DETRConversionError(f"{source}: a ThumbDet down-sampler of unknown shape: {keys[0]} {shapes[0]}, "
                                  f"{keys[1]} {shapes[1]} (known: 3x3 kernels for 4x, 5x5 for 2x)")
    return known[shapes]


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``, every key accounted for.

    Raises:
        DETRConversionError: naming missing, unexpected and misshapen keys.
    """
    problems = state_dict_mismatch(model.state_dict(), state)
    if problems:
        raise DETRConversionError(f"{source}: the state dict does not fit the model its args describe: "
                                  + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def model_from_checkpoint(path: PathLike) -> tuple[DeformableDETR, DeformableDETRConfig, dict]:
    """A model (eval mode, float32) from an official checkpoint or a toolkit one.

    Returns:
        ``(model, config, the checkpoint dict)``.
    Raises:
        DETRConversionError: see :func:`official_config` and :func:`load_state`.
    """
    checkpoint = _load(path)
    source = str(path)
    if isinstance(checkpoint, Mapping) and checkpoint.get("format") == TOOLKIT_FORMAT:
        try:
            cfg = DeformableDETRConfig(**checkpoint["config"])
        except TypeError as exc:
            raise DETRConversionError(f"{source}: a toolkit checkpoint with an unknown config ({exc})") from None
    else:
        cfg = official_config(checkpoint, source)
    model = build_deformable_detr(cfg, train_backbone=False)
    load_state(model, checkpoint["model"], source)
    return model.eval(), cfg, checkpoint


def write_toolkit_checkpoint(model: DeformableDETR, cfg: DeformableDETRConfig, out: PathLike, source: str,
                             classes: Optional[list[str]] = None) -> int:
    """Write a toolkit checkpoint atomically (temporary file, then rename); returns its size in bytes.

    ``classes`` (background first, then one name per logit) default to COCO's names by category id for the
    official 91-way heads (``toolkit.engine.detr_default_classes``)."""
    from converters.caffe.cli import atomic_write
    from toolkit.engine import detr_default_classes

    payload = {"format": TOOLKIT_FORMAT, "model_name": f"{cfg.family}_detr", "config": asdict(cfg),
               "model": model.state_dict(), "classes": list(classes or detr_default_classes(cfg.num_classes)),
               "source": source}
    return atomic_write(out, lambda f: torch.save(payload, f), error=DETRConversionError)
