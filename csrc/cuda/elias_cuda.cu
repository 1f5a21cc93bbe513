// CUDA implementations of elias_encode and elias_decode, writing and reading the same stream as
// the CPU coder (csrc/include/qpr/elias.h), so a stream encoded on one device decodes on the other.
//
// Encode: a length pass (one thread a bucket counts its code bits), an exclusive scan of the
// lengths (at::cumsum, CUB underneath), then a write pass (one thread a bucket ORs its codes into
// 32-bit words of a zeroed section at its offset; a bucket's first and last words are shared with
// its neighbours, hence the atomics). The stream's length depends on the data, so the host reads
// the total once; it reads the error flags (an invalid field, a scale that is NaN, Inf or negative)
// in the same copy and raises there.
// Decode: the host reads the header (the output's size depends on it); one thread a bucket checks
// the tables and decodes its codes into one byte a value, and the fields are packed in a second
// pass. Every read stays inside the stream and every write inside the output, whatever the bytes;
// the first malformed bucket is reported by one more read of a flag word, as a ValueError.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/bitpack.cuh"
#include "qpr/checks.h"
#include "qpr/dispatch.h"
#include "qpr/elias.h"
#include "qpr/elias_header.h"
#include "qpr/qsgd.h"

namespace qpr {
namespace cuda {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t work) { return std::max<int64_t>(1, (work + kThreads - 1) / kThreads); }

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

const char* malformed_text(uint64_t kind) {
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
__device__ void report(unsigned long long* error, int64_t bucket, uint64_t kind) {
  atomicMin(error, static_cast<unsigned long long>(bucket) * kNumKinds + kind);
}

__device__ uint32_t read_field(const uint8_t* packed, int64_t packed_bytes, int64_t e, int B) {
  const int64_t bit = e * B;
  const int64_t byte = bit / 8;
  uint32_t v = packed[byte];
  if (byte + 1 < packed_bytes) v |= static_cast<uint32_t>(packed[byte + 1]) << 8;
  return (v >> (bit % 8)) & ((1u << B) - 1u);
}

// ---- encode -------------------------------------------------------------------------------------

// Calls entry(gap, level) for each nonzero level of a bucket, in order (the previous index starts
// at -1), and invalid() for each field no level encodes: the walk both encode passes share.
template <int B, typename Entry, typename Invalid>
__device__ void for_each_entry(const uint8_t* packed, int64_t packed_bytes, int64_t start,
                               int64_t n, Entry&& entry, Invalid&& invalid) {
  constexpr int S = QsgdLevels<B>::kS;
  int64_t prev = -1;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t f = read_field(packed, packed_bytes, start + i, B);
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
        w.gamma(gap);
        w.put(level < 0 ? 1u : 0u, 1);
        w.gamma(static_cast<uint32_t>(level < 0 ? -level : level));
      },
      [] {});  // code_lengths_kernel has reported invalid fields before this runs
  w.flush();
}

template <typename T>
void put_le(uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}

