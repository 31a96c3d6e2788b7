"""Compile many Triton kernels at once, in worker processes.

A cold start is mostly Triton compiles: the tuner measures ~90 candidates of a Llama generator's plans, each a kernel
compiled at its first launch, and the CUDA graph capture's warm-up compiles the generated pointwise kernels. Threads
overlap the compiles' ptxas and LLVM work, but Triton's Python front end (AST -> TTIR, specialization, cache keys)
holds the GIL. So the plan first *surveys* what it will launch (``tuning.Tuner.surveying``) and this module compiles
all of it in other processes, in two steps:

1. :func:`record` runs callables with Triton's ``knobs.runtime.jit_cache_hook`` set to a hook that records each
   launch that would compile — its kernel (module, qualified name, and the file of a generated module) and Triton's
   own serialized specialization (``compile["specialization_data"]``) — and returns True, so that Triton neither
   compiles nor launches it (``JITFunction._do_compile`` returns None). Torch ops in the callables run as usual.
2. :meth:`CompilePool.compile` hands the records to worker processes (``python -c "... serve()"``), each of which
   imports the kernel's module and calls ``JITFunction.preload(data)``: Triton's decoder of that data, which compiles
   exactly that specialization into Triton's on-disk cache under the key the parent's launch computes. The parent's
   first launch of it is then a cache hit.

Protocol: one JSON object a line. A job (parent -> worker's stdin) is a record: ``{"module", "qualname", "file",
"data", "target": {"backend", "arch", "warp_size"}}``; the reply (worker's stdout) ``{"ok": true, "s": seconds}`` or
``{"ok": false, "error": "...", "s": seconds}``; ``"launcher": true`` when the worker also built the kernel's host
launcher (:func:`_build_launcher`). A worker runs one job at a time and exits at the end of its stdin.

A worker creates no CUDA context (an idle context holds GPU memory): its GPUs are hidden (``CUDA_VISIBLE_DEVICES=``)
and Triton's driver is a :class:`CompileOnlyDriver` that names the parent's target, which is all compiling asks of
a driver. Only kiln's own kernels (its package's modules and its generated ``_kiln_*`` modules) go to workers: a
worker never imports a user's module. Whatever a worker cannot do — a kernel it cannot find or compile, a worker
that dies or hangs (it is replaced for the next job) — is left to the parent, whose launch then compiles the kernel
as it would have without the pool.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

log = logging.getLogger(__name__)

PACKAGE = __name__.split(".")[0]  # kiln's own package: its kernel modules are importable by name in a worker
GENERATED = "_kiln_"  # modules that codegen/cache.py loads from a file (the generated pointwise kernels)
IDLE_S = 60.0  # workers stop after this long without a job (a later plan starts them again)
NICE = 5  # workers' scheduling priority below the parent's (os.nice increment)
JOB_TIMEOUT_S = 300.0  # a job taking longer: its worker is killed, its kernel left to the parent
_RECORDING = threading.Lock()  # the hook is global: one recording at a time


def default_workers() -> int:
    """``KILN_COMPILE_WORKERS`` (read now), else min(16, cores - 1); 0: no workers. (On the H200 machine's 16 cores,
    8 workers were busy 72% of the cold 1B survey's 4.6 s while the parent waited: more cores were idle.)"""
    env = os.environ.get("KILN_COMPILE_WORKERS", "").strip()
    return max(0, int(env)) if env else min(16, (os.cpu_count() or 1) - 1)


# -- 1. record -----------------------------------------------------------------------------------------------------
def record(fns: Iterable[Callable[[], object]], context: Callable[[], object] = contextlib.nullcontext) -> list[dict]:
    """The distinct Triton compiles that running each of ``fns`` (inside ``context()``) would do, as jobs (module
    docstring); none of them is compiled or launched. Launches from other threads meanwhile compile as usual. An
    exception in a callable ends that callable (its later kernels go unrecorded). A launch through ``triton.autotune``
    raises (ending its callable): its benchmark would time launches that do not happen and keep the verdict."""
    from triton import knobs
    from triton.runtime.autotuner import Autotuner

    found: dict[str, dict] = {}
    me = threading.get_ident()
    with _RECORDING:
        previous, autotuned = knobs.runtime.jit_cache_hook, Autotuner.run

        def refuse(self, *args, **kwargs):
            if threading.get_ident() == me:
                raise RuntimeError("an autotuned launch is not recorded")
            return autotuned(self, *args, **kwargs)

        def hook(**kw):
            if threading.get_ident() != me:
                return previous(**kw) if previous is not None else None
            data = kw["compile"]["specialization_data"]
            if data not in found:
                found[data] = _job(kw["fn"], data)
            return True  # Triton skips the compile and the launch
        knobs.runtime.jit_cache_hook, Autotuner.run = hook, refuse
        try:
            for fn in fns:
                with context():
                    try:
                        fn()
                    except Exception:  # (the kernels it launched so far are recorded)
                        pass
        finally:
            knobs.runtime.jit_cache_hook, Autotuner.run = previous, autotuned
    return list(found.values())


def _job(fn, data: str) -> dict:
    """A record of kernel ``fn`` (Triton's JitFunctionInfo: module name, qualified name) at one specialization."""
    from triton.runtime import driver

    target = driver.active.get_current_target()
    module = fn.module if isinstance(fn.module, str) else fn.module.__name__
    file = getattr(sys.modules.get(module), "__file__", None)
    return {"module": module, "qualname": fn.name, "file": file, "data": data,
            "target": {"backend": target.backend, "arch": target.arch, "warp_size": target.warp_size}}


def workable(job: dict) -> bool:
    """Whether a worker may compile ``job``: a kernel of kiln's package, or of a generated module with its file."""
    m = job["module"]
    ours = m == PACKAGE or m.startswith(PACKAGE + ".") or (m.startswith(GENERATED) and bool(job.get("file")))
    return ours and "<locals>" not in job["qualname"]


# -- 2. workers ------------------------------------------------------------------------------------------------------
class _Worker:
    """One worker process, started on demand, replaced when it dies."""

    def __init__(self, command: list[str]):
        self.command = command
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.stop()
        quiet = not log.isEnabledFor(logging.DEBUG)  # (its Python warnings and tracebacks: at DEBUG only)
        self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL if quiet else None, env=_worker_env(),
                                     text=True, encoding="utf-8", bufsize=1)

    def run(self, job: dict) -> dict:
        """The worker's reply to ``job``; ``ok`` False when it failed, died or timed out (then it is stopped)."""
        t0 = time.perf_counter()
        self.start()
        line, answered = "", True
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            answered = bool(select.select([self.proc.stdout], [], [], JOB_TIMEOUT_S)[0])
            line = self.proc.stdout.readline() if answered else ""
        except (OSError, ValueError):  # (a broken pipe: the worker is gone)
            pass
        try:
            return json.loads(line)
        except ValueError:  # EOF (it died), a line that is no reply, or none in time
            p = self.proc
            self.stop(wait=5 if answered else 0)
            why = f"exited ({p.returncode})" if answered else "timed out"
            return {"ok": False, "error": f"worker {why}", "s": round(time.perf_counter() - t0, 3)}

    def stop(self, wait: float = 5) -> None:
        """End the process (EOF, then a kill after ``wait`` seconds) and reap it."""
        p, self.proc = self.proc, None
        if p is None:
            return
        with contextlib.suppress(OSError, ValueError):
            p.stdin.close()
        try:
            p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        with contextlib.suppress(OSError, ValueError):
            p.stdout.close()


