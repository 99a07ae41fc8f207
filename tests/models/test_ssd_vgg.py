"""SSD300-VGG16: every learnable tensor has the shape of the corresponding blob of SSD's deploy net."""

from __future__ import annotations

import torch

from conftest import require_fixture
from toolkit.models.build import build_model


def _caffe_blob_shapes(net) -> dict[str, list[tuple[int, ...]]]:
    """Blob shapes of the Convolution / Normalize layers, by channel propagation over the prototxt."""
    channels = {"data": 3}
    shapes = {}
    for layer in net.layer:
        bottoms, tops = list(layer.bottom), list(layer.top)
        if layer.type == "Convolution":
            p = layer.convolution_param
            k = p.kernel_size[0] if p.kernel_size else p.kernel_h
            blobs = [(p.num_output, channels[bottoms[0]] // max(1, p.group), k, k)]
            if p.bias_term:
                blobs.append((p.num_output,))
            shapes[layer.name] = blobs
            channels[tops[0]] = p.num_output
        elif layer.type == "Normalize":
            shapes[layer.name] = [(channels[bottoms[0]],)]
            channels[tops[0]] = channels[bottoms[0]]
        elif layer.type in ("ReLU", "Pooling") and bottoms:
            channels[tops[0]] = channels[bottoms[0]]
    return shapes


def test_ssd300_names_and_shapes_match_the_deploy_net():
    from toolkit.caffe import read_prototxt

    net = read_prototxt(require_fixture("caffe/prototxt/ssd300_vgg16_voc0712/deploy.prototxt"))
    caffe = _caffe_blob_shapes(net)
    model = build_model("ssd300", 21)
    modules = dict(model.named_modules())
    mapped = sorted(n for names in model.caffe_names.values() for n in names)
    assert mapped == sorted(caffe)
    for path, (name,) in model.caffe_names.items():
        m = modules[path]
        ours = [tuple(m.weight.shape)] + ([tuple(m.bias.shape)] if getattr(m, "bias", None) is not None else [])
        assert ours == caffe[name], (path, name)


def test_ssd300_priors_and_outputs():
    model = build_model("ssd300", 21).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 300, 300))
    assert out["priors"].shape == (8732, 4)  # SSD300's famous prior count
    assert out["loc"].shape == (1, 8732, 4) and out["conf"].shape == (1, 8732, 21)
    tiny = build_model("ssd_tiny", 7).eval()
    with torch.no_grad():
        out = tiny(torch.zeros(2, 3, 160, 160))
    assert out["loc"].shape[1] == out["priors"].shape[0] == out["conf"].shape[1]
