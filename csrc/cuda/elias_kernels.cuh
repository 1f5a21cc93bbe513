// The device code of the Elias coder (elias_encode, elias_decode), launched by elias_cuda.cu and
// kept apart from the host code so that it also compiles against the CPU emulation of the CUDA
// thread model (tests/native/cuda_emu.h), which runs it in the test suite without a GPU.
//
// Encode: a length pass (one thread a bucket counts its code bits), an exclusive scan of the
// lengths by the host code, then a write pass (one thread a bucket ORs its codes into 32-bit words
// of a zeroed section at its offset; a bucket's first and last words are shared with its
// neighbours, hence the atomics).
// Decode: the host fills one byte a value with level 0; one thread a bucket checks the tables and
// writes the fields of its coded entries (bitpack.cuh's kernel packs them afterwards). Every read
// stays inside the stream and every write inside the output, whatever the bytes; the first
// malformed (bucket, kind) is kept in one error word.
#pragma once

#include <cstdint>

#include "qpr/elias.h"
#include "qpr/qsgd.h"

namespace qpr {
namespace cuda {
namespace elias_kernels {

// Kinds of malformed buckets, in the CPU decoder's words.
enum Malformed : uint64_t {
  kOk = 0,
  kBadScale = 1,
  kFirstOffset = 2,
  kOffsetBackwards = 3,
  kOffsetPastEnd = 4,
  kPadding = 5,
  kGapCode = 6,
  kLevelCode = 7,
  kPastBucketEnd = 8,
  kLevelTooLarge = 9,
  kGapPastEnd = 10,
  kNumKinds = 16
};

inline const char* malformed_text(uint64_t kind) {
  switch (kind) {
    case kBadScale:
      return "its scale is not a finite non-negative number";
    case kFirstOffset:
      return "the first bucket offset is not 0";
    case kOffsetBackwards:
      return "its offset goes backwards";
    case kOffsetPastEnd:
      return "its offset is past the end of the code";
    case kPadding:
      return "padding bits after the code are not zero";
    case kGapCode:
      return "malformed gap code";
    case kLevelCode:
      return "malformed level code";
    case kPastBucketEnd:
      return "entry runs past the end of the bucket";
    case kLevelTooLarge:
      return "level above the largest level";
    case kGapPastEnd:
      return "gap runs past the end of the bucket";
    default:
      return "malformed";
  }
}

// Records a malformed bucket; the smallest (bucket, kind) wins.
__device__ inline void report(unsigned long long* error, int64_t bucket, uint64_t kind) {
  atomicMin(error, static_cast<unsigned long long>(bucket) * kNumKinds + kind);
}

// A thread's reader of an LSB-first bit stream: a 64-bit window refilled a byte at a time, so
// each byte is loaded once however the reads fall (the threads of a warp read different buckets,
// so their loads do not coalesce, and fewer of them is what counts). Bytes past the end read as
// zero.
struct BitStream {
  const uint8_t* bytes;
  uint64_t nbytes;
  uint64_t pos;     // the stream's bit at window bit 0
  uint64_t window;  // bits from pos on; `valid` of them loaded, zeros above
  int valid;

  __device__ BitStream(const uint8_t* bytes_in, uint64_t nbytes_in, uint64_t bit)
      : bytes(bytes_in), nbytes(nbytes_in), pos(bit), window(0), valid(-static_cast<int>(bit & 7)) {
    refill();  // the first byte's bits below `bit` are shifted out as it is loaded
  }

  // At least 57 bits from pos on.
  __device__ uint64_t peek() {
    if (valid < 57) refill();
    return window;
  }

  __device__ void skip(int n) {  // n <= 57, after a peek
    window >>= n;
    valid -= n;
    pos += n;
  }

