"""Load Caffe blobs into the toolkit's native models through their rename tables.

Every native model carries ``caffe_names``: an ordered map from a module path
to the Caffe layer(s) it replaces (detectron2's ``c2_model_loading`` idea: an
explicit table, names unique, every shape change reported).  Blob layouts:

- ``Convolution`` / ``Deconvolution``: ``[weight (O, I/g, kh, kw), bias (O)?]`` → ``conv.weight`` / ``conv.bias``;
- ``BatchNorm`` + ``Scale`` (two names): ``[mean·f, var·f, f]`` and ``[gamma, beta]`` →
  ``running_mean = mean·f / f``, ``running_var = var·f / f`` (0 when ``f == 0``, as
  Caffe), ``weight = gamma``, ``bias = beta``;
- ``Normalize``: ``[scale (C) or ()]`` → ``weight``;
- ``InnerProduct``: ``[weight (N, K), bias (N)?]`` (legacy ``(1, 1, N, K)`` reshaped).
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)


class CaffeWeightsError(ValueError):
    """Blobs do not fit the model; the message names every layer at fault."""


def _assign(param: torch.Tensor, value: np.ndarray, what: str, changes: list[str]) -> None:
    value = np.asarray(value, dtype=np.float32)
    if tuple(value.shape) != tuple(param.shape):
        if value.size != param.numel():
            raise CaffeWeightsError(f"{what}: Caffe shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
        changes.append(f"{what}: reshaped {tuple(value.shape)} -> {tuple(param.shape)}")
        value = value.reshape(tuple(param.shape))
    with torch.no_grad():
        param.copy_(torch.from_numpy(value))


def load_caffe_blobs(
    model: nn.Module,
    caffe_names: Mapping[str, Sequence[str]],
    blobs: Mapping[str, Sequence[np.ndarray]],
    strict: bool = True,
) -> dict[str, str]:
    """Copy Caffe blobs into ``model``.

    Args:
        model: the native model.
        caffe_names: module path → Caffe layer name(s) (two for BatchNorm + Scale).
        blobs: Caffe layer name → its blobs (``toolkit.caffe.layer_blobs``).
        strict: raise when Caffe layers with blobs are left unused.
    Returns:
        The old → new map, ``"<caffe layer>/<blob index>" → "<module path>.<tensor>"``.
    Raises:
        CaffeWeightsError: listing every missing layer, every unused one (strict) and
            every shape that does not fit.
    """
    used = [n for names in caffe_names.values() for n in names]
    duplicates = sorted({n for n in used if used.count(n) > 1})
    if duplicates:
        raise CaffeWeightsError(f"rename table maps Caffe layer(s) twice: {duplicates}")
    modules = dict(model.named_modules())
    missing = [n for n in used if n not in blobs]
    unused = [n for n, b in blobs.items() if b and n not in set(used)] if strict else []
    problems = []
    if missing:
        problems.append(f"missing in the caffemodel: {missing}")
    if unused:
        problems.append(f"in the caffemodel but not in the model: {unused}")
    mapping: dict[str, str] = {}
    changes: list[str] = []
    if not problems:
        for path, names in caffe_names.items():
            module = modules.get(path)
            if module is None:
                problems.append(f"rename table names module {path!r}, which the model does not have")
                continue
            try:
                if isinstance(module, nn.BatchNorm2d):
                    bn_blobs, scale_blobs = blobs[names[0]], blobs[names[1]]
                    factor = float(np.asarray(bn_blobs[2]).reshape(-1)[0]) if len(bn_blobs) > 2 else 1.0
                    inv = 0.0 if factor == 0 else 1.0 / factor
                    _assign(module.running_mean, np.asarray(bn_blobs[0]) * inv, f"{names[0]}/0", changes)
                    _assign(module.running_var, np.asarray(bn_blobs[1]) * inv, f"{names[0]}/1", changes)
                    _assign(module.weight, scale_blobs[0], f"{names[1]}/0", changes)
                    mapping.update({f"{names[0]}/0": f"{path}.running_mean", f"{names[0]}/1": f"{path}.running_var",
                                    f"{names[0]}/2": f"{path} (folded into the running statistics)",
                                    f"{names[1]}/0": f"{path}.weight"})
                    if len(scale_blobs) > 1:
                        _assign(module.bias, scale_blobs[1], f"{names[1]}/1", changes)
                        mapping[f"{names[1]}/1"] = f"{path}.bias"
                    else:
                        with torch.no_grad():
                            module.bias.zero_()
                else:
                    layer = blobs[names[0]]
                    _assign(module.weight, layer[0], f"{names[0]}/0", changes)
                    mapping[f"{names[0]}/0"] = f"{path}.weight"
                    if len(layer) > 1:
                        if getattr(module, "bias", None) is None:
                            raise CaffeWeightsError(f"{names[0]}: Caffe has a bias, {path} has none")
                        _assign(module.bias, layer[1], f"{names[0]}/1", changes)
                        mapping[f"{names[0]}/1"] = f"{path}.bias"
                    elif getattr(module, "bias", None) is not None:
                        raise CaffeWeightsError(f"{names[0]}: no bias in Caffe, but {path} has one")
            except CaffeWeightsError as exc:
                problems.append(str(exc))
    if problems:
        raise CaffeWeightsError("; ".join(problems))
    for change in changes:
        logger.info(change)
    return mapping
