"""Dead-code elimination."""
from __future__ import annotations

from ..ir.graph import Graph
from .report import PassStats


def dce(graph: Graph) -> PassStats:
    """nodes no output depends on  ->  (removed); unused weights are dropped with them."""
    stats = PassStats()
    stats.rewritten = graph.remove_dead()
    return stats
