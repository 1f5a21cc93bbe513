// The QSGD stochastic rounding of one value (Alistarh et al., "QSGD: Communication-Efficient SGD
// via Gradient Quantization and Encoding", NeurIPS 2017), written once for the CPU and CUDA
// kernels.
//
// With s = 2^(bits-1) - 1 and bucket scale c > 0: t = (|v| / c) * s (two IEEE-rounded float
// operations, never fused), l = floor(t), and the level is l + 1 with probability t - l, else l;
// the sign of v is kept. Dividing per element (not multiplying by s / c) keeps t <= s and avoids
// overflow when c is subnormal. A zero bucket (c == 0) maps to level 0 everywhere.
#pragma once

#include <cstdint>

#include "qpr/hostdev.h"
#include "qpr/rng.h"

namespace qpr {

// Encoded field of a level: level + s, in [0, 2s]; the all-ones field is invalid.
template <int BITS>
struct QsgdLevels {
  static_assert(BITS >= 2 && BITS <= 8, "QSGD bit widths are 2..8");
  static constexpr int kS = (1 << (BITS - 1)) - 1;
  static constexpr int kInvalidField = (1 << BITS) - 1;
  static constexpr int kLog2S = BITS - 2;  // floor(log2 s): the longest level code is 2*kLog2S+1
};

// Field (level + S, in [0, 2S]) of value v; c_div is the bucket scale, or 1 for an all-zero
// bucket (then every |v| is 0 and t is 0). Computed in float, where every step is exact but the
// division and the multiplication by S, so the compiler can keep whole vectors in float lanes.
template <int S>
QPR_HD int qsgd_field(float v, float c_div, uint32_t h) {
  const float a = v < 0.0f ? -v : v;
  float t = (a / c_div) * static_cast<float>(S);
  t = t < static_cast<float>(S) ? t : static_cast<float>(S);
#if defined(__CUDA_ARCH__)
  const float l = floorf(t);
#else
  const float l = __builtin_floorf(t);
#endif
  const float level = l + (rng_unit_float(h) < t - l ? 1.0f : 0.0f);
  return static_cast<int>((v < 0.0f ? -level : level) + static_cast<float>(S));
}

QPR_HD float qsgd_divisor(float scale) { return scale > 0.0f ? scale : 1.0f; }

// Dequantized value of a level: level * (c / s), one float division per bucket.
QPR_HD float qsgd_step(float scale, int s) { return scale / static_cast<float>(s); }

}  // namespace qpr
