// Bit packing kernels shared by the CUDA ops: one thread per output byte (pack) or per value
// (unpack), LSB-first fields as the CPU kernels and hvd_qpr.reference lay them out.
#pragma once

#include <cstdint>

namespace qpr {
namespace cuda {
namespace bitpack {

// Byte j of the stream from the fields overlapping its bits; values are masked to field_bits.
template <typename T>
__global__ void pack_kernel(const T* __restrict__ values, int64_t numel, int field_bits,
                            uint8_t* __restrict__ out, int64_t out_bytes) {
  const int64_t byte = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (byte >= out_bytes) return;
  const int64_t first_bit = byte * 8;
  const int64_t e0 = first_bit / field_bits;
  const int64_t e1 = min(numel, (first_bit + 8 + field_bits - 1) / field_bits);
  const uint64_t mask = (uint64_t{1} << field_bits) - 1;
  uint64_t bits = 0;
  for (int64_t e = e0; e < e1; ++e) {
    bits |= (static_cast<uint64_t>(values[e]) & mask) << ((e - e0) * field_bits);
  }
  out[byte] = static_cast<uint8_t>(bits >> (first_bit - e0 * field_bits));
}

template <typename T>
__global__ void unpack_kernel(const uint8_t* __restrict__ packed, int64_t packed_bytes,
                              int field_bits, int64_t numel, T* __restrict__ out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= numel) return;
  const int64_t bit = e * field_bits;
  const int64_t byte = bit / 8;
  uint32_t v = 0;
  for (int k = 0; k < 3 && byte + k < packed_bytes; ++k) {
    v |= static_cast<uint32_t>(packed[byte + k]) << (8 * k);
  }
  out[e] = static_cast<T>((v >> (bit % 8)) & ((1u << field_bits) - 1u));
}

}  // namespace bitpack
}  // namespace cuda
}  // namespace qpr
