"""SSD-Caffe's ``DetectionOutput`` as whole-tensor operations that export to ONNX.

:func:`toolkit.models.postprocess.detection_output` is the reference: per image, per class, Python loops.
:func:`detection_output_graph` computes the same rows for a whole batch with operations that have an ONNX
equivalent, so a traced export carries Caffe's post-processing in the graph:

1. decode every prior (:func:`~toolkit.models.box_coder.decode_boxes`);
2. per (image, class): the scores sorted descending, ties in prior order (:func:`stable_topk`, ONNX ``TopK``,
   which breaks ties by the lower index), cut to ``top_k``; a candidate is valid when its score is **strictly**
   above ``confidence_threshold`` (an explicit ``Greater``, not the NMS op's own threshold);
3. greedy NMS over the valid candidates (:func:`non_max_suppression`, ONNX ``NonMaxSuppression``) with
   strictly decreasing surrogate scores, so that its order is the sorted order whatever the op does with ties;
   Caffe's IoU is 0 for a box of non-positive width or height (``JaccardOverlap``'s empty intersection), while
   onnxruntime orders a box's corners first: such boxes go to the NMS as all-zero boxes (area 0: never
   suppressed, never suppressing, in both);
4. ``keep_top_k``: the best scores of the image over all classes (again a stable top-k, in the reference's
   label-major order);
5. the rows ``[image, label, score, xmin, ymin, xmax, ymax]`` in image, label, rank order (a ``NonZero`` over
   the kept mask), or one ``[i, -1, ..., -1]`` row per image when no image has a detection.

Adaptive NMS (``eta < 1``: the threshold shrinks after every kept box, so each decision depends on the ones
before) replaces step 3 by :func:`adaptive_greedy_keep`, a loop over the sorted candidates of every (image,
class) at once, on Caffe's IoU (:func:`~toolkit.models.box_coder.jaccard_normalized`), which an export carries
as an ONNX ``Loop``.  LD's voting NMS has no graph form and is refused (:class:`GraphPostprocessError`).  Where
the rows can still differ from the reference: an IoU within float rounding of the threshold (onnxruntime
computes the same ratio, not necessarily with the same rounding; the adaptive threshold is float32, as Caffe's,
where the reference keeps a double).
"""

from __future__ import annotations

import torch
import torchvision

from toolkit.models.box_coder import decode_boxes, jaccard_normalized
from toolkit.models.postprocess import DetectionOutputParams


class GraphPostprocessError(ValueError):
    """Post-processing parameters that have no graph form (the message says which and why)."""


