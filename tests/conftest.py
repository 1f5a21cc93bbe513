"""Shared fixtures: deterministic random inputs (never zeros) and the CPU kernel sets to test."""

from __future__ import annotations

import pytest
import torch

import hvd_qpr.ops as ops

ODD_SIZES = (1, 7, 511, 513, 100003)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def random_input(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Gaussian values with a spread of magnitudes and no exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))
    x = torch.where(x == 0, torch.full_like(x, 1e-3), x)
    return x.to(dtype)


@pytest.fixture(params=ops.available_kernel_sets())
def kernel_set(request):
    """Runs a test once per CPU kernel set this processor supports (avx512, avx2, base)."""
    with ops.kernel_set(request.param):
        yield request.param
