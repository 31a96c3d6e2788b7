"""Per-shape choice between implementations of one kernel group, measured on the device.

A GEMM can run as kiln's Triton template (one of a few launch configurations, epilogue fused) or as
cuBLAS (``torch.mm``) followed by kiln's one-pass epilogue kernel; attention as kiln's flash kernel or
torch's SDPA. Which is faster depends on the shape and the GPU, so the executor asks a :class:`Tuner`
once per distinct (op, shapes, dtypes, attributes, device) — the *what* — and the tuner times every
candidate on the plan's own buffers and keeps the fastest. Candidates are timed as the plan runs them:
back-to-back runs replayed from a CUDA graph (so a candidate of two kernels is not charged two launch
latencies that the plan's graph does not pay), sampled round-robin across the candidates. A *what* marked
``"weights": "cold"`` (a decode GEMM: the plan streams each weight once per step, gigabytes per step against an L2
of tens of megabytes) is timed one run per sample after a write over more than the L2, so a weight that fits in
L2 is not measured L2-resident: back-to-back runs would rank the candidates by L2 bandwidth, not HBM's. So is one
marked ``"cache": "cold"`` (a decode attention: the step reads each layer's KV cache once, between the weights).

Choices are remembered three ways: in memory (a model with 28 identical blocks measures once), in the
on-disk cache (``tuning/<key>.json``: a second process skips the measurements), and in the artifact's
``tuning.json`` (``CompiledModel.save``; a loaded artifact replays them, on the same GPU and versions,
since the device fingerprint is part of the key). A candidate that fails to compile or run is recorded
with its error and never chosen; so is a GEMM candidate whose output on random inputs differs from the first
candidate's (``OutputCheck``: a kernel compiled wrong is not chosen for its speed).

Start-up. Most of a cold plan build is compiling the candidates' Triton kernels (each at its first launch) and then
the generated kernels that the CUDA graph capture's warm-up launches. So a plan on CUDA first *surveys*: it builds its
calls once with the tuner :meth:`Tuner.surveying`, when ``choose`` measures and remembers nothing but records each
decision it cannot answer from memory, the cache or the artifact and answers it provisionally (its first
candidate). If it recorded any, :func:`compile_ahead` then compiles every kernel that the surveyed candidates and
the survey's calls launch, all at once, in worker processes (``compile_pool.py``: Triton's Python front end holds
the GIL, so threads would take turns there); with ``KILN_COMPILE_WORKERS=0`` it runs the surveyed candidates from
threads instead (:func:`warm_in_parallel`). Then the plan builds its calls for real: the tuner measures as without
the survey, each compile now a hit in Triton's cache, and makes the same choices. A decision's candidates are still
run once from threads before they are timed (:func:`warm_in_parallel`), which compiles whatever the survey missed.
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

import torch

from . import compile_pool
from .cache import Cache, fingerprint, key

TIMING_REPS = 15  # timed samples per candidate (after 3 warm-up runs); the median counts
# on the CPU (the Triton interpreter: the tests), one sample a candidate and no warm-up run: the wall clock there picks
# nothing that matters, and each run of a kernel in Python costs the test suite seconds
CPU_TIMING_REPS = 1
CALLS_PER_SAMPLE = 5  # runs per sample, replayed from one CUDA graph
L2_FLUSH_BYTES = 256 << 20  # written before each sample of a cold measurement: more than any GPU's L2 (H200: 60 MB)
# threads that run a decision's candidates once before they are timed, so that their Triton compiles overlap: most of
# a compile (LLVM, ptxas: a subprocess) runs without the GIL, and a cold 1B generator spent 40 s of its 52 s to first
# token compiling ~90 candidates one after another (H200 machine, session 5). KILN_COMPILE_THREADS=1: one at a time
COMPILE_THREADS = int(os.environ.get("KILN_COMPILE_THREADS", "0") or 0) or min(8, os.cpu_count() or 1)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # kernels run in Python: nothing to compile ahead
# what a decode decision (a GEMM timed with cold weights, a decode attention) charges a candidate per kernel launch
# past its first (``launches``), on top of its measured time. Measured on the H200 (bench/NOTES.md, session 14, runs 2
# and 5): two plans of the 1B decode at batch 1 whose tuners differed mainly in a two-launch split-K reduction taken for 15
# GEMVs (near-ties when timed alone) ran 0.951 and 0.990 ms a step, ~2.6 us a launch more than the timing alone said;
# it also steadies the choice between processes where one- and two-launch forms time within the noise
EXTRA_LAUNCH_MS = 0.002
# Outputs compared (``OutputCheck``): a candidate whose output on random inputs differs from the first candidate's (a
# library's: cuBLAS, cuBLAS on the dequantized weight) by more than CHECK_TOL (relative, Frobenius) is refused with
# the figure, so a kernel that some GPU or Triton version compiles wrong is never chosen. Right candidates differ by
# their roundings (~1e-3 at bf16). CHECK_OUTPUTS: "cuda" (not the interpreter: there the kernels' own tests run the same
# code against float64, and every candidate run costs seconds), "always", "never"
CHECK_TOL = 0.05
CHECK_OUTPUTS = os.environ.get("KILN_CHECK_OUTPUTS", "cuda")
if CHECK_OUTPUTS not in ("cuda", "always", "never"):
    raise ValueError(f"KILN_CHECK_OUTPUTS={CHECK_OUTPUTS!r}: use cuda (the default: compare on the GPU), always or never")
CHECK_CHUNK = 16 << 20  # elements of the output compared at a time (float32 temporaries)
# A cold decode decision's candidates timed alone miss what a plan's chain gives them: launched with PDL, a kiln kernel
# starts while the kernel before it finishes and reads what no kernel writes (its first weight words, the cache's first
# tile) before its wait. That overlap is worth more than the candidates' differences alone show (bench/NOTES.md, session
# 29: the 4-bit peel, 1,558 -> 1,680 tok/s at the same choices). BEHIND_MB > 0 times each such candidate behind a
# predecessor streaming that many MB from HBM as a weight-streaming GEMV does (pdl.stream, PDL-launched), less the
# predecessor alone; the decisions are keyed by it. 0 (the default): alone, as before. Measured (bench/decode.py --ab-set
# tuning.BEHIND_MB=32, H100, session 32): the 1B w4a16 at batch 1 1,795 -> 1,761 tok/s (-1.9%; its gate/up chosen
# otherwise, 154 -> 162 us a step): off. KILN_REFINE (runtime/refine.py) re-decides in the step itself instead.
BEHIND_MB = 0


class OutputCheck(NamedTuple):
    """What a decision's candidates read and write, for comparing their outputs: ``inputs``, activation buffers filled
    with random values for the comparison; ``out``, the buffer each candidate writes (it may be one of the inputs: a
    residual written over); ``zero``, state each candidate must find zero (split-K counters); ``written``, more buffers
    the candidates write; ``value``: what is compared, from those (None: ``out``; an AQGEMM storing the next one's
    codes: the codes times their scales). All are restored after."""
    inputs: tuple
    out: torch.Tensor
    zero: tuple = ()
    written: tuple = ()
    value: Callable[[], torch.Tensor] | None = None

    def refusals(self, candidates: dict[str, Callable[[], object]], device: torch.device) -> dict[str, str]:
        """Candidate name -> why it is refused, for each whose output differs from the first's (the first that runs) by
        more than CHECK_TOL. Nothing where the first's output is not finite, or where the copies do not fit in memory.
        (A candidate that raises is left out: its timer records the error.)"""
        tensors = [*self.inputs, self.out, *self.written, *self.zero]
        try:
            saved = [t.clone() for t in tensors]
        except torch.cuda.OutOfMemoryError:
            return {}
        try:
            gen = torch.Generator(device=device).manual_seed(0)
            for t in self.inputs:
                t.copy_(torch.randn(t.shape, generator=gen, device=device))
            start = [t.clone() for t in (*self.inputs, self.out, *self.written)]
            return self._compare(candidates, start)
        except torch.cuda.OutOfMemoryError:
            return {}
        except Exception as e:  # (a tensor that cannot be written, ...: compared nothing, said so)
            warnings.warn(f"kiln: a tuning decision's outputs were not compared ({type(e).__name__}: {e})", stacklevel=2)
            return {}
        finally:
            for t, s in zip(tensors, saved):
                with contextlib.suppress(RuntimeError):  # (one that cannot be written was not)
                    t.copy_(s)

    def _compare(self, candidates: dict, start: list) -> dict[str, str]:
        ref, refused = None, {}
        for name, fn in candidates.items():
            for t, s in zip((*self.inputs, self.out, *self.written), start):
                t.copy_(s)
            for z in self.zero:
                z.zero_()
            try:
                fn()
            except Exception:  # (its timer runs it again and records the error)
                continue
            got = self.out if self.value is None else self.value()
            if ref is None:
                ref = (name, got.clone())
                if not all(bool(torch.isfinite(c).all()) for c in _chunks(ref[1])):
                    return {}
                continue
            err = _rel_err(got, ref[1])
            if not err <= CHECK_TOL:  # (NaN too)
                refused[name] = f"output on random inputs differs from {ref[0]}'s: relative error {err:.2e} > {CHECK_TOL}"
        return refused


def _chunks(t: torch.Tensor):
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), CHECK_CHUNK):
        yield flat[i:i + CHECK_CHUNK].float()


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    num = den = 0.0
    for g, w in zip(_chunks(got), _chunks(want)):
        num += float(((g - w) ** 2).sum())
        den += float((w ** 2).sum())
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


def checks_outputs(device: torch.device) -> bool:
    """Whether decisions on ``device`` compare their candidates' outputs (CHECK_OUTPUTS)."""
    return CHECK_OUTPUTS == "always" or (CHECK_OUTPUTS == "cuda" and device.type == "cuda" and not INTERPRET)


