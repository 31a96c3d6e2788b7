"""Where a plan's replay spends its time inside its CUDA graph: each kernel's device start and end as the graph runs
them (with PDL a kernel starts before the one before it ends), attributed to the plan's calls and summed by role.

``common.kernels_launched`` and ``decode.call_times`` time the calls outside the graph (one after another, or each
alone and cold); neither shows what a kernel costs the step in its chain, where its weight loads may overlap the kernel
before it. Here a kernel's *marginal* time is how much later the replay's running end is once it has run
(``end_i - max(end_0 .. end_i-1)``): the marginals of a replay sum to its span, first start to last end. Its *lead* is
how long it started before its predecessor ended (PDL's overlap; negative: a gap).

The graph's kernels are matched to the calls by order: one run of the calls outside the graph, a marker kernel
(``torch.cuda._sleep``'s ``spin_kernel``) after each, counts each call's launches; a replay then launches the same
sequence. Where the counts do not add up (a call launching differently inside the graph), only the spans are given.

    from step_timeline import step_timeline
    step_timeline(plan)   -> {"replay_us", "kernels", "by_role": {role: [calls, us dur, us marginal, us lead]}, "top": [...]}
"""
from __future__ import annotations

import json
import os
import re
import statistics
import tempfile

import torch

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
MARKER = "spin_kernel"  # torch.cuda._sleep's kernel
ROLES = (("qkv", r"q_proj|k_proj|v_proj|qkv|to_q|to_k|to_v|c_attn"), ("o", r"o_proj|to_out|attn\.c_proj"),
         ("gate/up", r"gate_proj|up_proj"), ("down", r"down_proj"), ("fc1", r"ff\.net\.0|fc1|mlp\.c_fc"),
         ("fc2", r"ff\.net\.2|fc2|mlp\.c_proj"), ("head", r"lm_head|embed_tokens|proj_out"))
# (a GEMM's role by its weight's name: Llama-family, diffusers DiT / PixArt and GPT-2 names)


def call_label(call) -> str:
    """A call's role: a GEMM's by its weight's name (qkv, o, gate/up, down, head; else the weight's last part), other
    calls by their kind (attention, rope_kv, pointwise, ...)."""
    n = call.group.nodes[-1]
    if call.kind in ("gemm", "matmul") and len(n.inputs) > 1 and n.inputs[1].op == "WEIGHT":
        name = n.inputs[1].attrs.get("name", "")
        for role, pattern in ROLES:
            if re.search(pattern, name):
                return role
        return "gemm:" + name.rsplit(".", 2)[-2] if "." in name else "gemm:" + name
    return call.kind


def device_events(trace: dict) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of every kernel / copy / memset of a chrome trace, in start order."""
    evs = [(e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
           for e in trace.get("traceEvents", []) if e.get("cat") in DEVICE_CATS and e.get("ph") == "X"]
    return sorted(evs, key=lambda e: e[1])


def launch_counts(events: list[tuple[str, float, float]], calls: int) -> list[int] | None:
    """Each call's device activities from a run of the calls with a MARKER kernel after each; None where the markers do
    not split it into ``calls`` pieces."""
    counts, n = [], 0
    for name, _, _ in events:
        if MARKER in name:
            counts.append(n)
            n = 0
        else:
            n += 1
    return counts if len(counts) == calls and n == 0 else None


def timeline(events: list[tuple[str, float, float]], counts: list[int] | None, labels: list[str], replays: int) -> dict:
    """The replays' device activities (``events``, ``replays`` runs of the graph in order) against the calls' launch
    ``counts`` and ``labels``: median replay span and, where the counts match, per role [calls, summed median duration,
    marginal and lead in us] and the calls of largest marginal (module docstring)."""
    per = sum(counts) if counts else 0
    if not events or replays < 1 or (per and len(events) != per * replays):
        per = 0
    size = per or len(events) // max(replays, 1)
    runs = [events[r * size:(r + 1) * size] for r in range(replays)] if size else []
    spans = [run[-1][2] - run[0][1] for run in runs if run]
    out = {"replay_us": round(statistics.median(spans), 2) if spans else None, "kernels": size, "matched": bool(per)}
    if not per:
        return out
    owner = [k for k, c in enumerate(counts) for _ in range(c)]  # activity index -> call index
    dur, marg, lead = ([[0.0] * len(counts) for _ in runs] for _ in range(3))
    for r, run in enumerate(runs):
        end = run[0][1]
        prev_end = run[0][1]
        for i, (_, s, e) in enumerate(run):
            k = owner[i]
            dur[r][k] += e - s
            marg[r][k] += max(e, end) - end
            if i == 0 or owner[i - 1] != k:  # (a call's first launch against the last one before it)
                lead[r][k] += prev_end - s
            end, prev_end = max(end, e), e
    med = lambda table, k: statistics.median(row[k] for row in table)  # noqa: E731
    by_role: dict[str, list] = {}
    rows = []
    for k, label in enumerate(labels):
        if not counts[k]:
            continue
        d, m, ld = med(dur, k), med(marg, k), med(lead, k)
        acc = by_role.setdefault(label, [0, 0.0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += d
        acc[2] += m
        acc[3] += ld
        rows.append([k, label, round(d, 2), round(m, 2), round(ld, 2)])
    out["by_role"] = {role: [c, round(d, 1), round(m, 1), round(ld, 1)] for role, (c, d, m, ld) in
                      sorted(by_role.items(), key=lambda kv: -kv[1][2])}
    out["top"] = sorted(rows, key=lambda row: -row[3])[:12]  # [call, role, us dur, us marginal, us lead]
    return out


def _profiled(fn) -> list[tuple[str, float, float]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            return device_events(json.load(fh))


def step_timeline(plan, replays: int = 20) -> dict:
    """``timeline`` of ``plan``'s CUDA graph, ``replays`` replays under the profiler; {} without a GPU or a graph, or
    {"error": ...} where profiling fails (a diagnostic: what else a bench measured stands)."""
    if not torch.cuda.is_available() or not getattr(plan.stats, "cuda_graph", False):
        return {}
    try:
        for call in plan.calls:  # (warm: nothing compiles under the profiler)
            call.run()
        plan.replay()
        torch.cuda.synchronize()

        def calls_marked():
            for call in plan.calls:
                call.run()
                torch.cuda._sleep(1)

        counts = launch_counts(_profiled(calls_marked), len(plan.calls))
        events = _profiled(lambda: [plan.replay() for _ in range(replays)])
        return timeline(events, counts, [call_label(c) for c in plan.calls], replays)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def summary(t: dict) -> str:
    """One line: the replay and each role's marginal us (calls); "" for an empty timeline (no GPU)."""
    if not t:
        return ""
    if "error" in t:
        return t["error"]
    if not t.get("by_role"):
        return f"replay {t['replay_us']} us, {t['kernels']} kernels (calls not matched)"
    roles = ", ".join(f"{role} {m:.0f} ({c})" for role, (c, _, m, _) in t["by_role"].items())
    return f"replay {t['replay_us']} us: marginal us by role: {roles}"
