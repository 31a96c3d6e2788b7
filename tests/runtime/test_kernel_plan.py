"""The kernels backend (runtime/kernel_plan.py) on CPU under TRITON_INTERPRET=1: every implementation choice runs
the optimized graphs of HF Llama tiny and diffusers DiT tiny to the reference backend's numbers; the buffer
plan never overlaps live values; the tuner measures once, then hits the on-disk cache and the artifact's
tuning.json. GPU cases (bf16, CUDA graphs) are marked gpu."""
import json
import zipfile

import pytest
import torch

import kiln
from kiln.codegen.tuning import Tuner
from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.types import sym
from kiln.runtime.executor import Executor
from kiln.runtime.memory import check_plan
from kiln.runtime.target import Target
from kiln.testing import TOL, rel_err


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln-cache"))


def run_both(graph: Graph, inputs, tuner: Tuner):
    ex = Executor(graph, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=tuner))
    got = ex.run(inputs)
    want = interpret(graph, inputs)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel_err(a, b) <= TOL[torch.float32], rel_err(a, b)
    plan = ex.plans[0]
    check_plan(plan.memory, plan.intervals)
    return ex, plan


def reference_executor(graph: Graph) -> Executor:
    """Per-op torch on the device of the graph's weights."""
    return Executor(graph, Target.from_config(kiln.CompileConfig(backend="reference"), default_device="cuda"))


CHOICES = [{"gemm": "triton", "attention": "kiln"}, {"gemm": "cublas", "attention": "sdpa"}]


@pytest.mark.interpreter
@pytest.mark.parametrize("force", CHOICES, ids=["triton-kiln", "cublas-sdpa"])
def test_llama_tiny(pipeline_models, force):
    hf_llm, ids, dims = pipeline_models["llama"]
    m = kiln.compile(hf_llm(), (ids(2, 7),), dynamic=dims)
    ex, plan = run_both(m.graph, [ids(3, 5, seed=2)], tuner=Tuner(force=force))
    d = plan.describe()
    assert d["launches"]["gemm"] >= 4 and d["launches"]["attention"] == 2 and d["launches"]["pointwise"] >= 4
    assert set(d["choices"]) == {f"gemm:{force['gemm']}", f"attention:{force['attention']}"}
    assert not d["cuda_graph"]


@pytest.mark.interpreter
@pytest.mark.parametrize("force", CHOICES, ids=["triton-kiln", "cublas-sdpa"])
def test_dit_tiny(pipeline_models, force):
    dit, dit_inputs, dims = pipeline_models["dit"]
    m = kiln.compile(dit(), (), dit_inputs(2), dynamic=dims)
    inputs = dit_inputs(3, seed=2)
    ex, plan = run_both(m.graph, [inputs[i.attrs["name"]] for i in m.graph.inputs], tuner=Tuner(force=force))
    assert plan.describe()["launches"]["gemm"] >= 4


def _gemm_attention_graph():
    """x [b, 8, 24] -> GEMM(+bias, gelu) -> heads view -> ATTENTION -> back -> GEMM(+residual); the attention
    output is stored in [b, 8, heads, 12] order so that going back is a view; a RESHAPE of the permuted input
    is not a view (planned as a copy)."""
    g = Graph()
    b = sym("b")
    g.symbols["b"] = (1, 4)
    x = g.add_input("x", (b, 8, 24), "float32")
    gen = torch.Generator().manual_seed(0)
    w1 = g.add_weight("w1", torch.randn(48, 24, generator=gen) / 5)
    b1 = g.add_weight("b1", torch.randn(48, generator=gen))
    w2 = g.add_weight("w2", torch.randn(24, 48, generator=gen) / 7)
    h = g.add("GEMM", (x, w1, b1), bias=True, act="gelu_tanh")
    heads = g.add("PERMUTE", (g.add("RESHAPE", (h,), shape=(b, 8, 4, 12)),), perm=(0, 2, 1, 3))
    a = g.add("ATTENTION", (heads, heads, heads), causal=True)
    back = g.add("RESHAPE", (g.add("PERMUTE", (a,), perm=(0, 2, 1, 3)),), shape=(b, 8, 48))
    y = g.add("GEMM", (back, w2, x), residual=True)
    flat = g.add("RESHAPE", (g.add("PERMUTE", (x,), perm=(0, 2, 1)),), shape=(b, 192))
    g.set_outputs([y, h, g.add("MUL", (flat, g.const(2.0)))])
    return g


