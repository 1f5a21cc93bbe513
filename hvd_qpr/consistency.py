"""The cross-rank configuration check: every rank compares what it was configured with against
every other rank's, once, before the first collective, and all raise the same error when they
differ (each rank holds the whole table, so none waits on another).

Example:
    >>> fields = [("local_steps", 8, "8"), ("compression", crc("qsgd"), "qsgd")]
    >>> collectives.run(check_same_on_all_ranks(comm, fields))
"""

from __future__ import annotations

import zlib

import torch

from hvd_qpr.collectives import Comm, Pipeline

Field = tuple[str, int, str]
"""(name, integer code compared across ranks, readable value for the error message)."""


def crc(text: str) -> int:
    """An integer code of a text, for a :data:`Field`."""
    return zlib.crc32(text.encode())


def check_same_on_all_ranks(comm: Comm, fields: list[Field]) -> Pipeline:
    """One allgather of the fields' codes (counted in ``comm_stats`` like every byte the library
    sends); ValueError on every rank naming the first field the ranks disagree on."""
    codes = torch.tensor([[code for _, code, _ in fields]], dtype=torch.int64)
    pending = comm.allgather(codes, "hvd_qpr.config")
    yield pending
    table = comm.wait(pending)
    for column, (field, _, value) in enumerate(fields):
        values = table[:, column].tolist()
        if len(set(values)) > 1:
            groups: dict[int, list[int]] = {}
            for r, v in enumerate(values):
                groups.setdefault(v, []).append(r)
            who = "; ".join(f"ranks {rs}" for rs in groups.values())
            raise ValueError(
                f"hvd_qpr.DistributedOptimizer: ranks disagree on {field} ({who} agree among "
                f"themselves); rank {comm.rank} has {value}. Every rank must wrap the same model "
                "with the same arguments"
            )
