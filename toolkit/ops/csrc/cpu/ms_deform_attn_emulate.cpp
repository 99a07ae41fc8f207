// Test-only: the CUDA kernels' per-thread functions (../ms_deform_attn_kernels.h) run on the CPU.
//
// Every thread index of every launch is visited in turn, in one thread, with a
// plain += where the CUDA kernel has atomicAdd (visiting indices serially makes
// the adds atomic).  tests/ops compares these ops with the reference, so CI on
// machines without a GPU checks the CUDA kernels' index decomposition, im2col
// chunking and arithmetic; only the launch configuration and the atomics are
// left to the GPU tests.
#include <ATen/ATen.h>
#include <limits>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../ms_deform_attn.h"

namespace legacy_det {
namespace {

struct SerialAdd {
  template <typename scalar_t>
  void operator()(scalar_t* target, scalar_t amount) const {
    *target += amount;
  }
};

at::Tensor forward_emulated(const at::Tensor& value_in, const at::Tensor& shapes_in, const at::Tensor& starts_in,
                            const at::Tensor& loc_in, const at::Tensor& attn_in, int64_t im2col_step) {
  check_ms_deform_attn_args(value_in, shapes_in, starts_in, loc_in, attn_in, im2col_step);
  const at::Tensor value = value_in.contiguous(), shapes = shapes_in.contiguous(), starts = starts_in.contiguous();
  const at::Tensor loc = loc_in.contiguous(), attn = attn_in.contiguous();
  const int64_t N = value.size(0), Lq = loc.size(1), M = value.size(2), D = value.size(3);
  // NaN until written: an element no thread index reaches shows up in the comparison.
  at::Tensor output = at::full({N, Lq, M, D}, std::numeric_limits<double>::quiet_NaN(), value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cuda_emulated", [&] {
    LaunchArgs<scalar_t> all = launch_args<scalar_t>(value, shapes, starts, loc, attn);
    all.out = output.data_ptr<scalar_t>();
    for_each_launch(all, N, im2col_step, [&](const LaunchArgs<scalar_t>& a) {
      for (int64_t index = 0; index < a.batch * Lq * M * D; ++index) forward_element(a, index);
    });
  });
  return output.view({N, Lq, M * D});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_emulated(
    const at::Tensor& grad_in, const at::Tensor& value_in, const at::Tensor& shapes_in, const at::Tensor& starts_in,
    const at::Tensor& loc_in, const at::Tensor& attn_in, int64_t im2col_step) {
  check_ms_deform_attn_args(value_in, shapes_in, starts_in, loc_in, attn_in, im2col_step);
  const at::Tensor value = value_in.contiguous(), shapes = shapes_in.contiguous(), starts = starts_in.contiguous();
  const at::Tensor loc = loc_in.contiguous(), attn = attn_in.contiguous(), grad = grad_in.contiguous();
  const int64_t N = value.size(0);
  TORCH_CHECK(grad.numel() == N * loc.size(1) * value.size(2) * value.size(3),
              "ms_deform_attn_backward: grad_output must be (N, Lq, M * D)");
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_loc = at::full_like(loc, std::numeric_limits<double>::quiet_NaN());  // each entry written once
  at::Tensor grad_attn = at::full_like(attn, std::numeric_limits<double>::quiet_NaN());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cuda_emulated", [&] {
    LaunchArgs<scalar_t> all = launch_args<scalar_t>(value, shapes, starts, loc, attn);
    all.grad_out = grad.data_ptr<scalar_t>();
    all.grad_value = grad_value.data_ptr<scalar_t>();
    all.grad_loc = grad_loc.data_ptr<scalar_t>();
    all.grad_attn = grad_attn.data_ptr<scalar_t>();
    const int64_t per_image = loc.size(1) * value.size(2) * shapes.size(0) * loc.size(4);
    for_each_launch(all, N, im2col_step, [&](const LaunchArgs<scalar_t>& a) {
      for (int64_t i = 0; i < a.batch * per_image; ++i) backward_point(a, i, SerialAdd());
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(legacy_det_testing, CPU, m) {
  m.impl("ms_deform_attn_cuda_emulated", &forward_emulated);
  m.impl("ms_deform_attn_backward_cuda_emulated", &backward_emulated);
}

}  // namespace legacy_det
