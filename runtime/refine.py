"""A decode plan's GEMM decisions made again inside the plan (``KILN_REFINE``: on for plans on a GPU by default, "0"
turns it off, "1" runs it on the CPU too, "all" takes a GPU plan's warm GEMM decisions too: ``warm``). Measured on an
H100 (bench/NOTES.md, session 30), one process each: the 1B bf16 at batch 1 922 -> 972 tok/s (the o projection's
unsplit skinny GEMV taken over cuBLASLt, which tied alone), the 1B w4a16 with the whole-K WORDS tiles 1,750 -> 1,784;
~8-11 s more on a plan's first build, once (then from the cache).

The tuner times a decode GEMM's candidates alone, after the L2 is flushed (codegen/tuning.py). In the plan each runs in
a chain of PDL launches and reads its first weight words before its wait while the kernel before it finishes, so the
step may rank the candidates otherwise (bench/NOTES.md, session 30: the tuner's misses so far; bench/decode_refine.py
asks the same question by building whole plans again). Here, once a plan's first call list is built: for each cold GEMM
decision its calls take (every layer's qkv shares one), each candidate the tuner measured within MARGIN of its choice
(launch charges included, at most MAX_ALTS; and its NORM_POST twin: TWINS) is swapped into those calls and the list
captured as a CUDA graph (on the CPU: run as a list) — the workspace and counters of every candidate were planned before
the tuner chose — and its outputs are compared with the plan's (CHECK_TOL). The graphs' replays are timed interleaved,
ROUNDS rounds of REPS, the median of the rounds' medians, a second capture of the plan's own calls giving the noise. Of
the alternatives that gain more than MIN_GAIN of the step and twice the noise, the one gaining most is taken, and the
rest are timed again around it (those within KEEP of the step, and the choice it replaced), at most PASSES times:
neighbours in the PDL chain interact (bench/NOTES.md, session 36: with the 1B's down unsplit, its qkv's and gate/up's
prologue-norm twins gained 10-26 us a step; taken together with the down's 8-split tile they lost ~20 us). The set's
calls and graph end swapped. Each decision looked at is kept as the tuner's refinement (``Tuner.refine``: in the cache's
"refined" entries, apart from the decision measured alone, and in an artifact's tuning.json), so a later plan takes it
without timing again and a plan with KILN_REFINE=0 never reads it.
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import torch

from ..codegen.tuning import EXTRA_LAUNCH_MS, cold
from ..errors import KilnError
from ..numerics import rel_err
from .kernel_calls import KernelCall, OutputSet, capture, run_calls

MARGIN = 0.25  # alternatives within this share of the choice's time alone
MAX_ALTS = 3  # alternatives a decision, fastest alone first
# and the choice's NORM_POST twin (the same tile with the norm's statistics summed in its main loop, or without), whatever
# its time alone: alone it pays the norm's statistics in each program, in the step the prologue's pass runs after the
# PDL wait (bench/NOTES.md, session 35: the 1B gate/up's twins 96-101 against 133 us a step, the one missed the cut)
TWINS = True
ROUNDS, REPS = 9, 30  # rounds, and replays of each variant a round at most: fewer where the step is long (REP_MS of
REP_MS, MIN_REPS = 15.0, 5  # replays a round, at least MIN_REPS: the 8B's 2.1 ms step 7, the 1B's 0.5 ms 30)
MIN_GAIN = 0.003  # share of the step an alternative must gain
PASSES = 4  # timings of the alternatives: each pass takes the one gaining most, the next times the rest again around it
KEEP = 0.02  # after a pass, the alternatives timed again: within this share of the step (worse), and the choice replaced
# warm decisions (KILN_REFINE=all): closer alternatives only, their time alone a better guide than a decode GEMV's cold
# one. Off by default: on an H100 the DiT-XL/2 one-image step kept every choice (none of its 512-row GEMMs' alternatives
# gained 0.3% of the step; 2.0 s more on the plan's first build: bench/NOTES.md, session 47)
WARM_MARGIN, WARM_MAX_ALTS = 0.08, 2
CHECK_TOL = 0.05  # a variant's outputs against the plan's, relative (16-bit roundings differ by ~1e-2)


def _mode() -> str:
    v = os.environ.get("KILN_REFINE", "cuda")
    if v not in ("cuda", "0", "1", "all"):
        raise KilnError(f"KILN_REFINE={v!r}: use cuda (the default: decode plans on a GPU), 1 (the CPU too), all (a GPU "
                        "plan's other GEMM decisions too) or 0 (never)")
    return v


def enabled(device: torch.device) -> bool:
    """``KILN_REFINE``: "cuda" (the default: a plan on a GPU), "1" (on the CPU too, under the interpreter: tests), "all"
    (a plan on a GPU, its warm GEMM decisions too: ``warm``), "0" (never). Read at each plan build, as bench/decode.py
    --ab-env sets it around a variant's calls."""
    v = _mode()
    return v == "1" or (v in ("cuda", "all") and device.type == "cuda")


