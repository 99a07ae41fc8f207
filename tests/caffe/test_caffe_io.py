"""Caffe readers against files written by real SSD-Caffe.

Independent references: the recorded fixtures (prototxts and caffemodels that
real Caffe wrote, ``weights.npz`` with the same blobs saved through numpy, the
parameter count in ``blob_shapes.json``) and a tiny protobuf wire-format walker
written here, which decodes the caffemodels with field numbers spelled out in
this file rather than taken from our schema.

Assertions never name a whole NetParameter or LayerParameter, nor compare long
lists: on failure pytest would print or diff them (15 M floats for DSOD).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import unknown_fields

import toolkit.caffe.generate_pb2 as generate_pb2
from conftest import fixtures_root, require_fixture
from toolkit.caffe import (
    CaffeFormatError,
    CaffemodelLayers,
    blob_to_numpy,
    caffe_pb2,
    layer_blobs,
    read_caffemodel,
    read_prototxt,
)


def _read_layer_by_layer(path):
    return list(CaffemodelLayers(path))


# Both readers must refuse broken files alike.
READERS = pytest.mark.parametrize("read", [read_caffemodel, _read_layer_by_layer], ids=["whole", "streamed"])

DSOD_CAFFEMODEL = "caffe/dsod300/random_init.caffemodel"
# Files written by another Caffe fork, with the field our schema rightly lacks.
FOREIGN_TEXT_FIELDS = {"yufacedetectnet-open-v1.solver.prototxt": ("store_blobs_in_old_format", 18, 1)}
# libfacedetection's model was saved by NVCaffe (layer fields 145-148, transform fields >= 200).
FOREIGN_CAFFEMODELS = {"yufacedetectnet-open-v1.caffemodel"}


def _fixture_params(patterns: list[str], exclude: tuple[str, ...] = ()) -> list:
    root = fixtures_root()
    files = sorted({p for pattern in patterns for p in root.glob(pattern)} - {root / e for e in exclude})
    if not files:
        return [pytest.param(None, id="fixtures-missing")]
    return [pytest.param(p, id=p.relative_to(root).as_posix()) for p in files]


def _message_kind(path: Path) -> str:
    if "solver" in path.name:
        return "SolverParameter"
    if "labelmap" in path.name:
        return "LabelMap"
    return "NetParameter"


def _unknown_fields(message, where: str = "") -> list[str]:
    """Paths of every (sub)message that holds fields our schema does not define."""
    found = [where or "<root>"] if len(unknown_fields.UnknownFieldSet(message)) else []
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        items = value if field.is_repeated else [value]
        for i, item in enumerate(items):
            found += _unknown_fields(item, f"{where}.{field.name}[{i}]")
    return found


# ---------------------------------------------------------------------------
# A wire-format walker that knows nothing of caffe_pb2
# ---------------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _wire_fields(buf: bytes):
    """Yield (field number, value, end offset); value: int (varint) or bytes (length-delimited, fixed)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
        elif wire_type == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            value, pos = buf[pos:pos + width], pos + width
        else:
            raise AssertionError(f"unexpected wire type {wire_type} at {pos}")
        yield number, value, pos


# Field numbers of the published schema, written out independently of caffe.proto.
NET_NAME, NET_V1_LAYERS, NET_LAYER = 1, 2, 100
LAYER_NAME, LAYER_TYPE, LAYER_BLOBS = 1, 2, 7
V1_NAME, V1_TYPE, V1_BLOBS = 4, 5, 6
BLOB_LEGACY_DIMS, BLOB_DATA, BLOB_SHAPE, SHAPE_DIM = (1, 2, 3, 4), 5, 7, 1


