"""M hvd_qpr.DistributedOptimizer instances trained in one process, in lockstep, over the
in-process communicator (tests/inprocess.py): each rank's forward and backward pass run in turn,
then the ranks' ``step()`` generators are driven together by :meth:`World.run`.

Example:
    >>> wrap = lambda model, ps: hvd_qpr.DistributedOptimizer(..., process_set=ps)
    >>> group = Lockstep(World(2), make_model, wrap)
    >>> group.train(range(8), batch, F.cross_entropy)
    >>> group.sync_models()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from tests.inprocess import World

Batch = tuple[torch.Tensor, torch.Tensor]


class Lockstep:
    """One model and one distributed optimizer a simulated rank.

    Args:
        world: the in-process world (M ranks).
        make_model: builds rank r's model (the same initial model on every rank, usually).
        make_optimizer: builds the distributed optimizer of a model, given its rank's backend
            as the ``process_set``.
    """

    def __init__(
        self,
        world: World,
        make_model: Callable[[int], torch.nn.Module],
        make_optimizer: Callable[[torch.nn.Module, object], torch.optim.Optimizer],
    ) -> None:
        self.world = world
        self.models = [make_model(r) for r in range(world.size)]
        self.opts = [make_optimizer(m, world.backend(r)) for r, m in enumerate(self.models)]
        # the configuration check runs first, as a collective of its own (the gradient hooks
        # of the first backward pass would otherwise wait on it one rank at a time)
        world.run([opt._qpr_config_round() for opt in self.opts])

    def step(self, index: int, batch: Callable[[int, int], Batch], loss_fn: Callable) -> None:
        """One training step on every rank: rank r trains on batch(r, index)."""
        for rank, (model, opt) in enumerate(zip(self.models, self.opts, strict=True)):
            opt.zero_grad()
            x, y = batch(rank, index)
            loss_fn(model(x), y).backward()
        self.world.run([opt._qpr_step() for opt in self.opts])

    def train(self, steps: Iterable[int], batch: Callable[[int, int], Batch], loss_fn) -> None:
        for index in steps:
            self.step(index, batch, loss_fn)

    def sync_models(self) -> None:
        self.world.run([opt._qpr_sync() for opt in self.opts])

    def state_dicts(self) -> list[dict]:
        """Every rank's optimizer state (an average in flight is finished on all first)."""
        self.world.run([opt._qpr_averager.settle() for opt in self.opts])
        return [opt.state_dict() for opt in self.opts]

    def flat_params(self, rank: int) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.models[rank].parameters()])
