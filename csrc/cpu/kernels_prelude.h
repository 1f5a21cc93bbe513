// Headers the instruction-set builds of kernels_impl.inc need. They are included before the
// `#pragma GCC target` of each build so that library code stays compiled for the baseline.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/kernel_table.h"
#include "qpr/dispatch.h"
#include "qpr/elias.h"
#include "qpr/qsgd.h"
#include "qpr/rng.h"
