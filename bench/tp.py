"""Tensor parallel decode (issue 16), launched with torchrun: one process per GPU, NCCL.

    torchrun --nproc-per-node 2 bench/tp.py [--models 8b,70b] [--new-tokens 128]     # 2 x H200; JSON on rank 0: $OUT/tp.json
    torchrun --nproc-per-node 2 bench/tp.py --smoke                                  # CPU, gloo, tiny shapes: the code paths only

- Llama-3.1-8B shape, random bf16 weights (the same on every rank): batch-1 greedy decode tokens/s at TP=2, and at TP=1
  on rank 0 (the other rank waits), from the same model. Goal: TP=2 >= 1.6x TP=1.
- Llama-70B shape at TP=2, random bf16 weights built per rank without the full model: captured on the meta device
  (CSE off: it compares weight values), sharded, then each rank fills only its own weights. Its tokens/s against the
  bandwidth limit: per-GPU HBM bandwidth / bytes each rank reads per token (its weights, the embedding table aside).
  Goal: >= 55% of the limit at the nominal 4.8 TB/s; the limit at a measured copy bandwidth is reported too.
- The collectives of one decode step alone (2 x layers ALL_REDUCE of [1, 1, hidden], the LM head's ALL_GATHER), replayed
  from a CUDA graph: time per token.
"""
import argparse
import dataclasses
import json
import os
import time

import torch
import torch.distributed as dist

import kiln
from kiln.api import CompiledModel, capture_model, tensor_parallel
from kiln.llm.generator import Generator, _shard_spec, cache_names, new_caches, step_function, step_inputs
from kiln.models.llama import LlamaConfig, LlamaForCausalLM, LlamaStep
from kiln.passes.pipeline import run_pipeline
from kiln.passes.report import Report

SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192),
    "70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192),
    "smoke": dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
}
NOMINAL_BW = 4.8e12  # H200 HBM3e, bytes/s per GPU


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_tok_s(g: Generator, prompt: list, new: int) -> float:
    g.generate([prompt], max_new_tokens=new)  # plans, tunes, captures the buckets
    r = min((g.generate([prompt], max_new_tokens=new) for _ in range(3)), key=lambda r: r.decode_s)
    return r.decode_steps / r.decode_s