at::Tensor elias_encode_cuda(const at::Tensor& packed_in, const at::Tensor& scales_in,
                             at::IntArrayRef shape, int64_t bits, int64_t bucket_size, int64_t norm,
                             at::ScalarType dtype) {
  constexpr const char* op = "elias_encode";
  TORCH_CHECK_VALUE(packed_in.is_cuda() && scales_in.is_cuda(), op,
                    ": packed and scales must both be on a CUDA device, got ", packed_in.device(),
                    " and ", scales_in.device());
  TORCH_CHECK_VALUE(packed_in.device() == scales_in.device(), op, ": scales is on ",
                    scales_in.device(), " but packed is on ", packed_in.device());
  check_norm(norm, op);
  const int dtype_code = elem_code(dtype, op);
  TORCH_CHECK_VALUE(static_cast<int64_t>(shape.size()) <= elias::kMaxDims, op, ": at most ",
                    elias::kMaxDims, " dimensions, got ", shape.size());
  const int64_t numel = shape_numel(shape, op);
  check_quantized(packed_in, scales_in, numel, bits, bucket_size, op);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  const int64_t nbuckets = scales.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = packed.options();

  at::Tensor lengths = at::zeros({std::max<int64_t>(nbuckets, 1)}, opts.dtype(at::kLong));
  at::Tensor flags = at::zeros({1}, opts.dtype(at::kInt));
  if (nbuckets > 0) {
    dispatch_int<2, 8>(static_cast<int>(bits), [&](auto b) {
      code_lengths_kernel<b()><<<blocks_for(nbuckets), kThreads, 0, stream>>>(
          packed.data_ptr<uint8_t>(), packed.numel(), numel, bucket_size, nbuckets,
          scales.data_ptr<float>(), lengths.data_ptr<int64_t>(), flags.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const at::Tensor ends = at::cumsum(lengths, 0);
  const at::Tensor offsets = ends - lengths;  // exclusive scan
  // The one synchronization: the stream's length and the error flags.
  const at::Tensor summary = at::stack({ends.index({-1}), flags.index({0}).to(at::kLong)}).cpu();
  const uint64_t total = static_cast<uint64_t>(summary.data_ptr<int64_t>()[0]);
  const int64_t flag_bits = summary.data_ptr<int64_t>()[1];
  TORCH_CHECK_VALUE(!(flag_bits & 1), op, ": packed holds a field equal to ", (1 << bits) - 1,
                    ", which no ", bits, "-bit level encodes");
  TORCH_CHECK_VALUE(!(flag_bits & 2), op,
                    ": a scale is not a finite non-negative number (a bucket held NaN or Inf "
                    "when it was quantized on the GPU)");
  TORCH_CHECK_VALUE(total <= elias::kMaxCodeBits, op, ": the code is ", total,
                    " bits, more than a stream's 2**32-1; encode the tensor in parts");

  const int64_t ndim = static_cast<int64_t>(shape.size());
  const int64_t scales_at = elias::kHeaderBytes + 8 * ndim;
  const int64_t offsets_at = scales_at + 4 * nbuckets;
  const int64_t code_at = offsets_at + 4 * nbuckets;  // a multiple of 8: word-aligned
  const int64_t length = code_at + static_cast<int64_t>((total + 7) / 8);
  // 4 bytes of slack for the last word's atomicOr; the result is a view without them
  at::Tensor out = at::zeros({length + 4}, opts);
  std::vector<uint8_t> head(static_cast<size_t>(scales_at), 0);
  std::memcpy(head.data(), elias::kMagic, 4);
  head[4] = elias::kVersion;
  head[5] = static_cast<uint8_t>(bits);
  head[6] = static_cast<uint8_t>(norm);
  head[7] = static_cast<uint8_t>(dtype_code);
  head[8] = static_cast<uint8_t>(ndim);
  put_le<uint32_t>(head.data() + 12, static_cast<uint32_t>(bucket_size));
  put_le<uint64_t>(head.data() + 16, static_cast<uint64_t>(numel));
  put_le<uint64_t>(head.data() + 24, total);
  for (int64_t i = 0; i < ndim; ++i) put_le<int64_t>(head.data() + 32 + 8 * i, shape[i]);
  out.narrow(0, 0, scales_at)
      .copy_(at::from_blob(head.data(), {scales_at}, at::TensorOptions().dtype(at::kByte)));
  if (nbuckets > 0) {
    out.narrow(0, scales_at, 4 * nbuckets).copy_(scales.view(at::kByte));
    dispatch_int<2, 8>(static_cast<int>(bits), [&](auto b) {
      write_codes_kernel<b()><<<blocks_for(nbuckets), kThreads, 0, stream>>>(
          packed.data_ptr<uint8_t>(), packed.numel(), numel, bucket_size, nbuckets,
          offsets.data_ptr<int64_t>(),
          reinterpret_cast<uint32_t*>(out.data_ptr<uint8_t>() + code_at),
          out.data_ptr<uint8_t>() + offsets_at);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out.narrow(0, 0, length);
}

// ---- decode -------------------------------------------------------------------------------------

// The header, read to the host (the output's sizes depend on it) and checked as the CPU does.
elias::StreamHeader read_header(const at::Tensor& stream) {
  const int64_t length = stream.numel();
  const at::Tensor head = stream.narrow(0, 0, std::min(length, elias::kMaxHeadBytes)).cpu();
  return elias::parse_header(head.data_ptr<uint8_t>(), static_cast<uint64_t>(length));
}

__device__ uint32_t read_u32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
         static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
}

__device__ float get_scale(const uint8_t* p) { return __uint_as_float(read_u32(p)); }

// Up to 32 bits of the code from bit p, LSB-first; bytes past the code read as zero.
__device__ uint64_t peek(const uint8_t* code, uint64_t code_bytes, uint64_t p) {
  uint64_t w = 0;
  const uint64_t byte = p >> 3;
  for (int k = 0; k < 5 && byte + k < code_bytes; ++k) {
    w |= static_cast<uint64_t>(code[byte + k]) << (8 * k);
  }
  return (w >> (p & 7)) & 0xFFFFFFFFull;
}

// A gamma code at p that must end by `end`, with floor(log2 v) <= max_log2.
__device__ bool read_gamma(const uint8_t* code, uint64_t code_bytes, uint64_t& p, uint64_t end,
                           int max_log2, uint32_t& v) {
  int l = 0;
  while (p + l < end && l <= max_log2 && !(peek(code, code_bytes, p + l) & 1u)) ++l;
  if (l > max_log2 || p + 2 * static_cast<uint64_t>(l) + 1 > end) return false;
  const uint64_t low = l == 0 ? 0 : peek(code, code_bytes, p + l + 1) & ((uint64_t{1} << l) - 1);
  v = static_cast<uint32_t>((uint64_t{1} << l) | low);
  p += 2 * static_cast<uint64_t>(l) + 1;
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
  if (b >= nbuckets) return;
  const float scale = get_scale(stream + scales_at + 4 * b);
  if (!(scale >= 0.0f && scale <= 3.402823466e38f)) report(error, b, kBadScale);
  const uint64_t p0 = read_u32(stream + offsets_at + 4 * b);
  const uint64_t end = b + 1 < nbuckets ? read_u32(stream + offsets_at + 4 * (b + 1)) : code_bits;
  if (b == 0 && p0 != 0) report(error, b, kFirstOffset);
  if (end < p0) report(error, b + 1, kOffsetBackwards);
  if (p0 > code_bits) report(error, b, kOffsetPastEnd);
  if (b == nbuckets - 1 && code_bits % 8 != 0 &&
      (stream[code_at + code_bytes - 1] >> (code_bits % 8)) != 0) {
    report(error, b, kPadding);
  }
  const int64_t start = b * bucket_size;
  const int64_t n = min(bucket_size, numel - start);
  for (int64_t i = 0; i < n; ++i) fields[start + i] = static_cast<uint8_t>(S);
  const uint8_t* code = stream + code_at;
  const int max_log2_gap = elias::floor_log2(static_cast<uint32_t>(n));
  const uint64_t stop = min(end, code_bits);
  uint64_t p = p0;
  int64_t index = -1;
  while (p < stop) {
    uint32_t gap, magnitude;
    if (!read_gamma(code, code_bytes, p, stop, max_log2_gap, gap)) {
      return report(error, b, kGapCode);
    }
    if (p >= stop) return report(error, b, kPastBucketEnd);
    const uint32_t negative = static_cast<uint32_t>(peek(code, code_bytes, p) & 1u);
    p += 1;
    if (!read_gamma(code, code_bytes, p, stop, kMaxLog2Level, magnitude)) {
      return report(error, b, kLevelCode);
    }
    if (magnitude > static_cast<uint32_t>(S)) return report(error, b, kLevelTooLarge);
    index += gap;
    if (index >= n) return report(error, b, kGapPastEnd);
    fields[start + index] = static_cast<uint8_t>(
        S + (negative ? -static_cast<int>(magnitude) : static_cast<int>(magnitude)));
  }
}

// Checks the tables and decodes every bucket into packed and scales; raises on a malformed
// stream (one read of the error word); returns the meta tensor, on the stream's device.
at::Tensor decode_into(const at::Tensor& stream, const elias::StreamHeader& h, at::Tensor& packed,
                       at::Tensor& scales) {
  const cudaStream_t cuda_stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = stream.options();
  at::Tensor fields = at::empty({std::max<int64_t>(h.numel, 1)}, opts);
  at::Tensor error = at::full({1}, -1, opts.dtype(at::kLong));  // all ones: no error yet
  if (h.nbuckets > 0) {
    dispatch_int<2, 8>(h.bits, [&](auto b) {
      decode_kernel<b()><<<blocks_for(h.nbuckets), kThreads, 0, cuda_stream>>>(
          stream.data_ptr<uint8_t>(), h.scales_at, h.offsets_at, h.code_at, h.code_bytes,
          h.code_bits, h.numel, h.bucket_size, h.nbuckets, fields.data_ptr<uint8_t>(),
          reinterpret_cast<unsigned long long*>(error.data_ptr<int64_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const uint64_t first = static_cast<uint64_t>(error.cpu().data_ptr<int64_t>()[0]);
  TORCH_CHECK_VALUE(first == ~uint64_t{0}, "elias_decode: malformed stream: bucket ",
                    first / kNumKinds, ": ", malformed_text(first % kNumKinds));
  if (h.numel > 0) {
    bitpack::pack_kernel<uint8_t><<<blocks_for(packed.numel()), kThreads, 0, cuda_stream>>>(
        fields.data_ptr<uint8_t>(), h.numel, h.bits, packed.data_ptr<uint8_t>(), packed.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scales.view(at::kByte).copy_(stream.narrow(0, h.scales_at, 4 * h.nbuckets));
  }
  std::vector<int64_t> meta = {h.bits, h.bucket_size, h.norm, h.dtype_code,
                               static_cast<int64_t>(h.shape.size())};
  meta.insert(meta.end(), h.shape.begin(), h.shape.end());
  return at::tensor(meta, at::TensorOptions().dtype(at::kLong)).to(stream.device());
}

at::Tensor checked_stream(const at::Tensor& stream_in) {
  constexpr const char* op = "elias_decode";
  TORCH_CHECK_VALUE(stream_in.is_cuda(), op, ": stream must be on a CUDA device, got ",
                    stream_in.device());
  check_dtype(stream_in, at::kByte, op, "stream");
  TORCH_CHECK_VALUE(stream_in.dim() == 1, op, ": stream must be 1-D, got shape ",
                    stream_in.sizes());
  return stream_in.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> elias_decode_cuda(const at::Tensor& stream_in) {
  const c10::cuda::CUDAGuard guard(stream_in.device());
  const at::Tensor stream = checked_stream(stream_in);
  const elias::StreamHeader h = read_header(stream);
  at::Tensor packed = at::empty({packed_bytes(h.numel, h.bits)}, stream.options());
  at::Tensor scales = at::empty({h.nbuckets}, stream.options().dtype(at::kFloat));
  at::Tensor meta = decode_into(stream, h, packed, scales);
  return {packed, scales, meta};
}

at::Tensor elias_decode_out_cuda(const at::Tensor& stream_in, at::Tensor& packed,
                                 at::Tensor& scales) {
  constexpr const char* op = "elias_decode";
  const c10::cuda::CUDAGuard guard(stream_in.device());
  const at::Tensor stream = checked_stream(stream_in);
  TORCH_CHECK_VALUE(packed.device() == stream.device() && scales.device() == stream.device(), op,
                    ": packed and scales must be on the stream's device ", stream.device());
  const elias::StreamHeader h = read_header(stream);
  check_quantized(packed, scales, h.numel, h.bits, h.bucket_size, op);
  TORCH_CHECK_VALUE(packed.is_contiguous() && scales.is_contiguous(), op,
                    ": the output tensors must be contiguous");
  return decode_into(stream, h, packed, scales);
}

}  // namespace
}  // namespace cuda
}  // namespace qpr

TORCH_LIBRARY_IMPL(hvd_qpr, CUDA, m) {
  m.impl("elias_encode", &qpr::cuda::elias_encode_cuda);
  m.impl("elias_decode", &qpr::cuda::elias_decode_cuda);
  m.impl("elias_decode_out", &qpr::cuda::elias_decode_out_cuda);
}
