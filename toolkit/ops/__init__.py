"""Custom operators: C++ and CUDA kernels with pure-PyTorch reference fallbacks.

Importing this package never fails.  Every op has a reference implementation in
PyTorch that is its specification and its fallback; the compiled kernels
(``csrc/``, built by the package install) are accelerations that must equal it,
and :func:`has_ops` says whether they are loaded.

* :func:`ms_deform_attn` / :func:`ms_deform_attn_reference` / :class:`MSDeformAttn`:
  multi-scale deformable attention (Deformable DETR, Sparse DETR, ThumbDet),
  registered as ``torch.ops.legacy_det.ms_deform_attn`` with CPU and CUDA kernels,
  fake kernels and autograd, so it traces under ``torch.compile`` and ``torch.export``.
"""

from toolkit.ops._extension import BUILD_HINT, has_cuda_kernels, has_ops, load_error
from toolkit.ops.ms_deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference

__all__ = ["BUILD_HINT", "MSDeformAttn", "has_cuda_kernels", "has_ops", "load_error", "ms_deform_attn",
           "ms_deform_attn_reference"]