def warm(device: torch.device) -> bool:
    """Whether the GEMM decisions the tuner measures warm (more than a decode's rows: a DiT step's 512-row projections)
    are made again in the plan as well (``KILN_REFINE=all``), among the candidates within WARM_MARGIN of the choice."""
    return _mode() == "all" and device.type == "cuda"


def choice(tuner, kind: str, what: dict, candidates: dict, device: torch.device, chosen: str) -> tuple[str, dict]:
    """The candidate a plan's call takes for a decision the tuner answered ``chosen``: the refinement's where one is
    known, with the call's fields for ``refine_set``: ``options``, what it may try (the choice, its ``alternatives``:
    within MARGIN for a cold decision, WARM_MARGIN for a warm one, and the refinement's choice), and ``key``.
    (``chosen``, {}) for what is not refined, or has no alternative to try."""
    if not enabled(device) or kind != "gemm" or kind in tuner.force or tuner.is_surveying:
        return chosen, {}
    if not cold(what) and not warm(device):
        return chosen, {}
    k = tuner.key_of(kind, what, device)
    r, d = tuner.refinement(k) or {}, tuner.decisions.get(k) or {}
    alts = alternatives(d, chosen) if cold(what) else alternatives(d, chosen, WARM_MARGIN, WARM_MAX_ALTS)
    options = {n: candidates[n] for n in dict.fromkeys([chosen, *alts, r.get("choice")]) if n in candidates}
    if len(options) == 1:
        return chosen, {}
    return (r["choice"] if r.get("choice") in options else chosen), {"options": options, "key": k}


def charged(d: dict) -> dict[str, float]:
    """Candidate -> the ms the tuner compared for decision ``d``: its time alone plus its launch charges."""
    extra = d.get("extra_launches", {})
    return {n: ms + EXTRA_LAUNCH_MS * extra.get(n, 0) for n, ms in d.get("ms", {}).items()}


def twin(name: str) -> str:
    """The NORM_POST twin's name of candidate ``name`` (lower.config_name: the configuration's values in order, and
    skinny.configs adds NORM_POST=True last): without the flag where it has it, else with it."""
    return name.removesuffix(",True") if name.endswith(",True") else name + ",True"


def alternatives(d: dict, chosen: str, margin: float | None = None, most: int | None = None) -> list[str]:
    """The candidates of decision ``d`` (the tuner's, with ``ms``) within ``margin`` (MARGIN) of ``chosen``'s time alone,
    launch charges included as the tuner compared them, fastest first, at most ``most`` (MAX_ALTS); then with TWINS the
    choice's NORM_POST twin where the tuner measured it and it is not among them."""
    t, margin, most = charged(d), MARGIN if margin is None else margin, MAX_ALTS if most is None else most
    if chosen not in t:
        return []
    out = [n for _, n in sorted((v, n) for n, v in t.items() if n != chosen and v <= t[chosen] * (1 + margin))][:most]
    return out + [twin(chosen)] if TWINS and twin(chosen) in t and twin(chosen) not in out else out


def _swapped(calls: list[KernelCall], at: list[int], name: str) -> list[KernelCall]:
    at = set(at)
    return [dataclasses.replace(c, run=c.options[name], choice=name) if i in at else c for i, c in enumerate(calls)]


def _runner(calls: list[KernelCall], device: torch.device, restore=None):
    """What replays ``calls``: a CUDA graph of them (captured as the plan captures), or None on the CPU (the list runs).
    With ``restore`` (``_state``'s), it runs first in each replay: every run of a variant starts from the same state."""
    if restore is None:
        return capture(calls, device) if device.type == "cuda" else None
    run = [SimpleNamespace(run=restore), *calls]
    return capture(run, device) if device.type == "cuda" else SimpleNamespace(replay=lambda: run_calls(run))


