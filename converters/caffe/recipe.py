"""A Caffe training recipe (solver + train net) read as a ``python -m toolkit.train`` command.

:func:`read_recipe` reads

* from the **solver**: the learning-rate policy (``multistep`` stepvalues,
  ``step`` stepsize, ``fixed``; the others are reported as not expressible),
  ``base_lr``, ``gamma``, ``max_iter``, ``momentum``, ``weight_decay``,
  ``iter_size`` (``--accum``), ``test_interval`` / ``snapshot``;
* from the **train net** (TRAIN phase): the data layer's ``batch_size`` and
  ``source``, its ``transform_param`` (resize, mirror, mean, scale,
  ``distort_param``, ``expand_param``, ``emit_constraint``) and the
  ``batch_sampler`` list, every ``PriorBox`` layer
  (:meth:`toolkit.models.priors.PriorBoxSpec.from_caffe`) and the
  ``MultiBoxLoss`` parameters
  (:meth:`toolkit.models.multibox_loss.MultiBoxLossParams.from_caffe`), and the
  per-blob ``lr_mult`` / ``decay_mult``;

guesses ``--model`` from the net's names and input size and ``--dataset`` from
the LMDB source, and compares everything the toolkit fixes rather than takes
as a flag (model priors, preprocessing, augmentation parameters, loss
settings) with the recipe.  What differs or has no flag is listed in
:attr:`Recipe.not_expressible`.

Floats in Caffe files are float32; they are reported at float32 precision
(``0.10000000149011612`` reads ``0.1``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from converters.caffe.cli import PathLike, atomic_write
from toolkit.caffe.errors import CaffeConversionError
from toolkit.caffe.net import layer_included, modern_layers
from toolkit.caffe import CaffeFormatError, caffe_pb2, read_prototxt
from toolkit.data import DATASETS
from toolkit.data.transforms import INTERPOLATIONS, PREPROCESS_PRESETS, SSD_BATCH_SAMPLERS, DistortParams
from toolkit.models.build import INPUTS, MODELS
from toolkit.models.multibox_loss import MultiBoxLossParams
from toolkit.models.priors import PriorBoxSpec

RECIPE_FORMAT = "legacy-det/caffe-recipe/1"

# toolkit.train flag of each train_args key, in the order the command lists them.
FLAGS = {
    "model": "--model", "dataset": "--dataset", "batch_size": "--batch-size", "accum": "--accum",
    "iters": "--iters", "lr": "--lr", "steps": "--steps", "gamma": "--gamma", "momentum": "--momentum",
    "weight_decay": "--weight-decay", "warmup_iters": "--warmup-iters", "augment": "--augment",
    "max_expand": "--max-expand", "eval_every": "--eval-every", "ckpt_every": "--ckpt-every",
}

# The data layers of Caffe and where their batch size lives.
DATA_LAYERS = {"AnnotatedData": "data_param", "Data": "data_param", "ImageData": "image_data_param",
               "WindowData": "window_data_param", "HDF5Data": "hdf5_data_param", "MemoryData": "memory_data_param"}

# LMDB source name -> toolkit dataset, most specific first.
_DATASET_PATTERNS = (
    (r"voc0712plus", "voc0712plus"), (r"voc0712", "voc0712"), (r"voc2007|voc07", "voc07"),
    (r"voc2012|voc12", "voc12"), (r"coco", "coco"),
)
_NUM_CLASSES = {"voc": 21, "coco": 81}  # toolkit dataset kind -> classes with the background


def f32(value: float) -> float:
    """A float32 value (Caffe's ``float`` fields) as the shortest decimal that reads back to it."""
    return float(str(np.float32(value)))


def _clean(value):
    """JSON-ready: enums by value, tuples as lists, floats at float32 precision."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _clean(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return f32(value) if np.isfinite(value) else value
    return value


def _num(value: float) -> str:
    """A number for the command line: integers without ``.0``, floats at float32 precision."""
    value = f32(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _enum_name(message, name: str) -> str:
    return message.DESCRIPTOR.fields_by_name[name].enum_type.values_by_number[getattr(message, name)].name


@dataclass
class Recipe:
    """A Caffe recipe read for ``toolkit.train``.

    Attributes:
        solver_path, train_net_path: the files read (``train_net_path`` None
            when no train net was found).
        net_name: the train net's ``name``.
        train_args: ``toolkit.train`` argument -> value (``steps`` a list), the
            flags of :meth:`command`; keys of :data:`FLAGS`.
        solver: the solver's schedule fields as Caffe has them.
        data: the TRAIN data layer: type, name, batch_size, source, backend, label map.
        augmentation: its ``transform_param`` and ``batch_sampler`` list.
        priors: one ``{"layer", "bottoms", "spec", "num_priors_per_cell"}`` per PriorBox layer.
        loss: the MultiBoxLoss layer's parameters (None without one).
        not_expressible: what the command cannot reproduce, one sentence each.
        notes: other remarks (dropped no-op values, checks that passed).
        warnings: problems reading the files (unknown fields skipped).
    """

    solver_path: str
    train_net_path: Optional[str]
    net_name: str = ""
    train_args: dict = field(default_factory=dict)
    solver: dict = field(default_factory=dict)
    data: Optional[dict] = None
    augmentation: Optional[dict] = None
    priors: list = field(default_factory=list)
    loss: Optional[dict] = None
    not_expressible: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def command(self) -> list[str]:
        """``["python", "-m", "toolkit.train", flags...]`` (``--steps`` with no value: constant lr)."""
        argv = ["python", "-m", "toolkit.train"]
        for key, flag in FLAGS.items():
            if key not in self.train_args:
                continue
            value = self.train_args[key]
            if isinstance(value, (list, tuple)):
                argv += [flag] + [_num(v) for v in value]
            elif isinstance(value, str):
                argv += [flag, value]
            else:
                argv += [flag, _num(value)]
        return argv

    def command_line(self) -> str:
        """:meth:`command` as one shell line."""
        return shlex.join(self.command())

    def to_json(self) -> dict:
        """The preset written by :func:`write_recipe`."""
        return _clean({
            "format": RECIPE_FORMAT,
            "solver": self.solver_path,
            "train_net": self.train_net_path,
            "net_name": self.net_name,
            "command": self.command_line(),
            "train_args": self.train_args,
            "solver_params": self.solver,
            "data": self.data,
            "augmentation": self.augmentation,
            "priors": self.priors,
            "loss": self.loss,
            "not_expressible": self.not_expressible,
            "notes": self.notes,
        })


# ---------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------


def _read_text(path: Path, message: str, what: str, recipe: Recipe):
    """``(parsed message, None)``, or ``(message, the error about the first unknown field)`` when fields of
    another Caffe fork had to be skipped (a warning says so)."""
    try:
        return read_prototxt(path, message), None
    except CaffeFormatError as exc:
        if "has no field named" not in str(exc):
            raise CaffeConversionError(f"cannot read the {what}: {exc}") from None
        first_error = str(exc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported below, once
        try:
            parsed = read_prototxt(path, message, allow_unknown_fields=True)
        except CaffeFormatError as exc:
            raise CaffeConversionError(f"cannot read the {what}: {exc}") from None
    name = re.search(r"has no field named \"?([\w.]+)", first_error)
    where = re.search(r":(\d+:\d+): ", first_error)
    recipe.warnings.append(f"{path}: skipped fields that SSD-Caffe's schema does not define (another Caffe fork's?), "
                           f"the first: {name.group(1) if name else '?'} at {where.group(1) if where else '?'}")
    return parsed, first_error


def _read_solver(path: Path, recipe: Recipe) -> caffe_pb2.SolverParameter:
    solver, first_error = _read_text(path, "SolverParameter", "solver", recipe)
    if first_error is not None and not solver.ListFields():
        raise CaffeConversionError(f"{path}: not a Caffe solver: no solver field in it ({first_error})")
    return solver


def _read_train_net(path: Path, recipe: Recipe) -> caffe_pb2.NetParameter:
    net, _ = _read_text(path, "NetParameter", "train net", recipe)
    if not len(net.layer) and not len(net.layers):
        raise CaffeConversionError(f"{path}: no layers: not a Caffe net definition")
    return net


def _find_train_net(solver_path: Path, solver: caffe_pb2.SolverParameter, recipe: Recipe):
    """The train net: inline ``train_net_param`` / ``net_param``, or the file ``train_net`` / ``net``
    names (tried relative to the solver, to the working folder, then its file name beside the solver)."""
    for inline in ("train_net_param", "net_param"):
        if solver.HasField(inline):
            recipe.notes.append(f"train net: the solver's inline {inline}")
            return None, getattr(solver, inline)
    name = solver.train_net or solver.net
    if not name:
        recipe.not_expressible.append("no train net: the solver names none and none was given, so the batch size, "
                                      "augmentation, priors and loss are unknown")
        return None, None
    given = Path(name)
    candidates = [solver_path.parent / given, given, solver_path.parent / given.name]
    for candidate in candidates:
        if candidate.is_file():
            if candidate != candidates[0]:
                recipe.notes.append(f"train net {name!r} (relative to the Caffe root) read from {candidate}")
            return candidate, None
    recipe.not_expressible.append(f"the train net {name!r} was not found (give TRAIN.prototxt), so the batch size, "
                                  "augmentation, priors and loss are unknown")
    return None, None


# ---------------------------------------------------------------------------
# The solver
# ---------------------------------------------------------------------------


def _schedule(solver: caffe_pb2.SolverParameter, recipe: Recipe) -> None:
    args, out = recipe.train_args, recipe.not_expressible
    solver_type = (caffe_pb2.SolverParameter.SolverType.Name(solver.solver_type)
                   if solver.HasField("solver_type") else solver.type)
    policy = solver.lr_policy
    max_iter = int(solver.max_iter)
    recipe.solver = {
        "type": solver_type, "lr_policy": policy, "base_lr": f32(solver.base_lr),
        "gamma": f32(solver.gamma) if solver.HasField("gamma") else None,
        "power": f32(solver.power) if solver.HasField("power") else None,
        "stepsize": int(solver.stepsize) if solver.HasField("stepsize") else None,
        "stepvalue": [int(v) for v in solver.stepvalue], "max_iter": max_iter,
        "momentum": f32(solver.momentum), "weight_decay": f32(solver.weight_decay),
        "regularization_type": solver.regularization_type, "iter_size": int(solver.iter_size),
        "clip_gradients": f32(solver.clip_gradients), "test_interval": int(solver.test_interval),
        "snapshot": int(solver.snapshot), "random_seed": int(solver.random_seed),
    }
    if solver_type.upper() != "SGD":
        out.append(f"solver type {solver_type}: toolkit.train trains with SGD + momentum")
    if not solver.HasField("base_lr"):
        out.append("base_lr is not set (Caffe then trains with lr 0)")
    if max_iter > 0:
        args["iters"] = max_iter
    else:
        out.append("max_iter is not set: the command keeps the model preset's length")
    args["lr"] = f32(solver.base_lr)

    steps: list[int] = []
    if policy == "multistep":
        values = [int(v) for v in solver.stepvalue]
        if any(b <= a for a, b in zip(values, values[1:])):
            out.append(f"stepvalue {values} does not increase: Caffe passes at most one step per iteration, "
                       "toolkit.train counts every milestone passed")
        late = [v for v in values if max_iter > 0 and v >= max_iter]
        steps = [v for v in values if v not in late]
        if late:
            recipe.notes.append(f"stepvalue {late} not below max_iter {max_iter}: never reached in Caffe "
                                "(iterations run 0 .. max_iter - 1), left out")
    elif policy == "step":
        if solver.stepsize <= 0:
            out.append("lr_policy step without a positive stepsize (Caffe refuses it): constant lr")
        elif max_iter > 0:
            # sgd_solver.cpp: lr = base_lr * gamma ^ floor(iter / stepsize), i.e. milestones at k * stepsize.
            steps = list(range(int(solver.stepsize), max_iter, int(solver.stepsize)))
            recipe.notes.append(f"lr_policy step (stepsize {solver.stepsize}) as milestones every "
                                f"{solver.stepsize} iterations")
    elif policy == "fixed":
        pass
    else:
        formulas = {  # sgd_solver.cpp GetLearningRate (plateau: SSD-Caffe's addition)
            "exp": "base_lr * gamma ^ iter",
            "inv": f"base_lr * (1 + gamma * iter) ^ -power, power {f32(solver.power):g}",
            "poly": f"base_lr * (1 - iter / max_iter) ^ power, power {f32(solver.power):g}",
            "sigmoid": "base_lr / (1 + exp(-gamma * (iter - stepsize)))",
            "plateau": "decay by gamma when the loss stops improving",
        }
        what = f"lr_policy {policy!r}" if policy else "lr_policy is not set (Caffe refuses such a solver)"
        detail = f" ({formulas[policy]})" if policy in formulas else ""
        out.append(f"{what}{detail}: toolkit.train has multistep decay and a linear warm-up only; "
                   f"the command trains with a constant lr {_num(solver.base_lr)}")
    args["steps"] = steps
    if steps and solver.HasField("gamma"):
        args["gamma"] = f32(solver.gamma)
    elif steps:
        out.append("gamma is not set (Caffe then multiplies the lr by 0 at the first step)")
        args["gamma"] = 0.0
    args["momentum"] = f32(solver.momentum)  # unset in Caffe means 0
    args["weight_decay"] = f32(solver.weight_decay)
    args["accum"] = int(solver.iter_size)
    args["warmup_iters"] = 0  # Caffe's SGD has no warm-up; some toolkit presets do
    if solver.regularization_type != "L2":
        out.append(f"regularization_type {solver.regularization_type}: toolkit.train's weight decay is L2")
    if solver.clip_gradients >= 0:
        out.append(f"clip_gradients {f32(solver.clip_gradients):g}: toolkit.train does not clip gradients")
    has_test = len(solver.test_net) or len(solver.test_net_param) or solver.net or solver.HasField("net_param")
    if has_test and len(solver.test_iter) and 0 < solver.test_interval < max(max_iter, 1):
        args["eval_every"] = int(solver.test_interval)
    if 0 < solver.snapshot < max(max_iter, 1):
        args["ckpt_every"] = int(solver.snapshot)
    recipe.notes.append("SGD: Caffe keeps the lr inside the momentum (v = m v + lr g), PyTorch outside "
                        "(v = m v + g, w -= lr v): the same steps while the lr is constant, a short transient "
                        "after each lr step")


# ---------------------------------------------------------------------------
# The train net
# ---------------------------------------------------------------------------


def _guess_model(texts: list[str], size: Optional[tuple[int, int]], recipe: Recipe) -> Optional[str]:
    joined = " ".join(texts).lower()
    if re.search(r"grp[_-]?dsod", joined):
        candidate = "grp_dsod320"
    elif "dsod" in joined:
        candidate = "dsod300"
    elif "ssd" in joined and "vgg" in joined:
        candidate = "ssd300"
    else:
        candidate = None
    if candidate is not None and size is not None and size != (INPUTS[candidate].size,) * 2:
        recipe.not_expressible.append(
            f"no --model: the net looks like {candidate} by its names but takes {size[0]}x{size[1]} images, "
            f"not {INPUTS[candidate].size}x{INPUTS[candidate].size}")
        return None
    if candidate is None:
        name = recipe.net_name or "the net"
        recipe.not_expressible.append(
            f"no --model: {name!r} is none of toolkit's models ({', '.join(sorted(MODELS))}) by its names; "
            "toolkit.train would train its default model")
    return candidate


def _guess_dataset(source: str, texts: list[str], recipe: Recipe) -> Optional[str]:
    def match(text: str) -> Optional[str]:
        low = text.lower()
        return next((name for pattern, name in _DATASET_PATTERNS if re.search(pattern, low)), None)

    dataset = match(source) if source else None
    others = {m for m in (match(t) for t in texts) if m}
    if dataset is not None and others - {dataset}:
        recipe.notes.append(f"--dataset {dataset} from the source {source!r}, although the file names say "
                            f"{', '.join(sorted(others - {dataset}))}")
    if dataset is None or dataset not in DATASETS:
        recipe.not_expressible.append(
            f"no --dataset: the source {source!r} is none of toolkit's datasets; toolkit.train reads the LMDB "
            f"itself with --dataset lmdb:PATH[,labelmap=FILE] (the path as seen from the Caffe root: {source!r})"
            if source else "no --dataset: the train net has no data source")
        return None
    return dataset


def _sampler_dict(s) -> dict:
    out = {"min_scale": f32(s.sampler.min_scale), "max_scale": f32(s.sampler.max_scale),
           "min_aspect_ratio": f32(s.sampler.min_aspect_ratio), "max_aspect_ratio": f32(s.sampler.max_aspect_ratio)}
    for name in ("min_jaccard_overlap", "max_jaccard_overlap", "min_sample_coverage", "max_sample_coverage",
                 "min_object_coverage", "max_object_coverage"):
        out[name] = f32(getattr(s.sample_constraint, name)) if s.sample_constraint.HasField(name) else None
    # annotated_data_layer: no max_sample means no limit on the samples kept.
    out["max_sample"] = int(s.max_sample) if s.HasField("max_sample") else None
    out["max_trials"] = int(s.max_trials)
    return out


def _augmentation(layer, model: Optional[str], recipe: Recipe) -> None:
    """``transform_param`` + batch samplers into the JSON, ``--augment`` / ``--max-expand``, and the differences."""
    t = layer.transform_param
    out = recipe.not_expressible
    aug: dict = {"mirror": bool(t.mirror), "mean_value": [f32(v) for v in t.mean_value],
                 "mean_file": t.mean_file or None, "scale": f32(t.scale), "crop_size": int(t.crop_size),
                 "force_color": bool(t.force_color), "force_gray": bool(t.force_gray)}
    resize = None
    if t.HasField("resize_param"):
        r = t.resize_param
        resize = {"prob": f32(r.prob), "resize_mode": _enum_name(r, "resize_mode"), "height": int(r.height),
                  "width": int(r.width), "interp_mode": [caffe_pb2.ResizeParameter.Interp_mode.Name(m)
                                                         for m in r.interp_mode]}
    aug["resize"] = resize
    distort = None
    if t.HasField("distort_param"):
        d = t.distort_param
        distort = {f.name: f32(getattr(d, f.name)) for f in dataclasses.fields(DistortParams)}
    aug["distort"] = distort
    expand = None
    if t.HasField("expand_param"):
        expand = {"prob": f32(t.expand_param.prob), "max_expand_ratio": f32(t.expand_param.max_expand_ratio)}
    aug["expand"] = expand
    aug["emit_constraint"] = ({"emit_type": _enum_name(t.emit_constraint, "emit_type"),
                               "emit_overlap": f32(t.emit_constraint.emit_overlap)}
                              if t.HasField("emit_constraint") else None)
    aug["noise"] = t.HasField("noise_param")
    samplers = [_sampler_dict(s) for s in layer.annotated_data_param.batch_sampler]
    aug["batch_samplers"] = samplers
    recipe.augmentation = aug

    # --augment: "light" is warp + mirror (+ the whole-image sampler), "ssd" the full SSD recipe.
    whole = [_sampler_dict(caffe_pb2.BatchSampler(max_sample=1, max_trials=1))]
    light = distort is None and (expand is None or expand["prob"] == 0) and samplers in ([], whole)
    recipe.train_args["augment"] = "light" if light else "ssd"
    if not light:
        toolkit_distort = {k: f32(v) for k, v in dataclasses.asdict(DistortParams()).items()}
        if distort is None:
            out.append("no distort_param, but --augment ssd always distorts colours")
        elif distort != toolkit_distort:
            diff = [f"{k} {distort[k]:g} (toolkit {toolkit_distort[k]:g})" for k in distort
                    if distort[k] != toolkit_distort[k]]
            out.append(f"distort_param differs from toolkit's: {', '.join(diff)}")
        if expand is None or expand["prob"] == 0:
            recipe.train_args["max_expand"] = 1.0
        else:
            recipe.train_args["max_expand"] = expand["max_expand_ratio"]
            if expand["prob"] != 0.5:
                out.append(f"expand_param prob {expand['prob']:g}: toolkit expands with probability 0.5")
        toolkit_samplers = [_clean(s) for s in SSD_BATCH_SAMPLERS]
        if samplers != toolkit_samplers:
            out.append(f"the {len(samplers)} batch_samplers differ from toolkit's {len(toolkit_samplers)} SSD "
                       "samplers (whole image; min Jaccard 0.1/0.3/0.5/0.7/0.9; max Jaccard 1; scale [0.3, 1], "
                       "aspect [0.5, 2], 50 trials, one sample each): see the JSON")
    if not aug["mirror"]:
        out.append("mirror is off: toolkit.train always mirrors with probability 0.5")
    if resize is not None:
        if resize["resize_mode"] != "WARP" or resize["prob"] != 1:
            out.append(f"resize_mode {resize['resize_mode']} (prob {resize['prob']:g}): toolkit.train warps "
                       "every image")
        if resize["interp_mode"] and resize["interp_mode"] != list(INTERPOLATIONS) and not light:
            out.append(f"interp_mode {resize['interp_mode']}: toolkit draws from {list(INTERPOLATIONS)}")
    if aug["emit_constraint"] and aug["emit_constraint"]["emit_type"] != "CENTER":
        out.append(f"emit_type {aug['emit_constraint']['emit_type']}: toolkit keeps boxes by their centre")
    if aug["noise"]:
        out.append("noise_param: toolkit.train adds no noise")
    if aug["mean_file"]:
        out.append(f"mean_file {aug['mean_file']!r}: toolkit subtracts a per-channel mean")
    if aug["crop_size"]:
        out.append(f"crop_size {aug['crop_size']}: toolkit.train does not crop to a fixed size")
    if model is not None:
        preset_name = INPUTS[model].preprocess
        preset = PREPROCESS_PRESETS[preset_name]
        mean = aug["mean_value"] * 3 if len(aug["mean_value"]) == 1 else aug["mean_value"]
        if mean and [f32(v) for v in preset.mean_bgr] != mean:
            out.append(f"mean_value {mean}: the {model} preset subtracts {list(preset.mean_bgr)}")
        if f32(preset.scale) != aug["scale"]:
            given = f"{aug['scale']:g}" if t.HasField("scale") else "1 (unset)"
            out.append(f"transform_param scale {given}, but the {model} preset ('{preset_name}') scales by "
                       f"{preset.scale:g}; toolkit.train has no flag for the input scale")


def _priors(layers, model: Optional[str], num_classes: int, recipe: Recipe) -> None:
    specs = []
    for layer in layers:
        if layer.type != "PriorBox":
            continue
        try:
            spec = PriorBoxSpec.from_caffe(layer.prior_box_param)
        except ValueError as exc:
            recipe.not_expressible.append(f"PriorBox {layer.name!r}: {exc} (Caffe refuses it too)")
            recipe.priors.append({"layer": layer.name, "bottoms": list(layer.bottom), "spec": None})
            continue
        specs.append((layer.name, spec))
        recipe.priors.append({"layer": layer.name, "bottoms": list(layer.bottom), "spec": _clean(spec),
                              "num_priors_per_cell": spec.num_priors})
    if model is None or not recipe.priors:
        return
    import torch

    from toolkit.models.build import build_model

    with torch.device("meta"):  # shapes only: no weights are allocated
        model_specs = build_model(model, num_classes).prior_generator.specs
    ours = [_clean(s) for s in model_specs]
    theirs = [p["spec"] for p in recipe.priors]
    if ours == theirs:
        recipe.notes.append(f"the {len(theirs)} PriorBox layers equal the {model} model's priors")
        return
    if len(ours) != len(theirs):
        recipe.not_expressible.append(f"{len(theirs)} PriorBox layers, the {model} model has {len(ours)} "
                                      "prior maps (fixed by --model)")
        return
    for p, mine in zip(recipe.priors, ours):
        if p["spec"] != mine:
            diff = [f"{k} {p['spec'][k]} (model {mine[k]})" for k in mine if p["spec"] and p["spec"][k] != mine[k]]
            recipe.not_expressible.append(f"PriorBox {p['layer']!r} differs from the {model} model's priors "
                                          f"(fixed by --model): {', '.join(diff)}")


def _loss(layers, dataset: Optional[str], recipe: Recipe) -> int:
    """Reads the MultiBoxLoss layer; returns its number of classes (21 when there is none)."""
    losses = [layer for layer in layers if layer.type == "MultiBoxLoss"]
    if not losses:
        recipe.not_expressible.append("no MultiBoxLoss layer in the train net: toolkit.train trains with "
                                      "MultiBoxLoss")
        return 21
    layer = losses[0]
    try:
        params = MultiBoxLossParams.from_caffe(layer.multibox_loss_param, layer.loss_param)
    except ValueError as exc:
        recipe.not_expressible.append(f"MultiBoxLoss {layer.name!r}: {exc}")
        return int(layer.multibox_loss_param.num_classes) or 21
    weight = f32(layer.loss_weight[0]) if len(layer.loss_weight) else 1.0
    recipe.loss = {"layer": layer.name, "loss_weight": weight, **_clean(params)}
    # toolkit.train builds MultiBoxLoss(MultiBoxLossParams(num_classes=<dataset classes>)).
    default = _clean(MultiBoxLossParams(num_classes=params.num_classes))
    mine = _clean(params)
    diff = [f"{k} {mine[k]} (toolkit.train: {default[k]})" for k in default if mine[k] != default[k]]
    if diff:
        recipe.not_expressible.append(f"MultiBoxLoss settings toolkit.train does not take: {', '.join(diff)}")
    if weight != 1:
        recipe.not_expressible.append(f"loss_weight {weight:g}: toolkit.train weights the loss by 1")
    if dataset is not None:
        expected = _NUM_CLASSES.get(DATASETS[dataset].kind)
        if expected is not None and expected != params.num_classes:
            recipe.not_expressible.append(f"num_classes {params.num_classes}, but {dataset} has {expected} "
                                          "(with the background)")
    return params.num_classes


def _multipliers(layers, recipe: Recipe) -> None:
    """Per-blob lr_mult / decay_mult other than 1 (BatchNorm's are its statistics, buffers in toolkit)."""
    groups: dict[tuple[float, float], list[str]] = {}
    for layer in layers:
        if layer.type == "BatchNorm":
            continue
        for i, p in enumerate(layer.param):
            key = (f32(p.lr_mult), f32(p.decay_mult))
            if key != (1.0, 1.0):
                groups.setdefault(key, []).append(f"{layer.name}/{i}")
    for (lr, decay), blobs in groups.items():
        shown = ", ".join(blobs[:3]) + (", ..." if len(blobs) > 3 else "")
        recipe.not_expressible.append(f"lr_mult {lr:g} / decay_mult {decay:g} on {len(blobs)} blobs ({shown}): "
                                      "toolkit.train applies --lr and --weight-decay to every parameter")


def _train_net(net: caffe_pb2.NetParameter, path: Optional[Path], solver, solver_path: Path, recipe: Recipe) -> None:
    layers = [layer for layer in modern_layers(net) if layer_included(layer, "TRAIN")]
    recipe.net_name = net.name
    data_layers = [layer for layer in layers if layer.type in DATA_LAYERS]
    source, size = "", None
    if data_layers:
        layer = data_layers[0]
        param = getattr(layer, DATA_LAYERS[layer.type])
        source = getattr(param, "source", "")
        recipe.data = {"layer": layer.name, "type": layer.type, "batch_size": int(param.batch_size),
                       "source": source or None,
                       "backend": _enum_name(param, "backend") if layer.type in ("Data", "AnnotatedData") else None,
                       "label_map_file": layer.annotated_data_param.label_map_file or None}
        recipe.train_args["batch_size"] = int(param.batch_size)
        r = layer.transform_param.resize_param
        if layer.transform_param.HasField("resize_param") and r.height and r.width:
            size = (int(r.height), int(r.width))
        if len(data_layers) > 1:
            recipe.notes.append(f"{len(data_layers)} data layers; read {layer.name!r}")
    else:
        recipe.not_expressible.append("no data layer in the TRAIN phase: the batch size is unknown")
    texts = [net.name, solver.snapshot_prefix, solver.train_net or solver.net, path.name if path else "",
             solver_path.name]
    model = _guess_model([t for t in texts if t], size, recipe)
    dataset = _guess_dataset(source, [t for t in texts if t], recipe) if data_layers else None
    if model:
        recipe.train_args["model"] = model
    if dataset:
        recipe.train_args["dataset"] = dataset
    if data_layers:
        _augmentation(data_layers[0], model, recipe)
    num_classes = _loss(layers, dataset, recipe)
    _priors(layers, model, num_classes, recipe)
    _multipliers(layers, recipe)


def read_recipe(solver_path: PathLike, train_path: Optional[PathLike] = None) -> Recipe:
    """Read a Caffe solver (and its train net) as a :class:`Recipe`.

    Args:
        solver_path: a ``SolverParameter`` prototxt.
        train_path: the train net; default: the solver's inline net, or the file
            its ``train_net`` / ``net`` names (relative to the solver, to the
            working folder, or by file name beside the solver).
    Raises:
        CaffeConversionError: a file that is missing, not text, has a syntax
            error (``file:line:column``), or is not a solver / net.
    """
    solver_path = Path(solver_path)
    recipe = Recipe(str(solver_path), None)
    solver = _read_solver(solver_path, recipe)
    if train_path is not None:
        path, inline = Path(train_path), None
    else:
        path, inline = _find_train_net(solver_path, solver, recipe)
    net = _read_train_net(path, recipe) if path is not None else inline
    recipe.train_net_path = str(path) if path is not None else None
    _schedule(solver, recipe)
    if net is not None:
        _train_net(net, path, solver, solver_path, recipe)
    recipe.train_args = {k: recipe.train_args[k] for k in FLAGS if k in recipe.train_args}
    if "batch_size" in recipe.train_args:
        recipe.notes.append(f"batch_size {recipe.train_args['batch_size']} is per GPU (Caffe's 'caffe train "
                            "--gpu' multiplies it by the GPUs): for N GPUs run under torchrun --nproc_per_node N, "
                            "or multiply --accum by N")
    return recipe


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def default_recipe_path(solver_path: PathLike) -> Path:
    """``<solver stem>.recipe.json`` beside the solver."""
    solver_path = Path(solver_path)
    return solver_path.with_name(f"{solver_path.stem}.recipe.json")


def write_recipe(recipe: Recipe, path: PathLike) -> None:
    """Write :meth:`Recipe.to_json` to ``path`` (atomically)."""
    text = json.dumps(recipe.to_json(), indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _prior_summary(p: dict) -> str:
    s = p["spec"]
    if s is None:
        return f"{p['layer']} (invalid)"
    parts = [f"min {'/'.join(f'{v:g}' for v in s['min_sizes'])}"]
    if s["max_sizes"]:
        parts.append(f"max {'/'.join(f'{v:g}' for v in s['max_sizes'])}")
    if s["aspect_ratios"]:
        parts.append(f"ar {'/'.join(f'{v:g}' for v in s['aspect_ratios'])}" + (" flip" if s["flip"] else ""))
    if s["step"] is not None:
        parts.append(f"step {s['step']:g}")
    return f"{p['layer']} ({', '.join(parts)})"


def format_recipe(recipe: Recipe) -> str:
    """The report ``recipe`` prints: the command, a summary, what cannot be expressed, notes."""
    a, s = recipe.train_args, recipe.solver
    lines = [f"recipe: {recipe.solver_path}" + (f" + {recipe.train_net_path}" if recipe.train_net_path else "")
             + (f" (net {recipe.net_name!r})" if recipe.net_name else ""), "", recipe.command_line(), ""]
    steps = a.get("steps") or []
    lr = f"lr {_num(s['base_lr'])}" + (f", x{_num(a['gamma'])} at {' '.join(map(str, steps))}" if steps else "")
    lines.append(f"schedule:  {s['type']}, lr_policy {s['lr_policy'] or '-'}: {lr}; {s['max_iter']} iterations, "
                 f"momentum {_num(s['momentum'])}, weight decay {_num(s['weight_decay'])}")
    if recipe.data:
        d = recipe.data
        lines.append(f"batch:     {d['batch_size']} images x iter_size {s['iter_size']} per step "
                     f"({d['type']} {d['layer']!r}, source {d['source']})")
    if recipe.augmentation:
        g = recipe.augmentation
        parts = []
        if g["resize"]:
            parts.append(f"{g['resize']['resize_mode'].lower()} {g['resize']['height']}x{g['resize']['width']}")
        parts += ["mirror"] if g["mirror"] else []
        parts += ["distort"] if g["distort"] else []
        parts += [f"expand x{g['expand']['max_expand_ratio']:g} (p {g['expand']['prob']:g})"] if g["expand"] else []
        parts.append(f"{len(g['batch_samplers'])} batch samplers")
        parts.append(f"mean {' '.join(f'{v:g}' for v in g['mean_value']) or '-'}, scale {g['scale']:g}")
        lines.append(f"augment:   {', '.join(parts)}")
    if recipe.priors:
        lines.append(f"priors:    {len(recipe.priors)} PriorBox layers: "
                     + "; ".join(_prior_summary(p) for p in recipe.priors))
    if recipe.loss:
        x = recipe.loss
        lines.append(f"loss:      MultiBoxLoss {x['num_classes']} classes, {x['loc_loss_type']}, {x['match_type']} "
                     f"{x['overlap_threshold']:g}, {x['mining_type']} {x['neg_pos_ratio']:g}:1, {x['code_type']}, "
                     f"{x['normalization']}")
    lines.append("")
    if recipe.not_expressible:
        lines.append("cannot be expressed with toolkit.train's flags:")
        lines += [f"  - {m}" for m in recipe.not_expressible]
    else:
        lines.append("everything read is expressed by the command")
    if recipe.notes:
        lines.append("notes:")
        lines += [f"  - {m}" for m in recipe.notes]
    return "\n".join(lines)


__all__ = ["RECIPE_FORMAT", "Recipe", "default_recipe_path", "format_recipe", "read_recipe", "write_recipe"]
