"""Prior boxes against real SSD-Caffe PriorBox outputs."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import require_fixture
from toolkit.models.priors import PriorBoxSpec, PriorGenerator, caffe_priorbox_blob, prior_boxes

V4 = (0.1, 0.1, 0.2, 0.2)

# The prior_box_param of each layer of layer_zoo/priorbox/deploy.prototxt and its feature bottom.
LAYER_ZOO = {
    "pb_basic": ("f1", PriorBoxSpec((20.0,), (45.0,), (2.0,), True, False, V4, step=20.0, offset=0.5)),
    "pb_multi_minmax_clip": ("f2", PriorBoxSpec((15.5, 40.0), (30.0, 70.7), (2.0, 3.0), True, True, V4)),
    "pb_nomax_dupar_stephw": ("f1", PriorBoxSpec((30.0,), (), (2.0, 0.5, 1.0), True, False, (0.2,),
                                                 step_h=18.0, step_w=22.0, offset=0.25)),
    "pb_imghw_noflip": ("f2", PriorBoxSpec((25.0,), (50.0,), (3.0,), False, False, (), img_h=90, img_w=150)),
    "pb_imgsize_offset0": ("f3", PriorBoxSpec((60.0,), (90.0,), (2.0,), True, True, (0.1, 0.2, 0.3, 0.4),
                                              img_size=110, offset=0.0)),
    "pb_dsod_like": ("f1", PriorBoxSpec((30.0,), (60.0,), (2.0,), True, False, V4, step=8.0, offset=0.5)),
}


@pytest.mark.parametrize("name", sorted(LAYER_ZOO))
def test_layer_zoo_priorbox(name):
    folder = require_fixture("caffe/layer_zoo/priorbox")
    inputs = np.load(folder / "input.npz")
    expected = np.load(folder / "output.npz")[name]
    bottom, spec = LAYER_ZOO[name]
    boxes, variances = prior_boxes(spec, inputs[bottom].shape[2:], inputs["data"].shape[2:])
    got = caffe_priorbox_blob(boxes, variances).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_multibox_loss_priors_from_four_layers():
    """The concatenated priors of multibox_loss/_priors/priorbox_net.prototxt (300x300 input)."""
    blob = np.load(require_fixture("caffe/multibox_loss/dsod/input.npz"))["mbox_priorbox"]
    gen = PriorGenerator((
        PriorBoxSpec((30,), (60,), (2,), True, False, V4, step=30),
        PriorBoxSpec((60,), (111,), (2, 3), True, False, V4, step=60),
        PriorBoxSpec((111,), (162,), (2, 3), True, False, V4, step=100),
        PriorBoxSpec((162,), (213,), (2,), True, False, V4, step=300),
    ))
    boxes, variances = gen([(10, 10), (5, 5), (3, 3), (1, 1)], (300, 300))
    assert gen.num_priors_per_cell() == [4, 6, 6, 4]
    np.testing.assert_allclose(caffe_priorbox_blob(boxes, variances).numpy(), blob, rtol=0, atol=1e-6)


def test_aspect_ratio_rules():
    spec = PriorBoxSpec((30.0,), (60.0,), (2.0, 0.5, 1.0, 3.0), flip=True)
    # 1 first; 2 then its flip 0.5; the given 0.5 and 1 are duplicates; 3 then 1/3.
    assert spec.expanded_aspect_ratios == pytest.approx((1.0, 2.0, 0.5, 3.0, 1 / 3))
    assert spec.num_priors == 6
    with pytest.raises(ValueError, match="max_size"):
        PriorBoxSpec((30.0,), (20.0,))
