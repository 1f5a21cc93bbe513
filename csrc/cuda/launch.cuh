// Launch geometry shared by the CUDA ops' host code and their kernels.
#pragma once

#include <algorithm>
#include <cstdint>

namespace qpr {
namespace cuda {

constexpr int kThreads = 256;  // threads a block, for every kernel
constexpr int kWarpsPerBlock = kThreads / 32;

// Blocks of per_block work items covering work (at least one block, so a launch is valid).
inline int64_t blocks_for(int64_t work, int64_t per_block) {
  return std::max<int64_t>(1, (work + per_block - 1) / per_block);
}

}  // namespace cuda
}  // namespace qpr
