// Helpers of the CPU ops that the Python module exposes (choice of instruction set).
#pragma once

#include <string>
#include <vector>

namespace qpr {
namespace cpu {

// Kernel sets this processor can run, best first: a subset of {"avx512", "avx2", "base"}.
std::vector<std::string> available_kernel_sets();
// The set the ops use now.
std::string active_kernel_set();
// Forces a set ("auto" restores the best); for tests and benchmarks comparing them.
void force_kernel_set(const std::string& name);

}  // namespace cpu
}  // namespace qpr