 private:
  __device__ void refill() {  // loads whole bytes while a byte fits: valid ends in 57..64
    uint64_t next = (pos + valid) >> 3;  // the first byte not yet loaded
    while (valid <= 56) {
      const uint64_t byte = next < nbytes ? bytes[next] : 0;
      window |= valid >= 0 ? byte << valid : byte >> -valid;
      valid += 8;
      ++next;
    }
  }
};

// ---- encode -------------------------------------------------------------------------------------

// Calls entry(gap, level) for each nonzero level of a bucket, in order (the previous index starts
// at -1), and invalid() for each field no level encodes: the walk both encode passes share.
template <int B, typename Entry, typename Invalid>
__device__ void for_each_entry(const uint8_t* packed, int64_t packed_bytes, int64_t start,
                               int64_t n, Entry&& entry, Invalid&& invalid) {
  constexpr int S = QsgdLevels<B>::kS;
  BitStream in(packed, static_cast<uint64_t>(packed_bytes), static_cast<uint64_t>(start) * B);
  int64_t prev = -1;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t f = static_cast<uint32_t>(in.peek()) & ((1u << B) - 1u);
    in.skip(B);
    if (f == static_cast<uint32_t>(QsgdLevels<B>::kInvalidField)) invalid();
    const int level = static_cast<int>(f) - S;
    if (level == 0) continue;
    entry(static_cast<uint32_t>(i - prev), level);
    prev = i;
  }
}

template <int B>
__global__ void code_lengths_kernel(const uint8_t* __restrict__ packed, int64_t packed_bytes,
                                    int64_t numel, int64_t bucket_size, int64_t nbuckets,
                                    const float* __restrict__ scales, int64_t* __restrict__ lengths,
                                    int* __restrict__ flags) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= nbuckets) return;
  const float scale = scales[b];
  if (!(scale >= 0.0f && scale <= 3.402823466e38f)) atomicOr(flags, 2);
  const int64_t start = b * bucket_size;
  int64_t bits = 0;
  for_each_entry<B>(
      packed, packed_bytes, start, min(bucket_size, numel - start),
      [&](uint32_t gap, int level) {
        const uint32_t magnitude = static_cast<uint32_t>(level < 0 ? -level : level);
        bits += 2 * elias::floor_log2(gap) + 2 * elias::floor_log2(magnitude) + 3;
      },
      [&] { atomicOr(flags, 1); });
  lengths[b] = bits;
}

// Appends LSB-first bits into 32-bit words of the code section with atomicOr (the section is
// zero, and only this bucket's bits are set in what it ORs).
struct WordWriter {
  uint32_t* words;
  uint64_t word;  // where acc's bit 0 goes
  uint64_t acc;
  int fill;

  __device__ void put(uint32_t v, int n) {  // n <= 32
    if (n == 0) return;
    acc |= static_cast<uint64_t>(v) << fill;
    fill += n;
    if (fill >= 32) {
      if (static_cast<uint32_t>(acc)) atomicOr(words + word, static_cast<uint32_t>(acc));
      acc >>= 32;
      fill -= 32;
      ++word;
    }
  }
  __device__ void gamma(uint32_t v) {  // v >= 1: l zeros, a one, v's low l bits
    const int l = elias::floor_log2(v);
    put(0, l);
    put(1, 1);
    put(v ^ (1u << l), l);
  }
  __device__ void flush() {
    if (fill > 0 && static_cast<uint32_t>(acc)) atomicOr(words + word, static_cast<uint32_t>(acc));
  }
};

template <int B>
__global__ void write_codes_kernel(const uint8_t* __restrict__ packed, int64_t packed_bytes,
                                   int64_t numel, int64_t bucket_size, int64_t nbuckets,
                                   const int64_t* __restrict__ offsets, uint32_t* __restrict__ code,
                                   uint8_t* __restrict__ offset_table) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= nbuckets) return;
  const uint64_t at = static_cast<uint64_t>(offsets[b]);
  for (int k = 0; k < 4; ++k) offset_table[4 * b + k] = static_cast<uint8_t>(at >> (8 * k));
  WordWriter w{code, at / 32, 0, static_cast<int>(at % 32)};
  const int64_t start = b * bucket_size;
  for_each_entry<B>(
      packed, packed_bytes, start, min(bucket_size, numel - start),
      [&](uint32_t gap, int level) {
        const uint32_t magnitude = static_cast<uint32_t>(level < 0 ? -level : level);
        const int lg = elias::floor_log2(gap);
        const int ll = elias::floor_log2(magnitude);
        const int length = 2 * lg + 2 * ll + 3;
        if (length <= 32) {  // the usual entry (gaps below 2^13 at 8 bits): one append
          w.put(static_cast<uint32_t>(elias::gamma_code(gap, lg) |
                                      static_cast<uint64_t>(level < 0) << (2 * lg + 1) |
                                      elias::gamma_code(magnitude, ll) << (2 * lg + 2)),
                length);
          return;
        }
        w.gamma(gap);
        w.put(level < 0 ? 1u : 0u, 1);
        w.gamma(magnitude);
      },
      [] {});  // code_lengths_kernel has reported invalid fields before this runs
  w.flush();
}

// ---- decode -------------------------------------------------------------------------------------

// The field of level 0 at `bits` bits, which the host fills the decoder's output with.
inline uint8_t level_zero_field(int bits) { return static_cast<uint8_t>((1 << (bits - 1)) - 1); }

__device__ inline uint32_t read_u32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
         static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
}

__device__ inline float get_scale(const uint8_t* p) { return __uint_as_float(read_u32(p)); }

__device__ inline int trailing_zeros(uint64_t w) {
  return w == 0 ? 64 : __ffsll(static_cast<long long>(w)) - 1;
}

