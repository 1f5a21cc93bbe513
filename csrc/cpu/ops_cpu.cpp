// CPU implementations of the hvd_qpr ops: argument checks, the split of work across threads
// (at::parallel_for, so torch.set_num_threads applies), and the choice of instruction set.
#include "cpu/ops_cpu.h"

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#include "cpu/kernel_table.h"
#include "qpr/checks.h"
#include "qpr/elias.h"
#include "qpr/elias_header.h"
#include "qpr/rng.h"

namespace qpr {
namespace cpu {
namespace {

std::atomic<const KernelTable*> g_forced{nullptr};

bool supports(const KernelTable& t) {
  __builtin_cpu_init();
  if (&t == &kAvx512Kernels) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("bmi2");
  }
  if (&t == &kAvx2Kernels) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("bmi2");
  }
  return true;
}

const KernelTable* const kAllTables[] = {&kAvx512Kernels, &kAvx2Kernels, &kBaseKernels};

const KernelTable& kernels() {
  if (const KernelTable* forced = g_forced.load(std::memory_order_relaxed)) return *forced;
  static const KernelTable* best = [] {
    for (const KernelTable* t : kAllTables) {
      if (supports(*t)) return t;
    }
    return &kBaseKernels;
  }();
  return *best;
}

// Buckets per work unit so that every unit starts on a multiple of 8 elements (whole bytes of
// packed fields), and units per thread chunk so that a chunk has at least ~32K elements.
int64_t group_buckets(int64_t bucket_size) { return 8 / std::gcd(bucket_size, int64_t{8}); }

template <typename F>
void parallel_over_buckets(int64_t nbuckets, int64_t bucket_size, F&& body) {
  const int64_t g = group_buckets(bucket_size);
  const int64_t groups = (nbuckets + g - 1) / g;
  const int64_t grain = std::max<int64_t>(1, 32768 / (g * bucket_size));
  at::parallel_for(0, groups, grain,
                   [&](int64_t g0, int64_t g1) { body(g0 * g, std::min(g1 * g, nbuckets)); });
}

template <typename F>
void parallel_over_elements(int64_t numel, F&& body) {
  const int64_t units = (numel + 7) / 8;
  at::parallel_for(0, units, 4096,
                   [&](int64_t u0, int64_t u1) { body(u0 * 8, std::min(u1 * 8, numel)); });
}

constexpr int64_t kMinElementsPerChunk = 32768;

// Byte buffers for the Elias coder's chunks, taken from and returned to a process-wide pool so
// that repeated calls reuse warm memory instead of faulting in fresh pages every time.
class ScratchBuffers {
 public:
  explicit ScratchBuffers(size_t n) {
    std::lock_guard<std::mutex> lock(mutex());
    while (buffers_.size() < n && !pool().empty()) {
      buffers_.push_back(std::move(pool().back()));
      pool().pop_back();
    }
    buffers_.resize(n);
  }
  ~ScratchBuffers() {
    std::lock_guard<std::mutex> lock(mutex());
    for (auto& b : buffers_) pool().push_back(std::move(b));
  }
  std::vector<uint8_t>& operator[](size_t i) { return buffers_[i]; }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::vector<std::vector<uint8_t>>& pool() {
    static std::vector<std::vector<uint8_t>> p;
    return p;
  }
  std::vector<std::vector<uint8_t>> buffers_;
};

// ORs nbits bits of src (from its bit 0) into dst at bit `at`; dst's bits from `at` on are zero.
void append_bits(uint8_t* dst, uint64_t at, const uint8_t* src, uint64_t nbits) {
  const uint64_t bytes = (nbits + 7) / 8;
  uint8_t* d = dst + at / 8;
  const int shift = static_cast<int>(at % 8);
  if (shift == 0) {
    std::memcpy(d, src, bytes);
    return;
  }
  for (uint64_t i = 0; i < bytes; ++i) {
    d[i] |= static_cast<uint8_t>(src[i] << shift);
    const uint8_t high = static_cast<uint8_t>(src[i] >> (8 - shift));
    if (high) d[i + 1] = high;  // only bits of this code reach that byte
  }
}

void check_scales(const at::Tensor& scales, const char* op) {
  const float* s = scales.data_ptr<float>();
  for (int64_t b = 0; b < scales.numel(); ++b) {
    TORCH_CHECK_VALUE(std::isfinite(s[b]) && s[b] >= 0.0f, op, ": scales[", b, "] = ", s[b],
                      " is not a finite non-negative number");
  }
}

[[noreturn]] void raise_nonfinite(const at::Tensor& x, const char* op) {
  const at::Tensor flat = x.reshape({-1});
  const int64_t index = (~at::isfinite(flat)).nonzero().index({0, 0}).item<int64_t>();
  const double v = flat.index({index}).item<double>();
  TORCH_CHECK_VALUE(false, op, ": x contains ", std::isnan(v) ? "NaN" : (v > 0 ? "+Inf" : "-Inf"),
                    " (first at flat index ", index, ")");
  __builtin_unreachable();
}

// Runs the quantize kernel; norm is an Elias norm code or kNormGiven (scales are then read).
void run_quantize(const at::Tensor& x_in, int64_t bits, int64_t bucket_size, int64_t norm,
                  int64_t seed, at::Tensor& packed, at::Tensor& scales, const char* op) {
  check_cpu(x_in, op, "x");
  check_float_input(x_in, op, "x");
  const int64_t numel = x_in.numel();
  check_cpu(packed, op, "packed");
  check_cpu(scales, op, "scales");
  check_quantized_outputs(packed, scales, numel, bits, bucket_size, op);
  const at::Tensor x = x_in.contiguous();
  const QuantizeJob job{x.data_ptr(),
                        elem_code(x.scalar_type(), op),
                        numel,
                        bucket_size,
                        static_cast<int>(bits),
                        static_cast<int>(norm),
                        make_rng_key(static_cast<uint64_t>(seed)),
                        packed.data_ptr<uint8_t>(),
                        scales.data_ptr<float>()};
  const KernelTable& k = kernels();
  std::atomic<int> flags{0};
  parallel_over_buckets(scales.numel(), bucket_size, [&](int64_t b0, int64_t b1) {
    flags.fetch_or(k.quantize(job, b0, b1), std::memory_order_relaxed);
  });
  if (flags & kFlagNonFinite) raise_nonfinite(x, op);
  TORCH_CHECK_VALUE(!(flags & kFlagScaleOverflow), op,
                    ": the l2 norm of a bucket overflows float32; use norm='max'");
  if (flags & kFlagScaleTooSmall) {
    const at::Tensor pad = at::zeros({scales.numel() * bucket_size - numel}, x.options());
    const at::Tensor peak =
        std::get<0>(at::cat({x.reshape({-1}), pad}).view({-1, bucket_size}).abs().max(1));
    const int64_t b = (peak.to(at::kFloat) > scales).nonzero().index({0, 0}).item<int64_t>();
    TORCH_CHECK_VALUE(false, op, ": bucket ", b, " holds a value of magnitude ",
                      peak.index({b}).item<double>(), " above its given scale ",
                      scales.index({b}).item<double>(),
                      "; a shared scale must be at least every worker's own bucket maximum");
  }
}

void quantize_out_cpu(const at::Tensor& x, int64_t bits, int64_t bucket_size, int64_t norm,
                      int64_t seed, at::Tensor& packed, at::Tensor& scales) {
  check_norm(norm, "quantize");
  run_quantize(x, bits, bucket_size, norm, seed, packed, scales, "quantize");
}

void quantize_scaled_out_cpu(const at::Tensor& x, const at::Tensor& scales_in, int64_t bits,
                             int64_t bucket_size, int64_t seed, at::Tensor& packed) {
  constexpr const char* op = "quantize";
  check_cpu(scales_in, op, "scales");
  check_dtype(scales_in, at::kFloat, op, "scales");
  TORCH_CHECK_VALUE(
      at::isfinite(scales_in).all().item<bool>() && !(scales_in < 0).any().item<bool>(), op,
      ": given scales must be finite and non-negative");
  at::Tensor scales = scales_in.contiguous();
  run_quantize(x, bits, bucket_size, kNormGiven, seed, packed, scales, op);
}

std::tuple<at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x, int64_t bits,
                                                int64_t bucket_size, int64_t norm, int64_t seed) {
  auto [packed, scales] = empty_quantized(x, bits, bucket_size, "quantize");
  quantize_out_cpu(x, bits, bucket_size, norm, seed, packed, scales);
  return {packed, scales};
}

