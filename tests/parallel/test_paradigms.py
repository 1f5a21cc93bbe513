"""Gossip (topology=...) and Overlap-Local-SGD (overlap=True) under a real horovodrun (Gloo, CPU,
4 processes): one launch runs every check in paradigms_worker.py on every rank."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parallel.launch import run_checks

WORKER = Path(__file__).with_name("paradigms_worker.py")
MIN_CHECKS = 11


@pytest.mark.timeout(300)
def test_gossip_and_overlap_checks_on_every_rank():
    run_checks(WORKER, 4, MIN_CHECKS)
