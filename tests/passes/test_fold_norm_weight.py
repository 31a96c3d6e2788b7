"""passes.fold_norm_weight: RMSNORM(x, w) -> GEMMs(W) becomes RMSNORM(x) -> GEMMs(W diag(w)).

The rewrite is exact in float64 (``check_pass``); in bfloat16 it moves one rounding from the activation to the weight,
so its error against float64 stays that of the unfolded graph. Then every case where it must not fire, with its reason."""
import torch

from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.types import sym
from kiln.passes.fold_norm_weight import fold_norm_weight
from kiln.testing import TOL, check_pass, rel_err

SEQ = sym("seq")
K = 24


def rand(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def llama_block(gen, dtype=torch.float64, tied_head=False, merged_head=True) -> Graph:
    """x -> RMSNORM -> merged gate/up GEMM (SiLU GLU) -> down + residual -> RMSNORM -> LM head (untied, or the
    embedding's table; ``merged_head``: recorded as a weight the compiler made, like the gate/up one)."""
    dt = str(dtype).removeprefix("torch.")
    g = Graph()
    g.symbols = {"seq": (1, 64)}
    ids = g.add_input("ids", (2, SEQ), "int64")
    table = g.add_weight("embed.weight", rand(gen, 50, K, dtype=dtype))
    x = g.add("EMBEDDING", [table, ids])
    h = g.add("RMSNORM", [x, g.add_weight("post_norm.weight", 1 + 0.3 * rand(gen, K, dtype=dtype))], eps=1e-5)
    gu = g.add("GEMM", [h, g.add_weight("mlp.gate_up.weight", rand(gen, 2 * 40, K, dtype=dtype) / K ** 0.5)], act="silu", glu=True)
    y = g.add("GEMM", [gu, g.add_weight("mlp.down.weight", rand(gen, K, 40, dtype=dtype) / 40 ** 0.5), x], residual=True)
    f = g.add("RMSNORM", [y, g.add_weight("norm.weight", 1 + 0.3 * rand(gen, K, dtype=dtype))], eps=1e-5)
    head = table if tied_head else g.add_weight("lm_head.weight", rand(gen, 50, K, dtype=dtype) / K ** 0.5)
    g.set_outputs([g.add("LINEAR", [f, head])], ["logits"])
    g.weight_parts["mlp.gate_up.weight"] = (("mlp.gate.weight", 0, 40), ("mlp.up.weight", 40, 80))  # (horizontal fusion's)
    if merged_head:  # (as if the head were merged too: the pass folds into any weight the compiler made)
        g.weight_parts["lm_head.weight"] = (("lm_head.weight", 0, 50),)
    assert {n.dtype for n in g.nodes if n.op != "INPUT"} == {dt}
    return g


def ids(seed=1):
    return [torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(seed))]


def the(g: Graph, op: str) -> list:
    return [n for n in g.nodes if n.op == op]


def reasons(stats) -> list[str]:
    return [d["reason"] for d in stats.declined]


def test_each_norm_weight_moves_into_the_gemm_weights_exactly_in_float64():
    gen = torch.Generator().manual_seed(0)
    stats, g, ref = check_pass(fold_norm_weight, lambda: llama_block(gen), ids(), gen)
    assert stats.rewritten == 2 and stats.declined == []
    assert all(len(n.inputs) == 1 for n in the(g, "RMSNORM"))  # weightless: statistics only
    assert the(g, "RMSNORM")[0].attrs == the(ref, "RMSNORM")[0].attrs
    # the folded weights replace the originals (one copy), the norm weights are gone; down's weight is untouched
    assert set(g.weights) == {"embed.weight", "mlp.gate_up.normed", "mlp.down.weight", "lm_head.normed"}
    w, nw = ref.weights["mlp.gate_up.weight"], ref.weights["post_norm.weight"]
    assert torch.equal(g.weights["mlp.gate_up.normed"], w * nw)
    (gu,) = [n for n in the(g, "GEMM") if n.attrs["glu"]]
    assert gu.attrs == next(n for n in the(ref, "GEMM") if n.attrs["glu"]).attrs  # the epilogue carries over


def test_bfloat16_error_against_float64_stays_the_unfolded_graphs():
    # the fold rounds W * w once instead of the norm's output twice: within bf16's tolerance of the float64 graph, and
    # no worse than the unfolded bf16 graph (a factor 2 for the few roundings that moved)
    gen = torch.Generator().manual_seed(3)
    exact = interpret(llama_block(gen), ids())[0]
    before = llama_block(gen.manual_seed(3), torch.bfloat16)
    after = llama_block(gen.manual_seed(3), torch.bfloat16)
    assert fold_norm_weight(after).rewritten == 2
    err_before, err_after = (rel_err(interpret(x, ids())[0].double(), exact) for x in (before, after))
    assert err_after <= TOL[torch.bfloat16] and err_after <= 2 * err_before, (err_before, err_after)


