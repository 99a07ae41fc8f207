"""Native models from Caffe blobs: the rename-table round trip, ``--init-from`` with another
label set, and DSOD300 loaded from a converted checkpoint against real Caffe's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import require_fixture
from toolkit.caffe import layer_blobs, read_caffemodel
from toolkit.data.voc import VOC_CLASSES
from toolkit.engine import load_trained_model
from toolkit.models.build import build_model
from toolkit.models.caffe_import import (
    CONVERTED_BLOBS_KEY,
    CaffeWeightsError,
    export_caffe_blobs,
    init_from_checkpoint,
    load_caffe_blobs,
)


def _trained_like(num_classes: int, seed: int = 0) -> torch.nn.Module:
    """dsod_tiny with random weights and random BatchNorm statistics (nothing at its defaults)."""
    torch.manual_seed(seed)
    model = build_model("dsod_tiny", num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model


def _converted(model) -> dict:
    return {CONVERTED_BLOBS_KEY: {k: [torch.from_numpy(b) for b in v]
                                  for k, v in export_caffe_blobs(model, model.caffe_names).items()}}


def test_export_then_load_is_the_identity():
    source = _trained_like(7)
    target = build_model("dsod_tiny", 7)
    mapping = load_caffe_blobs(target, target.caffe_names, export_caffe_blobs(source, source.caffe_names))
    assert len(set(mapping.values())) == len(mapping)
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_init_from_a_converted_model_with_other_classes_keeps_a_fresh_conf_head():
    source = _trained_like(7)
    target = build_model("dsod_tiny", 4)
    fresh_conf = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("head.conf.")}
    notes = init_from_checkpoint(target, _converted(source), "src.pth")
    assert len(notes) == 1 and "confidence head" in notes[0]
    src, dst = source.state_dict(), target.state_dict()
    for k, v in dst.items():
        if k.startswith("head.conf."):
            torch.testing.assert_close(v, fresh_conf[k], rtol=0, atol=0)
        elif not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(v, src[k], rtol=0, atol=0, msg=k)


def test_init_from_a_training_checkpoint_and_errors_name_the_source():
    source = _trained_like(7)
    target = build_model("dsod_tiny", 7)
    assert init_from_checkpoint(target, {"model": source.state_dict(), "model_name": "dsod_tiny"}, "a.pth") == []
    torch.testing.assert_close(target.state_dict()["head.loc.0.conv.weight"], source.state_dict()["head.loc.0.conv.weight"])
    other = build_model("ssd_tiny", 7)
    with pytest.raises(CaffeWeightsError, match=r"b\.pth: a checkpoint of another model"):
        init_from_checkpoint(target, {"model": other.state_dict(), "model_name": "ssd_tiny"}, "b.pth")
    with pytest.raises(CaffeWeightsError, match=r"c\.pth: neither"):
        init_from_checkpoint(target, {"weights": {}}, "c.pth")
    broken = _converted(source)
    del broken[CONVERTED_BLOBS_KEY]["First"]
    with pytest.raises(CaffeWeightsError, match=r"d\.pth: .*First"):
        init_from_checkpoint(target, broken, "d.pth")


@pytest.mark.parametrize("name, head", [("dsod_tiny", "head.conf."), ("gfl_dsod_tiny", "head.cls.")])
def test_init_from_a_training_checkpoint_with_other_classes_keeps_a_fresh_class_head(name, head):
    torch.manual_seed(1)
    source = build_model(name, 7)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)  # nothing at its initial value
    target = build_model(name, 4)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    notes = init_from_checkpoint(target, {"model": source.state_dict(), "model_name": name}, "a.pth")
    assert len(notes) == 1 and "class head" in notes[0] and head in notes[0]
    src = source.state_dict()
    for k, v in target.state_dict().items():
        if k.startswith(head):
            torch.testing.assert_close(v, fresh[k], rtol=0, atol=0, msg=k)
        else:  # the backbone, the box head and any class towers (head.cls_towers.*) are loaded
            torch.testing.assert_close(v, src[k], rtol=0, atol=0, msg=k)


def test_train_init_from_a_converted_checkpoint(tmp_path):
    from toolkit import train as train_mod
    from toolkit.data.shapes import generate_shapes

    generate_shapes(tmp_path / "data" / "shapes", seed=5, num_train=8, num_test=2, progress=False)
    source = _trained_like(7, seed=1)
    torch.save(_converted(source), tmp_path / "converted.pth")
    out = tmp_path / "run"
    # lr 0: the step changes nothing but the BatchNorm statistics.
    assert train_mod.main(["--dataset", "shapes", "--model", "dsod_tiny", "--data-root", str(tmp_path / "data"),
                           "--out", str(out), "--batch-size", "4", "--no-progress", "--iters", "1", "--lr", "0",
                           "--workers", "0", "--init-from", str(tmp_path / "converted.pth")]) == 0
    trained = torch.load(out / "checkpoint.pth", weights_only=True)["model"]
    for k, v in source.state_dict().items():
        if k.endswith(("weight", "bias")):
            torch.testing.assert_close(trained[k], v, rtol=0, atol=0, msg=k)


def test_dsod300_from_a_converted_checkpoint_computes_what_caffe_computed(tmp_path):
    root = require_fixture("caffe/dsod300")
    blobs = layer_blobs(read_caffemodel(root / "random_init.caffemodel"))
    path = tmp_path / "dsod300.pth"
    torch.save({CONVERTED_BLOBS_KEY: {k: [torch.from_numpy(b) for b in v] for k, v in blobs.items()}}, path)
    with pytest.raises(ValueError, match="converted Caffe checkpoint"):
        load_trained_model(path)
    model, classes, name = load_trained_model(path, "cpu", "dsod300", ("background", *VOC_CLASSES))
    assert name == "dsod300" and len(classes) == 21
    ref = np.load(root / "forward_2007_000027.npz")
    with torch.no_grad():
        out = model(torch.from_numpy(ref["data"]))
    n = out["loc"].shape[0]
    np.testing.assert_allclose(out["loc"].reshape(n, -1).numpy(), ref["mbox_loc"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["conf"].reshape(n, -1).numpy(), ref["mbox_conf"], rtol=1e-4, atol=1e-5)


def test_each_preset_is_recognised_by_its_caffe_layer_names():
    from toolkit.models.build import MODELS, build_model, presets_for_caffe_layers

    for name in MODELS:
        with torch.device("meta"):
            model = build_model(name, 3)
        layers = [n for names in model.caffe_names.values() for n in names]
        assert presets_for_caffe_layers(layers) == [name]
        assert presets_for_caffe_layers(layers[:-1]) == []  # a layer short: no preset
        assert presets_for_caffe_layers(layers + ["extra_conv"]) == []
