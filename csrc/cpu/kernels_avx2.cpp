// CPU kernels built for AVX2 with FMA, F16C and BMI2 (x86-64-v3).
#include "cpu/kernels_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
namespace qpr {
namespace cpu {
namespace avx2 {
#include "cpu/kernels_impl.inc"
}  // namespace avx2

const KernelTable kAvx2Kernels = avx2::make_table("avx2");

}  // namespace cpu
}  // namespace qpr
#pragma GCC pop_options
