// CPU kernels built for the x86-64 baseline (SSE2), for any processor.
#include "cpu/kernels_prelude.h"

namespace qpr {
namespace cpu {
namespace base {
#include "cpu/kernels_impl.inc"
}  // namespace base

const KernelTable kBaseKernels = base::make_table("base");

}  // namespace cpu
}  // namespace qpr
