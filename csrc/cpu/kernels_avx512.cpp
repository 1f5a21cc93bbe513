// CPU kernels built for AVX-512 (F, BW, VL, DQ) with 512-bit vectors.
#include "cpu/kernels_prelude.h"

#pragma GCC push_options
#pragma GCC target( \
    "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,prefer-vector-width=512")
namespace qpr {
namespace cpu {
namespace avx512 {
#include "cpu/kernels_impl.inc"
}  // namespace avx512

const KernelTable kAvx512Kernels = avx512::make_table("avx512");

}  // namespace cpu
}  // namespace qpr
#pragma GCC pop_options
