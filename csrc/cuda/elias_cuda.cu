// CUDA implementations of elias_encode and elias_decode: the host side, which launches the kernels
// of elias_kernels.cuh on the current stream. They write and read the same stream as the CPU coder
// (csrc/include/qpr/elias.h), so a stream encoded on one device decodes on the other.
//
// Encode scans the code lengths with at::cumsum (CUB underneath). The stream's length depends on
// the data, so the host reads the total once; it reads the error flags (an invalid field, a scale
// that is NaN, Inf or negative) in the same copy and raises there. Decode reads the header to the
// host (the output's size depends on it), and the first malformed bucket by one more read of the
// error word, raised as a ValueError.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/bitpack.cuh"
#include "cuda/elias_kernels.cuh"
#include "cuda/launch.cuh"
#include "qpr/checks.h"
#include "qpr/dispatch.h"
#include "qpr/elias.h"
#include "qpr/elias_header.h"

namespace qpr {
namespace cuda {
namespace {

using namespace elias_kernels;  // the kernels and the kinds of malformed buckets

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
      code_lengths_kernel<b()><<<blocks_for(nbuckets, kThreads), kThreads, 0, stream>>>(
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
  // scales first, as the CPU encoder checks them
  TORCH_CHECK_VALUE(!(flag_bits & 2), op,
                    ": a scale is not a finite non-negative number (a bucket held NaN or Inf "
                    "when it was quantized on the GPU)");
  TORCH_CHECK_VALUE(!(flag_bits & 1), op, ": packed holds a field equal to ", (1 << bits) - 1,
                    ", which no ", bits, "-bit level encodes");
  TORCH_CHECK_VALUE(total <= elias::kMaxCodeBits, op, ": the code is ", total,
                    " bits, more than a stream's 2**32-1; encode the tensor in parts");

  const int64_t ndim = static_cast<int64_t>(shape.size());
  const int64_t scales_at = elias::kHeaderBytes + 8 * ndim;
  const int64_t offsets_at = scales_at + 4 * nbuckets;
  const int64_t code_at = offsets_at + 4 * nbuckets;  // a multiple of 8: word-aligned
  const int64_t length = code_at + static_cast<int64_t>((total + 7) / 8);
  // 4 bytes of slack for the last word's atomicOr; the result is a view without them
  at::Tensor out = at::zeros({length + 4}, opts);
  std::array<uint8_t, elias::kMaxHeadBytes> head;  // at least scales_at bytes
  elias::write_header(head.data(), static_cast<int>(bits), static_cast<int>(norm), dtype_code,
                      bucket_size, shape.data(), ndim, static_cast<uint64_t>(numel), total);
  out.narrow(0, 0, scales_at)
      .copy_(at::from_blob(head.data(), {scales_at}, at::TensorOptions().dtype(at::kByte)));
  if (nbuckets > 0) {
    out.narrow(0, scales_at, 4 * nbuckets).copy_(scales.view(at::kByte));
    dispatch_int<2, 8>(static_cast<int>(bits), [&](auto b) {
      write_codes_kernel<b()><<<blocks_for(nbuckets, kThreads), kThreads, 0, stream>>>(
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

// Checks the tables and decodes every bucket into packed and scales; raises on a malformed
// stream (one read of the error word); returns the meta tensor, on the stream's device.
at::Tensor decode_into(const at::Tensor& stream, const elias::StreamHeader& h, at::Tensor& packed,
                       at::Tensor& scales) {
  const cudaStream_t cuda_stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = stream.options();
  // every field starts at level 0 (coalesced here; the kernel writes only the coded entries)
  at::Tensor fields = at::full({std::max<int64_t>(h.numel, 1)}, level_zero_field(h.bits), opts);
  at::Tensor error = at::full({1}, -1, opts.dtype(at::kLong));  // all ones: no error yet
  dispatch_int<2, 8>(h.bits, [&](auto b) {  // also with no bucket: thread 0 checks the padding
    decode_kernel<b()><<<blocks_for(h.nbuckets, kThreads), kThreads, 0, cuda_stream>>>(
        stream.data_ptr<uint8_t>(), h.scales_at, h.offsets_at, h.code_at, h.code_bytes, h.code_bits,
        h.numel, h.bucket_size, h.nbuckets, fields.data_ptr<uint8_t>(),
        reinterpret_cast<unsigned long long*>(error.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const uint64_t first = static_cast<uint64_t>(error.cpu().data_ptr<int64_t>()[0]);
  TORCH_CHECK_VALUE(first == ~uint64_t{0}, "elias_decode: malformed stream: bucket ",
                    first / kNumKinds, ": ", malformed_text(first % kNumKinds));
  if (h.numel > 0) {
    bitpack::pack_kernel<uint8_t>
        <<<blocks_for(packed.numel(), kThreads), kThreads, 0, cuda_stream>>>(
            fields.data_ptr<uint8_t>(), h.numel, h.bits, packed.data_ptr<uint8_t>(),
            packed.numel());
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
  const at::Tensor stream = checked_stream(stream_in);
  const c10::cuda::CUDAGuard guard(stream.device());
  const elias::StreamHeader h = read_header(stream);
  at::Tensor packed = at::empty({packed_bytes(h.numel, h.bits)}, stream.options());
  at::Tensor scales = at::empty({h.nbuckets}, stream.options().dtype(at::kFloat));
  at::Tensor meta = decode_into(stream, h, packed, scales);
  return {packed, scales, meta};
}

at::Tensor elias_decode_out_cuda(const at::Tensor& stream_in, at::Tensor& packed,
                                 at::Tensor& scales) {
  constexpr const char* op = "elias_decode";
  const at::Tensor stream = checked_stream(stream_in);  // on a CUDA device, before the guard
  const c10::cuda::CUDAGuard guard(stream.device());
  TORCH_CHECK_VALUE(packed.device() == stream.device() && scales.device() == stream.device(), op,
                    ": packed and scales must be on the stream's device ", stream.device());
  const elias::StreamHeader h = read_header(stream);
  check_quantized_outputs(packed, scales, h.numel, h.bits, h.bucket_size, op);
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
