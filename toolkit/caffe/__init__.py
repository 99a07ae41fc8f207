"""Caffe file formats without Caffe.

Our own schema of the parts of the SSD fork of Caffe that legacy-det reads
(``caffe.proto``, compiled into the committed :mod:`toolkit.caffe.caffe_pb2`)
and readers for prototxts, caffemodels and their blobs (:mod:`toolkit.caffe.io`);
the interpreter that runs a net in PyTorch with Caffe's numerics: :mod:`toolkit.caffe.net`
(:class:`~toolkit.caffe.net.CaffeNet`), one module per layer type in :mod:`toolkit.caffe.layers`,
:class:`~toolkit.caffe.errors.CaffeConversionError`.  Those import torch; import them by name
(this package's own import stays light).
"""

from toolkit.caffe import caffe_pb2
from toolkit.caffe.io import (
    CaffeFormatError,
    CaffemodelLayers,
    blob_to_numpy,
    layer_blobs,
    read_caffemodel,
    read_prototxt,
)

__all__ = [
    "CaffeFormatError",
    "CaffemodelLayers",
    "blob_to_numpy",
    "caffe_pb2",
    "layer_blobs",
    "read_caffemodel",
    "read_prototxt",
]
