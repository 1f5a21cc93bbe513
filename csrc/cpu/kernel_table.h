// The CPU kernels' entry points. Each instruction-set build (kernels_base.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp) fills one table; ops_cpu.cpp picks the best one the processor supports and
// splits the work across threads. Work ranges start at element indices that are multiples of 8,
// so every range packs into whole bytes of its own.
#pragma once

#include <cstdint>
#include <vector>

#include "qpr/rng.h"

namespace qpr {
namespace cpu {

// Element types, numbered as in the Elias stream header.
enum ElemType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
// Integer element types of pack_bits / unpack_bits.
enum IntType : int { kU8 = 0, kI16 = 1, kI32 = 2, kI64 = 3 };

// Flags a kernel returns; ops_cpu.cpp turns them into Python errors.
enum Flag : int {
  kFlagNonFinite = 1,       // NaN or Inf in the input (ops_cpu.cpp finds which and where)
  kFlagScaleOverflow = 2,   // a bucket's l2 norm is not representable in float32
  kFlagInvalidField = 4,    // a packed field outside the valid range
  kFlagOutputOverflow = 8,  // a dequantized value overflows the output dtype
  kFlagScaleTooSmall = 16   // a value's magnitude exceeds its bucket's given scale
};

// QuantizeJob::norm beyond the Elias norm codes: scales are read from QuantizeJob::scales (agreed
// across workers beforehand) instead of computed.
constexpr int kNormGiven = 2;

struct QuantizeJob {
  const void* x;
  int elem;
  int64_t numel;
  int64_t bucket_size;
  int bits;
  int norm;
  RngKey key;
  uint8_t* packed;
  float* scales;  // written, or read when norm == kNormGiven
};

struct DequantizeJob {
  const uint8_t* packed;
  const float* scales;
  int64_t numel;
  int64_t bucket_size;
  int bits;
  int elem;
  void* out;
};

struct PackJob {
  const void* src;
  int src_type;
  int field_bits;
  uint8_t* out;
};

struct UnpackJob {
  const uint8_t* packed;
  int field_bits;
  int dst_type;
  void* dst;
};

struct EliasJob {
  const uint8_t* packed;
  int64_t numel;
  int64_t bucket_size;
  int bits;
};

// Where decoding failed; bucket < 0 means no error.
struct EliasError {
  int64_t bucket = -1;
  const char* what = nullptr;
};

struct EliasDecodeJob {
  const uint8_t* code;
  uint64_t code_bytes;
  uint64_t code_bits;
  const uint32_t* offsets;
  int64_t numel;
  int64_t bucket_size;
  int bits;
  uint8_t* packed;  // zero-filled by the caller
};

struct KernelTable {
  const char* name;
  // Buckets [b0, b1); b0 * bucket_size is a multiple of 8. Returns Flag bits.
  int (*quantize)(const QuantizeJob& job, int64_t b0, int64_t b1);
  int (*dequantize)(const DequantizeJob& job, int64_t b0, int64_t b1);
  // Elements [e0, e1); e0 is a multiple of 8. pack returns kFlagInvalidField for values that do
  // not fit the field.
  int (*pack)(const PackJob& job, int64_t e0, int64_t e1);
  void (*unpack)(const UnpackJob& job, int64_t e0, int64_t e1);
  // Elias codes of buckets [b0, b1) into code (grown as needed, bit 0 onwards), with offsets[b]
  // the bit where bucket b starts and bits the total. Returns kFlagInvalidField for a field no
  // level encodes.
  int (*elias_encode)(const EliasJob& job, int64_t b0, int64_t b1, std::vector<uint8_t>& code,
                      uint64_t* offsets, uint64_t& bits);
  EliasError (*elias_decode)(const EliasDecodeJob& job, int64_t b0, int64_t b1);
};

extern const KernelTable kBaseKernels;
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512Kernels;

}  // namespace cpu
}  // namespace qpr