def with_launches(fn: Callable[[], object], n: int) -> Callable[[], object]:
    """``fn`` marked as a candidate of ``n`` kernel launches (a decode decision charges the ones past the first:
    ``EXTRA_LAUNCH_MS``); returns it."""
    fn.launches = n
    return fn


def timed_as(fn: Callable[[], object], timing: Callable[[], object], runs: int = 1) -> Callable[[], object]:
    """``fn`` marked to be measured by running ``timing`` instead, which makes ``runs`` calls of it or of variants of it
    (e.g. at another length of the data it serves, so the choice reflects both): ``time_candidates`` reports its time
    divided by ``runs``, a call's. Returns ``fn``; the plan runs ``fn``."""
    fn.timing, fn.timing_runs = timing, runs
    return fn


def launches(fn: Callable[[], object]) -> int:
    """The kernel launches a candidate makes, as ``with_launches`` marked it (default one)."""
    return getattr(fn, "launches", 1)


def warm_in_parallel(candidates: dict[str, Callable[[], object]], context: Callable[[], object] = contextlib.nullcontext,
                     threads: int | None = None) -> None:
    """Run each candidate once, ``threads`` (default COMPILE_THREADS) at a time, each inside ``context()``; errors
    are left for the timer, which runs the candidate again and records them. On CUDA the launches share the caller's
    stream (``context``), so the GPU runs them one after another, as serial calls would."""
    threads = min(threads or COMPILE_THREADS, len(candidates))
    if threads <= 1:
        return

    def run(fn):
        with context():
            try:
                fn()
            except Exception:  # (a config that does not compile: its timer says so)
                pass
    with ThreadPoolExecutor(threads, thread_name_prefix="kiln-compile") as pool:
        list(pool.map(run, candidates.values()))


