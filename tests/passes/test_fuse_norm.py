"""passes.fuse_norm: decomposed RMSNorm / LayerNorm, DiT's adaLN modulate and residual add + norm —
sites fired, op counts, float64 parity before vs after, the cases where it must not fire, and the
tiny HF Llama / diffusers DiT against eager."""

import pytest
import torch

from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.serialize import graph_from_json, graph_to_json
from kiln.passes.fuse_norm import fuse_norm
from kiln.testing import check_pass, TOL, rel_err

f64, f32, bf16 = "float64", "float32", "bfloat16"
gen = torch.Generator().manual_seed(0)
SHAPE = (2, 5, 8)


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def run_both(build, inputs):
    return check_pass(fuse_norm, build, inputs, gen)


def reasons(stats):
    return {d["reason"] for d in stats.declined}


# ----------------------------------------------------------------------------- RMSNorm


def rms_graph(dtype=f64, square="pow", inv="rsqrt", weight=True, upcast=None, downcast=None, w_dtype=None, axes=(2,),
              eps_input=False, extra_reader=False):
    """w * cast(x32 * rsqrt(mean(x32 ** 2, axes) + eps)),  x32 = cast(x)  (HF); every piece switchable."""
    g = Graph()
    x = g.add_input("x", SHAPE, dtype)
    eps = g.add_input("eps", (), dtype) if eps_input else g.const(1e-6)
    v = g.add("CAST", [x], dtype=upcast) if upcast else x
    sq = g.add("POW", [v, g.const(2)]) if square == "pow" else g.add("MUL", [v, v])
    mean = g.add("MEAN", [sq], axes=axes, keepdim=True)
    s = g.add("ADD", [mean, eps])
    if inv == "rsqrt":
        y = g.add("MUL", [v, g.add("RSQRT", [s])])
    elif inv == "reciprocal":
        y = g.add("MUL", [g.add("RECIPROCAL", [g.add("SQRT", [s])]), v])
    else:
        y = g.add("DIV", [v, g.add("SQRT", [s])])
    if downcast:
        y = g.add("CAST", [y], dtype=downcast)
    if weight:
        wt = torch.randn(8, generator=gen, dtype=torch.float64).to(getattr(torch, w_dtype or dtype))
        y = g.add("MUL", [g.add_weight("w", wt), y])
    g.set_outputs([y, mean] if extra_reader else [y])
    return g


def xs(dtype=torch.float64, eps=False):
    return [rand(*SHAPE, dtype=dtype)] + ([torch.tensor(1e-6, dtype=dtype)] if eps else [])


@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("inv", ["rsqrt", "reciprocal", "div"])
@pytest.mark.parametrize("weight", [True, False])
def test_rmsnorm_forms_fuse_to_one_op(square, inv, weight):
    stats, g, ref = run_both(lambda: rms_graph(square=square, inv=inv, weight=weight), xs())
    assert stats.rules == {"rmsnorm": 1} and not stats.declined
    assert ref.histogram()["MEAN"] == 1 and g.histogram() == {"RMSNORM": 1}
    (n,) = g.nodes[-1:]
    assert n.attrs == {"eps": 1e-6, "dims": 1, "residual": False} and len(n.inputs) == 1 + weight


@pytest.mark.parametrize("w_dtype", [bf16, f32])
def test_hf_bf16_rmsnorm_reads_the_bf16_input_and_keeps_dtypes(w_dtype):
    """HF: upcast to float32, normalise, cast back to bfloat16, times w (a float32 w promotes the result)."""
    build = lambda: rms_graph(bf16, upcast=f32, downcast=bf16, w_dtype=w_dtype)  # noqa: E731
    x = xs(torch.bfloat16)
    stats, g, ref = run_both(build, x)
    assert stats.rules == {"rmsnorm": 1}
    assert ref.histogram() == {"CAST": 2, "POW": 1, "MEAN": 1, "ADD": 1, "RSQRT": 1, "MUL": 2} and g.histogram() == {"RMSNORM": 1}
    n = g.outputs[0]
    assert n.inputs[0] is g.inputs[0] and n.dtype == ref.outputs[0].dtype == w_dtype
    want, got = interpret(ref, x)[0], interpret(g, x)[0]  # in the graphs' own dtypes: the same computation
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_float32_normalisation_of_an_upcast_keeps_the_cast():
    """cast(x, float32) normalised with no cast back: RMSNORM of the float32 value, returning float32."""
    stats, g, _ = run_both(lambda: rms_graph(bf16, upcast=f32, w_dtype=f32), xs(torch.bfloat16))
    assert stats.rules == {"rmsnorm": 1} and g.histogram() == {"CAST": 1, "RMSNORM": 1}
    assert g.outputs[0].inputs[0].op == "CAST" and g.outputs[0].dtype == f32


