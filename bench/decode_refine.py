"""Does the tuner pick a decode step's kernels as the whole step would? Each decision of the decode plan re-decided by
timing the whole step, its CUDA graph replayed, with each near-tie alternative in it.

The tuner times a decode decision's candidates alone, after the L2 is flushed (codegen/tuning.py: "weights": "cold").
In the plan each runs in a chain of PDL launches and reads its first weight words before its wait, while the kernel
before it finishes (the 4-bit peel: +7.8% at the same choices, bench/NOTES.md session 29), so its place in the chain
may rank the candidates otherwise. Here the generator is compiled and tuned as usual; then the decode plan of one
batch bucket is built again once per (decision, alternative), the alternatives being every candidate the tuner
measured within ``--margin`` of its choice (launch charges included, as the tuner compares them), and all the plans'
step replays are timed interleaved: ``--rounds`` rounds of ``--reps`` replays of each plan, the median over the rounds
of each round's median, so a drift of the machine biases none. A second plan built with the tuner's choices ("again")
gives the noise floor. Then every alternative that gained more than ``--min-gain`` of the step and more than twice
the noise is taken at once ("combined"), timed against the tuner's plan, and decode tok/s of the two compared by
interleaved generate runs (prompt 128, 256 new tokens, greedy) with the tuner's decisions switched between them.

    python3 bench/decode_refine.py --models 1b --quantize w4a16 [--batch 1]   writes $OUT/decode_refine_<model>_<quant>.json
    python3 bench/decode_refine.py --models 1b --quantize w4a16 --set kernels.skinny.WHOLE_K_WORDS=1    ..._set.json
    python3 bench/decode_refine.py --smoke    CPU: a tiny Llama under the Triton interpreter (the procedure, not its times)
"""
import argparse
import contextlib
import importlib
import os
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--models", default="1b")
ap.add_argument("--quantize", default=None, help="w8a16, w4a16, ... (default: bf16)")
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--margin", type=float, default=0.25, help="alternatives within this share of the choice's time alone")
ap.add_argument("--max-alts", type=int, default=3, help="alternatives tried per decision, fastest alone first")
ap.add_argument("--rounds", type=int, default=9)
ap.add_argument("--reps", type=int, default=30)
ap.add_argument("--min-gain", type=float, default=0.003, help="share of the step an alternative must gain to be combined")
ap.add_argument("--set", default=None, help="module constants of kiln.codegen set for the whole run, MODULE.NAME=NUMBER[,..] "
                "(e.g. kernels.skinny.WHOLE_K_WORDS=1: its candidates measured alone and in the step too)")
ap.add_argument("--smoke", action="store_true", help="a tiny Llama on the CPU (Triton interpreter)")
a = ap.parse_args()
os.environ.setdefault("KILN_REFINE", "0")  # (the tuner's choices as measured alone are what this bench times against)
if a.smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    a.rounds, a.reps, a.max_alts, a.margin = 1, 1, 1, float("inf")  # (every decision's first alternative, taken
    # into "combined" whatever its time: the procedure runs end to end)

import torch  # noqa: E402
import transformers  # noqa: E402

import kiln  # noqa: E402
from kiln.runtime import refine as refine_lib  # noqa: E402
from kiln.testing import rel_err  # noqa: E402

from common import write_json  # noqa: E402

for kv in (a.set.split(",") if a.set else []):  # (before anything is compiled: the tuner's keys and candidates see them)
    name, value = kv.split("=")
    mod, _, attr = name.rpartition(".")
    setattr(importlib.import_module(f"kiln.codegen.{mod}"), attr, float(value) if "." in value else int(value))

MODELS = {  # transformers LlamaConfig kwargs (bench/decode.py's shapes)
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0),
    "smoke": dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
}
P, GEN = (6, 4) if a.smoke else (128, 256)  # prompt, new tokens
MAX_SEQ = P + GEN + (16 if a.smoke else 0)  # (bench/decode.py's cache: the keys a decode attention reads the same)
DEVICE = torch.device("cpu" if a.smoke else "cuda")
DTYPE = torch.float32 if a.smoke else torch.bfloat16
# the smoke run's attention and RoPE forced (the interpreter takes seconds a candidate there): its GEMMs are refined
SMOKE_KERNELS = {"attention": "sdpa", "rope_kv": "separate"}
CHECK_TOL = 0.05  # a variant plan's logits against the tuner's plan's, relative (bf16 roundings differ by ~1e-2)