def test_the_models_own_weight_is_not_copied():
    # an untied head's weight is the caller's parameter, read in place: folding would copy it for one norm launch
    gen = torch.Generator().manual_seed(0)
    stats, g, _ = check_pass(fold_norm_weight, lambda: llama_block(gen, merged_head=False), ids(), gen)
    assert stats.rewritten == 1 and [len(n.inputs) for n in the(g, "RMSNORM")] == [1, 2] and "lm_head.weight" in g.weights
    assert reasons(stats) == ["LINEAR %linear's weight lm_head.weight is the model's own: folding would copy it (a merged "
                              "weight is the compiler's copy already)"]


def test_a_tied_head_keeps_its_norm_weight():
    # the final norm's reader is the LM head, whose weight is the embedding table: folding would keep a second copy
    gen = torch.Generator().manual_seed(0)
    stats, g, _ = check_pass(fold_norm_weight, lambda: llama_block(gen, tied_head=True), ids(), gen)
    assert stats.rewritten == 1 and [len(n.inputs) for n in the(g, "RMSNORM")] == [1, 2]
    assert reasons(stats) == ["LINEAR %linear's weight embed.weight is also read elsewhere: folding would keep a second copy"]


def test_norms_read_by_anything_but_a_float_gemm_weight_are_left_alone():
    def build(gen):
        g = Graph()
        x = g.add_input("x", (3, K), "float64")
        outs = []
        # read by an ADD too (a residual stream); a graph output; a GEMM reading it as its residual; a computed weight
        n1 = g.add("RMSNORM", [x, g.add_weight("n1", rand(gen, K))], eps=1e-6)
        outs += [g.add("LINEAR", [n1, g.add_weight("w1", rand(gen, 8, K))]), g.add("ADD", [n1, x])]
        n2 = g.add("RMSNORM", [x, g.add_weight("n2", rand(gen, K))], eps=1e-6)
        outs += [n2, g.add("LINEAR", [n2, g.add_weight("w2", rand(gen, 8, K))])]
        n3 = g.add("RMSNORM", [x, g.add_weight("n3", rand(gen, K))], eps=1e-6)
        outs.append(g.add("GEMM", [x, g.add_weight("w3", rand(gen, K, K)), n3], residual=True))
        n4 = g.add("RMSNORM", [x, g.add_weight("n4", rand(gen, K))], eps=1e-6)
        w4 = g.add("MUL", [g.add_weight("w4", rand(gen, 8, K)), g.add_weight("s4", rand(gen, 8, K))])
        outs.append(g.add("LINEAR", [n4, w4]))
        n5 = g.add("RMSNORM", [x, g.add("MUL", [g.add_weight("n5", rand(gen, K)), g.add_weight("s5", rand(gen, K))])], eps=1e-6)
        outs.append(g.add("LINEAR", [n5, g.add_weight("w5", rand(gen, 8, K))]))
        g.set_outputs(outs, [f"o{k}" for k in range(len(outs))])
        g.weight_parts.update({f"w{k}": ((f"w{k}", 0, 8),) for k in range(1, 6)})  # (as if merged: not why it declines)
        return g

    gen = torch.Generator().manual_seed(0)
    x = [rand(torch.Generator().manual_seed(1), 3, K)]
    stats, g, ref = check_pass(fold_norm_weight, lambda: build(gen), x, gen)
    assert stats.rewritten == 0 and g.histogram() == ref.histogram() and set(g.weights) == set(ref.weights)
    assert [r.split(" (")[0].split(":")[0] for r in reasons(stats)] == [
        "ADD %add reads it", "the normalised value is a graph output", "GEMM %gemm reads it",
        "LINEAR %linear_2's weight is computed", "its weight is computed"]


def test_a_folded_weight_is_the_float64_product_rounded_once():
    # 16-bit weights are multiplied in torch's float32 compute type (their product exact there), float32 ones in float32
    # (correctly rounded), none copied to float64: the same bits as the float64 product rounded, tiny (subnormal)
    # products included; a 16-bit weight scaled by a float32 norm weight goes by float64 (float32 would round twice)
    from kiln.passes.fold_norm_weight import _scaled
    gen = torch.Generator().manual_seed(3)
    cases = ((torch.bfloat16, 1.0), (torch.float16, 1.0), (torch.bfloat16, 1e-20), (torch.float32, 1.0),
             (torch.float32, 1e-20))
    for dtype, scale in cases:
        t, w = rand(gen, 64, K) * scale, (1 + 0.3 * rand(gen, K)) if scale == 1.0 else rand(gen, K) * scale
        t, w = t.to(dtype), w.to(dtype)
        assert torch.equal(_scaled(t, w), (t.double() * w.double()).to(dtype)), (dtype, scale)
    t, w = rand(gen, 64, K).to(torch.bfloat16), (1 + 0.3 * rand(gen, K)).float()
    assert torch.equal(_scaled(t, w), (t.double() * w.double()).to(torch.bfloat16))