def test_rmsnorm_declines_with_reasons():
    stats, g, ref = run_both(lambda: rms_graph(axes=(1,)), xs())
    assert stats.rewritten == 0 and g.histogram() == ref.histogram()
    assert reasons(stats) == {"normalises axes (1,) of rank-3 x, not the trailing ones"}

    stats, g, _ = run_both(lambda: rms_graph(eps_input=True), xs(eps=True))
    assert stats.rewritten == 0 and reasons(stats) == {"eps is INPUT eps, not a constant"}

    stats, g, _ = run_both(lambda: rms_graph(extra_reader=True), xs())
    assert stats.rewritten == 0 and {r.split(" (")[0] for r in reasons(stats)} == {"the intermediate value mean"}

    # normalised op by op in bfloat16: RMSNORM would compute in float32, so nothing fuses
    stats, g, ref = run_both(lambda: rms_graph(bf16), xs(torch.bfloat16))
    assert stats.rewritten == 0 and reasons(stats) == {"normalises in bfloat16 op by op; RMSNORM computes bfloat16 in float32"}


def test_cast_back_to_another_dtype_is_not_folded_into_the_norm():
    """float32 upcast to float64 and cast back: RMSNORM(float32) would not compute in float64; the
    float64 normalisation fuses, the casts and the weight stay."""
    build = lambda: rms_graph(f32, upcast=f64, downcast=f32)  # noqa: E731
    x = xs(torch.float32)
    stats, g, ref = run_both(build, x)
    assert reasons(stats) == {"casts the float64 result to float32; RMSNORM returns its input's dtype"}
    assert stats.rules == {"rmsnorm": 1} and g.histogram() == {"CAST": 2, "RMSNORM": 1, "MUL": 1}
    assert torch.equal(interpret(g, x)[0], interpret(ref, x)[0])


# ----------------------------------------------------------------------------- LayerNorm


def ln_graph(inv="div", affine="wb", w_dtype=f64, axes=(2,), shared_sub=True):
    """(x - mean(x)) / sqrt(mean((x - mean(x)) ** 2) + eps) * w + b  (ONNX opset < 17 export, hand-written models)."""
    g = Graph()
    x = g.add_input("x", SHAPE, f64)
    mu = g.add("MEAN", [x], axes=axes, keepdim=True)
    d = g.add("SUB", [x, mu])
    d2 = d if shared_sub else g.add("SUB", [x, mu])
    var = g.add("MEAN", [g.add("POW", [d2, g.const(2.0)])], axes=axes, keepdim=True)
    s = g.add("ADD", [var, g.const(1e-5)])
    y = g.add("DIV", [d, g.add("SQRT", [s])]) if inv == "div" else g.add("MUL", [g.add("RSQRT", [s]), d])
    if "w" in affine:
        y = g.add("MUL", [y, g.add_weight("w", rand(8, dtype=getattr(torch, w_dtype)))])
    if "b" in affine:
        y = g.add("ADD", [g.add_weight("b", rand(8)), y])
    g.set_outputs([y])
    return g


@pytest.mark.parametrize("inv", ["div", "rsqrt"])
@pytest.mark.parametrize("affine", ["wb", "w", ""])
def test_layernorm_forms_fuse_to_one_op(inv, affine):
    stats, g, ref = run_both(lambda: ln_graph(inv, affine, shared_sub=inv == "div"), xs())
    assert stats.rules == {"layernorm": 1} and not stats.declined
    assert ref.histogram()["MEAN"] == 2 and g.histogram() == {"LAYERNORM": 1}
    n = g.outputs[0]
    assert len(n.inputs) == 1 + len(affine) and n.attrs == {"eps": 1e-5, "dims": 1, "residual": False}


def test_layernorm_declines_with_reasons():
    stats, g, ref = run_both(lambda: ln_graph(axes=(1,)), xs())
    assert stats.rewritten == 0 and g.histogram() == ref.histogram()
    centred = "sub is x - mean(x): a LayerNorm, for the layernorm rule"  # the rmsnorm rule sees an RMS of x - mean(x)
    assert reasons(stats) == {"normalises axes (1,) of rank-3 x, not the trailing ones", centred}
    # a float32 weight on a float64 LayerNorm: the MUL promotes, LAYERNORM takes one dtype; the
    # weightless LayerNorm inside still fuses (and the rmsnorm rule leaves x - mean(x) to it)
    stats, g, _ = run_both(lambda: ln_graph(w_dtype=f32), xs())
    assert reasons(stats) == {"mixed dtypes: x is float64, w float32", centred}
    assert stats.rules == {"layernorm": 1} and g.histogram() == {"LAYERNORM": 1, "MUL": 1, "ADD": 1}