@pytest.mark.interpreter
def test_views_copies_and_memory_plan():
    g = _gemm_attention_graph()
    x = torch.randn(3, 8, 24)
    ex, plan = run_both(g, [x], tuner=Tuner(force={"gemm": "cublas", "attention": "kiln"}))
    kinds = [call.kind for call in plan.calls]
    assert kinds.count("copy") == 1  # RESHAPE of the permuted input
    att = next(call for call in plan.calls if call.kind == "attention").group.nodes[0]
    assert plan.env[att].stride() == (8 * 48, 12, 48, 1)  # [b, heads, 8, 12] stored as [b, 8, heads, 12]
    assert kinds.count("gemm") == 2 and kinds.count("attention") == 1
    # a second call reuses the plan and its buffers; outputs are fresh tensors each call
    o1 = ex.run([x])[0]
    o2 = ex.run([x + 1])[0]
    assert len(ex.plans) == 1 and not torch.equal(o1, o2)


@pytest.mark.interpreter
def test_tuner_measures_once_then_cache_then_artifact(tmp_path):
    g = _gemm_attention_graph()
    x = torch.randn(2, 8, 24)
    t1 = Tuner(cache=kiln.codegen.cache.Cache())
    run_both(g, [x], tuner=t1)
    assert t1.counts["measured"] == 3 and len(t1.decisions) == 3  # two GEMM shapes, one attention
    for d in t1.decisions.values():
        assert d["choice"] in d["ms"] and len(d["ms"]) >= 2  # cuBLAS / SDPA and at least one Triton config

    t2 = Tuner(cache=kiln.codegen.cache.Cache())  # a second process: the disk cache answers
    run_both(g, [x], tuner=t2)
    assert t2.counts["measured"] == 0 and t2.counts["cache"] == 3

    t3 = Tuner(decisions=t1.to_json()["decisions"])  # an artifact's tuning.json answers, no cache
    run_both(g, [x], tuner=t3)
    assert t3.counts["measured"] == 0 and t3.counts["artifact"] == 3


@pytest.mark.interpreter
def test_artifact_carries_tuning_json(pipeline_models, tmp_path):
    hf_llm, ids, dims = pipeline_models["llama"]
    cfg = kiln.CompileConfig(backend="kernels", kernels={"attention": "sdpa"})
    m = kiln.compile(hf_llm(), (ids(2, 7),), dynamic=dims, config=cfg)
    want = m(ids(2, 5, seed=1))
    path = m.save(tmp_path / "m.kiln")
    with zipfile.ZipFile(path) as zf:
        tuning = json.loads(zf.read("tuning.json"))
    assert tuning["decisions"] and all(d["kind"] == "gemm" for d in tuning["decisions"].values())
    back = kiln.load(path)
    got = back(ids(2, 5, seed=1))
    assert torch.allclose(got.logits if hasattr(got, "logits") else got[0], want.logits if hasattr(want, "logits") else want[0])
    assert back.executor.tuner.counts["measured"] == 0
    desc = back.executor.describe()
    assert desc["backend"] == "kernels" and desc["plans"] and desc["tuning"]["decisions"] >= 1


def _decoder_graph():
    """A VAE decoder's up block in small: x [b, 8, 5, 6] -> GROUP_NORM(silu) -> CONV2D 3x3 -> 2x nearest upsampling
    (RESHAPE, EXPAND, RESHAPE: a copy) -> GROUP_NORM(silu) -> CONV(bias, the upsampled value as residual, / 2)."""
    g = Graph()
    b = sym("b")
    g.symbols["b"] = (1, 4)
    x = g.add_input("x", (b, 8, 5, 6), "float32")
    gen = torch.Generator().manual_seed(1)

    def wt(name, *shape, scale=1.0):
        return g.add_weight(name, torch.randn(*shape, generator=gen) * scale)

    h = g.add("GROUP_NORM", (x, wt("n1.w", 8), wt("n1.b", 8)), groups=4, eps=1e-6, act="silu")
    h = g.add("CONV2D", (h, wt("c1.w", 6, 8, 3, 3, scale=0.2)), padding=(1, 1))
    h = g.add("RESHAPE", (h,), shape=(b, 6, 5, 1, 6, 1))
    up = g.add("RESHAPE", (g.add("EXPAND", (h,), shape=(b, 6, 5, 2, 6, 2)),), shape=(b, 6, 10, 12))
    h = g.add("GROUP_NORM", (up, wt("n2.w", 6), wt("n2.b", 6)), groups=3, eps=1e-6, act="silu")
    y = g.add("CONV", (h, wt("c2.w", 6, 6, 3, 3, scale=0.2), wt("c2.b", 6), up), padding=(1, 1), bias=True, residual=True, divisor=2.0)
    g.set_outputs([y])
    return g


