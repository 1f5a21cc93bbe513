"""The bandwidth-limited benchmark's parts that need no root: workloads, the method registry, the
report (time to target, speedups, RESULTS.md sections)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import netsim  # noqa: E402
from netsim_methods import method, method_names, methods  # noqa: E402
from netsim_workloads import workload  # noqa: E402


@pytest.mark.parametrize(
    "name,features,train,test",
    [("digits", 64, 1437, 360), ("mnist1d", 40, 4000, 1000), ("synthetic", 32, 4000, 1000)],
)
def test_workloads(name, features, train, test):
    w = workload(name, hidden=16)
    assert w.x_train.shape == (train, features) and w.x_test.shape == (test, features)
    assert set(w.y_train.tolist()) == set(range(10))
    assert w.make_model()(w.x_test[:3]).shape == (3, 10)
    with pytest.raises(ValueError, match="choose one of"):
        workload("cifar")


def test_method_registry():
    assert {"parallel-sgd", "fp16", "pr-sgd", "qpr-4bit-packed-sum"} <= set(method_names())
    qpr, pr, sgd = methods(["qpr-2bit-elias", "pr-sgd", "parallel-sgd"], qpr_k=16, pr_k=32)
    assert (qpr.local_steps, pr.local_steps, sgd.local_steps) == (16, 32, 1)
    assert qpr.spec("allgather")["aggregation"] == "allgather" and qpr.elias
    assert sgd.spec()["aggregation"] == "allreduce"
    fixed = methods(["pr-sgd@8"], qpr_k=16, pr_k=32)[0]
    assert fixed.name == "pr-sgd@8" and fixed.local_steps == 8
    with pytest.raises(ValueError, match="registered methods"):
        method("qpr-3bit")
    with pytest.raises(ValueError, match="registered methods"):
        method("pr-sgd@x")


def curve(points):
    return [
        dict(time=t, step=i, wire_bytes=i, train_loss=1.0, test_accuracy=a)
        for i, (t, a) in enumerate(points)
    ]


def results():
    def run(name, k, points, wire):
        spec = dict(local_steps=k, aggregation="allreduce")
        r = dict(
            spec=spec,
            curve=curve(points),
            steps=10,
            wall_seconds=points[-1][0],
            wire_bytes=wire,
            final_accuracy=points[-1][1],
        )
        return name, r

    runs = dict(
        [
            run("parallel-sgd", 1, [(0, 0.1), (50, 0.8), (100, 0.95)], 1e9),
            run("pr-sgd", 8, [(0, 0.1), (10, 0.9), (20, 0.96)], 1e8),
            run("pr-sgd@32", 32, [(0, 0.1), (8, 0.95)], 5e7),
            run("qpr-4bit-auto", 8, [(0, 0.1), (2, 0.946), (4, 0.96)], 1e7),
            run("qpr-2bit-auto", 8, [(0, 0.1), (3, 0.5)], 1e6),
        ]
    )
    config = dict(
        workload="digits",
        workers=4,
        bandwidth_mbit=100.0,
        machine="m",
        parameters=10,
        epochs=1,
        steps_per_epoch=10,
        batch_size=32,
        lr=0.2,
        local_steps=8,
        pr_local_steps=8,
        eval_every=8,
        time_budget=float("inf"),
        started=0.0,
    )
    return dict(config=config, methods=runs, target_accuracy=0.945)


def test_time_to_target_and_speedups():
    rows = {row["name"]: row for row in netsim.summarize(results())}
    assert rows["parallel-sgd"]["t"] == 100 and rows["pr-sgd@32"]["t"] == 8
    assert rows["qpr-4bit-auto"]["vs_sgd"] == 50
    assert rows["qpr-4bit-auto"]["vs_pr"] == 4  # against the best PR-SGD (K=32: 8 s)
    assert rows["qpr-2bit-auto"]["t"] is None and rows["qpr-2bit-auto"]["vs_sgd"] is None
    table = netsim.markdown(results())
    assert "| qpr-4bit-auto | 8 | allreduce | 2.0 | 50.0x | 4.0x | 10.0 |" in table
    assert "| qpr-2bit-auto | 8 | allreduce | — | — | — |" in table


def test_results_md_sections_are_replaced_in_place(tmp_path):
    md = tmp_path / "RESULTS.md"
    netsim.update_results_md(md, "a", "first A\n")
    netsim.update_results_md(md, "b", "first B\n")
    netsim.update_results_md(md, "a", "second A\n")
    text = md.read_text()
    assert "first A" not in text and "second A" in text and "first B" in text
    assert text.index("second A") < text.index("first B")