# ----------------------------------------------------------------------------- adaLN modulate


def modulate_graph(affine=False, scale_dtype=f64, share_one_plus=False):
    """LAYERNORM(x) * (1 + scale[:, None]) + shift[:, None], scale / shift slices of the adaLN linear (DiT)."""
    g = Graph()
    x = g.add_input("x", SHAPE, f64)
    c = g.add_input("c", (2, 8), f64)
    emb = g.add("LINEAR", [g.add("SILU", [c]), g.add_weight("wa", rand(16, 8)), g.add_weight("ba", rand(16))])
    shift, scale = (g.add("RESHAPE", [g.add("SLICE", [emb], axis=1, start=i, end=i + 8, step=1)], shape=(2, 1, 8)) for i in (0, 8))
    if scale_dtype != f64:
        scale = g.add("CAST", [scale], dtype=scale_dtype)
    params = [g.add_weight("w", rand(8)), g.add_weight("b", rand(8))] if affine else []
    ln = g.add("LAYERNORM", [x, *params], eps=1e-6)
    one_plus = g.add("ADD", [scale, g.const(1)])
    y = g.add("ADD", [g.add("MUL", [ln, one_plus]), shift])
    g.set_outputs([y, one_plus] if share_one_plus else [y])
    return g


@pytest.mark.parametrize("affine", [False, True])
def test_adaln_modulate_fuses(affine):
    stats, g, ref = run_both(lambda: modulate_graph(affine), [rand(*SHAPE), rand(2, 8)])
    assert stats.rules == {"modulate": 1} and not stats.declined
    assert ref.histogram()["LAYERNORM"] == 1 and ref.histogram()["ADD"] == 2
    assert g.histogram() == {"LINEAR": 1, "SILU": 1, "SLICE": 2, "RESHAPE": 2, "LAYERNORM_MODULATE": 1}
    n = g.outputs[0]
    assert [i.op for i in n.inputs[1:3]] == ["RESHAPE", "RESHAPE"] and len(n.inputs) == 3 + 2 * affine
    assert n.attrs == {"eps": 1e-6, "dims": 1}


def test_adaln_modulate_declines():
    stats, g, ref = run_both(lambda: modulate_graph(scale_dtype=f32), [rand(*SHAPE), rand(2, 8)])
    assert stats.rewritten == 0 and g.histogram() == ref.histogram()
    assert reasons(stats) == {"mixed dtypes: x is float64, the scale cast float32"}
    stats, g, ref = run_both(lambda: modulate_graph(share_one_plus=True), [rand(*SHAPE), rand(2, 8)])
    assert stats.rewritten == 0 and g.histogram() == ref.histogram()
    assert [r.split(" (")[0] for r in reasons(stats)] == ["the intermediate value add"]


# ----------------------------------------------------------------------------- residual add + norm


def residual_graph(norm="RMSNORM", producer="exp", stream=True):
    """NORM(r + y) where y = exp(x) (fires), a linear (its epilogue takes the add) or gate * linear (DiT)."""
    g = Graph()
    x, r = g.add_input("x", SHAPE, f64), g.add_input("r", SHAPE, f64)
    if producer == "exp":
        y = g.add("EXP", [x])
    else:
        y = g.add("LINEAR", [x, g.add_weight("wl", rand(8, 8))])
        if producer == "gated":
            y = g.add("MUL", [g.add_input("gate", (2, 1, 8), f64), y])
    s = g.add("ADD", [r, y])
    params = [g.add_weight("w", rand(8))] + ([g.add_weight("b", rand(8))] if norm == "LAYERNORM" else [])
    out = g.add(norm, [s, *params], eps=1e-6)
    g.set_outputs([out, s] if stream else [out])  # the sum read again: the residual stream
    return g


@pytest.mark.parametrize("norm", ["RMSNORM", "LAYERNORM"])
@pytest.mark.parametrize("stream", [True, False])
def test_residual_add_moves_into_the_norm(norm, stream):
    stats, g, ref = run_both(lambda: residual_graph(norm, stream=stream), xs() + xs())
    assert stats.rules == {"residual": 1} and not stats.declined
    assert ref.histogram() == {"EXP": 1, "ADD": 1, norm: 1}
    assert g.histogram() == ({"EXP": 1, "ADD": 1, norm: 1} if stream else {"EXP": 1, norm: 1})  # the add stays for the stream
    n = g.outputs[0]
    assert n.attrs["residual"] and n.inputs[0].op == "INPUT" and n.inputs[-1].op == "EXP"


