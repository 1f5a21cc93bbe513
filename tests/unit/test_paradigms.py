"""Topologies, CHOCO's least-squares step, the Overlap-Local-SGD arithmetic and the schedule of
model mixing, without Horovod launches (the collectives are in tests/parallel)."""

from __future__ import annotations

import math

import pytest
import torch

import hvd_qpr
from hvd_qpr.compression import Compression
from hvd_qpr.gossip import least_squares_step, make_topology
from hvd_qpr.overlap import OverlapState
from hvd_qpr.schedule import SyncSchedule


def _expected_ring(m: int) -> torch.Tensor:
    w = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        for j in (i - 1, i, i + 1):
            w[i, j % m] = 1 / 3
    return w


@pytest.mark.parametrize("m", [3, 5, 8, 13])
def test_ring_is_one_third_to_self_and_each_neighbour(m):
    t = make_topology("ring", m)
    assert torch.allclose(t.weights(0), _expected_ring(m))
    assert t.neighbors(0, 0) == [1, m - 1] and t.period == 1
    # eigenvalues (1 + 2 cos(2 pi k / m)) / 3: the gap is 1 - max(|lambda_2|, |lambda_min|)
    eig = [(1 + 2 * math.cos(2 * math.pi * k / m)) / 3 for k in range(1, m)]
    assert t.spectral_gap() == pytest.approx(1 - max(abs(e) for e in eig), abs=1e-9)


def test_torus_exponential_and_one_peer_graphs():
    torus = make_topology("torus", 12)  # 3 x 4
    assert torus.neighbors(0, 0) == [1, 3, 4, 8]
    assert torus.weights(0)[0, 0] == pytest.approx(0.2)
    exp = make_topology("exponential", 10)  # hops 1, 2, 4, 8 both ways
    assert exp.neighbors(0, 0) == [1, 2, 4, 6, 8, 9]
    one = make_topology("one-peer", 8)
    assert one.period == 3
    assert [one.neighbors(5, r) for r in range(4)] == [[4], [7], [1], [4]]
    assert one.all_neighbors(5) == [1, 4, 7]
    # the hypercube's log2 M rounds average exactly; one round alone does not
    assert one.spectral_gap() == pytest.approx(1.0)
    assert make_topology("complete", 5).spectral_gap() == pytest.approx(1.0)
    for t in (torus, exp, one, make_topology("ring", 7)):
        for w in t.matrices:
            assert torch.allclose(w, w.T) and torch.allclose(
                w.sum(1), torch.ones(t.size, dtype=w.dtype)
            )
            assert bool((w >= 0).all())


def test_repr_and_describe_show_the_graph_and_gap():
    t = make_topology("ring", 8)
    assert repr(t) == "Topology('ring', M=8, degree=2, period=1, spectral_gap=0.1953)"
    lines = make_topology("one-peer", 4).describe().splitlines()
    assert lines[1] == " round 0 (mod 2):" and lines[2] == "  0: self 0.5, 1 0.5"
    assert "  0: self 0.5, 2 0.5" in lines


