"""Loading the compiled kernels (``toolkit/ops/_C``, built from ``csrc/`` by the package install).

Importing ``toolkit.ops._C`` loads the shared library, whose static initialisers
register the ``legacy_det`` operator library with PyTorch (``TORCH_LIBRARY``:
schemas, CPU and, where compiled, CUDA kernels).  A missing or unloadable build
is not an error here: it is recorded, and each op falls back to its PyTorch
reference with one warning carrying :data:`BUILD_HINT`.
"""

from __future__ import annotations

from typing import Optional

import torch

BUILD_HINT = ("Build the kernels against the installed torch with 'pip install --no-build-isolation -e .' from the "
              "repository root (make setup does; set FORCE_CUDA=1 and CUDA_HOME to compile the CUDA kernels without "
              "a GPU).")

_error: Optional[str] = None
try:
    from toolkit.ops import _C  # noqa: F401  (registers torch.ops.legacy_det)
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _error = f"{type(exc).__name__}: {exc}"


def has_ops() -> bool:
    """Whether the compiled kernels (``torch.ops.legacy_det``) are loaded."""
    return _error is None


def load_error() -> Optional[str]:
    """Why the compiled kernels are not loaded (None when they are)."""
    return _error


def has_cuda_kernels() -> bool:
    """Whether the loaded kernels include CUDA ones (compiled with CUDA; running them needs a GPU)."""
    return has_ops() and torch._C._dispatch_has_kernel_for_dispatch_key("legacy_det::ms_deform_attn", "CUDA")
