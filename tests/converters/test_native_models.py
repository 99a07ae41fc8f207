"""The toolkit's native DSOD300, SSD300 and GRP-DSOD320 load a converted Caffe checkpoint through
their rename tables and compute what the Caffe interpreter computes from the same blobs.

No trained caffemodel exists for SSD300 or GRP-DSOD320 in the fixtures, so the blobs are
random (BatchNorm statistics, Scale and every filler-initialised weight): every layer of the
real deploy prototxt must land on the right module for the outputs to agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import require_fixture, voc_subset
from converters.caffe import load_caffe_net
from converters.caffe.cli import caffe_blobs
from toolkit.data.voc import VOC_CLASSES
from toolkit.engine import load_trained_model
from toolkit.models.caffe_import import CONVERTED_BLOBS_KEY

CASES = [("dsod300", "dsod300_voc0712", 300), ("ssd300", "ssd300_vgg16_voc0712", 300),
         ("grp_dsod320", "grp_dsod320_voc0712", 320)]


def _randomize(net, generator: torch.Generator) -> None:
    """Caffe-like random blobs: BatchNorm [mean f, var f, f], Scale [gamma, beta], others around their fillers."""
    with torch.no_grad():
        for spec in net.layer_specs:
            layer = net.layer(spec.name)
            blobs = layer.blobs()
            if not blobs:
                continue
            if layer.caffe_type == "BatchNorm":
                f = 0.5 + torch.rand((), generator=generator).item()
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=generator) * 0.1 * f)
                blobs[1].copy_((0.5 + 1.5 * torch.rand(blobs[1].shape, generator=generator)) * f)
                blobs[2].fill_(f)
            elif layer.caffe_type == "Scale":
                blobs[0].copy_(0.8 + 0.4 * torch.rand(blobs[0].shape, generator=generator))
                if len(blobs) > 1:
                    blobs[1].copy_(torch.randn(blobs[1].shape, generator=generator) * 0.05)
            elif layer.caffe_type == "Normalize":
                blobs[0].copy_(15 + 10 * torch.rand(blobs[0].shape, generator=generator))
            else:  # Convolution, Deconvolution, InnerProduct: He-scaled weights, small biases
                w = blobs[0]
                fan_in = w[0].numel() if layer.caffe_type != "Deconvolution" else w.shape[0] * w[0, 0].numel()
                w.copy_(torch.randn(w.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                for b in blobs[1:]:
                    b.copy_(torch.randn(b.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("name,folder,size", CASES, ids=[c[0] for c in CASES])
def test_native_model_from_a_converted_checkpoint_equals_the_interpreter(name, folder, size, tmp_path):
    prototxt = require_fixture(f"caffe/prototxt/{folder}/deploy.prototxt")
    net = load_caffe_net(prototxt, input_shapes={"data": (1, 3, size, size)}).eval()
    _randomize(net, torch.Generator().manual_seed(0))
    checkpoint = net.checkpoint()
    checkpoint[CONVERTED_BLOBS_KEY] = caffe_blobs(net)
    path = tmp_path / f"{name}.pth"
    torch.save(checkpoint, path)

    model, classes, got_name = load_trained_model(path, "cpu", name, ("background", *VOC_CLASSES))
    assert got_name == name and len(classes) == 21
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net({"data": image}, blobs=["mbox_loc", "mbox_conf", "mbox_priorbox"])
        out = model(image)
    n = image.shape[0]
    loc, conf = ref["mbox_loc"].reshape(n, -1), ref["mbox_conf"].reshape(n, -1)
    scale_loc, scale_conf = loc.abs().max().item(), conf.abs().max().item()
    np.testing.assert_allclose(out["loc"].reshape(n, -1).numpy(), loc.numpy(), rtol=1e-4, atol=1e-5 * max(1, scale_loc))
    np.testing.assert_allclose(out["conf"].reshape(n, -1).numpy(), conf.numpy(), rtol=1e-4,
                               atol=1e-5 * max(1, scale_conf))
    priors = ref["mbox_priorbox"].reshape(2, -1, 4)
    np.testing.assert_allclose(out["priors"].numpy(), priors[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(out["variances"].numpy(), priors[1].numpy(), atol=1e-7)


def test_evaluate_and_predict_a_converted_caffe_model(tmp_path, capsys):
    """``toolkit.evaluate --checkpoint OUT.pth --model dsod300`` and ``toolkit.predict --model`` on two
    real VOC images, with the DSOD300 fixture converted by the CLI."""
    import json

    from converters.caffe.__main__ import main as caffe_main
    from toolkit.evaluate import main as evaluate_main
    from toolkit.predict import main as predict_main

    root = require_fixture("caffe/dsod300")
    ids = voc_subset(tmp_path / "data", 2)
    voc = tmp_path / "data" / "VOCdevkit" / "VOC2012"

    converted = tmp_path / "dsod300.pth"
    assert caffe_main(["convert", str(root / "deploy.prototxt"), str(root / "random_init.caffemodel"),
                       "-o", str(converted)]) == 0
    out = tmp_path / "map.json"
    assert evaluate_main(["--checkpoint", str(converted), "--model", "dsod300", "--dataset", "voc12val",
                          "--data-root", str(tmp_path / "data"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"metric", "mAP", "ap"} and 0.0 <= result["mAP"] <= 1.0
    # Without --model the preset is the one whose Caffe layer names the checkpoint has: the same figures.
    again = tmp_path / "map_auto.json"
    assert evaluate_main(["--checkpoint", str(converted), "--dataset", "voc12val",
                          "--data-root", str(tmp_path / "data"), "--json", str(again)]) == 0
    assert json.loads(again.read_text()) == result
    # A model the layers do not fit is refused naming them, and the converters.caffe command is suggested.
    assert evaluate_main(["--checkpoint", str(converted), "--model", "ssd300", "--dataset", "voc12val",
                          "--data-root", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert "does not load into ssd300" in err and "python -m converters.caffe evaluate" in err
    image = voc / "JPEGImages" / f"{ids[0]}.jpg"
    assert predict_main(["--checkpoint", str(converted), "--model", "dsod300", str(image),
                         "--out", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / f"{ids[0]}.png").is_file()
