"""hvd_qpr.DistributedOptimizer under a real horovodrun (Gloo, CPU): one launch per world size
runs every check in optimizer_worker.py on every rank."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parallel.launch import run_checks

WORKER = Path(__file__).with_name("optimizer_worker.py")
MIN_CHECKS = 19


@pytest.mark.timeout(300)
@pytest.mark.parametrize("np_", [2, 3, 4])
def test_optimizer_checks_on_every_rank(np_):
    run_checks(WORKER, np_, MIN_CHECKS)
