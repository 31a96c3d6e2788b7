"""kiln.runtime.memory: plans on random interval sets are valid (no two live buffers share a byte),
aligned, no larger than the sum of the buffers and no smaller than the live bytes at any step."""

import random

import pytest

from kiln.runtime.memory import ALIGN, BufferPlan, Interval, check_plan, plan_memory


def aligned(n: int) -> int:
    return -(-max(n, 1) // ALIGN) * ALIGN


def random_intervals(rng: random.Random) -> list[Interval]:
    n = rng.randint(1, 30)
    out = []
    for key in range(n):
        start = rng.randint(0, 40)
        size = rng.choice([0, 1, ALIGN, ALIGN + 1, rng.randint(1, 5000), rng.randint(1, 200_000)])
        out.append(Interval(key=1000 + 7 * key, size=size, start=start, end=start + rng.randint(0, 15)))
    return out


def live_bytes(intervals, step) -> int:
    return sum(aligned(iv.size) for iv in intervals if iv.start <= step <= iv.end)


def extents_overlap(plan: BufferPlan, a: Interval, c: Interval) -> bool:
    """Aligned byte ranges [offset, offset + aligned size) of a and c intersect."""
    a0, c0 = plan.offsets[a.key], plan.offsets[c.key]
    return a0 < c0 + aligned(c.size) and c0 < a0 + aligned(a.size)


@pytest.mark.parametrize("seed", range(4))
def test_random_plans_are_valid(seed):
    rng = random.Random(seed)
    for _ in range(100):
        ivs = random_intervals(rng)
        plan = plan_memory(ivs)
        check_plan(plan, ivs)
        assert set(plan.offsets) == {iv.key for iv in ivs}
        assert plan.sizes == {iv.key: iv.size for iv in ivs}
        assert all(off % ALIGN == 0 for off in plan.offsets.values())
        assert plan.total_bytes == sum(aligned(iv.size) for iv in ivs)
        assert plan.peak_bytes <= plan.total_bytes
        assert plan.peak_bytes >= max(live_bytes(ivs, t) for t in range(0, 60))
        assert plan.peak_bytes == max(plan.offsets[iv.key] + aligned(iv.size) for iv in ivs)
        for i, a in enumerate(ivs):  # stronger than check_plan: the aligned extents too
            for c in ivs[i + 1:]:
                if not (a.end < c.start or c.end < a.start):
                    assert not extents_overlap(plan, a, c), (a, c)


def test_check_plan_catches_an_overlap():
    ivs = [Interval(1, 300, 0, 4), Interval(2, 300, 3, 6), Interval(3, 300, 5, 9)]
    plan = plan_memory(ivs)
    check_plan(plan, ivs)
    plan.offsets[2] = plan.offsets[1] + 256  # 1 and 2 are both alive at steps 3..4
    with pytest.raises(AssertionError, match="buffers 1 and 2 overlap"):
        check_plan(plan, ivs)


def test_a_chain_reuses_memory():
    """a -> b -> c: a is dead when c is written, so c takes a's bytes."""
    ivs = [Interval(10, 1000, 0, 1), Interval(11, 1000, 1, 2), Interval(12, 1000, 2, 3)]
    plan = plan_memory(ivs)
    check_plan(plan, ivs)
    assert plan.offsets[12] == plan.offsets[10] != plan.offsets[11]
    assert plan.peak_bytes == 2 * aligned(1000) < plan.total_bytes == 3 * aligned(1000)


def test_disjoint_lifetimes_share_one_buffer_and_overlapping_ones_stack():
    same = [Interval(k, 4096, 2 * k, 2 * k + 1) for k in range(6)]
    assert plan_memory(same).peak_bytes == 4096
    alive = [Interval(k, 100 * (k + 1), 0, 9) for k in range(5)]
    assert plan_memory(alive).peak_bytes == sum(aligned(iv.size) for iv in alive)


def test_summary():
    ivs = [Interval(1, 5000, 0, 2), Interval(2, 3000, 1, 3), Interval(3, 5000, 3, 5), Interval(4, 10, 5, 6)]
    plan = plan_memory(ivs)
    s = plan.summary()
    assert set(s) == {"buffers", "planned_peak_bytes", "sum_of_intermediates_bytes", "saving"}
    total = sum(aligned(iv.size) for iv in ivs)
    assert s["buffers"] == 4
    assert s["planned_peak_bytes"] == plan.peak_bytes == aligned(5000) + aligned(3000)
    assert s["sum_of_intermediates_bytes"] == total
    assert s["saving"] == round(1 - plan.peak_bytes / total, 4) > 0


def test_empty_plan():
    plan = plan_memory([])
    assert plan.summary() == {"buffers": 0, "planned_peak_bytes": 0, "sum_of_intermediates_bytes": 0, "saving": 0.0}
