"""Sections of ``benchmarks/RESULTS.md``: each benchmark script owns the sections between its
``<!-- netsim:KEY -->`` markers and rewrites them in place, so reruns never duplicate them.

Example:
    >>> update_results_md(Path("/tmp/RESULTS.md"), "demo", "| a | b |\\n")
"""

from __future__ import annotations

import re
from pathlib import Path


def update_results_md(path: Path, key: str, section: str) -> None:
    """Replaces (or appends) the section between this key's markers in path."""
    begin, end = f"<!-- netsim:{key} -->", f"<!-- /netsim:{key} -->"
    text = (
        path.read_text()
        if path.exists()
        else (
            "# Bandwidth-limited benchmark results\n\nSections are written by "
            "`benchmarks/netsim.py`, one per workload, worker count and bandwidth.\n\n"
        )
    )
    block = f"{begin}\n{section}{end}\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end) + "\n?", re.S)
    text = pattern.sub(lambda _: block, text) if begin in text else text + "\n" + block
    path.write_text(text)