void dequantize_out_cpu(const at::Tensor& packed_in, const at::Tensor& scales_in,
                        int64_t bucket_size, int64_t bits, at::Tensor& out) {
  constexpr const char* op = "dequantize";
  check_cpu(packed_in, op, "packed");
  check_cpu(scales_in, op, "scales");
  check_cpu(out, op, "out");
  check_float_input(out, op, "out");
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous");
  const int64_t numel = out.numel();
  check_quantized(packed_in, scales_in, numel, bits, bucket_size, op);
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  check_scales(scales, op);
  const DequantizeJob job{
      packed.data_ptr<uint8_t>(), scales.data_ptr<float>(),         numel,         bucket_size,
      static_cast<int>(bits),     elem_code(out.scalar_type(), op), out.data_ptr()};
  const KernelTable& k = kernels();
  std::atomic<int> flags{0};
  parallel_over_buckets(scales.numel(), bucket_size, [&](int64_t b0, int64_t b1) {
    flags.fetch_or(k.dequantize(job, b0, b1), std::memory_order_relaxed);
  });
  TORCH_CHECK_VALUE(!(flags & kFlagInvalidField), op, ": packed holds a field equal to ",
                    (1 << bits) - 1, ", which no ", bits, "-bit level encodes");
  TORCH_CHECK_VALUE(!(flags & kFlagOutputOverflow), op, ": a dequantized value overflows ",
                    dtype_name(out.scalar_type()), " (largest scale ", scales.max().item<float>(),
                    "); dequantize to torch.float32 instead");
}