def _worker_env() -> dict:
    """The parent's environment with its import path and Triton cache, no GPU, no interpreter."""
    from triton import knobs

    # one thread each (a compile needs no intra-op threads; 15 workers' thread pools would crowd the parent's cores)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), CUDA_VISIBLE_DEVICES="",
               TRITON_CACHE_DIR=knobs.cache.dir, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


class CompilePool:
    """``workers`` compile processes (started by :meth:`start` or the first :meth:`compile`, stopped after ``idle_s``
    without a job, at :meth:`close`, or at exit). ``command``: the worker's command line (tests)."""

    def __init__(self, workers: int, idle_s: float = IDLE_S, command: list[str] | None = None):
        # niced before its imports: the parent, running torch.export and the plans meanwhile, comes first
        command = command or [sys.executable, "-c", f"import os; os.nice({NICE}); from {__name__} import serve; serve()"]
        self.workers = [_Worker(command) for _ in range(workers)]
        self.idle_s = idle_s
        self._lock = threading.Lock()  # one batch at a time; held while workers start or stop
        self._timer: threading.Timer | None = None
        self._last = time.monotonic()

    def start(self) -> None:
        """Start every worker now (their imports take seconds: start them before their first jobs are known)."""
        with self._lock:
            for w in self.workers:
                w.start()
            self._idle_later()

    def compile(self, jobs: list[dict]) -> dict:
        """Compile ``jobs`` (from :func:`record`) in the workers; returns how many kernels there were, were compiled,
        failed (then the parent compiles them at their first launch, as without workers) or were left to the parent
        (not :func:`workable`), the wall time and the workers' time, and the first few distinct errors."""
        from triton import knobs

        t0 = time.perf_counter()
        # each job names the parent's Triton cache as it is now: workers started earlier (they live IDLE_S) may have
        # another in their environment (a TRITON_CACHE_DIR set since), and would compile where the parent never looks
        todo = [dict(j, cache_dir=knobs.cache.dir) for j in jobs if workable(j)]
        results: list[dict] = []
        with self._lock:
            pending = iter(todo)
            take = threading.Lock()

            def drain(w: _Worker) -> None:
                while True:
                    with take:
                        job = next(pending, None)
                    if job is None:
                        return
                    results.append(w.run(job))
            with ThreadPoolExecutor(max(1, len(self.workers)), thread_name_prefix="kiln-compile-pool") as ex:
                list(ex.map(drain, self.workers[:len(todo)]))
            self._idle_later()
        errors = [r.get("error", "") for r in results if not r.get("ok")]
        stats = {"kernels": len(jobs), "compiled": len(results) - len(errors), "failed": len(errors),
                 "launchers": sum(bool(r.get("launcher")) for r in results),
                 "left": len(jobs) - len(todo), "workers": len(self.workers), "seconds": round(time.perf_counter() - t0, 3),
                 "worker_seconds": round(sum(r.get("s", 0) for r in results), 3), "errors": sorted(set(errors))[:5]}
        log.debug("kiln compile pool: %s", stats)
        return stats

    def _idle_later(self) -> None:
        """(Under the lock) stop the workers ``idle_s`` from now unless they are used again by then."""
        self._last = time.monotonic()
        if self._timer is None:
            self._timer = threading.Timer(self.idle_s, self._idle)
            self._timer.daemon = True
            self._timer.start()

    def _idle(self) -> None:
        with self._lock:
            if self._timer is not threading.current_thread():  # (closed, or a newer timer took over)
                return
            self._timer = None
            wait = self._last + self.idle_s - time.monotonic()
            if wait > 0:  # used since the timer started: look again when the new idle time ends
                self._timer = threading.Timer(wait, self._idle)
                self._timer.daemon = True
                self._timer.start()
                return
            for w in self.workers:
                w.stop()

    def close(self) -> None:
        """Stop every worker (a later :meth:`compile` starts them again). At exit a batch may still hold the lock (a
        daemon thread's): its workers are stopped all the same after a while, and its jobs left to the parent."""
        locked = self._lock.acquire(timeout=10)
        try:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            for w in self.workers:
                w.stop()
        finally:
            if locked:
                self._lock.release()

    def running(self) -> int:
        return sum(w.proc is not None and w.proc.poll() is None for w in self.workers)


