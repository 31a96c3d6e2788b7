"""Programmatic dependent launch (codegen/kernels/pdl.py): on for Hopper unless KILN_PDL=0, never on the CPU; a chain of
decode kernels replayed from a CUDA graph gives the plain launches' bits. Each kernel reads what the one before
wrote, and writes the buffer the one before read (ping-pong): both hazards a too-early start would show."""
import pytest
import torch

from kiln.codegen.kernels import pdl
from kiln.codegen.kernels.decode_attention import decode_attention
from kiln.codegen.kernels.skinny import configs, counter_bytes, skinny_gemm, workspace_bytes


def test_never_on_the_cpu(monkeypatch):
    for flag in (None, "0", "1"):
        if flag is None:
            monkeypatch.delenv(pdl.ENV, raising=False)
        else:
            monkeypatch.setenv(pdl.ENV, flag)
        assert pdl.kwargs(torch.zeros(1)) == {"PDL": False}


def test_pointwise_rows_reads_its_word(monkeypatch):
    monkeypatch.delenv(pdl.ENV, raising=False)
    assert pdl.pointwise_rows() == pdl.POINTWISE_ROWS
    for flag, rows in (("1+pointwise:16", 16), ("pointwise:0", 0), ("prefetch+pointwise:4", 4)):
        monkeypatch.setenv(pdl.ENV, flag)
        assert pdl.pointwise_rows() == rows
    monkeypatch.setenv(pdl.ENV, "pointwise:x")
    with pytest.raises(ValueError, match="pointwise:<rows> takes a whole number of rows"):
        pdl.pointwise_rows()


def test_weight_prefetch_by_default_at_one_row(monkeypatch):
    # on by default for a one-row GEMV (session 19: +5% at batch 1, -0.9% at 16 rows), "noprefetch" turns it off, the
    # word "prefetch" turns it on at any rows; never without PDL
    monkeypatch.setattr(pdl, "enabled", lambda t: True)
    t = torch.zeros(1)
    for flag, want in ((None, (True, False)), ("1", (True, False)), ("1+noprefetch", (False, False)),
                       ("prefetch", (True, True)), ("1+l2", (True, False))):
        if flag is None:
            monkeypatch.delenv(pdl.ENV, raising=False)
        else:
            monkeypatch.setenv(pdl.ENV, flag)
        assert (pdl.prefetch(t, 1), pdl.prefetch(t, 16)) == want, flag
    monkeypatch.setattr(pdl, "enabled", lambda t: False)
    monkeypatch.delenv(pdl.ENV, raising=False)
    assert not pdl.prefetch(t, 1)


def _chain(m: int, k: int, layers: int):
    """A function running ``layers`` x (GEMM up + GELU, GEMM down + residual, decode attention over a cache of the
    activations) on fixed buffers, every GEMM on its split-K configuration where it has one."""
    g = torch.Generator("cuda").manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, k, generator=g, **bf16)
    ups = [torch.randn(4 * k, k, generator=g, **bf16) * k ** -0.5 for _ in range(layers)]
    downs = [torch.randn(k, 4 * k, generator=g, **bf16) * (4 * k) ** -0.5 for _ in range(layers)]
    kv = torch.randn(1, 2, 512, 64, generator=g, **bf16)
    h, hid = torch.empty(m, k, **bf16), torch.empty(m, 4 * k, **bf16)
    att = torch.empty(1, 8, m, 64, **bf16)
    cfg = {s: next((c for c in configs(m, *s) if c["SPLIT_K"] > 1), configs(m, *s)[0]) for s in ((4 * k, k), (k, 4 * k))}
    ws = {s: torch.empty(max(1, workspace_bytes(m, *s, config=c)), device="cuda", dtype=torch.uint8) for s, c in cfg.items()}
    cnt = {s: torch.zeros(max(4, counter_bytes(m, *s, config=c)), device="cuda", dtype=torch.uint8) for s, c in cfg.items()}

    def run():
        h.copy_(x)
        for up, down in zip(ups, downs):
            s = (4 * k, k)
            skinny_gemm(h, up, act="gelu_tanh", out=hid, workspace=ws[s], counters=cnt[s], config=cfg[s])
            s = (k, 4 * k)
            skinny_gemm(hid, down, residual=h, out=h, workspace=ws[s], counters=cnt[s], config=cfg[s])
            q = h[:, : 8 * 64].reshape(1, m, 8, 64).transpose(1, 2)
            decode_attention(q, kv, kv, gqa=True, out=att)
            h[:, : 8 * 64].copy_(att.transpose(1, 2).reshape(m, 8 * 64))
        return h
    return run, h


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4])
def test_chain_in_a_cuda_graph_equals_plain_launches(monkeypatch, m):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability >= 9")
    outs = {}
    for flag in ("0", "1", "prefetch", "l2"):
        monkeypatch.setenv(pdl.ENV, flag)
        run, h = _chain(m, 1024, layers=6)
        want = run().clone()  # eager (compiles and tunes outside the capture)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        for _ in range(3):
            h.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(h, want), flag  # every replay: the eager launches' bits
        outs[flag] = want
    assert pdl.kwargs(torch.zeros(1, device="cuda")) == {"PDL": True, "launch_pdl": True}
    monkeypatch.delenv(pdl.ENV)
    assert pdl.enabled(torch.zeros(1, device="cuda"))  # the default
    assert torch.isfinite(outs["1"].float()).all() and torch.equal(outs["1"], outs["0"])
    assert torch.equal(outs["prefetch"], outs["0"]) and torch.equal(outs["l2"], outs["0"])


