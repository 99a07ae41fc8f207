"""GRP-DSOD320 against the GRP-DSOD generator's deploy net, and its gate against real Caffe.

- every learnable Caffe blob (shapes computed by propagating channels over the parsed
  prototxt) corresponds to exactly one of our tensors, with the same shape, BatchNorm eps
  and trainability (``lr_mult: 0``);
- the 320x320 output shapes and the prior count follow from the prototxt's PriorBox layers;
- the gate reproduces real Caffe's outputs of the ``grp_gate`` layer-zoo net;
- the small preset trains (forward + backward) on CPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import require_fixture
from toolkit.models.build import GRP_DSOD320_PRIORS, build_model
from toolkit.models.caffe_import import load_caffe_blobs
from toolkit.models.grp_dsod import RecurrentGate

PROTOTXT = "caffe/prototxt/grp_dsod320_voc0712/deploy.prototxt"


@pytest.fixture(scope="module")
def deploy_net():
    from toolkit.caffe import read_prototxt

    return read_prototxt(require_fixture(PROTOTXT))


def _kernel(p) -> int:
    return p.kernel_size[0] if p.kernel_size else p.kernel_h


def _caffe_blob_shapes(net) -> tuple[dict[str, list[tuple[int, ...]]], dict]:
    """``layer name → blob shapes`` for every layer with learnable blobs, by channel propagation
    over the prototxt, and ``layer name → layer``."""
    channels = {name: int(shape.dim[1]) for name, shape in zip(net.input, net.input_shape)}
    flat = set()  # blobs of shape (N, C) or (N, C, 1, 1): InnerProduct's K is their channel count
    shapes: dict[str, list[tuple[int, ...]]] = {}
    layers = {}
    for layer in net.layer:
        layers[layer.name] = layer
        b, t, kind = list(layer.bottom), list(layer.top), layer.type
        if kind in ("Convolution", "Deconvolution"):
            p = layer.convolution_param
            c_in, c_out, g, k = channels[b[0]], p.num_output, max(1, p.group), _kernel(p)
            weight = (c_out, c_in // g, k, k) if kind == "Convolution" else (c_in, c_out // g, k, k)
            shapes[layer.name] = [weight] + ([(c_out,)] if p.bias_term else [])
            channels[t[0]] = c_out
        elif kind == "BatchNorm":
            c = channels[b[0]]
            shapes[layer.name] = [(c,), (c,), (1,)]
            channels[t[0]] = c
        elif kind == "Scale":
            if len(b) == 1:  # learned gamma (+ beta); with two bottoms it multiplies by the second
                c = channels[b[0]]
                shapes[layer.name] = [(c,)] + ([(c,)] if layer.scale_param.bias_term else [])
            channels[t[0]] = channels[b[0]]
        elif kind == "InnerProduct":
            p = layer.inner_product_param
            assert b[0] in flat, f"{layer.name}: K is the channel count only for a flat bottom"
            shapes[layer.name] = [(p.num_output, channels[b[0]])] + ([(p.num_output,)] if p.bias_term else [])
            channels[t[0]] = p.num_output
            flat.add(t[0])
        elif kind == "Normalize":
            shapes[layer.name] = [(1,) if layer.norm_param.channel_shared else (channels[b[0]],)]
            channels[t[0]] = channels[b[0]]
        elif kind == "Concat" and all(x in channels for x in b):  # feature maps (not the flattened head)
            assert layer.concat_param.axis == 1, layer.name
            channels[t[0]] = sum(channels[x] for x in b)
        elif kind in ("ReLU", "Sigmoid", "Pooling", "Eltwise", "Reshape") and b[0] in channels:
            channels[t[0]] = channels[b[0]]
            if kind == "Pooling" and layer.pooling_param.global_pooling:
                flat.add(t[0])
            elif kind != "Pooling" and b[0] in flat:
                flat.add(t[0])
    return shapes, layers


def test_learnable_tensors_correspond_one_to_one(deploy_net):
    caffe, layers = _caffe_blob_shapes(deploy_net)
    assert {layers[n].type for n in caffe} == {"Convolution", "Deconvolution", "BatchNorm", "Scale",
                                               "InnerProduct", "Normalize"}
    gate_scales = [n for n, layer in layers.items() if layer.type == "Scale" and len(layer.bottom) == 2]
    assert len(gate_scales) == 12 and not set(gate_scales) & set(caffe)  # Scale88 … Scale99: no blobs
    model = build_model("grp_dsod320", 21)
    modules = dict(model.named_modules())
    mapped = [n for names in model.caffe_names.values() for n in names]
    assert len(mapped) == len(set(mapped)), "a Caffe layer is mapped twice"
    assert sorted(mapped) == sorted(caffe), "every Caffe layer with blobs is mapped exactly once"
    for path, names in model.caffe_names.items():
        m = modules[path]
        if len(names) == 2:  # BatchNorm + Scale on the same blob → one nn.BatchNorm2d
            bn, scale = layers[names[0]], layers[names[1]]
            assert (bn.type, scale.type) == ("BatchNorm", "Scale") and list(scale.bottom) == list(bn.top), path
            ours = [tuple(m.running_mean.shape), tuple(m.running_var.shape), (1,)]
            assert ours == caffe[names[0]], path
            assert [tuple(m.weight.shape), tuple(m.bias.shape)] == caffe[names[1]], path
            assert m.eps == pytest.approx(bn.batch_norm_param.eps, rel=1e-6), path  # 1e-4 backbone, 1e-3 head
        else:
            (name,) = names
            ours = [tuple(m.weight.shape)] + ([tuple(m.bias.shape)] if getattr(m, "bias", None) is not None else [])
            assert ours == caffe[name], (path, name)
            params = layers[name].param
            trainable = not params or params[0].lr_mult > 0  # Deconvolution: lr_mult 0 (fixed bilinear filler)
            assert m.weight.requires_grad == trainable, (path, name)
    # The table loads a caffemodel of this net (blobs with the computed shapes) with nothing left over.
    rng = np.random.default_rng(0)
    blobs = {n: [rng.standard_normal(s).astype(np.float32) for s in shapes] for n, shapes in caffe.items()}
    for n, layer in layers.items():
        if layer.type == "BatchNorm":
            blobs[n][1] = np.abs(blobs[n][1])
            blobs[n][2] = np.full((1,), 2.0, np.float32)
    mapping = load_caffe_blobs(model, model.caffe_names, blobs)
    assert mapping["Deconvolution4/0"] == "backbone.deconvs.3.conv.weight"
    assert mapping["InnerProduct2/1"] == "backbone.gates.0.global_fc.bias"
    deconv4 = modules["backbone.deconvs.3.conv"].weight
    np.testing.assert_array_equal(deconv4.detach().numpy(), blobs["Deconvolution4"][0])
    np.testing.assert_allclose(modules["backbone.stem.0.bn"].running_mean.numpy(), blobs["BatchNorm1"][0] / 2)


def _prior_box_params(net):
    return [layer.prior_box_param for layer in net.layer if layer.type == "PriorBox"]


def test_priors_and_output_shapes_at_320(deploy_net):
    params = _prior_box_params(deploy_net)
    assert len(params) == 6
    for spec, p in zip(GRP_DSOD320_PRIORS, params):
        assert spec.min_sizes == pytest.approx(tuple(p.min_size)) and spec.max_sizes == pytest.approx(tuple(p.max_size))
        assert spec.aspect_ratios == pytest.approx(tuple(p.aspect_ratio))
        assert (spec.flip, spec.clip, spec.offset) == (p.flip, p.clip, pytest.approx(p.offset))
        assert spec.step == pytest.approx(p.step) and spec.variances == pytest.approx(tuple(p.variance))
    # Boxes per cell from the prototxt: min, sqrt(min * max), two per aspect ratio other than 1 (flip).
    per_cell = [len(p.min_size) * (1 + 2 * len(p.aspect_ratio)) + len(p.max_size) for p in params]
    assert per_cell == [8, 8, 8, 8, 6, 6]
    heads = {layer.name: layer.convolution_param.num_output
             for layer in deploy_net.layer if layer.type == "Convolution"}
    for k, n in enumerate(per_cell, start=1):
        assert heads[f"Recurrent{k}_gate_norm_mbox_loc"] == 4 * n
        assert heads[f"Recurrent{k}_gate_norm_mbox_conf"] == 21 * n

    # Shapes only: the meta device runs no arithmetic (the CPU forward at 320 takes seconds).
    with torch.device("meta"):
        model = build_model("grp_dsod320", 21).eval()
    x = torch.empty(2, 3, 320, 320, device="meta")
    with torch.no_grad():
        sources = model.backbone(x)
        out = model(x)
    assert [tuple(s.shape[1:]) for s in sources] == [
        (1184, 40, 40), (513, 20, 20), (258, 10, 10), (258, 5, 5), (258, 3, 3), (256, 2, 2)]
    num_priors = sum(s.shape[-2] * s.shape[-1] * n for s, n in zip(sources, per_cell))
    assert num_priors == 17078
    assert out["loc"].shape == (2, num_priors, 4) and out["conf"].shape == (2, num_priors, 21)
    assert out["priors"].shape == out["variances"].shape == (num_priors, 4)
    assert model.backbone.deconv_kernels == tuple(
        _kernel(layer.convolution_param) for layer in deploy_net.layer if layer.type == "Deconvolution")


def test_gate_reproduces_real_caffe():
    from toolkit.caffe import layer_blobs, read_caffemodel

    folder = require_fixture("caffe/layer_zoo/grp_gate")
    blobs = {k: v for k, v in layer_blobs(read_caffemodel(folder / "weights.caffemodel")).items() if v}
    x = np.load(folder / "input.npz")["x"]
    ref = np.load(folder / "output.npz")
    gate = RecurrentGate(x.shape[1], blobs["x_fc"][0].shape[0]).eval()
    load_caffe_blobs(gate, {"fc": ("x_fc",), "channel_fc": ("ip_c",), "global_fc": ("ip_1",)}, blobs)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        channel, glob = gate.gates(xt)
        y = gate(xt)
    for got, name in ((channel, "ip_c"), (glob, "ip_1"), (y, "x_gate")):
        np.testing.assert_allclose(got.numpy(), ref[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_tiny_preset_forward_backward():
    torch.manual_seed(0)
    model = build_model("grp_dsod_tiny", 7).train()
    x = torch.randn(2, 3, 160, 160)
    sources = model.backbone(x)
    assert [tuple(s.shape[-2:]) for s in sources] == [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
    out = model(x)
    p = out["priors"].shape[0]
    assert p == sum(h * w * n for (h, w), n in zip([(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)],
                                                   model.prior_generator.num_priors_per_cell()))
    assert out["loc"].shape == (2, p, 4) and out["conf"].shape == (2, p, 7)
    loss = out["loc"].square().mean() + torch.logsumexp(out["conf"], dim=-1).mean()
    loss.backward()
    for name, param in model.named_parameters():
        if ".deconvs." in name and name.endswith("conv.weight"):
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert math.isfinite(loss.item())
    with pytest.raises(ValueError, match="built for 160x160"):
        model.eval()(torch.zeros(1, 3, 150, 150))
