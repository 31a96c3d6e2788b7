"""kiln.codegen.lower's GEMM-family candidates on CPU under TRITON_INTERPRET=1: every candidate of a QGEMM (the
dequantize-then-matmul fallback, the skinny template for <= 16 rows, the qgemm template for more) and the skinny
candidates of a plain GEMM compute the op's reference, split-K through the planned workspace included."""
import math

import pytest
import torch

from kiln.codegen import lower
from kiln.ir.ops import OPS
from kiln.ir.quant import quantize_rtn
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter

gen = torch.Generator().manual_seed(0)
CPU = torch.device("cpu")


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def operands(lead, n, k, dtype, bias, gate, residual, glu):
    nout = n // 2 if glu else n
    x = r(*lead, k, dtype=dtype)
    extra = [r(n, dtype=dtype)] if bias else []
    extra += [r(*lead, nout, dtype=dtype)] if gate else []
    extra += [r(1, nout, dtype=dtype)] if residual else []  # broadcast over the leading dims
    return x, extra, torch.empty(*lead, nout, dtype=dtype)


def run_all(what_candidates, args, attrs, op, out, tmp):
    """Run every candidate into ``out`` (poisoned first) against the op's reference in float64."""
    what, candidates = what_candidates
    want = OPS[op].ref([a.double() if a.is_floating_point() else a for a in args], attrs)
    for name, fn in candidates.items():
        out.fill_(float("nan"))
        if tmp is not None:
            tmp.fill_(float("nan"))
        fn()
        err = rel_err(out.double(), want)
        assert err <= TOL[out.dtype], (name, err)
    return what, candidates


@pytest.mark.parametrize("lead", [(1,), (2, 3), (3, 7)], ids=["gemv", "m6", "m21"])
@pytest.mark.parametrize("bits,group,zeros", [(8, 96, False), (4, 32, True)])
@pytest.mark.parametrize("epi", ["plain", "bias-residual", "glu-gate"])
def test_qgemm_candidates(lead, bits, group, zeros, epi):
    n, k = 38, 96
    bias, gate, residual, glu = epi == "bias-residual", epi == "glu-gate", epi == "bias-residual", epi == "glu-gate"
    qw = quantize_rtn(r(n, k) / k ** 0.5, bits, group, symmetric=not zeros)
    x, extra, out = operands(lead, n, k, torch.float32, bias, gate, residual, glu)
    args = [x, qw.qweight, qw.scales] + ([qw.zeros] if zeros else []) + extra
    attrs = dict(bits=bits, group=qw.group, zeros=zeros, bias=bias, act="silu" if glu else "none", glu=glu, gate=gate, residual=residual)
    m = math.prod(lead)
    tmp = torch.empty(m, n) if glu else None
    size = lower.workspace_bytes("QGEMM", attrs, x.shape, qw.qweight.shape, x.dtype, CPU)
    ws = torch.empty(size, dtype=torch.uint8) if size else None
    what, candidates = run_all(lower.qgemm(args, attrs, out, tmp, CPU, ws), args, attrs, "QGEMM", out, tmp)
    kinds = {name.split(":")[0] for name in candidates}
    assert kinds == {"dequant-cublas", "triton-skinny" if m <= 16 else "triton-qgemm"}
    if m <= 16:
        assert size == 4 * 2 * m * n and sum(":16,32,2" in name for name in candidates) == 1  # the split-K config ran
    assert what["op"] == "QGEMM" and what["bits"] == bits and what["zeros"] == zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead", [(1,), (2, 5), (20,)], ids=["gemv", "m10", "m20"])
def test_gemm_gets_skinny_candidates_for_few_rows(dtype, lead):
    n, k = 37, 72
    x, extra, out = operands(lead, n, k, dtype, True, False, True, False)
    w = r(n, k, dtype=dtype) / k ** 0.5
    args = [x, w] + extra
    attrs = dict(bias=True, act="gelu_tanh", glu=False, gate=False, residual=True)
    size = lower.workspace_bytes("GEMM", attrs, x.shape, w.shape, dtype, CPU)
    ws = torch.empty(size, dtype=torch.uint8) if size else None
    _, candidates = run_all(lower.gemm(args, attrs, out, None, CPU, ws), args, attrs, "GEMM", out, None)
    skinny = [name for name in candidates if name.startswith("triton-skinny")]
    assert len(skinny) == (2 if math.prod(lead) <= 16 else 0) and (size > 0) == bool(skinny)


