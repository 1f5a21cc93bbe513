// Runs hvd_qpr's CUDA kernels (csrc/cuda/*.cuh) on the CPU emulation of tests/native/cuda_emu.h,
// launched with the grids, the scan and the header handling of the host code in ops_cuda.cu and
// elias_cuda.cu. Built with AddressSanitizer and UBSan by tests/unit/test_cuda_emulated.py, and
// every buffer has its exact size, so a kernel that reads or writes outside one fails the run.
// Kernels without warp collectives run their threads as plain calls (emu::Threads::kIndependent).
//
// Usage: cuda_emu_driver forward|reverse JOBS_FILE. Each line of JOBS_FILE is one job; each job
// prints one line: "ok", or "error: MESSAGE" for what the CUDA op raises (a malformed stream, an
// invalid field). Jobs, with files of raw little-endian values:
//   quantize DTYPE BITS BUCKET NORM SEED NUMEL MISALIGN X PACKED SCALES   (NORM 2: SCALES is read)
//   dequantize DTYPE BITS BUCKET NUMEL MISALIGN PACKED SCALES OUT
//   pack ITYPE FIELD_BITS NUMEL VALUES OUT
//   unpack ITYPE FIELD_BITS NUMEL PACKED OUT
//   encode BITS BUCKET NORM DTYPE SHAPE PACKED SCALES OUT        (SHAPE: 3x5x7, or - for a scalar)
//   decode STREAM PACKED SCALES
// DTYPE is f32, f16 or bf16; ITYPE u8, i16, i32 or i64. MISALIGN 1 hands quantize a packed buffer
// that is not 4-byte aligned (the CUDA op then takes the two-kernel path), and dequantize an output
// one element past a 16-byte boundary (no vector stores).
// clang-format off
#include "cuda_emu.h"  // must come first: it defines what the kernel headers take from CUDA
// clang-format on

#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "cuda/bitpack.cuh"
#include "cuda/elias_kernels.cuh"
#include "cuda/launch.cuh"
#include "cuda/quantize_kernels.cuh"
#include "qpr/dispatch.h"
#include "qpr/elias_header.h"

namespace {

using qpr::dispatch_int;
using qpr::cuda::blocks_for;
using qpr::cuda::kThreads;

struct JobError {
  std::string message;
};

[[noreturn]] void job_error(const std::string& message) { throw JobError{message}; }

std::vector<uint8_t> read_file(const std::string& path, size_t bytes) {
  std::ifstream in(path, std::ios::binary);
  std::vector<uint8_t> data(bytes);
  in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(bytes));
  if (static_cast<size_t>(in.gcount()) != bytes || in.peek() != EOF) {
    job_error("input file " + path + " does not hold " + std::to_string(bytes) + " bytes");
  }
  return data;
}

std::vector<uint8_t> read_whole_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
}

int64_t packed_bytes(int64_t numel, int64_t bits) { return (numel * bits + 7) / 8; }

template <typename F>
void dispatch_elem(const std::string& dtype, F&& f) {
  if (dtype == "f32") return f(qpr::cuda::F32{});
  if (dtype == "f16") return f(qpr::cuda::F16{});
  if (dtype == "bf16") return f(qpr::cuda::BF16{});
  job_error("unknown dtype " + dtype);
}

size_t elem_size(const std::string& dtype) { return dtype == "f32" ? 4 : 2; }

int dtype_code(const std::string& dtype) {
  if (dtype == "f32") return qpr::elias::kDtypeFloat32;
  return dtype == "f16" ? qpr::elias::kDtypeFloat16 : qpr::elias::kDtypeBFloat16;
}

template <typename F>
void dispatch_int_type(const std::string& type, F&& f) {
  if (type == "u8") return f(uint8_t{});
  if (type == "i16") return f(int16_t{});
  if (type == "i32") return f(int32_t{});
  if (type == "i64") return f(int64_t{});
  job_error("unknown integer type " + type);
}