def _on_stream(device: torch.device) -> Callable[[], contextlib.ExitStack]:
    """A context (made anew for each use) that runs on ``device`` and the caller's current stream of it: a new thread's
    current device is the default one, and Triton launches on the current device."""
    stream = torch.cuda.current_stream(device)

    def enter() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(device))
        stack.enter_context(torch.cuda.stream(stream))
        return stack
    return enter


def compile_ahead(survey: dict, calls: list[Callable[[], object]], device: torch.device) -> dict | None:
    """Compile at once every Triton kernel that the candidates of the surveyed decisions (``survey``, from
    :meth:`Tuner.surveying`) and ``calls`` launch: recorded without compiling or launching them (torch ops in them
    run), then compiled in the worker processes of ``compile_pool``. Without workers (``KILN_COMPILE_WORKERS=0``) the
    candidates run once from threads instead, and ``calls`` are left to the capture's warm-up (out of order they
    would read what no earlier call has written). Nothing happens when no decision was surveyed: every choice was
    known (an artifact's, the cache's), so the kernels most likely are in Triton's cache too, and a warm start should
    not wait for workers to start only to find them there (the warm-up compiles any that are not, as without a
    survey). Returns the pool's statistics; None where it did not run (also on the CPU, under the interpreter)."""
    if device.type != "cuda" or INTERPRET or not survey:
        return None
    candidates = [fn for _, _, cands, _ in survey.values() for fn in cands.values()]
    context = _on_stream(device)
    workers = compile_pool.pool()
    if workers is None:
        warm_in_parallel({str(k): fn for k, fn in enumerate(candidates)}, context)
        torch.cuda.synchronize(device)
        return None
    jobs = compile_pool.record(candidates + calls, context)
    torch.cuda.synchronize(device)
    return workers.compile(jobs)


