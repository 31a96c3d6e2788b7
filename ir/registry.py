"""The one decorator the importers and the exporter use to fill their name -> function tables, and the merge
of the tables of several handler modules."""
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


def merged(*tables: dict) -> dict:
    """One table from the tables of several handler modules; a name registered twice is a bug."""
    out: dict = {}
    for t in tables:
        twice = sorted(set(out) & set(t))
        if twice:
            raise RuntimeError(f"handlers registered twice: {', '.join(twice)}")
        out.update(t)
    return out
