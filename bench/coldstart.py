"""Cold compile and warm start, each in a fresh process: DiT-XL/2 (bf16, tied embedders) or a Llama-3.2-1B shape
generator (bf16, random weights, batch bucket 1).

cold: empty kiln and Triton caches; build the model (not timed), compile (kiln.compile / kiln.from_hf), the first
      output (DiT: one forward at --batch; Llama: generate 8 tokens from a 16-token prompt), which plans, compiles
      Triton kernels, measures kernel choices and captures CUDA graphs; save the artifact.
warm: a second process, same caches: load the artifact (kiln.load / kiln.Generator.load) and its first output.
Each phase records the plans' phase times and its imports (torch, kiln) apart; with --profile also where its time went
(cProfile: top 40 by cumulative time, and the whole profile as a .pstats file). The profiler slows Python ~2x, so the
timed figures are from runs without it.
Issue 12's goals: cold compile to first output <= 25 s (DiT-XL/2), <= 15 s (1B); warm <= 4 s (DiT-XL/2).
Usage: python3 bench/coldstart.py [--model dit|llama-1b] [--batch 8] [--tag T] [--profile]. Writes $OUT/coldstart_<model><T>.json and
each phase's whole profile as $OUT/coldstart_<model><T>_<phase>.pstats (read it with pstats: callers, callees)."""
import argparse
import cProfile
import io
import json
import pstats
import os
import subprocess
import sys
import tempfile
import time

T_START = time.time()
# heavy modules a warm start should not need: the stack that first imports each is recorded (r["import_stacks"])
WATCH = ("torch._dynamo", "torch._inductor", "torch.distributed.fsdp", "diffusers", "transformers", "onnx")
IMPORT_STACKS: dict = {}


class _ImportWatch:
    """A meta-path finder that finds nothing: it records who imports a WATCH module first."""

    def find_spec(self, name, path, target=None):
        if name in WATCH and name not in IMPORT_STACKS:
            import traceback
            IMPORT_STACKS[name] = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_stack()[-16:-1]]
        return None


sys.meta_path.insert(0, _ImportWatch())


class _NoProfile:
    def enable(self):
        pass

    def disable(self):
        pass


def _imports(r: dict) -> None:
    """Import torch, then kiln, timing each into ``r``."""
    t0 = time.time()
    import torch  # noqa: F401
    r["import_torch_s"] = time.time() - t0
    t0 = time.time()
    import kiln  # noqa: F401
    r["import_kiln_s"] = time.time() - t0


def llama_child(phase: str, path: str, r: dict, prof) -> object:
    """The Llama-3.2-1B shape's phase: the generator, its first 8 tokens timed into ``r``."""
    import torch
    import transformers

    import kiln

    prompt = [list(range(100, 116))]
    prof.enable()
    t0 = time.time()
    if phase == "cold":
        cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                                       rope_theta=500000.0, max_position_embeddings=4096)
        torch.manual_seed(0)
        with torch.device("cuda"):
            m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        r["model_build_s"] = time.time() - t0
        t0 = time.time()
        g = kiln.from_hf(m, max_seq=256, batch_buckets=(1,), eos_token_id=[])
        r["compile_s"] = time.time() - t0
    else:
        g = kiln.Generator.load(path)
        r["load_s"] = time.time() - t0
    t1 = time.time()
    g.generate(prompt, max_new_tokens=8)
    torch.cuda.synchronize()
    r["first_output_s"] = time.time() - t1
    r[("compile" if phase == "cold" else "load") + "_to_first_output_s"] = time.time() - t0
    if phase == "cold":
        g.save(path, overwrite=True)
    return g.compiled


def child(phase: str, batch: int, path: str, model: str, profile: bool) -> dict:
    r = {"phase": phase}
    _imports(r)
    import torch

    import kiln
    from kiln.testing import DIT_DYNAMIC, dit_inputs, dit_xl2

    prof = cProfile.Profile() if profile else _NoProfile()
    if model == "llama-1b":
        r["import_s"] = time.time() - T_START
        m = llama_child(phase, path, r, prof)
        return _finish(r, prof, m)
    r["import_s"] = time.time() - T_START
    x = dit_inputs(batch)
    prof.enable()
    t0 = time.time()
    if phase == "cold":
        model = dit_xl2(tied=True, device="cuda").to(torch.bfloat16)
        r["model_build_s"] = time.time() - t0
        t0 = time.time()
        m = kiln.compile(model, (), dit_inputs(2), dynamic=DIT_DYNAMIC)
        r["compile_s"] = time.time() - t0
    else:
        m = kiln.load(path)
        r["load_s"] = time.time() - t0
    t1 = time.time()
    with torch.no_grad():
        m(**x)
    torch.cuda.synchronize()
    r["first_output_s"] = time.time() - t1
    r[("compile" if phase == "cold" else "load") + "_to_first_output_s"] = time.time() - t0
    if phase == "cold":
        m.save(path, overwrite=True)
    return _finish(r, prof, m)


def _finish(r: dict, prof, m) -> dict:
    r["process_to_first_output_s"] = time.time() - T_START
    prof.disable()
    r["import_stacks"] = IMPORT_STACKS
    r["executor"] = m.executor.describe()
    if isinstance(prof, _NoProfile):
        return r
    prof.dump_stats(os.environ["COLDSTART_PSTATS"] + f"_{r['phase']}.pstats")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
    r["profile_top40_cumulative"] = out.getvalue().splitlines()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    r["profile_top25_tottime"] = out.getvalue().splitlines()
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--model", choices=["dit", "llama-1b"], default="dit")
    ap.add_argument("--phase", choices=["cold", "warm"])
    ap.add_argument("--artifact")
    ap.add_argument("--tag", default="", help="added to the output files' names (A/B runs of one model)")
    ap.add_argument("--profile", action="store_true", help="profile each phase (slower: the figures are not the timed ones)")
    a = ap.parse_args()
    if a.phase:
        print("RESULT " + json.dumps(child(a.phase, a.batch, a.artifact, a.model, a.profile)), flush=True)
        return
    tmp = tempfile.mkdtemp(prefix="kiln-coldstart-")
    env = dict(os.environ, KILN_CACHE_DIR=os.path.join(tmp, "kiln"), TRITON_CACHE_DIR=os.path.join(tmp, "triton"))
    path = os.path.join(tmp, f"{a.model}.kiln")
    out = os.path.join(os.environ.get("OUT", "/tmp"), f"coldstart_{a.model}{a.tag}")
    env["COLDSTART_PSTATS"] = out
    res = {"model": a.model, "batch": a.batch, "runs": []}
    for phase in ("cold", "warm"):
        t0 = time.time()
        p = subprocess.run([sys.executable, __file__, "--phase", phase, "--batch", str(a.batch), "--artifact", path,
                            "--model", a.model] + ["--profile"] * a.profile,
                           env=env, capture_output=True, text=True)
        line = [s for s in p.stdout.splitlines() if s.startswith("RESULT ")]
        if p.returncode or not line:
            sys.exit(f"{phase} failed:\n{p.stderr[-3000:]}")
        r = json.loads(line[0][7:])
        r["wall_s"] = time.time() - t0
        res["runs"].append(r)
        print({k: v for k, v in r.items() if not k.startswith(("executor", "profile_", "import_stacks"))}, flush=True)
    import torch

    res["device"] = torch.cuda.get_device_name()
    with open(out + ".json", "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
