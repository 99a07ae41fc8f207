"""ONNX models into PyTorch through onnx2torch, checked against onnxruntime.

:func:`import_onnx` converts a model (onnx2torch plus :mod:`converters.onnx.ops` for the operations our own
exports use that onnx2torch lacks), runs the ``torch.fx`` module and onnxruntime on the same inputs and refuses
the result when an output differs by more than the tolerance.  :func:`save_imported` writes a checkpoint that
``torch.load(weights_only=True)`` reads (the ONNX model's bytes, its inputs, outputs, metadata and the parity
figures); :func:`load_imported` rebuilds the module from it.

The parity inputs: an input with ``legacy_det.preprocess`` metadata (``python -m toolkit.export``) gets a
rendered ``shapes`` scene preprocessed that way; any other float input gets a fixed standard-normal tensor.  A
dynamic axis is 1 (and 2 for a first axis named like a batch, in a second run); other symbolic sizes must be
given (``sizes``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from toolkit.export import ExportError, max_differences

IMPORT_FORMAT = "legacy-det/onnx/1"
DEFAULT_TOLERANCE = 1e-4
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8}


class OnnxImportError(ValueError):
    """The model cannot be read or converted; the message names the file and what is at fault."""


class UnsupportedOperatorsError(OnnxImportError):
    """onnx2torch has no converter for some node types (all of them are named)."""


class ParityError(OnnxImportError):
    """The converted module does not reproduce onnxruntime (the message names the output)."""


def read_model(path: Path):
    import onnx

    try:
        return onnx.load(str(path))
    except FileNotFoundError:
        raise OnnxImportError(f"{path}: no such file") from None
    except Exception as exc:  # protobuf's DecodeError and friends for a file that is not ONNX
        raise OnnxImportError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def _opsets(model) -> dict[str, int]:
    return {(o.domain or ""): o.version for o in model.opset_import}


def unsupported_node_types(model) -> list[str]:
    """``"Type (opset N)"`` (``"domain.Type (opset N)"`` outside the default domain) of every node type of ``model``
    (nested graphs included) that onnx2torch cannot convert, sorted."""
    from onnx2torch.node_converters.registry import get_converter

    from converters.onnx.ops import register

    register()
    opsets = _opsets(model)
    missing: set[str] = set()

    def visit(graph) -> None:
        for node in graph.node:
            domain = node.domain or ""
            version = opsets.get(domain, opsets.get("", 1))
            try:
                get_converter(node.op_type, version, domain)
            except NotImplementedError:
                missing.add(f"{domain + '.' if domain else ''}{node.op_type} (opset {version})")
            for attribute in node.attribute:
                for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    visit(sub)

    visit(model.graph)
    return sorted(missing)


def normalized_for_onnx2torch(model):
    """A copy of ``model`` with the same meaning in the forms onnx2torch reads.

    - trailing empty optional inputs are dropped (``Clip(x, min, "")`` -> ``Clip(x, min)``: onnx2torch looks the
      empty name up as a constant and fails);
    - an ``Identity`` of an initializer (PyTorch's exporter shares equal weights that way) becomes an initializer
      of its own (onnx2torch reads a convolution's weight from the initializers only);
    - a graph output that is an initializer, a ``Constant`` node's output (the priors) or one output of a node
      with several (``TopK``'s values) goes through an ``Identity`` (onnx2torch cannot return a value no node
      produces, and returns a several-output node's whole tuple).
    """
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        inputs = list(node.input)
        while inputs and inputs[-1] == "":
            inputs.pop()
        if len(inputs) != len(node.input):
            del node.input[:]
            node.input.extend(inputs)
    initializers = {i.name: i for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    kept_nodes = []
    for node in model.graph.node:
        if node.op_type == "Identity" and not node.domain and node.input[0] in initializers \
                and node.output[0] not in outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
            initializers[copy.name] = copy
        else:
            kept_nodes.append(node)
    if len(kept_nodes) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(kept_nodes)
    indirect = {i.name for i in model.graph.initializer}
    indirect |= {n.output[0] for n in model.graph.node if n.op_type == "Constant" and not n.domain}
    indirect |= {o for n in model.graph.node if len(n.output) > 1 for o in n.output}
    for output in model.graph.output:
        if output.name in indirect:
            source = f"{output.name}__value"
            for tensor in model.graph.initializer:
                if tensor.name == output.name:
                    tensor.name = source
            for node in model.graph.node:
                node.output[:] = [source if o == output.name else o for o in node.output]
                node.input[:] = [source if i == output.name else i for i in node.input]
            model.graph.node.append(onnx.helper.make_node("Identity", [source], [output.name]))
    return model


def convert_model(model, source: str = "<model>"):
    """The ``torch.fx.GraphModule`` of an ONNX ``ModelProto`` (eval mode).

    Raises:
        UnsupportedOperatorsError: node types onnx2torch cannot convert (all named, with ``source``).
        OnnxImportError: onnx2torch fails otherwise.
    """
    from onnx2torch import convert

    missing = unsupported_node_types(model)
    if missing:
        raise UnsupportedOperatorsError(f"{source}: onnx2torch cannot convert node types {', '.join(missing)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return convert(normalized_for_onnx2torch(model)).eval()
    except Exception as exc:  # an attribute value or input form a converter refuses
        raise OnnxImportError(f"{source}: onnx2torch failed: {type(exc).__name__}: {exc}") from None


def _parity_inputs(model, session, batch: int, sizes: Mapping[str, int]) -> dict[str, np.ndarray]:
    meta = {p.key: p.value for p in model.metadata_props}
    preprocess = json.loads(meta["legacy_det.preprocess"]) if meta.get("legacy_det.preprocess") else None
    rng = np.random.default_rng(0)
    feeds = {}
    for value in session.get_inputs():
        shape = []
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif dim in sizes:
                shape.append(int(sizes[dim]))
            elif axis == 0:
                shape.append(batch)
            else:
                raise OnnxImportError(f"input {value.name!r}: give the size of its axis {axis} ({dim!r}) "
                                      f"with --size {dim}=N")
        dtype = _NUMPY_TYPES.get(value.type, np.float32)
        if preprocess is not None and len(shape) == 4 and shape[1] == 3 and dtype == np.float32:
            feeds[value.name] = _preprocessed_scene(preprocess, shape)
        elif np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = np.zeros(shape, dtype)
    return feeds


def _preprocessed_scene(preprocess: dict, shape) -> np.ndarray:
    """``toolkit.export``'s parity image (a rendered ``shapes`` scene, and its mirror, alternately) through the
    test transform the file's metadata describes, at the input's size."""
    from toolkit.data.detr_transforms import DETRFixedSizeTransform
    from toolkit.data.transforms import CaffePreprocess, SSDTestTransform
    from toolkit.export import batch_of, no_boxes, parity_image

    n, _, h, w = shape
    if "mean_rgb" in preprocess:  # DETR: ImageNet normalization
        transform = DETRFixedSizeTransform((h, w))
    else:  # Caffe: (x - mean_bgr) * scale, then the channel order
        transform = SSDTestTransform((h, w), CaffePreprocess(tuple(preprocess["mean_bgr"]),
                                                             float(preprocess.get("scale", 1.0)),
                                                             preprocess.get("channel_order", "bgr")))
    return batch_of(transform(parity_image(), no_boxes())[0], n).numpy()


def check_parity(model, module, batch: int, tolerance: float, sizes: Mapping[str, int],
                 session=None) -> dict[str, float]:
    """Max ``|module - onnxruntime|`` per output at ``batch``; raises :class:`ParityError` naming the output."""
    import onnxruntime as ort

    if session is None:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = _parity_inputs(model, session, batch, sizes)
    expected = session.run(None, feeds)
    with torch.no_grad(), warnings.catch_warnings():
        # onnx2torch's Slice indexes with a list, which this torch warns about (the result is checked below).
        warnings.filterwarnings("ignore", "Using a non-tuple sequence", UserWarning)
        got = module(*[torch.from_numpy(v) for v in feeds.values()])
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    names = [o.name for o in session.get_outputs()]
    try:
        return max_differences(names, [g.detach().cpu().numpy() for g in got], expected, tolerance, batch,
                               "the converted module", "onnxruntime")
    except ExportError as exc:
        raise ParityError(str(exc)) from None


@dataclass
class ImportResult:
    module: torch.nn.Module
    model: object  # onnx.ModelProto
    parity: dict[int, dict[str, float]]
    inputs: list[tuple[str, list]] = field(default_factory=list)
    outputs: list[tuple[str, list]] = field(default_factory=list)


def _batch_is_dynamic(model) -> bool:
    dims = [i.type.tensor_type.shape.dim for i in model.graph.input]
    return bool(dims) and all(len(d) and d[0].dim_param for d in dims)


def import_onnx(path: Path, tolerance: float = DEFAULT_TOLERANCE,
                sizes: Optional[Mapping[str, int]] = None) -> ImportResult:
    """Convert ``path`` and check it against onnxruntime at batch 1 (and 2 when every input's first axis is
    dynamic).

    Raises:
        OnnxImportError: unreadable file; :class:`UnsupportedOperatorsError`; :class:`ParityError`.
    """
    model = read_model(path)
    module = convert_model(model, str(path))
    sizes = dict(sizes or {})
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    parity = {1: check_parity(model, module, 1, tolerance, sizes, session)}
    if _batch_is_dynamic(model):
        parity[2] = check_parity(model, module, 2, tolerance, sizes, session)

    def described(values):
        return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    return ImportResult(module, model, parity, described(model.graph.input), described(model.graph.output))


def save_imported(result: ImportResult, out: Path, source: str) -> int:
    """Write :func:`load_imported`'s checkpoint atomically; returns its size in bytes."""
    checkpoint = {
        "format": IMPORT_FORMAT,
        "onnx": result.model.SerializeToString(),
        "inputs": result.inputs,
        "outputs": result.outputs,
        "metadata": {p.key: p.value for p in result.model.metadata_props},
        "parity": {str(k): v for k, v in result.parity.items()},
        "source": source,
    }
    from converters.caffe.cli import atomic_write

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda f: torch.save(checkpoint, f), OnnxImportError)


def load_imported(path: Path) -> torch.nn.Module:
    """The ``torch.fx.GraphModule`` of a :func:`save_imported` checkpoint (``weights_only=True``), in eval mode.

    Raises:
        OnnxImportError: not such a checkpoint.
    """
    import onnx

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != IMPORT_FORMAT:
        raise OnnxImportError(f"{path}: not a checkpoint of python -m converters.onnx import")
    return convert_model(onnx.load_from_string(checkpoint["onnx"]), str(path))
