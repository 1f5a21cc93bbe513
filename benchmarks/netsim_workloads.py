"""Workloads of the bandwidth-limited benchmark: real data from the package registry and a
synthetic task for quick runs. No downloads at run time.

Example:
    >>> w = workload("synthetic")
    >>> w.x_train.shape[1] == w.make_model().layers[0].in_features
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch


class MLP(torch.nn.Module):
    """Fully connected ReLU network: enough parameters that communication dominates."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.relu(x)
        return x


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    make_model: Callable[[], torch.nn.Module]


def digits(hidden: int) -> Workload:
    """scikit-learn's digits (1437 training, 360 test images of 8x8), MLP 64-h-h-10."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = order[:360], order[360:]
    return Workload(
        "digits", x[train], y[train], x[test], y[test], lambda: MLP([64, hidden, hidden, 10])
    )


def mnist1d(hidden: int) -> Workload:
    """MNIST-1D (Greydanus 2020), generated locally from the package's templates (no download):
    4000 training and 1000 test sequences of 40 values, MLP 40-h-h-10."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x, y = torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"])
    x_test = torch.tensor(data["x_test"], dtype=torch.float32)
    y_test = torch.tensor(data["y_test"])
    return Workload("mnist1d", x, y, x_test, y_test, lambda: MLP([40, hidden, hidden, 10]))


def synthetic(hidden: int) -> Workload:
    """Ten Gaussian clusters in 32 dimensions (4000 training, 1000 test points), MLP 32-h-h-10."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 32, generator=g) * 0.45  # overlapping: accuracy tops out near 0.9
    y = torch.randint(0, 10, (5000,), generator=g)
    x = centers[y] + torch.randn(5000, 32, generator=g)
    return Workload(
        "synthetic", x[:4000], y[:4000], x[4000:], y[4000:], lambda: MLP([32, hidden, hidden, 10])
    )


WORKLOADS: dict[str, Callable[[int], Workload]] = {
    "digits": digits,
    "mnist1d": mnist1d,
    "synthetic": synthetic,
}


def workload(name: str, hidden: int = 256) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {sorted(WORKLOADS)}")
    return WORKLOADS[name](hidden)
