"""Shared building blocks: Caffe's JaccardOverlap and Normalize (L2Norm); the strided-convolution guard."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from toolkit.models.box_coder import jaccard_normalized
from toolkit.models.build import build_model
from toolkit.models.layers import L2Norm, StridedConv2d, guard_strided_convs


def _random_boxes(gen: torch.Generator, *shape: int) -> torch.Tensor:
    xy = torch.rand(*shape, 2, generator=gen)
    wh = torch.rand(*shape, 2, generator=gen) * 0.4 + 1e-3
    return torch.cat([xy, xy + wh], dim=-1)


@pytest.mark.parametrize("a_count,b_count", [(300, 5), (5, 300), (7, 7)])
def test_jaccard_equals_torchvision_box_iou(a_count, b_count):
    gen = torch.Generator().manual_seed(a_count * 1000 + b_count)
    a, b = _random_boxes(gen, a_count), _random_boxes(gen, b_count)
    iou = jaccard_normalized(a, b)
    assert iou.shape == (a_count, b_count)
    torch.testing.assert_close(iou, box_iou(a, b), rtol=1e-5, atol=1e-7)


def test_jaccard_layout_switch_is_bit_exact_and_batched():
    # The longer list goes on the contiguous axis; the values must not move by one bit.
    gen = torch.Generator().manual_seed(0)
    priors = _random_boxes(gen, 1000)
    gt = _random_boxes(gen, 4, 6)
    gt[1, 2] = gt[1, 1]                                  # duplicate box
    gt[2, 0] = torch.tensor([0.5, 0.5, 0.4, 0.6])        # xmax < xmin: size 0
    batched = jaccard_normalized(priors, gt)             # (4, 1000, 6) by broadcasting
    assert batched.shape == (4, 1000, 6)
    for i in range(4):
        forward = jaccard_normalized(priors, gt[i])
        backward = jaccard_normalized(gt[i], priors).T
        assert torch.equal(forward, backward)
        assert torch.equal(batched[i], forward)
    assert torch.equal(batched[1, :, 2], batched[1, :, 1])
    assert bool((batched[2, :, 0] == 0).all())


def test_jaccard_disjoint_and_touching_boxes_are_zero():
    a = torch.tensor([[0.0, 0.0, 0.2, 0.2]])
    b = torch.tensor([[0.3, 0.3, 0.5, 0.5], [0.2, 0.0, 0.4, 0.2], [0.1, 0.1, 0.3, 0.3]])
    iou = jaccard_normalized(a, b)[0]
    assert iou[0] == 0 and iou[1] == 0
    assert iou[2] == pytest.approx(0.01 / 0.07)


def test_l2norm_is_caffe_normalize_in_float32():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 4, generator=gen)
    layer = L2Norm(5, init_scale=20.0)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 6.0))
    x64 = x.double().numpy()
    want = x64 / np.sqrt((x64 ** 2).sum(axis=1, keepdims=True) + 1e-10) * np.arange(1.0, 6.0)[None, :, None, None]
    y = layer(x)
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-6)


def test_l2norm_keeps_bfloat16_under_autocast():
    # A float32 scale must not promote a bfloat16 map (the convolutions after it would cast back).
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 6, 6, generator=gen)
    layer = L2Norm(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x).detach(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_loc_conf_head_equals_separate_modules(channels_last):
    # SSDHead runs each source's loc and conf ConvBN as one convolution + one batch norm.
    from toolkit.models.ssd import ConvBN, SSDHead

    torch.manual_seed(0)
    # float64: BatchNorm's backward cancels large terms, float32 summation orders would differ visibly.
    head = SSDHead([6, 5], [2, 3], 4, normalize=[True, False], batch_norm=True, bn_momentum=0.2).double()
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(head)

    def separate(sources):
        locs, confs = [], []
        for x, norm, loc, conf in zip(sources, reference.norms, reference.loc, reference.conf):
            x = norm(x)
            locs.append(loc(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, 4))
            confs.append(conf(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, 4))
        return torch.cat(locs, 1), torch.cat(confs, 1)

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):
        sources = [torch.randn(3, 6, 5, 4, dtype=torch.float64).to(memory_format=fmt),
                   torch.randn(3, 5, 3, 3, dtype=torch.float64).to(memory_format=fmt)]
        loc, conf = head(sources)
        loc_ref, conf_ref = separate(sources)
        torch.testing.assert_close(loc, loc_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(conf, conf_ref, rtol=1e-10, atol=1e-12)
        (loc.square().sum() + conf.sin().sum()).backward()
        (loc_ref.square().sum() + conf_ref.sin().sum()).backward()
    assert isinstance(head.loc[0], ConvBN)
    fused_state, ref_state = head.state_dict(), reference.state_dict()
    for name, value in ref_state.items():
        torch.testing.assert_close(fused_state[name], value, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    for (name, p), (_, q) in zip(head.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")
    assert int(head.loc[1].bn.num_batches_tracked) == 3

    head.eval()
    reference.eval()
    sources = [torch.randn(2, 6, 5, 4, dtype=torch.float64), torch.randn(2, 5, 3, 3, dtype=torch.float64)]
    for got, want in zip(head(sources), separate(sources)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    # BatchNorms that differ (here eps) cannot share one call: each runs on its own.
    for model in (head, reference):
        model.conf[0].bn.eps = 0.5
    for got, want in zip(head(sources), separate(sources)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size,kernel,stride,padding", [((1, 1), 3, 2, 1), ((2, 1), 3, 2, 1), ((2, 2), 3, 3, 1),
                                                        ((5, 5), 3, 2, 1)])
def test_guarded_strided_conv_gradients_under_cpu_autocast(size, kernel, stride, padding):
    """Under CPU bfloat16 autocast the guarded convolution's weight gradient is the float32 one to bfloat16
    rounding, also where the output is one pixel tall or wide: PyTorch's bfloat16 kernel returns garbage there
    (up to 1e36, a new value each call), so each case runs five times."""
    gen = torch.Generator().manual_seed(size[0] * 10 + size[1] + stride)
    conv = torch.nn.Conv2d(32, 32, kernel, stride, padding)
    reference = copy.deepcopy(conv)
    assert guard_strided_convs(conv) == 1 and type(conv) is StridedConv2d
    for _ in range(5):
        x = torch.randn(24, 32, *size, generator=gen)
        conv.zero_grad()
        reference.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        weight = torch.randn(y.shape, generator=gen)
        (y.float() * weight).sum().backward()
        (reference(x) * weight).sum().backward()
        scale = reference.weight.grad.abs().max()
        assert (conv.weight.grad - reference.weight.grad).abs().max() <= 0.02 * scale
        torch.testing.assert_close(conv.bias.grad, reference.bias.grad, rtol=0.02, atol=0.02 * scale)


def test_guard_converts_strided_convs_in_place_and_keeps_the_state_dict():
    model = build_model("dsod_tiny", 7)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    strided = [m for m in model.modules() if type(m) is torch.nn.Conv2d and max(m.stride) > 1]
    assert strided and guard_strided_convs(model) == len(strided)
    assert all(type(m) is StridedConv2d for m in strided)
    assert list(model.parameters()) == params  # the same Parameter objects: an optimizer built before still holds
    assert model.state_dict().keys() == state.keys()
    assert guard_strided_convs(model) == 0
    model.eval()
    x = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        guarded = model(x)
        for m in strided:
            m.__class__ = torch.nn.Conv2d
        plain = model(x)
    torch.testing.assert_close(guarded["loc"], plain["loc"], rtol=0, atol=0)