at::Tensor dequantize_cpu(const at::Tensor& packed, const at::Tensor& scales, at::IntArrayRef shape,
                          int64_t bits, int64_t bucket_size, at::ScalarType dtype) {
  elem_code(dtype, "dequantize");  // names a wrong dtype as the argument the caller gave
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  dequantize_out_cpu(packed, scales, bucket_size, bits, out);
  return out;
}

int int_type_code(at::ScalarType dt, const char* op, const char* name) {
  switch (dt) {
    case at::kByte:
      return kU8;
    case at::kShort:
      return kI16;
    case at::kInt:
      return kI32;
    case at::kLong:
      return kI64;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be uint8, int16, int32 or int64, got ",
                       dtype_name(dt));
  }
}

at::Tensor pack_bits_cpu(const at::Tensor& values_in, int64_t field_bits) {
  constexpr const char* op = "pack_bits";
  check_cpu(values_in, op, "values");
  check_field_bits(field_bits, op);
  const int type = int_type_code(values_in.scalar_type(), op, "values");
  const at::Tensor values = values_in.contiguous();
  const int64_t numel = values.numel();
  at::Tensor out = at::empty({packed_bytes(numel, field_bits)}, values.options().dtype(at::kByte));
  const PackJob job{values.data_ptr(), type, static_cast<int>(field_bits), out.data_ptr<uint8_t>()};
  const KernelTable& k = kernels();
  std::atomic<int> flags{0};
  parallel_over_elements(numel, [&](int64_t e0, int64_t e1) {
    flags.fetch_or(k.pack(job, e0, e1), std::memory_order_relaxed);
  });
  TORCH_CHECK_VALUE(!(flags & kFlagInvalidField), op, ": values must be in [0, 2**", field_bits,
                    "), got min ", values.min().item<int64_t>(), " and max ",
                    values.max().item<int64_t>());
  return out;
}