def _wire_blob(buf: bytes) -> tuple[tuple[int, ...], np.ndarray]:
    shape, legacy, data = None, {}, np.zeros(0, np.float32)
    for number, value, _ in _wire_fields(buf):
        if number == BLOB_SHAPE:
            dims = []
            for n, v, _ in _wire_fields(value):
                assert n == SHAPE_DIM
                if isinstance(v, int):  # unpacked
                    dims.append(v)
                else:  # packed varints
                    pos = 0
                    while pos < len(v):
                        d, pos = _varint(v, pos)
                        dims.append(d)
            shape = tuple(dims)
        elif number in BLOB_LEGACY_DIMS:
            legacy[number] = value
        elif number == BLOB_DATA:
            data = np.frombuffer(value, dtype="<f4")
    if shape is None:
        shape = tuple(legacy.get(n, 0) for n in BLOB_LEGACY_DIMS)
    return shape, data


def _wire_layers(buf: bytes, layer_field: int, fields: tuple[int, int, int], limit: int):
    """(name, type, [(shape, data), ...]) of the first ``limit`` layers, decoded by hand."""
    name_field, type_field, blobs_field = fields
    out = []
    for number, value, _ in _wire_fields(buf):
        if number != layer_field:
            continue
        name = kind = None
        blobs = []
        for n, v, _ in _wire_fields(value):
            if n == name_field:
                name = bytes(v).decode()
            elif n == type_field:
                kind = v if isinstance(v, int) else bytes(v).decode()
            elif n == blobs_field:
                blobs.append(_wire_blob(v))
        out.append((name, kind, blobs))
        if len(out) == limit:
            break
    return out


def _wire_layer_names(buf: bytes, limit: int) -> list[str]:
    return [name for name, _, _ in _wire_layers(buf, NET_LAYER, (LAYER_NAME, LAYER_TYPE, LAYER_BLOBS), limit)]


def _top_level_ends(buf: bytes) -> list[tuple[int, int]]:
    """(field number, end offset) of every top-level field."""
    return [(number, end) for number, _, end in _wire_fields(buf)]


# ---------------------------------------------------------------------------
# Module fixtures: the 60 MB DSOD caffemodel is read once
# ---------------------------------------------------------------------------


class DsodModel:
    """The DSOD caffemodel: its path, its bytes and the parsed net.

    A holder with a short repr, because pytest prints the arguments of a
    failing test, and the repr of the message is 15 M floats of text.
    """

    def __init__(self, path: Path):
        self.path = path
        self.raw = path.read_bytes()
        self.net = read_caffemodel(path)

    def __repr__(self) -> str:
        return f"DsodModel({str(self.path)!r})"


@pytest.fixture(scope="module")
def dsod() -> DsodModel:
    return DsodModel(require_fixture(DSOD_CAFFEMODEL))


# ---------------------------------------------------------------------------
# Text files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", _fixture_params(["caffe/**/*.prototxt", "lmdb/*.prototxt"]))
def test_every_fixture_prototxt_parses(path):
    if path is None:
        require_fixture("caffe")
    kind = _message_kind(path)
    foreign = FOREIGN_TEXT_FIELDS.get(path.name)
    if foreign is None:
        message = read_prototxt(path, kind)
    else:
        field, line, column = foreign
        with pytest.raises(CaffeFormatError, match=rf"{re.escape(str(path))}:{line}:{column}: .*{field}"):
            read_prototxt(path, kind)
        with pytest.warns(UserWarning, match=field):
            message = read_prototxt(path, kind, allow_unknown_fields=True)
    assert isinstance(message, getattr(caffe_pb2, kind))
    if kind == "NetParameter":
        assert len(message.layer) + len(message.layers) > 0
    elif kind == "LabelMap":
        assert [item.label for item in message.item] == list(range(21))
    else:
        assert message.base_lr > 0 and message.max_iter > 0


