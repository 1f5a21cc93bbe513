// Memory-safety fuzzing of the Elias kernels, built with AddressSanitizer and UBSan by
// tests/unit/test_sanitized_kernels.py. Streams are encoded from random levels by the kernels
// themselves, then mutated (bit flips, truncation, random bytes, shifted offsets) the way
// elias_decode's header checks still let through: offsets non-decreasing and within the code.
// Every buffer is allocated at its exact size, so any read or write past it is reported.
// Usage: fuzz_elias ITERATIONS SEED; prints "decoded N rejected M" per kernel set.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/kernel_table.h"

using qpr::cpu::EliasDecodeJob;
using qpr::cpu::EliasError;
using qpr::cpu::EliasJob;
using qpr::cpu::KernelTable;

namespace {

int64_t packed_bytes(int64_t n, int bits) { return (n * bits + 7) / 8; }

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz_elias: %s\n", what);
  std::exit(1);
}

// Random fields of valid levels (0..2s), sparse or dense.
std::vector<uint8_t> random_packed(std::mt19937_64& rng, int64_t n, int bits,
                                   const KernelTable& k) {
  const int s = (1 << (bits - 1)) - 1;
  const double density = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
  std::vector<int32_t> fields(static_cast<size_t>(n));
  for (auto& f : fields) {
    const bool nonzero = std::uniform_real_distribution<double>(0.0, 1.0)(rng) < density;
    f = nonzero ? static_cast<int32_t>(rng() % (2 * s + 1)) : s;
  }
  std::vector<uint8_t> packed(static_cast<size_t>(packed_bytes(n, bits)));
  const qpr::cpu::PackJob job{fields.data(), qpr::cpu::kI32, bits, packed.data()};
  if (k.pack(job, 0, n) != 0) fail("pack rejected valid fields");
  return packed;
}

void run(const KernelTable& k, int iterations, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t bucket_sizes[] = {1, 3, 7, 8, 64, 511, 512, 1000};
  int decoded = 0;
  int rejected = 0;
  for (int it = 0; it < iterations; ++it) {
    const int bits = 2 + static_cast<int>(rng() % 7);
    const int64_t d = bucket_sizes[rng() % 8];
    const int64_t n = 1 + static_cast<int64_t>(rng() % 3000);
    const int64_t nb = (n + d - 1) / d;
    std::vector<uint8_t> packed = random_packed(rng, n, bits, k);
    const EliasJob ejob{packed.data(), n, d, bits};
    std::vector<uint8_t> scratch;
    std::vector<uint64_t> offsets64(static_cast<size_t>(nb));
    uint64_t code_bits = 0;
    if (k.elias_encode(ejob, 0, nb, scratch, offsets64.data(), code_bits) != 0) {
      fail("encode rejected valid fields");
    }
    std::vector<uint8_t> code(scratch.begin(), scratch.begin() + (code_bits + 7) / 8);
    std::vector<uint32_t> offsets(offsets64.begin(), offsets64.end());

    const int mutation = static_cast<int>(rng() % 5);
    switch (mutation) {  // a mutation the stream checks cannot see
      case 0:
        break;
      case 1:
        for (int f = 0; f < 1 + static_cast<int>(rng() % 4) && !code.empty(); ++f) {
          code[rng() % code.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
        }
        break;
      case 2:
        for (auto& byte : code) byte = static_cast<uint8_t>(rng());
        break;
      case 3:  // truncate the code, pulling offsets in
        code.resize(code.size() - rng() % (code.size() + 1));
        code_bits = std::min<uint64_t>(code_bits, 8 * code.size());
        for (auto& o : offsets) o = static_cast<uint32_t>(std::min<uint64_t>(o, code_bits));
        break;
      default:  // move one offset within its neighbours
        if (nb > 1) {
          const size_t b = 1 + rng() % (nb - 1);
          const uint32_t lo = offsets[b - 1];
          const uint32_t hi =
              b + 1 < offsets.size() ? offsets[b + 1] : static_cast<uint32_t>(code_bits);
          offsets[b] = lo + static_cast<uint32_t>(rng() % (hi - lo + 1));
        }
        break;
    }
    std::vector<uint8_t> out(static_cast<size_t>(packed_bytes(n, bits)));
    const EliasDecodeJob djob{code.data(), code.size(), code_bits, offsets.data(),
                              n,           d,           bits,      out.data()};
    // The ops split the buckets into ranges that start on whole bytes of packed fields.
    int64_t group = 8;
    while (group > 1 && (group / 2) * d % 8 == 0) group /= 2;
    const int64_t split = nb / 2 / group * group;
    const EliasError first = k.elias_decode(djob, 0, split);
    const EliasError second = k.elias_decode(djob, split, nb);
    const bool ok = first.bucket < 0 && second.bucket < 0;
    if (mutation == 0 && !(ok && out == packed))
      fail("an intact stream did not decode to its levels");
    ok ? ++decoded : ++rejected;
  }
  std::printf("%s: decoded %d rejected %d\n", k.name, decoded, rejected);
}

}  // namespace

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? std::atoi(argv[1]) : 1000;
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1;
  __builtin_cpu_init();
  run(qpr::cpu::kBaseKernels, iterations, seed);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi2")) {
    run(qpr::cpu::kAvx2Kernels, iterations, seed);
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    run(qpr::cpu::kAvx512Kernels, iterations, seed);
  }
  return 0;
}
