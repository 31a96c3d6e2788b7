"""The compile report: what each pass did and declined, op histograms, time per phase, memory plan,
and (with verify on) the error against eager. Prints as a human report; ``to_dict()`` is JSON."""
from __future__ import annotations

import io
import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class PassStats:
    rewritten: int = 0
    declined: list[dict] = field(default_factory=list)  # {"reason": ..., "node": ..., ...}
    notes: list[str] = field(default_factory=list)  # what a rewrite did that the count does not say (weights merged, ...)
    rules: dict[str, int] = field(default_factory=dict)  # rewrites per rule, for passes made of rules

    def decline(self, reason: str, node=None, **extra) -> None:
        entry = {"reason": reason}
        if node is not None:
            entry["node"] = node.name
            if node.loc:
                entry["loc"] = node.loc
        entry.update(extra)
        self.declined.append(entry)


class Report:
    def __init__(self, listener=None):
        self.listener = listener  # called as listener(phase, seconds_or_None) when a phase starts / ends
        self.model: dict = {}
        self.phases: dict[str, float] = {}
        self.passes: dict[str, dict] = {}
        self.ops_before: dict[str, int] = {}
        self.ops_after: dict[str, int] = {}
        self.memory: dict | None = None
        self.verify: dict | None = None
        self.notes: list[str] = []  # things the user should know (a dim range torch narrowed, ...)

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        if self.listener:
            self.listener(name, None)
        ok = False
        try:
            yield
            ok = True
        finally:
            dt = time.perf_counter() - t0
            self.phases[name] = self.phases.get(name, 0.0) + dt
            if self.listener:
                self.listener(name, dt if ok else -1.0)

    def add_pass(self, name: str, stats: PassStats | None, seconds: float) -> None:
        if stats is None:
            self.passes[name] = {"enabled": False, "rewritten": 0, "declined": [], "seconds": 0.0}
        else:
            self.passes[name] = {"enabled": True, "rewritten": stats.rewritten, "declined": list(stats.declined),
                                 "seconds": round(seconds, 6)}
            if stats.notes:
                self.passes[name]["notes"] = list(stats.notes)
            if stats.rules:
                self.passes[name]["rules"] = dict(stats.rules)

    # ------------------------------------------------------------------ data
    def to_dict(self) -> dict:
        return {"model": self.model, "phases": {k: round(v, 6) for k, v in self.phases.items()},
                "passes": self.passes, "ops_before": self.ops_before, "ops_after": self.ops_after,
                "memory": self.memory, "verify": self.verify, "notes": self.notes}

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        r = cls()
        r.model = d.get("model", {})
        r.phases = d.get("phases", {})
        r.passes = d.get("passes", {})
        r.ops_before = d.get("ops_before", {})
        r.ops_after = d.get("ops_after", {})
        r.memory = d.get("memory")
        r.verify = d.get("verify")
        r.notes = list(d.get("notes", []))
        return r

    # ------------------------------------------------------------------ text
    def __rich_console__(self, console, options):
        from rich.markup import escape
        from rich.table import Table

        m = self.model
        title = m.get("name") or "model"
        yield f"[bold]kiln report: {escape(title)}[/bold]  ({escape(m.get('source', '?'))})"
        if m:
            yield escape(f"  parameters {m.get('parameters', 0):,}  weights {_bytes(m.get('weight_bytes', 0))}  "
                         f"inputs {', '.join(m.get('inputs', []))}  outputs {', '.join(m.get('outputs', []))}")
        if self.phases:
            yield "  compile time: " + "  ".join(f"{k} {v:.2f}s" for k, v in self.phases.items()) + \
                f"  (total {sum(self.phases.values()):.2f}s)"
        if self.passes:
            t = Table(title="passes", title_justify="left", show_edge=False)
            for col in ("pass", "rewritten", "by rule", "declined", "time", "reasons declined"):
                t.add_column(col)
            for name, p in self.passes.items():
                reasons = {}
                for d in p["declined"]:
                    reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
                why = "; ".join(f"{r} (x{n})" for r, n in reasons.items())
                rules = ", ".join(f"{r} {n}" for r, n in p.get("rules", {}).items())
                t.add_row(name, str(p["rewritten"]) if p["enabled"] else "off", escape(rules), str(len(p["declined"])),
                          f"{p['seconds'] * 1e3:.1f} ms", escape(why))
            yield t
            for name, p in self.passes.items():
                for note in p.get("notes", ()):
                    yield escape(f"  {name}: {note}")
        if self.ops_before or self.ops_after:
            t = Table(title="ops", title_justify="left", show_edge=False)
            t.add_column("op")
            t.add_column("before", justify="right")
            t.add_column("after", justify="right")
            for op in sorted(set(self.ops_before) | set(self.ops_after), key=lambda o: -self.ops_before.get(o, 0)):
                t.add_row(op, str(self.ops_before.get(op, 0)), str(self.ops_after.get(op, 0)))
            t.add_row("[bold]total[/bold]", str(sum(self.ops_before.values())), str(sum(self.ops_after.values())))
            yield t
        if self.memory:
            mem = self.memory
            yield escape(f"  memory plan at {mem.get('binding', {})}: {mem['buffers']} buffers, planned peak "
                   f"{_bytes(mem['planned_peak_bytes'])} vs {_bytes(mem['sum_of_intermediates_bytes'])} "
                   f"without reuse ({mem['saving']:.0%} saved)")
        for note in self.notes:
            yield escape(f"  note: {note}")
        if self.verify:
            v = self.verify
            yield escape("  verify vs eager: " + ", ".join(f"{k} rel err {e:.2e}" for k, e in v["rel_err"].items()))

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=120, color_system=None, force_terminal=False).print(self)
        return buf.getvalue().rstrip()

    __repr__ = __str__


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