def test_ssd_train_prototxt_keeps_the_augmentation_and_loss_settings():
    net = read_prototxt(require_fixture("caffe/prototxt/ssd300_vgg16_voc0712/train.prototxt"))
    data = net.layer[0]
    assert data.type == "AnnotatedData" and data.include[0].phase == caffe_pb2.TRAIN
    t = data.transform_param
    assert list(t.mean_value) == [104, 117, 123] and t.mirror
    resize = t.resize_param
    assert resize.resize_mode == caffe_pb2.ResizeParameter.WARP and (resize.height, resize.width) == (300, 300)
    assert len(resize.interp_mode) == 5
    assert t.distort_param.brightness_delta == 32 and t.distort_param.hue_delta == 18
    assert t.expand_param.prob == 0.5 and t.expand_param.max_expand_ratio == 4
    assert t.emit_constraint.emit_type == caffe_pb2.EmitConstraint.CENTER
    samplers = data.annotated_data_param.batch_sampler
    assert len(samplers) == 7 and samplers[0].max_trials == 1 and samplers[1].max_trials == 50
    assert samplers[-1].sample_constraint.max_jaccard_overlap == 1.0
    assert data.data_param.backend == caffe_pb2.DataParameter.LMDB

    (loss,) = [layer for layer in net.layer if layer.type == "MultiBoxLoss"]
    p = loss.multibox_loss_param
    assert p.num_classes == 21 and p.match_type == caffe_pb2.MultiBoxLossParameter.PER_PREDICTION
    assert p.mining_type == caffe_pb2.MultiBoxLossParameter.MAX_NEGATIVE and p.neg_pos_ratio == 3
    assert p.code_type == caffe_pb2.PriorBoxParameter.CENTER_SIZE
    assert loss.loss_param.normalization == caffe_pb2.LossParameter.VALID
    assert list(loss.propagate_down) == [True, True, False, False]

    prior = next(layer for layer in net.layer if layer.type == "PriorBox").prior_box_param
    assert list(prior.min_size) == [30] and list(prior.max_size) == [60] and prior.step == 8 and prior.offset == 0.5


def test_ssd_solver_fields():
    solver = read_prototxt(require_fixture("caffe/prototxt/ssd300_vgg16_voc0712/solver.prototxt"), "SolverParameter")
    assert solver.lr_policy == "multistep" and list(solver.stepvalue) == [80000, 100000, 120000]
    assert solver.eval_type == "detection" and solver.ap_version == "11point"
    assert list(solver.test_iter) == [619] and solver.solver_mode == caffe_pb2.SolverParameter.GPU
    assert not solver.test_initialization and solver.average_loss == 10
    # Defaults of fields the file leaves out come from the schema.
    assert solver.regularization_type == "L2" and solver.clip_gradients == -1 and solver.random_seed == -1


def test_legacy_v1_prototxt():
    net = read_prototxt(require_fixture("caffe/legacy_v1/branch_v1/deploy.prototxt"))
    assert list(net.input) == ["a", "b"] and list(net.input_dim) == [2, 4, 6, 5] * 2
    conv_b = next(layer for layer in net.layers if layer.name == "conv_b")
    assert conv_b.type == caffe_pb2.V1LayerParameter.CONVOLUTION
    assert list(conv_b.param) == ["shared_w", "shared_b"]
    assert list(conv_b.blobs_lr) == [1, 2] and list(conv_b.weight_decay) == [1, 0]
    concat = caffe_pb2.V1LayerParameter.CONCAT
    concat_dims = [layer.concat_param.concat_dim for layer in net.layers if layer.type == concat]
    assert 2 in concat_dims
    phases = {layer.name: [r.phase for r in layer.include] + [r.phase for r in layer.exclude] for layer in net.layers}
    assert phases["train_only_relu"] == [caffe_pb2.TRAIN] and phases["not_in_test_relu"] == [caffe_pb2.TEST]


# ---------------------------------------------------------------------------
# Binary files
# ---------------------------------------------------------------------------


# The 60 MB DSOD caffemodel has its own tests below, sharing one read.
@pytest.mark.parametrize("path", _fixture_params(["caffe/**/*.caffemodel"], exclude=(DSOD_CAFFEMODEL,)))
def test_every_fixture_caffemodel_parses(path):
    if path is None:
        require_fixture("caffe")
    net = read_caffemodel(path)
    blobs = layer_blobs(net)
    assert blobs and any(blobs.values())
    unknown = _unknown_fields(net)
    if path.name in FOREIGN_CAFFEMODELS:
        assert unknown  # NVCaffe's extra fields are kept, not lost
    else:
        # Every field real SSD-Caffe wrote has a home in our schema: the field
        # numbers of everything these nets use are right.
        assert not unknown, f"{len(unknown)} messages hold unknown fields, e.g. {unknown[:5]}"


