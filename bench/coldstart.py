"""Cold compile and warm start of DiT-XL/2 (bf16, tied embedders), each in a fresh process.

cold: empty kiln and Triton caches; build the model (not timed), kiln.compile, the first output at --batch
      (planning, Triton compiles, measured kernel choices, CUDA graph capture), save the artifact.
warm: a second process, same caches: kiln.load(artifact) and its first output at --batch.
Each phase also records where its time went (cProfile, top 40 by cumulative time).
Usage: python3 bench/coldstart.py [--batch 8]. Writes $OUT/coldstart.json."""
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


def child(phase: str, batch: int, path: str) -> dict:
    import torch

    import kiln
    from kiln.testing import DIT_DYNAMIC, dit_inputs, dit_xl2

    r = {"phase": phase, "import_s": time.time() - T_START}
    x = dit_inputs(batch)
    prof = cProfile.Profile()
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
    r["process_to_first_output_s"] = time.time() - T_START
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
    r["profile_top40_cumulative"] = out.getvalue().splitlines()
    r["executor"] = m.executor.describe()
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--phase", choices=["cold", "warm"])
    ap.add_argument("--artifact")
    a = ap.parse_args()
    if a.phase:
        print("RESULT " + json.dumps(child(a.phase, a.batch, a.artifact)), flush=True)
        return
    tmp = tempfile.mkdtemp(prefix="kiln-coldstart-")
    env = dict(os.environ, KILN_CACHE_DIR=os.path.join(tmp, "kiln"), TRITON_CACHE_DIR=os.path.join(tmp, "triton"))
    path = os.path.join(tmp, "dit.kiln")
    res = {"batch": a.batch, "runs": []}
    for phase in ("cold", "warm"):
        t0 = time.time()
        p = subprocess.run([sys.executable, __file__, "--phase", phase, "--batch", str(a.batch), "--artifact", path],
                           env=env, capture_output=True, text=True)
        line = [s for s in p.stdout.splitlines() if s.startswith("RESULT ")]
        if p.returncode or not line:
            sys.exit(f"{phase} failed:\n{p.stderr[-3000:]}")
        r = json.loads(line[0][7:])
        r["wall_s"] = time.time() - t0
        res["runs"].append(r)
        print({k: v for k, v in r.items() if k not in ("executor", "profile_top40_cumulative")}, flush=True)
    import torch

    res["device"] = torch.cuda.get_device_name()
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "coldstart.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