class _StableTopK(torch.autograd.Function):
    """The ``k`` largest values along the last dimension, ties by the lower index; ONNX ``TopK``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int):
        values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
        return values[..., :k], indices[..., :k]

    @staticmethod
    def symbolic(g, x, k: int):
        k_tensor = g.op("Constant", value_t=torch.tensor([k], dtype=torch.int64))
        return g.op("TopK", x, k_tensor, axis_i=-1, largest_i=1, sorted_i=1, outputs=2)


def stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``k`` largest entries of the last dimension, descending, equal values in
    index order (a stable descending sort cut to ``k``).  Exports to ONNX ``TopK`` (``sorted=1``), whose
    specification breaks ties the same way."""
    return _StableTopK.apply(x, int(k))


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (corner boxes, one class) with a strict score threshold."""

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, score_threshold: float):
        rows = []
        for b in range(boxes.shape[0]):
            valid = torch.nonzero(scores[b, 0] > score_threshold).flatten()
            keep = valid[torchvision.ops.nms(boxes[b, valid], scores[b, 0, valid], iou_threshold)]
            batch = torch.full_like(keep, b)
            rows.append(torch.stack([batch, torch.zeros_like(keep), keep], dim=1))
        return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold: float, score_threshold: float):
        max_out = g.op("Constant", value_t=torch.tensor([2 ** 62], dtype=torch.int64))
        iou = g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32))
        score = g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32))
        return g.op("NonMaxSuppression", boxes, scores, max_out, iou, score, center_point_box_i=0)


def non_max_suppression(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                        score_threshold: float) -> torch.Tensor:
    """Greedy NMS of every batch entry, as ONNX ``NonMaxSuppression`` with one class.

    Args:
        boxes: ``(B, K, 4)`` float32 xyxy with ``x1 <= x2``, ``y1 <= y2``.
        scores: ``(B, 1, K)`` float32; boxes with a score ``<= score_threshold`` take no part.
    Returns:
        ``(S, 3)`` int64 rows ``[batch, 0, box index]``, by batch, then in keeping order (descending score).
        A box is dropped when its IoU with a kept box is ``> iou_threshold``.
    """
    return _NonMaxSuppression.apply(boxes, scores, float(iou_threshold), float(score_threshold))


def adaptive_greedy_keep(iou: torch.Tensor, valid: torch.Tensor, threshold: float, eta: float) -> torch.Tensor:
    """Caffe's ``ApplyNMSFast`` with ``eta < 1`` (adaptive NMS) for a batch of candidate lists at once.

    Candidate ``i`` of row ``n`` is kept when it is valid and its overlap with every earlier kept candidate is
    ``<= adaptive[n]``; after each kept candidate, while ``adaptive[n] > 0.5``, ``adaptive[n] *= eta`` (in
    float32, as Caffe's ``float adaptive_threshold``).  A loop over the candidates, every row at once; during an
    ONNX export the same function scripted, so that the loop becomes an ONNX ``Loop`` (a trace would unroll it).

    Args:
        iou: ``(N, K, K)`` pairwise overlaps of each row's candidates, in sorted order.
        valid: bool ``(N, K)``: the candidates that take part.
    Returns:
        bool ``(N, K)``: the kept candidates.
    """
    if torch.onnx.is_in_onnx_export():
        return _scripted_keep()(iou, valid, threshold, eta)
    return _greedy_keep_loop(iou, valid, threshold, eta)


def _greedy_keep_loop(iou: torch.Tensor, valid: torch.Tensor, threshold: float, eta: float) -> torch.Tensor:
    n, k = valid.shape[0], valid.shape[1]
    kept = torch.zeros([n, k], dtype=torch.bool, device=valid.device)
    adaptive = torch.full([n], threshold, dtype=torch.float32, device=valid.device)
    positions = torch.arange(k, device=valid.device)
    for i in range(k):
        overlap = iou[:, :, i].float()
        blocked = ((overlap > adaptive[:, None]) & kept).any(dim=1)
        keep = valid[:, i] & ~blocked
        kept = kept | (keep[:, None] & (positions == i)[None, :])
        adaptive = torch.where(keep & (adaptive > 0.5), adaptive * eta, adaptive)
    return kept


_scripted = []


def _scripted_keep():
    """:func:`_greedy_keep_loop` compiled by TorchScript, once (``torch.jit.script`` warns that it is deprecated;
    it is still what carries a loop into the TorchScript-based ONNX exporter)."""
    if not _scripted:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            _scripted.append(torch.jit.script(_greedy_keep_loop))
    return _scripted[0]


def check_graph_params(params: DetectionOutputParams) -> None:
    """Raise :class:`GraphPostprocessError` for parameters :func:`detection_output_graph` cannot follow."""
    if params.nms != "greedy":
        raise GraphPostprocessError(f"NMS {params.nms!r} has no graph form")


def detection_output_graph(loc: torch.Tensor, conf: torch.Tensor, priors_xyxy: torch.Tensor,
                           variances: torch.Tensor, params: DetectionOutputParams) -> torch.Tensor:
    """Caffe's ``detection_out`` blob of a batch, computed with exportable operations (module docstring).

    Args:
        loc: ``(N, P * 4)`` or ``(N, P, 4)`` (``(N, P, C, 4)`` without ``share_location``).
        conf: ``(N, P, C)`` or ``(N, P * C)`` class probabilities (after softmax).
        priors_xyxy, variances: ``(P, 4)`` normalized priors and their variances.
        params: the layer's parameters; :func:`check_graph_params` must accept them.
    Returns:
        ``(1, 1, R, 7)`` float rows ``[image, label, score, xmin, ymin, xmax, ymax]`` (normalized, not clipped),
        equal to :func:`toolkit.models.postprocess.to_caffe_detection_blob` of
        :func:`~toolkit.models.postprocess.detection_output`.
    """
    check_graph_params(params)
    n, p, c = conf.shape[0], priors_xyxy.shape[0], params.num_classes
    conf = conf.reshape(n, p, c)
    classes = [label for label in range(c) if label != params.background_label_id]
    if params.share_location:
        decoded = decode_boxes(loc.reshape(n, p, 4), priors_xyxy, variances, params.code_type,
                               params.variance_encoded_in_target)
    else:
        decoded = decode_boxes(loc.reshape(n, p, c, 4), priors_xyxy[:, None, :], variances[:, None, :],
                               params.code_type, params.variance_encoded_in_target)
    label_index = torch.tensor(classes, dtype=torch.int64)
    scores = conf.index_select(2, label_index).transpose(1, 2)  # (N, L, P)
    k = p if params.top_k < 0 else min(params.top_k, p)
    values, order = stable_topk(scores, k)  # (N, L, k)
    per_class = decoded[:, None].expand(n, len(classes), p, 4) if params.share_location \
        else decoded.index_select(2, label_index).transpose(1, 2)  # (N, L, P, 4)
    candidates = torch.gather(per_class, 2, order[..., None].expand(-1, -1, -1, 4))  # (N, L, k, 4)
    valid = torch.ones_like(values, dtype=torch.bool) if params.confidence_threshold is None \
        else values > params.confidence_threshold
    # The NMS sees a strictly decreasing surrogate of the sorted order (k, k-1, ..., 1; -1: not a candidate).
    surrogate = torch.arange(k, 0, -1, dtype=torch.float32).expand(n, len(classes), k)
    surrogate = torch.where(valid, surrogate, torch.full_like(surrogate, -1.0))
    if params.eta < 1.0:  # adaptive NMS: the threshold depends on what was kept before, a loop
        iou = jaccard_normalized(candidates, candidates).reshape(n * len(classes), k, k)
        kept = adaptive_greedy_keep(iou, valid.reshape(n * len(classes), k), float(params.nms_threshold),
                                    float(params.eta)).reshape(n, len(classes), k)
    else:
        positive = (candidates[..., 2] > candidates[..., 0]) & (candidates[..., 3] > candidates[..., 1])
        nms_boxes = torch.where(positive[..., None], candidates, torch.zeros_like(candidates)).float()
        selected = non_max_suppression(nms_boxes.reshape(n * len(classes), k, 4),
                                       surrogate.reshape(n * len(classes), 1, k), params.nms_threshold, 0.0)
        # Masks are built in float (ScatterElements of bool is not in every runtime).
        chosen = selected[:, 0] * k + selected[:, 2]
        kept = torch.zeros(n * len(classes) * k).scatter(0, chosen, torch.ones_like(chosen, dtype=torch.float32))
        kept = kept.reshape(n, len(classes), k) > 0
    if params.keep_top_k > -1:
        flat = torch.where(kept, values, torch.full_like(values, float("-inf"))).reshape(n, len(classes) * k)
        top_values, top_index = stable_topk(flat, min(params.keep_top_k, len(classes) * k))
        best = torch.zeros_like(flat).scatter(1, top_index, (top_values > float("-inf")).float())
        kept = kept & (best.reshape(n, len(classes), k) > 0)
    # Row-major positions of the kept entries: image, then label, then rank -- the reference's row order.
    index = torch.nonzero(kept.reshape(-1)).flatten()
    image = torch.div(index, len(classes) * k, rounding_mode="floor")
    position = torch.remainder(torch.div(index, k, rounding_mode="floor"), len(classes))
    rows = torch.cat([image[:, None].to(values.dtype), label_index[position][:, None].to(values.dtype),
                      values.reshape(-1)[index][:, None], candidates.reshape(-1, 4)[index].to(values.dtype)], dim=1)
    # Caffe's output when no image has a detection: one [i, -1, -1, -1, -1, -1, -1] row per image.
    empty = torch.cat([torch.arange(n, dtype=values.dtype)[:, None], torch.full((n, 6), -1.0, dtype=values.dtype)],
                      dim=1)
    nothing = (kept.reshape(-1).sum() == 0).expand(n)
    # index_select of NonZero, not a boolean index (which exports as a GatherND that some importers mishandle).
    return torch.cat([rows, empty.index_select(0, torch.nonzero(nothing).flatten())])[None, None]