@pytest.mark.parametrize("producer", ["linear", "gated"])
def test_residual_add_of_a_matmul_is_left_to_the_gemm_epilogue(producer):
    x = xs() + xs() + ([rand(2, 1, 8)] if producer == "gated" else [])
    stats, g, ref = run_both(lambda: residual_graph(producer=producer), x)
    assert stats.rewritten == 0 and g.histogram() == ref.histogram()
    assert reasons(stats) == {"the residual add is left to the GEMM epilogue"}


# ----------------------------------------------------------------------------- models


def _compile(model, args=(), kwargs=None, dynamic=None):
    import kiln
    from kiln.config import CompileConfig
    from kiln.passes.pipeline import PASS_NAMES

    graph = kiln.compile(model, args, kwargs, dynamic=dynamic, config=CompileConfig(disable=PASS_NAMES)).graph
    return graph, graph_from_json(graph_to_json(graph), dict(graph.weights))


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def llama(request):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF ones-inits norms: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model = model.to(request.param)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    g, before = _compile(model, (ids,), dynamic={"input_ids": {0: "batch", 1: "seq"}})
    stats = fuse_norm(g)
    g.verify()
    return request.param, model, ids, before, g, stats


def test_llama_every_rmsnorm_fuses(llama):
    dtype, model, ids, before, g, stats = llama
    assert before.histogram()["POW"] == 5 and stats.rules == {"rmsnorm": 5}  # 2 per layer + the final norm
    after = g.histogram()
    assert after["RMSNORM"] == 5 and not {"POW", "RSQRT", "MEAN"} & set(after)
    # every norm but the first reads a residual add whose other operand is o_proj / down_proj
    assert len(stats.declined) == 4 and reasons(stats) == {"the residual add is left to the GEMM epilogue"}
    if dtype == torch.bfloat16:  # the float32 upcast / downcast pairs are inside the RMSNORMs now
        assert before.histogram()["CAST"] - after["CAST"] == 10
        assert all(n.inputs[0].dtype == "bfloat16" and n.dtype == "bfloat16" for n in g.nodes if n.op == "RMSNORM")
    got, orig = interpret(g, [ids])[0], interpret(before, [ids])[0]
    # the same computation in the graphs' own dtypes: equal up to float32 summation order, even in bfloat16
    assert got.dtype == orig.dtype == dtype and rel_err(got, orig) <= TOL[torch.float32]
    with torch.no_grad():
        assert rel_err(got, model(ids).logits) <= TOL[dtype]
    assert rel_err(interpret(g, [ids], compute_dtype=torch.float64)[0],
                   interpret(before, [ids], compute_dtype=torch.float64)[0]) <= TOL[torch.float64]


@pytest.fixture(scope="module", params=[{}, {"norm_elementwise_affine": True}], ids=["dit", "dit-affine"])
def dit(request):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8,
                                  patch_size=2, num_embeds_ada_norm=10, **request.param).eval()
    with torch.no_grad():  # ada_norm_zero zero-inits adaLN and output projections: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(1)
    x = {"hidden_states": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([3, 999]),
         "class_labels": torch.tensor([1, 10])}
    graph, before = _compile(model, (), x, dynamic={k: {0: "batch"} for k in x})
    stats = fuse_norm(graph)
    graph.verify()
    return model, x, before, graph, stats


def test_dit_every_layernorm_modulate_fuses(dit):
    model, x, before, g, stats = dit
    assert before.histogram()["LAYERNORM"] == 5 and stats.rules == {"modulate": 5} and not stats.declined  # norm1, norm2 x 2 + norm_out
    after = g.histogram()
    assert after["LAYERNORM_MODULATE"] == 5 and "LAYERNORM" not in after
    assert before.histogram()["ADD"] - after["ADD"] == 10 and before.histogram()["MUL"] - after["MUL"] == 5
    inputs = [x["hidden_states"], x["timestep"], x["class_labels"]]
    with torch.no_grad():
        assert rel_err(interpret(g, inputs)[0], model(**x).sample) <= TOL[torch.float32]
    assert rel_err(interpret(g, inputs, compute_dtype=torch.float64)[0],
                   interpret(before, inputs, compute_dtype=torch.float64)[0]) <= TOL[torch.float64]
