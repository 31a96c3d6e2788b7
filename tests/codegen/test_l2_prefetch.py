"""The weight-streaming GEMM's L2 prefetch before its PDL wait (codegen/kernels/pdl.py, ``KILN_PDL=l2``): the budget read
from the environment, the host's alignment decision, which bytes each program asks for (every weight row it streams
once, from its split's first column, within the budget and the row), and that the sums do not change: bit for bit the
plain launches' on the CPU (where the prefetch is skipped) and in a CUDA graph of decode GEMMs on the GPU."""
import importlib.util
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from kiln.codegen.kernels import pdl, qgemm, skinny
from kiln.codegen.kernels.qgemm import _l2_rows

# the operands of the register prefetch's test (loaded by path: tests/ is no package)
_spec = importlib.util.spec_from_file_location("_test_pdl", Path(__file__).parent / "test_pdl.py")
_pdl_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pdl_tests)
early_case = _pdl_tests.early_case


@pytest.mark.parametrize("value, l2, prefetch", [  # (prefetch: a one-row GEMV's first weight tiles, on by default)
    (None, 0, True), ("1", 0, True), ("0", 0, False), ("1+noprefetch", 0, False), ("prefetch", 0, True),
    ("l2", pdl.L2_BYTES, True), ("l2:64", 64 << 10, True), ("prefetch+l2:16", 16 << 10, True)])
def test_budget_from_the_environment(monkeypatch, value, l2, prefetch):
    if value is None:
        monkeypatch.delenv(pdl.ENV, raising=False)
    else:
        monkeypatch.setenv(pdl.ENV, value)
    assert pdl.l2(torch.zeros(1)) == 0 and not pdl.prefetch(torch.zeros(1))  # never on the CPU
    monkeypatch.setattr(pdl, "enabled", lambda t: value != "0")
    assert pdl.l2(torch.zeros(1)) == l2 and pdl.prefetch(torch.zeros(1)) == prefetch


def test_budget_must_be_kilobytes(monkeypatch):
    monkeypatch.setenv(pdl.ENV, "l2:32k")
    monkeypatch.setattr(pdl, "enabled", lambda t: True)
    with pytest.raises(ValueError, match="l2:<KB>"):
        pdl.l2(torch.zeros(1))


def test_alignment_decides_the_bytes():
    w = torch.zeros(40, 64, dtype=torch.bfloat16)  # rows of 128 bytes
    assert pdl.l2_bytes(w, 0, 1000) == 992  # rounded down to 16
    assert pdl.l2_bytes(w, 64, 4096) == 4096  # splits of 32 columns: starts 64 bytes apart
    assert pdl.l2_bytes(w, 8, 4096) == 0  # a split starting 8 bytes into a row
    assert pdl.l2_bytes(w, 0, 0) == 0
    assert pdl.l2_bytes(w.t(), 0, 4096) == 0  # columns not contiguous
    assert pdl.l2_bytes(w[:, 4:], 0, 4096) == 0  # the first row starts 8 bytes off
    assert pdl.l2_bytes(torch.zeros(40, 7, dtype=torch.bfloat16), 0, 4096) == 0  # rows 14 bytes apart
    assert pdl.l2_bytes(torch.zeros(40, 24, dtype=torch.uint8), 0, 4096) == 0  # rows 24 bytes apart
    assert pdl.l2_bytes(torch.zeros(40, 48, dtype=torch.uint8), 16, 4096) == 4096


def _launched(monkeypatch):
    """Record the L2_BYTES of every launch of the template, then run it."""
    seen, real = [], qgemm._wgemm_kernel

    class Recorder:
        def __getitem__(self, grid):
            def run(*args, **kw):
                seen.append(kw["L2_BYTES"])
                return real[grid](*args, **kw)
            return run
    monkeypatch.setattr(qgemm, "_wgemm_kernel", Recorder())
    return seen


