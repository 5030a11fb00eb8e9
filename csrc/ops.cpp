// Every fastops schema lives here: TORCH_LIBRARY(fastops, m). Kernels register per backend in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA); fake kernels and autograd are registered from
// Python (fastops/ops/*.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace fastops {

static std::string build_info() {
  std::string s = "cuda_archs=";
  s += FASTOPS_CUDA_ARCHS;
#ifdef FASTOPS_WITH_CUDA
  s += ";with_cuda=1";
#else
  s += ";with_cuda=0";
#endif
#ifdef _OPENMP
  s += ";openmp=1";
#endif
#ifdef __AVX2__
  s += ";cpu_isa=avx2";
#elif defined(__SSE2__)
  s += ";cpu_isa=sse2";
#endif
  return s;
}

TORCH_LIBRARY(fastops, m) {
  // padding is [top, left, bottom, right]; the Python front turns ints, pairs, "same" and "valid" into it.
  m.def("depthwise_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, "
        "int[2] dilation) -> Tensor");
  m.def("depthwise_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
        "int[4] padding, int[2] dilation) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def("_build_info() -> str", &build_info);
}

}  // namespace fastops

// Loading fastops._C from Python runs the static registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
