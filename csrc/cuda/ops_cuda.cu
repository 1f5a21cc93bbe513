// CUDA implementations of the QSGD and bit-packing ops (quantize, dequantize, pack_bits,
// unpack_bits). The rounding, the random draws and the field layout come from the headers the CPU
// kernels use (csrc/include/qpr), so both devices give the same bits for the same input and seed.
//
// Work split. Scales: one warp per bucket, summing the l2 norm in the CPU kernels' order (lane j
// takes elements j, j + 32, ... in float64, then a fold at distances 16, 8, 4, 2, 1). When a
// bucket's fields fill whole 32-bit words (bucket_size * bits a multiple of 32, as for the usual
// 512), the same warp then quantizes and packs its bucket: one pass over the input in DRAM terms.
// Otherwise packing is a second kernel with one thread per 32-bit word of the packed stream,
// computing every field that overlaps the word (a field that straddles two words is computed by
// both threads, identically), so no two threads write the same byte and no atomics are needed.
//
// Errors that depend on the data are recorded on the device instead of raised, so no call waits
// for the GPU: a bucket holding NaN or Inf, or whose l2 norm overflows float32, gets a NaN scale;
// a value above its given scale makes that bucket's fields invalid (the all-ones field); dequantize
// writes NaN for an invalid field. hvd_qpr's optimizer checks that the model is finite before it
// quantizes (it synchronizes there anyway), and hvd_qpr.ops documents the rest.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstdint>

#include "cuda/bitpack.cuh"
#include "qpr/checks.h"
#include "qpr/dispatch.h"
#include "qpr/elias.h"
#include "qpr/qsgd.h"
#include "qpr/rng.h"

namespace qpr {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kNormGiven = 2;  // as cpu::kNormGiven: scales are read, not computed
static_assert(elias::kNormMax == 0 && elias::kNormL2 == 1, "norm codes are 0, 1, then given");

struct F32 {
  using T = float;
  __device__ static float load(const T* x, int64_t i) { return x[i]; }
  __device__ static T store(float v) { return v; }
};
struct F16 {
  using T = __half;
  __device__ static float load(const T* x, int64_t i) { return __half2float(x[i]); }
  __device__ static T store(float v) { return __float2half_rn(v); }
};
struct BF16 {
  using T = __nv_bfloat16;
  __device__ static float load(const T* x, int64_t i) { return __bfloat162float(x[i]); }
  __device__ static T store(float v) { return __float2bfloat16_rn(v); }
};

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

int64_t blocks_for(int64_t work, int64_t per_block) {
  return std::max<int64_t>(1, (work + per_block - 1) / per_block);
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be on a CUDA device, got ", t.device());
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name, " is on ", b.device(),
                    " but the input is on ", a.device());
}

// ---- scales
// --------------------------------------------------------------------------------------

// The scale of one bucket, computed by a whole warp: max |x| or the l2 norm in the CPU order, or
// the given scale. Every lane returns it (NaN when the bucket is not finite or its l2 norm
// overflows) and whether the bucket's fields must be invalid (also a value above a given scale).
template <typename E, int NORM>
__device__ float warp_bucket_scale(const typename E::T* __restrict__ x, int64_t start, int64_t n,
                                   float given, bool& invalid) {
  const int lane = threadIdx.x % 32;
  uint32_t max_bits = 0;
  double acc = 0.0;
  for (int64_t i = lane; i < n; i += 32) {
    const float v = E::load(x, start + i);
    max_bits = max(max_bits, __float_as_uint(v) & 0x7FFFFFFFu);
    if (NORM == elias::kNormL2) {
      const double d = static_cast<double>(v);
      acc += d * d;  // exact: a float's square fits a double, so a fused multiply-add agrees
    }
  }
  max_bits = __reduce_max_sync(kFullMask, max_bits);
  const bool nonfinite = max_bits > 0x7F7FFFFFu;
  if (NORM == kNormGiven) {  // a given scale must be finite, non-negative and cover the bucket
    invalid = nonfinite || !(given >= 0.0f && given <= 3.402823466e38f) ||
              __uint_as_float(max_bits) > given;
    return given;
  }
  float scale = __uint_as_float(max_bits);
  if (NORM == elias::kNormL2) {
    for (int h = 16; h >= 1; h /= 2) acc += __shfl_down_sync(kFullMask, acc, h);
    scale = static_cast<float>(sqrt(__shfl_sync(kFullMask, acc, 0)));
  }
  invalid = nonfinite || !(scale <= 3.402823466e38f);
  return invalid ? __int_as_float(0x7FC00000) : scale;
}

