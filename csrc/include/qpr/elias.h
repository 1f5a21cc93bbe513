// Elias gamma codes and the self-describing stream of an Elias-coded QSGD tensor (QSGD's Code_s,
// Alistarh et al., NeurIPS 2017, section 3.2), shared by the CPU and CUDA coders.
//
// Bits are numbered LSB-first: bit k of a section lives in byte k / 8 at bit position k % 8.
// A gamma code of n >= 1 with L = floor(log2 n) is 2L + 1 bits: L zero bits, a one bit, then the
// low L bits of n, least significant first. (The textbook code writes n's bits after the zeros
// most significant first; this order has the same length and lets a decoder read the value with
// one shift and mask after counting trailing zeros.)
//
// Stream layout (all integers little-endian):
//   0  char[4] magic "QPRE"          12 u32 bucket_size (>= 1)
//   4  u8 version (1)                16 u64 numel
//   5  u8 bits (2..8)                24 u64 code_bits: length of the code section in bits
//   6  u8 norm (0 max, 1 l2)         32 i64 shape[ndim]
//   7  u8 dtype (0 f32, 1 f16, 2 bf16)
//   8  u8 ndim (<= kMaxDims)   9..11 reserved, zero
//   then f32 scales[nbuckets], u32 offsets[nbuckets] (bit where each bucket's codes start,
//   offsets[0] == 0, non-decreasing), then ceil(code_bits / 8) code bytes whose unused high bits
//   are zero. The stream is exactly that long.
// Per bucket, for each nonzero level in order: gamma(gap) with gap = index - previous index
// (the previous index starts at -1), one sign bit (1 = negative), gamma(|level|).
#pragma once

#include <cstdint>

#include "qpr/hostdev.h"

namespace qpr {
namespace elias {

constexpr uint8_t kMagic[4] = {'Q', 'P', 'R', 'E'};
constexpr uint8_t kVersion = 1;
constexpr int64_t kHeaderBytes = 32;
constexpr int kMaxDims = 16;
constexpr int kNormMax = 0;
constexpr int kNormL2 = 1;
constexpr int kDtypeFloat32 = 0;
constexpr int kDtypeFloat16 = 1;
constexpr int kDtypeBFloat16 = 2;
// Offsets are u32 bit positions, so a stream carries fewer than 2^32 code bits (512 MiB).
constexpr uint64_t kMaxCodeBits = 0xFFFFFFFFull;

QPR_HD int floor_log2(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return 31 - __clz(v);
#else
  return 31 - __builtin_clz(v);
#endif
}

// The gamma code of v >= 1 with l = floor_log2(v), as the low 2l + 1 bits of the result (the
// first bit of the code in bit 0): l zeros, a one, then v's low l bits.
QPR_HD uint64_t gamma_code(uint32_t v, int l) {
  return (1u | (static_cast<uint64_t>(v ^ (1u << l)) << 1)) << l;
}

}  // namespace elias
}  // namespace qpr
