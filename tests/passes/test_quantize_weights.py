"""kiln.passes.quantize_weights: which matmuls become QGEMM (a merged QKV once, the LM head by option), the op
counts, the rewritten graph against the float graph (exactly the GEMM on the dequantized weight in float64; within
the quantization's error otherwise, where GPTQ beats rounding on a Llama with large-activation channels), and the
matmuls it must leave alone."""
import pytest
import torch

import kiln
from kiln.errors import KilnError
from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.quant import QuantWeight, dequantize
from kiln.ir.serialize import graph_from_json, graph_to_json
from kiln.models.llama import LlamaConfig, LlamaForCausalLM
from kiln.models.registry import init_weights
from kiln.passes.quantize_weights import QuantizeSpec, quantize_weights
from kiln.testing import TOL, rel_err

gen = torch.Generator().manual_seed(0)
LLAMA = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, max_position_embeddings=128, tie_word_embeddings=False)
OUTLIERS = (10.0, 20.0, 35.0, 50.0)  # norm weights of four channels: activations 10-50x the rest, as real LLMs have


def outlier_llama(seed=0, rank=16) -> LlamaForCausalLM:
    """Random weights; token embeddings of rank ``rank`` plus noise (correlated inputs, as an LLM's residual stream
    has: what GPTQ exploits) and every norm scaling four channels by OUTLIERS."""
    m = LlamaForCausalLM(LLAMA)
    init_weights(m, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        e = torch.randn(LLAMA.vocab_size, rank, generator=g) @ torch.randn(rank, LLAMA.hidden_size, generator=g) / rank ** 0.5
        m.model.embed_tokens.weight.copy_(e + 0.3 * torch.randn(e.shape, generator=g))
        channels = torch.randperm(LLAMA.hidden_size, generator=g)[:len(OUTLIERS)]
        for mod in m.modules():
            if type(mod).__name__ == "RMSNorm":
                mod.weight[channels] = torch.tensor(OUTLIERS)
    m.reset_buffers()
    return m.eval()


def ids(b, s):
    return torch.randint(0, LLAMA.vocab_size, (b, s), generator=gen)


@pytest.fixture(scope="module")
def llama():
    """The float graph after the pipeline's passes before quantize_weights (what it sees: fold_norm_weight, after it,
    off), calibration and test inputs."""
    c = kiln.compile(outlier_llama(), (ids(2, 8),), dynamic={"input_ids": {0: ("batch", 1, 8), 1: ("seq", 1, 128)}},
                     config=kiln.CompileConfig(backend="reference", disable=("fold_norm_weight",)))
    calib = [[ids(1, 128)] for _ in range(16)]  # 2048 rows: more than K = 256 of down_proj
    return c.graph, calib, [ids(4, 64)]


def copy(graph: Graph) -> Graph:
    return graph_from_json(graph_to_json(graph), dict(graph.weights))


def run(graph: Graph, spec: QuantizeSpec, calib=None):
    g = copy(graph)
    stats = quantize_weights(g, spec, calib)
    g.verify()
    return stats, g


def logits_error(ref: Graph, g: Graph, inputs) -> float:
    want = interpret(ref, inputs, compute_dtype=torch.float64)[0]
    return rel_err(interpret(g, inputs, compute_dtype=torch.float64)[0], want)


# ----------------------------------------------------------------------------- sites and op counts


def test_sites_op_counts_and_report(llama):
    graph, calib, _ = llama
    before = graph.histogram()
    stats, g = run(graph, QuantizeSpec("w4a16-gptq"), calib)
    after = g.histogram()
    # per layer: the merged QKV (ONE site), o_proj, the merged gate/up (GLU epilogue), down_proj; and the LM head
    assert stats.rewritten == 9 == after["QGEMM"] and stats.rules == {"gptq": 9}
    assert after.get("GEMM", 0) + after.get("LINEAR", 0) == before.get("GEMM", 0) + before.get("LINEAR", 0) - 9 == 0
    qkv = [n for n in g.nodes if n.op == "QGEMM" and n.inputs[0].op == "RMSNORM" and not n.attrs["glu"] and n not in g.outputs]
    assert len(qkv) == 2 and all(n.inputs[1].shape == (256, 64) for n in qkv)  # (4 + 2 + 2) heads x 32 rows, K / 2 bytes
    glu = [n for n in g.nodes if n.op == "QGEMM" and n.attrs["glu"]]
    assert len(glu) == 2 and all(n.attrs["act"] == "silu" for n in glu)  # the fused epilogue carried over
    assert sum(n.attrs["residual"] for n in g.nodes if n.op == "QGEMM") == 4
    head = g.outputs[0]
    layers = [n for n in g.nodes if n.op == "QGEMM" and n is not head]
    assert all(n.attrs["bits"] == 4 and n.attrs["group"] == 128 and not n.attrs["zeros"] for n in layers)
    # the LM head at 8 bits, one scale per output channel (its error reaches the logits unfiltered)
    assert head.op == "QGEMM" and head.attrs["bits"] == 8 and head.attrs["group"] == LLAMA.hidden_size
    assert not stats.declined
    # each quantized weight noted with its measured error
    assert len(stats.notes) == 9 and all("gptq: output error" in n and "2048 calibration rows" in n for n in stats.notes)
    assert sum("-> 8-bit" in n for n in stats.notes) == 1
    packed = [n.removesuffix(".qweight") for n in g.weights if n.endswith(".qweight")]
    assert len(packed) == 9 and not any(p + ".weight" in g.weights for p in packed)  # the float weights are gone


def test_lm_head_option(llama):
    graph, _, _ = llama
    for spec, want, head_bits in [(QuantizeSpec("w8a16"), 9, 8), (QuantizeSpec("w4a16"), 9, 8), (QuantizeSpec("w4a16", lm_head=True), 9, 4),
                                  (QuantizeSpec("w8a16", lm_head=False), 8, None), (QuantizeSpec("w4a16", lm_head=False), 8, None)]:
        stats, g = run(graph, spec)
        assert stats.rewritten == want, spec
        head = g.outputs[0]
        assert (head.attrs["bits"] if head.op == "QGEMM" else None) == head_bits, spec
        assert [d["reason"].split(" kept")[0] for d in stats.declined] == ([] if head_bits else ["output head (LM head)"])
    stats, g = run(graph, QuantizeSpec("w8a16"))
    head = g.outputs[0]
    assert head.op == "QGEMM" and head.attrs["group"] == LLAMA.hidden_size  # 8 bits: per output channel
    assert all("weight error" in n and "no calibration data" in n for n in stats.notes)


# ----------------------------------------------------------------------------- numerical parity


@pytest.mark.parametrize("spec", [QuantizeSpec("w8a16"), QuantizeSpec("w4a16", 32, symmetric=False), QuantizeSpec("w4a16", None)])
def test_rewrite_is_the_gemm_on_the_dequantized_weight(llama, spec):
    # exact in float64: the rewritten graph computes what the float graph computes with each weight replaced by
    # its dequantized values (so every difference to the float graph is the rounding and nothing else)
    graph, _, test = llama
    stats, g = run(graph, spec)
    ref = copy(graph)
    for n in g.nodes:
        if n.op == "QGEMM":
            name = n.inputs[1].attrs["name"].removesuffix(".qweight") + ".weight"
            q, s = (g.weights[i.attrs["name"]] for i in n.inputs[1:3])
            z = g.weights[n.inputs[3].attrs["name"]] if n.attrs["zeros"] else None
            k = ref.weights[name].shape[1]
            ref.weights[name] = dequantize(QuantWeight(q, s, z, n.attrs["bits"], n.attrs["group"], (q.shape[0], k)), torch.float64)
    assert logits_error(ref, g, test) <= TOL[torch.float64]


def test_gptq_recovers_what_rounding_loses(llama):
    # measured (logits rel err vs the float graph): w8 9.6e-3; w4 g128 rounding 1.4e-1, GPTQ 4.6e-2, act_order 3.3e-2
    graph, calib, test = llama
    err = {}
    for name, spec in [("w8", QuantizeSpec("w8a16")), ("rtn", QuantizeSpec("w4a16")), ("gptq", QuantizeSpec("w4a16-gptq")),
                       ("act_order", QuantizeSpec("w4a16-gptq", act_order=True))]:
        stats, g = run(graph, spec, calib)
        err[name] = logits_error(graph, g, test)
        if name in ("rtn", "gptq"):
            err[name + "_notes"] = [float(n.split("output error ")[1].split()[0]) for n in stats.notes]
    assert err["w8"] <= 2e-2, err
    assert err["rtn"] >= 5 * err["w8"] and err["rtn"] >= 0.08, err  # the outlier channels make rounding visible
    assert err["gptq"] <= 0.5 * err["rtn"] and err["act_order"] <= err["gptq"], err
    assert all(a < b for a, b in zip(err["gptq_notes"], err["rtn_notes"])), err  # every weight's own measured error


# ----------------------------------------------------------------------------- where it must not fire


def small_graph(k=64, n=40):
    g = Graph()
    x = g.add_input("x", (3, k), "float32")
    return g, x, lambda name, *shape: g.add_weight(name, torch.randn(*shape, generator=gen))


def test_declines_with_reasons():
    g, x, weight = small_graph(k=72)
    computed = g.add("MUL", [weight("w1", 40, 72), g.const(2.0)])
    outs = [g.add("LINEAR", [x, computed]),  # a computed weight
            g.add("LINEAR", [x, weight("w2", 40, 72)]),  # K = 72: no multiple of 32 (4-bit) but fine per channel (8-bit)
            g.add("MATMUL", [g.add("RESHAPE", [x], shape=(3, 1, 72)), weight("w3", 3, 72, 8)])]  # a 3-d weight
    g.set_outputs([g.add("RELU", [o]) for o in outs])  # (not output heads)
    stats, _ = run(g, QuantizeSpec("w4a16", 32))
    reasons = [d["reason"] for d in stats.declined]
    assert stats.rewritten == 0 and len(reasons) == 3
    assert "weight is computed (MUL)" in reasons[0]
    assert "K = 72 is not a multiple of group = 32" in reasons[1]
    assert "weight is 3-d" in reasons[2]
    stats, q = run(g, QuantizeSpec("w8a16"))
    assert stats.rewritten == 1 and q.histogram()["QGEMM"] == 1
    stats, _ = run(g, QuantizeSpec("w4a16", None))  # per channel at 4 bits: K even is all it needs
    assert stats.rewritten == 1


def test_odd_k_at_4_bits():
    g, x, weight = small_graph(k=33)
    g.set_outputs([g.add("RELU", [g.add("LINEAR", [x, weight("w", 8, 33)])])])
    stats, _ = run(g, QuantizeSpec("w4a16", None))
    assert stats.rewritten == 0 and "even K" in stats.declined[0]["reason"]


def test_shared_weight_packed_once_and_matmul_transposed():
    g, x, weight = small_graph()
    w = weight("w", 40, 64)
    wt = weight("wt", 64, 24)  # MATMUL's [in, out]
    a, b = g.add("LINEAR", [x, w]), g.add("LINEAR", [g.add("NEG", [x]), w])
    c = g.add("MATMUL", [x, wt])
    g.set_outputs([g.add("RELU", [a]), g.add("RELU", [b]), g.add("RELU", [c])])
    calib = [[torch.randn(3, 64, generator=gen)] for _ in range(30)]  # 90 rows >= K
    stats, q = run(g, QuantizeSpec("w4a16-gptq", 32), calib)
    assert stats.rewritten == 3 and len(stats.notes) == 2  # one weight, one Hessian over both readers' inputs
    assert sorted(q.weights) == ["w.qweight", "w.scales", "wt.qweight", "wt.scales"]
    assert "180 calibration rows" in next(n for n in stats.notes if n.startswith("w "))
    got, want = interpret(q, calib[0]), interpret(g, calib[0])
    assert all(rel_err(u, v) < 0.1 for u, v in zip(got, want))


def test_gptq_needs_calibration_and_off_is_a_no_op(llama):
    graph, _, _ = llama
    with pytest.raises(KilnError, match="needs calibration data") as e:
        run(graph, QuantizeSpec("w4a16-gptq"))
    assert "calibration=" in e.value.hint
    stats, g = run(graph, None)
    assert stats.rewritten == 0 and g.histogram() == graph.histogram()


def test_too_few_rows_round_to_nearest_and_warn():
    g, x, weight = small_graph()
    g.set_outputs([g.add("RELU", [g.add("LINEAR", [x, weight("w", 40, 64)])])])
    with pytest.warns(UserWarning, match=r"1 of 1 weights were rounded to nearest, not GPTQ-fitted: .* saw 3 calibration rows .*"
                                         r"up to 64\), e.g. w\. Give more calibration tokens \(at least 64 in all\)"):
        stats, _ = run(g, QuantizeSpec("w4a16-gptq", 32), [[torch.randn(3, 64, generator=gen)]])
    assert stats.rules == {"rtn": 1} and "3 calibration rows < K = 64" in stats.notes[0]


def test_spec_and_config_validation():
    with pytest.raises(KilnError, match="not one of"):
        QuantizeSpec("w3a16")
    with pytest.raises(KilnError, match="quantize group 100"):
        kiln.CompileConfig(quantize="w4a16", quantize_group=100)
    with pytest.raises(KilnError, match="CompileConfig.quantize must be"):
        kiln.CompileConfig(quantize="int4")
    c = kiln.CompileConfig(quantize="w4a16-gptq", quantize_group=64, quantize_act_order=True)
    assert kiln.CompileConfig.from_dict(c.to_dict()) == c
    assert c.quantize_spec() == QuantizeSpec("w4a16-gptq", 64, True, None, True)
    assert kiln.CompileConfig().quantize_spec() is None