def _cuda_timer(fn: Callable[[], object], device: torch.device, flush: torch.Tensor | None = None) -> Callable[[], float]:
    """A function timing ``CALLS_PER_SAMPLE`` back-to-back runs of ``fn`` in ms per run, as the plan runs it: replayed
    from a CUDA graph (kernel gaps inside a graph, not launch latencies, count), or launched eagerly when ``fn`` cannot
    be captured. ``flush``: a tensor written before each sample, which is then ONE run (a cold measurement)."""
    calls = 1 if flush is not None else CALLS_PER_SAMPLE
    for _ in range(3):
        fn()  # compiles (Triton), allocates workspaces: nothing of that may happen during capture
    torch.cuda.synchronize(device)
    run = None
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        run = g.replay
    except Exception:
        torch.cuda.synchronize(device)

        def run():
            for _ in range(calls):
                fn()

    def sample() -> float:
        if flush is not None:
            flush.zero_()  # (before the first event: the write evicts the weights, its time is not counted)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / calls
    return sample


def _cpu_timer(fn: Callable[[], object]) -> Callable[[], float]:
    """The wall clock of one run (the Triton interpreter in tests), no warm-up run."""
    def sample() -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return sample


def time_candidates(candidates: dict[str, Callable[[], object]], device: torch.device, cold: bool = False,
                    check: OutputCheck | None = None, behind: Callable[[], object] | None = None) -> tuple[dict, dict]:
    """Median ms per run of each candidate, and the error of each that does not compile or run. The samples are
    taken round-robin across the candidates, so a clock or thermal drift during the measurement biases none.
    ``cold``: each CUDA sample one run after L2 is flushed (module docstring). ``check``: the candidates' outputs are
    compared first (where ``checks_outputs``); one that differs is not timed, its reason is its error. ``behind``: each
    sample runs this first (BEHIND_MB's predecessor), and its own median, sampled alike, is taken off each candidate's."""
    timers, failed = {}, {}
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if cold and device.type == "cuda" else None
    runs = {name: getattr(fn, "timing_runs", 1) for name, fn in candidates.items()}  # (timed_as)
    plain = candidates
    candidates = {name: getattr(fn, "timing", fn) for name, fn in candidates.items()}
    if behind is not None:
        candidates = {name: _after(behind, fn) for name, fn in candidates.items()}
    if device.type == "cuda":  # (not under the interpreter: the CPU tests run kernels in Python, one thread)
        warm_in_parallel(candidates, _on_stream(device))
        torch.cuda.synchronize(device)
    if check is not None and checks_outputs(device):
        failed.update(check.refusals(plain, device))
        candidates = {name: fn for name, fn in candidates.items() if name not in failed}
    for name, fn in candidates.items():
        try:
            timers[name] = _cuda_timer(fn, device, flush) if device.type == "cuda" else _cpu_timer(fn)
        except Exception as e:  # a config that does not compile (shared memory) or launch: not a choice
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    base = [] if behind is not None else None  # the predecessor's samples, taken in the same rounds
    base_timer = (_cuda_timer(behind, device, flush) if device.type == "cuda" else _cpu_timer(behind)) if timers and behind else None
    samples: dict[str, list] = {name: [] for name in timers}
    for _ in range(TIMING_REPS if device.type == "cuda" else CPU_TIMING_REPS):
        if base_timer is not None:
            base.append(base_timer())
        for name, timer in list(timers.items()):
            try:
                samples[name].append(timer())
            except Exception as e:
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                del timers[name], samples[name]
    less = sorted(base)[len(base) // 2] if base else 0.0
    return {name: round((sorted(t)[len(t) // 2] - less) / runs[name], 5) for name, t in samples.items()}, failed


def _after(first: Callable[[], object], fn: Callable[[], object]) -> Callable[[], object]:
    def both():
        first()
        return fn()
    return both


def cold(what: dict) -> bool:
    """Whether decision ``what`` is measured cold (module docstring): a decode GEMM's weights, a decode attention's cache."""
    return what.get("weights") == "cold" or what.get("cache") == "cold"


def behind_key(what: dict) -> dict:
    """``what`` as a decision's key has it: with ``behind_mb`` where BEHIND_MB times a cold decode decision's candidates
    behind a predecessor (so a choice made that way is never replayed as one made alone, nor the other way round)."""
    return dict(what, behind_mb=BEHIND_MB) if BEHIND_MB and cold(what) else what


def _behind(what: dict, device: torch.device) -> Callable[[], object] | None:
    # BEHIND_MB's predecessor for a decision keyed ``what`` (behind_key), on a CUDA device: a PDL-launched stream of
    # BEHIND_MB MB (pdl.stream); None otherwise
    if "behind_mb" not in what or device.type != "cuda":
        return None
    from .kernels import pdl
    buf = torch.randint(-2 ** 31, 2 ** 31 - 1, (int(what["behind_mb"]) << 18,), dtype=torch.int32, device=device)
    out = torch.empty(pdl.stream_programs(device), dtype=torch.int32, device=device)
    return lambda: pdl.stream(buf, out)


class Tuner:
    """Measured choices, keyed by ``key("tuning", what, fingerprint(device))``.

    ``decisions``: choices to start from (an artifact's ``tuning.json`` ``decisions``; ``refined``: its refinements,
    runtime/refine.py's). ``force``: kind
    ("gemm", "attention") -> candidate name prefix to take without measuring (tests, and
    ``CompileConfig.kernels``). ``cache``: where choices persist across processes (None: memory only). ``survey``:
    whether plans survey before they build their calls (module docstring; None: on CUDA, not under the interpreter)."""

    def __init__(self, cache: Cache | None = None, decisions: dict | None = None, force: dict | None = None,
                 survey: bool | None = None, refined: dict | None = None):
        self.cache = cache
        self.decisions: dict[str, dict] = dict(decisions or {})
        self.force = dict(force or {})
        self.counts = {"measured": 0, "cache": 0, "artifact": 0, "memory": 0, "forced": 0}
        self.seconds = 0.0  # spent measuring (Triton compiles of the candidates included)
        self.survey = survey
        self._origin = dict.fromkeys(self.decisions, "artifact")
        self._surveyed: dict | None = None  # while surveying: key -> (kind, what, candidates, device)
        self.refined: dict[str, dict] = dict(refined or {})  # decision key -> the choice runtime/refine.py made in a plan

    @property
    def is_surveying(self) -> bool:
        """Inside :meth:`surveying`: ``choose``'s answers are provisional."""
        return self._surveyed is not None

    def surveys(self, device: torch.device) -> bool:
        """Whether a plan on ``device`` surveys its decisions and compiles their kernels at once before it measures."""
        return self.survey if self.survey is not None else device.type == "cuda" and not INTERPRET

    @contextlib.contextmanager
    def surveying(self):
        """While open, :meth:`choose` measures, stores and counts nothing: it records each decision it cannot answer
        from memory, the cache or the artifact in the dict this yields (tuning key -> (kind, what, candidates,
        device), the first of equal keys) and answers it with its first candidate, provisionally."""
        self._surveyed = {}
        try:
            yield self._surveyed
        finally:
            self._surveyed = None

    def choose(self, kind: str, what: dict, candidates: dict[str, Callable[[], object]], device: torch.device,
               check: OutputCheck | None = None) -> str:
        """The name of the candidate to use for ``what`` (candidates: name -> a callable running it once); while
        :meth:`surveying`, a provisional one. ``check``: what the candidates read and write, to compare their outputs
        before they are measured (``OutputCheck``)."""
        surveying = self._surveyed is not None
        if kind in self.force:
            prefix = self.force[kind]
            self.counts["forced"] += not surveying
            # the first candidate of that name; the first of all (cuBLAS / SDPA, always there) where none fits
            return next((name for name in candidates if name.startswith(prefix)), next(iter(candidates)))
        k, what = self.key_of(kind, what, device), behind_key(what)
        d, origin = self._known(k, candidates)
        if surveying:
            if d is None:
                self._surveyed.setdefault(k, (kind, what, candidates, device))
            return next(iter(candidates)) if d is None else d["choice"]
        if d is not None:
            self.decisions[k] = d
            self._origin.pop(k, None)
            self.counts[origin] += 1
            return d["choice"]
        t0 = time.perf_counter()
        d = self.measure(kind, what, candidates, device, check)
        self.seconds += time.perf_counter() - t0
        self.decisions[k] = d
        self.counts["measured"] += 1
        if self.cache is not None:
            self.cache.put_json("tuning", k, d)
        return d["choice"]

    def key_of(self, kind: str, what: dict, device: torch.device) -> str:
        """The key ``choose`` files decision ``what`` of ``kind`` on ``device`` under."""
        return key("tuning", kind, behind_key(what), fingerprint(device))

    def refinement(self, k: str) -> dict | None:
        """The decision runtime/refine.py made in a plan for decision key ``k`` (in memory, else the cache's "refined"
        entry), None if none was made. Kept apart from the decision measured alone, which stays as it was."""
        if k not in self.refined and self.cache is not None and (d := self.cache.get_json("refined", k)) is not None:
            self.refined[k] = d
        return self.refined.get(k)

    def refine(self, k: str, d: dict) -> None:
        """Keep ``d`` (its ``choice``: a candidate's name) as the in-plan decision for key ``k``, in the cache too."""
        self.refined[k] = d
        if self.cache is not None:
            self.cache.put_json("refined", k, d)

    def _known(self, k: str, candidates: dict) -> tuple[dict | None, str]:
        """The decision of key ``k`` if one is known and names a candidate, and where from: "artifact" (its first use),
        "memory" or "cache"; (None, "") if none is."""
        d = self.decisions.get(k)
        if d is not None and d["choice"] in candidates:
            return d, self._origin.get(k, "memory")
        d = self.cache.get_json("tuning", k) if self.cache is not None else None
        if d is not None and d.get("choice") in candidates:
            return d, "cache"
        return None, ""

    @staticmethod
    def measure(kind: str, what: dict, candidates: dict, device: torch.device, check: OutputCheck | None = None) -> dict:
        is_cold = cold(what)
        ms, failed = time_candidates(candidates, device, cold=is_cold, check=check, behind=_behind(what, device))
        if not ms:
            raise RuntimeError(f"no {kind} implementation ran for {what}: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        decode = is_cold or "decode" in what  # (EXTRA_LAUNCH_MS)
        extra = {name: n - 1 for name in ms if (n := launches(candidates[name])) > 1} if decode else {}
        choice = min(ms, key=lambda name: ms[name] + EXTRA_LAUNCH_MS * extra.get(name, 0))
        return {"kind": kind, "what": what, "choice": choice, "ms": ms, **({"extra_launches": extra} if extra else {}),
                **({"failed": failed} if failed else {})}

    def to_json(self) -> dict:
        """What ``tuning.json`` holds: every decision with its measurements, and the refinements made in plans."""
        return {"format": 1, "decisions": self.decisions, **({"refined": self.refined} if self.refined else {})}

    def summary(self) -> dict:
        chosen: dict[str, int] = {}
        for d in self.decisions.values():
            c = d["kind"] + ":" + d["choice"].split(":")[0]
            chosen[c] = chosen.get(c, 0) + 1
        return {"decisions": len(self.decisions), "chosen": chosen, "sources": dict(self.counts), "seconds": round(self.seconds, 3)}
