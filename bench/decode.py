"""The LLM decode step, launch by launch: kiln's step plan against a static-KV decode loop under
torch.compile(mode="reduce-overhead"), in ONE process, bf16, random weights of the real shapes.

Per (model, batch): kernels launched per decode step (and per layer), the step plan's kinds and implementation
choices, the time of one decode step (the plan's CUDA graph replayed, median over many), and decode tokens/s over a
prompt of 128 and 256 new tokens (greedy, sampling included) for kiln and the peer. Models: Llama-3.2-1B at batch 1
and 16, the Llama-3.1-8B shape at batch 1 (random weights: no checkpoint needed).

Launches are counted with the profiler while the plan's calls run outside their CUDA graph (a call may launch more
than one kernel: cuBLAS + an epilogue, a norm kernel + a GEMM); the kernels' summed device time per step against the
replayed step's time says how much of a step is kernels and how much the gaps between them, and the top kernels by
time say which. Inside the CUDA graph, each call's share of the replayed step by role (qkv, o, gate/up, down, head,
attention): ``"timeline"`` (bench/step_timeline.py), one line printed per case.

    python bench/decode.py [--models 1b,8b] [--no-compile-peer] [--max-seq N]    writes $OUT/decode.json
    python bench/decode.py --models 1b --batches 1 --quantize w4a16     the quantized step's kernels
    python bench/decode.py --smoke [--models smoke-qwen3]              CPU: a tiny Llama (Qwen3) under the Triton interpreter
    python bench/decode.py --models 1b --ab-disable fold_norm_weight   A / B of one pass, in this process
    python bench/decode.py --models 1b --ab-kernels attention=kiln-decode-last   A / B of a kernel choice
    python bench/decode.py --models 1b --quantize w4a16 --ab-config quantize_lm_head=True   A / B of a CompileConfig field
    KILN_PDL=0 python bench/decode.py ...                              kiln's decode kernels without programmatic
                                                                       dependent launch (codegen/kernels/pdl.py)
"""
import argparse
import ast
import importlib
import inspect
import json
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--models", default="1b,8b")
ap.add_argument("--no-compile-peer", action="store_true")
ap.add_argument("--max-seq", type=int, default=None, help="the generator's KV-cache length (default: prompt + new tokens, "
                "the least that fits; a user's is often 4096: decode attention must not pay for the empty slots)")
ap.add_argument("--quantize", default=None, help="kiln's weight quantization (w8a16, w4a16, ...): the quantized step, "
                "launch by launch (the peer stays bf16)")
ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default: each model's own)")
ap.add_argument("--smoke", action="store_true", help="a tiny Llama on the CPU (Triton interpreter), few tokens")
ap.add_argument("--whole-max-keys", type=int, default=None, help="codegen.lower_attention.WHOLE_MAX_KEYS for this run: the longest "
                "cache the one-split decode attention is offered on (0: never)")
ap.add_argument("--ab-disable", default=None, help="also a generator compiled with this pass switched off (e.g. "
                "fold_norm_weight): both measured in this process, their decode runs interleaved")
ap.add_argument("--ab-whole-max-keys", type=int, default=None, help="also a generator whose plans are built with "
                "codegen.lower_attention.WHOLE_MAX_KEYS at this value (0: the one-split decode attention never offered), as --ab-disable")
ap.add_argument("--ab-set", default=None, help="also a generator whose plans are built with these module constants set, "
                "NAME=NUMBER[,..]: kiln.codegen.lower_attention's (e.g. EARLY_KV=0), MODULE.NAME of kiln.codegen "
                "(e.g. tuning.EXTRA_LAUNCH_MS=0.0) or runtime.MODULE.NAME / llm.MODULE.NAME of kiln.runtime / kiln.llm (e.g. "
                "runtime.refine.MAX_ALTS=6, llm.generator.COPY_ASIDE=1), "
                "as --ab-disable")
ap.add_argument("--ab-env", default=None, help="also a generator whose plans are built and captured with these environment "
                "variables set, NAME=VALUE[;..] (e.g. KILN_PDL=1+noprefetch: read at each launch, kept by the CUDA graph), as --ab-disable")
ap.add_argument("--ab-kernels", default=None, help="also a generator with these kernel choices forced, KIND=CHOICE[,..] "
                "(CompileConfig.kernels, e.g. attention=kiln-decode-last), as --ab-disable")
ap.add_argument("--ab-config", default=None, help="also a generator compiled with these CompileConfig fields, NAME=VALUE[,..] "
                "(VALUE a Python literal: e.g. quantize_lm_head=True, the LM head at the mode's 4 bits), as --ab-disable")
