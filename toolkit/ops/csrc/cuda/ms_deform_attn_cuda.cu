// Multi-scale deformable attention, CUDA kernels (forward and backward), float32 and float64.
//
// Forward: one thread per output element (n, q, m, c), summing its L * P samples.
// Backward: one thread per sampling point (n, q, m, l, p), looping over the D
// channels: it owns its grad_sampling_loc and grad_attention_weights entries
// (no reduction across threads), and adds into grad_value with atomicAdd, since
// many points sample the same pixels.  What a thread computes is in
// ../ms_deform_attn_kernels.h (also run on the CPU by the tests, see
// ../cpu/ms_deform_attn_emulate.cpp), its sampling arithmetic in the header shared
// with the CPU kernel.  The batch is processed im2col_step images per launch, as
// Deformable DETR's op does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ms_deform_attn.h"

namespace legacy_det {
namespace {

constexpr int kThreads = 256;

struct AtomicAdd {
  template <typename scalar_t>
  __host__ __device__ __forceinline__ void operator()(scalar_t* target, scalar_t amount) const {
#ifdef __CUDA_ARCH__
    atomicAdd(target, amount);
#else
    *target += amount;
#endif
  }
};

int64_t blocks_for(int64_t n) {
  return std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 8);
}

template <typename scalar_t>
__global__ void forward_kernel(const LaunchArgs<scalar_t> a) {
  const int64_t total = a.batch * a.Lq * a.M * a.D;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    forward_element(a, index);
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const LaunchArgs<scalar_t> a) {
  const int64_t total = a.batch * a.Lq * a.M * a.L * a.P;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    backward_point(a, i, AtomicAdd());
  }
}

struct Prepared {
  at::Tensor value, shapes, starts, loc, attn;
};

Prepared prepare(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                 const at::Tensor& sampling_loc, const at::Tensor& attn_weight, int64_t im2col_step) {
  check_ms_deform_attn_args(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step);
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &sampling_loc, &attn_weight}) {
    TORCH_CHECK(t->is_cuda() && t->device() == value.device(),
                "ms_deform_attn: every argument must be on value's CUDA device ", value.device(), ", got ",
                t->device());
  }
  return {value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
          sampling_loc.contiguous(), attn_weight.contiguous()};
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                               const at::Tensor& attn_weight, int64_t im2col_step) {
  const Prepared in = prepare(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step);
  const c10::cuda::CUDAGuard guard(in.value.device());
  const int64_t N = in.value.size(0), Lq = in.loc.size(1), M = in.value.size(2), D = in.value.size(3);
  at::Tensor output = at::empty({N, Lq, M, D}, in.value.options());
  if (output.numel() == 0) return output.view({N, Lq, M * D});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.value.scalar_type(), "ms_deform_attn_cuda", [&] {
    LaunchArgs<scalar_t> all = launch_args<scalar_t>(in.value, in.shapes, in.starts, in.loc, in.attn);
    all.out = output.data_ptr<scalar_t>();
    for_each_launch(all, N, im2col_step, [&](const LaunchArgs<scalar_t>& a) {
      forward_kernel<scalar_t><<<blocks_for(a.batch * Lq * M * D), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return output.view({N, Lq, M * D});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_loc, const at::Tensor& attn_weight,
    int64_t im2col_step) {
  const Prepared in = prepare(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step);
  const c10::cuda::CUDAGuard guard(in.value.device());
  const int64_t N = in.value.size(0), Lq = in.loc.size(1), M = in.value.size(2), D = in.value.size(3);
  const int64_t points_per_image = Lq * M * in.shapes.size(0) * in.loc.size(4);
  TORCH_CHECK(grad_output.numel() == N * Lq * M * D && grad_output.scalar_type() == in.value.scalar_type() &&
                  grad_output.device() == in.value.device(),
              "ms_deform_attn_backward: grad_output must be (N, Lq, M * D) of value's dtype and device");
  const at::Tensor grad = grad_output.contiguous();
  at::Tensor grad_value = at::zeros_like(in.value);
  at::Tensor grad_loc = at::empty_like(in.loc);  // every entry is written
  at::Tensor grad_attn = at::empty_like(in.attn);
  if (grad_attn.numel() == 0) return {grad_value, grad_loc, grad_attn};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    LaunchArgs<scalar_t> all = launch_args<scalar_t>(in.value, in.shapes, in.starts, in.loc, in.attn);
    all.grad_out = grad.data_ptr<scalar_t>();
    all.grad_value = grad_value.data_ptr<scalar_t>();
    all.grad_loc = grad_loc.data_ptr<scalar_t>();
    all.grad_attn = grad_attn.data_ptr<scalar_t>();
    for_each_launch(all, N, im2col_step, [&](const LaunchArgs<scalar_t>& a) {
      backward_kernel<scalar_t><<<blocks_for(a.batch * points_per_image), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(legacy_det, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace legacy_det
