"""Read Caffe files without Caffe: prototxts, caffemodels and their blobs.

The schema is our own ``caffe.proto`` (field numbers of the SSD fork of Caffe),
compiled into :mod:`toolkit.caffe.caffe_pb2`.

* :func:`read_prototxt` -- protobuf text format (nets, solvers, label maps).
* :func:`read_caffemodel` -- binary ``NetParameter`` (trained weights).
* :class:`CaffemodelLayers` -- the same file's layers decoded one at a time (big files).
* :func:`blob_to_numpy` -- one ``BlobProto`` as a float32 array.
* :func:`layer_blobs` -- every layer's blobs, by layer name.

Every failure raises :class:`CaffeFormatError` with the file (and
``line:column`` for text, the layer for blobs) in the message.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message

from toolkit.caffe import caffe_pb2

PathLike = str | os.PathLike


class CaffeFormatError(ValueError):
    """A Caffe file is missing, unreadable, of the wrong kind or malformed.

    The message names the file, and where it applies the ``line:column`` of a
    text file or the layer and blob index of a bad blob.
    """


# ---------------------------------------------------------------------------
# Text: prototxt
# ---------------------------------------------------------------------------

# Bytes that never occur in a text prototxt (protobuf text escapes them inside
# strings): C0 controls other than tab, newline, vertical tab, form feed, CR.
_BINARY_BYTES = re.compile(rb"[\x00-\x08\x0e-\x1f]")


def _message_class(message: str | type[Message]) -> type[Message]:
    if isinstance(message, type) and issubclass(message, Message):
        return message
    cls = getattr(caffe_pb2, str(message), None)
    if not (isinstance(cls, type) and issubclass(cls, Message)):
        known = ", ".join(sorted(caffe_pb2.DESCRIPTOR.message_types_by_name))
        raise ValueError(f"unknown Caffe message type {message!r}; known: {known}")
    return cls


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CaffeFormatError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


def _parse_error_parts(exc: text_format.ParseError) -> tuple[int | None, int | None, str]:
    """(line, column, reason) of a text_format error; its str() starts with 'line:col : '."""
    line, column = exc.GetLine(), exc.GetColumn()
    reason = str(exc)
    prefix = re.match(r"^\d+(?::\d+)? : ", reason)
    if prefix:
        reason = reason[prefix.end():]
    return line, column, reason


def _where(path: Path, line: int | None, column: int | None) -> str:
    if line is None:
        return str(path)
    return f"{path}:{line}:{column}" if column is not None else f"{path}:{line}"


def read_prototxt(
    path: PathLike,
    message: str | type[Message] = "NetParameter",
    *,
    allow_unknown_fields: bool = False,
) -> Message:
    """Parse a protobuf text file (``.prototxt``) into a ``caffe_pb2`` message.

    Args:
        path: the file; UTF-8 protobuf text format, ``#`` comments allowed.
        message: the message type, by name (``"NetParameter"``,
            ``"SolverParameter"``, ``"LabelMap"``, ...) or as a ``caffe_pb2``
            class.
        allow_unknown_fields: skip fields our schema does not define (written by
            another Caffe fork, e.g. NVCaffe's ``store_blobs_in_old_format``)
            instead of failing; a :class:`UserWarning` names the first one.
            Off by default, because a misspelt field name would otherwise
            silently fall back to its default.

    Returns:
        A new message of the requested type.

    Raises:
        CaffeFormatError: the file is missing or unreadable, is binary (e.g. a
            ``.caffemodel``), is not UTF-8, or has a syntax / schema error; the
            message reads ``"<path>:<line>:<column>: <reason>"`` for the latter.
        ValueError: ``message`` names no message of the schema.
    """
    path = Path(path)
    cls = _message_class(message)
    raw = _read_bytes(path, "prototxt")
    binary = _BINARY_BYTES.search(raw)
    if binary is not None:
        raise CaffeFormatError(
            f"{path}: not a text prototxt: byte {binary.start()} is binary (0x{raw[binary.start()]:02x}); "
            f"{_binary_kind(raw)}"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CaffeFormatError(
            f"{path}: not a text prototxt: byte {exc.start} is not UTF-8 (0x{raw[exc.start]:02x}); "
            f"{_binary_kind(raw)}"
        ) from None

    result = cls()
    try:
        text_format.Parse(text, result)
        return result
    except text_format.ParseError as exc:
        line, column, reason = _parse_error_parts(exc)
        # text_format stops at the first unknown field and cannot report the
        # rest, so the warning names the first and says others may follow.
        unknown = "has no field named" in reason
        if not (allow_unknown_fields and unknown):
            hint = (
                f" (is this file a {cls.DESCRIPTOR.name}? If it is, allow_unknown_fields=True skips fields "
                "of other Caffe forks)"
                if unknown
                else ""
            )
            raise CaffeFormatError(f"{_where(path, line, column)}: {reason}{hint}") from None
        first_unknown = f"{_where(path, line, column)}: {reason}"

    result = cls()
    try:
        text_format.Parse(text, result, allow_unknown_field=True)
    except text_format.ParseError as exc:
        line, column, reason = _parse_error_parts(exc)
        raise CaffeFormatError(f"{_where(path, line, column)}: {reason}") from None
    warnings.warn(f"{first_unknown} Skipped, with any other unknown fields in the file.", UserWarning, stacklevel=2)
    return result


# ---------------------------------------------------------------------------
# Binary: caffemodel
# ---------------------------------------------------------------------------

_MAGIC = {
    b"\xff\xd8\xff": "a JPEG image",
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"PK\x03\x04": "a zip archive (an .npz?)",
    b"\x93NUMPY": "a NumPy .npy array",
    b"\x89HDF\r\n\x1a\n": "an HDF5 file (Caffe's .caffemodel.h5 snapshots are not supported)",
    b"\x1f\x8b": "a gzip file",
}


def _magic_kind(raw: bytes) -> str | None:
    """``"a JPEG image"`` etc. when ``raw`` starts with a known signature, else None."""
    return next((kind for magic, kind in _MAGIC.items() if raw.startswith(magic)), None)


def _binary_kind(raw: bytes) -> str:
    """What a binary file given as a prototxt probably is, for the error message."""
    kind = _magic_kind(raw)
    if kind is not None:
        return f"this is {kind}"
    return "it looks like a binary protobuf (a .caffemodel?), which read_caffemodel reads"


def _looks_like_text(head: bytes) -> bool:
    # Requiring a letter keeps a few stray bytes (a caffemodel cut after its
    # first byte, b"\n") from passing for text.
    if _BINARY_BYTES.search(head) or not re.search(rb"[A-Za-z]", head):
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the end of the sample is still text.
        return exc.start >= len(head) - 3
    return True


_TEXT_HINT = "it looks like a text file (a prototxt?), which read_prototxt reads"


def _file_kind(raw: bytes) -> str | None:
    """A phrase naming a recognisable kind of file that is not a caffemodel, else None."""
    kind = _magic_kind(raw)
    if kind is not None:
        return f"this is {kind}, not a .caffemodel"
    return _TEXT_HINT if _looks_like_text(raw[:4096]) else None


def _read_varint(raw: bytes, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    while pos < len(raw) and shift < 70:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None


def _scan_top_level(raw: bytes) -> tuple[str, bool]:
    """Walk the top-level fields of ``raw``: (what is wrong, whether it is a truncation)."""
    fields = caffe_pb2.NetParameter.DESCRIPTOR.fields_by_number
    pos, n_layers = 0, 0
    while pos < len(raw):
        start = pos
        tag = _read_varint(raw, pos)
        if tag is None:
            return f"truncated: the file ends inside a field tag at byte {start}", True
        key, pos = tag
        number, wire_type = key >> 3, key & 7
        name = fields[number].name if number in fields else f"field #{number}"
        if number in (2, 100):  # V1 `layers`, `layer`
            n_layers += 1
            name = f"layer {n_layers - 1}"
        if wire_type == 0:
            varint = _read_varint(raw, pos)
            if varint is None:
                return f"truncated: the file ends inside {name} at byte {start}", True
            pos = varint[1]
        elif wire_type == 2:
            length = _read_varint(raw, pos)
            if length is None:
                return f"truncated: the file ends inside the length of {name} at byte {start}", True
            size, pos = length
            if pos + size > len(raw):
                return (
                    f"truncated: {name} starts at byte {start} and declares {size} bytes, "
                    f"but only {len(raw) - pos} of them are in the file"
                ), True
            pos += size
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > len(raw):
                return f"truncated: the file ends inside {name} at byte {start}", True
        else:
            return (
                f"not a Caffe NetParameter, or corrupt: byte {start} holds wire type {wire_type}, "
                "which Caffe never writes"
            ), False
    return "corrupt: the top-level fields are intact, so the damage is inside a layer", False


def _diagnose_binary(raw: bytes) -> str:
    """Why ``raw`` did not decode as a NetParameter, in words, for the error message.

    upb's DecodeError says only that parsing failed.  Scanning the top-level
    fields tells a truncated file (a field runs past the end) from a file of
    another kind (wire types Caffe never writes) without decoding any layer.
    """
    kind = _magic_kind(raw)
    if kind is not None:
        return f"this is {kind}, not a .caffemodel"
    verdict, truncated = _scan_top_level(raw)
    if _looks_like_text(raw[:4096]):
        # Text scans as garbage protobuf, often as a "truncated" one; say both.
        return f"{verdict}; or no caffemodel at all: {_TEXT_HINT}" if truncated else _TEXT_HINT
    return verdict


def read_caffemodel(path: PathLike) -> caffe_pb2.NetParameter:
    """Read a binary ``.caffemodel`` (a serialized ``NetParameter``).

    Modern files list ``layer`` (LayerParameter), files from before 2015
    ``layers`` (V1LayerParameter); blobs stay in ``BlobProto`` form, see
    :func:`blob_to_numpy` / :func:`layer_blobs`.  Fields our schema does not
    define are kept as protobuf unknown fields.

    Memory: the file is read with one ``read()`` and parsed from that buffer,
    so the peak is the file size plus the decoded message (about the same
    again).  (``mmap`` would not lower it: the protobuf runtime copies any
    buffer that is not ``bytes`` before decoding.)

    Truncation: a file cut anywhere inside a layer fails to decode.  A cut
    exactly between two layers cannot be seen -- protobuf has no end marker --
    and yields a net that lacks the layers after the cut; callers that match
    layers by name against a deploy net notice the missing ones.

    Raises:
        CaffeFormatError: missing / unreadable / empty file; a file that does
            not decode (truncated, corrupt, or another kind of file: a JPEG, a
            prototxt, ...), with what looks wrong; a file that decodes but
            holds no layer.
    """
    path = Path(path)
    raw = _read_bytes(path, "caffemodel")
    if not raw:
        raise CaffeFormatError(f"{path}: empty file, expected a binary Caffe NetParameter (.caffemodel)")
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(raw)
    except DecodeError as exc:
        raise CaffeFormatError(
            f"{path}: cannot decode as a binary Caffe NetParameter (.caffemodel): {_diagnose_binary(raw)} "
            f"[protobuf: {exc}]"
        ) from None
    if not net.layer and not net.layers:
        # Random bytes occasionally decode as a few unknown fields.
        kind = _file_kind(raw)
        raise CaffeFormatError(
            f"{path}: decodes as protobuf but holds no layer, so it is not a Caffe net"
            + (f"; {kind}" if kind else "")
        )
    return net


class CaffemodelLayers:
    """The layers of a ``.caffemodel``, decoded one at a time from a memory map.

    :func:`read_caffemodel` holds the whole decoded ``NetParameter`` (about the
    file's size again on top of the file); iterating this object holds only the
    layer being decoded, so a converter that copies each layer's blobs into its
    own tensors peaks at those tensors plus one layer.  The file's structure
    (every top-level field, modern ``layer`` vs V1 ``layers``) is checked when
    the object is made; a layer whose bytes do not decode raises on iteration.

    Iterating yields ``LayerParameter`` (or ``V1LayerParameter`` for legacy
    files) in file order.  ``len()`` is the number of layers.
    """

    def __init__(self, path: PathLike) -> None:
        import mmap

        self.path = Path(path)
        self.name = ""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise CaffeFormatError(f"{self.path}: empty file, expected a binary Caffe NetParameter "
                                           f"(.caffemodel)")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:  # as _read_bytes words it
            raise CaffeFormatError(f"{self.path}: cannot read caffemodel ({exc.strerror or exc})") from None
        self._spans = self._scan()

    def _fail(self) -> CaffeFormatError:
        raw = bytes(self._map)  # a broken file: copying it for the diagnosis is fine
        return CaffeFormatError(f"{self.path}: cannot decode as a binary Caffe NetParameter (.caffemodel): "
                                f"{_diagnose_binary(raw)}")

    def _scan(self) -> list[tuple[int, int, int]]:
        """``(field number, start, end)`` of every layer; the net name read on the way."""
        raw = self._map
        if _magic_kind(raw[:64]) is not None:
            raise self._fail()
        spans, pos, end = [], 0, len(raw)
        while pos < end:
            tag = _read_varint(raw, pos)
            if tag is None:
                raise self._fail()
            key, pos = tag
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                varint = _read_varint(raw, pos)
                if varint is None:
                    raise self._fail()
                pos = varint[1]
            elif wire_type == 2:
                length = _read_varint(raw, pos)
                if length is None or length[1] + length[0] > end:
                    raise self._fail()
                size, pos = length
                if number in (2, 100):
                    spans.append((number, pos, pos + size))
                elif number == 1:
                    self.name = bytes(raw[pos:pos + size]).decode("utf-8", errors="replace")
                pos += size
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
                if pos > end:
                    raise self._fail()
            else:
                raise self._fail()
        if not spans:
            kind = _file_kind(bytes(raw[:4096]))
            raise CaffeFormatError(f"{self.path}: decodes as protobuf but holds no layer, so it is not a Caffe net"
                                   + (f"; {kind}" if kind else ""))
        if len({n for n, _, _ in spans}) > 1:
            raise CaffeFormatError(f"{self.path}: has both 'layer' and V1 'layers' entries; Caffe refuses such files")
        return spans

    @property
    def legacy(self) -> bool:
        """True for a V1 file (``layers``)."""
        return self._spans[0][0] == 2

    def __len__(self) -> int:
        return len(self._spans)

    def __iter__(self):
        message = caffe_pb2.V1LayerParameter if self.legacy else caffe_pb2.LayerParameter
        for index, (_, start, end) in enumerate(self._spans):
            layer = message()
            try:
                layer.ParseFromString(self._map[start:end])
            except DecodeError as exc:
                raise CaffeFormatError(f"{self.path}: layer {index} (bytes {start}..{end}) does not decode: "
                                       f"corrupt file [protobuf: {exc}]") from None
            yield layer


# ---------------------------------------------------------------------------
# Blobs
# ---------------------------------------------------------------------------


def _blob_where(layer: str | None, index: int | None) -> str:
    if layer is None:
        return "blob" if index is None else f"blob {index}"
    return f"layer {layer!r} blob {index if index is not None else '?'}"


def blob_to_numpy(blob: caffe_pb2.BlobProto, *, layer: str | None = None, index: int | None = None) -> np.ndarray:
    """One stored blob as a new float32 array, C order.

    Shape, by Caffe's own rule (``Blob::FromProto``): when any of the legacy
    ``num`` / ``channels`` / ``height`` / ``width`` fields is present, the 4-d
    ``(num, channels, height, width)`` exactly as stored; otherwise
    ``shape.dim``.  A 0-d blob (a channel-shared PReLU slope or Normalize
    scale) is stored with neither -- Caffe writes no ``shape`` for zero axes --
    and comes back with shape ``()``.  Legacy files keep 4-d shapes for
    everything -- a bias is ``(1, 1, 1, N)``, an InnerProduct weight
    ``(1, 1, N_out, K)`` -- and this function does not squeeze them: the
    caller knows the layer and reshapes (Caffe copies the floats flat).

    Values: ``data``, or ``double_data`` (cast to float32) when ``data`` is
    empty.

    Args:
        blob: a ``caffe_pb2.BlobProto``.
        layer, index: where the blob came from, for error messages only.

    Raises:
        CaffeFormatError: the number of values differs from the product of the
            shape, or the shape has a negative dimension.
    """
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(int(d) for d in blob.shape.dim)
    if any(d < 0 for d in shape):
        raise CaffeFormatError(f"{_blob_where(layer, index)}: negative dimension in shape {shape}")
    count = int(np.prod(shape, dtype=np.int64))
    values = blob.data if len(blob.data) else blob.double_data
    if len(values) != count:
        raise CaffeFormatError(
            f"{_blob_where(layer, index)}: shape {shape} needs {count} values, the blob holds {len(values)}"
        )
    # fromiter over the repeated field is the one copy out of the protobuf
    # arena (np.array() on it is slower: it builds a float64 list first).
    return np.fromiter(values, dtype=np.float32, count=count).reshape(shape)


def layer_blobs(net: caffe_pb2.NetParameter) -> dict[str, list[np.ndarray]]:
    """Every layer's blobs as float32 arrays, keyed by layer name, in file order.

    Works for modern (``layer``) and legacy V1 (``layers``) nets; layers
    without blobs map to ``[]``.  Shapes are as :func:`blob_to_numpy` returns
    them (legacy 4-d shapes unchanged).

    Raises:
        CaffeFormatError: two layers share a name (Caffe matches weights by
            name, so the file is ambiguous), the net mixes ``layer`` and V1
            ``layers`` (Caffe refuses such files), or a blob is malformed.
    """
    if net.layer and net.layers:
        raise CaffeFormatError(
            f"net {net.name!r}: has both 'layer' and V1 'layers' entries; Caffe refuses such files"
        )
    out: dict[str, list[np.ndarray]] = {}
    for layer in net.layer or net.layers:
        if layer.name in out:
            raise CaffeFormatError(f"net {net.name!r}: duplicate layer name {layer.name!r}")
        out[layer.name] = [blob_to_numpy(b, layer=layer.name, index=i) for i, b in enumerate(layer.blobs)]
    return out