@pytest.mark.interpreter
def test_convs_group_norms_and_an_upsampling_copy():
    ex, plan = run_both(_decoder_graph(), [torch.randn(3, 8, 5, 6)], tuner=Tuner(force={"group_norm": "kiln"}))
    d = plan.describe()
    assert d["launches"] == {"group_norm": 2, "conv": 2, "copy": 1}, d
    assert d["choices"] == {"group_norm:kiln": 2, "conv:torch": 2}
    # each group norm has its float32 partial statistics [N*G, chunks, 3] in the arena, next to the values
    norms = [k for k, grp in enumerate(plan.groups) if grp.kind == "group_norm"]
    assert sorted(plan.scratch) == norms and all(dtype == "float32" and shape[0] in (12, 9) for _, shape, dtype in plan.scratch.values())
    assert ex.run([torch.randn(1, 8, 5, 6)])[0].shape == (1, 6, 10, 12)  # another batch: its own plan


def test_config_rejects_unknown_backend_and_choice():
    with pytest.raises(kiln.KilnError, match="backend"):
        kiln.CompileConfig(backend="fast")
    with pytest.raises(kiln.KilnError, match="not a choice"):
        kiln.CompileConfig(kernels={"gemm": "magic"})


# ----------------------------------------------------------------------------- GPU: bf16, CUDA graphs
# A whole model in bf16 accumulates rounding beyond one op's tolerance, so both kiln's kernels and the per-op
# bf16 reference are measured against the float32 model: kiln may not be meaningfully worse.


def no_worse_than_reference(kiln_out, ref_out, want32):
    err, ref_err = rel_err(kiln_out.float(), want32), rel_err(ref_out.float(), want32)
    assert err <= max(1.25 * ref_err, TOL[torch.bfloat16]), (err, ref_err)


@pytest.mark.gpu
@pytest.mark.parametrize("force", [None] + CHOICES, ids=["measured", "triton-kiln", "cublas-sdpa"])
def test_gpu_llama_tiny_bf16_cuda_graph(pipeline_models, force):
    hf_llm, ids, dims = pipeline_models["llama"]
    model32 = hf_llm().cuda()
    x = ids(3, 9, seed=2).cuda()
    with torch.no_grad():
        want32 = model32(x).logits
    m = kiln.compile(model32.to(torch.bfloat16), (ids(2, 7).cuda(),), dynamic=dims, config=kiln.CompileConfig(kernels=force or {}))
    out = m(x).logits
    ref = reference_executor(m.graph).run([x])[0]  # per-op torch, same device and dtype
    no_worse_than_reference(out, ref, want32)
    d = m.executor.describe()
    assert d["backend"] == "kernels" and d["plans"][0]["cuda_graph"], d
    assert d["plans"][0]["causal_masks"] == model32.config.num_hidden_layers  # HF's mask folded: causal kernels
    assert torch.equal(m(x).logits, out)  # a replay gives the same numbers


@pytest.mark.gpu
def test_gpu_cublaslt_gelu_epilogue_is_the_tanh_form():
    """The cublaslt:gelu candidate computes GEMM act='gelu_tanh' (float32, tight tolerance)."""
    g = torch.Generator("cuda").manual_seed(0)
    x, w, b = (torch.randn(*s, device="cuda", generator=g) for s in ((64, 96), (80, 96), (80,)))
    got = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    want = torch.nn.functional.gelu(x.double() @ w.double().t() + b.double(), approximate="tanh")
    assert rel_err(got, want) <= 1e-5


@pytest.mark.gpu
def test_gpu_dit_tiny_bf16_every_gemm_choice(pipeline_models):
    dit, dit_inputs, dims = pipeline_models["dit"]
    model32 = dit(tie=True).cuda()
    inputs32 = {k: v.cuda() for k, v in dit_inputs(3, seed=2).items()}
    with torch.no_grad():
        want32 = model32(**inputs32).sample
    model = model32.to(torch.bfloat16)
    inputs = _cuda_bf16(inputs32)
    from kiln.codegen import blaslt
    library = [{"gemm": "blaslt"}] if blaslt.available(torch.device("cuda")) else []  # (nvmath-python installed)
    for force in CHOICES + [{"gemm": "cublaslt"}] + library:
        m = kiln.compile(model, (), _cuda_bf16(dit_inputs(2)), dynamic=dims, config=kiln.CompileConfig(kernels=force))
        out = m(**inputs).sample
        ref = reference_executor(m.graph).run([inputs[i.attrs["name"]] for i in m.graph.inputs])[0]
        no_worse_than_reference(out, ref, want32)
        d = m.executor.describe()["plans"][0]
        assert d["cuda_graph"]
        if force == {"gemm": "blaslt"}:  # (its projections' operands are arena buffers and weights: 256-byte aligned)
            assert d["choices"].get("gemm:blaslt", 0) > 0, d["choices"]