def median(xs: list) -> float:
    return sorted(xs)[len(xs) // 2]


def interleaved_ms(plans: dict) -> dict:
    """name -> ms of a step replay: refine.timed's interleaved rounds over the plans (each replayed as it stands)."""
    return refine_lib.timed({name: (None, p) for name, p in plans.items()}, DEVICE, a.rounds, a.reps)


class Decode:
    """The generator's decode plan of bucket ``a.batch`` at slot P, built afresh from the tuner's decisions as they are."""

    def __init__(self, g):
        self.g, self.ex = g, g.compiled.executor
        self.tuner = self.ex.tuner
        self.logits = None  # the first plan's (the tuner's choices), which every later plan's must match
        ids = torch.zeros(a.batch, 1, dtype=torch.long, device=DEVICE)
        self.inputs = list(g._inputs(ids, torch.zeros(a.batch, dtype=torch.long), P, g.caches(a.batch)).values())

    def fresh(self, seen: dict | None = None):
        """A new plan (the executor's own dropped, so it builds one), bound to the inputs and replayed once. ``seen``:
        filled with the tuning key of each decision the plan's calls consult, and how many calls consult it."""
        self.ex._plans.clear()
        if seen is not None:
            known = self.tuner._known

            def spy(k, candidates):
                d, origin = known(k, candidates)
                if d is not None and not self.tuner.is_surveying:  # (not the start-up survey's pass)
                    seen[k] = seen.get(k, 0) + 1
                return d, origin
            self.tuner._known = spy
        try:
            plan = self.ex.plan_for(self.inputs)
        finally:
            self.tuner.__dict__.pop("_known", None)
        self.ex._plans.clear()
        plan.bind(self.inputs)
        logits = plan.replay()[self.ex.graph.output_names.index("output")].float()
        if self.logits is None:
            self.logits = logits.clone()
        elif (err := rel_err(logits, self.logits)) > CHECK_TOL:  # (an alternative the tuner's output check let through)
            raise ValueError(f"its logits differ from the tuner's plan's by {err:.3g} (relative)")
        return plan


def describe(d: dict) -> str:
    w = d["what"]
    weight = w.get("w") or w.get("qweight")
    parts = [d["kind"], w.get("op", "")] + ([f"weight {weight}"] if weight else []) + (
        [f"int{w['bits']}"] if w.get("bits") else []) + [f for f in ("norm", "glu", "residual") if w.get(f)]
    if w.get("op") == "ATTENTION":
        parts.append(f"keys {w['k'][2]}")
    return " ".join(str(p) for p in parts)


@contextlib.contextmanager
def with_choices(tuner, choices: dict):
    """The tuner's in-memory decisions with ``choices`` (key -> candidate name) in force, inside."""
    before = {k: tuner.decisions[k] for k in choices}
    for k, c in choices.items():
        tuner.decisions[k] = dict(before[k], choice=c)
    try:
        yield
    finally:
        tuner.decisions.update(before)


def tok_s(g, dec: Decode, choices: dict, prompt: list, rounds: int) -> list:
    """Decode tok/s of the tuner's plans and of ``choices``' plans, generate runs interleaved: [best, median] of each,
    and whether the two gave the same greedy tokens."""
    runs, tokens = ([], []), [None, None]
    for _ in range(rounds):
        for k, ch in enumerate(({}, choices)):
            with with_choices(dec.tuner, ch):
                dec.ex._plans.clear()
                g.generate(prompt, max_new_tokens=4)  # (the plans built and captured outside the timed run)
                r = g.generate(prompt, max_new_tokens=GEN)
            runs[k].append(a.batch * r.decode_steps / r.decode_s)
            tokens[k] = r.tokens
    dec.ex._plans.clear()
    return {"tok_s": [[round(max(t)), round(median(t))] for t in runs], "same_tokens": tokens[0] == tokens[1]}


def refine(name: str) -> dict:
    cfg = transformers.LlamaConfig(max_position_embeddings=4096, **MODELS[name])
    torch.manual_seed(0)
    with torch.device(DEVICE):
        m = transformers.LlamaForCausalLM(cfg).to(DTYPE).eval()
    m.generation_config.eos_token_id = None
    g = kiln.from_hf(m, max_seq=MAX_SEQ, batch_buckets=(a.batch,), eos_token_id=[],
                     config=kiln.CompileConfig(backend="kernels", quantize=a.quantize, kernels=SMOKE_KERNELS if a.smoke else {}))
    prompt = torch.randint(0, cfg.vocab_size, (a.batch, P), generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.perf_counter()
    g.generate(prompt, max_new_tokens=4)  # tunes, plans and captures
    res = {"first_generate_s": round(time.perf_counter() - t0, 2)}
    dec = Decode(g)
    seen: dict = {}
    plans = {"plan": dec.fresh(seen), "again": dec.fresh()}  # (the tuner's choices, twice: the noise)
    res["choices"] = dict(plans["plan"].stats.choices)
    decisions, variants = {}, {}
    for k, uses in list(seen.items())[:3 if a.smoke else None]:  # (the smoke run: three decisions' alternatives)
        d = dec.tuner.decisions[k]
        if "ms" not in d:
            continue
        decisions[k] = {"what": describe(d), "uses": uses, "choice": d["choice"],
                        "alone_us": {n: round(t * 1e3, 2) for n, t in sorted(refine_lib.charged(d).items(), key=lambda kv: kv[1])}}
        for alt in refine_lib.alternatives(d, d["choice"], a.margin, a.max_alts):
            with with_choices(dec.tuner, {k: alt}):
                try:
                    variants[(k, alt)] = dec.fresh()
                except Exception as e:  # noqa: BLE001  (a combination the plan cannot build, or wrong logits: recorded)
                    decisions[k].setdefault("failed", {})[alt] = f"{type(e).__name__}: {e}"[:300]
    print(f"{name}: {len(decisions)} decisions, {len(variants)} alternatives", flush=True)
    names = {f"{k[:12]} {alt}": (k, alt) for k, alt in variants}
    ms = interleaved_ms(plans | {name: variants[ka] for name, ka in names.items()})
    base, noise = ms["plan"], abs(ms["again"] - ms["plan"])
    res |= {"step_ms": base, "noise_ms": noise}
    for name, (k, alt) in names.items():
        decisions[k].setdefault("step_delta_us", {})[alt] = round((ms[name] - base) * 1e3, 2)
    res["decisions"] = list(decisions.values())
    for k, v in decisions.items():
        print(f"  x{v['uses']:<3d} {v['what']}: {v['choice']} -> step {v.get('step_delta_us', {})} us "
              f"(alone {dict(list(v['alone_us'].items())[:4])})", flush=True)
    combined = refine_lib.winners(ms, names, a.min_gain)
    if a.smoke:
        combined = {k: alt for (k, alt) in variants}
    res["combined"] = {decisions[k]["what"]: alt for k, alt in combined.items()}
    print(f"  step {base:.4f} ms, noise {noise * 1e3:.2f} us; combined: {res['combined'] or 'none'}", flush=True)
    if combined:
        with with_choices(dec.tuner, combined):
            plans["combined"] = dec.fresh()
        both = interleaved_ms({"tuner": plans["plan"], "combined": plans["combined"]})
        res["combined_step_ms"] = both
        res |= tok_s(g, dec, combined, prompt, 1 if a.smoke else 3)
        print(f"  combined step {both}, tok/s [tuner, combined] {res['tok_s']}, same tokens {res['same_tokens']}", flush=True)
    return res


def main() -> None:
    names = ["smoke"] if a.smoke else a.models.split(",")
    res = {"device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", "quantize": a.quantize,
           "batch": a.batch, "args": vars(a)}
    for name in names:
        res[name] = refine(name)
        tag = "_set" if a.set else ""
        write_json(res, f"decode_refine_{'_'.join(names)}_{a.quantize or 'bf16'}{tag}.json")


if __name__ == "__main__":
    main()
