"""Caffe nets in PyTorch: a prototxt (+ caffemodel) interpreted layer by layer.

* :func:`load_caffe_net` / :class:`CaffeNet` -- the whole net (:mod:`converters.caffe.net`);
* :func:`build_layer` / :data:`LAYER_TYPES` -- one module per Caffe layer type
  (:mod:`converters.caffe.layers`);
* :func:`optimize_for_inference` / :class:`OptimizedCaffeNet` -- an inference-only,
  faster plan of a net (:mod:`converters.caffe.optimize`);
* :class:`CaffeConversionError` -- every bad-input error of this package;
* ``python -m converters.caffe`` (convert, run, verify, recipe) -- the command
  line (:mod:`converters.caffe.__main__`), its work in :mod:`converters.caffe.cli`
  and :mod:`converters.caffe.recipe`.
"""

from converters.caffe.errors import CaffeConversionError
from converters.caffe.layers import LAYER_TYPES, CaffeLayer, build_layer
from converters.caffe.net import CaffeNet, LayerSpec, load_caffe_net
from converters.caffe.optimize import OptimizedCaffeNet, optimize_for_inference

__all__ = ["LAYER_TYPES", "CaffeConversionError", "CaffeLayer", "CaffeNet", "LayerSpec", "OptimizedCaffeNet",
           "build_layer", "load_caffe_net", "optimize_for_inference"]
