"""The tuner's GEMM decisions in a kiln cache, every candidate's measured time: what a plan chose and by how much.

    python bench/tuning_dump.py CACHE_DIR [--rows N] [--top K]
    python bench/tuning_dump.py CACHE_DIR --refined        the decisions KILN_REFINE made again in a plan

CACHE_DIR is a ``KILN_CACHE_DIR`` (its ``tuning`` entries: codegen/tuning.py's decisions, each with ``ms`` per candidate);
``--rows`` keeps the GEMM / QGEMM decisions whose weight has N rows (e.g. 28672: the Llama-3.1-8B gate/up, GLU merged).
A line per decision (op, x, weight, norm prologue or not, choice), then its ``--top`` fastest candidates in us, the
launches charged past a candidate's first marked ``+n``, and every candidate that failed with its reason (it did not
compile or run, or its output differed from the first candidate's). ``--refined``: each decision runtime/refine.py made
again in a plan (the cache's ``refined`` entries): its choice alone, its choice in the step, and what each alternative
changed the step by (us, + slower).
"""
import argparse
import json
from pathlib import Path


def decisions(root: Path):
    """(what, decision) of every GEMM / QGEMM tuning entry under ``root``, read as data (JSON only)."""
    for path in sorted((root / "tuning").glob("*.json")):
        d = json.loads(path.read_text()).get("value") or {}
        what = d.get("what") or {}
        if what.get("op") in ("GEMM", "QGEMM") and "ms" in d:
            yield what, d


def refined(root: Path):
    """(what, decision measured alone, refinement) of every ``refined`` entry under ``root``."""
    for path in sorted((root / "refined").glob("*.json")):
        alone = root / "tuning" / path.name  # (the same key: the decision as measured alone)
        d = (json.loads(alone.read_text()).get("value") or {}) if alone.exists() else {}
        yield d.get("what") or {}, d, json.loads(path.read_text()).get("value") or {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache", type=Path)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--refined", action="store_true", help="the decisions KILN_REFINE made again in a plan")
    a = ap.parse_args()
    if a.refined:
        for what, d, r in refined(a.cache):
            print(what.get("op"), "x", what.get("x"), "weight", what.get("w") or what.get("qweight"), "bits", what.get("bits"),
                  "norm" if "norm" in what else "", "alone ->", r.get("alone"), "| in the step ->", r.get("choice"))
            for name, us in sorted(r.get("step_delta_us", {}).items(), key=lambda kv: kv[1]):
                print(f"    {us:+8.2f} us  {name}")
        return
    for what, d in decisions(a.cache):
        weight = what.get("w") or what.get("qweight")
        if a.rows is not None and (not weight or weight[0] != a.rows):
            continue
        extra = d.get("extra_launches", {})
        print(what["op"], "x", what.get("x"), "weight", weight, "bits", what.get("bits"), "norm" if "norm" in what else "",
              "->", d["choice"])
        for name, ms in sorted(d["ms"].items(), key=lambda kv: kv[1])[:a.top]:
            print(f"    {ms * 1e3:8.2f} us  {name}" + (f"  +{extra[name]}" if name in extra else ""))
        for name, why in d.get("failed", {}).items():  # (did not run, or its output differed: tuning.OutputCheck)
            print(f"    failed    {name}: {why}")


if __name__ == "__main__":
    main()
