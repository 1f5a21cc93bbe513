// Turns a runtime bit width into a compile-time constant once, at the kernel boundary, so that
// inner loops carry no per-element branch on it.
#pragma once

#include <type_traits>
#include <utility>

namespace qpr {

template <int V>
using IntC = std::integral_constant<int, V>;

// Calls f(IntC<v>{}) for the v in [LO, HI] equal to value; returns false if value is out of range.
template <int LO, int HI, typename F>
bool dispatch_int(int value, F&& f) {
  if constexpr (LO > HI) {
    (void)value;
    (void)f;
    return false;
  } else {
    if (value == LO) {
      f(IntC<LO>{});
      return true;
    }
    return dispatch_int<LO + 1, HI>(value, std::forward<F>(f));
  }
}

}  // namespace qpr
