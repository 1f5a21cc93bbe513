"""Size of Elias-coded QSGD payloads, in bits per coordinate, on real gradients and Gaussian data.

For each input and quantizer setting it reports the size of the ``hvd_qpr.ops.elias_encode``
stream (everything: header, scales, offset table and codes) and of the fixed-width packing
(``bits`` per value plus one float32 scale per bucket), and what the codes alone would take with
each Elias code (gamma, delta, omega; lengths computed exactly from the levels), against QSGD's
bound for s ~ sqrt(d) with l2 scaling (Alistarh et al., NeurIPS 2017, Theorem 3.2: at most
2.8 d + 32 bits a bucket of d values).

Inputs: the gradients of a small MLP on scikit-learn's digits (at initialisation and after 200
SGD steps), and standard Gaussian values.

Example::

    python benchmarks/elias_sizes.py --json benchmarks/results/elias_sizes.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

import hvd_qpr.ops as ops
import hvd_qpr.reference as ref

# (bits, bucket_size, norm): the defaults, a ternary/2-bit setting, and s = 31 ~ sqrt(1024)
SETTINGS = ((4, 512, "max"), (4, 512, "l2"), (2, 512, "l2"), (8, 512, "l2"), (6, 1024, "l2"))


def floor_log2(v: torch.Tensor) -> torch.Tensor:
    return (v.double().log2() + 1e-9).floor().long()


def gamma_bits(v: torch.Tensor) -> torch.Tensor:
    return 2 * floor_log2(v) + 1


def delta_bits(v: torch.Tensor) -> torch.Tensor:
    n = floor_log2(v)
    return n + 2 * floor_log2(n + 1) + 1


def omega_bits(v: torch.Tensor) -> torch.Tensor:
    length = torch.ones_like(v)
    n = v.clone()
    while bool((n > 1).any()):
        more = n > 1
        length = length + torch.where(more, floor_log2(n) + 1, 0)
        n = torch.where(more, floor_log2(n), n)
    return length


CODES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gamma": gamma_bits,
    "delta": delta_bits,
    "omega": omega_bits,
}


def code_bits(q: ops.QuantizedTensor, code: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Bits of the per-bucket codes (gap, sign, level) of q with one Elias code."""
    levels = ref.levels(q)
    nb = q.scales.numel()
    padded = torch.cat([levels, levels.new_zeros(nb * q.bucket_size - q.numel)])
    rows, cols = padded.view(nb, q.bucket_size).nonzero(as_tuple=True)
    prev = torch.cat([cols.new_tensor([-1]), cols[:-1]])
    first = torch.cat([torch.tensor([True]), rows[1:] != rows[:-1]])
    gaps = cols - torch.where(first, -1, prev)
    magnitudes = levels[rows * q.bucket_size + cols].abs()
    return int((code(gaps) + 1 + code(magnitudes)).sum())


def mlp_gradients(steps: int) -> torch.Tensor:
    """Flattened gradients of a 64-256-256-10 MLP on digits after `steps` SGD steps."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for step in range(steps + 1):
        batch = torch.randint(0, len(y), (64,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        if step < steps:
            opt.step()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def measure(name: str, x: torch.Tensor) -> list[dict]:
    rows = []
    for bits, d, norm in SETTINGS:
        q = ops.quantize(x, bits, d, norm, seed=1)
        stream = ops.elias_encode(q)
        row = {
            "input": name,
            "numel": x.numel(),
            "bits": bits,
            "s": q.levels_max,
            "bucket_size": d,
            "norm": norm,
            "nonzero_fraction": float((ref.levels(q) != 0).double().mean()),
            "stream_bits_per_value": stream.numel() * 8 / x.numel(),
            "packed_bits_per_value": (q.packed.numel() + 4 * q.scales.numel()) * 8 / x.numel(),
        }
        for code, fn in CODES.items():
            row[f"{code}_code_bits_per_value"] = code_bits(q, fn) / x.numel()
        stream_code_bits = int.from_bytes(bytes(stream[24:32].tolist()), "little")
        assert stream_code_bits == round(row["gamma_code_bits_per_value"] * x.numel())
        row["qsgd_bound_bits_per_value"] = (2.8 * d + 32) / d
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    inputs = {
        "MLP gradient (init)": mlp_gradients(0),
        "MLP gradient (200 steps)": mlp_gradients(200),
        "Gaussian": torch.randn(2**20, generator=torch.Generator().manual_seed(0)),
    }
    rows = [row for name, x in inputs.items() for row in measure(name, x)]
    header = (
        "| input | bits (s) | d | norm | nonzero | stream | packed | gamma | delta | omega |"
        " bound s~sqrt(d) |"
    )
    print(header)
    print("|" + "---|" * 11)
    for r in rows:
        near_sqrt_d = abs(r["s"] - r["bucket_size"] ** 0.5) <= 0.1 * r["bucket_size"] ** 0.5
        bound = f"{r['qsgd_bound_bits_per_value']:.2f}" if near_sqrt_d else "-"
        print(
            f"| {r['input']} ({r['numel']}) | {r['bits']} ({r['s']}) | {r['bucket_size']} | "
            f"{r['norm']} | {r['nonzero_fraction']:.3f} | {r['stream_bits_per_value']:.3f} | "
            f"{r['packed_bits_per_value']:.3f} | {r['gamma_code_bits_per_value']:.3f} | "
            f"{r['delta_code_bits_per_value']:.3f} | {r['omega_code_bits_per_value']:.3f} | "
            f"{bound} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
