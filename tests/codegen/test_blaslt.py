"""kiln.codegen.blaslt: cuBLASLt's other algorithms as GEMM candidates (nvmath-python). CPU: when they are offered, how
they are named, and the glue (operands, epilogues, in place) against float64 through a CPU stand-in for nvmath; GPU
(with nvmath-python installed): every algorithm the heuristic lists, against float64, for the bias / tanh-GELU /
in-place residual epilogues, at an irregular and a DiT-XL/2 shape, and replayed from a CUDA graph."""
import math

import pytest
import torch

from kiln.codegen import blaslt, lower
from kiln.testing import TOL, rel_err


def _aligned_zeros(*shape, dtype=torch.bfloat16):
    """A zero tensor whose data starts on a 256-byte boundary (as the plan's arena buffers do; a CPU allocation of a
    few bytes may not)."""
    n = 1
    for d in shape:
        n *= d
    flat = torch.zeros(n + 256, dtype=dtype)
    skip = (-flat.data_ptr() % 256) // flat.element_size()
    return flat[skip:skip + n].view(*shape)


def test_offered_only_for_its_epilogues_dtypes_and_alignment():
    x, w, b, out = _aligned_zeros(64, 32), _aligned_zeros(48, 32), _aligned_zeros(48), _aligned_zeros(64, 48)
    assert blaslt.offered(x, w, b, "none", False, out)
    assert blaslt.offered(x, w, None, "none", True, out)  # (a residual in place: beta = 1)
    assert blaslt.offered(x, w, b, "gelu_tanh", False, out)
    assert not blaslt.offered(x, w, _aligned_zeros(49)[1:], "none", False, out)  # a bias 2 bytes past a boundary
    assert not blaslt.offered(x, w, None, "gelu_tanh", False, out)  # cuBLASLt's GELU comes with a bias here
    assert not blaslt.offered(x, w, b, "gelu", False, out)  # the erf form: no cuBLASLt epilogue
    assert not blaslt.offered(x, w, b, "gelu_tanh", True, out)  # the residual goes after the activation
    assert not blaslt.offered(x.float(), w.float(), b.float(), "none", False, out.float())  # 16-bit only
    assert not blaslt.offered(x.view(torch.uint8)[:, 2:].view(torch.bfloat16), w[:, 1:], b, "none", False, out)  # offset rows
    assert not blaslt.offered(x.t(), w, b, "none", False, out)  # not a unit inner stride


def test_not_available_on_the_cpu_and_not_in_a_cpu_gemm_decision():
    assert not blaslt.available(torch.device("cpu"))
    x, w = torch.randn(4, 8, 16), torch.randn(24, 16)
    out = torch.empty(4, 8, 24)
    what, cands = lower.gemm([x, w], {"act": "none", "glu": False, "bias": False, "gate": False, "residual": False}, out,
                             None, torch.device("cpu"))
    assert "blaslt" not in what and not any(n.startswith("blaslt:") for n in cands)


def test_names_say_place_tile_and_split():
    assert blaslt.algorithm_name(0, _FakeNvmath.Algorithm((80, 64), 1)) == "blaslt:0,80x64,1"
    assert blaslt.algorithm_name(6, _FakeNvmath.Algorithm("UNDEFINED", 2)) == "blaslt:6,UNDEFINED,2"


def _nvmath_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not blaslt.available(torch.device("cuda")):
        pytest.skip("needs nvmath-python")