@pytest.mark.gpu
def test_gpu_dit_tma_attention_in_a_plan(pipeline_models, monkeypatch):
    # DiT-XL/2's attention shape in small: 256 tokens, heads of 72 (q, k, v strided views of the fused projection), the
    # TMA-fed kernel offered and forced, in the plan's CUDA graph
    from kiln.codegen import lower_attention
    monkeypatch.setattr(lower_attention, "TMA_ATTENTION_CONFIGS", 3)
    dit, dit_inputs, dims = pipeline_models["dit"]
    model32 = dit(tie=True, sample_size=32, attention_head_dim=72).cuda()
    inputs32 = {k: v.cuda() for k, v in dit_inputs(2, size=32, seed=2).items()}
    with torch.no_grad():
        want32 = model32(**inputs32).sample
    model, inputs = model32.to(torch.bfloat16), _cuda_bf16(inputs32)
    m = kiln.compile(model, (), _cuda_bf16(dit_inputs(2, size=32)), dynamic=dims,
                     config=kiln.CompileConfig(kernels={"attention": "kiln-tma"}))
    out = m(**inputs).sample
    ref = reference_executor(m.graph).run([inputs[i.attrs["name"]] for i in m.graph.inputs])[0]
    no_worse_than_reference(out, ref, want32)
    d = m.executor.describe()["plans"][0]
    assert d["cuda_graph"] and set(d["choices"]) >= {"attention:kiln-tma"}, d["choices"]


@pytest.mark.interpreter
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_pixart_masked_cross_attention_takes_the_tma_kernel(device, monkeypatch):
    # PixArt's blocks in small (heads of 72, 144 latent tokens): the cross-attention over 24 text tokens with a padding
    # mask (its [B, H, 1, L] bias read a key tile at a time) and the self-attention, both the TMA-fed kernel, forced (a
    # candidate not offered would fall back to SDPA; the GEMMs forced too: measured under the interpreter they take
    # minutes); against the float32 model as the reference backend's 16-bit is.
    # CPU: float16 under the interpreter; GPU: bfloat16 in the plan's CUDA graph
    from diffusers import PixArtTransformer2DModel

    from kiln.codegen import lower_attention
    monkeypatch.setattr(lower_attention, "TMA_ATTENTION_CONFIGS", 3)
    torch.manual_seed(0)
    model32 = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=72, in_channels=4, out_channels=8,
                                       num_layers=2, cross_attention_dim=144, caption_channels=32, sample_size=24,
                                       patch_size=2, norm_type="ada_norm_single", use_additional_conditions=False).eval()
    with torch.no_grad():
        for p in model32.parameters():  # off the zero / one inits
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 24, dtype=torch.int64)
    mask[1, 9:] = 0  # the second prompt's padding
    inputs32 = dict(hidden_states=torch.randn(2, 4, 24, 24, generator=g), encoder_hidden_states=torch.randn(2, 24, 32, generator=g),
                    encoder_attention_mask=mask, timestep=torch.tensor([999, 500]),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    model32 = model32.to(device)
    inputs32 = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs32.items()}
    with torch.no_grad():
        want32 = model32(**inputs32).sample
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    model = model32.to(dtype)
    inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs32.items()}
    m = kiln.compile(model, (), inputs, config=kiln.CompileConfig(backend="kernels", kernels={"gemm": "cublas", "attention": "kiln-tma"}))
    out = m(**inputs).sample
    ref = Executor(m.graph, Target.from_config(kiln.CompileConfig(backend="reference"), default_device=device)).run(
        m.signature.flatten((), inputs))[0]
    no_worse_than_reference(out, ref, want32)
    d = m.executor.describe()["plans"][0]
    assert d["choices"].get("attention:kiln-tma") == 4, d["choices"]  # 2 blocks x (self, cross)
    assert d["cuda_graph"] == (device == "cuda")


def _cuda_bf16(inputs: dict) -> dict:
    return {k: v.cuda().bfloat16() if v.is_floating_point() else v.cuda() for k, v in inputs.items()}


