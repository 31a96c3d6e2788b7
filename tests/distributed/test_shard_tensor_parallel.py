"""passes/shard_tensor_parallel.py without processes: the shards of a hand-built decoder block (merged QKV with
biases, GQA attention over a KV cache, GLU MLP, residuals fused into the row GEMMs, an LM head) have the shapes
Megatron's split gives, ALL_REDUCE right after each row-parallel GEMM, and, run in lock step in one process (the
collectives computed across the ranks' values), the whole graph's outputs in float64; GEMMs whose split cannot
reach a row GEMM stay replicated, with the reason."""
import pytest
import torch

from kiln.ir.graph import Graph
from kiln.ir.interpret import eval_node
from kiln.ir.serialize import graph_from_json, graph_to_json
from kiln.ir.types import sym
from kiln.passes.shard_tensor_parallel import shard_tensor_parallel
from kiln.testing import TOL, rel_err

B, T, S, D, HD, F, V = 2, 3, 8, 16, 4, 24, 12
BATCH = sym("batch")


def block(heads: int, kv_heads: int, vocab: int = V) -> Graph:
    """x [batch, T, D] -> (k cache's new value, v cache's, logits [batch, T, vocab])."""
    gen = torch.Generator().manual_seed(0)
    g = Graph()
    g.symbols = {"batch": (1, 4)}
    x = g.add_input("x", (BATCH, T, D), "float32")
    mask = g.add_input("mask", (BATCH, 1, T, S), "bool")
    slots = g.add_input("slots", (T,), "int64")
    caches = [g.add_input(f"{kv}_cache", (BATCH, kv_heads, S, HD), "float32") for kv in "kv"]

    def w(name, *shape):
        return g.add_weight(name, torch.randn(*shape, generator=gen, dtype=torch.float32) / shape[-1] ** 0.5)

    widths = (heads * HD, kv_heads * HD, kv_heads * HD)
    qkv = g.add("LINEAR", [x, w("qkv.weight", sum(widths), D), w("qkv.bias", sum(widths))])
    q, k, v = (g.add("PERMUTE", [g.add("RESHAPE", [g.add("SLICE", [qkv], axis=2, start=sum(widths[:i]), end=sum(widths[:i + 1]))],
                                       shape=(BATCH, T, widths[i] // HD, HD))], perm=(0, 2, 1, 3)) for i in range(3))
    k = g.add("INDEX_COPY", [caches[0], slots, g.add("SILU", [k])], axis=2)  # (an elementwise op on a split value)
    v = g.add("INDEX_COPY", [caches[1], slots, v], axis=2)
    a = g.add("ATTENTION", [q, k, v, mask], gqa=heads != kv_heads)
    a = g.add("RESHAPE", [g.add("PERMUTE", [a], perm=(0, 2, 1, 3))], shape=(BATCH, T, heads * HD))
    h = g.add("GEMM", [a, w("o.weight", D, heads * HD), x], residual=True)
    n = g.add("RMSNORM", [h, w("norm.weight", D)], eps=1e-5)
    m = g.add("GEMM", [n, w("gate_up.weight", 2 * F, D)], act="silu", glu=True)
    h = g.add("GEMM", [m, w("down.weight", D, F), w("down.bias", D), h], bias=True, residual=True)
    logits = g.add("LINEAR", [h, w("head.weight", vocab, D)])
    g.set_outputs([k, v, logits], ["k_cache:updated", "v_cache:updated", "logits"])
    g.updates = {"k_cache:updated": "k_cache", "v_cache:updated": "v_cache"}
    g.verify()
    return g


def shards(g: Graph, world: int):
    out = []
    for r in range(world):
        s = graph_from_json(graph_to_json(g), dict(g.weights))
        out.append((s, shard_tensor_parallel(s, r, world)))
        s.verify()
    return out


def run_in_lock_step(graphs: list[Graph], inputs: list[list]) -> list[list]:
    """Every rank's graph in float64, one process: each rank runs to its next collective, which is then computed from
    all ranks' operands (sum; concat of every stride-th piece)."""
    def rank(g, xs):
        env = {i: t.double() if t.is_floating_point() else t for i, t in zip(g.inputs, xs)}
        for n in g.nodes:
            if n.op == "WEIGHT":
                env[n] = g.weights[n.attrs["name"]].double()
            elif n.op in ("ALL_REDUCE", "ALL_GATHER"):
                env[n] = yield n, env[n.inputs[0]]
            elif n.op != "INPUT":
                env[n] = eval_node(n, [env[i] for i in n.inputs], {"batch": B})
        return [env[o] for o in g.outputs]

    runs = [rank(g, xs) for g, xs in zip(graphs, inputs)]
    results, value = [None] * len(runs), None
    while True:
        pending = []
        for k, r in enumerate(runs):
            try:
                pending.append(r.send(value))  # (send(None) starts a generator)
            except StopIteration as e:
                results[k] = e.value
        if not pending:
            return results
        assert len(pending) == len(runs), "the ranks run different numbers of collectives"
        n, parts = pending[0][0], [p[1] for p in pending]
        value = sum(parts) if n.op == "ALL_REDUCE" else torch.cat(parts[:: n.attrs["stride"]], n.attrs["axis"])


def inputs_for(g: Graph, gen) -> list:
    x = torch.randn(B, T, D, generator=gen)
    mask = torch.rand(B, 1, T, S, generator=gen) > 0.3
    mask[..., 0] = True
    caches = [torch.randn(B, *n.shape[1:], generator=gen) for n in g.inputs[3:]]
    return [x, mask, torch.tensor([2, 5, 6])] + caches


@pytest.mark.parametrize("heads,kv_heads,world", [(4, 2, 2), (4, 1, 2), (4, 4, 4), (8, 2, 4)],
                         ids=["gqa-2-ranks", "one-kv-head-copied", "mha-4-ranks", "gqa-4-ranks"])
def test_shards_run_in_lock_step_give_the_whole_graph(heads, kv_heads, world):
    g = block(heads, kv_heads)
    gen = torch.Generator().manual_seed(1)
    whole_in = inputs_for(g, gen)
    want = [t.double() for t in run_in_lock_step([g], [whole_in])[0]]  # (no collectives)
    parts = shards(g, world)
    kv_local = max(kv_heads // world, 1)
    ins = []
    for r in range(world):
        first = r * kv_heads // world  # (with fewer kv heads than ranks: a copy of head r * kv_heads // world)
        ins.append(whole_in[:3] + [c[:, first: first + kv_local] for c in whole_in[3:]])
    got = run_in_lock_step([s for s, _ in parts], ins)
    for r, out in enumerate(got):
        first = r * kv_heads // world
        assert rel_err(out[2], want[2]) <= TOL[torch.float64]  # the logits, gathered on every rank
        for new, whole in zip(out[:2], want[:2]):  # each rank's heads of the caches
            assert torch.allclose(new, whole[:, first: first + kv_local], rtol=1e-12, atol=1e-12)


def test_which_gemms_split_which_way_and_where_the_collectives_go():
    g = block(heads=4, kv_heads=2)
    (r0, stats0), (r1, _) = shards(g, 2)
    assert stats0.rules == {"column": 3, "row": 2, "all_reduce": 2, "all_gather": 1} and stats0.declined == []
    for s, rank in ((r0, 0), (r1, 1)):
        w = {n.attrs["name"]: tuple(n.shape) for n in s.nodes if n.op == "WEIGHT"}
        # column: QKV keeps 2 of 4 q heads and 1 of 2 kv heads, gate/up half of each half, the head half the vocab
        assert w["qkv.weight"] == ((2 + 1 + 1) * HD, D) and w["qkv.bias"] == ((2 + 1 + 1) * HD,)
        assert w["gate_up.weight"] == (F, D) and w["head.weight"] == (V // 2, D)
        # row: the input features halve; the bias joins on rank 0 only
        assert w["o.weight"] == (D, 2 * HD) and w["down.weight"] == (D, F // 2)
        assert ("down.bias" in w) == (rank == 0) and w["norm.weight"] == (D,)
        assert [tuple(n.shape) for n in s.inputs[3:]] == [(BATCH, 1, S, HD)] * 2
        for n in s.nodes:
            if n.op == "ALL_REDUCE":  # right after each row GEMM, whose residual is rank 0's alone
                (gemm,) = n.inputs
                assert gemm.op == "GEMM" and gemm.attrs["residual"] == (rank == 0) and gemm.attrs["bias"] == (rank == 0 and n.name == "gemm_2")
        (gather,) = [n for n in s.nodes if n.op == "ALL_GATHER"]
        assert s.outputs[2] is gather and gather.attrs["axis"] == 2 and gather.inputs[0].op == "LINEAR"


def test_gemms_that_cannot_split_stay_replicated_with_the_reason():
    g = block(heads=4, kv_heads=2, vocab=V + 1)  # an odd vocabulary does not split over two ranks
    (s, stats), _ = shards(g, 2)
    reasons = [d["reason"] for d in stats.declined]
    assert reasons == ["kept replicated: a part of 13 heads / features does not split over 2 ranks"]
    assert stats.rules == {"column": 2, "row": 2, "all_reduce": 2}
    assert [n.op for n in s.nodes].count("ALL_GATHER") == 0 and s.outputs[2].shape == (BATCH, T, V + 1)
    # three query heads over two ranks: attention's split cannot keep whole heads, so QKV stays whole and o_proj too
    (s, stats), _ = shards(block(heads=3, kv_heads=3), 2)
    assert stats.rules["column"] == 2 and stats.rules["row"] == 1
    assert "a part of 3 heads / features does not split over 2 ranks" in stats.declined[0]["reason"]


def test_one_rank_changes_nothing():
    g = block(4, 2)
    before = graph_to_json(g)
    stats = shard_tensor_parallel(g, 0, 1)
    assert stats.rewritten == 0 and graph_to_json(g) == before


def test_quantization_after_sharding_packs_each_rank_block_and_knows_the_gathered_head():
    from kiln.passes.quantize_weights import QuantizeSpec, quantize_weights

    (s, _), _ = shards(block(4, 2), 2)
    stats = quantize_weights(s, QuantizeSpec("w4a16", None, True, False, False))
    # (a block with no embedding table: an output head, not known for an LM head)
    assert [d["reason"].split(":")[0] for d in stats.declined] == ["output head kept in float32"]
    assert s.histogram()["QGEMM"] == 4 and s.outputs[2].op == "ALL_GATHER" and s.outputs[2].inputs[0].op == "LINEAR"
