"""Converters between Caffe-era artefacts and PyTorch: Caffe prototxt + caffemodel,
SSD AnnotatedDatum LMDBs, ONNX. They import :mod:`toolkit`; ``toolkit`` never imports them.
"""