// A gamma code at the reader's position that must end by `end`, with floor(log2 v) <= max_log2
// (at most 30).
__device__ inline bool read_gamma(BitStream& r, uint64_t end, int max_log2, uint32_t& v) {
  const uint64_t w = r.peek();
  const int l = trailing_zeros(w);
  if (l > max_log2 || r.pos + 2 * static_cast<uint64_t>(l) + 1 > end) return false;
  const uint64_t mask = (uint64_t{1} << l) - 1;
  if (l <= 28) {
    v = static_cast<uint32_t>((uint64_t{1} << l) | ((w >> (l + 1)) & mask));
    r.skip(2 * l + 1);
  } else {
    r.skip(l + 1);
    v = static_cast<uint32_t>((uint64_t{1} << l) | (r.peek() & mask));
    r.skip(l);
  }
  return true;
}

template <int B>
__global__ void decode_kernel(const uint8_t* __restrict__ stream, int64_t scales_at,
                              int64_t offsets_at, int64_t code_at, int64_t code_bytes,
                              uint64_t code_bits, int64_t numel, int64_t bucket_size,
                              int64_t nbuckets, uint8_t* __restrict__ fields,
                              unsigned long long* __restrict__ error) {
  constexpr int S = QsgdLevels<B>::kS;
  constexpr int kMaxLog2Level = QsgdLevels<B>::kLog2S;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // thread 0 checks the padding, also when there is no bucket (the host launches one thread)
  if (b == 0 && code_bits % 8 != 0 && (stream[code_at + code_bytes - 1] >> (code_bits % 8)) != 0) {
    report(error, nbuckets > 0 ? nbuckets - 1 : 0, kPadding);
  }
  if (b >= nbuckets) return;
  const float scale = get_scale(stream + scales_at + 4 * b);
  if (!(scale >= 0.0f && scale <= 3.402823466e38f)) report(error, b, kBadScale);
  const uint64_t p0 = read_u32(stream + offsets_at + 4 * b);
  const uint64_t end = b + 1 < nbuckets ? read_u32(stream + offsets_at + 4 * (b + 1)) : code_bits;
  if (b == 0 && p0 != 0) report(error, b, kFirstOffset);
  if (end < p0) report(error, b + 1, kOffsetBackwards);
  if (p0 > code_bits) report(error, b, kOffsetPastEnd);
  const int64_t start = b * bucket_size;
  const int64_t n = min(bucket_size, numel - start);  // the host filled fields with level 0
  const int max_log2_gap = elias::floor_log2(static_cast<uint32_t>(n));
  const uint64_t stop = min(end, code_bits);
  BitStream r(stream + code_at, code_bytes, p0);
  int64_t index = -1;
  while (r.pos < stop) {
    uint32_t gap, magnitude, negative;
    const uint64_t w = r.peek();
    const int lg = trailing_zeros(w);
    if (lg <= 21 && lg <= max_log2_gap) {
      // The whole entry is in w: a gap code of at most 43 bits leaves at least 13, enough for
      // the sign and any level code. The checks are read_gamma's, in the same order.
      if (r.pos + 2 * lg + 1 > stop) return report(error, b, kGapCode);
      gap = static_cast<uint32_t>((uint64_t{1} << lg) | ((w >> (lg + 1)) & ((1u << lg) - 1)));
      if (r.pos + 2 * lg + 1 >= stop) return report(error, b, kPastBucketEnd);
      negative = static_cast<uint32_t>(w >> (2 * lg + 1)) & 1u;
      const uint64_t rest = w >> (2 * lg + 2);
      const int ll = trailing_zeros(rest);
      if (ll > kMaxLog2Level || r.pos + 2 * lg + 2 + 2 * ll + 1 > stop) {
        return report(error, b, kLevelCode);
      }
      magnitude = (1u << ll) | (static_cast<uint32_t>(rest >> (ll + 1)) & ((1u << ll) - 1));
      r.skip(2 * lg + 2 * ll + 3);
    } else {
      if (!read_gamma(r, stop, max_log2_gap, gap)) return report(error, b, kGapCode);
      if (r.pos >= stop) return report(error, b, kPastBucketEnd);
      negative = static_cast<uint32_t>(r.peek() & 1u);
      r.skip(1);
      if (!read_gamma(r, stop, kMaxLog2Level, magnitude)) return report(error, b, kLevelCode);
    }
    if (magnitude > static_cast<uint32_t>(S)) return report(error, b, kLevelTooLarge);
    index += gap;
    if (index >= n) return report(error, b, kGapPastEnd);
    fields[start + index] = static_cast<uint8_t>(
        S + (negative ? -static_cast<int>(magnitude) : static_cast<int>(magnitude)));
  }
}

}  // namespace elias_kernels
}  // namespace cuda
}  // namespace qpr
