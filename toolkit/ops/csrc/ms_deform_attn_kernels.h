// Multi-scale deformable attention: what one CUDA thread computes, as __host__ __device__ functions.
//
// cuda/ms_deform_attn_cuda.cu launches these over a grid (grid-stride loops);
// cpu/ms_deform_attn_emulate.cpp runs the same functions over every thread
// index in turn on the CPU, so that CI machines without a GPU test the CUDA
// kernels' indexing, chunking and arithmetic, not just their compilation.
#pragma once

#include <cstdint>

#include "ms_deform_attn_sampling.h"

namespace legacy_det {

// Sizes and pointers of one launch: `batch` images starting at image n0 of the call
// (Deformable DETR's im2col_step chunks).  grad_* are null in the forward.
template <typename scalar_t>
struct LaunchArgs {
  int64_t batch, S, M, D, L, Lq, P;
  const int64_t* shapes;  // (L, 2): H, W
  const int64_t* starts;  // (L,)
  const scalar_t* value;  // (batch, S, M, D)
  const scalar_t* loc;    // (batch, Lq, M, L, P, 2)
  const scalar_t* attn;   // (batch, Lq, M, L, P)
  scalar_t* out;          // forward: (batch, Lq, M, D)
  const scalar_t* grad_out;
  scalar_t* grad_value;
  scalar_t* grad_loc;
  scalar_t* grad_attn;
};

// The launch of images [n0, n0 + batch) of a call whose arguments start at `a`'s pointers.
template <typename scalar_t>
LEGACY_DET_HOST_DEVICE LaunchArgs<scalar_t> chunk(LaunchArgs<scalar_t> a, int64_t n0, int64_t batch) {
  const int64_t values = n0 * a.S * a.M * a.D, outputs = n0 * a.Lq * a.M * a.D;
  const int64_t points = n0 * a.Lq * a.M * a.L * a.P;
  a.batch = batch;
  a.value += values;
  a.loc += 2 * points;
  a.attn += points;
  if (a.out) a.out += outputs;
  if (a.grad_out) a.grad_out += outputs;
  if (a.grad_value) a.grad_value += values;
  if (a.grad_loc) a.grad_loc += 2 * points;
  if (a.grad_attn) a.grad_attn += points;
  return a;
}

// Calls launch(args) for each chunk of im2col_step images of a call of N images (host code).
template <typename scalar_t, typename Launch>
inline void for_each_launch(const LaunchArgs<scalar_t>& all, int64_t N, int64_t im2col_step, const Launch& launch) {
  for (int64_t n0 = 0; n0 < N; n0 += im2col_step) {
    launch(chunk(all, n0, N - n0 < im2col_step ? N - n0 : im2col_step));
  }
}

// Forward thread `index` in [0, batch * Lq * M * D): output element (n, q, m, c), summed over levels and points.
template <typename scalar_t>
LEGACY_DET_HOST_DEVICE void forward_element(const LaunchArgs<scalar_t>& a, int64_t index) {
  const int64_t c = index % a.D;
  const int64_t nqm = index / a.D;  // (n * Lq + q) * M + m
  const int64_t m = nqm % a.M;
  const int64_t n = nqm / (a.Lq * a.M);
  scalar_t acc = 0;
  for (int64_t l = 0; l < a.L; ++l) {
    const int64_t h = a.shapes[2 * l], w = a.shapes[2 * l + 1];
    const scalar_t* vl = a.value + ((n * a.S + a.starts[l]) * a.M + m) * a.D + c;
    for (int64_t p = 0; p < a.P; ++p) {
      const int64_t i = (nqm * a.L + l) * a.P + p;
      const BilinearTaps<scalar_t> taps = bilinear_taps<scalar_t>(a.loc[2 * i], a.loc[2 * i + 1], h, w);
      accumulate_sample<scalar_t>(vl, a.M * a.D, taps, a.attn[i], &acc, 1);
    }
  }
  a.out[index] = acc;
}

// Backward thread `i` in [0, batch * Lq * M * L * P): sampling point (n, q, m, l, p) over its D channels; it
// writes its own grad_loc / grad_attn entries and adds into grad_value through `add` (atomicAdd on CUDA).
template <typename scalar_t, typename Add>
LEGACY_DET_HOST_DEVICE void backward_point(const LaunchArgs<scalar_t>& a, int64_t i, const Add& add) {
  const int64_t l = (i / a.P) % a.L;
  const int64_t nqm = i / (a.P * a.L);
  const int64_t m = nqm % a.M;
  const int64_t n = nqm / (a.Lq * a.M);
  const int64_t h = a.shapes[2 * l], w = a.shapes[2 * l + 1];
  const int64_t base = ((n * a.S + a.starts[l]) * a.M + m) * a.D;
  const BilinearTaps<scalar_t> taps = bilinear_taps<scalar_t>(a.loc[2 * i], a.loc[2 * i + 1], h, w);
  sample_backward<scalar_t>(a.value + base, a.M * a.D, taps, a.attn[i], a.grad_out + nqm * a.D, a.D,
                            a.grad_value + base, add, h, w, a.grad_attn + i, a.grad_loc + 2 * i,
                            a.grad_loc + 2 * i + 1);
}

}  // namespace legacy_det