def _state(plan) -> Callable[[], None] | None:
    """What puts back, before each run of a variant, the inputs the plan writes in place and does not adopt (a pipeline
    step's latents, step index and scheduler state: each run would otherwise start where the last ended, its outputs
    differ from the plan's and its step index run past the schedule's tables); None where there are none. An adopted
    KV cache is written at the slot the inputs name, the same at every run."""
    targets = set(plan.graph.updates.values())
    bufs = [b for k, (n, b) in enumerate(zip(plan.graph.inputs, plan.input_buffers))
            if n.attrs["name"] in targets and k not in plan.adopted and b is not None]
    if not bufs:
        return None
    saved = [b.clone() for b in bufs]

    def restore() -> None:
        for b, v in zip(bufs, saved):
            b.copy_(v)
    return restore


def _run(variant: tuple) -> None:
    calls, graph = variant  # (graph: anything with replay(), a CUDA graph or a plan; None: run the calls)
    graph.replay() if graph is not None else run_calls(calls)


def _once_ms(variant: tuple, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _run(variant)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    _run(variant)
    return (time.perf_counter() - t0) * 1e3


def reps_for(variant: tuple, device: torch.device) -> int:
    """Replays a round for steps as long as ``variant``'s (its median of three runs): REP_MS of them, MIN_REPS..REPS. On
    an H100 the noise measured between two captures of one plan was 0.1-1.5 us a step with 30 replays a round (1B,
    0.5 ms) and 0.6 us with 30 at the 8B's 2.1 ms (bench/NOTES.md, session 36): far under MIN_GAIN's 1.5 / 6.4 us."""
    t = sorted(_once_ms(variant, device) for _ in range(3))[1]
    return max(MIN_REPS, min(REPS, round(REP_MS / max(t, 1e-6))))


def timed(variants: dict, device: torch.device, rounds: int | None = None, reps: int | None = None) -> dict[str, float]:
    """name -> ms of one run of each variant ((calls, graph): ``_run``): ``rounds`` (ROUNDS) rounds of ``reps`` (REPS)
    runs each, the variants taking turns, the median of the rounds' medians (so a drift of the machine biases none)."""
    times: dict[str, list] = {name: [] for name in variants}
    for _ in range(ROUNDS if rounds is None else rounds):
        for name, v in variants.items():
            t = sorted(_once_ms(v, device) for _ in range(REPS if reps is None else reps))
            times[name].append(t[len(t) // 2])
    return {name: sorted(r)[len(r) // 2] for name, r in times.items()}


def _outputs(plan, s: OutputSet) -> list[torch.Tensor]:
    # the set's floating-point outputs but the inputs the plan adopted (a KV cache: its new slot is in the logits too)
    adopted = {id(plan.env[plan.graph.inputs[k]]) for k in plan.adopted}
    return [o.detach().float().clone() for o in s.outputs if o.is_floating_point() and id(o) not in adopted]


def winners(ms: dict[str, float], names: dict[str, tuple[str, str]], min_gain: float | None = None) -> dict[str, str]:
    """Decision key -> the alternative to take: the one gaining most over the plan's own time (``ms["plan"]``), where it
    gains more than ``min_gain`` (MIN_GAIN) of it and twice the noise (``ms["again"]`` against ``ms["plan"]``).
    ``names``: variant name -> (key, alternative)."""
    base, noise = ms["plan"], abs(ms["again"] - ms["plan"])
    least = max((MIN_GAIN if min_gain is None else min_gain) * base, 2 * noise)
    best: dict[str, tuple[str, float]] = {}
    for name, (k, alt) in names.items():
        gain = base - ms[name]
        if gain > least and gain > best.get(k, ("", 0.0))[1]:
            best[k] = (alt, gain)
    return {k: alt for k, (alt, _) in best.items()}


def refine_set(plan, s: OutputSet) -> dict | None:
    """Make ``plan``'s cold GEMM decisions again in output set ``s`` (module docstring); a report, or None where nothing
    was looked at (KILN_REFINE off, no call to refine, every decision already refined, a plan whose capture failed, a
    plan with collectives: each rank would time its own variants, and their all-reduces would no longer pair up). An
    error on the way is a warning: the set keeps the calls and graph it had (it changes them last, at once)."""
    if not enabled(plan.device) or (plan.device.type == "cuda" and s.cuda_graph is None) or any(c.kind == "collective" for c in s.calls):
        return None
    try:
        return _refine_set(plan, s)
    except Exception as e:  # noqa: BLE001  (a refinement's failure leaves the plan as the tuner built it)
        warnings.warn(f"kiln: KILN_REFINE left the plan for {plan.bindings} as it was ({type(e).__name__}: {e})", stacklevel=3)
        return None


def _variants(plan, s: OutputSet, plan_v: tuple, live: list, at: dict, restore, want: list, failed: dict) -> tuple[dict, dict]:
    """A pass's variants: the plan's calls ``plan_v`` ("plan"), captured again ("again": the noise), and each (key,
    alternative) of ``live`` swapped into them, run once and checked against the plan's outputs ``want`` (a failure goes
    to ``failed`` and is not tried again); with the names of the swaps (variant name -> (key, alternative))."""
    variants, names = {"plan": plan_v, "again": (plan_v[0], _runner(plan_v[0], plan.device, restore))}, {}
    for k, alt in live:
        name = f"{k[:12]} {alt}"
        if name in failed:
            continue
        calls = _swapped(plan_v[0], at[k], alt)
        try:
            v = (calls, _runner(calls, plan.device, restore))
            _run(v)
            err = max((rel_err(got, ref) for got, ref in zip(_outputs(plan, s), want)), default=0.0)
        except Exception as e:  # noqa: BLE001  (a variant that cannot be captured or run: recorded, never taken)
            failed[name] = f"{type(e).__name__}: {e}"[:300]
            continue
        if err > CHECK_TOL:
            failed[name] = f"outputs differ from the plan's by {err:.3g} (relative)"
        else:
            variants[name], names[name] = v, (k, alt)
    return variants, names


def _refine_set(plan, s: OutputSet) -> dict | None:
    t0, tuner = time.perf_counter(), plan.target.tuner
    at: dict[str, list[int]] = {}
    for i, c in enumerate(s.calls):
        if c.options is not None:
            at.setdefault(c.key, []).append(i)
    todo = {k: [a for a in s.calls[i[0]].options if a != s.calls[i[0]].choice]  # (choice: alternatives, fastest first)
            for k, i in at.items() if k in tuner.decisions and tuner.refinement(k) is None}
    if not todo:
        return None
    restore = _state(plan)
    plan_v = (s.calls, s.cuda_graph if restore is None else _runner(s.calls, plan.device, restore))
    _run(plan_v)
    want, failed, steps, first = _outputs(plan, s), {}, [], None
    live = [(k, alt) for k, alts in todo.items() for alt in alts]  # (what the next pass times, in this order)
    reps = reps_for(plan_v, plan.device)
    for _ in range(PASSES):
        current = {k: plan_v[0][at[k][0]].choice for k in todo}
        variants, names = _variants(plan, s, plan_v, [kv for kv in live if kv[1] != current[kv[0]]], at, restore, want, failed)
        if not names:
            break
        ms = timed(variants, plan.device, reps=reps)
        first = first or (ms, names)
        take = winners(ms, names)
        if not take:
            break
        name = min((n for n, kv in names.items() if take.get(kv[0]) == kv[1]), key=ms.get)
        k, alt = names[name]
        plan_v = variants[name]  # (the one that gains most; the others are timed again around it)
        # timed again next pass: what came within KEEP of the step (a neighbour's change may tip it), and what it replaced
        live = [kv for n, kv in names.items() if ms[n] - ms["plan"] < KEEP * ms["plan"]] + [(k, current[k])]
        steps.append({"key": k[:12], "choice": alt, "gain_us": round((ms["plan"] - ms[name]) * 1e3, 3),
                      "noise_us": round(abs(ms["again"] - ms["plan"]) * 1e3, 3)})
    if restore is not None:  # (the state as the plan found it; its graph without the restoring copies)
        restore()
        if plan_v[0] is not s.calls:
            plan_v = (plan_v[0], _runner(plan_v[0], plan.device))
    if plan_v[0] is not s.calls:
        s.calls[:], s.cuda_graph = plan_v
    ms, names = first or ({"plan": 0.0, "again": 0.0}, {})
    for k in todo:
        step = {alt: round((ms[n] - ms["plan"]) * 1e3, 3) for n, (kk, alt) in names.items() if kk == k}
        tuner.refine(k, {"choice": s.calls[at[k][0]].choice, "alone": tuner.decisions[k]["choice"],
                         "step_delta_us": step, "step_ms": round(ms["plan"], 5)})
    plan.stats.phases["refine"] = round(time.perf_counter() - t0, 4)
    plan.stats.refine = {"step_ms": ms["plan"], "noise_ms": abs(ms["again"] - ms["plan"]), "steps": steps,
                         "first_pass_us": {n: round((ms[n] - ms["plan"]) * 1e3, 3) for n in names},  # (+: slower)
                         "failed": failed, "seconds": plan.stats.phases["refine"], "reps": reps}
    return plan.stats.refine