def real_model(cfg: LlamaConfig, device, dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same weights on every rank
    with torch.device(device):
        m = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    m.reset_buffers()
    return m


def sharded_from_meta(cfg: LlamaConfig, device, dtype, max_seq: int) -> Generator:
    """This rank's generator for ``cfg`` with random weights, never holding the whole model: the step graph captured on
    the meta device, run through the pipeline (sharded), then only this rank's weights made, on ``device``."""
    world = dist.get_world_size()
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    L = cfg.num_hidden_layers
    spec = dict(vocab_size=cfg.vocab_size, num_layers=L, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                sliding_window=None, max_seq=max_seq, batch_buckets=[1], dtype=str(dtype).removeprefix("torch."), eos=[])
    example = step_inputs(torch.zeros(1, 2, dtype=torch.long, device="meta"), torch.zeros(1, dtype=torch.long), 0,
                          new_caches(spec, 1, dtype, "meta"), max_seq, None)
    dims = {"input_ids": {0: ("batch", 1, 1), 1: ("seq", 1, max_seq)}, "positions": {0: "batch", 1: "seq"}, "slots": {0: "seq"},
            "mask": {0: "batch", 2: "seq"}, **{n: {0: "batch"} for n in cache_names(L)}}
    config = kiln.CompileConfig(tp=world, disable=("cse",), device=str(device))
    report = Report()
    src = capture_model(step_function(LlamaStep(model), L), (), example, dims, report)
    rank, _ = tensor_parallel(config)
    run_pipeline(src.graph, config.disable, report, tp=(rank, world))
    gen = torch.Generator(device).manual_seed(rank)
    for name, t in src.graph.weights.items():  # (every big weight is one GEMM's own after sharding)
        w = torch.empty(t.shape, dtype=t.dtype, device=device)
        src.graph.weights[name] = w.normal_(0.0, 0.02, generator=gen) if w.dim() > 1 else w.fill_(1.0)
    compiled = CompiledModel(src.graph, src.signature, dataclasses.replace(config, tp_rank=rank), report)
    _shard_spec(spec, compiled)
    return Generator(compiled, spec)


def read_bytes_per_token(g: Generator) -> int:
    """Bytes of weights a decode step reads on this rank: every weight but the embedding table (B rows of it)."""
    graph = g.compiled.graph
    tables = {n.inputs[0].attrs["name"] for n in graph.nodes if n.op == "EMBEDDING" and n.inputs[0].op == "WEIGHT"}
    return sum(t.numel() * t.element_size() for k, t in graph.weights.items() if k not in tables)


def collectives_ms(cfg: LlamaConfig, device, dtype, reps: int = 200) -> float:
    """One decode step's collectives alone: 2 x layers all-reduces of [1, 1, hidden], one all-gather of [1, vocab / world]."""
    world = dist.get_world_size()
    xs = [torch.randn(1, 1, cfg.hidden_size, device=device, dtype=dtype) for _ in range(2 * cfg.num_hidden_layers)]
    piece = torch.randn(1, cfg.vocab_size // world, device=device, dtype=dtype)
    gathered = torch.empty(world, cfg.vocab_size // world, device=device, dtype=dtype)

    def step():
        for x in xs:
            dist.all_reduce(x)
        dist.all_gather_into_tensor(gathered, piece)
    step()
    run = step
    if device.type == "cuda":
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            step()
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph, stream=s):
                step()
        run = cuda_graph.replay
    sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    sync(device)
    return (time.perf_counter() - t0) / reps * 1e3


def copy_bandwidth(device) -> float:
    """Bytes/s of a device-to-device copy of 4 GiB (read + write), the best of 5."""
    if device.type != "cuda":
        return 0.0
    a = torch.empty(1 << 31, dtype=torch.int16, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 2 / best


def bench_8b(name: str, device, dtype, new: int, res: dict) -> None:
    cfg = LlamaConfig(**SHAPES[name])
    model = real_model(cfg, device, dtype)
    prompt = [t % cfg.vocab_size for t in range(1, 129)]
    max_seq = len(prompt) + new + 16
    g2 = Generator.compile(model, max_seq=max_seq, batch_buckets=(1,), tp=dist.get_world_size(), eos_token_id=[])
    res[f"{name}_tp{dist.get_world_size()}_tok_s"] = decode_tok_s(g2, prompt, new)
    del g2
    dist.barrier()
    if dist.get_rank() == 0:
        g1 = Generator.compile(model, max_seq=max_seq, batch_buckets=(1,), eos_token_id=[])
        res[f"{name}_tp1_tok_s"] = decode_tok_s(g1, prompt, new)
        res[f"{name}_speedup"] = res[f"{name}_tp{dist.get_world_size()}_tok_s"] / res[f"{name}_tp1_tok_s"]
        del g1
    dist.barrier()
    res[f"{name}_collectives_ms_per_token"] = collectives_ms(cfg, device, dtype)


def bench_70b(name: str, device, dtype, new: int, res: dict) -> None:
    cfg = LlamaConfig(**SHAPES[name])
    prompt = [t % cfg.vocab_size for t in range(1, 129)]
    g = sharded_from_meta(cfg, device, dtype, len(prompt) + new + 16)
    tok_s = decode_tok_s(g, prompt, new)
    per_rank = read_bytes_per_token(g)
    bw = copy_bandwidth(device)
    res.update({f"{name}_tp{dist.get_world_size()}_tok_s": tok_s, f"{name}_read_GB_per_token_per_rank": per_rank / 1e9,
                f"{name}_limit_tok_s_nominal": NOMINAL_BW / per_rank, f"{name}_fraction_of_nominal_limit": tok_s * per_rank / NOMINAL_BW,
                f"{name}_copy_bw_TBs": bw / 1e12, f"{name}_fraction_of_copy_bw_limit": tok_s * per_rank / bw if bw else None,
                f"{name}_collectives_ms_per_token": collectives_ms(cfg, device, dtype)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="8b,70b")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shapes")
    a = ap.parse_args()
    cuda = not a.smoke
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    res = {"world": dist.get_world_size(), "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "new_tokens": a.new_tokens, "prompt": 128}
    for m in (["smoke"] if a.smoke else a.models.split(",")):
        t0 = time.perf_counter()
        new = min(a.new_tokens, 8) if a.smoke else a.new_tokens
        (bench_70b if m == "70b" else bench_8b)(m, device, dtype, new, res)
        if m == "smoke":
            bench_70b("smoke", device, dtype, new, res)  # (the meta-device path too)
        res[f"{m}_wall_s"] = time.perf_counter() - t0
        if dist.get_rank() == 0:
            print(json.dumps({k: v for k, v in res.items() if k.startswith(m)}), flush=True)
    if dist.get_rank() == 0:
        path = os.path.join(os.environ.get("OUT", "/tmp"), "tp.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        print("wrote", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
