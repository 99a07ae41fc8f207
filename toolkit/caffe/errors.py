"""The one error type of the Caffe interpreter (:mod:`toolkit.caffe.net`) and of :mod:`converters.caffe`."""

from __future__ import annotations


class CaffeConversionError(ValueError):
    """A Caffe net (prototxt, caffemodel, inputs) cannot be interpreted.

    Raised for every bad input the Caffe interpreter meets: unreadable or
    malformed files (wrapping :class:`toolkit.caffe.CaffeFormatError`, with the
    file in the message), unsupported layer types or parameters, blobs that are
    never produced, weights that are missing, left over or of the wrong shape,
    and inputs that do not fit.  The message names every layer at fault.
    """