EPILOGUES = [("none", False, False), ("none", True, False), ("gelu_tanh", True, False), ("none", False, True),
             ("none", True, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n", [(37, 200, 136), (512, 1152, 1152)])
@pytest.mark.parametrize("act,has_bias,residual", EPILOGUES, ids=["plain", "bias", "gelu", "residual", "bias-residual"])
def test_gpu_every_algorithm(m, k, n, act, has_bias, residual, dtype):
    _nvmath_or_skip()
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.float64)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.float64) / math.sqrt(k)
    b = torch.randn(n, device="cuda", generator=g, dtype=torch.float64) if has_bias else None
    res = torch.randn(m, n, device="cuda", generator=g, dtype=torch.float64)
    want = x @ w.t() + (b if has_bias else 0)
    want = torch.nn.functional.gelu(want, approximate="tanh") if act == "gelu_tanh" else want
    want = want + res if residual else want
    x16, w16, b16 = x.to(dtype), w.to(dtype), b.to(dtype) if has_bias else None
    out = torch.empty(m, n, device="cuda", dtype=dtype)
    assert blaslt.offered(x16, w16, b16, act, residual, out)
    cands = blaslt.candidates(x16, w16, b16, act, residual, out)
    assert cands and all(name.startswith("blaslt:") for name in cands)
    for name, run in cands.items():
        out.copy_(res)  # (in place: the residual's buffer is the output)
        run()
        assert rel_err(out, want) <= TOL[dtype], (name, rel_err(out, want))
    # one algorithm replayed from a CUDA graph on new x values, as a plan runs it
    name, run = next(iter(cands.items()))
    out.copy_(res)
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    x2 = torch.randn(m, k, device="cuda", generator=g, dtype=torch.float64)
    x16.copy_(x2)
    out.copy_(res)
    graph.replay()
    want2 = x2 @ w.t() + (b if has_bias else 0)
    want2 = torch.nn.functional.gelu(want2, approximate="tanh") if act == "gelu_tanh" else want2
    assert rel_err(out, want2 + res if residual else want2) <= TOL[dtype], name


class _FakeNvmath:
    """nvmath.linalg.advanced as far as blaslt uses it, computing on the CPU: checks the glue (which operands, which
    epilogue, the bias along out^T's rows, in place into the output, one Matmul a candidate) without a GPU."""
    class MatmulEpilog:
        BIAS, GELU_BIAS = "BIAS", "GELU_BIAS"

    class Algorithm:
        def __init__(self, tile, split_k=1):
            self.tile, self.split_k = tile, split_k

        def as_numpy(self):
            return (self.tile, self.split_k)

        @classmethod
        def from_numpy(cls, rec):
            return cls(*rec)

    made = []

    class Matmul:
        def __init__(self, a, b, c=None, *, beta=None, options=None):
            assert options == {"inplace": True} and c is not None and beta is not None
            self.a, self.b, self.c, self.beta = a, b, c, beta
            _FakeNvmath.made.append(self)

        def plan(self, preferences=None, algorithms=None, epilog=None, epilog_inputs=None):
            self.epilog, self.inputs = epilog, epilog_inputs or {}
            self.algorithms = algorithms or [_FakeNvmath.Algorithm((80, 64)), _FakeNvmath.Algorithm((96, 64), 2)]
            return self.algorithms

        def execute(self):
            h = self.a.double() @ self.b.double() + self.beta * self.c.double()
            if self.epilog is not None:
                h = h + self.inputs["bias"].double()[:, None]  # along the rows of a @ b (out^T)
            if self.epilog == "GELU_BIAS":
                h = torch.nn.functional.gelu(h, approximate="tanh")
            self.c.copy_(h)
            return self.c

        def free(self):
            pass


@pytest.mark.parametrize("act,has_bias,residual", EPILOGUES, ids=["plain", "bias", "gelu", "residual", "bias-residual"])
def test_candidates_glue_against_float64(monkeypatch, act, has_bias, residual):
    monkeypatch.setattr(blaslt, "_nvmath", lambda: _FakeNvmath)
    monkeypatch.setattr(blaslt, "_PROBES", {})
    _FakeNvmath.made.clear()
    g = torch.Generator().manual_seed(0)
    x, w, b, res = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((37, 20), (24, 20), (24,), (37, 24)))
    out = res.clone()
    cands = blaslt.candidates(x, w, b if has_bias else None, act, residual, out)
    assert list(cands) == ["blaslt:0,80x64,1", "blaslt:1,96x64,2"]
    assert len(_FakeNvmath.made) == 1  # the probe, freed; no candidate's Matmul before its first run
    want = x @ w.t() + (b if has_bias else 0)
    want = torch.nn.functional.gelu(want, approximate="tanh") if act == "gelu_tanh" else want
    for name, run in cands.items():
        out.copy_(res)
        run()
        run()  # (again: the same Matmul, planned with that one algorithm)
        assert torch.allclose(out, res + 2 * want if residual else want), name  # (in place: each run adds its product)
    assert len(_FakeNvmath.made) == 3 and [m.algorithms[0].tile for m in _FakeNvmath.made[1:]] == [(80, 64), (96, 64)]
    blaslt.candidates(x, w, b if has_bias else None, act, residual, out)
    assert len(_FakeNvmath.made) == 3  # the problem's probe is remembered
