"""The work behind ``python -m converters.caffe convert | run | verify`` (``recipe``: :mod:`converters.caffe.recipe`).

Each command is a function of paths and options that returns what there is to
report; :mod:`converters.caffe.__main__` parses the command line and prints.
Every bad input is a :class:`CaffeConversionError` whose message names the file
(and the layer where one is at fault); :func:`one_line` folds a multi-problem
message into the single ``error: ...`` line the command line prints.

Arrays in and out are ``.npz`` archives keyed by Caffe blob name, float32, in
Caffe's shapes (NCHW; image inputs BGR), as the fixtures under
``shared/fixtures/caffe`` hold them.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from converters.caffe.optimize import OptimizedCaffeNet, optimize_for_inference
from toolkit.caffe import CaffeFormatError, CaffemodelLayers, caffe_pb2, read_prototxt
from toolkit.caffe.errors import CaffeConversionError
from toolkit.caffe.net import CaffeNet, layer_included, modern_layers

PathLike = str | os.PathLike

# torch.save writes a zip archive; a caffemodel is a bare protobuf and never starts with these bytes.
_ZIP_MAGIC = b"PK\x03\x04"


# ---------------------------------------------------------------------------
# Small helpers: messages, files
# ---------------------------------------------------------------------------


def one_line(message: str) -> str:
    """A multi-line error message (one problem per indented line) as one line: ``head: a; b; c``."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return ""
    out = lines[0]
    for line in lines[1:]:
        out += (" " if out.endswith(":") else "; ") + line
    return out


def atomic_write(path: PathLike, write: Callable, error: type[Exception] = CaffeConversionError) -> int:
    """Write ``path`` through ``write(binary file)`` into a temporary file beside it, then rename.

    A failed or interrupted write leaves any previous file untouched and no
    partial one.  Returns the size written, in bytes.

    Raises:
        error (default CaffeConversionError): the folder does not exist or is not writable.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise error(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def write_npz(path: PathLike, arrays: Mapping[str, np.ndarray]) -> int:
    """Write ``arrays`` as an uncompressed ``.npz`` (what ``np.savez`` writes, atomically).

    Written member by member so that any blob name works as a key (``np.savez``
    reserves ``file`` and ``allow_pickle``).  Returns the size in bytes.
    """
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, array in arrays.items():
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(array, order="C"), allow_pickle=False)

    return atomic_write(path, write)


def read_npz(path: PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive, by key, as float32 (Caffe's blob type).

    Raises:
        CaffeConversionError: the file is missing, not an ``.npz`` (a single
            ``.npy`` array included), or holds an array that is not numeric.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise CaffeConversionError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if head.startswith(b"\x93NUMPY"):
        raise CaffeConversionError(f"{path}: a single .npy array; give an .npz with one array per blob, "
                                   "keyed by blob name")
    if not head.startswith(_ZIP_MAGIC[:2]):
        raise CaffeConversionError(f"{path}: not an .npz archive (an .npz is a zip of .npy arrays, this file "
                                   "does not start like one)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except OSError as exc:
        raise CaffeConversionError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # numpy raises ValueError, BadZipFile, EOFError ... for files of another kind
        raise CaffeConversionError(f"{path}: not an .npz archive of arrays ({exc})") from None
    if isinstance(loaded, np.ndarray):
        raise CaffeConversionError(f"{path}: a single .npy array; give an .npz with one array per blob, "
                                   "keyed by blob name")
    arrays = {}
    with loaded:
        try:
            for key in loaded.files:
                array = loaded[key]
                if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
                    raise CaffeConversionError(f"{path}: array {key!r} has dtype {array.dtype}, not numbers")
                arrays[key] = np.asarray(array, dtype=np.float32)
        except CaffeConversionError:
            raise
        except Exception as exc:
            raise CaffeConversionError(f"{path}: a damaged .npz archive ({exc})") from None
    return arrays


def _shape(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


# ---------------------------------------------------------------------------
# Loading a net
# ---------------------------------------------------------------------------


def read_definition(prototxt: PathLike) -> caffe_pb2.NetParameter:
    """The net definition (text prototxt, modern or V1).

    Raises:
        CaffeConversionError: unreadable, binary, or a syntax error (``file:line:column: reason``).
    """
    try:
        return read_prototxt(prototxt)
    except CaffeFormatError as exc:
        raise CaffeConversionError(f"cannot read the net definition: {exc}") from None


def net_input_names(net: caffe_pb2.NetParameter, phase: str = "TEST") -> list[str]:
    """The input blobs (tops of ``Input`` layers and net-level ``input`` fields) of the layers active in ``phase``."""
    return [top for layer in modern_layers(net) if layer.type == "Input" and layer_included(layer, phase)
            for top in layer.top]


def is_zip_file(path: PathLike) -> bool:
    """Whether ``path`` starts like a zip archive (what ``torch.save`` writes; a caffemodel never does)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == _ZIP_MAGIC
    except OSError:
        return False  # CaffemodelLayers reports it


