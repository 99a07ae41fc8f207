"""Comparing a CaffeNet's blobs with real Caffe's, at the tolerances of the fixtures' MANIFESTs.

Each blob gets a tolerance class from the layer that wrote it last and from its bottoms:

- ``exact``: data movement (Split, Concat, Slice, Crop, Flatten, Reshape,
  Permute, Dropout at test time, ReLU, MAX pooling, Eltwise MAX) of blobs that
  are themselves exact (net inputs): bitwise equal;
- ``prior``: PriorBox and data movement of priors: ``abs <= 1e-6``;
- ``arith``: everything computed: ``abs <= 1e-5 + 1e-5 * |caffe|``;
- ``detections``: DetectionOutput: image id and label exact; from exact
  (stored) inputs scores exact and boxes ``abs <= 1e-6``, else (scores computed
  by our own forward) ``arith``.

Deep nets (``deep=True``) use the brief's ``1e-4`` relative plus an absolute
``1e-5 + 1e-6 * max|caffe|``: yufacedetectnet takes raw 0-255 pixels minus the
mean, its first convolutions reach |x| = 427 where one float32 ulp is 3e-5, and
a float64 forward differs from both Caffe and us by the same 8e-5 there.
"""

from __future__ import annotations

import numpy as np

ORDER = {"exact": 0, "prior": 1, "arith": 2}
MOVEMENT = {"Input", "Split", "Concat", "Slice", "Crop", "Flatten", "Reshape", "Permute", "Dropout", "ReLU"}


def tolerance_classes(net) -> dict[str, str]:
    """Blob name -> tolerance class, following the net's layers in order."""
    cls: dict[str, str] = {}
    for spec in net.layer_specs:
        module = net.layer(spec.name)
        inputs = [cls[b] for b in spec.bottoms]
        worst = max(inputs, key=ORDER.__getitem__, default="exact")
        if spec.type == "PriorBox":
            out = "prior"
        elif spec.type == "DetectionOutput":
            out = "detections-exact" if all(c == "exact" for c in inputs[:2]) and inputs[2] in ("exact", "prior") \
                else "detections"
        elif spec.type in MOVEMENT or (spec.type == "Pooling" and module.method == "MAX") or \
                (spec.type == "Eltwise" and module.operation == "MAX"):
            out = worst
        else:
            out = "arith"
        for t in spec.tops:
            cls[t] = out
    return cls


def error_ratio(got: np.ndarray, expected: np.ndarray, kind: str, deep: bool = False) -> float:
    """max |got - expected| / allowed (<= 1 passes); raises AssertionError on a shape or structure mismatch."""
    assert got.shape == expected.shape, f"shape {got.shape} != Caffe's {expected.shape}"
    err = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    if kind.startswith("detections"):
        np.testing.assert_array_equal(got[..., :2], expected[..., :2], err_msg="image ids / labels")
        if kind == "detections-exact":
            np.testing.assert_array_equal(got[..., 2], expected[..., 2], err_msg="scores (copied from conf)")
            return float((err[..., 3:] / 1e-6).max(initial=0))
        kind = "arith"
    if kind == "exact":
        return 0.0 if np.array_equal(got, expected) else float("inf")
    if kind == "prior":
        return float((err / 1e-6).max(initial=0))
    if deep:
        allowed = 1e-5 + 1e-6 * float(np.abs(expected).max(initial=0)) + 1e-4 * np.abs(expected)
    else:
        allowed = 1e-5 + 1e-5 * np.abs(expected)
    return float((err / allowed).max(initial=0))


def assert_blobs_match(net, got: dict, expected, names=None, deep: bool = False, source=None) -> dict[str, float]:
    """Every blob of ``expected`` (an npz) equals ``got`` at its class's tolerance; returns the ratios.

    ``source`` maps an expected key to the blob it stands for (Caffe's split copies).
    """
    classes = tolerance_classes(net)
    ratios, failures = {}, []
    for key in names if names is not None else expected.keys():
        blob = source(key) if source else key
        value = got[blob].detach().cpu().numpy()
        try:
            ratios[key] = error_ratio(value, expected[key], classes[blob], deep)
        except AssertionError as exc:
            failures.append(f"{key}: {exc}")
            continue
        if not ratios[key] <= 1:
            failures.append(f"{key} ({classes[blob]}): error {ratios[key]:.3g} x the tolerance")
    assert not failures, "blobs differ from Caffe's:\n" + "\n".join(failures)
    return ratios
