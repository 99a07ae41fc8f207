"""Caffe ``LabelMap`` prototxt files (SSD's ``labelmap_voc.prototxt``).

The file is protobuf text format::

    item { name: "none_of_the_above" label: 0 display_name: "background" }
    item { name: "aeroplane" label: 1 display_name: "aeroplane" }

Label 0 is the background.  This reader handles exactly that message (repeated
``item`` with ``name``, ``label``, ``display_name``), comments included, and
reports syntax errors with file, line and column.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from toolkit.data.errors import AnnotationError

_TOKEN = re.compile(
    r"""(?P<ws>\s+)|(?P<comment>\#[^\n]*)|(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')"""
    r"""|(?P<number>-?\d+)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[{}:])"""
)


@dataclass(frozen=True)
class LabelMapItem:
    name: str
    label: int
    display_name: str


@dataclass(frozen=True)
class LabelMap:
    """Items sorted by label; ``names[label]`` is the display name (``"background"`` at 0)."""

    items: tuple[LabelMapItem, ...]
    path: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(item.display_name for item in self.items)

    @property
    def foreground(self) -> tuple[str, ...]:
        """Display names of labels 1..K (the ``classes`` argument of the datasets)."""
        return tuple(item.display_name for item in self.items if item.label != 0)

    def name_to_label(self) -> dict[str, int]:
        """Both ``name`` and ``display_name`` → label (Caffe matches XML names against ``name``)."""
        out = {item.display_name: item.label for item in self.items}
        out.update({item.name: item.label for item in self.items})
        return out


def _tokens(text: str, path: str):
    pos = 0
    line, line_start = 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise AnnotationError(f"{path}:{line}:{pos - line_start + 1}: unexpected character {text[pos]!r}")
        kind = m.lastgroup
        value = m.group()
        if kind not in ("ws", "comment"):
            yield kind, value, line, pos - line_start + 1
        newlines = value.count("\n")
        if newlines:
            line += newlines
            line_start = m.start() + value.rfind("\n") + 1
        pos = m.end()


def parse_labelmap(text: str, path: str = "<string>") -> LabelMap:
    """Parse labelmap text. Raises :class:`AnnotationError` with ``path:line:column``."""
    toks = list(_tokens(text, path))
    i = 0
    items = []

    def expect(kind, value=None):
        nonlocal i
        if i >= len(toks):
            raise AnnotationError(f"{path}: unexpected end of file, expected {value or kind}")
        k, v, ln, col = toks[i]
        if k != kind or (value is not None and v != value):
            raise AnnotationError(f"{path}:{ln}:{col}: expected {value or kind}, got {v!r}")
        i += 1
        return v, ln, col

    while i < len(toks):
        _, ln, col = expect("ident", "item")
        if i < len(toks) and toks[i][1] == ":":
            i += 1
        expect("punct", "{")
        fields: dict[str, object] = {}
        while True:
            if i >= len(toks):
                raise AnnotationError(f"{path}:{ln}:{col}: 'item' block is not closed")
            if toks[i][1] == "}":
                i += 1
                break
            key, kln, kcol = expect("ident")
            expect("punct", ":")
            if key in ("name", "display_name"):
                raw, _, _ = expect("string")
                fields[key] = bytes(raw[1:-1], "utf-8").decode("unicode_escape")
            elif key == "label":
                raw, _, _ = expect("number")
                fields[key] = int(raw)
            else:
                raise AnnotationError(f"{path}:{kln}:{kcol}: unknown LabelMapItem field {key!r}")
        if "label" not in fields:
            raise AnnotationError(f"{path}:{ln}:{col}: item without a label")
        name = str(fields.get("name", fields.get("display_name", "")))
        items.append(LabelMapItem(name, int(fields["label"]), str(fields.get("display_name", name))))
    labels = [item.label for item in items]
    if len(set(labels)) != len(labels):
        raise AnnotationError(f"{path}: duplicate labels {sorted(l for l in set(labels) if labels.count(l) > 1)}")
    items.sort(key=lambda item: item.label)
    if [item.label for item in items] != list(range(len(items))):
        raise AnnotationError(f"{path}: labels must be 0..{len(items) - 1} without gaps, got {labels}")
    return LabelMap(tuple(items), path)


def read_labelmap(path: str | os.PathLike) -> LabelMap:
    """Read a labelmap prototxt file (see :func:`parse_labelmap`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot read labelmap ({exc.strerror})") from None
    return parse_labelmap(text, str(path))
