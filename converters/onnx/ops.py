"""onnx2torch converters for the ONNX operations our exports use and onnx2torch 1.5 lacks.

``python -m toolkit.export`` puts ``ScatterElements`` (DetectionOutput's kept masks) and ``GridSample`` (the
deformable attention's PyTorch reference) into its graphs; onnx2torch has no converter for either.  Each module
follows the ONNX specification of its operator (the opsets named at :func:`register`):

- ``ScatterElements``: ``out = data`` with ``out[..., indices[i], ...] = updates[i]`` along ``axis`` (negative
  indices count from the end), ``reduction`` none / add / mul / max / min;
- ``GridSample``: ``F.grid_sample`` with ``mode`` (opset 16: bilinear / nearest / bicubic; 20: linear / nearest /
  cubic), ``padding_mode`` and ``align_corners`` (4-d inputs).

And two repairs of onnx2torch 1.5.15's converters:

- ``CumSum``: its converter reads an absent ``reverse`` attribute as 1; the specification's default is 0 (a
  plain cumulative sum; DETR's sine position encoding has one);
- ``LayerNormalization``: the module is sized from its input's inferred shape, which shape inference cannot give
  after data-dependent operations (Sparse DETR's token selection); the normalized shape is then taken from the
  scale, which has it (``scale.shape == input.shape[axis:]`` by the specification).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_REDUCTIONS = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}
_GRID_MODES = {"bilinear": "bilinear", "linear": "bilinear", "nearest": "nearest", "bicubic": "bicubic",
               "cubic": "bicubic"}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class OnnxScatterElements(nn.Module):
    """ONNX ``ScatterElements``: ``(data, indices int64, updates) -> data`` with ``updates`` written along ``axis``."""

    def __init__(self, axis: int = 0, reduction: str = "none") -> None:
        super().__init__()
        if reduction != "none" and reduction not in _REDUCTIONS:
            raise NotImplementedError(f"ScatterElements with reduction {reduction!r}")
        self.axis = axis
        self.reduction = reduction

    def forward(self, data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        indices = torch.where(indices < 0, indices + data.shape[self.axis], indices)
        if self.reduction == "none":
            return data.scatter(self.axis, indices, updates)
        return data.scatter_reduce(self.axis, indices, updates, _REDUCTIONS[self.reduction], include_self=True)


class OnnxGridSample(nn.Module):
    """ONNX ``GridSample`` on ``(N, C, H, W)`` with a ``(N, H_out, W_out, 2)`` grid in ``[-1, 1]``."""

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros", align_corners: bool = False) -> None:
        super().__init__()
        if mode not in _GRID_MODES:
            raise NotImplementedError(f"GridSample with mode {mode!r}")
        self.mode = _GRID_MODES[mode]
        self.padding_mode = padding_mode
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise NotImplementedError(f"GridSample of a {x.dim()}-d input (4-d only)")
        return F.grid_sample(x, grid, mode=self.mode, padding_mode=self.padding_mode,
                             align_corners=self.align_corners)


_registered = False


def register() -> None:
    """Add the converters to onnx2torch's registry (once; later calls do nothing)."""
    global _registered
    if _registered:
        return
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter
    from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node

    class ScatterElements(OnnxScatterElements, OnnxToTorchModule):
        pass

    class GridSample(OnnxGridSample, OnnxToTorchModule):
        pass

    def scatter_elements(node, graph):
        module = ScatterElements(int(node.attributes.get("axis", 0)), _text(node.attributes.get("reduction", "none")))
        return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))

    def grid_sample(node, graph):
        module = GridSample(_text(node.attributes.get("mode", "bilinear")),
                            _text(node.attributes.get("padding_mode", "zeros")),
                            bool(node.attributes.get("align_corners", 0)))
        return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))

    layer_norm_key = OperationDescription("", "LayerNormalization", 17)
    library_layer_norm = _CONVERTER_REGISTRY.get(layer_norm_key)

    def layer_norm(node, graph):
        result = library_layer_norm(node, graph)
        module = result.torch_module
        if isinstance(module, nn.LayerNorm) and not module.normalized_shape:
            fixed = nn.LayerNorm(tuple(module.weight.shape), eps=module.eps,
                                 elementwise_affine=True, bias=module.bias is not None)
            fixed.load_state_dict(module.state_dict())
            result = OperationConverterResult(torch_module=fixed, onnx_mapping=result.onnx_mapping)
        return result

    if library_layer_norm is not None:
        _CONVERTER_REGISTRY[layer_norm_key] = layer_norm
    from onnx2torch.node_converters.cumsum import OnnxCumSum

    def cumsum(node, graph):
        module = OnnxCumSum(bool(node.attributes.get("exclusive", 0)), bool(node.attributes.get("reverse", 0)))
        return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))

    for version in (11, 14):
        _CONVERTER_REGISTRY[OperationDescription("", "CumSum", version)] = cumsum
    for op, versions, converter in (("ScatterElements", (11, 13, 16, 18), scatter_elements),
                                    ("GridSample", (16, 20, 22), grid_sample)):
        for version in versions:
            if OperationDescription("", op, version) not in _CONVERTER_REGISTRY:  # a later onnx2torch may have it
                add_converter(operation_type=op, version=version)(converter)
    _registered = True
