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


def export_caffe_blobs(model: nn.Module, caffe_names: Mapping[str, Sequence[str]]) -> dict[str, list[np.ndarray]]:
    """The inverse of :func:`load_caffe_blobs`: the model's tensors as Caffe layer blobs.

    BatchNorm modules give ``[running_mean, running_var, [1.0]]`` (scale factor 1)
    under the first name and ``[weight, bias]`` under the second (the Scale layer);
    every other module gives ``[weight, bias?]``.  Arrays are float32 copies.
    """
    modules = dict(model.named_modules())
    out: dict[str, list[np.ndarray]] = {}

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().to(torch.float32).numpy().copy()

    for path, names in caffe_names.items():
        module = modules[path]
        if isinstance(module, nn.BatchNorm2d):
            out[names[0]] = [arr(module.running_mean), arr(module.running_var), np.ones(1, np.float32)]
            out[names[1]] = [arr(module.weight), arr(module.bias)]
        else:
            blobs = [arr(module.weight)]
            if getattr(module, "bias", None) is not None:
                blobs.append(arr(module.bias))
            out[names[0]] = blobs
    return out


# The key under which ``python -m converters.caffe convert`` stores every Caffe layer's blobs
# (``{layer name: [tensors in Caffe's blob order]}``), beside the interpreter's state dict.
CONVERTED_BLOBS_KEY = "caffe_blobs"


def converted_blobs(checkpoint: Mapping, source: str = "checkpoint") -> dict[str, list[np.ndarray]]:
    """The Caffe blobs of a converted checkpoint (``torch.load(..., weights_only=True)``'s dict).

    Raises:
        CaffeWeightsError: ``checkpoint`` is not one that ``converters.caffe convert`` wrote.
    """
    blobs = checkpoint.get(CONVERTED_BLOBS_KEY) if isinstance(checkpoint, Mapping) else None
    if not isinstance(blobs, Mapping):
        raise CaffeWeightsError(f"{source}: no {CONVERTED_BLOBS_KEY!r}; not written by "
                                f"'python -m converters.caffe convert'")
    return {str(name): [torch.as_tensor(b).detach().cpu().numpy() for b in layer] for name, layer in blobs.items()}


# The modules whose shapes depend on the number of classes: the SSD family's confidence convolutions and the GFL
# head's class predictors (``head.cls.*``; its towers, ``head.cls_towers.*``, do not).
CLASS_HEAD_PREFIXES = ("head.conf.", "head.cls.")


def _class_dependent_paths(model: nn.Module, caffe_names: Mapping[str, Sequence[str]],
                           blobs: Mapping[str, Sequence[np.ndarray]]) -> list[str]:
    """Rename-table entries of the confidence head whose Caffe blobs do not fit the model
    (the Caffe net was trained for another number of classes)."""
    modules = dict(model.named_modules())
    paths = [p for p in caffe_names if p.startswith("head.conf.")]
    for path in paths:
        module, layer = modules.get(path), blobs.get(caffe_names[path][0])
        if module is None or not layer:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and np.asarray(layer[0]).size != weight.numel():
            return paths
    return []


def init_from_checkpoint(model: nn.Module, checkpoint: Mapping, source: str = "checkpoint") -> list[str]:
    """Initialise a native detector from a converted Caffe checkpoint or a ``toolkit.train`` one
    (``python -m toolkit.train --init-from``).

    Every tensor must fit, except the class head (:data:`CLASS_HEAD_PREFIXES`: SSD's
    confidence convolutions, GFL's class predictors) when the number of classes
    differs: those layers keep their fresh initialisation (fine-tuning a VOC model
    on another label set).  Returns human-readable notes on what was skipped.

    Raises:
        CaffeWeightsError: a converted checkpoint whose layers do not map onto the
            model (each layer named), or a training checkpoint of another model.
    """
    notes: list[str] = []
    if isinstance(checkpoint, Mapping) and CONVERTED_BLOBS_KEY in checkpoint:
        caffe_names = getattr(model, "caffe_names", None)
        if not caffe_names:
            raise CaffeWeightsError(f"{source}: the model has no Caffe rename table")
        blobs = converted_blobs(checkpoint, source)
        skipped = _class_dependent_paths(model, caffe_names, blobs)
        if skipped:
            skip_layers = {n for p in skipped for n in caffe_names[p]}
            caffe_names = {p: n for p, n in caffe_names.items() if p not in skipped}
            blobs = {k: v for k, v in blobs.items() if k not in skip_layers}
            notes.append(f"confidence head left at its initialisation (other number of classes): "
                         f"{sorted(skip_layers)}")
        try:
            load_caffe_blobs(model, caffe_names, blobs)
        except CaffeWeightsError as exc:
            raise CaffeWeightsError(f"{source}: {exc}") from None
        return notes
    if isinstance(checkpoint, Mapping) and "model" in checkpoint:
        state = model.state_dict()
        incoming = checkpoint["model"]
        unknown = sorted(set(incoming) - set(state))
        missing = sorted(set(state) - set(incoming))
        if unknown or missing:
            raise CaffeWeightsError(f"{source}: a checkpoint of another model ({checkpoint.get('model_name')!r}): "
                                    f"{len(missing)} tensor(s) missing (e.g. {missing[:3]}), "
                                    f"{len(unknown)} unknown (e.g. {unknown[:3]})")
        misfit = [k for k in state if tuple(incoming[k].shape) != tuple(state[k].shape)]
        if any(not k.startswith(CLASS_HEAD_PREFIXES) for k in misfit):
            bad = [f"{k} {tuple(incoming[k].shape)} vs {tuple(state[k].shape)}" for k in misfit
                   if not k.startswith(CLASS_HEAD_PREFIXES)]
            raise CaffeWeightsError(f"{source}: shapes do not fit: {bad}")
        if misfit:
            conf = [k for k in state if k.startswith(CLASS_HEAD_PREFIXES)]
            incoming = {k: v for k, v in incoming.items() if k not in conf}
            notes.append("class head left at its initialisation (other number of classes): "
                         f"{sorted({k.rsplit('.', 1)[0] for k in conf})}")
        model.load_state_dict(incoming, strict=False)
        return notes
    raise CaffeWeightsError(f"{source}: neither a converted Caffe checkpoint nor a toolkit.train checkpoint")
