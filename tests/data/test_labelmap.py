"""Caffe labelmap prototxt reading against the real SSD labelmap fixture."""

from __future__ import annotations

import pytest

from conftest import require_fixture
from toolkit.data.errors import AnnotationError
from toolkit.data.labelmap import parse_labelmap, read_labelmap
from toolkit.data.voc import VOC_CLASSES


def test_real_ssd_labelmap():
    lm = read_labelmap(require_fixture("caffe/prototxt/labelmap_voc.prototxt"))
    assert len(lm.items) == 21
    assert lm.names[0] == "background" and lm.items[0].name == "none_of_the_above"
    assert lm.foreground == VOC_CLASSES
    assert lm.name_to_label()["none_of_the_above"] == 0 and lm.name_to_label()["tvmonitor"] == 20


def test_comments_colon_form_and_order():
    lm = parse_labelmap('# a comment\nitem: { label: 1 name: "b" }\nitem { name: \'a\' label: 0 display_name: "bg" }\n')
    assert lm.names == ("bg", "b")


@pytest.mark.parametrize(
    "text, where",
    [
        ('item {\n  name: "a"\n  label: x\n}', "<string>:3:10"),
        ('item {\n  name: "a"\n  colour: 3\n}', "<string>:3:3"),
        ('item { name: "a" label: 0 }\nitem { name: "b" label: 0 }', "duplicate labels"),
        ('item { name: "a" label: 0 }\nitem { name: "b" label: 2 }', "without gaps"),
        ('item { name: "a" label: 0 ', "not closed"),
        ('item { name: "a" label: 0 } %', "<string>:1:29"),
    ],
)
def test_syntax_errors_name_line_and_column(text, where):
    with pytest.raises(AnnotationError, match=where):
        parse_labelmap(text)


def test_committed_voc_labelmap_equals_the_real_one():
    ours = read_labelmap(__import__("conftest").REPO_ROOT / "data/labelmaps/labelmap_voc.prototxt")
    real = read_labelmap(require_fixture("caffe/prototxt/labelmap_voc.prototxt"))
    assert ours.items == real.items
