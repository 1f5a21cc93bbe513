"""Seeds of the stochastic rounding, derived from (seed, rank, round, tensor, ...) so that noise is
independent across workers, rounds and tensors and every run is reproducible (DESIGN.md 2.3).

Example:
    >>> derive_seed(0, 1, 2, 3) != derive_seed(0, 1, 2, 4)
    True
"""

from __future__ import annotations

from hvd_qpr.reference import MASK64, splitmix64

# Distinguishes a compression's phases within one round (a scatter-gather quantizes twice).
PHASE_SEND = 0
PHASE_REQUANTIZE = 1


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integer parts, by chaining splitmix64 over them (order matters)."""
    z = 0x243F6A8885A308D3  # fractional digits of pi: an arbitrary non-zero start
    for part in parts:
        z = splitmix64(z ^ (part & MASK64))
    return z