@pytest.mark.interpreter
def test_launcher_drops_splits_that_start_off_16_bytes(monkeypatch):
    # a 4-bit weight, K = 96: 48 bytes a row. BLOCK_K 16 cuts 6 splits of 16 columns, 8 bytes; BLOCK_K 32, 3 of 16 bytes
    seen = _launched(monkeypatch)
    monkeypatch.setattr(pdl, "l2", lambda t: 4096)
    kw = dict(qweight=torch.randint(0, 256, (37, 48), dtype=torch.uint8), scales=torch.rand(37, 3) / 64, zeros=None, bits=4, group=32)
    for block_k in (16, 32):
        skinny.skinny_gemm(torch.randn(1, 96), **kw, config=dict(BLOCK_N=16, BLOCK_K=block_k, SPLIT_K=6))
    assert seen == [0, 4096]


@triton.jit
def _rows_kernel(w_ptr, addr_ptr, bytes_ptr, live_ptr, pid_n, k_lo, k_hi, N, stride_wn,
                 PACK: tl.constexpr, GLU: tl.constexpr, BLOCK_N: tl.constexpr, L2_BYTES: tl.constexpr,
                 WARPS: tl.constexpr, LANES: tl.constexpr):
    ptr, nbytes, live = _l2_rows(w_ptr, pid_n, k_lo, k_hi, N, stride_wn, PACK, GLU, BLOCK_N, L2_BYTES, WARPS)
    i = tl.arange(0, LANES)
    tl.store(addr_ptr + i, ptr.to(tl.int64))
    tl.store(bytes_ptr + i, nbytes + tl.zeros((LANES,), tl.int32))
    tl.store(live_ptr + i, live.to(tl.int32))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype, pack, glu, block_n, warps, pid_n, k_lo, k_hi, budget", [
    (torch.float16, 1, False, 16, 4, 0, 0, 200, 2048),  # whole K: 400 bytes a row, 128 allowed
    (torch.float16, 1, True, 16, 8, 2, 64, 200, 1 << 20),  # the last tile (rows 32..36 of 37), GLU, a short last split
    (torch.uint8, 2, True, 64, 1, 0, 96, 200, 64 * 128),  # 4-bit: 128 rows on one warp's 32 threads; 52 bytes -> 48
    (torch.uint8, 1, False, 16, 2, 1, 0, 8, 4096),  # 8 bytes in the range: nothing (16-byte sizes)
])
def test_each_row_is_asked_for_once(dtype, pack, glu, block_n, warps, pid_n, k_lo, k_hi, budget):
    n_out = 37
    w = torch.zeros(2 * n_out if glu else n_out, 200 // pack, dtype=dtype)
    rows_n = 2 * block_n if glu else block_n
    lanes = max(rows_n, 32 * warps)
    addr = torch.zeros(lanes, dtype=torch.int64)
    nbytes, live = torch.zeros(lanes, dtype=torch.int32), torch.zeros(lanes, dtype=torch.int32)
    _rows_kernel[(1,)](w, addr, nbytes, live, pid_n, k_lo, k_hi, n_out, w.stride(0), pack, glu, block_n, budget, warps, lanes)

    eb = w.element_size()
    size = min((k_hi - k_lo) // pack * eb // 16 * 16, budget // rows_n // 16 * 16)
    cols = [c for c in range(pid_n * block_n, (pid_n + 1) * block_n) if c < n_out]
    want = sorted(cols + ([n_out + c for c in cols] if glu else [])) if size else []
    lanes_live = live.nonzero().flatten().tolist()
    offsets = [(int(addr[i]) - w.data_ptr()) for i in lanes_live]
    got_rows = [(o - k_lo // pack * eb) // (w.stride(0) * eb) for o in offsets]
    assert sorted(got_rows) == want  # every row this program streams, once
    assert all((o - k_lo // pack * eb) % (w.stride(0) * eb) == 0 for o in offsets)  # from the split's first column
    assert all(int(nbytes[i]) == size for i in lanes_live)
    for i, row in zip(lanes_live, got_rows):  # the program's row r (gate rows, then up rows) on warp r % warps
        r = row - pid_n * block_n if row < n_out else block_n + row - n_out - pid_n * block_n
        assert i // 32 % warps == r % warps


@pytest.mark.interpreter
@pytest.mark.parametrize("m, bits, split, glu, norm, both", [
    (1, None, 1, False, False, False), (1, None, 3, True, True, True), (1, 8, 2, False, True, False),
    (1, 4, 3, True, False, True), (3, None, 3, False, True, False), (16, 8, 3, True, True, False)])
def test_prefetch_gives_the_same_bits(monkeypatch, m, bits, split, glu, norm, both):
    """The template with its L2 prefetch on (skipped under the interpreter, its rows computed all the same), alone and
    with the register prefetch of the first step: bit for bit the plain launch. K = 224: 7 steps of 32, 3 splits of 96, 96
    and 32 columns; 112-byte rows at 4 bits (K = 208's 104 would drop the prefetch: rows 16-byte aligned only)."""
    x, kw = early_case(m, bits, split, glu, norm, k=224, seed=5)
    plain = skinny.skinny_gemm(x, **kw)
    seen = _launched(monkeypatch)
    monkeypatch.setattr(pdl, "l2", lambda t: 1024)
    monkeypatch.setattr(pdl, "prefetch", lambda t, rows=1: both)
    assert torch.equal(skinny.skinny_gemm(x, **kw), plain)
    assert seen == [1024]


def _decode_gemms(bits):
    """Llama-3.2-1B's decode GEMMs of one layer at batch 1 (qkv, o + residual, gate/up GLU, down + residual) on fixed
    buffers, each on skinny's default configuration: a function running them ``layers`` times, and its output."""
    g = torch.Generator("cuda").manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    h, hid = torch.randn(1, 2048, generator=g, **bf16), torch.empty(1, 8192, **bf16)
    qkv = torch.empty(1, 3072, **bf16)
    calls = []
    for name, n, k, ep in (("qkv", 3072, 2048, {}), ("o", 2048, 2048, {"residual": h}), ("gu", 16384, 2048, {"act": "silu", "glu": True}),
                           ("down", 2048, 8192, {"residual": h})):
        w = torch.randn(n, k, generator=g, **bf16) * k ** -0.5
        if bits is None:
            wkw = dict(w=w)
        else:
            group = 128 if bits == 4 else k
            s = w.float().view(n, k // group, group).abs().amax(-1) / (2 ** (bits - 1) - 1)
            q = (w.float().view(n, k // group, group) / s[..., None]).round().add(2 ** (bits - 1)).clamp(0, 2 ** bits - 1)
            q = q.to(torch.uint8).view(n, k)
            q = q[:, 0::2] | (q[:, 1::2] << 4) if bits == 4 else q
            wkw = dict(qweight=q.contiguous(), scales=s.half(), zeros=None, bits=bits, group=group)
        c = skinny.configs(1, n, k, bits, ep.get("glu", False))[0]
        ws = torch.empty(max(16, skinny.workspace_bytes(1, n, k, bits, ep.get("glu", False), c)), device="cuda", dtype=torch.uint8)
        cnt = torch.zeros(max(16, skinny.counter_bytes(1, n, k, bits, ep.get("glu", False), c)), device="cuda", dtype=torch.uint8)
        x, out = {"qkv": (h, qkv), "o": (qkv[:, :2048], h), "gu": (h, hid), "down": (hid, h)}[name]
        calls.append((x, wkw, ep, out, ws, cnt, c))

    def run(layers=4):
        for _ in range(layers):
            for x, wkw, ep, out, ws, cnt, c in calls:
                skinny.skinny_gemm(x, **wkw, **ep, out=out, workspace=ws, counters=cnt, config=c)
        return h
    return run, h


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_decode_gemms_in_a_cuda_graph_equal_plain_launches(monkeypatch, bits):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch and cp.async.bulk.prefetch need compute capability >= 9")
    outs = {}
    for flag in ("0", "l2", "prefetch+l2:64"):
        monkeypatch.setenv(pdl.ENV, flag)
        run, h = _decode_gemms(bits)
        start = h.clone()
        seen = _launched(monkeypatch)
        want = run().clone()  # eager (compiles outside the capture)
        assert seen and all((b > 0) == (flag != "0") for b in seen), (flag, seen)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        for _ in range(3):
            h.copy_(start)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(h, want), flag  # every replay: the eager launches' bits
        outs[flag] = want
        monkeypatch.undo()
    assert torch.isfinite(outs["0"].float()).all()
    assert torch.equal(outs["l2"], outs["0"]) and torch.equal(outs["prefetch+l2:64"], outs["0"])
