"""Build of legacy-det's compiled ops (``toolkit/ops/csrc``); the package metadata is in setup.cfg.

The ops are C++ (always) and CUDA (when a GPU is visible, or with ``FORCE_CUDA=1``
and ``CUDA_HOME`` set: CI compiles the CUDA kernels on machines without a GPU so
that they cannot rot) extensions built at install time against the torch that is
already installed.  An isolated build environment (pip's default) would install
another torch to build against, whose ABI need not match, hence::

    pip install --no-build-isolation -e .

(the Makefile does this).  Where torch cannot be imported at build time the
package installs without its kernels, and ``toolkit.ops`` runs the pure-PyTorch
reference with one warning that says how to build them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = Path("toolkit") / "ops" / "csrc"


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("warning: legacy-det: torch is not importable in this build environment, so the compiled ops "
              "(toolkit/ops/csrc) are not built; install torch first and build against it with "
              "'pip install --no-build-isolation -e .'", file=sys.stderr)
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC / "cpu").glob("*.cpp"))
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC / "cuda").glob("*.cu"))
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = torch.version.cuda is not None and (torch.cuda.is_available() or force_cuda)
    if with_cuda and CUDA_HOME is None:
        if force_cuda:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME (e.g. /usr/local/cuda)")
        with_cuda = False
    cxx = ["-O3"]  # torch.utils.cpp_extension adds the C++ standard torch needs
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP loop in ATen's headers: without -fopenmp it runs on one thread.
        # The library links libgomp.so.1, which resolves to the one torch has already loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if with_cuda:
        extension = CUDAExtension("toolkit.ops._C", sources + cuda_sources, define_macros=[("WITH_CUDA", None)],
                                  extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=link)
    else:
        extension = CppExtension("toolkit.ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    print(f"legacy-det: building toolkit.ops._C with {'CPU and CUDA' if with_cuda else 'CPU'} kernels",
          file=sys.stderr)
    return [extension], {"build_ext": BuildExtension}


extensions, commands = _extensions()
setup(ext_modules=extensions, cmdclass=commands)
