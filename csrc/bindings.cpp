// The hvd_qpr._C extension: declares the ops once (implementations register per device in
// cpu/ops_cpu.cpp and, when built, cuda/), and carries the non-tensor helpers.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/ops_cpu.h"

TORCH_LIBRARY(hvd_qpr, m) {
  m.def("quantize(Tensor x, int bits, int bucket_size, int norm, int seed) -> (Tensor, Tensor)");
  m.def(
      "quantize_out(Tensor x, int bits, int bucket_size, int norm, int seed, Tensor(a!) packed, "
      "Tensor(b!) scales) -> ()");
  m.def(
      "quantize_scaled_out(Tensor x, Tensor scales, int bits, int bucket_size, int seed, "
      "Tensor(a!) packed) -> ()");
  m.def(
      "dequantize_out(Tensor packed, Tensor scales, int bucket_size, int bits, Tensor(a!) out) "
      "-> ()");
  m.def(
      "dequantize(Tensor packed, Tensor scales, int[] shape, int bits, int bucket_size, "
      "ScalarType dtype) -> Tensor");
  m.def("pack_bits(Tensor values, int field_bits) -> Tensor");
  m.def("unpack_bits(Tensor packed, int field_bits, int numel, ScalarType dtype) -> Tensor");
  m.def(
      "elias_encode(Tensor packed, Tensor scales, int[] shape, int bits, int bucket_size, "
      "int norm, ScalarType dtype) -> Tensor");
  m.def("elias_decode(Tensor stream) -> (Tensor, Tensor, Tensor)");
  m.def("elias_decode_out(Tensor stream, Tensor(a!) packed, Tensor(b!) scales) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native kernels of hvd_qpr; use them through hvd_qpr.ops.";
  m.def("available_kernel_sets", &qpr::cpu::available_kernel_sets,
        "CPU kernel sets this processor can run, best first.");
  m.def("active_kernel_set", &qpr::cpu::active_kernel_set, "The CPU kernel set in use.");
  m.def("force_kernel_set", &qpr::cpu::force_kernel_set,
        "Use one CPU kernel set ('auto' restores the best); for tests and benchmarks.");
#ifdef QPR_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