at::Tensor unpack_bits_cpu(const at::Tensor& packed_in, int64_t field_bits, int64_t numel,
                           at::ScalarType dtype) {
  constexpr const char* op = "unpack_bits";
  check_cpu(packed_in, op, "packed");
  const int type = int_type_code(dtype, op, "dtype");
  check_unpack(packed_in, field_bits, numel, dtype, op);
  const at::Tensor packed = packed_in.contiguous();
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  const UnpackJob job{packed.data_ptr<uint8_t>(), static_cast<int>(field_bits), type,
                      out.data_ptr()};
  const KernelTable& k = kernels();
  parallel_over_elements(numel, [&](int64_t e0, int64_t e1) { k.unpack(job, e0, e1); });
  return out;
}

// ---- Elias stream ------------------------------------------------------------------------------

at::Tensor elias_encode_cpu(const at::Tensor& packed_in, const at::Tensor& scales_in,
                            at::IntArrayRef shape, int64_t bits, int64_t bucket_size, int64_t norm,
                            at::ScalarType dtype) {
  constexpr const char* op = "elias_encode";
  check_cpu(packed_in, op, "packed");
  check_cpu(scales_in, op, "scales");
  check_norm(norm, op);
  const int dtype_code = elem_code(dtype, op);
  TORCH_CHECK_VALUE(static_cast<int64_t>(shape.size()) <= elias::kMaxDims, op, ": at most ",
                    elias::kMaxDims, " dimensions, got ", shape.size());
  const int64_t numel = shape_numel(shape, op);
  check_quantized(packed_in, scales_in, numel, bits, bucket_size, op);
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  check_scales(scales, op);
  const int64_t nbuckets = scales.numel();

  const EliasJob job{packed.data_ptr<uint8_t>(), numel, bucket_size, static_cast<int>(bits)};
  const KernelTable& k = kernels();
  // Each chunk of buckets codes into a buffer of its own; the chunks are then laid end to end.
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), numel / kMinElementsPerChunk));
  ScratchBuffers code(static_cast<size_t>(chunks));
  std::vector<uint64_t> chunk_bits(static_cast<size_t>(chunks), 0);
  std::vector<uint64_t> offsets(static_cast<size_t>(nbuckets), 0);
  std::atomic<int> flags{0};
  auto first_bucket = [&](int64_t c) { return nbuckets * c / chunks; };
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      flags.fetch_or(k.elias_encode(job, first_bucket(c), first_bucket(c + 1), code[c],
                                    offsets.data(), chunk_bits[c]),
                     std::memory_order_relaxed);
    }
  });
  TORCH_CHECK_VALUE(!(flags & kFlagInvalidField), op, ": packed holds a field equal to ",
                    (1 << bits) - 1, ", which no ", bits, "-bit level encodes");
  std::vector<uint64_t> chunk_start(static_cast<size_t>(chunks) + 1, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    chunk_start[c + 1] = chunk_start[c] + chunk_bits[c];
    for (int64_t b = first_bucket(c); b < first_bucket(c + 1); ++b) offsets[b] += chunk_start[c];
  }
  const uint64_t total = chunk_start[chunks];
  TORCH_CHECK_VALUE(total <= elias::kMaxCodeBits, op, ": the code is ", total,
                    " bits, more than a stream's 2**32-1; encode the tensor in parts");

  const int64_t ndim = static_cast<int64_t>(shape.size());
  const int64_t scales_at = elias::kHeaderBytes + 8 * ndim;
  const int64_t offsets_at = scales_at + 4 * nbuckets;
  const int64_t code_at = offsets_at + 4 * nbuckets;
  const int64_t length = code_at + static_cast<int64_t>((total + 7) / 8);
  at::Tensor out = at::empty({length}, packed.options());
  uint8_t* s = out.data_ptr<uint8_t>();
  elias::write_header(s, static_cast<int>(bits), static_cast<int>(norm), dtype_code, bucket_size,
                      shape.data(), ndim, static_cast<uint64_t>(numel), total);
  std::memcpy(s + scales_at, scales.data_ptr<float>(), 4 * nbuckets);
  for (int64_t b = 0; b < nbuckets; ++b) {
    elias::store_le<uint32_t>(s + offsets_at + 4 * b, static_cast<uint32_t>(offsets[b]));
  }
  uint8_t* dst = s + code_at;
  std::memset(dst, 0, static_cast<size_t>(length - code_at));
  for (int64_t c = 0; c < chunks; ++c) {
    if (chunk_bits[c] > 0) append_bits(dst, chunk_start[c], code[c].data(), chunk_bits[c]);
  }
  return out;
}

