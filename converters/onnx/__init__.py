"""ONNX models into PyTorch: ``python -m converters.onnx import`` (onnx2torch, checked against onnxruntime).

* :func:`import_onnx` / :func:`save_imported` / :func:`load_imported` -- convert, check, write and read back
  (:mod:`converters.onnx.importer`);
* :func:`unsupported_node_types` -- what onnx2torch cannot convert;
* :mod:`converters.onnx.ops` -- converters for ``ScatterElements`` and ``GridSample``, which our own exports
  (``python -m toolkit.export``) use and onnx2torch lacks.
"""

from converters.onnx.importer import (OnnxImportError, ParityError, UnsupportedOperatorsError, import_onnx,
                                      load_imported, save_imported, unsupported_node_types)

__all__ = ["OnnxImportError", "ParityError", "UnsupportedOperatorsError", "import_onnx", "load_imported",
           "save_imported", "unsupported_node_types"]