_POOL: list[CompilePool | None] = []  # the process's pool, made on first use


def pool() -> CompilePool | None:
    """This process's pool (``default_workers()`` workers, closed at exit); None with ``KILN_COMPILE_WORKERS=0``."""
    if not _POOL:
        n = default_workers()
        _POOL.append(CompilePool(n) if n > 0 else None)
        if _POOL[0] is not None:
            atexit.register(_POOL[0].close)
    return _POOL[0]


def start() -> None:
    """Start the workers now, in the background (kiln.compile on a CUDA device, before torch.export's seconds); not
    under the Triton interpreter (nothing to compile)."""
    p = pool() if os.environ.get("TRITON_INTERPRET", "0") != "1" else None
    if p is not None:  # (from a thread: 15 process starts would hold up the caller; a compile waits on the pool's lock)
        threading.Thread(target=p.start, name="kiln-compile-pool-start", daemon=True).start()


# -- the worker side -------------------------------------------------------------------------------------------------
class CompileOnlyDriver:
    """A Triton driver for compiling only: the current target is the one last set (``target``), each target its own
    device index (Triton keeps compiled kernels per device); anything else a driver does (load a binary, launch)
    raises."""

    def __init__(self, target=None):
        self.target = target
        self._devices: dict = {}

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self._devices.setdefault(self.target, len(self._devices))

    def get_current_stream(self, device=None) -> int:
        return 0

    def __getattr__(self, name):
        raise RuntimeError(f"a compile-only Triton driver has no {name!r}")


