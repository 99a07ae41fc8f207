// The legacy_det operator library: schemas of the multi-scale deformable attention ops.
//
// Kernels are registered per backend (cpu/, cuda/); the fake (meta) kernels and the
// autograd formula are registered from Python (toolkit/ops/ms_deform_attn.py)
// through torch.library, so the ops trace under torch.compile and torch.export.
#include <Python.h>
#include <torch/library.h>

// Importing toolkit.ops._C loads this library (and runs the registrations below);
// the module itself has no members.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(legacy_det, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor value_spatial_shapes, Tensor value_level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, int im2col_step) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor value_spatial_shapes, "
      "Tensor value_level_start_index, Tensor sampling_locations, Tensor attention_weights, int im2col_step) "
      "-> (Tensor, Tensor, Tensor)");
}

// Test-only: the CUDA kernels' per-thread code (ms_deform_attn_kernels.h) run serially on the CPU, thread
// index by thread index and launch by launch, so that machines without a GPU test the CUDA indexing.
TORCH_LIBRARY(legacy_det_testing, m) {
  m.def(
      "ms_deform_attn_cuda_emulated(Tensor value, Tensor value_spatial_shapes, Tensor value_level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, int im2col_step) -> Tensor");
  m.def(
      "ms_deform_attn_backward_cuda_emulated(Tensor grad_output, Tensor value, Tensor value_spatial_shapes, "
      "Tensor value_level_start_index, Tensor sampling_locations, Tensor attention_weights, int im2col_step) "
      "-> (Tensor, Tensor, Tensor)");
}
