"""IDOT: the WORDS GEMV of a 4-bit weight with each word's sum taken by integer dot products (qweight_tiles.py). x goes
to 16-bit fixed point on each word column's power of two, split into byte planes by PRMT; a word's 8 codes are four
dp4a against them. CPU: the two PTX strings run on a small emulator of the instructions they use, against the integer
sums they stand for; the kernel under the interpreter (the PTX replaced by the same integer arithmetic) against the
float64 reference, with the norm prologue, NORM_POST, GLU, split-K, zero points and the peel. GPU: bfloat16 at Llama
decode shapes (the PTX itself)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import kiln.codegen.kernels.skinny as S
from kiln.codegen.kernels import pdl
from kiln.codegen.kernels.qweight_tiles import IDOT_M, IDOT_PLANES, IDOT_WORD
from kiln.codegen.kernels.skinny import configs, skinny_gemm
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter

_spec = importlib.util.spec_from_file_location("_test_skinny", Path(__file__).parent / "test_skinny.py")
_skinny_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_skinny_tests)
r, weight, check, check_norm = _skinny_tests.r, _skinny_tests.weight, _skinny_tests.check, _skinny_tests.check_norm


def idot(split=1, block_k=128, **kw):
    # an IDOT configuration at the interpreter's scale: 16 words a row a step
    return dict(BLOCK_N=16, BLOCK_K=block_k, SPLIT_K=split, WORDS=True, IDOT=True, **kw)


# ----------------------------------------------------------------------------- the PTX strings


def _byte(v, i, signed):
    b = (v >> (8 * i)) & 0xFF
    return b - 256 if signed and b >= 128 else b


def run_ptx(asm: str, args: list[int], outputs: int) -> list[int]:
    """The instructions IDOT's PTX strings use, on Python ints (32-bit registers): $0.. the outputs, then the inputs."""
    asm = getattr(asm, "value", asm)  # (a tl.constexpr)
    regs = {f"${outputs + i}": a & 0xFFFFFFFF for i, a in enumerate(args)}

    def val(op):
        return regs[op] if op in regs else int(op, 0) & 0xFFFFFFFF

    for ins in (s.strip() for s in asm.strip("{}").split(";")):
        if not ins or ins.startswith(".reg"):
            continue
        name, ops = ins.split(None, 1)
        ops = [o.strip() for o in ops.split(",")]
        a = [val(o) for o in ops[1:]]
        if name == "prmt.b32":  # result byte i: byte (selector nibble i) of b:a (no sign-replication nibbles here)
            src, sel = a[0] | (a[1] << 32), a[2]
            assert all((sel >> (4 * i)) & 8 == 0 for i in range(4)), ins
            out = sum(((src >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        elif name == "and.b32":
            out = a[0] & a[1]
        elif name == "shr.u32":
            out = a[0] >> a[1]
        elif name.startswith("dp4a."):
            sa, sb = (t == "s32" for t in name.split(".")[1:3])
            out = a[2] + sum(_byte(a[0], i, sa) * _byte(a[1], i, sb) for i in range(4))
        elif name == "mad.lo.u32":
            out = a[0] * a[1] + a[2]
        else:
            raise AssertionError(f"an instruction the emulator does not know: {ins}")
        regs[ops[0]] = out & 0xFFFFFFFF
    return [regs[f"${i}"] for i in range(outputs)]


def test_ptx_planes_and_word_give_the_integer_sums():
    # IDOT_PLANES splits 8 fixed-point values (M + v_j) into [l0 l2 l4 l6] [h0 h2 h4 h6] [l1 ..] [h1 ..]; IDOT_WORD, from
    # C, gives C + sum_j q_j v_j for a word of codes q_j at bits 4j: every sign and byte edge, mod 2**32
    rng = np.random.default_rng(0)
    edges = [-32640, -32768 + 128, -257, -256, -255, -129, -128, -1, 0, 1, 127, 128, 255, 256, 32640]
    for trial in range(300):
        v = [int(x) for x in (rng.choice(edges, 8) if trial % 3 == 0 else rng.integers(-32640, 32641, 8))]
        m = [(IDOT_M.value + x) & 0xFFFFFFFF for x in v]
        planes = run_ptx(IDOT_PLANES, [m[0], m[2], m[4], m[6], m[1], m[3], m[5], m[7]], 4)
        word = int(rng.integers(0, 2 ** 32)) if trial % 5 else [0, 0xFFFFFFFF, 0x88888888, 0x0F0F0F0F, 0xF0F0F0F0][trial // 5 % 5]
        c = int(rng.integers(-2 ** 31, 2 ** 31))
        got = run_ptx(IDOT_WORD, [word, *planes, c], 1)[0]
        want = (c + sum(((word >> (4 * j)) & 0xF) * v[j] for j in range(8))) & 0xFFFFFFFF
        assert got == want, (v, hex(word), c)


# ----------------------------------------------------------------------------- the kernel (interpreter)


@pytest.mark.parametrize("group,sym", [(32, True), (64, False), ("K", True), ("K", False)])
@pytest.mark.parametrize("split", [1, 3])
def test_idot_gemv(group, sym, split):
    # groups narrower than a step and per channel, zero points, K past a whole step (its words masked), split-K reduced
    # in the last program: within float16's tolerance of float64, and within a few of its ulps of the WORDS GEMV
    x = r(1, 448, dtype=torch.float16)
    wq = weight(37, 448, 4, torch.float16, group=group, sym=sym)
    got = check(x, wq, config=idot(split))
    words = skinny_gemm(x, **wq[0], config=dict(idot(split), IDOT=False))
    assert rel_err(got, words) <= TOL[torch.float16]


def test_idot_glu_residual_norm_prologue_and_norm_post():
    # the gate/up form (GLU, the norm prologue or NORM_POST) and down's (a residual)
    k = 256
    x, nw = r(1, k, dtype=torch.float16), r(k, dtype=torch.float16, scale=0.2) + 1
    nw[[3, 77]] = 8.0
    wq = weight(2 * 24, k, 4, torch.float16, group=64, sym=False)
    for post in (False, True):
        check_norm(x, wq, nw, act="silu", glu=True, config=idot(2, NORM_POST=True) if post else idot(2))
    check(x, weight(24, k, 4, torch.float16, group=64), residual=r(1, 24, dtype=torch.float16), config=idot(1))


@pytest.mark.parametrize("post", [False, True])
def test_idot_prefetched_first_step_gives_the_same_bits(monkeypatch, post):
    # the WORDS peel (the first step's words read before the PDL wait): bit for bit the loop
    x, nw = r(1, 384, dtype=torch.float16), r(384, dtype=torch.float16, scale=0.2) + 1
    kw = dict(weight(40, 384, 4, torch.float16, group=128)[0], norm_weight=nw, norm_eps=1e-5)
    c = idot(2, NORM_POST=True) if post else idot(2)
    plain = skinny_gemm(x, **kw, config=c)
    monkeypatch.setattr(pdl, "prefetch_words", lambda t, bits: True)
    monkeypatch.setattr(pdl, "prefetch", lambda t, rows=1: True)  # (PDL is off on the CPU: without it no peel ran)
    assert torch.equal(skinny_gemm(x, **kw, config=c), plain)


def test_idot_columns_of_very_different_scale():
    # a word column's fixed point is its own power of two: columns 1e-3 to 6e4 apart, a column with one large value and
    # small ones (those lose bits below 2**-16 of its largest, far below float16's rounding of the sum)
    k = 256
    x = r(1, k, dtype=torch.float64)
    x[0, :64] *= 1e-3
    x[0, 64:72] = torch.tensor([6e4, 1e-3, -2e-3, 3e-4, -1.0, 0.5, 1e-4, -6e4])
    x[0, 72:80] = 0.0  # an all-zero column
    x = x.to(torch.float16)
    check(x, weight(40, k, 4, torch.float16, group=32, sym=False), config=idot(1))


def test_idot_zero_and_non_finite_x():
    kw = weight(40, 256, 4, torch.float16, group=64)[0]
    x = torch.zeros(1, 256, dtype=torch.float16)
    assert torch.equal(skinny_gemm(x, **kw, config=idot(2)), torch.zeros(1, 40, dtype=torch.float16))
    x[0, 100] = float("nan")
    assert not skinny_gemm(x, **kw, config=idot(2)).isfinite().any()  # every row reads column 100's word
    x[0, 100] = float("inf")
    assert not skinny_gemm(x, **kw, config=idot(2)).isfinite().any()


def test_idot_float32_x_takes_the_words_path():
    # float32 x has more bits than 16-bit fixed point holds: IDOT leaves it to _words_step's float codes (the same bits)
    x = r(1, 256)
    kw = weight(40, 256, 4, torch.float32, group=64)[0]
    assert torch.equal(skinny_gemm(x, **kw, config=idot(1)), skinny_gemm(x, **kw, config=dict(idot(1), IDOT=False)))


def test_idot_config_checks_and_candidates(monkeypatch):
    x = r(1, 256, dtype=torch.float16)
    with pytest.raises(ValueError, match="IDOT sums the words of a 4-bit weight"):
        skinny_gemm(x, **weight(16, 256, 8, torch.float16, group="K")[0], config=idot(1, block_k=64))
    with pytest.raises(ValueError, match="IDOT sums the words of a 4-bit weight"):
        skinny_gemm(x, **weight(16, 256, 4, torch.float16)[0], config=dict(BLOCK_N=16, BLOCK_K=128, IDOT=True))
    for m, bits, want in [(1, 4, True), (1, 8, False), (4, 4, False), (1, None, False)]:
        cs = configs(m, 16384, 2048, bits, glu=True, norm=True, group=128 if bits == 4 else None)
        assert any(c.get("IDOT") for c in cs) == want
        assert all(c.get("WORDS") for c in cs if c.get("IDOT"))
    assert any(c.get("IDOT") and c.get("NORM_POST") for c in configs(1, 16384, 2048, 4, glu=True, norm=True, group=128))
    monkeypatch.setattr(S, "IDOT", False)
    assert not any(c.get("IDOT") for c in configs(1, 16384, 2048, 4, glu=True, norm=True, group=128))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("group,sym", [(128, True), (128, False), ("K", True)])
@pytest.mark.parametrize("name,k,n,epi", _skinny_tests.DECODE_SHAPES)
def test_gpu_idot_every_config(name, k, n, epi, group, sym):
    # each IDOT configuration the tuner tries at a Llama decode shape, one row, bf16 (the PTX on the GPU), with the norm
    # prologue and NORM_POST where decode folds the norm, against the float32 reference of the dequantized weight
    glu, act = epi.get("glu", False), epi.get("act", "none")
    x, kwargs, res, want = _skinny_tests.cuda_decode_case(1, k, n, 4, epi, group=group, sym=sym)
    norm = {}
    if not epi.get("residual"):
        nw = (1 + 0.2 * torch.randn(k, generator=torch.Generator().manual_seed(1))).to("cuda", torch.bfloat16)
        norm = dict(norm_weight=nw, norm_eps=1e-5)
        want = S.reference(x.float(), **dict(kwargs, scales=kwargs["scales"].float()), act=act, glu=glu,
                           norm_weight=nw.float(), norm_eps=1e-5)
    cs = [c for c in configs(1, n, k, 4, glu, norm=bool(norm), group=kwargs["group"]) if c.get("IDOT")]
    assert cs
    for c in cs:
        ws, counters = _skinny_tests.cuda_scratch(1, n, k, 4, glu, c)
        got = skinny_gemm(x, residual=res, act=act, glu=glu, workspace=ws, counters=counters, config=c, **norm, **kwargs)
        err = rel_err(got, want)
        assert err <= TOL[torch.bfloat16], f"{name} {c}: rel err {err:.2e}"
        assert not counters.any(), c
