// A CPU emulation of the CUDA thread model, enough to run hvd_qpr's kernels (csrc/cuda/*.cuh)
// without a GPU: tests/native/cuda_emu_driver.cpp includes this header before the kernel headers
// and tests/unit/test_cuda_emulated.py compares what they compute with the CPU ops, bit for bit.
//
// Every CUDA thread of a block is a fiber (ucontext) with a stack of its own (or, for kernels
// launched as Threads::kIndependent, a plain call). The fibers run one at a time, each until it
// reaches a warp collective (__shfl_sync, __shfl_down_sync,
// __reduce_or_sync, __reduce_max_sync) or returns. A collective completes when all 32 lanes of the
// warp wait in the same one, as the full masks our kernels pass require on a GPU; a warp in which
// some lanes have left, or wait in a different collective, is a bug in the kernel and aborts the
// run with the block and warp named. Blocks run one after another, and the lanes of a block in
// forward or reverse order (set_reverse_order), so a result that depends on the order in which
// threads run shows up as a difference between the two orders.
//
// What it does not model: memory ordering between blocks (atomics are plain read-modify-writes,
// which is exact when fibers never interleave inside one), shared memory and __syncthreads (the
// kernels use neither), and the device's floating point beyond IEEE single and double (setup.py
// builds the kernels with -fmad=false -prec-div=true -prec-sqrt=true, which makes the device's
// arithmetic the IEEE arithmetic emulated here).
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

using std::max;
using std::min;

namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

[[noreturn]] inline void fail(const char* what, int64_t block = -1, int warp = -1) {
  std::fprintf(stderr, "cuda_emu: %s (block %lld, warp %d)\n", what, static_cast<long long>(block),
               warp);
  std::abort();
}

enum class State { kRunnable, kWaiting, kDone };
enum class Op { kShfl, kShflDown, kReduceOr, kReduceMax };

struct Lane {
  ucontext_t context;
  State state = State::kDone;
  Op op = Op::kShfl;
  uint64_t value = 0;  // what the lane contributes to a collective
  int arg = 0;         // the source lane or the distance
  uint64_t result = 0;
  void* fake_stack = nullptr;  // AddressSanitizer's, while the fiber is switched out
};

// The emulated device: the block being run, its fibers, and where the scheduler resumes.
struct Device {
  static constexpr size_t kStackBytes = 256 * 1024;
  static constexpr size_t kGuardBytes = 4096;

  Dim3 grid, block;
  unsigned block_x = 0;
  int current = -1;
  bool reverse = false;
  bool independent = false;  // the launch runs its threads as plain calls
  std::vector<Lane> lanes;
  std::vector<char*> stacks;  // each above a PROT_NONE guard page: an overflow faults
  ucontext_t scheduler;
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_bottom = nullptr;
  size_t scheduler_size = 0;
  std::function<void()> kernel;

  char* stack(size_t i) {
    while (stacks.size() <= i) {
      void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m == MAP_FAILED) fail("cannot map a fiber stack");
      mprotect(m, kGuardBytes, PROT_NONE);
      stacks.push_back(static_cast<char*>(m) + kGuardBytes);
    }
    return stacks[i];
  }
};

inline Device& device() {
  static Device d;
  return d;
}

inline void set_reverse_order(bool reverse) { device().reverse = reverse; }

inline Dim3 thread_idx() { return Dim3{static_cast<unsigned>(device().current), 0, 0}; }
inline Dim3 block_idx() { return Dim3{device().block_x, 0, 0}; }
inline Dim3 block_dim() { return device().block; }
inline Dim3 grid_dim() { return device().grid; }

// AddressSanitizer must be told when the stack changes under it (its fiber annotations).
inline void before_switch(void** save, const void* bottom, size_t size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(save, bottom, size);
#else
  (void)save, (void)bottom, (void)size;
#endif
}

inline void after_switch(void* saved, const void** from_bottom, size_t* from_size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(saved, from_bottom, from_size);
#else
  (void)saved, (void)from_bottom, (void)from_size;
#endif
}

