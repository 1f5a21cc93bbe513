// Launch geometry shared by the CUDA ops' host code and their kernels.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace qpr {
namespace cuda {

constexpr int kThreads = 256;  // threads a block, for every kernel
constexpr int kWarpsPerBlock = kThreads / 32;

// Blocks of per_block work items covering work (at least one block, so a launch is valid; at most
// the 2^31 - 1 a grid's x dimension takes).
inline int64_t blocks_for(int64_t work, int64_t per_block) {
  const int64_t blocks = std::max<int64_t>(1, (work + per_block - 1) / per_block);
  TORCH_CHECK_VALUE(
      blocks <= 2147483647, "a kernel launch would need ", blocks,
      " blocks, more than a CUDA grid holds: split the tensor (or use larger buckets)");
  return blocks;
}

}  // namespace cuda
}  // namespace qpr