a = ap.parse_args()
if a.smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

import torch  # noqa: E402
import transformers  # noqa: E402

import kiln  # noqa: E402
from kiln.codegen.kernels.greedy import greedy, scratch  # noqa: E402
from kiln.codegen.tuning import L2_FLUSH_BYTES  # noqa: E402
from kiln.llm.generator import to_host  # noqa: E402

from common import kernels_launched  # noqa: E402
from step_timeline import step_timeline, summary  # noqa: E402

# the --ab-set / --ab-whole-max-keys variant's module constants (NAME: lower_attention's; MODULE.NAME: kiln.codegen.MODULE's)
SETS = {k: (float(v) if "." in v else int(v)) for k, v in (kv.split("=") for kv in a.ab_set.split(","))} if a.ab_set else {}
if a.ab_whole_max_keys is not None:
    SETS["WHOLE_MAX_KEYS"] = a.ab_whole_max_keys
ENV = dict(kv.split("=", 1) for kv in a.ab_env.split(";")) if a.ab_env else {}  # the --ab-env variant's
if a.whole_max_keys is not None:
    from kiln.codegen import lower_attention as lower
    lower.WHOLE_MAX_KEYS = a.whole_max_keys

# name -> (transformers config kwargs (``arch``: the config / model class, Llama when absent; ``config``: the config
# class where it is not ``arch``'s), batches)
MODELS = {
    "1b": (dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0), (1, 16)),
    "8b": (dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0), (1,)),
    # Qwen3-0.6B / 1.7B: q / k norms over each head before RoPE, head dim 128 (not hidden / heads)
    "qwen3-0.6b": (dict(arch="Qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                        rope_theta=1000000.0), (1, 16)),
    "qwen3-1.7b": (dict(arch="Qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                        rope_theta=1000000.0), (1, 16)),
    # Gemma-3-1B: (1 + w) norms around attention and MLP, q / k norms, head dim 256 with one kv head, a 262k vocabulary,
    # five sliding-window layers (512 keys, RoPE base 10k) to each full one (base 1M)
    "gemma3-1b": (dict(arch="Gemma3", config="Gemma3TextConfig", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                       num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                       query_pre_attn_scalar=256), (1, 16)),
    # Gemma-2-2B: Gemma 3's layout without q / k norms, attention scores soft-capped (50) in kiln's attention kernels,
    # sliding layers every other one (4096 keys), logits soft-capped (30)
    "gemma2-2b": (dict(arch="Gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, attn_implementation="eager"), (1, 16)),
    "smoke": (dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2), (1, 2)),
    "smoke-qwen3": (dict(arch="Qwen3", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32), (1, 2)),
    "smoke-gemma3": (dict(arch="Gemma3", config="Gemma3TextConfig", vocab_size=97, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=8,
                          layer_types=["sliding_attention", "full_attention"]), (1, 2)),
}
P, GEN = (16, 4) if a.smoke else (128, 256)
DEVICE = "cpu" if a.smoke else "cuda"
SLEEP_CYCLES = 2_000_000  # ~1 ms at the H200's clock: longer than a Python launch
DTYPE = torch.float32 if a.smoke else torch.bfloat16


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def step_time_ms(fn, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs (CUDA events on the GPU)."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        if DEVICE == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def call_times(plan) -> list | None:
    """Each call of the step alone, cold: a 256 MB write over L2, a ~1 ms spin of the GPU, then the call between two
    events (the spin keeps the GPU busy while the host launches the call, so launch time does not count: the write
    alone was too short for a Python launch of a Triton kernel, and run 1 of session 5 timed launches). Calls of one group
    kind, choice (with its configuration) and weight shape are merged: [kind, choice, weight shape, calls per step, us per
    call (median), weight MB, GB/s of the weight]. The GEMVs' GB/s against the copy rate is where a batch-1 step's time goes. None on the CPU."""
    if DEVICE != "cuda":
        return None
    try:
        return _call_times(plan)
    except Exception as e:  # (a diagnostic: the figures above it stay)
        return [f"failed: {type(e).__name__}: {e}"]


def _call_times(plan) -> list:
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=DEVICE)  # (the tuner's cold measurement's)
    rows: dict[tuple, list] = {}
    for call in plan.calls:
        n = call.group.nodes[-1]
        w = n.inputs[1] if n.op in ("GEMM", "LINEAR", "QGEMM", "AQGEMM") and len(n.inputs) > 1 else None
        wt = plan.env.get(w) if w is not None else None
        mb = wt.numel() * wt.element_size() / 1e6 if isinstance(wt, torch.Tensor) else None
        times = []
        for _ in range(5):
            flush.zero_()
            torch.cuda._sleep(SLEEP_CYCLES)  # the GPU waits here while the host launches the call: no launch time timed
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            call.run()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e3)
        key = (call.kind, call.choice, tuple(wt.shape) if mb else None)  # (the choice with its configuration: one a shape)
        rows.setdefault(key, [mb]).append(sorted(times)[2])
    out = []
    for (kind, choice, shape), (mb, *us) in rows.items():
        med = sorted(us)[len(us) // 2]
        gbps = mb and round(mb / med * 1e3, 1)  # (MB per us is TB/s)
        out.append([kind, choice, list(shape) if shape else None, len(us), round(med, 2), shape and round(mb, 2), gbps])
    return sorted(out, key=lambda row: -row[3] * row[4])


def between_steps_us(g, plan, bs: int, reps: int = 20) -> dict | None:
    """GPU microseconds of what a generator runs between two replays of the step (llm/generator.py ``_stream`` and
    ``_Decoder``): with torch ops ("all": the greedy token (argmax of the logits, "argmax" alone), its copy to the host, and
    the four updates of the step's inputs: tokens, positions, slots, a mask column) and with the one kernel the generator
    now runs ("fused": codegen/kernels/greedy.py, then the copy; "aside": the copy on a side stream, the step's stream's
    time). Queued behind a ~1 ms spin: the host's launches do not count.
    None on the CPU. (Leaves the plan's input buffers changed: bind it again before replaying it.)"""
    if DEVICE != "cuda":
        return None
    graph = g.compiled.graph
    names = [n.attrs["name"] for n in graph.inputs]
    b = {name: buf for name, buf in zip(names, plan.input_buffers) if buf is not None}
    logits = plan.replay()[next(k for k, name in enumerate(graph.output_names) if name not in graph.updates)]
    host = torch.empty(bs, dtype=torch.long, pin_memory=True)
    slot = P + 1

    def argmax():
        return logits.argmax(dim=-1)

    def step():
        tok = argmax()
        host.copy_(tok, non_blocking=True)
        b["input_ids"].copy_(tok[:, None])
        b["positions"].add_(1)
        b["slots"].add_(1)
        b["mask"].select(3, slot).fill_(True)
    work = scratch(*logits.shape, logits.device)

    done = torch.cuda.Event()

    def fused(side=None):  # codegen/kernels/greedy.py, then the copy, as the generator runs them between two replays
        # (side: the copy on that stream, llm.generator.COPY_ASIDE: the step's stream's share of it)
        to_host(greedy(logits, b["input_ids"], b["positions"], b["slots"], b["mask"], slot, work=work), host, done, side)
    side = torch.cuda.Stream()

    out = {}
    for name, fn in (("argmax", argmax), ("all", step), ("fused", fused), ("aside", lambda: fused(side))):
        fn()
        torch.cuda.synchronize()
        torch.cuda._sleep(SLEEP_CYCLES * 4)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        e.synchronize()
        out[name] = round(s.elapsed_time(e) * 1e3 / reps, 2)
    return out


def decode_plan(g, bs: int, slot: int = P):
    """The decode plan of batch bucket ``bs`` (one new token at ``slot``, the keys before it attended) and its inputs."""
    ids = torch.zeros(bs, 1, dtype=torch.long, device=DEVICE)
    inputs = list(g._inputs(ids, torch.zeros(bs, dtype=torch.long), slot, g.caches(bs)).values())  # (Gemma 3: window_mask too)
    plan = g.compiled.executor.plan_for(inputs)
    plan.bind(inputs)
    return plan


def kiln_case(g, layers: int, bs: int, prompt) -> dict:
    rows = prompt[:bs].tolist()
    t0 = time.perf_counter()
    g.generate(rows, max_new_tokens=GEN)  # plans, tunes and captures the prefill and decode buckets
    first = time.perf_counter() - t0
    r = min((g.generate(rows, max_new_tokens=GEN) for _ in range(1 if a.smoke else 3)), key=lambda r: r.decode_s)
    plan = decode_plan(g, bs)
    launched = kernels_launched(plan)
    kernels = launched.get("kernels")
    out = {"decode_tok_s": bs * r.decode_steps / r.decode_s, "first_run_s": first, "pdl": os.environ.get("KILN_PDL", "1") != "0",
           "tokens_row0": r.tokens[0][:64],  # (greedy: two runs of one model, e.g. with and without PDL, must agree)
           "step_ms": step_time_ms(plan.replay, 5 if a.smoke else 200),
           "calls_per_step": len(plan.calls), "kernels_per_step": kernels,
           "kernels_per_layer": None if kernels is None else kernels / layers,
           "kernel_ms_per_step": launched.get("kernel_us", 0) / 1e3 or None, "kernel_top": launched.get("top"),
           "launches_by_kind": dict(plan.stats.launches), "choices": dict(plan.stats.choices),
           "cuda_graph": plan.stats.cuda_graph, "call_times_cold": call_times(plan),
           "timeline": step_timeline(plan),  # (the step's kernels inside its CUDA graph: bench/step_timeline.py)
           "refine": plan.stats.refine,  # (KILN_REFINE's passes where this process made the plan's decisions again)
           "build_phases": {f"{p.bindings}": dict(p.stats.phases, build_s=round(p.stats.build_s, 3))  # (first run: where
                            for p in g.compiled.executor.plans}}  # each plan's build time went)
    out["between_steps_us"] = between_steps_us(g, plan, bs)
    # the run's last step (P + GEN keys; the plan bound again): decode attention reads the attended keys only
    out["step_ms_last"] = step_time_ms(decode_plan(g, bs, P + GEN - 1).replay, 5 if a.smoke else 200)
    return out


def show_timeline(name: str, bs: int, what: str, case: dict) -> None:
    """A case's step timeline as one line (a GPU's CUDA graph only: empty elsewhere)."""
    if case["timeline"]:
        print(name, bs, f"{what} timeline:", summary(case["timeline"]), flush=True)
    if r := case.get("refine"):
        print(name, bs, f"{what} refine: step {r['step_ms'] * 1e3:.1f} us, noise {r['noise_ms'] * 1e3:.1f} us, taken",
              [(t["choice"], t["gain_us"]) for t in r["steps"]] or "nothing", flush=True)


class Variant:
    """A generator whose every call runs with the ``--ab-set`` / ``--ab-whole-max-keys`` constants and the ``--ab-env``
    variables in force (its plans are built lazily, at the calls that first need them); attributes pass through."""

    def __init__(self, g):
        self.g = g

    def __getattr__(self, name):
        attr = getattr(self.g, name)
        if not inspect.ismethod(attr) or not (SETS or ENV):
            return attr

        def call(*args, **kw):
            targets = {k: _constant(k) for k in SETS}
            before, env = {k: getattr(mod, name) for k, (mod, name) in targets.items()}, {k: os.environ.get(k) for k in ENV}
            for k, v in SETS.items():
                setattr(*targets[k], v)
            os.environ.update(ENV)
            try:
                return attr(*args, **kw)
            finally:
                for k, v in before.items():
                    setattr(*targets[k], v)
                for k, v in env.items():
                    if v is None:
                        os.environ.pop(k)
                    else:
                        os.environ[k] = v
        return call


def _constant(k: str) -> tuple:
    # --ab-set's NAME (kiln.codegen.lower_attention's) or MODULE.NAME (kiln.codegen.MODULE's; runtime.MODULE.NAME /
    # llm.MODULE.NAME: kiln.runtime's / kiln.llm's, e.g. runtime.refine.MAX_ALTS): (module, name)
    mod, _, name = k.rpartition(".")
    return importlib.import_module(f"kiln.{mod}" if mod.startswith(("runtime.", "llm.")) else f"kiln.codegen.{mod or 'lower_attention'}"), name


def interleaved(g, g_off, bs: int, prompt, rounds: int = 5) -> list:
    """Decode tok/s of two generators whose runs alternate (the --ab-* options): [best, median] of each, so a drift of
    the machine during the rounds biases neither."""
    rows, runs = prompt[:bs].tolist(), ([], [])
    for _ in range(1 if a.smoke else rounds):
        for k, gen in enumerate((g, g_off)):
            r = gen.generate(rows, max_new_tokens=GEN)
            runs[k].append(bs * r.decode_steps / r.decode_s)
    return [[round(max(t)), round(sorted(t)[len(t) // 2])] for t in runs]


def static_step(m, compiled: bool):
    """A static-KV decode step of the transformers model (torch.compile reduce-overhead unless ``compiled`` is False)."""
    def step(ids, cache, pos):
        return m(ids, past_key_values=cache, cache_position=pos, use_cache=True).logits
    return torch.compile(step, mode="reduce-overhead", fullgraph=True) if compiled else step


def peer_case(m, cfg, bs: int, prompt, compiled: bool) -> dict:
    step = static_step(m, compiled)

    def loop():
        cache = transformers.StaticCache(config=cfg, max_cache_len=P + GEN + 8)
        with torch.no_grad():
            logits = m(prompt[:bs], past_key_values=cache, cache_position=torch.arange(P, device=DEVICE), use_cache=True).logits
            tok = logits[:, -1:].argmax(-1)
            sync()
            t0 = time.perf_counter()
            for i in range(GEN - 1):
                if compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                tok = step(tok, cache, torch.tensor([P + i], device=DEVICE))[:, -1:].argmax(-1).clone()
            sync()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    loop()
    first = time.perf_counter() - t0
    dec = min(loop() for _ in range(1 if a.smoke else 2))
    return {"decode_tok_s": bs * (GEN - 1) / dec, "step_ms": dec / (GEN - 1) * 1e3, "first_run_s": first,
            "peer": "static KV + torch.compile reduce-overhead" if compiled else "static KV, eager"}


def bench_model(name: str) -> dict:
    kw, batches = MODELS[name]
    if a.batches:
        batches = tuple(int(b) for b in a.batches.split(","))
    arch = kw.get("arch", "Llama")
    cfg = getattr(transformers, kw.get("config", f"{arch}Config"))(max_position_embeddings=4096,
                                                                     **{k: v for k, v in kw.items() if k not in ("arch", "config")})
    torch.manual_seed(0)
    with torch.device(DEVICE):
        m = getattr(transformers, f"{arch}ForCausalLM")(cfg).to(DTYPE).eval()
    m.generation_config.eos_token_id = None
    config = kiln.CompileConfig(backend="kernels", quantize=a.quantize)
    t0 = time.perf_counter()
    g = kiln.from_hf(m, max_seq=a.max_seq or P + GEN, batch_buckets=batches, eos_token_id=[], config=config)
    res = {"compile_s": time.perf_counter() - t0, "params_B": sum(p.numel() for p in m.parameters()) / 1e9}
    prompt = torch.randint(0, cfg.vocab_size, (max(batches), P), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    g_off = None
    if a.ab_disable or SETS or ENV or a.ab_kernels or a.ab_config:
        forced = dict(kv.split("=") for kv in a.ab_kernels.split(",")) if a.ab_kernels else {}
        fields = {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in a.ab_config.split(","))} if a.ab_config else {}
        g_off = Variant(kiln.from_hf(m, max_seq=a.max_seq or P + GEN, batch_buckets=batches, eos_token_id=[],
                                     config=kiln.CompileConfig(backend="kernels", quantize=a.quantize, kernels=forced,
                                                               disable=[a.ab_disable] if a.ab_disable else [], **fields)))
    for bs in batches:
        res[f"bs{bs}"] = {"kiln": kiln_case(g, cfg.num_hidden_layers, bs, prompt)}
        print(name, bs, "kiln", json.dumps(res[f"bs{bs}"]["kiln"]), flush=True)
        show_timeline(name, bs, "kiln", res[f"bs{bs}"]["kiln"])
        if g_off is not None:
            res[f"bs{bs}"]["kiln_variant"] = kiln_case(g_off, cfg.num_hidden_layers, bs, prompt)
            res[f"bs{bs}"]["ab_tok_s"] = interleaved(g, g_off, bs, prompt)
            print(name, bs, f"kiln variant ({', '.join(str(v) for v in (a.ab_disable, a.ab_kernels, a.ab_config, SETS, ENV) if v)})",
                  json.dumps(res[f"bs{bs}"]["kiln_variant"]), flush=True)
            show_timeline(name, bs, "kiln variant", res[f"bs{bs}"]["kiln_variant"])
            print(name, bs, "interleaved tok/s (default, variant):", res[f"bs{bs}"]["ab_tok_s"], flush=True)
    g = g_off = None
    for bs in batches:
        compiled = not (a.smoke or a.no_compile_peer)
        res[f"bs{bs}"]["peer"] = peer_case(m, cfg, bs, prompt, compiled)
        res[f"bs{bs}"]["kiln_speedup"] = res[f"bs{bs}"]["kiln"]["decode_tok_s"] / res[f"bs{bs}"]["peer"]["decode_tok_s"]
        print(name, bs, "peer", json.dumps(res[f"bs{bs}"]["peer"]), flush=True)
    return res


def main():
    names = (["smoke"] if a.models == "1b,8b" else a.models.split(",")) if a.smoke else a.models.split(",")
    res = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
           "prompt": P, "new_tokens": GEN, "quantize": a.quantize, "max_seq": a.max_seq or P + GEN, "dtype": str(DTYPE)}
    for name in names:
        res[name] = bench_model(name)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    path = os.path.join(os.environ.get("OUT", "/tmp"), os.environ.get("DECODE_JSON", "decode.json"))
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
