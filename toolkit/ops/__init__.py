"""Custom operators (C++ / CUDA kernels with pure-PyTorch reference fallbacks).

Importing this package never fails: every op has a reference implementation in
PyTorch that is its specification and its fallback, and compiled kernels are
optional accelerations. No op has landed yet; the multi-scale deformable
attention of Deformable / Sparse DETR is the first one planned.
"""
