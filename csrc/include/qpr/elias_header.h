// The header of an Elias stream (layout: elias.h), written and read on the host by the CPU and
// CUDA coders alike; parse_header raises the same ValueError messages for both.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "qpr/elias.h"

namespace qpr {
namespace elias {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "hvd_qpr streams are little-endian");

template <typename T>
T load_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

template <typename T>
void store_le(uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}

// Writes the fixed header and the shape: the first kHeaderBytes + 8 * ndim bytes of a stream.
inline void write_header(uint8_t* s, int bits, int norm, int dtype_code, int64_t bucket_size,
                         const int64_t* shape, int64_t ndim, uint64_t numel, uint64_t code_bits) {
  std::memset(s, 0, kHeaderBytes);
  std::memcpy(s, kMagic, 4);
  s[4] = kVersion;
  s[5] = static_cast<uint8_t>(bits);
  s[6] = static_cast<uint8_t>(norm);
  s[7] = static_cast<uint8_t>(dtype_code);
  s[8] = static_cast<uint8_t>(ndim);
  store_le<uint32_t>(s + 12, static_cast<uint32_t>(bucket_size));
  store_le<uint64_t>(s + 16, numel);
  store_le<uint64_t>(s + 24, code_bits);
  for (int64_t i = 0; i < ndim; ++i) store_le<int64_t>(s + kHeaderBytes + 8 * i, shape[i]);
}

struct StreamHeader {
  int bits, norm, dtype_code;
  int64_t bucket_size, numel, nbuckets;
  std::vector<int64_t> shape;
  uint64_t scales_at, offsets_at, code_at, code_bytes, code_bits;
};

// The most bytes parse_header reads: the fixed header and the largest shape.
constexpr int64_t kMaxHeadBytes = kHeaderBytes + 8 * kMaxDims;

// Checks the header of a stream of `length` bytes whose first min(length, kMaxHeadBytes) bytes
// are at s, and that the length matches what it describes; the tables are checked by the caller.
inline StreamHeader parse_header(const uint8_t* s, uint64_t length) {
  const std::string bad = "elias_decode: malformed stream: ";
  TORCH_CHECK_VALUE(length >= static_cast<uint64_t>(kHeaderBytes), bad, "truncated header (",
                    length, " bytes, need ", kHeaderBytes, ")");
  TORCH_CHECK_VALUE(std::memcmp(s, kMagic, 4) == 0, bad,
                    "wrong magic (not an hvd_qpr Elias stream)");
  TORCH_CHECK_VALUE(s[4] == kVersion, bad, "unsupported version ", int(s[4]));
  StreamHeader h;
  h.bits = s[5];
  h.norm = s[6];
  h.dtype_code = s[7];
  const int ndim = s[8];
  TORCH_CHECK_VALUE(h.bits >= 2 && h.bits <= 8, bad, "bits ", h.bits, " outside 2..8");
  TORCH_CHECK_VALUE(h.norm == kNormMax || h.norm == kNormL2, bad, "unknown norm code ", h.norm);
  TORCH_CHECK_VALUE(h.dtype_code >= 0 && h.dtype_code <= 2, bad, "unknown dtype code ",
                    h.dtype_code);
  TORCH_CHECK_VALUE(ndim <= kMaxDims, bad, "ndim ", ndim, " above ", kMaxDims);
  TORCH_CHECK_VALUE(s[9] == 0 && s[10] == 0 && s[11] == 0, bad, "reserved bytes are not zero");
  const uint32_t bucket_size = load_le<uint32_t>(s + 12);
  const uint64_t numel = load_le<uint64_t>(s + 16);
  h.code_bits = load_le<uint64_t>(s + 24);
  TORCH_CHECK_VALUE(bucket_size >= 1 && bucket_size <= INT32_MAX, bad, "bucket_size ", bucket_size,
                    " outside 1..2**31-1");
  TORCH_CHECK_VALUE(h.code_bits <= kMaxCodeBits, bad, "code length ", h.code_bits,
                    " bits above the 2**32-1 limit");
  TORCH_CHECK_VALUE(length >= static_cast<uint64_t>(kHeaderBytes) + 8u * ndim, bad,
                    "truncated shape");
  uint64_t product = 1;
  for (int i = 0; i < ndim; ++i) {
    const int64_t dim = load_le<int64_t>(s + kHeaderBytes + 8 * i);
    TORCH_CHECK_VALUE(dim >= 0, bad, "negative dimension ", dim);
    h.shape.push_back(dim);
    TORCH_CHECK_VALUE(!__builtin_mul_overflow(product, static_cast<uint64_t>(dim), &product), bad,
                      "shape overflows");
  }
  TORCH_CHECK_VALUE(product == numel, bad, "shape has ", product, " elements but numel is ", numel);
  // numel now fits the shape of a real tensor; the table sizes below follow from it.
  const uint64_t nbuckets = (numel + bucket_size - 1) / bucket_size;
  h.scales_at = kHeaderBytes + 8u * ndim;
  h.offsets_at = h.scales_at + 4 * nbuckets;
  h.code_at = h.offsets_at + 4 * nbuckets;
  h.code_bytes = (h.code_bits + 7) / 8;
  TORCH_CHECK_VALUE(nbuckets <= length && h.code_at + h.code_bytes == length, bad, "length ",
                    length, " bytes, but the header describes ", h.code_at + h.code_bytes);
  h.bucket_size = bucket_size;
  h.numel = static_cast<int64_t>(numel);
  h.nbuckets = static_cast<int64_t>(nbuckets);
  return h;
}

}  // namespace elias
}  // namespace qpr
