"""Checkpoints written before the averagers existed (tests/fixtures/make_checkpoints.py, under
horovodrun with the code of that time) load into today's optimizer and resume bit for bit, on
the in-process communicator: ring all-reduce with and without error feedback, gossip, and
Overlap-Local-SGD with an average in flight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.fixtures import make_checkpoints as fixture
from tests.inprocess import World
from tests.lockstep import Lockstep


def _saved(name: str, rank: int) -> dict:
    return torch.load(fixture.OUT / f"{name}.rank{rank}.pt", weights_only=False)


@pytest.mark.parametrize("name", sorted(fixture.CONFIGS))
def test_old_checkpoint_resumes_bit_for_bit(name):
    saved = [_saved(name, r) for r in range(2)]

    def make_model(rank: int) -> torch.nn.Module:
        model = fixture.make_net()
        model.load_state_dict(saved[rank]["model"])
        return model

    group = Lockstep(
        World(2),
        make_model,
        lambda model, backend: fixture.build(model, fixture.CONFIGS[name], process_set=backend),
    )
    for opt, state in zip(group.opts, saved, strict=True):
        opt.load_state_dict(state["optimizer"])
    group.train(range(fixture.SAVE_AT, fixture.STEPS), fixture.batch, F.cross_entropy)
    for rank in range(2):
        final = saved[rank]["final"]
        for key, value in group.models[rank].state_dict().items():
            assert torch.equal(value, final[key]), f"{name}: rank {rank}'s {key} differs"


def test_a_checkpoint_of_another_paradigm_is_refused():
    saved = _saved("gossip_ring_4bit", 0)
    group = Lockstep(
        World(2),
        lambda rank: fixture.make_net(),
        lambda model, backend: fixture.build(
            model, fixture.CONFIGS["ring_packed_sum"], process_set=backend
        ),
    )
    with pytest.raises(ValueError, match="saved by gossip and this optimizer runs ring"):
        group.opts[0].load_state_dict(saved["optimizer"])