// From a fiber back to the scheduler; returns when the scheduler resumes this fiber. A finished
// fiber passes finished = true and is never resumed (AddressSanitizer drops its fake stack).
inline void yield(bool finished = false) {
  Device& d = device();
  Lane& me = d.lanes[d.current];
  before_switch(finished ? nullptr : &me.fake_stack, d.scheduler_bottom, d.scheduler_size);
  swapcontext(&me.context, &d.scheduler);
  after_switch(me.fake_stack, nullptr, nullptr);
}

inline void fiber_main() {
  Device& d = device();
  after_switch(nullptr, &d.scheduler_bottom, &d.scheduler_size);
  d.kernel();
  d.lanes[d.current].state = State::kDone;
  yield(true);
}

inline void resume(int lane) {
  Device& d = device();
  d.current = lane;
  before_switch(&d.scheduler_fake_stack, d.stack(lane), Device::kStackBytes);
  swapcontext(&d.scheduler, &d.lanes[lane].context);
  after_switch(d.scheduler_fake_stack, nullptr, nullptr);
  d.current = -1;
}

// Completes warp w's collective if all its lanes wait in the same one; false if it must wait.
inline bool complete_collective(int w) {
  Device& d = device();
  Lane* warp = &d.lanes[32 * w];
  bool all_waiting = true, any_runnable = false;
  for (int i = 0; i < 32; ++i) {
    all_waiting &= warp[i].state == State::kWaiting;
    any_runnable |= warp[i].state == State::kRunnable;
  }
  if (!all_waiting) {
    if (any_runnable) return false;
    fail("a warp collective with a full mask, but some lanes of the warp have returned", d.block_x,
         w);
  }
  const Op op = warp[0].op;
  for (int i = 1; i < 32; ++i) {
    if (warp[i].op != op) fail("lanes of one warp wait in different collectives", d.block_x, w);
  }
  uint64_t acc = 0;
  for (int i = 0; i < 32; ++i) {
    if (op == Op::kReduceOr) acc |= warp[i].value;
    if (op == Op::kReduceMax) acc = std::max(acc, warp[i].value);
  }
  for (int i = 0; i < 32; ++i) {
    const int down = i + warp[i].arg;
    switch (op) {
      case Op::kShfl:
        warp[i].result = warp[warp[i].arg & 31].value;
        break;
      case Op::kShflDown:
        warp[i].result = down < 32 ? warp[down].value : warp[i].value;
        break;
      case Op::kReduceOr:
      case Op::kReduceMax:
        warp[i].result = acc;
        break;
    }
  }
  for (int i = 0; i < 32; ++i) warp[i].state = State::kRunnable;
  return true;
}

// How a launch runs its threads: as fibers that meet in warp collectives, or, for kernels whose
// threads never communicate, one after another as plain calls (much faster; a warp collective
// in such a kernel aborts the run).
enum class Threads { kLockstep, kIndependent };

// Runs kernel() as every thread of a grid of `grid` blocks of `block` threads (1-D, whole warps).
inline void launch(int64_t grid, int64_t block, std::function<void()> kernel,
                   Threads threads = Threads::kLockstep) {
  Device& d = device();
  if (block < 1 || block > 1024 || block % 32 != 0) fail("emulated blocks are whole warps");
  if (grid < 1) fail("a launch needs at least one block");
  d.grid = Dim3{static_cast<unsigned>(grid), 1, 1};
  d.block = Dim3{static_cast<unsigned>(block), 1, 1};
  d.kernel = std::move(kernel);
  d.lanes.assign(static_cast<size_t>(block), Lane{});
  const int n = static_cast<int>(block);
  for (int64_t step = 0; step < grid; ++step) {
    d.block_x = static_cast<unsigned>(d.reverse ? grid - 1 - step : step);
    if (threads == Threads::kIndependent) {
      d.independent = true;
      for (int k = 0; k < n; ++k) {
        d.current = d.reverse ? n - 1 - k : k;
        d.kernel();
      }
      d.current = -1;
      d.independent = false;
      continue;
    }
    for (int i = 0; i < n; ++i) {
      Lane& lane = d.lanes[i];
      lane = Lane{};
      lane.state = State::kRunnable;
      getcontext(&lane.context);
      lane.context.uc_stack.ss_sp = d.stack(i);
      lane.context.uc_stack.ss_size = Device::kStackBytes;
      lane.context.uc_link = nullptr;
      makecontext(&lane.context, fiber_main, 0);
    }
    for (;;) {
      bool ran = false;
      for (int k = 0; k < n; ++k) {
        const int i = d.reverse ? n - 1 - k : k;
        if (d.lanes[i].state == State::kRunnable) {
          resume(i);
          ran = true;
        }
      }
      bool completed = false, waiting = false;
      for (int w = 0; w < n / 32; ++w) {
        bool warp_waits = false;
        for (int i = 0; i < 32; ++i) warp_waits |= d.lanes[32 * w + i].state == State::kWaiting;
        if (warp_waits) {
          waiting = true;
          completed |= complete_collective(w);
        }
      }
      if (!waiting) break;
      if (!ran && !completed) fail("the block cannot make progress", d.block_x);
    }
  }
  d.kernel = nullptr;
}