// A stream whose header, tables and padding have been checked; decode_stream checks the codes.
struct ParsedStream {
  at::Tensor stream;  // contiguous
  elias::StreamHeader h;
  std::vector<uint32_t> offsets;
};

ParsedStream parse_stream(const at::Tensor& stream_in) {
  constexpr const char* op = "elias_decode";
  check_cpu(stream_in, op, "stream");
  check_dtype(stream_in, at::kByte, op, "stream");
  TORCH_CHECK_VALUE(stream_in.dim() == 1, op, ": stream must be 1-D, got shape ",
                    stream_in.sizes());
  const at::Tensor stream = stream_in.contiguous();
  const uint8_t* s = stream.data_ptr<uint8_t>();
  const uint64_t length = static_cast<uint64_t>(stream.numel());
  const std::string bad = std::string(op) + ": malformed stream: ";
  elias::StreamHeader h = elias::parse_header(s, length);
  for (int64_t b = 0; b < h.nbuckets; ++b) {
    const float v = elias::load_le<float>(s + h.scales_at + 4 * b);
    TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0.0f, bad, "scale of bucket ", b, " is ", v);
  }
  std::vector<uint32_t> offsets(static_cast<size_t>(h.nbuckets));
  for (int64_t b = 0; b < h.nbuckets; ++b) {
    offsets[b] = elias::load_le<uint32_t>(s + h.offsets_at + 4 * b);
    TORCH_CHECK_VALUE(b > 0 || offsets[b] == 0, bad, "first bucket offset is ", offsets[b],
                      ", not 0");
    TORCH_CHECK_VALUE(b == 0 || offsets[b] >= offsets[b - 1], bad, "offset of bucket ", b,
                      " goes backwards");
    TORCH_CHECK_VALUE(offsets[b] <= h.code_bits, bad, "offset of bucket ", b,
                      " is past the end of the code");
  }
  TORCH_CHECK_VALUE(h.code_bits % 8 == 0 || (s[length - 1] >> (h.code_bits % 8)) == 0, bad,
                    "padding bits after the code are not zero");
  return ParsedStream{stream, std::move(h), std::move(offsets)};
}