def test_dsod_caffemodel_holds_every_parameter(dsod):
    dsod_net = dsod.net
    blobs = layer_blobs(dsod_net)
    n_params = json.loads(require_fixture("caffe/dsod300/blob_shapes.json").read_text())["n_params"]
    assert sum(a.size for arrays in blobs.values() for a in arrays) == n_params == 14_795_828
    assert all(a.dtype == np.float32 for arrays in blobs.values() for a in arrays)
    unknown = _unknown_fields(dsod_net)
    assert not unknown, f"{len(unknown)} messages hold unknown fields, e.g. {unknown[:5]}"


@pytest.mark.parametrize("path", _fixture_params(["caffe/layer_zoo/*/weights.caffemodel"]))
def test_layer_zoo_blobs_equal_the_npz(path):
    if path is None:
        require_fixture("caffe/layer_zoo")
    expected = np.load(path.with_name("weights.npz"))
    blobs = layer_blobs(read_caffemodel(path))
    for key in expected.files:
        layer, index = key.rsplit("/", 1)
        ours = blobs[layer][int(index)]
        assert ours.shape == expected[key].shape, key
        np.testing.assert_array_equal(ours, expected[key], err_msg=key)
    stored = {f"{name}/{i}" for name, arrays in blobs.items() for i in range(len(arrays))}
    assert stored == set(expected.files)


@pytest.mark.parametrize("name", ["branch_v1", "ssd_base_v1", "vgg_lrn_v1"])
@pytest.mark.parametrize("file", ["weights.caffemodel", "upgraded.caffemodel"])
def test_legacy_blobs_keep_their_stored_4d_shape(name, file):
    folder = require_fixture(f"caffe/legacy_v1/{name}")
    net = read_caffemodel(folder / file)
    assert (len(net.layers) > 0) == (file == "weights.caffemodel")
    blobs = layer_blobs(net)
    expected = np.load(folder / "weights.npz")  # modern shapes
    for key in expected.files:
        layer, index = key.rsplit("/", 1)
        ours, modern = blobs[layer][int(index)], expected[key]
        # Caffe's legacy comparison: the modern shape left-padded with 1s to 4 axes.
        assert ours.shape == (1,) * (4 - modern.ndim) + modern.shape, key
        np.testing.assert_array_equal(ours.reshape(modern.shape), modern, err_msg=key)
    if name == "branch_v1":
        assert [a.shape for a in blobs["ip"]] == [(1, 1, 5, 768), (1, 1, 1, 5)]
        assert "conv_b" not in blobs  # the sharer is absent from the file


def test_schema_against_a_hand_decoded_caffemodel(dsod):
    """Layer names, types, blob shapes and values decoded by hand agree with caffe_pb2."""
    limit = 12
    wire = _wire_layers(dsod.raw, NET_LAYER, (LAYER_NAME, LAYER_TYPE, LAYER_BLOBS), limit)
    assert len(wire) == limit and sum(len(b) for _, _, b in wire) >= 8
    for (name, kind, blobs), layer in zip(wire, dsod.net.layer):
        parsed = (layer.name, layer.type, len(layer.blobs))
        assert (name, kind, len(blobs)) == parsed
        for i, ((shape, data), blob) in enumerate(zip(blobs, layer.blobs)):
            ours = blob_to_numpy(blob, layer=name, index=i)
            assert ours.shape == shape
            np.testing.assert_array_equal(ours.ravel(), data)
    first_name = next(bytes(v).decode() for n, v, _ in _wire_fields(dsod.raw) if n == NET_NAME)
    net_name = dsod.net.name
    assert first_name == net_name