def early_case(m: int, bits, split: int, glu: bool, norm: bool, k: int, seed: int = 3):
    """``(x, skinny_gemm's keywords)`` of a test of the weights read before the PDL wait: m rows of K = k, 37 output
    columns, a plain or kiln-format weight (qgemm.py: codes with zero points, groups of 16, 4 bits two a byte), a
    residual, GLU and the norm prologue as asked, 16 x 32 tiles in ``split`` splits."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * 37 if glu else 37
    x = torch.randn(m, k, generator=g)
    if bits is None:
        wkw = dict(w=torch.randn(n, k, generator=g) * k ** -0.5)
    else:
        codes = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.uint8)
        q = codes if bits == 8 else codes[:, 0::2] | (codes[:, 1::2] << 4)
        wkw = dict(qweight=q, scales=(torch.rand(n, k // 16, generator=g) + 0.5) / (2 ** bits * k ** 0.5),
                   zeros=torch.randint(0, 2 ** bits, (n, k // 16), generator=g, dtype=torch.uint8), bits=bits, group=16)
    kw = dict(wkw, act="silu" if glu else "gelu_tanh", glu=glu, residual=torch.randn(m, 37, generator=g),
              config=dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=split))
    if norm:
        kw.update(norm_weight=1 + 0.1 * torch.randn(k, generator=g), norm_eps=1e-6)
    return x, kw


@pytest.mark.interpreter
@pytest.mark.parametrize("m, bits, split, glu, norm", [
    (1, None, 1, False, False), (1, None, 3, True, True), (1, 8, 2, False, True), (1, 4, 3, True, False),
    (3, None, 3, False, True), (3, 4, 1, True, False), (16, 8, 3, True, True)])
def test_prefetched_first_step_gives_the_same_bits(monkeypatch, m, bits, split, glu, norm):
    """The weight-streaming GEMM with its first K step peeled (weight tiles loaded before the PDL wait, which the CPU
    skips): bit for bit the plain loop, GEMV and tl.dot paths, plain / 8 / 4-bit weights, split-K, GLU, norm prologue.
    K = 208: 7 steps of 32, the last partial (in 3 splits the last is that partial step alone)."""
    from kiln.codegen.kernels import skinny

    x, kw = early_case(m, bits, split, glu, norm, k=208)
    plain = skinny.skinny_gemm(x, **kw)
    monkeypatch.setattr(pdl, "prefetch", lambda t, rows=1: True)
    assert torch.equal(skinny.skinny_gemm(x, **kw), plain)


@pytest.mark.interpreter
@pytest.mark.parametrize("bits, split, glu, norm", [(4, 1, False, False), (4, 3, True, True), (8, 2, True, False),
                                                    (8, 1, False, True)])
def test_prefetched_words_step_gives_the_same_bits(monkeypatch, bits, split, glu, norm):
    """The WORDS GEMV (one row, a quantized weight as int32 words) with its first step's words and scales read before
    the PDL wait: bit for bit its plain loop, split-K, GLU, the norm prologue. K = 416: steps of 16 words (128 codes at
    4 bits, 64 at 8), the last one partial."""
    from kiln.codegen.kernels import skinny

    x, kw = early_case(1, bits, split, glu, norm, k=416)
    kw["config"] = dict(kw["config"], WORDS=True, BLOCK_K=16 * 32 // bits)
    plain = skinny.skinny_gemm(x, **kw)
    monkeypatch.setattr(pdl, "prefetch", lambda t, rows=1: True)
    monkeypatch.setattr(pdl, "prefetch_words", lambda t, bits: True)
    assert torch.equal(skinny.skinny_gemm(x, **kw), plain)
    monkeypatch.setattr(pdl, "prefetch", lambda t, rows=1: False)
    assert torch.equal(skinny.skinny_gemm(x, **kw), plain)


@pytest.mark.parametrize("min_bits", [4, 8])
def test_words_prefetch_is_on_by_default(monkeypatch, min_bits):
    # the WORDS peel: on by default for codes of at least WORDS_PEEL_MIN_BITS bits ("noprefetch" turns it off), for the
    # others with "prefetch" only
    monkeypatch.setattr(pdl, "enabled", lambda t: True)
    monkeypatch.setattr(pdl, "WORDS_PEEL_MIN_BITS", min_bits)
    for flag, want4, want8 in ((None, min_bits == 4, True), ("1", min_bits == 4, True), ("1+noprefetch", False, False),
                               ("1+prefetch", True, True), ("prefetch+l2", True, True)):
        if flag is None:
            monkeypatch.delenv(pdl.ENV, raising=False)
        else:
            monkeypatch.setenv(pdl.ENV, flag)
        assert (pdl.prefetch_words(torch.zeros(1), 4), pdl.prefetch_words(torch.zeros(1), 8)) == (want4, want8), flag
    monkeypatch.setattr(pdl, "enabled", lambda t: False)
    monkeypatch.delenv(pdl.ENV, raising=False)
    assert not pdl.prefetch_words(torch.zeros(1), 8)