// ---- warp collectives (full masks only) ---------------------------------------------------------

template <typename T>
T collective(Op op, unsigned mask, T value, int arg) {
  static_assert(sizeof(T) <= 8, "collectives move up to 64 bits");
  Device& d = device();
  if (d.current < 0) fail("a warp collective outside a kernel");
  if (d.independent) fail("a warp collective in a kernel launched as Threads::kIndependent");
  if (mask != 0xFFFFFFFFu) fail("the emulation supports full-warp masks only", d.block_x);
  Lane& me = d.lanes[d.current];
  me.state = State::kWaiting;
  me.op = op;
  me.value = 0;
  std::memcpy(&me.value, &value, sizeof(T));
  me.arg = arg;
  yield();
  T out;
  std::memcpy(&out, &me.result, sizeof(T));
  return out;
}

}  // namespace emu

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane) {
  return emu::collective(emu::Op::kShfl, mask, value, src_lane);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  return emu::collective(emu::Op::kShflDown, mask, value, static_cast<int>(delta));
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned value) {
  return emu::collective(emu::Op::kReduceOr, mask, value, 0);
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned value) {
  return emu::collective(emu::Op::kReduceMax, mask, value, 0);
}

// ---- atomics: fibers never interleave inside one, so a plain read-modify-write is exact ---------

inline unsigned atomicOr(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old | v;
  return old;
}
inline int atomicOr(int* p, int v) {
  const int old = *p;
  *p = old | v;
  return old;
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = std::min(old, v);
  return old;
}

// ---- bit casts and the 16-bit float types, rounding as the device does --------------------------

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __int_as_float(int i) { return __uint_as_float(static_cast<unsigned>(i)); }

inline int __ffsll(long long v) { return __builtin_ffsll(v); }

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  return uint4{x, y, z, w};
}

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1Fu;
  const uint32_t mantissa = h.bits & 0x3FFu;
  if (exponent == 0x1F) return __uint_as_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent != 0) return __uint_as_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;  // 2^-24, exact
  return sign ? -magnitude : magnitude;
}

// Round to nearest even; NaN becomes the device's canonical 0x7FFF.
inline __half __float2half_rn(float f) {
  const uint32_t x = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return __half{0x7FFF};
  if (ax >= 0x477FF000u) return __half{static_cast<uint16_t>(sign | 0x7C00u)};  // >= 65520
  uint32_t h, rest, half_ulp;
  if (ax >= 0x38800000u) {  // a normal half: drop 13 mantissa bits
    const uint32_t r = ax - 0x38000000u;
    h = r >> 13;
    rest = r & 0x1FFFu;
    half_ulp = 0x1000u;
  } else {                                      // a subnormal half: units of 2^-24
    if (ax < 0x33000000u) return __half{sign};  // at most 2^-25: rounds to zero
    const uint32_t mantissa = (ax & 0x7FFFFFu) | 0x800000u;
    const int shift = 126 - static_cast<int>(ax >> 23);
    h = mantissa >> shift;
    rest = mantissa & ((1u << shift) - 1u);
    half_ulp = 1u << (shift - 1);
  }
  if (rest > half_ulp || (rest == half_ulp && (h & 1u))) ++h;
  return __half{static_cast<uint16_t>(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  return __uint_as_float(static_cast<uint32_t>(b.bits) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = __float_as_uint(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return __nv_bfloat16{0x7FFF};
  return __nv_bfloat16{static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16)};
}
