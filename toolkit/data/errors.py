"""Exceptions raised by the dataset readers.

Each message names the file (or key) at fault so that a user can find it.
"""


class DatasetError(Exception):
    """Base class of the errors raised by :mod:`toolkit.data`."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset folder or list file is missing; the message names the path and the layout."""


class AnnotationError(DatasetError, ValueError):
    """An annotation file (XML, JSON, labelmap) could not be parsed; the message names it."""


class ImageReadError(DatasetError, OSError):
    """An image file is missing or cannot be decoded; the message names it."""


class CorruptRecordError(DatasetError, ValueError):
    """A record of a Caffe LMDB is unusable (bad protobuf, undecodable image, box or label
    out of range); the message names the LMDB and the record's key."""
