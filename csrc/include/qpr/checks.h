// Argument checks at the boundary of every op: they raise TypeError (wrong dtype) or ValueError
// (everything else) with a message that names the op and the argument.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "qpr/elias.h"

namespace qpr {

// torch's Python name of a dtype, as users write it.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "torch.float32";
    case at::kHalf:
      return "torch.float16";
    case at::kBFloat16:
      return "torch.bfloat16";
    case at::kDouble:
      return "torch.float64";
    case at::kByte:
      return "torch.uint8";
    case at::kChar:
      return "torch.int8";
    case at::kShort:
      return "torch.int16";
    case at::kInt:
      return "torch.int32";
    case at::kLong:
      return "torch.int64";
    case at::kBool:
      return "torch.bool";
    default:
      return std::string("torch.") + c10::toString(t);
  }
}

inline void check_float_input(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", dtype_name(dt),
                   " (float64 is not quantized: cast it, or leave it uncompressed)");
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op,
                        const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": ", name, " must be ", dtype_name(want), ", got ",
                   dtype_name(t.scalar_type()));
}

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
}

inline void check_bits(int64_t bits, const char* op) {
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 8, op, ": bits must be in 2..8, got ", bits);
}

inline void check_bucket_size(int64_t bucket_size, const char* op) {
  TORCH_CHECK_VALUE(bucket_size >= 1 && bucket_size <= INT32_MAX, op,
                    ": bucket_size must be in 1..2**31-1, got ", bucket_size);
}

inline void check_norm(int64_t norm, const char* op) {
  TORCH_CHECK_VALUE(norm == elias::kNormMax || norm == elias::kNormL2, op,
                    ": norm code must be 0 (max) or 1 (l2), got ", norm);
}

inline int elem_code(at::ScalarType dt, const char* op) {
  switch (dt) {
    case at::kFloat:
      return elias::kDtypeFloat32;
    case at::kHalf:
      return elias::kDtypeFloat16;
    case at::kBFloat16:
      return elias::kDtypeBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": dtype must be float32, float16 or bfloat16, got ",
                       dtype_name(dt));
  }
}

inline at::ScalarType elem_dtype(int code) {
  return code == elias::kDtypeFloat32   ? at::kFloat
         : code == elias::kDtypeFloat16 ? at::kHalf
                                        : at::kBFloat16;
}

// numel of a shape, checking every dimension is non-negative.
inline int64_t shape_numel(at::IntArrayRef shape, const char* op) {
  int64_t n = 1;
  for (const int64_t s : shape) {
    TORCH_CHECK_VALUE(s >= 0, op, ": shape has a negative dimension: ", shape);
    n *= s;
  }
  return n;
}

inline int64_t num_buckets(int64_t numel, int64_t bucket_size) {
  return (numel + bucket_size - 1) / bucket_size;
}

inline int64_t packed_bytes(int64_t numel, int64_t bits) { return (numel * bits + 7) / 8; }

// A quantized tensor's packed levels and scales, as quantize made them.
inline void check_quantized(const at::Tensor& packed, const at::Tensor& scales, int64_t numel,
                            int64_t bits, int64_t bucket_size, const char* op) {
  check_bits(bits, op);
  check_bucket_size(bucket_size, op);
  check_dtype(packed, at::kByte, op, "packed");
  check_dtype(scales, at::kFloat, op, "scales");
  TORCH_CHECK_VALUE(packed.dim() == 1 && packed.numel() == packed_bytes(numel, bits), op,
                    ": packed must be a 1-D tensor of ", packed_bytes(numel, bits), " bytes for ",
                    numel, " values of ", bits, " bits, got shape ", packed.sizes());
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.numel() == num_buckets(numel, bucket_size), op,
                    ": scales must be a 1-D tensor of ", num_buckets(numel, bucket_size),
                    " values (one per bucket), got shape ", scales.sizes());
}

// Buffers an op writes a quantized tensor into: check_quantized's shapes, and contiguous.
inline void check_quantized_outputs(const at::Tensor& packed, const at::Tensor& scales,
                                    int64_t numel, int64_t bits, int64_t bucket_size,
                                    const char* op) {
  check_quantized(packed, scales, numel, bits, bucket_size, op);
  TORCH_CHECK_VALUE(packed.is_contiguous() && scales.is_contiguous(), op,
                    ": packed and scales must be contiguous");
}

// Fresh packed and scales for quantizing x (on x's device), after checking bits and bucket_size.
inline std::tuple<at::Tensor, at::Tensor> empty_quantized(const at::Tensor& x, int64_t bits,
                                                          int64_t bucket_size, const char* op) {
  check_bits(bits, op);
  check_bucket_size(bucket_size, op);
  return {at::empty({packed_bytes(x.numel(), bits)}, x.options().dtype(at::kByte)),
          at::empty({num_buckets(x.numel(), bucket_size)}, x.options().dtype(at::kFloat))};
}

inline void check_field_bits(int64_t field_bits, const char* op) {
  TORCH_CHECK_VALUE(field_bits >= 1 && field_bits <= 16, op, ": field_bits must be in 1..16, got ",
                    field_bits);
}

// unpack_bits' arguments: numel fields of field_bits bits in packed, read into dtype.
inline void check_unpack(const at::Tensor& packed, int64_t field_bits, int64_t numel,
                         at::ScalarType dtype, const char* op) {
  check_field_bits(field_bits, op);
  check_dtype(packed, at::kByte, op, "packed");
  TORCH_CHECK_VALUE(numel >= 0, op, ": numel must be non-negative, got ", numel);
  TORCH_CHECK_VALUE(packed.dim() == 1 && packed.numel() >= packed_bytes(numel, field_bits), op,
                    ": packed must be a 1-D tensor of at least ", packed_bytes(numel, field_bits),
                    " bytes for ", numel, " fields of ", field_bits, " bits, got shape ",
                    packed.sizes());
  const int64_t widest = dtype == at::kByte ? 8 : dtype == at::kShort ? 15 : 16;
  TORCH_CHECK_VALUE(field_bits <= widest, op, ": ", field_bits, "-bit fields do not fit ",
                    dtype_name(dtype));
}

}  // namespace qpr