def test_user_matrix_and_bad_topologies():
    w = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.25, 0.25], [0.0, 0.25, 0.75]])
    t = make_topology(w, 3)
    assert t.name == "matrix" and t.neighbors(1, 0) == [0, 2]
    assert t.signature() != make_topology("ring", 3).signature()
    cases = [
        (("ring2", 4), "unknown topology 'ring2'"),
        (("torus", 7), "product of two factors"),
        (("one-peer", 6), "power of two"),
        ((torch.eye(3), 4), "must be 4x4"),
        ((torch.tensor([[1.0, 0.5], [0.5, 1.0]]), 2), "row 0 sums to 1.5"),
        ((torch.tensor([[0.7, 0.3], [0.2, 0.8]]), 2), "symmetric"),
        ((torch.tensor([[1.5, -0.5], [-0.5, 1.5]]), 2), "negative"),
        ((torch.tensor([[float("nan"), 0.5], [0.5, 0.5]]), 2), "NaN"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            make_topology(*args)


def test_consensus_distance():
    table = torch.tensor([[1.0, 1.0], [3.0, 1.0]])
    assert hvd_qpr.consensus_distance(table) == pytest.approx(1.0)
    assert hvd_qpr.consensus_distance(table[:1]) == 0.0


def test_least_squares_step_never_lengthens_the_error():
    g = torch.Generator().manual_seed(4)
    for bits in (2, 4):
        comp = Compression.qsgd(bits=bits)
        for n in (1, 511, 513, 4099):
            e = torch.randn(n, generator=g)
            q = comp.decode(comp.encode(e, seed=n), n)
            eta = least_squares_step(q, e)
            assert torch.linalg.vector_norm(e - eta * q) <= torch.linalg.vector_norm(e) + 1e-6
    top = Compression.topk(0.1)
    e = torch.randn(1000, generator=g)
    assert float(least_squares_step(top.decode(top.encode(e, 0), 1000), e)) == pytest.approx(1.0)
    assert float(least_squares_step(torch.zeros(3), torch.ones(3))) == 0.0


def test_contraction_orders_compressors_by_quality():
    C = Compression
    assert C.none.contraction() == 1.0 and C.fp16.contraction() == 1.0
    q2, q4, q8 = (C.qsgd(bits=b).contraction() for b in (2, 4, 8))
    assert 0.2 < q2 < q4 < q8 <= 1.0
    assert C.terngrad().contraction() == pytest.approx(q2)
    assert C.topk(0.01).contraction() == 0.01 and C.randomk(0.2).contraction() == 0.2
    assert C.qsgd(bits=4, norm="l2").contraction() < q4


def test_casts_have_exact_opaque_payloads():
    import horovod.torch as hvd

    from hvd_qpr.compression import as_compressor

    x = torch.randn(513)
    assert torch.equal(Compression.none.decode(Compression.none.encode(x, 0), 513), x)
    for comp in (Compression.fp16, as_compressor(hvd.Compression.fp16)):
        out = comp.decode(comp.encode(x, 0), 513)
        assert torch.equal(out, x.half().float())
    bf = Compression.bf16
    assert torch.equal(bf.decode(bf.encode(x, 0), 513), x.bfloat16().float())
    with pytest.raises(ValueError, match="cannot hold 513"):
        Compression.fp16.decode(torch.zeros(10, dtype=torch.uint8), 513)


def test_overlap_anchor_update_and_pull_back():
    state = OverlapState(pullback=0.25, anchor_momentum=0.5)
    state.start([torch.zeros(2)])
    state.update_anchor([torch.tensor([2.0, 4.0])])  # v = a - z, z = a
    assert torch.equal(state.anchor[0], torch.tensor([2.0, 4.0]))
    state.update_anchor([torch.tensor([2.0, 4.0])])  # v = 0.5 v + 0: the anchor overshoots
    assert torch.equal(state.anchor[0], torch.tensor([3.0, 6.0]))
    x = [torch.tensor([7.0, 10.0])]
    state.pull_back(x)
    assert torch.equal(x[0], torch.tensor([6.0, 9.0]))
    still = OverlapState(pullback=0.0)
    still.start([torch.ones(3)])
    y = [torch.tensor([0.1, 0.2, 0.3])]
    still.pull_back(y)
    assert torch.equal(y[0], torch.tensor([0.1, 0.2, 0.3]))  # alpha = 0: exactly unchanged
    for kwargs, message in (
        (dict(pullback=1.5), "pullback"),
        (dict(anchor_momentum=1.0), "anchor_momentum"),
        (dict(pullback=-0.1), "pullback"),
    ):
        with pytest.raises(ValueError, match=message):
            OverlapState(**kwargs)


def test_schedule_mixes_models_every_k_steps_including_one():
    gossip = SyncSchedule(local_steps=1, warmup_steps=2, mixes_models=True)
    assert [gossip.averages_gradients(t) for t in range(4)] == [True, True, False, False]
    assert not gossip.compresses_gradients(5)
    assert gossip.syncs_after(1)
    plain = SyncSchedule(local_steps=1)
    assert plain.averages_gradients(5) and not plain.syncs_after(1)