def read_converted_checkpoint(path: PathLike) -> dict:
    """A checkpoint written by :func:`convert` (``torch.load(weights_only=True)``).

    Raises:
        CaffeConversionError: unreadable, or a PyTorch file of another kind.
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CaffeConversionError(f"{path}: neither a .caffemodel nor a checkpoint written by "
                                   f"'python -m converters.caffe convert' ({one_line(str(exc))[:200]})") from None
    from toolkit.caffe.net import CHECKPOINT_FORMAT

    if not isinstance(checkpoint, Mapping) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CaffeConversionError(f"{path}: a PyTorch file, but not a checkpoint written by "
                                   "'python -m converters.caffe convert'")
    return checkpoint


def _load_state(net: CaffeNet, state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    own = net.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshapen = [f"{k} {_shape(state_dict[k].shape)} vs {_shape(own[k].shape)}" for k in own
                 if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    problems = []
    for what, keys in (("missing", missing), ("not in the net", unexpected), ("wrong shape", misshapen)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} tensors {what}: {shown}")
    if problems:
        raise CaffeConversionError(f"{where}: the checkpoint does not fit the net: " + "; ".join(problems))
    net.load_state_dict(state_dict, strict=True)


def load_net(
    prototxt: PathLike,
    weights: Optional[PathLike] = None,
    *,
    phase: str = "TEST",
    input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    strict: bool = False,
    definition: Optional[caffe_pb2.NetParameter] = None,
    checkpoint: Optional[Mapping] = None,
) -> CaffeNet:
    """A :class:`CaffeNet` from a prototxt and optional weights.

    Args:
        prototxt: the net definition.
        weights: a ``.caffemodel``, or a checkpoint written by :func:`convert`
            (recognised by content); None: every blob from the prototxt's fillers.
        phase: ``"TEST"`` or ``"TRAIN"`` (layer selection, BatchNorm statistics).
        input_shapes: shapes of input blobs overriding the declared ones.
        strict: a caffemodel layer with blobs that the net lacks is an error;
            by default it is ignored, as Caffe's ``CopyTrainedLayersFrom`` does,
            and listed in the net's ``ignored_weights``.
        definition: the already parsed prototxt (read from ``prototxt`` when None).
        checkpoint: ``weights`` already read by :func:`read_converted_checkpoint`.
    Raises:
        CaffeConversionError: naming the files (and the layers at fault).
    """
    net_param = definition if definition is not None else read_definition(prototxt)
    files = str(prototxt) + (f" + {weights}" if weights is not None else "")
    weights_param, state_dict = None, None
    if checkpoint is not None:
        state_dict = checkpoint["state_dict"]
    elif weights is not None:
        weights = Path(weights)
        if is_zip_file(weights):
            state_dict = read_converted_checkpoint(weights)["state_dict"]
        else:
            try:
                weights_param = CaffemodelLayers(weights)  # decoded layer by layer: big files fit
            except CaffeFormatError as exc:
                raise CaffeConversionError(f"cannot read the weights: {exc}") from None
    try:
        net = CaffeNet(net_param, weights_param, phase=phase, input_shapes=input_shapes, strict=strict,
                       _init_blobs=state_dict is None)
    except CaffeConversionError as exc:
        raise CaffeConversionError(f"{files}: {exc}") from None
    except CaffeFormatError as exc:  # a layer of the caffemodel that does not decode
        raise CaffeConversionError(f"cannot read the weights: {exc}") from None
    finally:
        del weights_param
    if state_dict is not None:
        _load_state(net, state_dict, files)
    return net


def _ignored_weights(net: CaffeNet, weights) -> list[str]:
    if not net.ignored_weights:
        return []
    return [f"{weights}: layers with blobs that the net lacks, ignored as Caffe does: {list(net.ignored_weights)}"]


def caffe_blobs(net: CaffeNet) -> dict[str, list[torch.Tensor]]:
    """``{Caffe layer name: [its blobs in Caffe's order and shapes]}`` for every layer with blobs.

    The tensors share storage with ``net.state_dict()`` (so ``torch.save`` of
    both stores the values once).  BatchNorm's are ``[mean * f, var * f, [f]]``
    as Caffe stores them; layers sharing a ``param`` name list the same tensor.
    """
    out = {}
    for spec in net.layer_specs:
        blobs = net.layer(spec.name).blobs()
        if blobs:
            out[spec.name] = [b.detach() for b in blobs]
    return out


def _count_values(tensors) -> tuple[int, int]:
    """(stored values, tensors), each storage counted once."""
    seen, values = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            values += t.numel()
    return values, len(seen)


# ---------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------


@dataclass
class ConvertResult:
    """What :func:`convert` wrote."""

    net: CaffeNet
    path: Path
    size_bytes: int
    n_layers: int
    n_layers_with_blobs: int
    n_values: int
    n_blobs: int
    warnings: list[str] = field(default_factory=list)


def convert(prototxt: PathLike, weights: PathLike, out: PathLike, *, phase: str = "TEST",
            strict: bool = False, extra: Optional[Mapping] = None) -> ConvertResult:
    """Convert a prototxt + caffemodel into a PyTorch checkpoint at ``out`` (written atomically).

    The file is :meth:`CaffeNet.checkpoint` (prototxt text, net state, input
    shapes, ``state_dict``; ``CaffeNet.from_checkpoint(torch.load(out,
    weights_only=True))`` rebuilds the net) plus:

    * ``"caffe_blobs"``: ``{Caffe layer name: [tensors in Caffe blob order]}``,
      the same tensors as the state dict (stored once), for
      ``toolkit.models.caffe_import.load_caffe_blobs`` and other readers that
      match Caffe layer names;
    * ``"source"``: the paths converted from;
    * ``extra``: further entries (``detect``'s ``"preprocessing"`` and ``"classes"``,
      :func:`converters.caffe.detect.convert_metadata`).

    Raises:
        CaffeConversionError: see :func:`load_net`; ``out`` not writable.
    """
    net = load_net(prototxt, weights, phase=phase, strict=strict)
    checkpoint = net.checkpoint()
    checkpoint["caffe_blobs"] = caffe_blobs(net)
    checkpoint["source"] = {"prototxt": str(prototxt), "caffemodel": str(weights)}
    checkpoint.update(extra or {})
    size = atomic_write(out, lambda f: torch.save(checkpoint, f))
    n_values, n_blobs = _count_values(t for blobs in checkpoint["caffe_blobs"].values() for t in blobs)
    return ConvertResult(net, Path(out), size, len(net.layer_specs), len(checkpoint["caffe_blobs"]), n_values,
                         n_blobs, _ignored_weights(net, weights))


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------


@dataclass
class RunResult:
    """What :func:`run` computed and wrote."""

    net: CaffeNet
    path: Path
    arrays: dict[str, np.ndarray]
    inputs: dict[str, tuple[int, ...]]
    loss: Optional[float] = None
    warnings: list[str] = field(default_factory=list)
    optimized: Optional[dict[str, int]] = None  # with fast=True: OptimizedCaffeNet.summary


def _split_arrays(arrays: Mapping[str, np.ndarray], input_names: Sequence[str]):
    given = {k: v for k, v in arrays.items() if k in input_names}
    others = [k for k in arrays if k not in input_names]
    return given, others


def _missing_inputs_error(path, missing, input_names, arrays) -> CaffeConversionError:
    return CaffeConversionError(f"{path}: no array for net input(s) {missing} (the net takes {list(input_names)}; "
                                f"the file holds {list(arrays)})")


def _declared_input_shapes(definition: caffe_pb2.NetParameter, phase: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for layer in modern_layers(definition):
        if layer.type == "Input" and layer_included(layer, phase):
            declared = [tuple(int(d) for d in s.dim) for s in layer.input_param.shape]
            if len(declared) == 1:
                declared = declared * len(layer.top)
            shapes.update(zip(layer.top, declared))
    return shapes


def _prepare(prototxt, weights, arrays_path, arrays, phase, all_inputs: bool):
    """Read the definition, pick the input arrays (all of them needed when ``all_inputs``), build the net at
    their shapes; returns ``(net, input arrays, names of the other arrays)``."""
    definition = read_definition(prototxt)
    input_names = net_input_names(definition, phase)
    given, others = _split_arrays(arrays, input_names)
    missing = [k for k in input_names if k not in given]
    if all_inputs and missing:
        raise _missing_inputs_error(arrays_path, missing, input_names, arrays)
    shapes = {k: v.shape for k, v in given.items()}
    try:
        net = load_net(prototxt, weights, phase=phase, input_shapes=shapes, definition=definition)
    except CaffeConversionError as exc:
        declared = _declared_input_shapes(definition, phase)
        differ = [f"{k} {_shape(s)} (the prototxt declares {_shape(declared[k])})" for k, s in shapes.items()
                  if k in declared and tuple(declared[k]) != tuple(s)]
        if differ:
            try:  # does the net build at its declared shapes?  Then the input shapes are the cause.
                load_net(prototxt, weights, phase=phase, definition=definition)
            except CaffeConversionError:
                raise exc from None
            raise CaffeConversionError(f"{exc} [with the input shapes of {arrays_path}: {', '.join(differ)}]") \
                from None
        raise
    return net, given, others


def _check_inputs(net: CaffeNet, blobs: Optional[Sequence[str]], given, prototxt, arrays_path, arrays) -> None:
    """The blobs asked for exist, and the inputs they depend on are given."""
    if blobs is None:
        needed = list(net.input_names)
    else:
        unknown = [b for b in blobs if b not in net.blob_shapes]
        if unknown:
            raise CaffeConversionError(f"{prototxt}: the {net.phase} net has no blob(s) {unknown}")
        _, depends = net._plan(list(blobs))
        needed = [k for k in net.input_names if k in depends]
    missing = [k for k in needed if k not in given]
    if missing:
        raise _missing_inputs_error(arrays_path, missing, net.input_names, arrays)


def _forward(net: CaffeNet | OptimizedCaffeNet, inputs: Mapping[str, torch.Tensor], blobs,
             where: str) -> dict[str, torch.Tensor]:
    """``net(inputs, blobs=blobs)`` (an OptimizedCaffeNet computes the blobs it was built for), with every
    failure as a CaffeConversionError naming ``where``."""
    try:
        return net(inputs) if isinstance(net, OptimizedCaffeNet) else net(inputs, blobs=blobs)
    except CaffeConversionError as exc:
        raise CaffeConversionError(f"{where}: {exc}") from None
    except (RuntimeError, ValueError, IndexError) as exc:
        notes = "; ".join(getattr(exc, "__notes__", []))
        raise CaffeConversionError(f"{where}: {notes + ': ' if notes else ''}{one_line(str(exc))}") from None


def _top_blobs(net: CaffeNet) -> list[str]:
    """Every top of every non-Input layer, once, in layer order."""
    out: dict[str, None] = {}
    for spec in net.layer_specs:
        if spec.type != "Input":
            out.update(dict.fromkeys(spec.tops))
    return list(out)


def run(
    prototxt: PathLike,
    weights: Optional[PathLike],
    inputs: PathLike,
    out: PathLike,
    *,
    blobs: Optional[Sequence[str]] = None,
    backward: bool = False,
    phase: Optional[str] = None,
    fast: bool = False,
) -> RunResult:
    """One forward pass (and optionally backward) of a net on the arrays of ``inputs``; writes ``out``.

    Args:
        prototxt, weights: the net (weights as in :func:`load_net`; None: the
            prototxt's fillers, so the values are random).
        inputs: ``.npz`` with one array per net input, keyed by input name and
            in Caffe's layout; the net is sized from these shapes.  Arrays that
            are not inputs are ignored (a warning lists them).
        out: the ``.npz`` to write: every top blob of every non-Input layer
            (each blob's final value when layers write it in place), or just
            ``blobs``; float32, keyed by blob name.
        blobs: the blobs to write; only the layers they need run.
        backward: also write ``<input>_grad``, the gradient w.r.t. each input of
            the net's loss, ``sum(loss_weight * sum(top))`` over the tops with a
            loss weight (``loss_weight``, or 1 for the first top of a ``*Loss``
            layer), as Caffe's ``Net::Backward`` computes it.  Inputs the loss
            does not depend on get zeros.
        phase: ``"TEST"`` or ``"TRAIN"``; None: TEST, except that ``backward``
            on a net whose loss layers are all TRAIN-only (SSD's MultiBoxLoss)
            runs the TRAIN net (a warning says so).
        fast: run an :class:`~converters.caffe.optimize.OptimizedCaffeNet`
            built for the blobs written (BatchNorm/Scale folded, fused ReLUs,
            channels_last, ...): the same values up to float rounding, faster
            the fewer blobs are asked for.  TEST phase, no ``backward``.
    Raises:
        CaffeConversionError: bad files, missing inputs, unknown blob names, no
            loss for ``backward``, ``fast`` with ``backward`` or TRAIN, a layer
            that cannot run on the given shapes.
    """
    auto_phase = phase is None
    phase = phase or "TEST"
    if fast and (backward or phase != "TEST"):
        raise CaffeConversionError("--fast runs a TEST-phase net forward only (no --backward, no --phase TRAIN)")
    arrays = read_npz(inputs)
    blobs = list(dict.fromkeys(blobs)) if blobs else None
    net, given, others = _prepare(prototxt, weights, inputs, arrays, phase, all_inputs=blobs is None)
    loss_tops = dict(net.loss_weights) if backward else {}
    phase_note = None
    if backward and not loss_tops and auto_phase:
        definition = read_definition(prototxt)
        if any(layer_included(layer, "TRAIN") and not layer_included(layer, "TEST")
               for layer in modern_layers(definition)):
            net, given, others = _prepare(prototxt, weights, inputs, arrays, "TRAIN", all_inputs=blobs is None)
            loss_tops = dict(net.loss_weights)
            phase = "TRAIN"
            phase_note = (f"{prototxt}: the TEST net has no loss; --backward runs the TRAIN net "
                          f"(give --phase to choose)")
    if backward and not loss_tops:
        hint = " (loss layers are often TRAIN-only: try --phase TRAIN)" if phase == "TEST" else ""
        raise CaffeConversionError(f"{prototxt}: --backward needs a loss, and no top of the {phase} net has a "
                                   f"loss weight{hint}")
    computed = None if blobs is None else blobs + [t for t in loss_tops if t not in blobs]
    _check_inputs(net, computed, given, prototxt, inputs, arrays)
    warnings = _ignored_weights(net, weights)
    if phase_note:
        warnings.append(phase_note)
    if others:
        warnings.append(f"{inputs}: arrays that are not inputs of the net, ignored: {others}")
    names = blobs if blobs is not None else _top_blobs(net)
    tensors = {k: torch.from_numpy(v) for k, v in given.items()}
    loss_value = None
    if backward:
        for p in net.parameters():
            p.requires_grad_(False)
        for t in tensors.values():
            t.requires_grad_(True)
        values = _forward(net, tensors, computed, str(prototxt))
        # net.cpp Backward: each loss top contributes loss_weight * sum(top) to the objective.
        total = sum(w * values[t].sum() for t, w in loss_tops.items())
        loss_value = float(total.detach())
        if total.requires_grad:
            total.backward()
    elif fast:
        optimized = optimize_for_inference(net, names)
        values = _forward(optimized, tensors, None, str(prototxt))
    else:
        with torch.no_grad():
            values = _forward(net, tensors, computed, str(prototxt))
    result = {name: values[name].detach().cpu().numpy().astype(np.float32, copy=False) for name in names}
    if backward:
        for k, t in tensors.items():
            key = f"{k}_grad"
            if key in result:
                warnings.append(f"blob {key!r} is replaced by the gradient of input {k!r} in {out}")
            grad = t.grad if t.grad is not None else torch.zeros_like(t)
            result[key] = grad.detach().numpy().astype(np.float32, copy=False)
    write_npz(out, result)
    return RunResult(net, Path(out), result, {k: tuple(v.shape) for k, v in given.items()}, loss_value, warnings,
                     optimized.summary if fast else None)


# ---------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------


@dataclass
class BlobCheck:
    """One row of :func:`verify`'s table.

    ``max_rel`` is over the elements whose reference is non-zero (``inf`` when
    a zero reference element differs); None where nothing was compared.
    """

    blob: str
    shape: Optional[tuple[int, ...]]
    max_abs: Optional[float]
    max_rel: Optional[float]
    passed: bool
    note: str = ""


@dataclass
class VerifyResult:
    """:func:`verify`'s rows, the inputs it fed and the tolerance it applied."""

    net: CaffeNet
    rows: list[BlobCheck]
    inputs: dict[str, tuple[int, ...]]
    rtol: float
    atol: float
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)


def compare_blob(ours: np.ndarray, reference: np.ndarray, rtol: float, atol: float) -> tuple[float, float, bool]:
    """``(max |ours - ref|, max relative difference, all |ours - ref| <= atol + rtol * |ref|)``.

    NaN equals NaN; a NaN against a number is an infinite difference.
    """
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    diff = np.abs(a - b)
    both_nan = np.isnan(a) & np.isnan(b)
    diff[both_nan] = 0.0
    diff[np.isnan(diff)] = np.inf
    magnitude = np.abs(b)
    nonzero = magnitude > 0
    max_abs = float(diff.max(initial=0.0))
    max_rel = float((diff[nonzero] / magnitude[nonzero]).max(initial=0.0))
    if (diff[~nonzero & ~both_nan] > 0).any():
        max_rel = float("inf")
    passed = bool((diff <= atol + rtol * np.nan_to_num(magnitude, nan=0.0)).all())
    return max_abs, max_rel, passed


def _caffe_split_sources(net: CaffeNet) -> dict[str, str]:
    """Prefixes of the names Caffe gives its auto-inserted Split tops
    (``insert_splits.cpp``: ``<blob>_<producer layer>_<top index>_split_<k>``) -> the blob."""
    return {f"{t}_{s.name}_{i}_split_": t for s in net.layer_specs for i, t in enumerate(s.tops)}


def verify(
    prototxt: PathLike,
    weights: Optional[PathLike],
    reference: PathLike,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    phase: str = "TEST",
) -> VerifyResult:
    """Run the net on the inputs stored in ``reference`` and compare every other stored blob.

    The arrays of ``reference`` named like net inputs are fed; every other array
    is a reference blob.  A blob passes when ``|ours - ref| <= atol + rtol *
    |ref|`` elementwise (shapes equal).  Reference blobs the net does not
    produce fail as missing, except Caffe's auto-inserted Split copies
    (``<blob>_<layer>_<i>_split_<k>``, in dumps of ``net.blobs``), which are
    compared with the blob they copy.

    Raises:
        CaffeConversionError: bad files, or the reference lacks a net input.
    """
    arrays = read_npz(reference)
    net, given, _ = _prepare(prototxt, weights, reference, arrays, phase, all_inputs=True)
    splits = _caffe_split_sources(net)
    sources: dict[str, Optional[str]] = {}
    for key in arrays:
        if key in given:
            continue
        if key in net.blob_shapes:
            sources[key] = key
            continue
        m = re.fullmatch(r"(.*_split_)\d+", key)
        sources[key] = splits.get(m.group(1)) if m else None
    wanted = list(dict.fromkeys(s for s in sources.values() if s is not None))
    with torch.no_grad():
        values = _forward(net, {k: torch.from_numpy(v) for k, v in given.items()}, wanted, str(prototxt))
    rows = []
    for key, source in sources.items():
        ref = arrays[key]
        if source is None:
            rows.append(BlobCheck(key, tuple(ref.shape), None, None, False, "not produced by the net"))
            continue
        ours = values[source].detach().cpu().numpy()
        note = "" if source == key else f"Caffe's split copy of {source}"
        if ours.shape != ref.shape:
            rows.append(BlobCheck(key, tuple(ref.shape), None, None, False,
                                  f"shape {_shape(ours.shape)}, the reference has {_shape(ref.shape)}"))
            continue
        max_abs, max_rel, passed = compare_blob(ours, ref, rtol, atol)
        rows.append(BlobCheck(key, tuple(ref.shape), max_abs, max_rel, passed, note))
    warnings = _ignored_weights(net, weights) + ([] if rows else [f"{reference}: holds only net inputs, nothing to "
                                                                   "compare"])
    return VerifyResult(net, rows, {k: tuple(v.shape) for k, v in given.items()}, rtol, atol, warnings)


def format_verify_table(result: VerifyResult) -> str:
    """The per-blob table: blob, shape, max abs diff, max rel diff, pass (``ok`` / ``FAIL``), note."""
    def num(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.3g}"

    header = ("blob", "shape", "max abs diff", "max rel diff", "pass", "")
    body = [(r.blob, _shape(r.shape) if r.shape is not None else "-", num(r.max_abs), num(r.max_rel),
             "ok" if r.passed else "FAIL", r.note) for r in result.rows]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(5)]
    lines = []
    for row in [header] + body:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]),
                 row[3].rjust(widths[3]), row[4].ljust(widths[4])]
        lines.append("  ".join(cells + ([row[5]] if row[5] else [])).rstrip())
    return "\n".join(lines)