// As run_quantize in ops_cuda.cu.
void quantize(std::istream& args) {
  std::string dtype, x_path, packed_path, scales_path;
  int64_t bits, bucket_size, norm, seed, numel, misalign;
  args >> dtype >> bits >> bucket_size >> norm >> seed >> numel >> misalign >> x_path >>
      packed_path >> scales_path;
  const int64_t nbuckets = (numel + bucket_size - 1) / bucket_size;
  const std::vector<uint8_t> x = read_file(x_path, numel * elem_size(dtype));
  std::vector<float> scales(static_cast<size_t>(nbuckets));
  if (norm == qpr::cuda::kNormGiven) {
    const std::vector<uint8_t> given = read_file(scales_path, 4 * nbuckets);
    std::memcpy(scales.data(), given.data(), given.size());
  }
  const int64_t nbytes = packed_bytes(numel, bits);
  std::vector<uint8_t> buffer(static_cast<size_t>(nbytes + misalign));
  uint8_t* packed = buffer.data() + misalign;
  const qpr::RngKey key = qpr::make_rng_key(static_cast<uint64_t>(seed));
  const int64_t words = (numel * bits + 31) / 32;
  const int64_t scale_blocks = blocks_for(nbuckets, qpr::cuda::kWarpsPerBlock);
  float* s = scales.data();
  dispatch_elem(dtype, [&](auto elem) {
    using E = decltype(elem);
    const auto* xp = reinterpret_cast<const typename E::T*>(x.data());
    if (qpr::cuda::quantize_is_fused(bucket_size, bits, packed)) {
      dispatch_int<2, 8>(static_cast<int>(bits), [&](auto b) {
        dispatch_int<0, 2>(static_cast<int>(norm), [&](auto nm) {
          emu::launch(scale_blocks, kThreads, [&] {
            qpr::cuda::quantize_fused_kernel<b(), E, nm()>(xp, numel, bucket_size, nbuckets, s, key,
                                                           packed, nbytes);
          });
        });
      });
      return;
    }
    std::vector<uint8_t> poisoned(static_cast<size_t>(nbuckets));
    dispatch_int<0, 2>(static_cast<int>(norm), [&](auto nm) {
      emu::launch(scale_blocks, kThreads, [&] {
        qpr::cuda::bucket_scales_kernel<E, nm()>(xp, numel, bucket_size, nbuckets, s,
                                                 poisoned.data());
      });
    });
    dispatch_int<2, 8>(static_cast<int>(bits), [&](auto b) {
      emu::launch(
          blocks_for(words, kThreads), kThreads,
          [&] {
            qpr::cuda::quantize_pack_kernel<b(), E>(xp, numel, bucket_size, s, poisoned.data(), key,
                                                    packed, nbytes);
          },
          emu::Threads::kIndependent);
    });
  });
  write_file(packed_path, packed, static_cast<size_t>(nbytes));
  if (norm != qpr::cuda::kNormGiven) write_file(scales_path, s, 4 * nbuckets);
}

// As dequantize_out_cuda.
void dequantize(std::istream& args) {
  std::string dtype, packed_path, scales_path, out_path;
  int64_t bits, bucket_size, numel, misalign;
  args >> dtype >> bits >> bucket_size >> numel >> misalign >> packed_path >> scales_path >>
      out_path;
  const int64_t nbuckets = (numel + bucket_size - 1) / bucket_size;
  const std::vector<uint8_t> packed = read_file(packed_path, packed_bytes(numel, bits));
  const std::vector<uint8_t> scale_bytes = read_file(scales_path, 4 * nbuckets);
  std::vector<float> scales(static_cast<size_t>(nbuckets));
  std::memcpy(scales.data(), scale_bytes.data(), scale_bytes.size());
  const size_t size = elem_size(dtype);
  std::vector<uint8_t> buffer((numel + misalign) * size);
  uint8_t* out = buffer.data() + misalign * size;
  const int64_t groups = (numel + qpr::cuda::kDequantizeGroup - 1) / qpr::cuda::kDequantizeGroup;
  dispatch_elem(dtype, [&](auto elem) {
    using E = decltype(elem);
    auto* op = reinterpret_cast<typename E::T*>(out);
    const bool vector = qpr::cuda::dequantize_vector_stores(op);
    dispatch_int<2, 8>(static_cast<int>(bits), [&](auto b) {
      emu::launch(
          blocks_for(groups, kThreads), kThreads,
          [&] {
            qpr::cuda::dequantize_kernel<b(), E>(packed.data(), static_cast<int64_t>(packed.size()),
                                                 scales.data(), numel, bucket_size, op, vector);
          },
          emu::Threads::kIndependent);
    });
  });
  write_file(out_path, out, numel * size);
}

