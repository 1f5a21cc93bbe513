"""Seeds of the stochastic rounding, derived from (seed, rank, round, tensor, ...) so that noise is
independent across workers, rounds and tensors and every run is reproducible (DESIGN.md 2.3).

Example:
    >>> derive_seed(0, 1, 2, 3) != derive_seed(0, 1, 2, 4)
    True
"""

from __future__ import annotations

MASK64 = 0xFFFFFFFFFFFFFFFF  # Python ints do not wrap: keep 64-bit arithmetic in range

# Distinguishes a compression's phases within one round (a scatter-gather quantizes twice).
PHASE_SEND = 0
PHASE_REQUANTIZE = 1


def splitmix64(z: int) -> int:
    """SplitMix64's output function of a 64-bit state (Steele, Lea, Flood, OOPSLA 2014).

    The native generator (csrc/include/qpr/rng.h) expands a seed with the same function, so it is
    defined here, where library code can use it, and the oracle imports it from here.

    Example:
        >>> hex(splitmix64(0))  # SplitMix64's published first output
        '0xe220a8397b1dcdaf'
    """
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integer parts, by chaining splitmix64 over them (order matters).

    Example:
        >>> derive_seed(0, 0, 0, 0) == 0x4534183A9817A9A3
        True
    """
    z = 0x243F6A8885A308D3  # fractional digits of pi: an arbitrary non-zero start
    for part in parts:
        z = splitmix64(z ^ (part & MASK64))
    return z
