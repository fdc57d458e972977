// The fp4op operator library: schemas of the ops. Kernels are registered per backend in csrc/cpu and
// csrc/cuda, autograd in csrc/autograd.cpp; fake (meta) kernels in fp4op/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/quantize_row.h"

// Importing fp4op._C loads this library, which registers the ops with the dispatcher. Its attribute
// cpu_isa names the build of the CPU row kernel that runs ("avx2" or "baseline").
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddStringConstant(m, "cpu_isa", fp4op::cpu::quantize_row_isa()) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

TORCH_LIBRARY(fp4op, m) {
  m.def(
      "quantize(Tensor input, Tensor? global_scale, int sf_vec_size=16, bool sf_use_ue8m0=False, "
      "bool is_sf_swizzled_layout=True, bool is_sf_8x4_layout=False, "
      "bool is_global_scale_inversed=False, bool? enable_pdl=None) -> (Tensor, Tensor)");
  m.def(
      "dequantize(Tensor x_q, Tensor sf, Tensor? global_scale, int sf_vec_size=16, bool sf_use_ue8m0=False, "
      "bool is_sf_swizzled_layout=True, bool is_sf_8x4_layout=False, bool is_global_scale_inversed=False, "
      "ScalarType? output_dtype=None) -> Tensor");
}
