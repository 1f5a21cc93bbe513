// CUDA implementations of the QSGD and bit-packing ops (quantize, dequantize, pack_bits,
// unpack_bits): the host side, which checks arguments and launches the kernels of
// quantize_kernels.cuh and bitpack.cuh on the current stream. The rounding, the random draws and
// the field layout come from the headers the CPU kernels use (csrc/include/qpr), so both devices
// give the same bits for the same input and seed.
//
// No call waits for the GPU: errors that depend on the data are recorded on the device
// (quantize_kernels.cuh says how). hvd_qpr's optimizer checks that the model is finite before it
// quantizes (it synchronizes there anyway), and hvd_qpr.ops documents the rest.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

#include "cuda/bitpack.cuh"
#include "cuda/quantize_kernels.cuh"
#include "qpr/checks.h"
#include "qpr/dispatch.h"

namespace qpr {
namespace cuda {
namespace {

template <typename F>
void dispatch_elem(int code, F&& f) {
  if (code == elias::kDtypeFloat32) {
    f(F32{});
  } else if (code == elias::kDtypeFloat16) {
    f(F16{});
  } else {
    f(BF16{});
  }
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be on a CUDA device, got ", t.device());
}

// Every named tensor on a CUDA device, the same as the first one's.
void check_on_one_cuda_device(
    const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> named) {
  for (const auto& [name, t] : named) check_cuda(*t, op, name);
  const at::Tensor& first = *named.begin()->second;
  for (const auto& [name, t] : named) {
    TORCH_CHECK_VALUE(t->device() == first.device(), op, ": ", name, " is on ", t->device(),
                      " but the input is on ", first.device());
  }
}

void run_quantize(const at::Tensor& x_in, int64_t bits, int64_t bucket_size, int64_t norm,
                  int64_t seed, at::Tensor& packed, at::Tensor& scales, const char* op) {
  check_on_one_cuda_device(op, {{"x", &x_in}, {"packed", &packed}, {"scales", &scales}});
  check_float_input(x_in, op, "x");
  const int64_t numel = x_in.numel();
  check_quantized_outputs(packed, scales, numel, bits, bucket_size, op);
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t nbuckets = scales.numel();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const RngKey key = make_rng_key(static_cast<uint64_t>(seed));
  const int64_t words = (numel * bits + 31) / 32;
  // Buckets that fill whole words, into a word-aligned buffer: the fused one-warp-a-bucket kernel.
  const bool fused = quantize_is_fused(bucket_size, bits, packed.data_ptr());
  at::Tensor poisoned = fused ? at::Tensor() : at::empty({nbuckets}, x.options().dtype(at::kByte));
  dispatch_elem(elem_code(x.scalar_type(), op), [&](auto elem) {
    using E = decltype(elem);
    using T = typename E::T;
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    const int64_t scale_blocks = blocks_for(nbuckets, kWarpsPerBlock);
    // the norm code (max 0, l2 1, given 2) becomes a template parameter once, here
    if (fused) {
      dispatch_int<2, 8>(static_cast<int>(bits), [&](auto b) {
        dispatch_int<elias::kNormMax, kNormGiven>(static_cast<int>(norm), [&](auto nm) {
          quantize_fused_kernel<b(), E, nm()><<<scale_blocks, kThreads, 0, stream>>>(
              xp, numel, bucket_size, nbuckets, scales.data_ptr<float>(), key,
              packed.data_ptr<uint8_t>(), packed.numel());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
      return;
    }
    dispatch_int<elias::kNormMax, kNormGiven>(static_cast<int>(norm), [&](auto nm) {
      bucket_scales_kernel<E, nm()><<<scale_blocks, kThreads, 0, stream>>>(
          xp, numel, bucket_size, nbuckets, scales.data_ptr<float>(), poisoned.data_ptr<uint8_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    dispatch_int<2, 8>(static_cast<int>(bits), [&](auto b) {
      quantize_pack_kernel<b(), E><<<blocks_for(words, kThreads), kThreads, 0, stream>>>(
          xp, numel, bucket_size, scales.data_ptr<float>(), poisoned.data_ptr<uint8_t>(), key,
          packed.data_ptr<uint8_t>(), packed.numel());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void quantize_out_cuda(const at::Tensor& x, int64_t bits, int64_t bucket_size, int64_t norm,
                       int64_t seed, at::Tensor& packed, at::Tensor& scales) {
  check_norm(norm, "quantize");
  run_quantize(x, bits, bucket_size, norm, seed, packed, scales, "quantize");
}

void quantize_scaled_out_cuda(const at::Tensor& x, const at::Tensor& scales_in, int64_t bits,
                              int64_t bucket_size, int64_t seed, at::Tensor& packed) {
  check_dtype(scales_in, at::kFloat, "quantize", "scales");
  at::Tensor scales = scales_in.contiguous();
  run_quantize(x, bits, bucket_size, kNormGiven, seed, packed, scales, "quantize");
}

std::tuple<at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x, int64_t bits,
                                                 int64_t bucket_size, int64_t norm, int64_t seed) {
  auto [packed, scales] = empty_quantized(x, bits, bucket_size, "quantize");
  quantize_out_cuda(x, bits, bucket_size, norm, seed, packed, scales);
  return {packed, scales};
}

void dequantize_out_cuda(const at::Tensor& packed_in, const at::Tensor& scales_in,
                         int64_t bucket_size, int64_t bits, at::Tensor& out) {
  constexpr const char* op = "dequantize";
  check_on_one_cuda_device(op, {{"packed", &packed_in}, {"scales", &scales_in}, {"out", &out}});
  check_float_input(out, op, "out");
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous");
  const int64_t numel = out.numel();
  check_quantized(packed_in, scales_in, numel, bits, bucket_size, op);
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_elem(elem_code(out.scalar_type(), op), [&](auto elem) {
    using E = decltype(elem);
    dispatch_int<2, 8>(static_cast<int>(bits), [&](auto b) {
      const int64_t groups = (numel + kDequantizeGroup - 1) / kDequantizeGroup;
      dequantize_kernel<b(), E><<<blocks_for(groups, kThreads), kThreads, 0, stream>>>(
          packed.data_ptr<uint8_t>(), packed.numel(), scales.data_ptr<float>(), numel, bucket_size,
          reinterpret_cast<typename E::T*>(out.data_ptr()),
          dequantize_vector_stores(out.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor dequantize_cuda(const at::Tensor& packed, const at::Tensor& scales,
                           at::IntArrayRef shape, int64_t bits, int64_t bucket_size,
                           at::ScalarType dtype) {
  elem_code(dtype, "dequantize");
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  dequantize_out_cuda(packed, scales, bucket_size, bits, out);
  return out;
}

// ---- pack_bits / unpack_bits --------------------------------------------------------------------

template <typename F>
void dispatch_int_type(at::ScalarType dt, const char* op, const char* name, F&& f) {
  switch (dt) {
    case at::kByte:
      return f(uint8_t{});
    case at::kShort:
      return f(int16_t{});
    case at::kInt:
      return f(int32_t{});
    case at::kLong:
      return f(int64_t{});
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be uint8, int16, int32 or int64, got ",
                       dtype_name(dt));
  }
}

at::Tensor pack_bits_cuda(const at::Tensor& values_in, int64_t field_bits) {
  constexpr const char* op = "pack_bits";
  check_cuda(values_in, op, "values");
  check_field_bits(field_bits, op);
  const c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor values = values_in.contiguous().reshape({-1});
  const int64_t numel = values.numel();
  at::Tensor out = at::empty({packed_bytes(numel, field_bits)}, values.options().dtype(at::kByte));
  dispatch_int_type(values.scalar_type(), op, "values", [&](auto zero) {
    using T = decltype(zero);
    if (numel > 0) {
      // a range check costs one synchronization; pack_bits is not on the quantizers' path
      const auto [lo, hi] = at::aminmax(values);
      TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < (int64_t{1} << field_bits),
                        op, ": values must be in [0, 2**", field_bits, "), got min ",
                        lo.item<int64_t>(), " and max ", hi.item<int64_t>());
    }
    if (out.numel() == 0) return;
    bitpack::pack_kernel<T>
        <<<blocks_for(out.numel(), kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            values.data_ptr<T>(), numel, static_cast<int>(field_bits), out.data_ptr<uint8_t>(),
            out.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor unpack_bits_cuda(const at::Tensor& packed_in, int64_t field_bits, int64_t numel,
                            at::ScalarType dtype) {
  constexpr const char* op = "unpack_bits";
  check_cuda(packed_in, op, "packed");
  check_unpack(packed_in, field_bits, numel, dtype, op);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  if (numel == 0) return out;
  dispatch_int_type(dtype, op, "dtype", [&](auto zero) {
    using T = decltype(zero);
    bitpack::unpack_kernel<T>
        <<<blocks_for(numel, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            packed.data_ptr<uint8_t>(), packed.numel(), static_cast<int>(field_bits), numel,
            out.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace qpr

TORCH_LIBRARY_IMPL(hvd_qpr, CUDA, m) {
  m.impl("quantize", &qpr::cuda::quantize_cuda);
  m.impl("quantize_out", &qpr::cuda::quantize_out_cuda);
  m.impl("quantize_scaled_out", &qpr::cuda::quantize_scaled_out_cuda);
  m.impl("dequantize", &qpr::cuda::dequantize_cuda);
  m.impl("dequantize_out", &qpr::cuda::dequantize_out_cuda);
  m.impl("pack_bits", &qpr::cuda::pack_bits_cuda);
  m.impl("unpack_bits", &qpr::cuda::unpack_bits_cuda);
}
