// Function qualifiers shared by the C++ and CUDA builds of the same header code.
#pragma once

#if defined(__CUDACC__)
#define QPR_HD __host__ __device__ __forceinline__
#else
#define QPR_HD inline __attribute__((always_inline))
#endif
