"""When workers communicate: a pure object, testable without Horovod.

Parallel-Restarted SGD (Yu et al., AAAI 2019; Stich, "Local SGD Converges Fast and Communicates
Little", ICLR 2019) averages models every ``local_steps`` steps; with ``local_steps == 1`` it is
parallel SGD, averaging gradients every step. The first ``warmup_steps`` steps average
uncompressed gradients whatever ``local_steps`` is.

Example:
    >>> s = SyncSchedule(local_steps=4, warmup_steps=2)
    >>> [s.averages_gradients(t) for t in range(4)]
    [True, True, False, False]
    >>> s.syncs_after(local_count=4)
    True
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SyncSchedule:
    """What step ``t`` (0-based count of ``step()`` calls before it) communicates.

    Attributes:
        local_steps: K, local steps between model averages; 1 averages gradients every step
            (unless mixes_models).
        warmup_steps: steps at the start that average uncompressed gradients.
        mixes_models: gossip and Overlap-Local-SGD: every step is a local step and models are
            mixed every local_steps steps, K = 1 included.
    """

    local_steps: int = 1
    warmup_steps: int = 0
    mixes_models: bool = False

    def __post_init__(self) -> None:
        for field in ("local_steps", "warmup_steps"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{field} must be an int, got {type(value).__name__}")
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def averages_gradients(self, step: int) -> bool:
        """Whether step averages gradients before the wrapped optimizer's step."""
        return (self.local_steps == 1 and not self.mixes_models) or step < self.warmup_steps

    def compresses_gradients(self, step: int) -> bool:
        """Whether those gradients go through the compressor (after the warm-up)."""
        return self.local_steps == 1 and not self.mixes_models and step >= self.warmup_steps

    def syncs_after(self, local_count: int) -> bool:
        """Whether the models are averaged after local_count local steps since the last average."""
        return (self.local_steps > 1 or self.mixes_models) and local_count >= self.local_steps


@dataclasses.dataclass
class Progress:
    """Where a worker is in its schedule: what ``state_dict()`` saves so a run resumes exactly.

    Attributes:
        step: ``step()`` calls completed.
        round: model averages done.
        local_count: local steps since the last model average.
    """

    step: int = 0
    round: int = 0
    local_count: int = 0
