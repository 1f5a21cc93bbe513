"""The counter-based generator: uniform, uncorrelated across indices and seeds, stable."""

from __future__ import annotations

import math

import torch

import hvd_qpr.reference as ref


def test_known_values_are_stable():
    # Pinned draws: a change of the generator changes every quantized tensor ever produced, and
    # the native kernels are bit-exact with this reference (test_quantize.py).
    assert ref.rng_u32(0, torch.arange(4)).tolist() == [
        0x30A78956,
        0x50A3E2CE,
        0xA94AE8F4,
        0xB0019DDA,
    ]
    far = torch.tensor([0, 2**32 + 5, 2**40])
    assert ref.rng_u32(2**64 - 1, far).tolist() == [0xCDCDD2E7, 0xC6FAD385, 0x0C6C7678]
    assert ref.rng_key(0) == (ref.splitmix64(0) & 0xFFFFFFFF, ref.splitmix64(0) >> 32)
    assert ref.splitmix64(0) == 0xE220A8397B1DCDAF  # SplitMix64's published first output


def test_uniform_top_bits():
    n = 1 << 20
    u = ref.rng_unit_float(ref.rng_u32(42, torch.arange(n)))
    assert u.min() >= 0 and u.max() < 1
    counts = torch.histc(u, bins=256, min=0, max=1)
    expected = n / 256
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # chi-square with 255 degrees of freedom: mean 255, sd ~22.6
    assert chi2 < 255 + 6 * math.sqrt(2 * 255)
    assert abs(u.mean().item() - 0.5) < 6 * math.sqrt(1 / 12 / n)


def test_no_correlation_between_neighbours_seeds_and_high_words():
    n = 1 << 18
    idx = torch.arange(n)
    a = ref.rng_unit_float(ref.rng_u32(7, idx)).double() - 0.5
    b = ref.rng_unit_float(ref.rng_u32(8, idx)).double() - 0.5
    c = ref.rng_unit_float(ref.rng_u32(7, idx + (1 << 32))).double() - 0.5
    limit = 6 / math.sqrt(n)

    def corr(x, y):
        return ((x * y).mean() / (x.std() * y.std())).item()

    assert abs(corr(a[1:], a[:-1])) < limit
    assert abs(corr(a, b)) < limit
    assert abs(corr(a, c)) < limit
    # the lowest of the 24 bits used is balanced too
    low = ((ref.rng_u32(7, idx) >> 8) & 1).double()
    assert abs(low.mean().item() - 0.5) < 6 * 0.5 / math.sqrt(n)


def test_splitmix64_is_library_code_the_oracle_imports():
    import ast
    from pathlib import Path

    from hvd_qpr import seeds

    assert ref.splitmix64 is seeds.splitmix64 and ref.MASK64 == seeds.MASK64 == 2**64 - 1
    assert seeds.splitmix64(0) == 0xE220A8397B1DCDAF
    tree = ast.parse(Path(seeds.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "hvd_qpr.reference" not in imported  # the oracle is no dependency of library code