// One warp per bucket: the scales (or the check of given ones) for the two-pass path.
template <typename E, int NORM>
__global__ void bucket_scales_kernel(const typename E::T* __restrict__ x, int64_t numel,
                                     int64_t bucket_size, int64_t nbuckets,
                                     float* __restrict__ scales, uint8_t* __restrict__ poisoned) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (b >= nbuckets) return;  // whole warps leave together
  const int64_t start = b * bucket_size;
  bool invalid = false;
  const float scale = warp_bucket_scale<E, NORM>(x, start, min(bucket_size, numel - start),
                                                 NORM == kNormGiven ? scales[b] : 0.0f, invalid);
  if (threadIdx.x % 32 != 0) return;
  if (NORM != kNormGiven) scales[b] = scale;
  poisoned[b] = invalid ? 1 : 0;
}

// ---- quantize, fused: one warp per bucket whose fields fill whole 32-bit words ------------------

// Reads the bucket for its scale and again (from cache) for its fields, and writes whole words:
// 32 fields at a time, one OR-reduction across the warp per output word, lane k storing word k.
template <int B, typename E, int NORM>
__global__ void quantize_fused_kernel(const typename E::T* __restrict__ x, int64_t numel,
                                      int64_t bucket_size, int64_t nbuckets,
                                      float* __restrict__ scales, RngKey key,
                                      uint8_t* __restrict__ packed, int64_t packed_bytes) {
  constexpr int S = QsgdLevels<B>::kS;
  const int lane = threadIdx.x % 32;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (b >= nbuckets) return;
  const int64_t start = b * bucket_size;
  const int64_t n = min(bucket_size, numel - start);
  bool invalid = false;
  const float scale =
      warp_bucket_scale<E, NORM>(x, start, n, NORM == kNormGiven ? scales[b] : 0.0f, invalid);
  if (NORM != kNormGiven && lane == 0) scales[b] = scale;
  const float divisor = qsgd_divisor(scale);
  const int shift = (lane * B) % 32;
  const int home = (lane * B) / 32;  // the word this lane's field starts in, within a chunk
  for (int64_t c = 0; c < n; c += 32) {
    const int64_t i = c + lane;
    uint32_t field = 0;
    if (i < n) {
      const int64_t e = start + i;
      const uint32_t h =
          rng_draw(rng_stream_key(key, static_cast<uint32_t>(e >> 32)), static_cast<uint32_t>(e));
      field = invalid ? QsgdLevels<B>::kInvalidField
                      : static_cast<uint32_t>(qsgd_field<S>(E::load(x, e), divisor, h));
    }
    uint32_t mine = 0;
    for (int k = 0; k < B; ++k) {
      uint32_t part = 0;
      if (k == home) part = field << shift;
      if (k == home + 1 && shift + B > 32) part = field >> (32 - shift);
      const uint32_t word = __reduce_or_sync(kFullMask, part);
      if (lane == k) mine = word;
    }
    const int64_t words = (min(static_cast<int64_t>(32), n - c) * B + 31) / 32;
    if (lane < words) {
      const int64_t byte0 = (start + c) * B / 8 + 4 * lane;  // (start + c) * B is word-aligned
      if (byte0 + 4 <= packed_bytes) {
        *reinterpret_cast<uint32_t*>(packed + byte0) = mine;
      } else {
        for (int k = 0; byte0 + k < packed_bytes; ++k) {
          packed[byte0 + k] = static_cast<uint8_t>(mine >> (8 * k));
        }
      }
    }
  }
}

// ---- quantize: one thread per 32-bit word of packed fields --------------------------------------

