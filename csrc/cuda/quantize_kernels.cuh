// The device code of the QSGD ops (quantize, dequantize), launched by ops_cuda.cu. It is kept apart
// from the host code so that it compiles two ways: by nvcc for the GPU, and by g++ against the CPU
// emulation of the CUDA thread model in tests/native/cuda_emu.h, which runs these kernels (warp
// collectives included) in the test suite on machines without a GPU.
//
// Work split. Scales: one warp per bucket, summing the l2 norm in the CPU kernels' order (lane j
// takes elements j, j + 32, ... in float64, then a fold at distances 16, 8, 4, 2, 1). When a
// bucket's fields fill whole 32-bit words (bucket_size * bits a multiple of 32, as for the usual
// 512), the same warp then quantizes and packs its bucket: one pass over the input in DRAM terms.
// Otherwise packing is a second kernel with one thread per 32-bit word of the packed stream,
// computing every field that overlaps the word (a field that straddles two words is computed by
// both threads, identically), so no two threads write the same byte and no atomics are needed.
//
// Errors that depend on the data are recorded on the device instead of raised: a bucket holding
// NaN or Inf, or whose l2 norm overflows float32, gets a NaN scale; a value above its given scale
// makes that bucket's fields invalid (the all-ones field); dequantize writes NaN for such a field.
//
// Dequantize: one thread per 8 values, whose fields are B whole bytes of the packed stream; one
// bucket division a thread, and 16-byte vector stores when the output is aligned.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>

#include "cuda/launch.cuh"
#include "qpr/elias.h"
#include "qpr/qsgd.h"
#include "qpr/rng.h"