class _CacheWriter(torch.nn.Module):
    """A step of a KV-cache-like program: writes its projection into ``cache`` at ``slots`` (in place, as a
    decoder writes its KV cache) and reads the whole cache back."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, slots, cache):
        cache.index_copy_(2, slots, self.lin(x))
        return torch.softmax(cache.sum(-1), -1) * 2


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_an_input_updated_in_place_is_updated_as_in_eager(backend, tmp_path):
    torch.manual_seed(0)
    mod = _CacheWriter()
    ex = (torch.randn(1, 2, 3, 4), torch.tensor([5, 6, 7]), torch.zeros(1, 2, 10, 4))
    example_cache = ex[2].clone()
    m = kiln.compile(mod, ex, config=kiln.CompileConfig(backend=backend, kernels={"gemm": "cublas"}))
    assert torch.equal(ex[2], example_cache)  # compiling does not write into the example
    assert m.graph.updates == {"cache:updated": "cache"}
    m = kiln.load(m.save(tmp_path / "w.kiln"), backend=backend)  # the update survives the artifact
    assert m.graph.updates == {"cache:updated": "cache"}
    c_eager = torch.randn(1, 2, 10, 4)
    c_kiln = c_eager.clone()
    for step in range(3):
        slots, x = torch.tensor([step, step + 3, 9]), torch.randn(1, 2, 3, 4)
        want = mod(x, slots, c_eager)
        got = m(x, slots, c_kiln)
        assert rel_err(got, want) <= TOL[torch.float32]
        assert rel_err(c_kiln, c_eager) <= TOL[torch.float32]
    if backend == "kernels":  # written in place: one plan for the one cache tensor, an 'update' launch
        assert len(m.executor.plans) == 1 and m.executor.plans[0].describe()["launches"]["update"] == 1
        other, before = torch.zeros_like(c_kiln), c_kiln.clone()
        m(x, slots, other)  # another cache tensor: its own plan; that tensor is written, the first one is not
        assert len(m.executor.plans) == 2 and torch.equal(c_kiln, before)
        rest = [j for j in range(10) if j not in slots.tolist()]
        assert torch.equal(other[:, :, slots], c_kiln[:, :, slots]) and not other[:, :, rest].any()


@pytest.mark.interpreter
def test_outputs_are_handed_out_without_copies_and_never_overwritten():
    """A graph output a kernel writes is handed out as an alias of a buffer of its own; the buffer set is written
    again only once the caller dropped it, so keeping outputs is safe and a loop that rebinds them copies nothing."""
    g = _gemm_attention_graph()
    ex = Executor(g, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=Tuner(force={"gemm": "cublas"})))
    xs = [torch.randn(2, 8, 24) for _ in range(4)]
    want = [interpret(g, [x])[0] for x in xs]
    out = ex.run([xs[0]])[0]
    plan = ex.plans[0]
    assert out.data_ptr() == plan.sets[0].buffers[g.outputs[0]].data_ptr()  # no copy
    kept = [out]
    for x, w in zip(xs[1:], want[1:]):
        kept.append(ex.run([x])[0])  # the caller keeps every output: two sets alias, then a private set copies
    assert len(plan.sets) == 2 and plan._private is not None
    for got, w in zip(kept, want):
        assert rel_err(got, w) <= TOL[torch.float32]
    del kept, out
    out = ex.run([xs[0]])[0]  # nothing held any more: the first set again
    assert out.data_ptr() == plan.sets[0].buffers[g.outputs[0]].data_ptr() and rel_err(out, want[0]) <= TOL[torch.float32]
    for x, w in zip(xs, want):  # the usual loop: `out` rebound each call alternates between the two sets
        out = ex.run([x])[0]
        assert rel_err(out, w) <= TOL[torch.float32]
    assert len(plan.sets) == 2


@pytest.mark.interpreter
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
def test_an_odd_wide_gemm_output_has_padded_rows(gemm):
    """N = 301: the output rows are padded to 320 elements (aligned for cuBLAS's tensor-core kernels) and handed
    out as the [..., :301] view; a kernel reading it (here a pointwise one) reads the padded rows in place."""
    g = Graph()
    x = g.add_input("x", (2, 3, 16), "float32")
    w = g.add_weight("w", torch.randn(301, 16, generator=torch.Generator().manual_seed(0)))
    y = g.add("GEMM", (x, w))
    g.set_outputs([y, g.add("TANH", (y,))])
    ex = Executor(g, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=Tuner(force={"gemm": gemm})))
    xv = torch.randn(2, 3, 16)
    got = ex.run([xv])
    for a, b in zip(got, interpret(g, [xv])):
        assert rel_err(a, b) <= TOL[torch.float32]
    assert got[0].shape == (2, 3, 301) and got[0].stride() == (3 * 320, 320, 1)