// Decodes the codes into packed and scales (sized for the stream by the caller); returns meta.
at::Tensor decode_stream(const ParsedStream& ps, at::Tensor& packed, at::Tensor& scales) {
  const uint8_t* s = ps.stream.data_ptr<uint8_t>();
  std::memcpy(scales.data_ptr<float>(), s + ps.h.scales_at, 4 * ps.h.nbuckets);
  const EliasDecodeJob job{
      s + ps.h.code_at, ps.h.code_bytes,  ps.h.code_bits, ps.offsets.data(),
      ps.h.numel,       ps.h.bucket_size, ps.h.bits,      packed.data_ptr<uint8_t>()};
  const KernelTable& k = kernels();
  std::mutex mutex;
  EliasError first;
  parallel_over_buckets(ps.h.nbuckets, ps.h.bucket_size, [&](int64_t b0, int64_t b1) {
    const EliasError e = k.elias_decode(job, b0, b1);
    if (e.bucket < 0) return;
    std::lock_guard<std::mutex> lock(mutex);
    if (first.bucket < 0 || e.bucket < first.bucket) first = e;
  });
  TORCH_CHECK_VALUE(first.bucket < 0, "elias_decode: malformed stream: bucket ", first.bucket, ": ",
                    first.what);
  const int ndim = static_cast<int>(ps.h.shape.size());
  at::Tensor meta = at::empty({5 + ndim}, ps.stream.options().dtype(at::kLong));
  int64_t* m = meta.data_ptr<int64_t>();
  m[0] = ps.h.bits;
  m[1] = ps.h.bucket_size;
  m[2] = ps.h.norm;
  m[3] = ps.h.dtype_code;
  m[4] = ndim;
  for (int i = 0; i < ndim; ++i) m[5 + i] = ps.h.shape[i];
  return meta;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> elias_decode_cpu(const at::Tensor& stream) {
  const ParsedStream ps = parse_stream(stream);
  // Every byte of packed is written by the decoder, so it needs no zero fill.
  at::Tensor packed = at::empty({packed_bytes(ps.h.numel, ps.h.bits)}, ps.stream.options());
  at::Tensor scales = at::empty({ps.h.nbuckets}, ps.stream.options().dtype(at::kFloat));
  at::Tensor meta = decode_stream(ps, packed, scales);
  return {packed, scales, meta};
}

at::Tensor elias_decode_out_cpu(const at::Tensor& stream, at::Tensor& packed, at::Tensor& scales) {
  constexpr const char* op = "elias_decode";
  const ParsedStream ps = parse_stream(stream);
  check_cpu(packed, op, "packed");
  check_cpu(scales, op, "scales");
  check_quantized_outputs(packed, scales, ps.h.numel, ps.h.bits, ps.h.bucket_size, op);
  return decode_stream(ps, packed, scales);
}

}  // namespace

std::vector<std::string> available_kernel_sets() {
  std::vector<std::string> names;
  for (const KernelTable* t : kAllTables) {
    if (supports(*t)) names.emplace_back(t->name);
  }
  return names;
}

std::string active_kernel_set() { return kernels().name; }

void force_kernel_set(const std::string& name) {
  if (name == "auto") {
    g_forced.store(nullptr);
    return;
  }
  for (const KernelTable* t : kAllTables) {
    if (name == t->name) {
      TORCH_CHECK_VALUE(supports(*t), "this processor cannot run the ", name, " kernels");
      g_forced.store(t);
      return;
    }
  }
  TORCH_CHECK_VALUE(false, "unknown kernel set '", name, "'; choose auto, avx512, avx2 or base");
}

}  // namespace cpu
}  // namespace qpr

TORCH_LIBRARY_IMPL(hvd_qpr, CPU, m) {
  m.impl("quantize", &qpr::cpu::quantize_cpu);
  m.impl("quantize_out", &qpr::cpu::quantize_out_cpu);
  m.impl("quantize_scaled_out", &qpr::cpu::quantize_scaled_out_cpu);
  m.impl("dequantize", &qpr::cpu::dequantize_cpu);
  m.impl("dequantize_out", &qpr::cpu::dequantize_out_cpu);
  m.impl("pack_bits", &qpr::cpu::pack_bits_cpu);
  m.impl("unpack_bits", &qpr::cpu::unpack_bits_cpu);
  m.impl("elias_encode", &qpr::cpu::elias_encode_cpu);
  m.impl("elias_decode", &qpr::cpu::elias_decode_cpu);
  m.impl("elias_decode_out", &qpr::cpu::elias_decode_out_cpu);
}