namespace qpr {
namespace cuda {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kNormGiven = 2;  // as cpu::kNormGiven: scales are read, not computed
static_assert(elias::kNormMax == 0 && elias::kNormL2 == 1, "norm codes are 0, 1, then given");

struct F32 {
  using T = float;
  __device__ static float load(const T* x, int64_t i) { return x[i]; }
  __device__ static T store(float v) { return v; }
  __device__ static uint32_t bits(T v) { return __float_as_uint(v); }
};
struct F16 {
  using T = __half;
  __device__ static float load(const T* x, int64_t i) { return __half2float(x[i]); }
  __device__ static T store(float v) { return __float2half_rn(v); }
  __device__ static uint32_t bits(T v) { return __half_as_ushort(v); }
};
struct BF16 {
  using T = __nv_bfloat16;
  __device__ static float load(const T* x, int64_t i) { return __bfloat162float(x[i]); }
  __device__ static T store(float v) { return __float2bfloat16_rn(v); }
  __device__ static uint32_t bits(T v) { return __bfloat16_as_ushort(v); }
};

// Whether quantize takes the fused one-warp-a-bucket kernel: buckets that fill whole 32-bit words,
// written into a word-aligned buffer.
inline bool quantize_is_fused(int64_t bucket_size, int64_t bits, const void* packed) {
  return (bucket_size * bits) % 32 == 0 && reinterpret_cast<uintptr_t>(packed) % 4 == 0;
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
  auto take = [&](float v) {
    max_bits = max(max_bits, __float_as_uint(v) & 0x7FFFFFFFu);
    if (NORM == elias::kNormL2) {
      const double d = static_cast<double>(v);
      acc += d * d;  // exact: a float's square fits a double, so a fused multiply-add agrees
    }
  };
  // Four loads in flight a lane before any is used (a bucket is read once from DRAM, so the
  // loads' latency is what bounds this loop); the sum still runs in the CPU's order.
  int64_t i = lane;
  for (; i + 3 * 32 < n; i += 4 * 32) {
    float v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = E::load(x, start + i + 32 * u);
#pragma unroll
    for (int u = 0; u < 4; ++u) take(v[u]);
  }
  for (; i < n; i += 32) take(E::load(x, start + i));
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
// 32 fields at a time, lane k storing word k of them. Widths that divide 32 (2, 4, 8) build the
// words with a few shuffles; the others with one OR-reduction across the warp per word.
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
  // the generator's stream key changes every 2^32 elements: computed again only then
  uint32_t stream_hi = static_cast<uint32_t>(start >> 32);
  uint32_t stream = rng_stream_key(key, stream_hi);
  for (int64_t c = 0; c < n; c += 32) {
    const int64_t i = c + lane;
    uint32_t field = 0;
    if (i < n) {
      const int64_t e = start + i;
      if (static_cast<uint32_t>(e >> 32) != stream_hi) {
        stream_hi = static_cast<uint32_t>(e >> 32);
        stream = rng_stream_key(key, stream_hi);
      }
      const uint32_t h = rng_draw(stream, static_cast<uint32_t>(e));
      field = invalid ? QsgdLevels<B>::kInvalidField
                      : static_cast<uint32_t>(qsgd_field<S>(E::load(x, e), divisor, h));
    }
    uint32_t mine = 0;  // lane k < B: word k of the chunk's B words
    if constexpr (32 % B == 0) {
      // A word holds the fields of 32 / B neighbouring lanes: an OR over each group in
      // log2(32 / B) shuffles, then lane k fetches word k from its group's first lane.
      constexpr int kPerWord = 32 / B;
      uint32_t v = field << ((lane % kPerWord) * B);
#pragma unroll
      for (int d = kPerWord / 2; d >= 1; d /= 2) v |= __shfl_down_sync(kFullMask, v, d);
      mine = __shfl_sync(kFullMask, v, (lane * kPerWord) % 32);
    } else {  // fields straddle words: one OR over the warp per word
      const int shift = (lane * B) % 32;
      const int home = (lane * B) / 32;  // the word this lane's field starts in
      for (int k = 0; k < B; ++k) {
        uint32_t part = 0;
        if (k == home) part = field << shift;
        if (k == home + 1 && shift + B > 32) part = field >> (32 - shift);
        const uint32_t word = __reduce_or_sync(kFullMask, part);
        if (lane == k) mine = word;
      }
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
  // one division a thread: the bucket advances by at most one a value
  int64_t bucket = e0 / bucket_size;
  int64_t bucket_end = (bucket + 1) * bucket_size;
  float divisor = qsgd_divisor(scales[bucket]);
  bool invalid = poisoned[bucket] != 0;
  for (int64_t e = e0; e < e1; ++e) {
    if (e == bucket_end) {
      ++bucket;
      bucket_end += bucket_size;
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

// ---- dequantize: one thread per 8 values --------------------------------------------------------

// Values a dequantize thread writes: their 8 fields are exactly B whole bytes of the stream.
constexpr int kDequantizeGroup = 8;

// Stores 8 consecutive values as 16-byte vector stores (out + e 16-byte aligned), or one by one.
template <typename E>
__device__ void store_group(typename E::T* __restrict__ out, const float (&v)[kDequantizeGroup],
                            int count, bool vector) {
  using T = typename E::T;
  if (vector && count == kDequantizeGroup) {
    constexpr int kWords = kDequantizeGroup * sizeof(T) / 4;
    uint32_t w[kWords];
#pragma unroll
    for (int k = 0; k < kWords; ++k) {
      if constexpr (sizeof(T) == 4) {
        w[k] = E::bits(E::store(v[k]));
      } else {
        w[k] = E::bits(E::store(v[2 * k])) | E::bits(E::store(v[2 * k + 1])) << 16;
      }
    }
#pragma unroll
    for (int k = 0; k < kWords; k += 4) {
      *reinterpret_cast<uint4*>(reinterpret_cast<uint32_t*>(out) + k) =
          make_uint4(w[k], w[k + 1], w[k + 2], w[k + 3]);
    }
    return;
  }
  for (int j = 0; j < count; ++j) out[j] = E::store(v[j]);
}

template <int B, typename E>
__global__ void dequantize_kernel(const uint8_t* __restrict__ packed, int64_t packed_bytes,
                                  const float* __restrict__ scales, int64_t numel,
                                  int64_t bucket_size, typename E::T* __restrict__ out,
                                  bool vector_stores) {
  constexpr int S = QsgdLevels<B>::kS;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t e0 = group * kDequantizeGroup;
  if (e0 >= numel) return;
  uint64_t fields = 0;
  const int64_t byte0 = group * B;
#pragma unroll
  for (int k = 0; k < B; ++k) {
    if (byte0 + k < packed_bytes) fields |= static_cast<uint64_t>(packed[byte0 + k]) << (8 * k);
  }
  const int count = static_cast<int>(min(static_cast<int64_t>(kDequantizeGroup), numel - e0));
  // one division a thread: the bucket advances by at most one a value
  int64_t bucket = e0 / bucket_size;
  int64_t bucket_end = (bucket + 1) * bucket_size;
  float step = qsgd_step(scales[bucket], S);
  float v[kDequantizeGroup];
#pragma unroll
  for (int j = 0; j < kDequantizeGroup; ++j) {
    if (j < count && e0 + j == bucket_end) {
      ++bucket;
      bucket_end += bucket_size;
      step = qsgd_step(scales[bucket], S);
    }
    const uint32_t field = static_cast<uint32_t>(fields >> (j * B)) & ((1u << B) - 1u);
    const float level = static_cast<float>(static_cast<int>(field) - S);
    v[j] = field == QsgdLevels<B>::kInvalidField ? __int_as_float(0x7FC00000) : level * step;
  }
  store_group<E>(out + e0, v, count, vector_stores);
}

// Whether dequantize can store whole groups as 16-byte vectors: an aligned output.
inline bool dequantize_vector_stores(const void* out) {
  return reinterpret_cast<uintptr_t>(out) % 16 == 0;
}

}  // namespace cuda
}  // namespace qpr
