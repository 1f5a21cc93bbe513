// Counter-based random numbers shared by the CPU and CUDA kernels.
//
// A draw is a pure function of (key, element index): no state, no time, so the same seed gives
// bit-identical draws on every device and in any thread order. The key spreads a 64-bit user seed
// with SplitMix64's finalizer (Steele, Lea, Flood, OOPSLA 2014); a draw is a 32-bit
// multiply-xorshift bijection (constants from C. Wellons' hash-prospector search) of the index,
// which vectorizes with 32-bit lanes on the CPU. hvd_qpr/reference.py mirrors this file exactly.
#pragma once

#include <cstdint>

#include "qpr/hostdev.h"

namespace qpr {

struct RngKey {
  uint32_t k0;
  uint32_t k1;
};

QPR_HD uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

QPR_HD RngKey make_rng_key(uint64_t seed) {
  const uint64_t z = splitmix64(seed);
  return RngKey{static_cast<uint32_t>(z), static_cast<uint32_t>(z >> 32)};
}

// Draws for the element indices (hi << 32 | lo) sharing one hi come from one stream, whose key
// mixes the seed's keys with hi (one bijective hash, computed once per 2^32 elements).
QPR_HD uint32_t rng_stream_key(RngKey key, uint32_t hi) {
  uint32_t x = hi ^ key.k1;
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0xD35A2D97u;
  x ^= x >> 15;
  return x ^ key.k0;
}

// Uniform 32-bit draw for index lo of a stream: the "lowbias32" multiply-xorshift bijection of
// lo ^ stream_key (two multiplies, so a vector lane costs about six instructions).
QPR_HD uint32_t rng_draw(uint32_t stream_key, uint32_t lo) {
  uint32_t x = lo ^ stream_key;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The top 24 bits as a float in [0, 1): exact, so CPU and GPU compare the same number.
QPR_HD float rng_unit_float(uint32_t h) {
  return static_cast<float>(static_cast<int32_t>(h >> 8)) * 5.9604644775390625e-08f;  // 2^-24
}

}  // namespace qpr