template <int B, typename E>
__global__ void quantize_pack_kernel(const typename E::T* __restrict__ x, int64_t numel,
                                     int64_t bucket_size, const float* __restrict__ scales,
                                     const uint8_t* __restrict__ poisoned, RngKey key,
                                     uint8_t* __restrict__ packed, int64_t packed_bytes) {
  constexpr int S = QsgdLevels<B>::kS;
  const int64_t word = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first_bit = word * 32;
  if (first_bit >= numel * B) return;
  const int64_t e0 = first_bit / B;
  const int64_t e1 = min(numel, (first_bit + 32 + B - 1) / B);  // past the last overlapping field
  uint64_t bits = 0;                                            // the stream from bit e0 * B on
  int64_t bucket = -1;
  float divisor = 1.0f;
  bool invalid = false;
  for (int64_t e = e0; e < e1; ++e) {
    if (e / bucket_size != bucket) {
      bucket = e / bucket_size;
      divisor = qsgd_divisor(scales[bucket]);
      invalid = poisoned[bucket] != 0;
    }
    const uint32_t h =
        rng_draw(rng_stream_key(key, static_cast<uint32_t>(e >> 32)), static_cast<uint32_t>(e));
    const uint32_t field = invalid
                               ? QsgdLevels<B>::kInvalidField
                               : static_cast<uint32_t>(qsgd_field<S>(E::load(x, e), divisor, h));
    bits |= static_cast<uint64_t>(field) << ((e - e0) * B);
  }
  const uint32_t w = static_cast<uint32_t>(bits >> (first_bit - e0 * B));
  const int64_t byte0 = word * 4;
  for (int k = 0; k < 4 && byte0 + k < packed_bytes; ++k) {
    packed[byte0 + k] = static_cast<uint8_t>(w >> (8 * k));
  }
}

void run_quantize(const at::Tensor& x_in, int64_t bits, int64_t bucket_size, int64_t norm,
                  int64_t seed, at::Tensor& packed, at::Tensor& scales, const char* op) {
  check_cuda(x_in, op, "x");
  check_cuda(packed, op, "packed");
  check_cuda(scales, op, "scales");
  check_same_device(x_in, packed, op, "packed");
  check_same_device(x_in, scales, op, "scales");
  check_float_input(x_in, op, "x");
  const int64_t numel = x_in.numel();
  check_quantized(packed, scales, numel, bits, bucket_size, op);
  TORCH_CHECK_VALUE(packed.is_contiguous() && scales.is_contiguous(), op,
                    ": packed and scales must be contiguous");
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t nbuckets = scales.numel();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const RngKey key = make_rng_key(static_cast<uint64_t>(seed));
  const int64_t words = (numel * bits + 31) / 32;
  // Buckets that fill whole words, into a word-aligned buffer: the fused one-warp-a-bucket kernel.
  const bool fused =
      (bucket_size * bits) % 32 == 0 && reinterpret_cast<uintptr_t>(packed.data_ptr()) % 4 == 0;
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
  check_bits(bits, "quantize");
  check_bucket_size(bucket_size, "quantize");
  at::Tensor packed = at::empty({packed_bytes(x.numel(), bits)}, x.options().dtype(at::kByte));
  at::Tensor scales =
      at::empty({num_buckets(x.numel(), bucket_size)}, x.options().dtype(at::kFloat));
  quantize_out_cuda(x, bits, bucket_size, norm, seed, packed, scales);
  return {packed, scales};
}

// ---- dequantize: one thread per value -----------------------------------------------------------

template <int B, typename E>
__global__ void dequantize_kernel(const uint8_t* __restrict__ packed, int64_t packed_bytes,
                                  const float* __restrict__ scales, int64_t numel,
                                  int64_t bucket_size, typename E::T* __restrict__ out) {
  constexpr int S = QsgdLevels<B>::kS;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= numel) return;
  const int64_t bit = e * B;
  const int64_t byte = bit / 8;
  uint32_t v = packed[byte];
  if (byte + 1 < packed_bytes) v |= static_cast<uint32_t>(packed[byte + 1]) << 8;
  const uint32_t field = (v >> (bit % 8)) & ((1u << B) - 1u);
  const float step = qsgd_step(scales[e / bucket_size], S);
  const float level = static_cast<float>(static_cast<int>(field) - S);
  out[e] =
      E::store(field == QsgdLevels<B>::kInvalidField ? __int_as_float(0x7FC00000) : level * step);
}

void dequantize_out_cuda(const at::Tensor& packed_in, const at::Tensor& scales_in,
                         int64_t bucket_size, int64_t bits, at::Tensor& out) {
  constexpr const char* op = "dequantize";
  check_cuda(packed_in, op, "packed");
  check_cuda(scales_in, op, "scales");
  check_cuda(out, op, "out");
  check_same_device(packed_in, scales_in, op, "scales");
  check_same_device(packed_in, out, op, "out");
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
      dequantize_kernel<b(), E><<<blocks_for(numel, kThreads), kThreads, 0, stream>>>(
          packed.data_ptr<uint8_t>(), packed.numel(), scales.data_ptr<float>(), numel, bucket_size,
          reinterpret_cast<typename E::T*>(out.data_ptr()));
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
