// Multi-scale deformable attention, CPU kernels (forward and backward), float32 and float64.
//
// Forward: queries are split across threads (at::parallel_for); each output row
// (n, q, m, :) is accumulated in registers by one thread.  Backward: the
// scatter-add into grad_value is made race-free by partitioning the work by
// (image n, head m): grad_value[n, :, m, :] is only ever touched by the thread
// that owns (n, m), and every grad_sampling_loc / grad_attention_weights entry
// of (n, q, m, ...) by that same thread, so results do not depend on the number
// of threads.
//
// Speed: the loops are compiled for common channel counts (D = 16, 32, 64) as
// well as any D, and on x86-64 twice, for the baseline instruction set and for
// AVX2 + FMA, picked at run time (ATen's own kernels dispatch on the CPU the same
// way; a baseline-only build would leave 3/4 of each vector unit idle).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../ms_deform_attn.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LEGACY_DET_X86_AVX2 1
#define LEGACY_DET_INLINE inline __attribute__((always_inline))
#else
#define LEGACY_DET_X86_AVX2 0
#define LEGACY_DET_INLINE inline
#endif

namespace legacy_det {
namespace {

struct PlainAdd {
  template <typename scalar_t>
  LEGACY_DET_INLINE void operator()(scalar_t* target, scalar_t amount) const {
    *target += amount;
  }
};

// Kernel arguments: LaunchArgs (../ms_deform_attn_kernels.h) of the whole call, batch = N.
template <typename scalar_t>
using Args = LaunchArgs<scalar_t>;

// Rows (n, q) in [begin, end): out[n, q, m, :] = sum over levels and points of attn * sample.
// kD > 0: D known at compile time (the row is accumulated in a local array the compiler keeps in registers).
template <typename scalar_t, int64_t kD>
LEGACY_DET_INLINE void forward_rows(const Args<scalar_t>& a, int64_t begin, int64_t end) {
  const int64_t D = kD > 0 ? kD : a.D;
  const int64_t row = a.M * D;  // stride between spatial positions of value
  scalar_t local[kD > 0 ? kD : 1];
  for (int64_t nq = begin; nq < end; ++nq) {
    const int64_t n = nq / a.Lq;
    for (int64_t m = 0; m < a.M; ++m) {
      scalar_t* o = a.out + (nq * a.M + m) * D;
      scalar_t* acc = kD > 0 ? local : o;
      if (kD > 0) {
        for (int64_t c = 0; c < D; ++c) acc[c] = 0;
      }
      const int64_t lp0 = (nq * a.M + m) * a.L * a.P;  // index of (n, q, m, 0, 0) in attn
      for (int64_t l = 0; l < a.L; ++l) {
        const int64_t h = a.shapes[2 * l], w = a.shapes[2 * l + 1];
        const scalar_t* vl = a.value + ((n * a.S + a.starts[l]) * a.M + m) * D;
        for (int64_t p = 0; p < a.P; ++p) {
          const int64_t i = lp0 + l * a.P + p;
          const BilinearTaps<scalar_t> taps = bilinear_taps<scalar_t>(a.loc[2 * i], a.loc[2 * i + 1], h, w);
          accumulate_sample<scalar_t>(vl, row, taps, a.attn[i], acc, D);
        }
      }
      if (kD > 0) {
        for (int64_t c = 0; c < D; ++c) o[c] = acc[c];
      }
    }
  }
}

// Heads (n, m) in [begin, end): every gradient of the points of (n, :, m).
template <typename scalar_t, int64_t kD>
LEGACY_DET_INLINE void backward_heads(const Args<scalar_t>& a, int64_t begin, int64_t end) {
  const int64_t D = kD > 0 ? kD : a.D;
  const int64_t row = a.M * D;
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / a.M, m = nm % a.M;
    for (int64_t q = 0; q < a.Lq; ++q) {
      const int64_t nqm = (n * a.Lq + q) * a.M + m;
      const scalar_t* grad_row = a.grad_out + nqm * D;
      for (int64_t l = 0; l < a.L; ++l) {
        const int64_t h = a.shapes[2 * l], w = a.shapes[2 * l + 1];
        const int64_t base = ((n * a.S + a.starts[l]) * a.M + m) * D;
        for (int64_t p = 0; p < a.P; ++p) {
          const int64_t i = (nqm * a.L + l) * a.P + p;
          const BilinearTaps<scalar_t> taps = bilinear_taps<scalar_t>(a.loc[2 * i], a.loc[2 * i + 1], h, w);
          sample_backward<scalar_t>(a.value + base, row, taps, a.attn[i], grad_row, D, a.grad_value + base,
                                    PlainAdd(), h, w, a.grad_attn + i, a.grad_loc + 2 * i, a.grad_loc + 2 * i + 1);
        }
      }
    }
  }
}

template <typename scalar_t>
LEGACY_DET_INLINE void forward_any(const Args<scalar_t>& a, int64_t begin, int64_t end) {
  switch (a.D) {
    case 16: return forward_rows<scalar_t, 16>(a, begin, end);
    case 32: return forward_rows<scalar_t, 32>(a, begin, end);
    case 64: return forward_rows<scalar_t, 64>(a, begin, end);
    default: return forward_rows<scalar_t, 0>(a, begin, end);
  }
}

template <typename scalar_t>
LEGACY_DET_INLINE void backward_any(const Args<scalar_t>& a, int64_t begin, int64_t end) {
  switch (a.D) {
    case 16: return backward_heads<scalar_t, 16>(a, begin, end);
    case 32: return backward_heads<scalar_t, 32>(a, begin, end);
    case 64: return backward_heads<scalar_t, 64>(a, begin, end);
    default: return backward_heads<scalar_t, 0>(a, begin, end);
  }
}

// One copy per instruction set; the arithmetic (ms_deform_attn_sampling.h) is inlined into each.
template <typename scalar_t>
void forward_baseline(const Args<scalar_t>& a, int64_t begin, int64_t end) {
  forward_any(a, begin, end);
}
template <typename scalar_t>
void backward_baseline(const Args<scalar_t>& a, int64_t begin, int64_t end) {
  backward_any(a, begin, end);
}

#if LEGACY_DET_X86_AVX2
__attribute__((target("avx2,fma"))) void forward_avx2(const Args<float>& a, int64_t begin, int64_t end) {
  forward_any(a, begin, end);
}
__attribute__((target("avx2,fma"))) void forward_avx2(const Args<double>& a, int64_t begin, int64_t end) {
  forward_any(a, begin, end);
}
__attribute__((target("avx2,fma"))) void backward_avx2(const Args<float>& a, int64_t begin, int64_t end) {
  backward_any(a, begin, end);
}
__attribute__((target("avx2,fma"))) void backward_avx2(const Args<double>& a, int64_t begin, int64_t end) {
  backward_any(a, begin, end);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

template <typename scalar_t>
void run_forward(const Args<scalar_t>& a, int64_t begin, int64_t end) {
#if LEGACY_DET_X86_AVX2
  if (cpu_has_avx2()) return forward_avx2(a, begin, end);
#endif
  forward_baseline(a, begin, end);
}

template <typename scalar_t>
void run_backward(const Args<scalar_t>& a, int64_t begin, int64_t end) {
#if LEGACY_DET_X86_AVX2
  if (cpu_has_avx2()) return backward_avx2(a, begin, end);
#endif
  backward_baseline(a, begin, end);
}

struct Inputs {
  at::Tensor value, spatial_shapes, level_start_index, sampling_loc, attn_weight;
  int64_t N, S, M, D, L, Lq, P;
};

Inputs prepare(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
               const at::Tensor& sampling_loc, const at::Tensor& attn_weight, int64_t im2col_step) {
  check_ms_deform_attn_args(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step);
  Inputs in{value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
            sampling_loc.contiguous(), attn_weight.contiguous(), value.size(0), value.size(1), value.size(2),
            value.size(3), spatial_shapes.size(0), sampling_loc.size(1), sampling_loc.size(4)};
  const int64_t* shapes = in.spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = in.level_start_index.data_ptr<int64_t>();
  for (int64_t l = 0; l < in.L; ++l) {
    const int64_t h = shapes[2 * l], w = shapes[2 * l + 1], start = starts[l];
    TORCH_CHECK(h > 0 && w > 0 && start >= 0 && start + h * w <= in.S, "ms_deform_attn: level ", l, " (H ", h,
                ", W ", w, ", start ", start, ") does not fit in the ", in.S, " spatial positions of value");
  }
  return in;
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                              const at::Tensor& attn_weight, int64_t im2col_step) {
  const Inputs in = prepare(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step);
  at::Tensor output = at::zeros({in.N, in.Lq, in.M, in.D}, in.value.options());
  AT_DISPATCH_FLOATING_TYPES(in.value.scalar_type(), "ms_deform_attn_cpu", [&] {
    Args<scalar_t> a = launch_args<scalar_t>(in.value, in.spatial_shapes, in.level_start_index, in.sampling_loc,
                                              in.attn_weight);
    a.out = output.data_ptr<scalar_t>();
    // A query costs M * L * P samples of D channels: at least 16 queries make a task.
    at::parallel_for(0, in.N * in.Lq, 16, [&](int64_t begin, int64_t end) { run_forward(a, begin, end); });
  });
  return output.view({in.N, in.Lq, in.M * in.D});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_loc, const at::Tensor& attn_weight,
    int64_t im2col_step) {
  const Inputs in = prepare(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step);
  TORCH_CHECK(grad_output.numel() == in.N * in.Lq * in.M * in.D && grad_output.scalar_type() == value.scalar_type(),
              "ms_deform_attn_backward: grad_output must be (N, Lq, M * D) of value's dtype, got ",
              grad_output.sizes(), " ", grad_output.scalar_type());
  const at::Tensor grad = grad_output.contiguous();
  at::Tensor grad_value = at::zeros_like(in.value);
  at::Tensor grad_loc = at::empty_like(in.sampling_loc);  // every entry is written
  at::Tensor grad_attn = at::empty_like(in.attn_weight);
  AT_DISPATCH_FLOATING_TYPES(in.value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    Args<scalar_t> a = launch_args<scalar_t>(in.value, in.spatial_shapes, in.level_start_index, in.sampling_loc,
                                              in.attn_weight);
    a.grad_out = grad.data_ptr<scalar_t>();
    a.grad_value = grad_value.data_ptr<scalar_t>();
    a.grad_loc = grad_loc.data_ptr<scalar_t>();
    a.grad_attn = grad_attn.data_ptr<scalar_t>();
    // One task per (n, m): the partition that keeps the scatter-adds into grad_value disjoint.
    at::parallel_for(0, in.N * in.M, 1, [&](int64_t begin, int64_t end) { run_backward(a, begin, end); });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(legacy_det, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace legacy_det