def test_schema_against_a_hand_decoded_v1_caffemodel():
    path = require_fixture("caffe/legacy_v1/branch_v1/weights.caffemodel")
    net = read_caffemodel(path)
    wire = _wire_layers(path.read_bytes(), NET_V1_LAYERS, (V1_NAME, V1_TYPE, V1_BLOBS), limit=100)
    assert [w[0] for w in wire] == [layer.name for layer in net.layers] == ["conv_a", "deconv", "ip", "ip_old"]
    for (name, kind, blobs), layer in zip(wire, net.layers):
        layer_type = layer.type
        assert kind == layer_type
        for i, ((shape, data), blob) in enumerate(zip(blobs, layer.blobs)):
            ours = blob_to_numpy(blob, layer=name, index=i)
            assert ours.shape == shape and len(shape) == 4
            np.testing.assert_array_equal(ours.ravel(), data)
    assert caffe_pb2.V1LayerParameter.LayerType.Name(net.layers[1].type) == "DECONVOLUTION"


@pytest.mark.parametrize(
    "deploy, weights",
    [
        ("caffe/layer_zoo/mini_ssd/deploy.prototxt", "caffe/layer_zoo/mini_ssd/weights.caffemodel"),
        ("caffe/dsod300/deploy.prototxt", DSOD_CAFFEMODEL),
    ],
)
def test_binary_layer_settings_equal_the_text_ones(deploy, weights, request):
    """Text is matched by field name, binary by field number: agreement checks the numbers."""
    text = read_prototxt(require_fixture(deploy))
    if weights == DSOD_CAFFEMODEL:
        binary = request.getfixturevalue("dsod").net
    else:
        binary = read_caffemodel(require_fixture(weights))
    stored = {layer.name: layer for layer in binary.layer}
    compared = 0
    for layer in text.layer:
        if layer.name not in stored:
            continue
        # Caffe renames bottoms (split layers) and rewrites ParamSpecs; the
        # layer-specific settings are saved as given.
        for field, value in layer.ListFields():
            if field.name.endswith("_param") and field.name != "param":
                saved = getattr(stored[layer.name], field.name)
                assert saved == value, (layer.name, field.name)
                compared += 1
    assert compared > 5


# ---------------------------------------------------------------------------
# Truncated and wrong files
# ---------------------------------------------------------------------------


