"""Caffe nets in PyTorch: a prototxt (+ caffemodel) interpreted layer by layer.

The interpreter itself (the net, its layers, its error type) lives in :mod:`toolkit.caffe`, beside the Caffe file
formats, so that the toolkit (``python -m toolkit.export`` of a converted net) runs it without importing this
package; it is re-exported here.

* :func:`load_caffe_net` / :class:`CaffeNet` -- the whole net (:mod:`toolkit.caffe.net`);
* :func:`build_layer` / :data:`LAYER_TYPES` -- one module per Caffe layer type
  (:mod:`toolkit.caffe.layers`);
* :func:`optimize_for_inference` / :class:`OptimizedCaffeNet` -- an inference-only,
  faster plan of a net (:mod:`converters.caffe.optimize`);
* :class:`CaffeConversionError` -- every bad-input error of this package;
* ``python -m converters.caffe`` (convert, run, verify, recipe) -- the command
  line (:mod:`converters.caffe.__main__`), its work in :mod:`converters.caffe.cli`
  and :mod:`converters.caffe.recipe`.
"""

from converters.caffe.optimize import OptimizedCaffeNet, optimize_for_inference
from toolkit.caffe.errors import CaffeConversionError
from toolkit.caffe.layers import LAYER_TYPES, CaffeLayer, build_layer
from toolkit.caffe.net import CaffeNet, LayerSpec, load_caffe_net

__all__ = ["LAYER_TYPES", "CaffeConversionError", "CaffeLayer", "CaffeNet", "LayerSpec", "OptimizedCaffeNet",
           "build_layer", "load_caffe_net", "optimize_for_inference"]
