"""GEMM with a fused epilogue: kiln's ``GEMM`` op as one Triton template.

    out = residual + gate * epi(x @ w^T + bias)
    epi(h) = act(h)                                  (glu=False)
    epi(h) = act(h[..., :N/2]) * h[..., N/2:]        (glu=True, w = [gate; up] along out-features)

x is [..., K], w is [N, K] (out, in) like ``F.linear``; the leading dims of x are flattened to M rows.
Every optional piece is a constexpr switch of the ONE kernel below, so a variant costs no code, only a
compile. Accumulation is float32 whatever the input dtype; the output has x's dtype.

Broadcast gate / residual. They may be anything that broadcasts to the output ``lead + (N',)``: DiT's
gate is [B, 1, N'] against an output [B, S, N']. The launcher expands the tensor to the output shape
(stride 0 on broadcast dims, no copy) and coalesces its leading dims into at most two groups
(outer, inner); row m of the flattened output then reads the operand at
``(m // rows) * stride_b + (m % rows) * stride_m``. [B, 1, N'] gives rows = S, stride_b = N',
stride_m = 0; a plain [M, N'] gives one group (stride_b unused); a bias-like [N'] gives stride 0 for
both. Only a pattern needing three or more groups (e.g. [B, 1, H, N'] against [B, S, H, N']) is
materialised with ``.contiguous()`` first.

GLU. One program owns output columns j..j+BLOCK_N of the N/2-wide result and keeps two fp32
accumulators: one over weight rows j (gate half), one over rows j + N/2 (up half), sharing each loaded
x tile. The tile written is act(acc_g) * acc_u; the [M, N] pre-activation never reaches memory.

RSTD. x may come from a weightless RMSNORM (its weight folded into w: ``passes/fold_norm_weight.py``):
RMSNORM(x) @ w^T = rstd * (x @ w^T) for each row's rstd = 1 / sqrt(mean(x^2) + eps), so the kernel reads the
raw x and scales each row's products before the epilogue. The sums of squares come from the tensor cores, as
the diagonal of x x^T accumulated from the same x tiles (a [BLOCK_M, BLOCK_M] product a step: 1/8 of the GLU's
work at 16 rows), so x's tiles go shared memory -> MMA untouched: a norm applied in registers on their way
(session 14's "triton-norm") cost 5.8 us at the 1B's 16-row gate/up. Offered for at most ``SMALL_M`` rows.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ...ir.ops import OPS
from ...ir.ops_fused import ACTIVATIONS

# triton.jit picks the interpreter from this variable when the kernel below is defined; read it then too
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# the interpreter is slow per program and per K step: one small config (irregular test shapes still span
# several tiles in every direction, so the masks are exercised)
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)


@triton.jit
def _activation(h, ACT: tl.constexpr):
    # h is float32
    if ACT == "silu":
        h = h * tl.sigmoid(h)
    elif ACT == "gelu":
        h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): no tanh needed, and no cancellation near h = 0
        h = h * tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
    return h


@triton.jit
def _gate_residual(acc, rows, cols, mask, gate_ptr, gate_rows, stride_gb, stride_gm, stride_gn,
                   res_ptr, res_rows, stride_rb, stride_rm, stride_rn, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    # the last two epilogue steps on float32 acc [BLOCK_M, BLOCK_N] at int64 rows / cols (shared with kernels/epilogue.py
    # and epilogue_codes.py). Gate / residual row m sits at (m // rows) * stride_b + (m % rows) * stride_m.
    if HAS_GATE:
        g_off = (rows // gate_rows) * stride_gb + (rows % gate_rows) * stride_gm  # [BLOCK_M]
        g = tl.load(gate_ptr + g_off[:, None] + cols[None, :] * stride_gn, mask=mask, other=0.0)
        acc = acc * g.to(tl.float32)
    if HAS_RESIDUAL:
        acc = acc + _residual_tile(res_ptr, rows, cols, mask, res_rows, stride_rb, stride_rm, stride_rn).to(tl.float32)
    return acc


@triton.jit
def _residual_tile(res_ptr, rows, cols, mask, res_rows, stride_rb, stride_rm, stride_rn):
    # the residual's tile at int64 rows x cols (row m at (m // res_rows) * stride_rb + (m % res_rows) * stride_rm)
    r_off = (rows // res_rows) * stride_rb + (rows % res_rows) * stride_rm
    return tl.load(res_ptr + r_off[:, None] + cols[None, :] * stride_rn, mask=mask, other=0.0)


@triton.jit
def _gate_residual_store(acc, rows, cols, mask, gate_ptr, gate_rows, stride_gb, stride_gm, stride_gn,
                         res_ptr, res_rows, stride_rb, stride_rm, stride_rn, out_ptr, stride_om, stride_on,
                         HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    # _gate_residual, then the store
    acc = _gate_residual(acc, rows, cols, mask, gate_ptr, gate_rows, stride_gb, stride_gm, stride_gn,
                         res_ptr, res_rows, stride_rb, stride_rm, stride_rn, HAS_GATE, HAS_RESIDUAL)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grouped_tile(t, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # (row, column) tile of program / tile index t in grouped order (Triton's matmul tutorial): GROUP_M row tiles walk
    # the column tiles together, so they share each weight tile in L2
    in_group = GROUP_M * num_pid_n
    first_m = (t // in_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (t % in_group) % size_m, (t % in_group) // size_m


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, bias_ptr, gate_ptr, res_ptr, out_ptr,
    M, N, K,  # N: output columns (half of w's rows with GLU)
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    gate_rows, stride_gb, stride_gm, stride_gn,  # gate row m sits at (m // gate_rows) * stride_gb + (m % gate_rows) * stride_gm
    res_rows, stride_rb, stride_rm, stride_rn,
    stride_om, stride_on,
    eps,  # RSTD: the norm's epsilon
    ACT: tl.constexpr, GLU: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    RSTD: tl.constexpr = False,  # x @ w^T is RMSNORM(x) @ w^T: each row's products times 1 / rms(x)
):
    # grouped program order (Triton matmul tutorial): GROUP_M row tiles share the weight tiles in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)  # int64 addressing: M * K may pass 2**31
    cols = offs_n.to(tl.int64)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn  # [BLOCK_K, BLOCK_N] of w^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GLU:
        wu_ptrs = w_ptr + offs_k[:, None] * stride_wk + (cols + N)[None, :] * stride_wn  # the up half
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if RSTD:
        squares = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)  # x x^T: the rows' sums of squares on its diagonal
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if RSTD:  # from the tensor cores, x's tile as it is: it stays on its way shared memory -> MMA
            squares = tl.dot(a, tl.trans(a), squares, input_precision=DOT_PRECISION)
        if GLU:
            bu = tl.load(wu_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PRECISION)
            wu_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # epilogue, in float32, in the reference's order: the norm's 1 / rms, bias, activation (glu), gate, residual
    if RSTD:
        diag = tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, BLOCK_M)[None, :]
        rstd = tl.rsqrt(tl.sum(tl.where(diag, squares, 0.0), axis=1) / K + eps)
        acc = acc * rstd[:, None]
        if GLU:
            acc_u = acc_u * rstd[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GLU:
            acc_u += tl.load(bias_ptr + N + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, ACT)
    if GLU:
        acc = acc * acc_u
    mask = mask_m[:, None] & mask_n[None, :]
    _gate_residual_store(acc, rows, cols, mask, gate_ptr, gate_rows, stride_gb, stride_gm, stride_gn,
                         res_ptr, res_rows, stride_rb, stride_rm, stride_rn, out_ptr, stride_om, stride_on,
                         HAS_GATE, HAS_RESIDUAL)


def _config(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m), num_warps=warps, num_stages=stages)


# H100 (sm_90: wgmma products, pointer loads; no TMA here). Large M: the tutorial's tiles plus smaller ones so that a
# DiT-XL/2 batch-1 GEMM (M = 256) still fills 132 SMs. Small M (decode / GEMV-like): thin row tiles.
LARGE_M_CONFIGS = [
    _config(128, 128, 64, 8, 3),
    _config(128, 128, 64, 4, 4),
    _config(128, 256, 64, 8, 3),
    _config(256, 128, 64, 8, 3),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
]
SMALL_M_CONFIGS = [
    _config(16, 64, 128, 4, 4),
    _config(16, 128, 64, 4, 4),
    _config(32, 64, 128, 4, 4),
    _config(32, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
]
SMALL_M = 64  # M at or below this uses SMALL_M_CONFIGS


@functools.cache
def _tuned(small_m: bool, glu: bool):
    # built on first GPU use: an Autotuner asks for the active driver, which the CPU interpreter lacks.
    # restore_value: the benchmark runs would otherwise re-add the residual when out IS the residual.
    return triton.autotune(_configs(small_m, glu), key=["M", "N", "K"], restore_value=["out_ptr"])(_gemm_kernel)


def configs(m: int, glu: bool = False) -> list[dict]:
    """The launch configurations the autotuner would try for ``m`` rows, as plain dicts (JSON-able)."""
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in _configs(m <= SMALL_M, glu)]


def _configs(small_m: bool, glu: bool) -> list:
    cs = SMALL_M_CONFIGS if small_m else LARGE_M_CONFIGS
    return [c for c in cs if accumulators_fit(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, glu)]


def accumulators_fit(block_m: int, block_n: int, warps: int, glu: bool) -> bool:
    """A tile's float32 accumulators within 128 registers a thread (glu holds two): past that ptxas runs out of
    registers and serializes every wgmma (the GLU's 128 x 128 tile on 4 warps, C7515, sm_90). Shared by the GEMM
    templates (aqgemm.py, tma_gemm.py)."""
    return block_m * block_n * (2 if glu else 1) <= 128 * 32 * warps


def _row_groups(t: torch.Tensor, lead: tuple, n: int):
    """``t`` broadcast to ``lead + (n,)``, addressed as a [M, n] matrix whose row m sits at
    ``(m // rows) * stride_b + (m % rows) * stride_m``: returns ``(tensor, rows, stride_b, stride_m, stride_n)``."""
    e = t.expand(*lead, n)  # stride 0 on broadcast dims; same storage
    for _ in range(2):
        groups = []  # (size, stride) of the coalesced leading dims, outermost first
        for size, stride in zip(lead, e.stride()[:-1]):
            if size == 1:
                continue
            if groups and groups[-1][1] == stride * size:
                groups[-1] = (groups[-1][0] * size, stride)
            else:
                groups.append((size, stride))
        if len(groups) <= 2:
            break
        e = e.contiguous()  # a broadcast pattern two index groups cannot express: one group after this
    groups = [(1, 0)] * (2 - len(groups)) + groups
    (_, stride_b), (rows, stride_m) = groups
    return e, rows, stride_b, stride_m, e.stride(-1)


def output_operands(fn: str, out, shape: tuple, like: torch.Tensor, gate, residual):
    """The epilogue's output and its broadcast operands, shared by ``gemm`` and ``epilogue``: ``out`` (allocated
    in ``like``'s dtype when None) and its [M, N] view, and the ``_row_groups`` addressing of the gate and the
    residual (``like`` stands in for an absent one; its switch is off)."""
    lead, n = shape[:-1], shape[-1]
    m = math.prod(lead)
    if out is None:
        out = torch.empty(shape, dtype=like.dtype, device=like.device)
    try:
        out2 = out.view(m, n)
    except RuntimeError as e:
        raise ValueError(f"{fn}: out with strides {out.stride()} cannot be viewed as [{m}, {n}]") from e
    g = _row_groups(gate, lead, n) if gate is not None else (like, 1, 0, 0, 0)
    r = _row_groups(residual, lead, n) if residual is not None else (like, 1, 0, 0, 0)
    return out, out2, g, r


def check_output_operands(fn: str, base: tuple, shape: tuple, inputs: list, gate, residual, out) -> None:
    """The checks ``gemm`` and ``epilogue`` share: gate and residual broadcast to the output ``shape`` without
    widening it, every operand has the dtype and device of ``base`` (name, tensor), ``out`` has ``shape``."""
    for name, t in (("gate", gate), ("residual", residual)):
        # plain Python: torch.broadcast_shapes costs ~25 us a call
        if t is not None and (t.dim() > len(shape) or any(a not in (1, b) for a, b in zip(reversed(t.shape), reversed(shape)))):
            raise ValueError(f"{fn}: {name} {tuple(t.shape)} does not broadcast to the output {shape}")
    bname, b = base
    for name, t in inputs + [("gate", gate), ("residual", residual), ("out", out)]:
        if t is not None and t.dtype != b.dtype:
            raise ValueError(f"{fn}: {name} has dtype {t.dtype}, {bname} has {b.dtype} (all operands share one dtype)")
        if t is not None and t.device != b.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, {bname} is on {b.device}")
    if out is not None and tuple(out.shape) != shape:
        raise ValueError(f"{fn}: out {tuple(out.shape)} must have the output shape {shape}")


def _check(x, w, bias, gate, residual, act, glu, out):
    """Validate the operands; returns the output shape."""
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise ValueError("gemm: x and w must be tensors")
    if act not in ACTIVATIONS:
        raise ValueError(f"gemm: unknown activation {act!r} (one of {', '.join(ACTIVATIONS)})")
    if x.dtype not in DTYPES:
        raise ValueError(f"gemm: x has dtype {x.dtype}; supported: float16, bfloat16, float32")
    if x.dim() < 1 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"gemm: x {tuple(x.shape)} and weight {tuple(w.shape)} do not fit (weight is [out, in], "
                         f"x's last dim must equal in)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != w.shape[0]):
        raise ValueError(f"gemm: bias {tuple(bias.shape)} for weight {tuple(w.shape)} must be [{w.shape[0]}]")
    n = w.shape[0]
    if glu:
        if n % 2:
            raise ValueError(f"gemm: glu needs an even number of weight rows ([gate; up]), weight is {tuple(w.shape)}")
        n //= 2
    shape = tuple(x.shape[:-1]) + (n,)
    check_output_operands("gemm", ("x", x), shape, [("w", w), ("bias", bias)], gate, residual, out)
    if INTERPRET:
        if x.dtype == torch.bfloat16:
            raise ValueError("gemm: the Triton interpreter computes tl.dot on bfloat16 wrongly; use float16/float32 on CPU")
    elif x.device.type != "cuda":
        raise ValueError(f"gemm: x is on {x.device}; the kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return shape


def gemm(x, w, bias=None, gate=None, residual=None, act="none", glu=False, out=None, config: dict | None = None,
         rstd_eps: float | None = None) -> torch.Tensor:
    """``residual + gate * epi(x @ w^T + bias)`` in one kernel (see the module docstring).

    x [..., K]; w [N, K]; bias [N]; gate and residual broadcast to the output [..., N'] with N' = N, or
    N / 2 with ``glu``. All operands share x's dtype (float16, bfloat16, float32); float32 accumulation.
    ``out`` may be given (output shape and dtype, flattenable to 2-D by a view); it may be the residual
    itself (an in-place residual add) but must not overlap any other operand. With ``rstd_eps``, x is first
    normalised by a weightless RMSNORM of that epsilon (the module docstring's RSTD).
    """
    shape = _check(x, w, bias, gate, residual, act, glu, out)
    if rstd_eps is not None and (not isinstance(rstd_eps, (int, float)) or rstd_eps < 0):
        raise ValueError(f"gemm: rstd_eps must be a number >= 0 (the norm's epsilon), got {rstd_eps!r}")
    lead, n = shape[:-1], shape[-1]
    k = w.shape[1]
    m = math.prod(lead)
    x2 = x.reshape(m, k)  # a view unless x's leading dims cannot be flattened
    out, out2, g, r = output_operands("gemm", out, shape, x, gate, residual)
    if m == 0 or n == 0:
        return out
    args = (x2, w, bias if bias is not None else x, g[0], r[0], out2, m, n, k,
            x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), *g[1:], *r[1:], out2.stride(0), out2.stride(1),
            float(rstd_eps or 0.0))
    meta = dict(ACT=act, GLU=bool(glu), HAS_BIAS=bias is not None, HAS_GATE=gate is not None,
                HAS_RESIDUAL=residual is not None, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                RSTD=rstd_eps is not None)
    if INTERPRET or config is not None:
        c = dict(config or INTERPRET_CONFIG)
        grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)
        _gemm_kernel[grid](*args, **meta, **c)
    else:
        grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)  # noqa: E731
        _tuned(m <= SMALL_M, bool(glu))[grid](*args, **meta)
    return out


def reference(x, w, bias=None, gate=None, residual=None, act="none", glu=False, rstd_eps=None) -> torch.Tensor:
    """The GEMM op's reference implementation (``OPS["GEMM"].ref``), in the operands' own dtype; with ``rstd_eps``
    on the weightless RMSNORM of x (``OPS["RMSNORM"].ref``)."""
    if rstd_eps is not None:
        x = OPS["RMSNORM"].ref([x], dict(eps=rstd_eps, dims=1))
    ins = [x, w] + [t for t in (bias, gate, residual) if t is not None]
    attrs = dict(bias=bias is not None, gate=gate is not None, residual=residual is not None, act=act, glu=glu)
    return OPS["GEMM"].ref(ins, attrs)