@READERS
def test_truncated_caffemodel(dsod, tmp_path, read):
    ends = _top_level_ends(dsod.raw)
    layer_ends = [end for number, end in ends if number == NET_LAYER]
    assert ends[-1][1] == len(dsod.raw) and len(layer_ends) == 485
    # Biggest layer: cut in the middle of its blobs.
    sizes = np.diff([0] + [end for _, end in ends])
    big = int(np.argmax(sizes))
    inside = [1, 3, ends[0][1] + 2, ends[big][1] - sizes[big] // 2, layer_ends[100] - 1, len(dsod.raw) - 1]
    cut = tmp_path / "cut.caffemodel"
    shutil.copyfile(dsod.path, cut)
    with open(cut, "r+b") as f:
        for offset in sorted(inside, reverse=True):  # shrink the one copy step by step
            f.truncate(int(offset))
            f.flush()
            with pytest.raises(CaffeFormatError, match=rf"{re.escape(str(cut))}: .*truncated"):
                read(cut)


def test_cut_between_layers_is_not_detectable(dsod, tmp_path):
    """Protobuf has no end marker: a cut exactly after a layer decodes, minus the later layers."""
    layer_ends = [end for number, end in _top_level_ends(dsod.raw) if number == NET_LAYER]
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes(dsod.raw[: layer_ends[9]])
    net = read_caffemodel(cut)
    assert [layer.name for layer in net.layer] == _wire_layer_names(dsod.raw, 10)
    # Cut before the first layer: decodes to a net without layers, which is refused.
    name_end = _top_level_ends(dsod.raw)[0][1]
    cut.write_bytes(dsod.raw[:name_end])
    with pytest.raises(CaffeFormatError, match="holds no layer"):
        read_caffemodel(cut)


@READERS
def test_empty_caffemodel(tmp_path, read):
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    with pytest.raises(CaffeFormatError, match=rf"{re.escape(str(empty))}: empty file"):
        read(empty)


@pytest.mark.parametrize(
    "wrong, says",
    [
        ("caffe/yufacedetectnet_v1/keliamoniz1.jpg", "JPEG"),
        ("caffe/dsod300/deploy.prototxt", "prototxt"),
        ("caffe/layer_zoo/conv/weights.npz", "zip"),
        ("caffe/prototxt/labelmap_voc.prototxt", "prototxt"),
    ],
)
@READERS
def test_wrong_file_as_caffemodel(wrong, says, read):
    path = require_fixture(wrong)
    with pytest.raises(CaffeFormatError, match=rf"{re.escape(str(path))}: .*{says}"):
        read(path)


@READERS
def test_bytes_that_decode_to_no_layer(tmp_path, read):
    # Field 1 (name, a string) given as a varint: protobuf keeps it as an unknown field.
    odd = tmp_path / "odd.caffemodel"
    odd.write_bytes(b"\x08\x01")
    with pytest.raises(CaffeFormatError, match="holds no layer"):
        read(odd)


@pytest.mark.parametrize("path", _fixture_params(["caffe/**/*.caffemodel"]))
def test_layer_by_layer_reading_equals_the_whole_file(path):
    """CaffemodelLayers (memory-mapped, one layer decoded at a time) gives read_caffemodel's layers."""
    if path is None:
        require_fixture("caffe")
    whole = read_caffemodel(path)
    streamed = CaffemodelLayers(path)
    layers = whole.layer if len(whole.layer) else whole.layers
    assert streamed.name == whole.name and streamed.legacy == (not len(whole.layer)) and len(streamed) == len(layers)
    for a, b in zip(streamed, layers):
        assert a.SerializeToString() == b.SerializeToString()


def test_layer_by_layer_reading_refuses_mixed_layer_kinds(tmp_path):
    mixed = caffe_pb2.NetParameter(name="mixed")
    mixed.layer.add(name="new", type="ReLU")
    mixed.layers.add(name="old")
    path = tmp_path / "mixed.caffemodel"
    path.write_bytes(mixed.SerializeToString())
    with pytest.raises(CaffeFormatError, match="both 'layer' and V1 'layers'"):
        CaffemodelLayers(path)


@pytest.mark.parametrize(
    "binary, says",
    [
        ("caffe/layer_zoo/conv/weights.caffemodel", "read_caffemodel"),
        ("caffe/yufacedetectnet_v1/keliamoniz1.jpg", "JPEG"),
    ],
)
def test_binary_file_as_prototxt(binary, says):
    path = require_fixture(binary)
    with pytest.raises(CaffeFormatError, match=rf"{re.escape(str(path))}: not a text prototxt.*{says}"):
        read_prototxt(path)


@pytest.mark.parametrize(
    "text, where, says",
    [
        ('name: "x"\nlayer {\n  name: "a"\n  type: Convolution\n}\n', "4:9", "Expected string"),
        ('name: "x"\nlayer {\n  name: "a"\n  colour: 3\n}\n', "4:3", 'no field named "colour"'),
        ("layer {\n  convolution_param { num_output: -3 }\n}\n", "2:35", "out of range"),
        ('layer {\n  name: "a"\n', "2:", 'Expected "}"'),
    ],
)
def test_prototxt_syntax_errors_name_line_and_column(tmp_path, text, where, says):
    path = tmp_path / "bad.prototxt"
    path.write_text(text)
    with pytest.raises(CaffeFormatError, match=rf"{re.escape(str(path))}:{where}.*{says}"):
        read_prototxt(path)


def test_unknown_field_is_an_error_unless_allowed(tmp_path):
    path = tmp_path / "solver.prototxt"
    path.write_text('base_lr: 0.01\nfancy_option: 3\nfancier { a: 1 }\nmax_iter: 10\n')
    with pytest.raises(CaffeFormatError, match=rf"{re.escape(str(path))}:2:1: .*fancy_option"):
        read_prototxt(path, "SolverParameter")
    with pytest.warns(UserWarning, match=r":2:1: .*fancy_option"):
        solver = read_prototxt(path, caffe_pb2.SolverParameter, allow_unknown_fields=True)
    assert solver.base_lr == pytest.approx(0.01) and solver.max_iter == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_prototxt(require_fixture("caffe/prototxt/dsod300_voc0712/solver.prototxt"), "SolverParameter",
                      allow_unknown_fields=True)


def test_missing_files(tmp_path):
    missing = tmp_path / "nope.caffemodel"
    for reader in (read_caffemodel, read_prototxt):
        with pytest.raises(CaffeFormatError, match=rf"{re.escape(str(missing))}: cannot read"):
            reader(missing)


def test_unknown_message_type_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError, match="unknown Caffe message type"):
        read_prototxt(tmp_path / "x.prototxt", "NoSuchParameter")


