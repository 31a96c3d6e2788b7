"""``kiln run``, ``kiln bench`` and ``kiln inspect``: commands on a saved artifact."""
from __future__ import annotations

import json
import os
import statistics
import time

from rich.markup import escape
from rich.table import Table

from ..errors import KilnError
from .common import _check_output, _emit_onnx, _parse_dims, _Progress, out

# ----------------------------------------------------------------------------- run


def cmd_run(a) -> int:
    import torch

    import kiln

    _check_output(a.save_outputs, a.force)
    progress = _Progress(a.quiet)
    with progress.step(f"load {a.artifact}"):
        m = kiln.load(a.artifact, device=a.device)
    if a.inputs:
        tensors = _read_inputs(a.inputs, m)
    else:
        tensors = m.random_inputs(_parse_dims(a.dim, ranges=False), seed=a.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        outputs = m.executor.run(tensors)
    _sync(m)
    first = time.perf_counter() - t0
    times = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        with torch.no_grad():
            m.executor.run(tensors)
        _sync(m)
        times.append(time.perf_counter() - t0)

    t = Table(show_edge=False)
    for col in ("output", "shape", "dtype", "mean", "std", "min", "max", "non-finite"):
        t.add_column(col)
    for name, o in zip(m.graph.output_names, outputs):
        f = o.detach().double()
        bad = int((~torch.isfinite(f)).sum())
        t.add_row(escape(name), str(list(o.shape)), str(o.dtype).removeprefix("torch."), f"{f.mean():.4g}",
                  f"{f.std():.4g}" if f.numel() > 1 else "-", f"{f.min():.4g}", f"{f.max():.4g}", str(bad))
    shapes = ", ".join(f"{n.attrs['name']}{list(x.shape)}" for n, x in zip(m.graph.inputs, tensors))
    out.print(escape(f"inputs: {shapes}" + ("" if a.inputs else f" (random, seed {a.seed})")))
    out.print(t)
    line = f"time: first call {first * 1e3:.2f} ms (includes planning)"
    if times:
        line += f", then median {statistics.median(times) * 1e3:.2f} ms over {len(times)} runs"
    out.print(line + f" on {m.device}")
    if a.save_outputs:
        from safetensors.torch import save_file

        save_file({n: o.detach().cpu().contiguous() for n, o in zip(m.graph.output_names, outputs)}, a.save_outputs)
        out.print(f"wrote outputs to {a.save_outputs}")
    return 0


def _sync(m):
    import torch

    if m.device.type == "cuda":
        torch.cuda.synchronize(m.device)


def _read_inputs(path: str, m):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise KilnError(f"{path}: no such file")
    try:
        data = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise KilnError(f"{path}: not a readable safetensors file ({e})") from None
    names = [n.attrs["name"] for n in m.graph.inputs]
    missing = [n for n in names if n not in data]
    if missing:
        raise KilnError(f"{path} lacks input(s) {', '.join(missing)}; it has {', '.join(data) or 'nothing'}",
                        hint=f"the model's inputs are {', '.join(names)}")
    return [data[n].to(m.device) for n in names]


# ----------------------------------------------------------------------------- bench


def _median_ms(fn, device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cmd_bench(a) -> int:
    """Time an artifact on the kernels backend against its own per-op torch reference, one process."""
    import torch

    import kiln
    from ..numerics import rel_err

    _check_output(a.json, a.force)
    progress = _Progress(a.quiet)
    startup = {"process_to_kiln_imported_s": _process_age()}
    t0 = time.perf_counter()
    with progress.step(f"load {a.artifact}"):
        m = kiln.load(a.artifact, device=a.device, backend=a.backend)
    startup["load_s"] = time.perf_counter() - t0
    dims = _parse_dims(a.dim, ranges=False)
    tensors = m.random_inputs(dims, seed=a.seed)
    dev = m.device
    result = {"artifact": os.path.abspath(a.artifact), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "inputs": {n.attrs["name"]: list(t.shape) for n, t in zip(m.graph.inputs, tensors)},
              "runs": []}
    systems = [("kiln", m)]
    if a.compare_reference and m.executor.backend != "reference":
        systems.append(("reference", kiln.load(a.artifact, device=a.device, backend="reference")))
    outputs = {}
    for name, model in systems:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        with progress.step(f"{name}: first call (plans, tunes, captures)"), torch.no_grad():
            t0 = time.perf_counter()
            outputs[name] = model.executor.run(tensors)
            _sync(model)
            first = time.perf_counter() - t0
        with progress.step(f"{name}: timing"), torch.no_grad():
            ms = _median_ms(lambda: model.executor.run(tensors), dev)
        run = {"system": name, "ms": ms, "first_call_s": first}
        if dev.type == "cuda":
            run["peak_mem_GiB"] = torch.cuda.max_memory_allocated(dev) / 2**30
        result["runs"].append(run)
    if "reference" in outputs:
        result["rel_err_vs_reference"] = max(rel_err(x.float(), y.float()) for x, y in zip(outputs["kiln"], outputs["reference"]))
        result["speedup_vs_reference"] = result["runs"][1]["ms"] / result["runs"][0]["ms"]
    result["executor"] = m.executor.describe()
    startup["first_call_s"] = result["runs"][0]["first_call_s"]
    plans = result["executor"]["plans"]
    startup["first_call_phases"] = plans[0].get("phases", {}) if plans else {}
    result["startup"] = startup

    _print_bench(a.artifact, result)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1)
        out.print(escape(f"wrote {a.json}"))
    return 0


def _process_age() -> float | None:
    """Seconds since this process started (Linux; None elsewhere): what a user waits before kiln is imported."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return None


def _print_bench(artifact: str, result: dict) -> None:
    t = Table(show_edge=False)
    for col in ("system", "median ms", "first call s", "peak GiB"):
        t.add_column(col, justify="right" if col != "system" else "left")
    for r in result["runs"]:
        t.add_row(r["system"], f"{r['ms']:.3f}", f"{r['first_call_s']:.2f}", f"{r['peak_mem_GiB']:.2f}" if "peak_mem_GiB" in r else "-")
    out.print(escape(f"{artifact} on {result['device']}, inputs " + ", ".join(f"{k}{v}" for k, v in result["inputs"].items())))
    out.print(t)
    if "rel_err_vs_reference" in result:
        out.print(f"kiln vs reference: {result['speedup_vs_reference']:.2f}x, max relative error {result['rel_err_vs_reference']:.2e}")
    ex = result["executor"]
    if ex.get("plans"):
        p = ex["plans"][-1]
        out.print(escape(f"backend {ex['backend']}: launches {p.get('launches', p.get('steps'))}, choices {p.get('choices', {})}, "
                         f"CUDA graph {p.get('cuda_graph', False)}"))
    st = result.get("startup")
    if st:
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in st["first_call_phases"].items())
        imported = st["process_to_kiln_imported_s"]
        out.print(escape(f"start-up: {'kiln imported after %.2fs, ' % imported if imported is not None else ''}load {st['load_s']:.2f}s, "
                         f"first call {st['first_call_s']:.2f}s" + (f" ({phases})" if phases else "")))


# ----------------------------------------------------------------------------- inspect


def cmd_inspect(a) -> int:
    import kiln

    _check_output(a.onnx, a.force)
    m = kiln.load(a.artifact)
    man = m.manifest
    if a.onnx:
        _emit_onnx(m.graph, a.onnx, _Progress(quiet=True))
        out.print(escape(f"wrote {a.onnx}"))
    if a.json:
        print(json.dumps(man, indent=1))
        return 0
    out.print(f"[bold]{escape(a.artifact)}[/bold]  kiln artifact format {man['format_version']}, "
              f"{os.path.getsize(a.artifact) / 2**20:.1f} MiB")
    out.print(f"  built by kiln {man.get('kiln_version')}, torch {man.get('torch_version')}, "
              f"triton {man.get('triton_version')}, python {man.get('python_version')} on {man.get('created')}")
    if man.get("config"):
        out.print(escape(f"  config: {json.dumps(man['config'])}"))
    t = Table(title="inputs / outputs", title_justify="left", show_edge=False)
    for col in ("", "name", "shape", "dtype"):
        t.add_column(col)
    for kind in ("inputs", "outputs"):
        for spec in man[kind]:
            t.add_row(kind[:-1], escape(spec["name"]), escape("[" + ", ".join(map(str, spec["shape"])) + "]"), spec["dtype"])
    out.print(t)
    if man.get("symbols"):
        out.print("  dims: " + ", ".join(f"{k} in [{lo}, {hi}]" for k, (lo, hi) in man["symbols"].items()))
    g = m.graph
    out.print(f"  weights: {len(g.weights)} tensors, {sum(t.numel() for t in g.weights.values()):,} parameters, "
              f"{g.weight_bytes() / 2**20:.1f} MiB")
    t = Table(title="ops", title_justify="left", show_edge=False)
    t.add_column("op")
    t.add_column("count", justify="right")
    for op, n in g.histogram().items():
        t.add_row(op, str(n))
    out.print(t)
    if a.graph:
        out.print(repr(g), markup=False)
    return 0
