"""Time-to-accuracy of QPR-SGD, PR-SGD and parallel SGD on a real rate-limited network (run as
root).

Builds a cluster of M workers on this machine (DESIGN.md section 4): a bridge network namespace
and one namespace per worker, joined by veth pairs whose both ends are rate-limited with
``tc ... tbf`` (addresses from 198.18.0.0/15, the range set aside for benchmarks). For each
method it starts Horovod's rendezvous server in the bridge namespace and one rank per worker
namespace with the environment ``horovodrun --gloo`` would set, collects rank 0's curve, and
always tears everything down (on error and Ctrl-C too). It then writes a JSON of every curve,
PNG plots (accuracy against wall time and against wire bytes) and a section of
``benchmarks/RESULTS.md``: time to the target accuracy (parallel SGD's final accuracy minus 0.5
points), speedups over parallel SGD and over PR-SGD, wire bytes per worker, final accuracy.

Example::

    sudo .venv/bin/python benchmarks/netsim.py --workers 4 --bandwidth-mbit 100
    .venv/bin/python benchmarks/netsim.py --quick       # 2 workers, synthetic data, < 2 min
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from netsim_methods import Method, method_names, methods  # noqa: E402
from results_md import update_results_md  # noqa: E402

SUBNET = "198.18.0"
BRIDGE_ADDR = f"{SUBNET}.1"
DEFAULT_METHODS = [
    "parallel-sgd",
    "fp16",
    "pr-sgd",
    "qpr-4bit-packed-sum",
    "qpr-4bit-scatter-gather",
    "qpr-4bit-allgather",
    "qpr-2bit-packed-sum",
    "qpr-2bit-scatter-gather",
    "qpr-2bit-allgather",
    "qpr-4bit-elias",
    "qpr-2bit-elias",
]
QUICK_METHODS = ["parallel-sgd", "pr-sgd", "qpr-4bit-auto"]
TARGET_MARGIN = 0.005  # the target is parallel SGD's final accuracy minus 0.5 points
BASELINES = ("parallel-sgd", "pr-sgd")  # what --baseline takes from an earlier run


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class Cluster:
    """M worker namespaces on a rate-limited bridge; a context manager that always cleans up."""

    def __init__(self, workers: int, mbit: float) -> None:
        tag = f"q{os.getpid() % 100000}"
        self.workers, self.mbit, self.tag = workers, mbit, tag
        self.bridge = f"{tag}-br"
        self.names = [f"{tag}-w{i}" for i in range(workers)]
        self.addrs = [f"{SUBNET}.{10 + i}" for i in range(workers)]
        self._made: list[str] = []

    def _tbf(self, ns: str, dev: str) -> None:
        burst = max(32, int(self.mbit * 1e6 / 8 / 250 / 1024))  # >= 4 ms of traffic, in kB
        sh(
            "tc",
            "-n",
            ns,
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            f"{self.mbit}mbit",
            "burst",
            f"{burst}kb",
            "latency",
            "50ms",
        )

    def __enter__(self) -> Cluster:
        try:
            sh("ip", "netns", "add", self.bridge)
            self._made.append(self.bridge)
            sh("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.bridge, "addr", "add", f"{BRIDGE_ADDR}/24", "dev", "br0")
            sh("ip", "-n", self.bridge, "link", "set", "br0", "up")
            sh("ip", "-n", self.bridge, "link", "set", "lo", "up")
            hostname = socket.gethostname()
            for i, (ns, addr) in enumerate(zip(self.names, self.addrs, strict=True)):
                sh("ip", "netns", "add", ns)
                self._made.append(ns)
                veth = f"{self.tag}v{i}"
                sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                sh("ip", "link", "set", veth, "netns", self.bridge)
                sh("ip", "-n", self.bridge, "link", "set", veth, "master", "br0")
                sh("ip", "-n", self.bridge, "link", "set", veth, "up")
                sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                self._tbf(ns, "eth0")  # what the worker sends
                self._tbf(self.bridge, veth)  # what it receives
                # Horovod 0.28.1's process-set Gloo context binds to the address the hostname
                # resolves to (DESIGN.md 4): make it the worker's own inside its namespace.
                hosts = Path("/etc/netns") / ns / "hosts"
                hosts.parent.mkdir(parents=True, exist_ok=True)
                hosts.write_text(f"127.0.0.1 localhost\n{addr} {hostname} w{i}\n")
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def teardown(self) -> None:
        for ns in reversed(self._made):
            sh("ip", "netns", "pids", ns, check=False)
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self._made.clear()

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]


@contextlib.contextmanager
def rendezvous(cluster: Cluster) -> Iterator[int]:
    """Horovod's rendezvous server in the bridge namespace; yields its port."""
    code = (
        "import sys, time\n"
        "from horovod.runner.http.http_server import RendezvousServer\n"
        "from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts\n"
        f"hosts = parse_hosts({','.join(f'w{i}:1' for i in range(cluster.workers))!r})\n"
        "server = RendezvousServer()\n"
        "port = server.start()\n"
        f"server.init(get_host_assignments(hosts, {cluster.workers}))\n"
        "print(port, flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [*cluster.exec_prefix(cluster.bridge), sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the rendezvous server did not start: {line!r}")
        yield int(line)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_method(cluster: Cluster, m: Method, args: argparse.Namespace, out: Path) -> dict:
    """Trains m on the cluster; rank 0's result."""
    spec = dataclasses.asdict(m)
    worker_args = [
        "--spec",
        json.dumps(spec),
        "--workload",
        args.workload,
        "--hidden",
        str(args.hidden),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--eval-every",
        str(args.eval_every),
        "--time-budget",
        str(args.time_budget),
        "--link-mbit",
        str(args.bandwidth_mbit),
        "--seed",
        str(args.seed),
        "--out",
        str(out),
    ]
    procs = []
    with rendezvous(cluster) as port:
        for rank, ns in enumerate(cluster.names):
            env = dict(
                os.environ,
                PYTHONPATH=str(ROOT),
                HOROVOD_GLOO_RENDEZVOUS_ADDR=BRIDGE_ADDR,
                HOROVOD_GLOO_RENDEZVOUS_PORT=str(port),
                HOROVOD_CONTROLLER="gloo",
                HOROVOD_CPU_OPERATIONS="gloo",
                HOROVOD_GLOO_IFACE="eth0",
                HOROVOD_HOSTNAME=f"w{rank}",
                HOROVOD_RANK=str(rank),
                HOROVOD_SIZE=str(cluster.workers),
                HOROVOD_LOCAL_RANK="0",
                HOROVOD_LOCAL_SIZE="1",
                HOROVOD_CROSS_RANK=str(rank),
                HOROVOD_CROSS_SIZE=str(cluster.workers),
                OMP_NUM_THREADS="1",
            )
            cmd = [*cluster.exec_prefix(ns), sys.executable, str(HERE / "netsim_worker.py")]
            procs.append(
                subprocess.Popen(
                    cmd + worker_args,
                    env=env,
                    stdout=None if rank == 0 else subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
            )
        try:
            deadline = time.monotonic() + args.method_timeout
            errors = []
            for rank, p in enumerate(procs):
                _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                if p.returncode != 0:
                    errors.append(f"rank {rank} exited with {p.returncode}:\n{err[-3000:]}")
            if errors:
                raise RuntimeError(f"method {m.name} failed:\n" + "\n".join(errors))
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return json.loads(out.read_text())


# ---- report -------------------------------------------------------------------------------------


def time_to(curve: list[dict], target: float) -> float | None:
    """Wall time of the first evaluation at or above target, None if never."""
    for point in curve:
        if point["test_accuracy"] >= target:
            return point["time"]
    return None


def summarize(results: dict) -> list[dict]:
    """One row per method: time to target, speedups, bytes, final accuracy."""
    target = results["target_accuracy"]
    rows = []
    for name, r in results["methods"].items():
        rows.append(dict(name=name, spec=r["spec"], t=time_to(r["curve"], target), r=r))
    ref_t = {row["name"]: row["t"] for row in rows}
    base = ref_t.get("parallel-sgd")
    # PR-SGD at its best K among those run (pr-sgd, pr-sgd@K, ...)
    pr_times = [t for name, t in ref_t.items() if name.split("@")[0] == "pr-sgd" and t]
    pr = min(pr_times, default=None)
    for row in rows:
        t = row["t"]
        row["vs_sgd"] = base / t if t and base else None
        row["vs_pr"] = pr / t if t and pr else None
    return rows


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    missing = x is None or (isinstance(x, float) and math.isnan(x))
    return "—" if missing else format(x, spec) + suffix


def markdown(results: dict) -> str:
    c = results["config"]
    lines = [
        f"### {c['workload']}, {c['workers']} workers, {c['bandwidth_mbit']:g} Mbit/s"
        + (f" ({c['tag']})" if c.get("tag") else ""),
        "",
        f"{c['machine']}; MLP of {c['parameters']:,} parameters; {c['epochs']} epochs of "
        f"{c['steps_per_epoch']} steps a worker (batch {c['batch_size']}), SGD lr {c['lr']} "
        f"momentum 0.9; QPR K={c['local_steps']}, PR-SGD K={c['pr_local_steps']}; evaluation "
        f"every {c['eval_every']} steps, excluded from the time"
        + (f"; time budget {c['time_budget']:g} s" if math.isfinite(c["time_budget"]) else "")
        + (f"; parallel SGD and PR-SGD rows from {c['baseline']}" if c.get("baseline") else "")
        + f". Target: {results['target_accuracy']:.3f} (parallel SGD's final accuracy minus "
        "0.5 points). Written by `benchmarks/netsim.py` on "
        f"{time.strftime('%Y-%m-%d', time.gmtime(c['started']))}.",
        "",
        "| method | K | aggregation | time to target s | vs parallel SGD | vs best PR-SGD "
        "| wire MB a worker | s a step | final accuracy |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summarize(results):
        r, spec = row["r"], row["spec"]
        speedups = f"{fmt(row['vs_sgd'], '.1f', 'x')} | {fmt(row['vs_pr'], '.1f', 'x')}"
        lines.append(
            f"| {row['name']} | {spec['local_steps']} | {spec['aggregation']} "
            f"| {fmt(row['t'], '.1f')} | {speedups} "
            f"| {r['wire_bytes'] / 1e6:.1f} | {r['wall_seconds'] / max(1, r['steps']):.3f} "
            f"| {r['final_accuracy']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, stem: Path) -> list[Path]:
    """Accuracy against wall time and against wire bytes, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for key, label, scale, name in (
        ("time", "wall time (s, evaluation excluded)", 1.0, "time"),
        ("wire_bytes", "wire MB a worker", 1e-6, "bytes"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        colors = plt.cm.tab20.colors
        for i, (method, r) in enumerate(results["methods"].items()):
            points = [p for p in r["curve"] if p[key] > 0]  # a log axis has no zero
            style = "-" if method.startswith("qpr") else "--"
            ax.plot(
                [p[key] * scale for p in points],
                [p["test_accuracy"] for p in points],
                style,
                marker=".",
                color=colors[i % len(colors)],
                label=method,
            )
        ax.axhline(results["target_accuracy"], color="gray", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        c = results["config"]
        ax.set_title(f"{c['workload']}, {c['workers']} workers, {c['bandwidth_mbit']:g} Mbit/s")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


# ---- main ---------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--bandwidth-mbit", type=float, default=100.0, help="per worker, each way")
    p.add_argument("--workload", choices=["digits", "mnist1d", "synthetic"], default="digits")
    p.add_argument("--hidden", type=int, default=1024, help="MLP hidden width")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help=f"of {method_names()}")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    # lr tuned for parallel SGD on digits with 4 workers (0.02..0.5: 0.2 ends highest), then reused
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--local-steps", type=int, default=16, help="K of the QPR-SGD methods")
    p.add_argument("--pr-local-steps", type=int, default=16, help="K of PR-SGD")
    p.add_argument("--eval-every", type=int, default=16, help="a multiple of every K")
    p.add_argument("--time-budget", type=float, default=float("inf"), help="seconds a method")
    p.add_argument("--method-timeout", type=float, default=3600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--quick", action="store_true", help="2 workers, synthetic data, 3 methods")
    p.add_argument("--replot", type=Path, help="redo plots and table from a results JSON")
    p.add_argument("--tag", default="", help="suffix of the results' file names")
    p.add_argument(
        "--baseline",
        type=Path,
        help="take parallel-sgd and PR-SGD from this earlier run's JSON (same workers, bandwidth, "
        "workload, epochs, batch size, lr) instead of running them again",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.workers, args.workload, args.hidden, args.epochs = 2, "synthetic", 256, 2
        args.local_steps = args.pr_local_steps = args.eval_every = 8
        if args.methods == DEFAULT_METHODS:
            args.methods = QUICK_METHODS
    for m in methods(args.methods, args.local_steps, args.pr_local_steps):
        if args.eval_every % m.local_steps:
            p.error(f"--eval-every {args.eval_every} must be a multiple of {m.name}'s K")
    return args


def baseline_results(args: argparse.Namespace) -> dict:
    """parallel-sgd and PR-SGD rows (and the target) of an earlier run of the same setting."""
    earlier = json.loads(args.baseline.read_text())
    config = earlier["config"]
    for key in ("workers", "bandwidth_mbit", "workload", "epochs", "batch_size", "lr"):
        if config[key] != getattr(args, key):
            raise SystemExit(
                f"--baseline ran with {key}={config[key]!r}, this run has {getattr(args, key)!r}"
            )
    kept = {n: r for n, r in earlier["methods"].items() if n.split("@")[0] in BASELINES}
    config = dict(
        config,
        baseline=str(args.baseline.name),
        started=time.time(),  # this run's date; the baseline's is in its own file
        eval_every=args.eval_every,
        local_steps=args.local_steps,
        tag=args.tag,
    )
    return {"config": config, "methods": kept, "target_accuracy": earlier["target_accuracy"]}


def report(results: dict, stem: Path, results_md: Path) -> str:
    """Plots, the RESULTS.md section; returns the table."""
    section = markdown(results)
    images = "".join(f"![{p.stem}](results/{p.name})\n" for p in plot(results, stem))
    update_results_md(results_md, stem.name, section + "\n" + images)
    return section


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.replot:
        results = json.loads(args.replot.read_text())
        print(report(results, args.replot.with_suffix(""), args.results_md))
        return 0
    if os.geteuid() != 0:
        print("netsim.py needs root (network namespaces and tc); run it with sudo", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    chosen = methods(args.methods, args.local_steps, args.pr_local_steps)
    results: dict = {"config": {}, "methods": {}, "target_accuracy": None}
    if args.baseline:
        results = baseline_results(args)
        chosen = [m for m in chosen if m.name not in results["methods"]]
    elif "parallel-sgd" not in args.methods:
        raise SystemExit("--methods must include parallel-sgd (it sets the target accuracy)")
    chosen.sort(key=lambda m: m.name != "parallel-sgd")  # the target comes from it
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / (
        f"netsim_{args.workload}_{args.bandwidth_mbit:g}mbit_{args.workers}w"
        + ("_quick" if args.quick else "")
        + (f"_{args.tag}" if args.tag else "")
    )
    cluster = Cluster(args.workers, args.bandwidth_mbit)
    print(
        f"netsim: cluster {cluster.tag}, {args.workers} workers, {args.bandwidth_mbit:g} Mbit/s "
        f"tbf links, {args.workload}, methods {[m.name for m in chosen]}",
        flush=True,
    )
    with (
        cluster,
        tempfile.TemporaryDirectory() as tmp,
    ):
        for i, m in enumerate(chosen):
            print(f"[{i + 1}/{len(chosen)}] {m.name}", flush=True)
            r = run_method(cluster, m, args, Path(tmp) / f"{m.name}.json")
            results["methods"][m.name] = r
            if m.name == "parallel-sgd":
                results["target_accuracy"] = r["final_accuracy"] - TARGET_MARGIN
                results["config"] = dict(
                    workers=args.workers,
                    bandwidth_mbit=args.bandwidth_mbit,
                    workload=args.workload,
                    parameters=r["parameters"],
                    batch_size=args.batch_size,
                    epochs=args.epochs,
                    steps_per_epoch=r["steps_per_epoch"],
                    lr=args.lr,
                    local_steps=args.local_steps,
                    pr_local_steps=args.pr_local_steps,
                    eval_every=args.eval_every,
                    time_budget=args.time_budget,
                    seed=args.seed,
                    tag=args.tag,
                    machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    started=time.time(),
                )
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    section = report(results, stem, args.results_md)
    print("\n" + section, flush=True)
    print(f"wrote {stem.with_suffix('.json')}, plots, and {args.results_md}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
