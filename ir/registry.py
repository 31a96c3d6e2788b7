"""The one decorator the importers and the exporter use to fill their name -> function tables."""
from __future__ import annotations


def registrar(table: dict):
    """``handles = registrar(HANDLERS)``; then ``@handles("a", "b")`` puts the function in ``table`` under each name."""
    def register(*names):
        def deco(fn):
            for n in names:
                table[n] = fn
            return fn
        return deco
    return register
