"""Block-scaled activation codes in the kernels plan (CPU under TRITON_INTERPRET=1): a tiny Llama and a tiny DiT compiled
with quantize="fp8" / "w8a8" and CompileConfig.quantize_act_blocks give their MLP's second AQGEMM (down projection,
fc2) an act_group; the first one's Triton epilogue then stores the codes with a scale per row and group ("-codes"),
which gives, bit for bit, the output of the plan storing the value and quantizing it group by group after, and both
match the reference backend. Groups of 32 here (the tiny models' MLP widths 96 / 64; CompileConfig takes 128)."""
import pytest
import torch

import kiln
from kiln.codegen.tuning import Tuner
from kiln.errors import KilnError
from kiln.ir.interpret import interpret
from kiln.passes import quantize_acts
from kiln.runtime.executor import Executor
from kiln.runtime.memory import check_plan
from kiln.runtime.target import Target
from kiln.testing import rel_err

pytestmark = pytest.mark.interpreter
GROUP = 32
CODED_GEMMS = {"dit": 3, "llama": 2}  # the MLP's second AQGEMM, a block (DiT: 3 blocks, Llama: 2 layers)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kiln-cache"))


@pytest.fixture(scope="module")
def compiled(pipeline_models, compile_quantized):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize_acts, "ACT_BLOCKS", (0, GROUP))
        return compile_quantized(pipeline_models, quantize_act_blocks=GROUP)


class BlockTuner(Tuner):
    """The Triton pointer template for every AQGEMM: its epilogue storing the next one's codes where offered (``codes``),
    else storing the value for the quantizer; the fused pointwise quantizers, SDPA, every other choice's first."""

    def __init__(self, codes: bool):
        super().__init__(force={"quantize": "fused", "attention": "sdpa"})
        self.codes = codes

    def choose(self, kind, what, candidates, device, check=None):
        if kind == "gemm" and what.get("op") == "AQGEMM":
            names = [n for n in candidates if n.startswith("triton-aqgemm") and n.startswith("triton-aqgemm-codes") == self.codes]
            return (names or [n for n in candidates if n.startswith("triton-aqgemm")])[0]
        if kind not in self.force:
            return next(iter(candidates))
        return super().choose(kind, what, candidates, device, check)


@pytest.mark.parametrize("model", ["dit", "llama"])
@pytest.mark.parametrize("mode", ["fp8", "w8a8"])
def test_block_codes_by_the_epilogue_or_after_it(compiled, model, mode):
    graph, inputs = compiled[model, mode]
    blocked = [n for n in graph.nodes if n.op == "AQGEMM" and n.attrs.get("act_group")]
    assert len(blocked) == CODED_GEMMS[model] and all(n.attrs["act_group"] == GROUP for n in blocked)
    assert all(n.inputs[0].op == "AQGEMM" for n in blocked)  # x: the MLP's first AQGEMM's output
    outs, plans = {}, {}
    for codes in (True, False):
        ex = Executor(graph, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=BlockTuner(codes)))
        outs[codes], plans[codes] = ex.run(inputs)[0], ex.plans[0]
    assert torch.equal(outs[True], outs[False])
    assert rel_err(outs[True], interpret(graph, inputs)[0]) <= 1e-4
    d_codes, d_apart = plans[True].describe(), plans[False].describe()
    assert sum(v for k, v in d_codes["choices"].items() if k == "gemm:triton-aqgemm-codes") == CODED_GEMMS[model], d_codes["choices"]
    assert d_apart["launches"]["quantize"] - d_codes["launches"].get("quantize", 0) == CODED_GEMMS[model]
    for plan in plans.values():
        check_plan(plan.memory, plan.intervals)
        for n in blocked:  # the codes' scales in the arena: [rows, K / group]
            assert plan.codes[n.inputs[0]] in plan.memory.offsets


def test_blocks_follow_a_matmul_only_and_are_checked(compiled):
    graph, _ = compiled["llama", "fp8"]
    # the attention output (o's x) and the norms' outputs (qkv, gate / up, the head) keep one scale a token
    assert sum(n.op == "AQGEMM" and not n.attrs.get("act_group") for n in graph.nodes) == 7
    with pytest.raises(KilnError, match="act_blocks 64 must be one of 0, 128"):
        kiln.CompileConfig(quantize="fp8", quantize_act_blocks=64)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fp8", "w8a8"])
def test_dit_on_cuda_block_codes(pipeline_models, mode):
    # bf16 in CUDA graphs, a DiT of MLP width 256 (groups of 128): the epilogue storing the block codes gives the plan
    # storing the value then quantizing it, bit for bit; its error against the float32 model about the row scales'
    dit, dit_inputs, dims = pipeline_models["dit"]
    model = dit(attention_head_dim=32).to("cuda", torch.bfloat16)

    def cuda(seed):
        return {k: (v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.cuda()) for k, v in dit_inputs(2, seed=seed).items()}
    inputs, calib = cuda(7), [tuple(cuda(s).values()) for s in range(2)]
    errs, outs = {}, {}
    with torch.no_grad():
        want = dit(attention_head_dim=32).to("cuda", torch.float32)(
            **{k: v.float() if v.is_floating_point() else v for k, v in inputs.items()})
    want = want.sample if hasattr(want, "sample") else want[0]
    for blocks in (0, 128):
        m = kiln.compile(model, tuple(inputs.values()), dynamic=dims, calibration=calib,
                         config=kiln.CompileConfig(quantize=mode, quantize_act_blocks=blocks))
        assert sum(bool(n.attrs.get("act_group")) for n in m.graph.nodes if n.op == "AQGEMM") == (3 if blocks else 0)
        for codes in ((True, False) if blocks else (False,)):
            ex = Executor(m.graph, Target.from_config(kiln.CompileConfig(backend="kernels"), default_device="cuda",
                                                      tuner=BlockTuner(codes)))
            outs[blocks, codes] = ex.run(list(inputs.values()))[0]
            assert ex.plans[0].describe()["cuda_graph"]
        errs[blocks] = rel_err(outs[blocks, False], want)
    assert torch.equal(outs[128, True], outs[128, False])
    assert errs[128] <= 1.25 * errs[0], errs


@pytest.mark.gpu
def test_scaled_mm_blocks_against_the_formula():
    # the library candidate of a block-scaled fp8 AQGEMM (the 1B's down projection with its residual): cuBLASLt's
    # 1 x 128 block recipe + kiln's epilogue against the dequantized float64 formula (skipped where torch lacks it)
    from kiln.codegen import lower
    from kiln.ir import quant
    gen = torch.Generator().manual_seed(0)
    m, k, n = 300, 1024, 512
    x = torch.randn(m, k, generator=gen) * torch.linspace(0.05, 20, k)
    qx, sx = quant.quantize_rows(x, "fp8", group=128)
    qw, sw = quant.quantize_rows(torch.randn(n, k, generator=gen) / k ** 0.5, "fp8")
    res = torch.randn(m, n, generator=gen).to(torch.bfloat16)
    qx, sx, qw, sw, res = (t.cuda() for t in (qx, sx, qw, sw, res))
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    attrs = dict(format="fp8", act="none", glu=False, act_group=128)
    cands = lower.scaled_mm_blocks(lambda: (qx, sx), qw, sw, (None, None, res), attrs, out, out.device, (m, k, n))
    if not cands:
        pytest.skip("torch has no block-scaled scaled_mm here")
    cands["scaled-mm-blocks"]()
    want = quant.dequantize_rows(qx, sx, torch.float64) @ quant.dequantize_rows(qw, sw, torch.float64).T + res.double()
    assert rel_err(out, want) <= 1e-2
