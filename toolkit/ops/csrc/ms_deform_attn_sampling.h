// Multi-scale deformable attention: the bilinear sampling and its gradient, written once.
//
// Both the CPU kernel (cpu/ms_deform_attn_cpu.cpp) and the CUDA kernel
// (cuda/ms_deform_attn_cuda.cu) call these functions, so the CPU tests exercise
// the very arithmetic the CUDA kernel runs.
//
// Conventions (Deformable DETR's op, and F.grid_sample(mode="bilinear",
// padding_mode="zeros", align_corners=False) in the PyTorch reference):
// * a level's map is H x W; a sampling location (loc_x, loc_y) in [0, 1] is
//   normalized over the map, pixel centres at ((i + 0.5) / W, (j + 0.5) / H), so
//   the continuous pixel coordinate is x = loc_x * W - 0.5, y = loc_y * H - 0.5;
// * bilinear interpolation between the four pixels around (x, y); a pixel
//   outside the map contributes zero (zero padding);
// * value is laid out (N, S, M, D): spatial positions of a level are rows of
//   stride M * D, a head's D channels are contiguous.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LEGACY_DET_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
// Always inlined, so that the CPU kernel's per-instruction-set copies (cpu/) compile these with their target.
#define LEGACY_DET_HOST_DEVICE inline __attribute__((always_inline))
#else
#define LEGACY_DET_HOST_DEVICE inline
#endif

namespace legacy_det {

// The four pixels around a sampling point: their spatial index in the level
// (row * W + col, or -1 when outside the map), their bilinear weight, and the
// weight's derivative with respect to x and y (pixel units).  Corners outside
// the map have weight and derivatives 0.
template <typename scalar_t>
struct BilinearTaps {
  int64_t index[4];
  scalar_t weight[4];
  scalar_t dweight_dx[4];
  scalar_t dweight_dy[4];
};

template <typename scalar_t>
LEGACY_DET_HOST_DEVICE BilinearTaps<scalar_t> bilinear_taps(scalar_t loc_x, scalar_t loc_y, int64_t height,
                                                           int64_t width) {
  BilinearTaps<scalar_t> t;
  const scalar_t x = loc_x * static_cast<scalar_t>(width) - static_cast<scalar_t>(0.5);
  const scalar_t y = loc_y * static_cast<scalar_t>(height) - static_cast<scalar_t>(0.5);
  // Far outside (or NaN): no corner can touch the map; also keeps the integer casts below defined.
  const bool near = x > static_cast<scalar_t>(-2) && y > static_cast<scalar_t>(-2) &&
                    x < static_cast<scalar_t>(width + 1) && y < static_cast<scalar_t>(height + 1);
  if (!near) {
    for (int k = 0; k < 4; ++k) {
      t.index[k] = -1;
      t.weight[k] = t.dweight_dx[k] = t.dweight_dy[k] = 0;
    }
    return t;
  }
  const scalar_t x0f = floor(x);
  const scalar_t y0f = floor(y);
  const int64_t x0 = static_cast<int64_t>(x0f);
  const int64_t y0 = static_cast<int64_t>(y0f);
  const scalar_t lx = x - x0f;  // in [0, 1)
  const scalar_t ly = y - y0f;
  const scalar_t hx = 1 - lx;
  const scalar_t hy = 1 - ly;
  // Corner k = 2 * dy + dx: (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1).
  const scalar_t weight[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const scalar_t ddx[4] = {-hy, hy, -ly, ly};
  const scalar_t ddy[4] = {-hx, -lx, hx, lx};
  for (int k = 0; k < 4; ++k) {
    const int64_t xi = x0 + (k & 1);
    const int64_t yi = y0 + (k >> 1);
    const bool inside = xi >= 0 && yi >= 0 && xi < width && yi < height;
    t.index[k] = inside ? yi * width + xi : -1;
    t.weight[k] = inside ? weight[k] : static_cast<scalar_t>(0);
    t.dweight_dx[k] = inside ? ddx[k] : static_cast<scalar_t>(0);
    t.dweight_dy[k] = inside ? ddy[k] : static_cast<scalar_t>(0);
  }
  return t;
}

// out[c] += scale * (bilinear sample of channel c), c < channels.
// value: the level's first spatial position, at the head's first channel; stride: M * D.
template <typename scalar_t>
LEGACY_DET_HOST_DEVICE void accumulate_sample(const scalar_t* __restrict__ value, int64_t stride,
                                              const BilinearTaps<scalar_t>& t, scalar_t scale,
                                              scalar_t* __restrict__ out, int64_t channels) {
  for (int k = 0; k < 4; ++k) {
    if (t.index[k] < 0) continue;
    const scalar_t a = scale * t.weight[k];
    const scalar_t* v = value + t.index[k] * stride;
    for (int64_t c = 0; c < channels; ++c) out[c] += a * v[c];
  }
}

// Gradient of out[c] += attn * sample_c(x, y) given d loss / d out[c] = grad_out[c]:
// * grad_value[corner, c] += attn * weight * grad_out[c], through add(pointer, amount)
//   (a plain += where writes cannot collide, atomicAdd on CUDA);
// * returns through grad_attn: sum_c grad_out[c] * sample_c;
// * through grad_loc_x / grad_loc_y: d loss / d loc (x = loc_x * W - 0.5, so W * d/dx).
template <typename scalar_t, typename Add>
LEGACY_DET_HOST_DEVICE void sample_backward(const scalar_t* __restrict__ value, int64_t stride,
                                            const BilinearTaps<scalar_t>& t, scalar_t attn,
                                            const scalar_t* __restrict__ grad_out, int64_t channels,
                                            scalar_t* __restrict__ grad_value, const Add& add, int64_t height,
                                            int64_t width, scalar_t* grad_attn, scalar_t* grad_loc_x,
                                            scalar_t* grad_loc_y) {
  scalar_t sample = 0, dx = 0, dy = 0;
  for (int k = 0; k < 4; ++k) {
    if (t.index[k] < 0) continue;
    const scalar_t* v = value + t.index[k] * stride;
    scalar_t* gv = grad_value + t.index[k] * stride;
    const scalar_t a = attn * t.weight[k];
    // dot = sum_c grad_out[c] * value[corner, c], in kLanes partial sums: a fixed summation order that
    // compilers vectorize (a single running sum is a sequential dependence they may not reorder).
    constexpr int kLanes = 8;
    scalar_t part[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t c = 0;
    for (; c + kLanes <= channels; c += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        part[j] += grad_out[c + j] * v[c + j];
        add(gv + c + j, a * grad_out[c + j]);
      }
    }
    for (; c < channels; ++c) {
      part[0] += grad_out[c] * v[c];
      add(gv + c, a * grad_out[c]);
    }
    scalar_t dot = 0;
    for (int j = 0; j < kLanes; ++j) dot += part[j];
    sample += t.weight[k] * dot;
    dx += t.dweight_dx[k] * dot;
    dy += t.dweight_dy[k] * dot;
  }
  *grad_attn = sample;
  *grad_loc_x = attn * dx * static_cast<scalar_t>(width);
  *grad_loc_y = attn * dy * static_cast<scalar_t>(height);
}

}  // namespace legacy_det
