"""``python -m converters.onnx import``: onnx2torch with our converters and repairs, checked by onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from converters.onnx import UnsupportedOperatorsError, load_imported, unsupported_node_types
from converters.onnx.__main__ import main
from converters.onnx.importer import convert_model

ort = pytest.importorskip("onnxruntime")


def _model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _value(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _both(model, feeds):
    """onnxruntime's outputs and the converted module's, on ``feeds``."""
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    with torch.no_grad():
        got = convert_model(model)(*[torch.from_numpy(v) for v in feeds.values()])
    got = got if isinstance(got, (tuple, list)) else [got]
    return expected, [g.numpy() for g in got]


@pytest.mark.parametrize("reduction", ["none", "add", "max"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_scatter_elements_follows_onnxruntime(axis, reduction):
    rng = np.random.default_rng(axis + 5)
    data = rng.standard_normal((4, 5)).astype(np.float32)
    size = data.shape[axis]
    # Distinct indices along the axis in every line (duplicates are order-dependent without a reduction).
    indices = np.stack([rng.permutation(size)[:3] for _ in range(data.shape[1 - axis % 2])], axis=1 - axis % 2)
    indices[0, 0] -= size  # a negative index, counted from the end
    updates = rng.standard_normal(indices.shape).astype(np.float32)
    model = _model([helper.make_node("ScatterElements", ["d", "i", "u"], ["y"], axis=axis, reduction=reduction)],
                   [_value("d", TensorProto.FLOAT, data.shape), _value("i", TensorProto.INT64, indices.shape),
                    _value("u", TensorProto.FLOAT, updates.shape)], [_value("y", TensorProto.FLOAT, data.shape)],
                   opset=18)
    (expected,), (got,) = _both(model, {"d": data, "i": indices.astype(np.int64), "u": updates})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("align_corners", [0, 1])
def test_grid_sample_follows_onnxruntime(mode, padding_mode, align_corners):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)
    grid = (rng.random((2, 4, 5, 2)) * 2.4 - 1.2).astype(np.float32)  # some points outside [-1, 1]
    model = _model([helper.make_node("GridSample", ["x", "g"], ["y"], mode=mode, padding_mode=padding_mode,
                                     align_corners=align_corners)],
                   [_value("x", TensorProto.FLOAT, x.shape), _value("g", TensorProto.FLOAT, grid.shape)],
                   [_value("y", TensorProto.FLOAT, [2, 3, 4, 5])], opset=16)
    (expected,), (got,) = _both(model, {"x": x, "g": grid})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("reverse", [None, 0, 1])
def test_cumsum_reads_the_specified_default(reverse):
    """onnx2torch 1.5.15 reads an absent ``reverse`` as 1; the specification's default is 0."""
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    attributes = {} if reverse is None else {"reverse": reverse}
    model = _model([helper.make_node("CumSum", ["x", "axis"], ["y"], **attributes)],
                   [_value("x", TensorProto.FLOAT, x.shape)], [_value("y", TensorProto.FLOAT, x.shape)],
                   [helper.make_tensor("axis", TensorProto.INT64, [], [1])])
    (expected,), (got,) = _both(model, {"x": x})
    np.testing.assert_array_equal(got, expected)


def test_outputs_onnx2torch_would_lose():
    """A constant output, TopK's values, an empty trailing optional input (Clip without max)."""
    x = np.array([[0.5, -2.0, 3.0, 1.0]], dtype=np.float32)
    model = _model([helper.make_node("TopK", ["x", "k"], ["values", "indices"]),
                    helper.make_node("Clip", ["x", "low", ""], ["clipped"]),
                    helper.make_node("Constant", [], ["const"], value=helper.make_tensor("c", TensorProto.FLOAT,
                                                                                       [2], [7.0, 8.0]))],
                   [_value("x", TensorProto.FLOAT, [1, 4])],
                   [_value("values", TensorProto.FLOAT, [1, 2]), _value("clipped", TensorProto.FLOAT, [1, 4]),
                    _value("const", TensorProto.FLOAT, [2])],
                   [helper.make_tensor("k", TensorProto.INT64, [1], [2]),
                    helper.make_tensor("low", TensorProto.FLOAT, [], [0.0])])
    expected, got = _both(model, {"x": x})
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)


def test_unsupported_node_types_are_named_in_one_line(tmp_path, capsys):
    model = _model([helper.make_node("Det", ["x"], ["d"]), helper.make_node("Hardmax", ["x"], ["h"]),
                    helper.make_node("Det", ["x"], ["d2"])],
                   [_value("x", TensorProto.FLOAT, [3, 3])],
                   [_value("d", TensorProto.FLOAT, []), _value("h", TensorProto.FLOAT, [3, 3]),
                    _value("d2", TensorProto.FLOAT, [])])
    assert unsupported_node_types(model) == ["Det (opset 17)", "Hardmax (opset 17)"]
    with pytest.raises(UnsupportedOperatorsError):
        convert_model(model)
    path = tmp_path / "det.onnx"
    onnx.save(model, path)
    assert main(["import", str(path), "-o", str(tmp_path / "det.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "Det (opset 17), Hardmax (opset 17)" in err
    assert not (tmp_path / "det.pth").exists()


def test_unreadable_file_and_missing_size(tmp_path, capsys):
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf at all \xff\xfe")
    assert main(["import", str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "x.pth")]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_value("x", TensorProto.FLOAT, ["n", "c"])],
                   [_value("y", TensorProto.FLOAT, ["n", "c"])])
    onnx.save(model, tmp_path / "sym.onnx")
    assert main(["import", str(tmp_path / "sym.onnx"), "-o", str(tmp_path / "x.pth")]) == 2
    assert "--size c=N" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "sym.onnx"), "-o", str(tmp_path / "x.pth"), "--size", "c=5"]) == 0
    assert "batch 2" in capsys.readouterr().out
    module = load_imported(tmp_path / "x.pth")
    x = torch.randn(3, 5)
    torch.testing.assert_close(module(x), x.clamp(min=0))
