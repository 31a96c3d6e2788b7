"""THE pass order. Each line says why the pass sits where it does. Any pass can be switched off by
name (``CompileConfig(disable=[...])``, ``kiln compile --disable-pass NAME``)."""
from __future__ import annotations

import os
import sys
import time

from ..ir.graph import Graph
from .dce import dce
from .report import Report

PIPELINE = [
    # the importers leave shape-only and assert-only values behind; drop them before anything reads the graph
    ("dce", dce),
]
PASS_NAMES = tuple(name for name, _ in PIPELINE)


def run_pipeline(graph: Graph, disable=(), report: Report | None = None) -> Graph:
    """Run every enabled pass in order; verify the graph after each. ``KILN_DEBUG=1`` prints the IR
    after each pass to stderr."""
    for name, fn in PIPELINE:
        if name in disable:
            if report is not None:
                report.add_pass(name, None, 0.0)
            continue
        t0 = time.perf_counter()
        stats = fn(graph)
        graph.toposort()
        graph.verify()
        if report is not None:
            report.add_pass(name, stats, time.perf_counter() - t0)
        if os.environ.get("KILN_DEBUG"):
            print(f"--- IR after {name} ---\n{graph!r}", file=sys.stderr)
    return graph