// As pack_bits_cuda and unpack_bits_cuda.
void pack(std::istream& args, bool unpack) {
  std::string type, in_path, out_path;
  int64_t field_bits, numel;
  args >> type >> field_bits >> numel >> in_path >> out_path;
  dispatch_int_type(type, [&](auto zero) {
    using T = decltype(zero);
    const int64_t nbytes = packed_bytes(numel, field_bits);
    if (unpack) {
      const std::vector<uint8_t> packed = read_file(in_path, nbytes);
      std::vector<T> out(static_cast<size_t>(numel));
      emu::launch(
          blocks_for(numel, kThreads), kThreads,
          [&] {
            qpr::cuda::bitpack::unpack_kernel<T>(packed.data(), nbytes,
                                                 static_cast<int>(field_bits), numel, out.data());
          },
          emu::Threads::kIndependent);
      write_file(out_path, out.data(), out.size() * sizeof(T));
      return;
    }
    const std::vector<uint8_t> raw = read_file(in_path, numel * sizeof(T));
    std::vector<T> values(static_cast<size_t>(numel));
    std::memcpy(values.data(), raw.data(), raw.size());
    std::vector<uint8_t> out(static_cast<size_t>(nbytes));
    emu::launch(
        blocks_for(nbytes, kThreads), kThreads,
        [&] {
          qpr::cuda::bitpack::pack_kernel<T>(values.data(), numel, static_cast<int>(field_bits),
                                             out.data(), nbytes);
        },
        emu::Threads::kIndependent);
    write_file(out_path, out.data(), out.size());
  });
}

std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> shape;
  if (text == "-") return shape;
  std::stringstream in(text);
  std::string dim;
  while (std::getline(in, dim, 'x')) shape.push_back(std::stoll(dim));
  return shape;
}

// As elias_encode_cuda: lengths, an exclusive scan on the host, the header, then the codes.
void encode(std::istream& args) {
  std::string shape_text, packed_path, scales_path, out_path, dtype;
  int64_t bits, bucket_size, norm;
  args >> bits >> bucket_size >> norm >> dtype >> shape_text >> packed_path >> scales_path >>
      out_path;
  const std::vector<int64_t> shape = parse_shape(shape_text);
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const int64_t nbuckets = (numel + bucket_size - 1) / bucket_size;
  const std::vector<uint8_t> packed = read_file(packed_path, packed_bytes(numel, bits));
  const std::vector<uint8_t> scale_bytes = read_file(scales_path, 4 * nbuckets);
  std::vector<float> scales(static_cast<size_t>(nbuckets));
  std::memcpy(scales.data(), scale_bytes.data(), scale_bytes.size());
  const int64_t pbytes = static_cast<int64_t>(packed.size());

  std::vector<int64_t> lengths(static_cast<size_t>(nbuckets));
  int flags = 0;
  if (nbuckets > 0) {
    dispatch_int<2, 8>(static_cast<int>(bits), [&](auto b) {
      emu::launch(
          blocks_for(nbuckets, kThreads), kThreads,
          [&] {
            qpr::cuda::elias_kernels::code_lengths_kernel<b()>(packed.data(), pbytes, numel,
                                                               bucket_size, nbuckets, scales.data(),
                                                               lengths.data(), &flags);
          },
          emu::Threads::kIndependent);
    });
  }
  std::vector<int64_t> offsets(static_cast<size_t>(nbuckets));
  uint64_t total = 0;
  for (int64_t b = 0; b < nbuckets; ++b) {
    offsets[b] = static_cast<int64_t>(total);
    total += static_cast<uint64_t>(lengths[b]);
  }
  if (flags & 2) job_error("elias_encode: a scale is not a finite non-negative number");
  if (flags & 1) job_error("elias_encode: packed holds an invalid field");
  const int64_t ndim = static_cast<int64_t>(shape.size());
  const int64_t scales_at = qpr::elias::kHeaderBytes + 8 * ndim;
  const int64_t offsets_at = scales_at + 4 * nbuckets;
  const int64_t code_at = offsets_at + 4 * nbuckets;
  const int64_t length = code_at + static_cast<int64_t>((total + 7) / 8);
  std::vector<uint8_t> out(static_cast<size_t>(length + 4));  // the CUDA op's slack word too
  qpr::elias::write_header(out.data(), static_cast<int>(bits), static_cast<int>(norm),
                           dtype_code(dtype), bucket_size, shape.data(), ndim,
                           static_cast<uint64_t>(numel), total);
  if (nbuckets > 0) {
    std::memcpy(out.data() + scales_at, scales.data(), 4 * nbuckets);
    dispatch_int<2, 8>(static_cast<int>(bits), [&](auto b) {
      emu::launch(
          blocks_for(nbuckets, kThreads), kThreads,
          [&] {
            qpr::cuda::elias_kernels::write_codes_kernel<b()>(
                packed.data(), pbytes, numel, bucket_size, nbuckets, offsets.data(),
                reinterpret_cast<uint32_t*>(out.data() + code_at), out.data() + offsets_at);
          },
          emu::Threads::kIndependent);
    });
  }
  for (int k = 0; k < 4; ++k) {
    if (out[length + k] != 0) job_error("the code spilled past the stream into the slack word");
  }
  write_file(out_path, out.data(), static_cast<size_t>(length));
}

