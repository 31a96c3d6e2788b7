"""One rank of the tensor-parallel tests: ``python ranks.py SCENARIO OUT_DIR`` with RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT set as torchrun sets them (``launch`` below starts the ranks). Each rank writes what it saw to
``OUT_DIR/rank{R}.pt``; the tests compare those files."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
# Qwen2: biases on q / k / v; one kv head, so at two ranks each rank holds a copy of it. Qwen3: q / k norms over each
# head's dims (a head is never split between ranks, so they shard with it). Gemma 2: soft-capped attention scores, a
# sliding layer's window_mask beside the full one's mask
MODELS = {"Llama": {}, "Qwen2": dict(num_key_value_heads=1), "Qwen3": dict(head_dim=16),
          "Gemma2": dict(head_dim=8, sliding_window=6, attn_logit_softcapping=2.0, attn_implementation="eager")}
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13]]
NEW_TOKENS = 10


def hf_model(kind: str):
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, f"{kind}Config")(**{**TINY, **MODELS[kind]})
    m = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # larger weights: logits far apart, so greedy choices are not near-ties
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    m.generation_config.eos_token_id = None
    return m


def hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def step_logits(g, steps: int = 2) -> list[torch.Tensor]:
    """The logits of a prefill of PROMPTS (left-padded) and of ``steps`` greedy decode steps after it."""
    T = 16
    pad = torch.tensor([T - len(p) for p in PROMPTS])
    ids = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])
    caches = g.caches(len(PROMPTS))
    for c in caches.values():
        c.zero_()
    out = []
    for s in range(steps + 1):
        logits = g.compiled.run(list(g._inputs(ids, pad, 0 if s == 0 else T + s - 1, caches).values()))[0]
        out.append(logits.clone())
        ids = logits.argmax(-1, keepdim=True)
    return out


def equivalence(rank: int, world: int, out: Path) -> dict:
    """Per model: the logits of TP=1 and of this rank at TP=world; the greedy tokens of this rank's shard saved and
    loaded back (Llama) or as compiled (Qwen2), and transformers' (rank 0)."""
    import kiln

    got = {}
    for kind in MODELS:
        hf = hf_model(kind)
        whole = kiln.from_hf(hf, max_seq=64, batch_buckets=(2,), eos_token_id=[])
        shard = kiln.from_hf(hf, max_seq=64, batch_buckets=(2,), eos_token_id=[], tp=world)
        got[kind] = dict(whole=step_logits(whole), shard=step_logits(shard), kv_heads=shard.spec["kv_heads"],
                         report=shard.compiled.report().to_dict()["passes"]["shard_tensor_parallel"],
                         hf=[hf_greedy(hf, p, NEW_TOKENS) for p in PROMPTS] if rank == 0 else None)
        if kind == "Llama":
            got[kind]["saved"] = Path(shard.save(out / f"{kind}.kiln")).name
            shard = kiln.Generator.load(out / f"{kind}.kiln")
        got[kind]["tokens"] = shard.generate(PROMPTS, NEW_TOKENS).tokens
    return got


def wrong_rank(rank: int, world: int, out: Path) -> dict:
    """Each rank loads the other rank's shard (written offline by the test): the error it raises."""
    import kiln

    try:
        kiln.Generator.load(out / f"gen.rank{(rank + 1) % world}-of-{world}.kiln")
    except kiln.KilnError as e:
        return {"error": str(e)}
    return {"error": None}


def collectives(rank: int, world: int, out: Path) -> dict:
    """ALL_REDUCE and ALL_GATHER (axis 1; stride 1 and world) as the reference interpreter runs them in float64 and as
    the kernels plan launches them (``collective_call``), on this rank's x = rank + 1 + [0, 1, ..)."""
    from kiln.codegen.schedule import Group
    from kiln.ir.graph import Graph
    from kiln.ir.interpret import interpret
    from kiln.runtime.kernel_calls import collective_call

    x = torch.arange(12, dtype=torch.float32).reshape(3, 4) + rank + 1
    got = {}
    for op, attrs in (("ALL_REDUCE", {}), ("ALL_GATHER", dict(axis=1)), ("ALL_GATHER", dict(axis=1, stride=world))):
        g = Graph()
        node = g.add(op, [g.add_input("x", (3, 4), "float32")], world=world, **attrs)
        g.set_outputs([node])
        (ref,) = interpret(g, [x], compute_dtype=torch.float64)
        buf = torch.full(node.shape, float("nan"))
        collective_call(Group("reference", [node]), op, x, node.attrs, buf).run()
        got[f"{op}{attrs}"] = (ref, buf)
    return got


SCENARIOS = {"collectives": collectives, "equivalence": equivalence, "wrong_rank": wrong_rank}


def main() -> None:
    import torch.distributed as dist

    scenario, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = SCENARIOS[scenario](rank, world, out)
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def launch(scenario: str, out: Path, world: int = 2, timeout: float = 300) -> list:
    """Run ``scenario`` on ``world`` ranks (one process each, gloo over localhost); each rank's result."""
    import kiln

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(kiln.__file__)), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, __file__, scenario, str(out)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for r, (p, log) in enumerate(zip(procs, logs)):
        if p.returncode:
            raise AssertionError(f"rank {r} failed ({p.returncode}):\n{log[-4000:]}")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


if __name__ == "__main__":
    main()