@pytest.mark.parametrize("static", [None, False, True])
def test_skinny_reads_the_weight_early_only_where_it_is_stored(monkeypatch, static):
    # the kernels plan says whether a GEMM's weight is a stored one (attrs["static_w"]); only then may the skinny
    # template read it before its PDL wait: a weight computed in the step (absent: not known) is read after it
    seen = []
    monkeypatch.setattr(lower.ts, "skinny_gemm", lambda *a, **kw: seen.append(kw["static_weight"]))
    x, extra, out = operands((1,), 8, 16, torch.float32, False, False, False, False)
    attrs = dict(bias=False, act="none", glu=False, gate=False, residual=False)
    if static is not None:
        attrs["static_w"] = static
    _, candidates = lower.gemm([x, r(8, 16)], attrs, out, None, CPU)
    for name, fn in candidates.items():
        if name.startswith("triton-skinny"):
            fn()
    assert seen and set(seen) == {bool(static)}


def test_workspace_bytes_only_where_a_skinny_candidate_runs():
    attrs = dict(bits=4, glu=True)
    assert lower.workspace_bytes("QGEMM", attrs, (17, 64), (40, 32), torch.float32, CPU) == 0  # 17 rows: qgemm's
    assert lower.workspace_bytes("QGEMM", attrs, (4, 64), (40, 32), torch.float64, CPU) == 0  # no Triton for float64
    assert lower.workspace_bytes("MATMUL", {}, (4, 64), (64, 40), torch.float32, CPU) == 0
    assert lower.workspace_bytes("LINEAR", {}, (2, 2, 64), (40, 64), torch.float32, CPU) == 4 * 2 * 4 * 40


@pytest.mark.parametrize("op", ["GEMM", "QGEMM"])
@pytest.mark.parametrize("lead", [(1,), (3, 5), (20,)], ids=["gemv", "m15", "m20"])
@pytest.mark.parametrize("unit", [False, True], ids=["weight", "unit"])
def test_norm_prologue_candidates(op, lead, unit):
    # every candidate computes GEMM(RMSNORM(x, nw)): the fused skinny ones from x itself, the others after the norm's
    # kernel (here its reference) wrote the normalised x they read; fused ones only for <= 16 rows. A weightless norm
    # (unit: its weight folded into the GEMM's) adds the template scaling its rows itself, from 2 rows
    n, k = 38, 96
    x, extra, out = operands(lead, n, k, torch.float32, False, False, True, False)
    nw, eps = (torch.ones(k) if unit else 1 + r(k) * 0.3), 1e-5
    normed = torch.empty_like(x)
    norm = dict(x=x, w=nw, eps=eps, unit=unit, run=lambda: normed.copy_(OPS["RMSNORM"].ref([x, nw], dict(eps=eps, dims=1))))
    attrs = dict(bias=False, act="none", glu=False, gate=False, residual=True)
    if op == "QGEMM":
        qw = quantize_rtn(r(n, k) / k ** 0.5, 8, k, symmetric=True)
        weight, attrs = [qw.qweight, qw.scales], dict(attrs, bits=8, group=k, zeros=False)
    else:
        weight = [r(n, k) / k ** 0.5]
    size = lower.workspace_bytes(op, attrs, x.shape, weight[0].shape, x.dtype, CPU)
    ws = torch.empty(size, dtype=torch.uint8) if size else None
    fn = lower.qgemm if op == "QGEMM" else lower.gemm
    args = [normed] + weight + extra
    what, candidates = fn(args, attrs, out, None, CPU, ws, norm)
    want = OPS[op].ref([OPS["RMSNORM"].ref([x.double(), nw.double()], dict(eps=eps, dims=1))] + [a.double() if a.is_floating_point() else a
                                                                                                for a in args[1:]], attrs)
    for name, run in candidates.items():
        out.fill_(float("nan"))
        normed.fill_(float("nan"))
        run()
        assert rel_err(out.double(), want) <= TOL[torch.float32], name
    fused = [name for name in candidates if name.startswith("triton-skinny-norm:")]
    assert len(fused) == (2 if math.prod(lead) <= 16 else 0) and what["norm"]["eps"] == eps
    names = list(candidates)
    assert not fused or names.index(fused[0]) < min(i for i, c in enumerate(names) if c.startswith("triton-skinny:"))
    assert names[0] == ("dequant-cublas" if op == "QGEMM" else "cublas")
    assert len([c for c in names if c.startswith("triton-rstd:")]) == (op == "GEMM" and unit and math.prod(lead) > 1)
    assert what["norm"].get("unit") == (1 if unit else None)