// As elias_decode_cuda: the header on the host, the tables and codes on the device.
void decode(std::istream& args) {
  std::string stream_path, packed_path, scales_path;
  args >> stream_path >> packed_path >> scales_path;
  const std::vector<uint8_t> stream = read_whole_file(stream_path);
  qpr::elias::StreamHeader h;
  try {
    h = qpr::elias::parse_header(stream.data(), stream.size());
  } catch (const c10::Error& e) {
    job_error(e.what_without_backtrace());
  }
  namespace k = qpr::cuda::elias_kernels;
  std::vector<uint8_t> fields(static_cast<size_t>(h.numel), k::level_zero_field(h.bits));
  unsigned long long error = ~0ull;
  dispatch_int<2, 8>(h.bits, [&](auto b) {  // also with no bucket: thread 0 checks the padding
    emu::launch(
        blocks_for(h.nbuckets, kThreads), kThreads,
        [&] {
          k::decode_kernel<b()>(stream.data(), h.scales_at, h.offsets_at, h.code_at, h.code_bytes,
                                h.code_bits, h.numel, h.bucket_size, h.nbuckets, fields.data(),
                                &error);
        },
        emu::Threads::kIndependent);
  });
  if (error != ~0ull) {
    job_error("elias_decode: malformed stream: bucket " + std::to_string(error / k::kNumKinds) +
              ": " + k::malformed_text(error % k::kNumKinds));
  }
  const int64_t nbytes = packed_bytes(h.numel, h.bits);
  std::vector<uint8_t> packed(static_cast<size_t>(nbytes));
  if (h.numel > 0) {
    emu::launch(
        blocks_for(nbytes, kThreads), kThreads,
        [&] {
          qpr::cuda::bitpack::pack_kernel<uint8_t>(fields.data(), h.numel, h.bits, packed.data(),
                                                   nbytes);
        },
        emu::Threads::kIndependent);
  }
  write_file(packed_path, packed.data(), packed.size());
  write_file(scales_path, stream.data() + h.scales_at, 4 * h.nbuckets);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || (std::string(argv[1]) != "forward" && std::string(argv[1]) != "reverse")) {
    std::cerr << "usage: cuda_emu_driver forward|reverse JOBS_FILE\n";
    return 2;
  }
  emu::set_reverse_order(std::string(argv[1]) == "reverse");
  std::ifstream jobs(argv[2]);
  std::string line;
  while (std::getline(jobs, line)) {
    std::istringstream args(line);
    std::string op;
    args >> op;
    try {
      if (op == "quantize") {
        quantize(args);
      } else if (op == "dequantize") {
        dequantize(args);
      } else if (op == "pack" || op == "unpack") {
        pack(args, op == "unpack");
      } else if (op == "encode") {
        encode(args);
      } else if (op == "decode") {
        decode(args);
      } else {
        std::cerr << "unknown job: " << line << "\n";
        return 2;
      }
      std::cout << "ok\n";
    } catch (const JobError& e) {
      std::cout << "error: " << e.message << "\n";
    }
  }
  return 0;
}
