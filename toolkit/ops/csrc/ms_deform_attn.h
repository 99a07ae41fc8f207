// Multi-scale deformable attention: argument checks and kernel arguments shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include "ms_deform_attn_kernels.h"

namespace legacy_det {

// Shapes: value (N, S, M, D); spatial_shapes (L, 2) int64 (H, W); level_start_index (L,) int64;
// sampling_loc (N, Lq, M, L, P, 2) (x, y) in [0, 1]; attn_weight (N, Lq, M, L, P); one floating dtype.
inline void check_ms_deform_attn_args(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                      const at::Tensor& attn_weight, int64_t im2col_step) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: value_spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "ms_deform_attn: value_level_start_index must be (L,) = (", L, ",), got ", level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: value_spatial_shapes and value_level_start_index must be int64");
  const int64_t N = value.size(0), M = value.size(2);
  TORCH_CHECK(sampling_loc.dim() == 6 && sampling_loc.size(0) == N && sampling_loc.size(2) == M &&
                  sampling_loc.size(3) == L && sampling_loc.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2) = (", N, ", Lq, ", M, ", ", L,
              ", P, 2), got ", sampling_loc.sizes());
  TORCH_CHECK(attn_weight.dim() == 5 && attn_weight.size(0) == N && attn_weight.size(1) == sampling_loc.size(1) &&
                  attn_weight.size(2) == M && attn_weight.size(3) == L && attn_weight.size(4) == sampling_loc.size(4),
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = (", N, ", ", sampling_loc.size(1), ", ",
              M, ", ", L, ", ", sampling_loc.size(4), "), got ", attn_weight.sizes());
  TORCH_CHECK(value.scalar_type() == sampling_loc.scalar_type() && value.scalar_type() == attn_weight.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share a dtype, got ",
              value.scalar_type(), ", ", sampling_loc.scalar_type(), ", ", attn_weight.scalar_type());
  TORCH_CHECK(im2col_step > 0, "ms_deform_attn: im2col_step must be positive, got ", im2col_step);
}

// Sizes and data pointers of contiguous arguments (the gradients and output left null).
template <typename scalar_t>
LaunchArgs<scalar_t> launch_args(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                 const at::Tensor& attn_weight) {
  LaunchArgs<scalar_t> a{};
  a.batch = value.size(0), a.S = value.size(1), a.M = value.size(2), a.D = value.size(3);
  a.L = spatial_shapes.size(0), a.Lq = sampling_loc.size(1), a.P = sampling_loc.size(4);
  a.shapes = spatial_shapes.data_ptr<int64_t>();
  a.starts = level_start_index.data_ptr<int64_t>();
  a.value = value.data_ptr<scalar_t>();
  a.loc = sampling_loc.data_ptr<scalar_t>();
  a.attn = attn_weight.data_ptr<scalar_t>();
  return a;
}

}  // namespace legacy_det
