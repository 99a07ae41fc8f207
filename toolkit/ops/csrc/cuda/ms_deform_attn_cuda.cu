// Multi-scale deformable attention, CUDA kernels (forward and backward), float32 and float64.
//
// Forward: one thread per output element (n, q, m, c), summing its L * P samples.
// Backward: one thread per sampling point (n, q, m, l, p), looping over the D
// channels: it owns its grad_sampling_loc and grad_attention_weights entries
// (no reduction across threads), and adds into grad_value with atomicAdd, since
// many points sample the same pixels.  The sampling arithmetic is the header
// shared with the CPU kernel.  The batch is processed im2col_step images per
// launch, as Deformable DETR's op does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ms_deform_attn.h"
#include "../ms_deform_attn_sampling.h"

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
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                               const scalar_t* __restrict__ attn, scalar_t* __restrict__ out, int64_t batch,
                               int64_t S, int64_t M, int64_t D, int64_t L, int64_t Lq, int64_t P) {
  const int64_t total = batch * Lq * M * D;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t c = index % D;
    const int64_t nqm = index / D;  // (n * Lq + q) * M + m
    const int64_t m = nqm % M;
    const int64_t n = nqm / (Lq * M);
    scalar_t acc = 0;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
      const scalar_t* vl = value + ((n * S + starts[l]) * M + m) * D + c;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t i = (nqm * L + l) * P + p;
        const BilinearTaps<scalar_t> taps = bilinear_taps<scalar_t>(loc[2 * i], loc[2 * i + 1], h, w);
        accumulate_sample<scalar_t>(vl, M * D, taps, attn[i], &acc, 1);
      }
    }
    out[index] = acc;
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
                                scalar_t* __restrict__ grad_value, scalar_t* __restrict__ grad_loc,
                                scalar_t* __restrict__ grad_attn, int64_t batch, int64_t S, int64_t M, int64_t D,
                                int64_t L, int64_t Lq, int64_t P) {
  const int64_t total = batch * Lq * M * L * P;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t l = (i / P) % L;
    const int64_t nqm = i / (P * L);
    const int64_t m = nqm % M;
    const int64_t n = nqm / (Lq * M);
    const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
    const int64_t base = ((n * S + starts[l]) * M + m) * D;
    const BilinearTaps<scalar_t> taps = bilinear_taps<scalar_t>(loc[2 * i], loc[2 * i + 1], h, w);
    sample_backward<scalar_t>(value + base, M * D, taps, attn[i], grad_out + nqm * D, D, grad_value + base,
                              AtomicAdd(), h, w, grad_attn + i, grad_loc + 2 * i, grad_loc + 2 * i + 1);
  }
}

void check_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &sampling_loc, &attn_weight}) {
    TORCH_CHECK(t->is_cuda() && t->device() == value.device(),
                "ms_deform_attn: every argument must be on value's CUDA device ", value.device(), ", got ",
                t->device());
  }
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                               const at::Tensor& level_start_index_in, const at::Tensor& sampling_loc_in,
                               const at::Tensor& attn_weight_in, int64_t im2col_step) {
  check_ms_deform_attn_args(value_in, spatial_shapes_in, level_start_index_in, sampling_loc_in, attn_weight_in,
                            im2col_step);
  check_cuda(value_in, spatial_shapes_in, level_start_index_in, sampling_loc_in, attn_weight_in);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes_in.contiguous();
  const at::Tensor starts = level_start_index_in.contiguous();
  const at::Tensor loc = sampling_loc_in.contiguous();
  const at::Tensor attn = attn_weight_in.contiguous();
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t L = shapes.size(0), Lq = loc.size(1), P = loc.size(4);
  at::Tensor output = at::empty({N, Lq, M, D}, value.options());
  if (output.numel() == 0) return output.view({N, Lq, M * D});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cuda", [&] {
    for (int64_t n0 = 0; n0 < N; n0 += im2col_step) {
      const int64_t batch = std::min(im2col_step, N - n0);
      const int64_t work = batch * Lq * M * D;
      forward_kernel<scalar_t><<<blocks_for(work), kThreads, 0, stream>>>(
          value.data_ptr<scalar_t>() + n0 * S * M * D, shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          loc.data_ptr<scalar_t>() + n0 * Lq * M * L * P * 2, attn.data_ptr<scalar_t>() + n0 * Lq * M * L * P,
          output.data_ptr<scalar_t>() + n0 * Lq * M * D, batch, S, M, D, L, Lq, P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return output.view({N, Lq, M * D});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output_in, const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
    const at::Tensor& level_start_index_in, const at::Tensor& sampling_loc_in, const at::Tensor& attn_weight_in,
    int64_t im2col_step) {
  check_ms_deform_attn_args(value_in, spatial_shapes_in, level_start_index_in, sampling_loc_in, attn_weight_in,
                            im2col_step);
  check_cuda(value_in, spatial_shapes_in, level_start_index_in, sampling_loc_in, attn_weight_in);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes_in.contiguous();
  const at::Tensor starts = level_start_index_in.contiguous();
  const at::Tensor loc = sampling_loc_in.contiguous();
  const at::Tensor attn = attn_weight_in.contiguous();
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t L = shapes.size(0), Lq = loc.size(1), P = loc.size(4);
  TORCH_CHECK(grad_output_in.numel() == N * Lq * M * D && grad_output_in.scalar_type() == value.scalar_type() &&
                  grad_output_in.device() == value.device(),
              "ms_deform_attn_backward: grad_output must be (N, Lq, M * D) of value's dtype and device");
  const at::Tensor grad_output = grad_output_in.contiguous();
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_loc = at::empty_like(loc);
  at::Tensor grad_attn = at::empty_like(attn);
  if (grad_attn.numel() == 0) return {grad_value, grad_loc, grad_attn};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    for (int64_t n0 = 0; n0 < N; n0 += im2col_step) {
      const int64_t batch = std::min(im2col_step, N - n0);
      const int64_t points = n0 * Lq * M * L * P;
      backward_kernel<scalar_t><<<blocks_for(batch * Lq * M * L * P), kThreads, 0, stream>>>(
          grad_output.data_ptr<scalar_t>() + n0 * Lq * M * D, value.data_ptr<scalar_t>() + n0 * S * M * D,
          shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>() + 2 * points,
          attn.data_ptr<scalar_t>() + points, grad_value.data_ptr<scalar_t>() + n0 * S * M * D,
          grad_loc.data_ptr<scalar_t>() + 2 * points, grad_attn.data_ptr<scalar_t>() + points, batch, S, M, D, L, Lq,
          P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(legacy_det, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace legacy_det
