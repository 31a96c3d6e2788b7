"""Liveness-based buffer planning: intermediates share one arena when their lifetimes don't overlap.

Every intermediate value is an interval [first step, last step] of a given byte size. Buffers are
placed largest first at the lowest offset that overlaps no already-placed buffer whose interval
overlaps (greedy by size, as in TFLite's arena planner). The plan is computed per concrete shape
binding; kernels later write straight into ``arena[offset : offset + size]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir.types import ITEMSIZE

ALIGN = 256  # bytes; keeps every buffer aligned for vector loads and tensor-core tiles


@dataclass(frozen=True)
class Interval:
    key: int  # the value this buffer holds (a node id)
    size: int  # bytes
    start: int  # step that writes it
    end: int  # last step that reads it (inclusive)


@dataclass
class BufferPlan:
    offsets: dict[int, int] = field(default_factory=dict)  # key -> byte offset into the arena
    sizes: dict[int, int] = field(default_factory=dict)
    peak_bytes: int = 0  # arena size
    total_bytes: int = 0  # what every intermediate would take without reuse (aligned, like the arena)

    @property
    def saving(self) -> float:
        return 1.0 - self.peak_bytes / self.total_bytes if self.total_bytes else 0.0

    def summary(self) -> dict:
        return {"buffers": len(self.offsets), "planned_peak_bytes": self.peak_bytes,
                "sum_of_intermediates_bytes": self.total_bytes, "saving": round(self.saving, 4)}


def nbytes(shape, dtype: str) -> int:
    """Bytes of a tensor of ``shape`` (ints) and IR dtype ``dtype``."""
    n = ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


class Liveness:
    """The buffers of a launch list and their lifetimes: ``write`` when a step produces a buffer, ``read`` when
    a step (or a view read at that step) reads it; ``plan`` packs them into one arena."""

    def __init__(self):
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.sizes: dict[int, int] = {}

    def write(self, key: int, step: int, size: int) -> None:
        self.first[key] = self.last[key] = step
        self.sizes[key] = size

    def read(self, key: int | None, step: int) -> None:
        """``key`` is read at ``step`` (None, or a value that is no planned buffer: nothing to do)."""
        if key in self.last:
            self.last[key] = max(self.last[key], step)

    def intervals(self) -> list[Interval]:
        return [Interval(k, self.sizes[k], self.first[k], self.last[k]) for k in self.first]

    def plan(self) -> tuple[list[Interval], BufferPlan]:
        ivs = self.intervals()
        return ivs, plan_memory(ivs)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_memory(intervals: list[Interval]) -> BufferPlan:
    plan = BufferPlan()
    placed: list[tuple[int, int, Interval]] = []  # (offset, aligned size, interval), sorted by offset
    for iv in sorted(intervals, key=lambda v: (-v.size, v.start, v.key)):
        size = _align(max(iv.size, 1))
        offset = 0
        for off, sz, other in placed:  # sorted by offset: first gap that fits
            if other.end < iv.start or iv.end < other.start:
                continue  # lifetimes don't overlap: may share bytes
            if off - offset >= size:
                break
            offset = max(offset, off + sz)
        placed.append((offset, size, iv))
        placed.sort(key=lambda p: p[0])
        plan.offsets[iv.key] = offset
        plan.sizes[iv.key] = iv.size
        plan.peak_bytes = max(plan.peak_bytes, offset + size)
        plan.total_bytes += size
    return plan


def check_plan(plan: BufferPlan, intervals: list[Interval]) -> None:
    """Assert no two buffers that are alive at the same time share a byte (used by tests)."""
    ivs = sorted(intervals, key=lambda v: plan.offsets[v.key])
    for i, a in enumerate(ivs):
        for b in ivs[i + 1:]:
            a0, b0 = plan.offsets[a.key], plan.offsets[b.key]
            if b0 >= a0 + a.size:
                break
            if not (a.end < b.start or b.end < a.start):
                raise AssertionError(f"buffers {a.key} and {b.key} overlap in time and space")