def _build_launcher(kernel) -> bool:
    """Build ``kernel``'s host launcher (a small C module Triton compiles with the system compiler at a kernel's first
    launch, ~50 ms, cached by its source) into Triton's cache, so the parent's first launch finds it too: the cold
    Llama-3.2-1B's parent spent 6 s waiting on those compilers, one after another (H200, session 6). False where
    this Triton or machine cannot (no CUDA launcher class, no libcuda to link): the parent builds it then."""
    try:
        from triton.backends.nvidia.driver import CudaLauncher

        CudaLauncher(kernel.src, kernel.metadata)
        return True
    except Exception:
        return False


def _kernel(job: dict):
    """The JITFunction ``job`` names: imported by module name, or a generated module from its file."""
    import importlib
    import importlib.util

    from triton.runtime.jit import JITFunction

    name = job["module"]
    mod = sys.modules.get(name)
    if mod is None and name.startswith(GENERATED):
        spec = importlib.util.spec_from_file_location(name, job["file"])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    elif mod is None:
        mod = importlib.import_module(name)
    fn = mod
    for part in job["qualname"].split("."):
        fn = getattr(fn, part)
    while not isinstance(fn, JITFunction):  # (an autotuner or heuristics around it)
        fn = fn.fn
    return fn


def serve(stdin=None) -> None:
    """A worker's loop: a job a line from ``stdin`` (default: sys.stdin), a reply a line on the process's stdout,
    which nothing else may write to (Python's stdout goes to stderr)."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.dont_write_bytecode = True  # (a generated module lives in kiln's cache: no __pycache__ beside it)
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    cpu = CompileOnlyDriver()
    driver.set_active(cpu)
    for line in stdin or sys.stdin:
        t0 = time.perf_counter()
        try:
            job = json.loads(line)
            if job.get("cache_dir"):  # (Triton reads the variable at each compile)
                os.environ["TRITON_CACHE_DIR"] = job["cache_dir"]
            cpu.target = GPUTarget(**job["target"])
            kernel = _kernel(job).preload(job["data"])
            reply = {"ok": True, "launcher": _build_launcher(kernel)}
        except Exception as e:
            reply = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        reply["s"] = round(time.perf_counter() - t0, 3)
        out.write(json.dumps(reply) + "\n")
        out.flush()