# ---------------------------------------------------------------------------
# Blobs
# ---------------------------------------------------------------------------


def test_blob_shapes_and_fallbacks():
    modern = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[2, 3]), data=np.arange(6, dtype=np.float32))
    assert blob_to_numpy(modern).shape == (2, 3)
    # Caffe writes a 0-d blob without any shape field.
    scalar = caffe_pb2.BlobProto(data=[0.25])
    assert blob_to_numpy(scalar).shape == () and blob_to_numpy(scalar) == np.float32(0.25)
    scalar.shape.SetInParent()
    assert blob_to_numpy(scalar).shape == ()
    # Caffe's precedence when both are present: the legacy fields.
    both = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[6]), num=1, channels=1, height=1, width=6, data=[0] * 6)
    assert blob_to_numpy(both).shape == (1, 1, 1, 6)
    legacy = caffe_pb2.BlobProto(num=1, channels=1, height=2, width=3, double_data=[0.5] * 6)
    out = blob_to_numpy(legacy)
    assert out.shape == (1, 1, 2, 3) and out.dtype == np.float32 and (out == 0.5).all()
    empty = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[0, 4]))
    assert blob_to_numpy(empty).shape == (0, 4)


def test_blob_count_mismatch_names_layer_and_index():
    net = caffe_pb2.NetParameter(name="n")
    layer = net.layer.add(name="fc6", type="InnerProduct")
    layer.blobs.add(shape=caffe_pb2.BlobShape(dim=[2, 3]), data=[0.0] * 6)
    layer.blobs.add(shape=caffe_pb2.BlobShape(dim=[2]), data=[0.0] * 3)
    with pytest.raises(CaffeFormatError, match=r"layer 'fc6' blob 1: shape \(2,\) needs 2 values, the blob holds 3"):
        layer_blobs(net)


def test_layer_blobs_rejects_ambiguous_nets():
    net = caffe_pb2.NetParameter(name="n")
    net.layer.add(name="conv")
    net.layer.add(name="conv")
    with pytest.raises(CaffeFormatError, match="duplicate layer name 'conv'"):
        layer_blobs(net)
    mixed = caffe_pb2.NetParameter(name="m")
    mixed.layer.add(name="a")
    mixed.layers.add(name="b")
    with pytest.raises(CaffeFormatError, match="both 'layer' and V1 'layers'"):
        layer_blobs(mixed)


def test_layer_blobs_keeps_file_order_and_blobless_layers():
    net = read_caffemodel(require_fixture("caffe/layer_zoo/mini_ssd/weights.caffemodel"))
    blobs = layer_blobs(net)
    assert list(blobs) == [layer.name for layer in net.layer]
    assert any(arrays == [] for arrays in blobs.values())


# ---------------------------------------------------------------------------
# The generated module
# ---------------------------------------------------------------------------


def test_generated_module_is_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) is needed to regenerate caffe_pb2.py")
    fresh = generate_pb2.generate(tmp_path)
    committed = Path(caffe_pb2.__file__)
    assert fresh.read_bytes() == committed.read_bytes(), "run: python -m toolkit.caffe.generate_pb2"


def test_gencode_is_not_newer_than_the_runtime():
    from google.protobuf import __version__ as runtime

    text = Path(caffe_pb2.__file__).read_text()
    match = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", text)
    assert match, "no runtime-version check in caffe_pb2.py"
    gencode = tuple(int(g) for g in match.groups())
    assert gencode <= tuple(int(p) for p in runtime.split(".")[:3])
