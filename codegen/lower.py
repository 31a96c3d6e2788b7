"""The candidate implementations of each kernel group: what the tuner chooses between, per shape.

Each function gets the group's operands as the plan's fixed tensors (inputs, weights, arena views) and its
output buffer, and returns ``(what, candidates)``: ``what`` describes the shape for the tuner's key, each
candidate is a name -> a closure that runs the group once into ``out`` (so a CUDA graph can capture it).

    GEMM       cuBLAS (torch.mm / addmm) + kiln's one-pass epilogue kernel; cuBLASLt's own epilogues where
               they apply (a full residual as addmm's C; bias + tanh-GELU); kiln's Triton template; for at most
               16 rows (LLM decode) kiln's skinny template at its configurations (GEMV / split-K, the partials added
               by the last program of each tile or by a second launch). With a norm
               prologue (schedule.py): the norm's kernel then each of those, and for at most 16 rows the skinny
               template normalising x as it loads it (``triton-skinny-norm``, one launch)
    QGEMM      the weight dequantized then cuBLAS (the fallback: a torch temporary of the weight per call);
               the skinny template (<= 16 rows) or the qgemm template (more rows) dequantizing in registers
    AQGEMM     on the codes of x (per token: kiln's row kernel, a launch of its own, or the kernel producing x, see
               pointwise below): kiln's int8 / fp8 template (scales and epilogue fused); torch._int_mm + kiln's scaled
               epilogue (int8); torch._scaled_mm, cuBLASLt's fp8 GEMM with row-wise scales, + kiln's epilogue (fp8,
               bfloat16 out). Where its output feeds AQGEMMs as codes (schedule.py): each of those + the row quantizer,
               and the library ones with the epilogue storing the codes itself (``coded_aqgemm``)
    ATTENTION  (and the rope_kv group before a decode attention) in ``lower_attention.py``
    CONV       cuDNN into the planned buffer in its layout (``aten.cudnn_convolution.out``: NCHW or channels-last, no
               copy where x is in it too) + kiln's conv epilogue in place; cuDNN in the other layout + the epilogue back
               into the buffer's; torch's conv2d in x's layout + the epilogue. ``conv_layouts``: the convolution alone
               in each layout, which the kernels plan measures to choose the layouts it stores values in
    GROUP_NORM kiln's two-pass chunked kernels (+ SiLU): one group's tiles (``kiln``), and for channels-last x tiles of
               positions x whole groups (``kiln-nhwc``); torch's group_norm (+ silu) copied into the buffer
    pointwise  the one generated Triton kernel; where outputs of it feed AQGEMMs (schedule.py's activation codes) the
               kernel storing their codes and scales itself (``fused``) or storing them, then kiln's row quantizer
               (``separate``)
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from ..ir.ops import OPS, conv_operands
from ..ir.ops_fused import aqgemm_operands, aqgemm_rope, gemm_operands, qgemm_operands
from ..ir.quant import dequantize_rows
from . import blaslt
from .kernels import aqgemm as taq
from .kernels import conv_epilogue as tce
from .kernels import epilogue_codes as tec
from .kernels import gemm as tg
from .kernels import group_norm as tgn
from .kernels import qgemm as tq
from .kernels import quantize_rows as tqr
from .kernels import rope_cols as trc
from .kernels import skinny as ts
from .kernels import tma_gemm as tt
from .kernels.epilogue import epilogue
from .pointwise import launch
from .tuning import OutputCheck, launches, with_launches

# template configurations measured per shape besides cuBLAS / SDPA. Each is a Triton compile (1-2 s) of a cold
# start; one GEMM configuration (the template lost to cuBLAS at every measured shape) keeps DiT-XL/2's cold
# compile inside its budget
TRITON_GEMM_CONFIGS = 1
TRITON_AQGEMM_CONFIGS = 2
# the persistent TMA template's (kernels/tma_gemm.py, Hopper, more than tt.SMALL_M rows) for AQGEMMs: its first
# configuration and the one filling the last wave best. (Not for 16-bit GEMMs: at DiT-XL/2 and 1B-prefill shapes it lost
# to cuBLAS everywhere, bench/NOTES.md session 17)
TRITON_TMA_CONFIGS = 2
# the generation of cuBLASLt's algorithms as GEMM candidates (codegen/blaslt.py; in a GEMM's what where they are offered:
# a decision measured without them is measured again)
BLASLT_CANDIDATES = 1
# the skinny candidates' generation in the tuner's key (a decision measured between older candidates is measured
# again): 2 since split-K may reduce in its last program, 3 since a plain GEMV also tries skinny.WHOLE_K's tile, 4 since
# 2..16 rows try swapped tiles, 5 since the norm prologue's statistics pass is pipelined (it was K / BLOCK_K serial round
# trips: a decision "norm kernel + cuBLAS" measured against it at 16 rows is not one against today's) and its candidates
# at 2..16 rows include the default tile at half its splits, 6 since one row of a quantized weight also tries the
# WORDS tiles and the byte tile with its scales loaded a step ahead (skinny.TILES), 7 since its byte tiles are capped at
# 128 registers a thread (skinny.Tile.maxnreg: 4 programs an SM, not 3), 8 since a 4-bit weight also tries the MAGIC
# tiles (skinny.MAGIC_TILES: tensor cores at one row too), 9 since the norm prologue also tries NORM_POST (the statistics
# summed in the main loop, no pass before it), 10 since a decode decision charges each launch past a candidate's first
# (tuning.EXTRA_LAUNCH_MS), 11 since the WORDS tiles also come with NORM_POST, 12 since one row of a 4-bit weight also
# tries the IDOT tiles (skinny.IDOT_TILES: words summed by integer dot products), 13 since one row of a quantized weight
# also tries an unsplit WORDS tile over a whole K step (skinny.WHOLE_K_WORDS_TILES), 14 since those run their step
# without the K loop (qgemm.ONE_STEP: 48 registers a thread, not 128) and a GLU's spans 2048 codes of each half too, 15
# since a K of two such steps also tries one step twice as long on twice the warps (skinny.WIDE_WHOLE_K)
SKINNY_CANDIDATES = 15
# the AQGEMM candidates' generation (in an AQGEMM's what): 2 since the template's tile filling the last wave best is
# tried too (aqgemm.wave_fit), 3 since the persistent TMA template is (tma_gemm.py), 4 since its GLU tiles are one
# product of both halves a K step (session 43: a decision against its two products is not one against this), 1-byte
# codes also try a tile of two programs an SM (tma_gemm.PAIRED), and the first tile storing its output by TMA
AQGEMM_CANDIDATES = 4
# the rope candidates' generation (in a rotating AQGEMM's what): 2 since the TMA template sums the heads' halves in two
# accumulators (session 42: its split form's decisions are not this one's), 3 since it also tries one product a K step
# of the heads' halves read in (half, head) order (tma_gemm's ROPE_ONE), 4 since only that form is offered
ROPE_CANDIDATES = 4
# the generation of the row kernels storing codes (in a coded AQGEMM's what): 2 since quantize_rows / epilogue_codes
# hold rows up to 16384 wide in registers (one read of their input, not two)
ROW_CODES_CANDIDATES = 2


def config_name(impl: str, config: dict) -> str:
    """A tuning candidate's name: the implementation, then its launch configuration's values."""
    return impl + ":" + ",".join(str(v) for v in config.values())


def triton_ok(dtypes, dtype, device: torch.device, interpret: bool) -> bool:
    return dtype in dtypes and (device.type == "cuda" or interpret)


def _cublas(x, w, bias, gate, residual, act: str, glu: bool, out: torch.Tensor, tmp: torch.Tensor | None) -> None:
    """``residual + gate * epi(x @ w^T + bias)`` into ``out`` as torch.mm / addmm + kiln's one-pass epilogue kernel
    (``tmp``: the [M, 2N] product of a GLU)."""
    m, k = math.prod(x.shape[:-1]), x.shape[-1]
    out2 = out.view(m, out.shape[-1])
    plain = not _cublas_epilogue(act, glu, gate, residual)
    h2 = tmp if glu else out2  # the product; the epilogue reads it with the output's leading dims
    if not glu and in_place(residual, out):  # (out is written over the residual: the product must not go there)
        h2 = torch.empty_like(out2)
    x2, dst = x.reshape(m, k), out2 if plain else h2
    if bias is not None:  # cuBLAS adds it in float32 before rounding, as F.linear does
        torch.addmm(bias, x2, w.t(), out=dst)
    else:
        torch.mm(x2, w.t(), out=dst)
    if not plain:
        epilogue(h2.view(*out.shape[:-1], h2.shape[-1]), None, gate, residual, act, glu, out=out)


def in_place(residual, out: torch.Tensor) -> bool:
    """Whether ``out`` is written over ``residual`` (the plan gives a GEMM its residual's buffer where nothing reads the
    residual after it: ``runtime/kernel_plan.py``)."""
    return residual is not None and residual.data_ptr() == out.data_ptr()


def _epilogue_what(act: str, glu: bool, bias, gate, residual, out: torch.Tensor) -> dict:
    """The part of a GEMM / QGEMM / AQGEMM decision's ``what`` its fused epilogue makes (and whether ``out`` is written
    over the residual: the candidates then cost otherwise)."""
    return {"act": act, "glu": glu, "bias": bias is not None, "gate": None if gate is None else list(gate.shape),
            "residual": None if residual is None else list(residual.shape), **({"inplace": True} if in_place(residual, out) else {})}


def _cublas_epilogue(act: str, glu: bool, gate, residual) -> bool:
    """Whether ``_cublas`` runs kiln's epilogue kernel after cuBLAS (a launch of its own)."""
    return act != "none" or glu or gate is not None or residual is not None


def with_norm(candidates: dict, fused: dict, norm: dict | None) -> dict:
    """The candidates of a GEMM with a norm prologue ``norm`` (x, w, eps, and ``run``, which writes the normalised x
    the candidates read): each of ``candidates`` after the norm's own kernel, and the ``fused`` ones (the norm in
    the skinny template's loads) just before the plain skinny ones, so that a forced "triton-skinny" takes them.
    Without a prologue, ``candidates`` as they are."""
    if norm is None:
        return candidates
    run = norm["run"]
    out = {}
    for name, f in candidates.items():
        if name.startswith("triton-skinny:"):
            out.update(fused)
        out[name] = with_launches(lambda f=f: (run(), f()), 1 + launches(f))
    return {**out, **fused}


def output_check(op: str, args: list, attrs: dict, out: torch.Tensor, norm: dict | None, workspace, keep,
                 codes: tuple | None = None, out_codes: tuple | None = None) -> OutputCheck:
    """What a GEMM / LINEAR / QGEMM / AQGEMM decision's candidates read and write, for the tuner's comparison of their
    outputs (``tuning.OutputCheck``): x (the norm's input where a norm prologue leads: ``with_norm``; an AQGEMM's codes
    and row scales where a producer writes them: ``aqgemm``'s ``codes``), gate and residual, but none of ``keep``
    (ids of tensors whose values stay: stored weights, the caller's inputs), to be filled with random values; the output (an
    AQGEMM storing the next one's codes, ``coded_aqgemm``'s ``out_codes``: those codes times their scales); the split-K
    counters (``workspace``'s, as for ``gemm``)."""
    operands = {"QGEMM": qgemm_operands, "AQGEMM": aqgemm_operands}.get(op, gemm_operands)
    x, *_, gate, residual = operands(args, attrs)
    x = norm["x"] if norm is not None else x
    reads = (*(codes or (x,)), gate, residual)
    inputs = tuple(t for t in reads if t is not None and id(t) not in keep)
    counters = workspace[1] if isinstance(workspace, tuple) else None
    zero = () if counters is None else (counters,)
    if out_codes is None:
        return OutputCheck(inputs, out, zero)
    _, cq, cs, _ = out_codes
    return OutputCheck(inputs, out, zero, (cq, cs), lambda: dequantize_rows(cq, cs))


def _norm_what(what: dict, norm: dict | None) -> dict:
    if norm is not None:  # the tuner's key: a GEMM with a prologue is another choice than the bare GEMM
        what["norm"] = {"eps": norm["eps"], "x_stride": list(norm["x"].stride()), **({"unit": 1} if norm["unit"] else {})}
    return what


def gemm(args: list, attrs: dict, out: torch.Tensor, tmp: torch.Tensor | None, device: torch.device,
         workspace: torch.Tensor | tuple | None = None, norm: dict | None = None) -> tuple[dict, dict]:
    """A GEMM's candidates. ``tmp``: the [M, 2N] scratch of a GLU's product behind cuBLAS (None otherwise);
    ``workspace``: the skinny candidates' split-K scratch: the partials (``workspace_bytes`` bytes; counters are then
    allocated zeroed per call), or ``(partials, counters)`` with ``counter_bytes`` bytes of counters kept by the
    caller, or None (both per call); ``norm``: the RMSNORM prologue (``with_norm``), whose output is ``args[0]``."""
    x, w, bias, gate, residual = gemm_operands(args, attrs)
    act, glu = attrs["act"], attrs["glu"]
    m, k = math.prod(x.shape[:-1]), x.shape[-1]
    nout = out.shape[-1]
    out2 = out.view(m, nout)
    wt = w.t()

    candidates = {"cublas": with_launches(lambda: _cublas(x, w, bias, gate, residual, act, glu, out, tmp),
                                          1 + _cublas_epilogue(act, glu, gate, residual))}
    # cuBLAS(Lt) computes two epilogues itself: + a full residual (as addmm's C) and bias + tanh-GELU
    only_residual = residual is not None and act == "none" and not glu and gate is None and bias is None
    if only_residual and tuple(residual.shape) == tuple(out.shape):
        res2 = residual.reshape(m, nout)
        candidates["cublaslt:residual"] = lambda: torch.addmm(res2, x.reshape(m, k), wt, out=out2)
    # (cuBLASLt's GELU epilogue is the tanh form on CUDA; torch's CPU fallback of the same call uses erf)
    if bias is not None and act == "gelu_tanh" and not glu and gate is None and residual is None and device.type == "cuda":
        candidates["cublaslt:gelu"] = lambda: torch._addmm_activation(bias, x.reshape(m, k), wt, use_gelu=True, out=out2)
    library = _blaslt(x, w, bias, gate, residual, act, glu, out, out2, device)
    candidates.update(library)
    template = triton_ok(tg.DTYPES, x.dtype, device, tg.INTERPRET)
    cfgs = (tg.configs(m, glu) if device.type == "cuda" else [tg.INTERPRET_CONFIG])[:TRITON_GEMM_CONFIGS] if template else []
    for c in cfgs:
        candidates[config_name("triton", c)] = (lambda c=c: tg.gemm(x, w, bias, gate, residual, act, glu, out=out, config=c))
    decode = skinny(x, dict(w=w), (bias, gate, residual), attrs, out, workspace, device)
    candidates.update(decode)
    fused = skinny(x, dict(w=w), (bias, gate, residual), attrs, out, workspace, device, norm)
    if norm is not None and norm["unit"] and 1 < m <= tg.SMALL_M:
        # a weightless norm (passes/fold_norm_weight.py): the template scales its rows by 1 / rms itself (RSTD), no launch.
        # Not at one row, where the skinny template's norm prologue reads a 4 KB x and launches with PDL: timed cold
        # alone the two tie (1B gate/up 27.1 / 27.0 us), in the step RSTD lost 3% (bench/NOTES.md, session 18)
        for c in cfgs:
            fused[config_name("triton-rstd", c)] = (lambda c=c: tg.gemm(norm["x"], w, bias, gate, residual, act, glu, out=out,
                                                                         config=c, rstd_eps=norm["eps"]))
    candidates = with_norm(candidates, fused, norm)
    what = {"op": "GEMM", "x": list(x.shape), "x_stride": list(x.stride()), "w": list(w.shape), "dtype": str(x.dtype),
            **_epilogue_what(act, glu, bias, gate, residual, out), **({"blaslt": BLASLT_CANDIDATES} if library else {})}
    if decode:  # (a decision cached before the skinny template, or its one-launch split-K, was a candidate is not one
        what["skinny"] = SKINNY_CANDIDATES  # between these)
        what["weights"] = "cold"  # a decode GEMM streams its weight from HBM: timed so (tuning.py)
    return _norm_what(what, norm), candidates


def _blaslt(x, w, bias, gate, residual, act: str, glu: bool, out: torch.Tensor, out2: torch.Tensor, device: torch.device) -> dict:
    """cuBLASLt's other algorithms for the GEMM (``codegen/blaslt.py``, where nvmath-python is installed): a product of
    more than the skinny template's rows with bias / bias + tanh-GELU or a residual in place (``out`` is the residual's
    buffer), no gate, no GLU. (Not at decode's 1..16 rows: measured only at 512 rows and more; there the skinny
    candidates chain by PDL, which a library kernel does not.) ``out2``: ``out`` as [M, N]."""
    m, k = out2.shape[0], x.shape[-1]
    if m <= ts.MAX_M or glu or gate is not None or not blaslt.available(device):
        return {}
    accumulate = residual is not None
    if accumulate and not (in_place(residual, out) and tuple(residual.shape) == tuple(out.shape)):
        return {}
    try:
        x2 = x.view(m, k)  # (the candidates hold their operands: a copy would go stale)
    except RuntimeError:
        return {}
    if not blaslt.offered(x2, w, bias, act, accumulate, out2):
        return {}
    return blaslt.candidates(x2, w, bias, act, accumulate, out2)


def _skinny_configs(m: int, n: int, k: int, bits: int | None, glu: bool, device: torch.device, norm: bool = False,
                    group: int | None = None) -> list[dict]:
    """The skinny template's configurations for ``m`` rows (``norm``: with the norm prologue, ``skinny.configs``'s
    list for it, whose NORM_POST entries need more workspace than the plain list's): its H200 list, or under the interpreter its small tiles
    with split-K reduced by the last program (first, as the H200 default of a decode GEMM that splits: a forced
    "triton-skinny" plan runs the workspace and counter paths in CPU tests too) and without split-K. (The two-launch
    reduction, REDUCE "separate", is an H200 candidate; kernels/skinny.py's tests run it on CPU.)"""
    if device.type == "cuda":
        return ts.configs(m, n, k, bits, glu, norm, group)
    return [dict(ts.INTERPRET_CONFIG, SPLIT_K=2, REDUCE="last"), ts.INTERPRET_CONFIG]


def _skinny_fits(m: int, dtype: torch.dtype, device: torch.device) -> bool:
    return 1 <= m <= ts.MAX_M and triton_ok(tq.DTYPES, dtype, device, ts.INTERPRET)


def _skinny_scratch(size, op: str, attrs: dict, x_shape, w_shape, dtype: torch.dtype, device: torch.device) -> int:
    # the largest ``size(m, n, k, bits, glu, config)`` over the skinny configurations of a GEMM / LINEAR / QGEMM
    m, k = math.prod(x_shape[:-1]), x_shape[-1]
    if op not in ("GEMM", "LINEAR", "QGEMM") or not _skinny_fits(m, dtype, device):
        return 0
    bits, glu, n = attrs.get("bits"), attrs.get("glu", False), w_shape[0]
    return max(size(m, n, k, bits, glu, c) for norm in (False, True)  # (the norm prologue's list: NORM_POST's squares too)
               for c in _skinny_configs(m, n, k, bits, glu, device, norm, attrs.get("group")))


def workspace_bytes(op: str, attrs: dict, x_shape, w_shape, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes of split-K workspace (the partials, scratch of one call) the candidates of a GEMM / LINEAR / QGEMM group
    need: the largest over the skinny configurations (0 when none runs or none splits). ``w_shape``: the weight's
    (QGEMM: the qweight's) shape."""
    return _skinny_scratch(ts.workspace_bytes, op, attrs, x_shape, w_shape, dtype, device)


def counter_bytes(op: str, attrs: dict, x_shape, w_shape, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes of split-K counters the skinny candidates of a group need (arguments as for ``workspace_bytes``; 0 unless
    one reduces in its last program). Unlike the workspace they are state: zero when planned, left zero by every call,
    and the group's alone (``kernels/skinny.py``)."""
    return _skinny_scratch(ts.counter_bytes, op, attrs, x_shape, w_shape, dtype, device)


def skinny(x, weight: dict, epilogue_ops: tuple, attrs: dict, out, workspace, device: torch.device,
           norm: dict | None = None) -> dict:
    """The skinny template's candidates for at most 16 rows (none for more): ``weight`` is ``dict(w=...)`` or the
    quantized ``dict(qweight=, scales=, zeros=, bits=, group=)``; ``epilogue_ops`` (bias, gate, residual);
    ``workspace``: the split-K scratch as for ``gemm``; with ``norm`` (a prologue, see ``with_norm``) the
    template normalising ``norm["x"]`` itself (``x``: unused). ``attrs["static_w"]``: the weight is a stored one (the
    kernels plan says so), which the template may read before its PDL wait (``skinny_gemm``'s ``static_weight``)."""
    m, k = math.prod(x.shape[:-1]), x.shape[-1]
    if not _skinny_fits(m, x.dtype, device):
        return {}
    n = (weight["w"] if "w" in weight else weight["qweight"]).shape[0]  # the weight's rows
    bias, gate, residual = epilogue_ops
    act, glu = attrs["act"], attrs["glu"]
    scratch = dict(zip(("workspace", "counters"), workspace if isinstance(workspace, tuple) else (workspace, None)))
    name, src, prologue = "triton-skinny", x, {}
    if norm is not None:
        name, src, prologue = "triton-skinny-norm", norm["x"], dict(norm_weight=norm["w"], norm_eps=norm["eps"])
    candidates = {}
    for c in _skinny_configs(m, n, k, weight.get("bits"), glu, device, norm is not None, weight.get("group")):
        def run(c=c):
            return ts.skinny_gemm(src, bias=bias, gate=gate, residual=residual, act=act, glu=glu, **weight, **prologue, out=out,
                                  **scratch, config=c, static_weight=bool(attrs.get("static_w")))
        candidates[config_name(name, c)] = with_launches(run, 2 if c.get("REDUCE") == "separate" else 1)
    return candidates


def qgemm(args: list, attrs: dict, out: torch.Tensor, tmp: torch.Tensor | None, device: torch.device,
          workspace: torch.Tensor | tuple | None = None, norm: dict | None = None) -> tuple[dict, dict]:
    """A QGEMM's candidates (``tmp``, ``workspace``, ``norm``: as for ``gemm``)."""
    x, q, scales, zeros, bias, gate, residual = qgemm_operands(args, attrs)
    act, glu, bits, group = attrs["act"], attrs["glu"], attrs["bits"], attrs["group"]
    m = math.prod(x.shape[:-1])

    def dequant_cublas():  # the kernels' float32 dequantization, rounded once to x's dtype: what the op's reference does
        w = tq.dequantize(q, scales, zeros, bits, group, torch.float32).to(x.dtype)
        _cublas(x, w, bias, gate, residual, act, glu, out, tmp)

    # (dequantized in float32, rounded, cuBLAS, the epilogue where there is one)
    candidates = {"dequant-cublas": with_launches(dequant_cublas, 3 + _cublas_epilogue(act, glu, gate, residual))}
    weight = dict(qweight=q, scales=scales, zeros=zeros, bits=bits, group=group)
    decode = skinny(x, weight, (bias, gate, residual), attrs, out, workspace, device)
    candidates.update(decode)
    if m > ts.MAX_M and triton_ok(tq.DTYPES, x.dtype, device, tq.INTERPRET):
        for c in tq.configs(m, glu) if device.type == "cuda" else [tq.INTERPRET_CONFIG]:
            candidates[config_name("triton-qgemm", c)] = (
                lambda c=c: tq.qgemm(x, q, scales, zeros, bits, group, bias, gate, residual, act, glu, out=out, config=c))
    candidates = with_norm(candidates, skinny(x, weight, (bias, gate, residual), attrs, out, workspace, device, norm), norm)
    what = {"op": "QGEMM", "x": list(x.shape), "x_stride": list(x.stride()), "qweight": list(q.shape), "bits": bits,
            "group": group, "scales": str(scales.dtype), "zeros": zeros is not None, "dtype": str(x.dtype),
            **_epilogue_what(act, glu, bias, gate, residual, out)}
    if decode:
        what["skinny"] = SKINNY_CANDIDATES
        what["weights"] = "cold"
        if not ts.WHOLE_K_WORDS and m == 1:  # (an A/B without those candidates: its decisions apart)
            what["whole_k_words"] = False
    return _norm_what(what, norm), candidates


def aqgemm(args: list, attrs: dict, out: torch.Tensor, tmp: torch.Tensor | None, device: torch.device,
           workspace: torch.Tensor | None = None, norm: dict | None = None, codes: tuple | None = None) -> tuple[dict, dict]:
    """An AQGEMM's candidates (``tmp``, ``workspace``, ``norm``: unused, the signature of ``gemm``'s; an AQGEMM takes no
    norm prologue). ``codes``: (codes [..., K], scales [...]) of x, written before the call (``quantizer`` or the kernel
    producing x); None: each candidate quantizes x first, into torch temporaries (a CUDA graph serves them from its
    pool at fixed addresses). The library products are torch temporaries of each call."""
    x, wq, ws, smooth, bias, gate, residual = aqgemm_operands(args, attrs)
    fmt, act, glu, group = attrs["format"], attrs["act"], attrs["glu"], attrs.get("act_group", 0)
    m, k, nw = math.prod(x.shape[:-1]), x.shape[-1], wq.shape[0]
    quantized = _quantized(x, fmt, smooth, codes, group)
    blocks = dict(xs_group=group) if group else {}  # (x's scales by groups: the Triton templates only)
    rope = aqgemm_rope(args, attrs)  # (cos, sin, head dim, end) or None
    candidates = {}
    if quantizes(x.dtype, device):
        native = set()  # (with rope: the candidates rotating q and k themselves)
        for c in _aqgemm_configs(m, nw, glu, device, group):
            name, own = config_name("triton-aqgemm", c), dict(blocks)
            if rope and trc.tile_fits(rope[2], c["BLOCK_N"]):
                own["rope"] = rope
                native.add(name)
            candidates[name] = lambda c=c, own=own: taq.aqgemm(*quantized(), wq, ws, bias, gate, residual, act, glu, out=out,
                                                               config=c, **own)
        tma = _tma_configs(codes[0] if codes is not None else None, wq, m, glu, nw, device, group, rope=rope)
        tma = tma[:TRITON_TMA_CONFIGS] + [c for c in tma[TRITON_TMA_CONFIGS:] if c.get("PER_SM")]  # (the paired tile too)
        if rope:  # the rotating tile as one product a K step (its two-product form had every wgmma serialized by
            # ptxas, C7515, and ran 45.0 / 39.8 us against 28.5 / 36.4 in e4m3 / int8: H100, session 44)
            tma = [dict(c, ROPE_ONE=True) for c in tma]
        elif tma and device.type == "cuda" and tt.store_by_tma(out):  # (its first tile storing by TMA too)
            tma.append(dict(tma[0], TMA_STORE=True))
        for c in tma:
            native.add(config_name("triton-tma", c))
            candidates[config_name("triton-tma", c)] = partial(_tma_aqgemm, quantized, wq, ws, (bias, gate, residual), act, glu,
                                                               out, c, dict(blocks, **({"rope": rope} if rope else {})))
        if not group:
            candidates.update(_aqgemm_library(quantized, wq, ws, (bias, gate, residual), attrs, out, device, (m, k, nw)))
        else:
            candidates.update(scaled_mm_blocks(quantized, wq, ws, (bias, gate, residual), attrs, out, device, (m, k, nw)))
        if rope:  # the others store the output unrotated: rope_cols' in-place kernel after them
            candidates = {name: run if name in native else _then_rope(run, out, rope)
                          for name, run in candidates.items()}
    if not candidates:  # no kernel for this dtype / device: the op's reference, copied
        candidates["reference"] = lambda: out.copy_(OPS["AQGEMM"].ref(args, attrs))
    what = {"op": "AQGEMM", "format": fmt, "x": list(x.shape), "x_stride": list(x.stride()), "w": list(wq.shape),
            "dtype": str(x.dtype), "smooth": smooth is not None, "candidates": AQGEMM_CANDIDATES,
            **_epilogue_what(act, glu, bias, gate, residual, out), **({"act_group": group} if group else {}),
            **({"rope": [ROPE_CANDIDATES, rope[2], rope[3], list(rope[0].shape), list(rope[0].stride())]} if rope else {})}
    if codes is not None:  # (the GEMM alone: another measurement than quantizer + GEMM)
        what["codes"] = True
    return what, candidates


def _aqgemm_configs(m: int, n: int, glu: bool, device: torch.device, group: int = 0, codes: int = 0) -> list[dict]:
    """The pointer template's configurations for m rows and n output columns (w's rows): on CUDA its first
    TRITON_AQGEMM_CONFIGS and the one filling the last wave best (``taq.wave_fit``), under the interpreter its small
    one; with block scales those whose K step divides x's ``group`` and whose tiles hold whole output ``codes`` groups."""
    if device.type != "cuda":
        return [c for c in [_interpret_config(taq.INTERPRET_CONFIG, group, codes)] if _fits_blocks(c, group, codes)]
    cs = [c for c in taq.configs(m, glu) if _fits_blocks(c, group, codes)]
    cfgs = cs[:TRITON_AQGEMM_CONFIGS]
    fit = taq.wave_fit(m, n // 2 if glu else n, glu, torch.cuda.get_device_properties(device).multi_processor_count, cs) if cs else None
    return cfgs + ([fit] if fit is not None and fit not in cfgs else [])


def _interpret_config(c: dict, group: int, codes: int) -> dict:
    """An interpreter config's tiles widened to whole block-scale groups (x's ``group`` of K, the output's ``codes``)."""
    c = dict(c)
    if codes:
        c["BLOCK_N"] = max(c["BLOCK_N"], codes)
    if group and group % c["BLOCK_K"]:
        c["BLOCK_K"] = group
    return c


def _fits_blocks(c: dict, group: int, codes: int) -> bool:
    return (not group or group % c["BLOCK_K"] == 0) and (not codes or c["BLOCK_N"] % codes == 0)


def _tma_configs(x: torch.Tensor | None, w: torch.Tensor, m: int, glu: bool, nw: int, device: torch.device, group: int = 0,
                 codes: int = 0, rope: tuple | None = None) -> list[dict]:
    """The persistent TMA template's configurations for x [m, K] (None: a contiguous code buffer) and w [nw, K]: none
    where TMA cannot read them (``tt.supported``); on CUDA its first and the one filling the last wave best, under the
    interpreter its small one; with block scales only those that fit them (``_aqgemm_configs``), with ``rope`` those
    whose tiles hold whole heads (the interpreter's widened to two heads; none with block scales or columns that are
    not whole heads)."""
    runs = tt.INTERPRET if device.type != "cuda" else not tt.INTERPRET
    if not runs or not tt.supported(x, w):
        return []
    dim = rope[2] if rope else 0
    if dim and (group or w.shape[0] % dim):
        return []
    if device.type != "cuda":
        c = _interpret_config(tt.INTERPRET_CONFIG, group, codes)
        c["BLOCK_N"] = max(c["BLOCK_N"], 2 * dim)
        return [c] if _fits_blocks(c, group, codes) and (not dim or trc.tile_fits(dim, c["BLOCK_N"])) else []
    # (rope: two accumulators of half a tile and the tables live at once in the epilogue: GLU's register budget, which
    # leaves out the configs that spilled 376-512 bytes a thread, compiled for sm_90)
    cs = [c for c in tt.configs(m, w.dtype, glu or bool(dim)) if _fits_blocks(c, group, codes) and (not dim or trc.tile_fits(dim, c["BLOCK_N"]))]
    fit = taq.wave_fit(m, nw // 2 if glu else nw, glu, torch.cuda.get_device_properties(device).multi_processor_count, cs) if cs else None
    return cs[:1] + ([fit] if fit is not None else []) + [c for c in cs[1:] if c != fit]


def _tma_aqgemm(quantized, wq, ws, epilogue_ops: tuple, act: str, glu: bool, out, config: dict, blocks: dict | None = None) -> None:
    q, s = quantized()
    tt.tma_gemm(q, wq, s, ws, *epilogue_ops, act, glu, out=out, config=config, **(blocks or {}))


def _then_rope(run, out: torch.Tensor, rope: tuple):
    """``run`` (storing an AQGEMM's output into ``out``), then ``out``'s q and k columns rotated in place (``rope``:
    cos, sin, head dim, end; ``rope_cols.rope_columns``)."""
    def run_then_rope():
        run()
        trc.rope_columns(out, *rope)
    return run_then_rope


def _quantized(x: torch.Tensor, fmt: str, smooth: torch.Tensor | None, codes: tuple | None, group: int = 0):
    """An AQGEMM's x as its candidates read it: () -> (codes [..., K], scales [...] or [..., K / group]), ``codes`` where
    written before the call, else quantized by kiln's row kernel into torch temporaries (a CUDA graph serves them from
    its pool)."""
    def quantized():
        if codes is not None:
            return codes
        return quantize_blocks(x, fmt, smooth, group)
    return quantized


def quantize_blocks(x: torch.Tensor, fmt: str, smooth: torch.Tensor | None, group: int, out: tuple | None = None) -> tuple:
    """x [..., K] -> (codes [..., K], scales [...]) by kiln's row kernel, or with ``group`` (scales [..., K / group])
    each row's groups quantized as rows of their own (x times ``smooth`` first, as a torch temporary then: the row
    kernel's smooth vector is a row's); into ``out`` (codes, scales) where given."""
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    if not group:
        q, s = tqr.quantize_rows(x.reshape(math.prod(lead), k), fmt, smooth,
                                 out=None if out is None else (out[0].view(-1, k), out[1].view(-1)))
        return q.view(*lead, k), s.view(lead)
    xg = (x.float() * smooth if smooth is not None else x).reshape(-1, group)  # (smooth: float32, as the op's)
    q, s = tqr.quantize_rows(xg, fmt, None, out=None if out is None else (out[0].view(-1, group), out[1].view(-1)))
    return q.view(*lead, k), s.view(*lead, k // group)


def quantizes(dtype: torch.dtype, device: torch.device) -> bool:
    """kiln's row quantizer takes an AQGEMM's x of ``dtype`` on ``device`` (else the AQGEMM runs its reference)."""
    return triton_ok(tqr.DTYPES, dtype, device, tqr.INTERPRET)


def quantizer(x: torch.Tensor, fmt: str, codes: torch.Tensor, scales: torch.Tensor, smooth: torch.Tensor | None,
              group: int = 0):
    """A call writing the ``fmt`` codes [..., K] and scales [...] (``group``: [..., K / group]) of x [..., K] (times
    ``smooth``) by kiln's row kernel (``quantize_blocks``)."""
    m, k = math.prod(x.shape[:-1]), x.shape[-1]
    if group:
        return lambda: quantize_blocks(x, fmt, smooth, group, out=(codes, scales))
    q2, s2 = codes.view(m, k), scales.view(m)
    return lambda: tqr.quantize_rows(x.reshape(m, k), fmt, smooth, out=(q2, s2))


def act_codes(group, args: list, outs: list, codes: dict, bindings: dict, cache) -> tuple[dict, dict, dict]:
    """A pointwise group whose outputs ``codes`` names feed AQGEMMs as codes (``schedule.act_codes``; output x ->
    (format, codes [..., K], scales [...], smooth or None)): "fused", the group's kernel storing those x as codes and
    scales itself (x not stored), and "separate", the kernel storing every output into ``outs``, then ``quantizer``
    on each x. Returns (what, candidates, steps): steps gives per candidate the calls it makes as (kind, run) pairs,
    which the plan lists as calls of their own."""
    def plain():
        launch(group, args, bindings, out=outs, cache=cache)

    def fused():
        launch(group, args, bindings, out=outs, cache=cache, codes=codes)
    quantize = [quantizer(outs[group.outputs.index(x)], fmt, q, s, c) for x, (fmt, q, s, c) in codes.items()]

    def separate():
        plain()
        for f in quantize:
            f()
    steps = {"fused": [("pointwise", fused)], "separate": [("pointwise", plain)] + [("quantize", f) for f in quantize]}
    tensors = [t for t in args if isinstance(t, torch.Tensor)]
    what = {"op": "ACT_CODES", "ops": [n.op for n in group.nodes], "out": [list(t.shape) for t in outs if t is not None],
            "in": [[list(t.shape), list(t.stride()), str(t.dtype)] for t in tensors],
            "codes": [[group.outputs.index(x), fmt, c is not None] for x, (fmt, _, _, c) in codes.items()]}
    return what, {"fused": fused, "separate": separate}, steps


def _aqgemm_library(quantized, wq, ws, epilogue_ops: tuple, attrs: dict, out, device: torch.device, mkn: tuple,
                    out_codes: tuple | None = None) -> dict:
    """torch._int_mm (int8, CUDA or the CPU tests) and torch._scaled_mm (fp8, CUDA, bfloat16 out) on the codes, each + one
    epilogue kernel, where cuBLAS(Lt) takes the shape (int8: M > 16, K and N multiples of 8; fp8: K, N multiples of 16).
    ``out_codes`` (format, codes, scales, smooth or None): the epilogue stores the output as those codes instead
    (``kernels/epilogue_codes.py``), "-codes" after the names."""
    (m, k, nw), (bias, gate, residual) = mkn, epilogue_ops
    act, glu, wt = attrs["act"], attrs["glu"], wq.t()  # wq [N, K] row-major: the column-major [K, N] cuBLAS wants
    if out_codes is not None:
        fmt, cq, cs, smooth = out_codes
        epi = dict(bias=None if bias is None else bias.contiguous(), gate=gate, residual=residual, act=act, glu=glu, smooth=smooth)
    candidates, suffix = {}, "" if out_codes is None else "-codes"
    if attrs["format"] == "int8" and m > 16 and k % 8 == 0 and nw % 8 == 0:
        def int_mm():
            q, s = quantized()
            h = torch._int_mm(q.view(m, k), wt).view(*q.shape[:-1], nw)
            if out_codes is None:
                taq.scaled_epilogue(h, s, ws, bias, gate, residual, act, glu, out=out)
            else:
                tec.epilogue_codes(h, fmt, cq, cs, xs=s, ws=ws, dtype=out.dtype, **epi)
        candidates["int-mm" + suffix] = int_mm
    if attrs["format"] == "fp8" and device.type == "cuda" and out.dtype == torch.bfloat16 and k % 16 == 0 and nw % 16 == 0:
        plain = bias is None and gate is None and residual is None and act == "none" and not glu

        def scaled_mm():
            q, s = quantized()
            mm = dict(scale_a=s.view(m, 1), scale_b=ws.view(1, nw), out_dtype=out.dtype)
            if out_codes is not None:
                tec.epilogue_codes(torch._scaled_mm(q.view(m, k), wt, **mm).view(*q.shape[:-1], nw), fmt, cq, cs, **epi)
            elif plain:
                torch._scaled_mm(q.view(m, k), wt, **mm, out=out.view(m, nw))
            else:
                epilogue(torch._scaled_mm(q.view(m, k), wt, **mm).view(*q.shape[:-1], nw), bias, gate, residual, act, glu, out=out)
        candidates["scaled-mm" + suffix] = scaled_mm
    return candidates


def scaled_mm_blocks(quantized, wq, ws, epilogue_ops: tuple, attrs: dict, out, device: torch.device, mkn: tuple) -> dict:
    """fp8 codes of x with a scale per row and 128 features (act_group 128) through cuBLASLt's block-scaled FP8 GEMM
    (cuBLAS 12.9+, sm_90: ``torch.nn.functional.scaled_mm`` with ``ScalingType.BlockWise1x128`` for both operands, W's
    per-channel scale repeated along K, which is exact), then kiln's epilogue kernel: "scaled-mm-blocks", where torch
    has the recipe (CUDA, bfloat16 out, K a multiple of 128). Both scale operands outer-dim-major, as cuBLASLt reads
    them: x's transposed by a copy each call (M x K / 128 floats), W's once."""
    (m, k, nw), (bias, gate, residual) = mkn, epilogue_ops
    kinds = getattr(F, "ScalingType", None)
    if (attrs["format"] != "fp8" or attrs.get("act_group", 0) != 128 or kinds is None or not hasattr(F, "scaled_mm")
            or device.type != "cuda" or out.dtype != torch.bfloat16 or k % 128 or nw % 16):
        return {}
    sw = ws.view(nw, 1).expand(nw, k // 128).t().contiguous().t()  # [N, K / 128], N-major
    block = kinds.BlockWise1x128

    def run():
        q, s = quantized()
        sa = s.reshape(m, k // 128).t().contiguous().t()  # [M, K / 128], M-major
        h = F.scaled_mm(q.view(m, k), wq.t(), sa, block, sw, block, output_dtype=torch.bfloat16)
        epilogue(h.view(*q.shape[:-1], nw), bias, gate, residual, attrs["act"], attrs["glu"], out=out)
    return {"scaled-mm-blocks": run}


def coded_aqgemm(args: list, attrs: dict, out: torch.Tensor, device: torch.device, codes: tuple | None,
                 out_codes: tuple) -> tuple[dict, dict, dict]:
    """An AQGEMM whose output feeds AQGEMMs as codes (``schedule.act_codes``): ``aqgemm``'s candidates storing the output
    into ``out``, each followed by the row quantizer writing ``out_codes`` (format, codes, scales, smooth or None) from
    it, and the library ones with their epilogue storing those codes itself ("-codes": the output never stored).
    ``codes``: the AQGEMM's own x's, as for ``aqgemm``. Returns (what, candidates, steps), as ``act_codes``."""
    what, plain = aqgemm(args, attrs, out, None, device, codes=codes)
    fmt, cq, cs, smooth = out_codes
    group = cq.shape[-1] // cs.shape[-1] if cs.dim() == cq.dim() else 0  # the codes' scales by groups of columns
    quantize = quantizer(out, fmt, cq, cs, smooth, group)
    steps = {name: [("gemm", run), ("quantize", quantize)] for name, run in plain.items()}
    if quantizes(out.dtype, device) and "reference" not in plain and not aqgemm_rope(args, attrs):  # (codes: unrotated)
        x, wq, ws, x_smooth, bias, gate, residual = aqgemm_operands(args, attrs)
        mkn = (math.prod(x.shape[:-1]), x.shape[-1], wq.shape[0])
        own = _quantized(x, attrs["format"], x_smooth, codes, attrs.get("act_group", 0))
        if group:  # the Triton templates' epilogue storing the codes by groups (the library's codes epilogue: by rows)
            steps.update({name: [("gemm", run)] for name, run in
                          _block_codes(own, wq, ws, (bias, gate, residual), attrs, mkn, device, out_codes, group, codes,
                                                     out.dtype).items()})
        else:
            library = _aqgemm_library(own, wq, ws, (bias, gate, residual), attrs, out, device, mkn, out_codes)
            steps.update({name: [("gemm", run)] for name, run in library.items()})

    def candidate(st):
        def run():
            for _, f in st:
                f()
        return run
    return (dict(what, out_codes=[fmt, smooth is not None] + ([group] if group else []), row_codes=ROW_CODES_CANDIDATES),
            {name: candidate(st) for name, st in steps.items()}, steps)


def _block_codes(quantized, wq, ws, epilogue_ops: tuple, attrs: dict, mkn: tuple, device, out_codes: tuple, group: int,
                 codes: tuple | None, dtype: torch.dtype) -> dict:
    """An AQGEMM's Triton candidates (pointer and TMA templates) storing its output (``dtype`` values) as ``out_codes``
    (format, codes, scales [..., N / group], smooth) by their epilogue ("-codes" in the names): a scale per row and
    ``group`` columns is each tile's own, so no pass over the output follows."""
    (m, _, nw), glu = mkn, attrs["glu"]
    fmt, cq, cs, smooth = out_codes
    x_group = attrs.get("act_group", 0)
    kw = dict(act=attrs["act"], glu=glu, out=(cq, cs), codes=(fmt, group), smooth=smooth, dtype=dtype)
    if x_group:
        kw["xs_group"] = x_group

    def pointer(c):
        q, s = quantized()
        taq.aqgemm(q, s, wq, ws, *epilogue_ops, config=c, **kw)

    def tma(c):
        q, s = quantized()
        tt.tma_gemm(q, wq, s, ws, *epilogue_ops, config=c, **kw)
    candidates = {config_name("triton-aqgemm-codes", c): partial(pointer, c)
                  for c in _aqgemm_configs(m, nw, glu, device, x_group, group)}
    for c in _tma_configs(codes[0] if codes is not None else None, wq, m, glu, nw, device, x_group, group)[:TRITON_TMA_CONFIGS]:
        candidates[config_name("triton-tma-codes", c)] = partial(tma, c)
    return candidates


LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def memory_layout(t: torch.Tensor) -> str:
    """"nhwc" for a 4-d tensor stored channels-last (and not also contiguous: C or H x W of 1), else "nchw"."""
    return "nhwc" if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() else "nchw"


def _other(layout: str) -> str:
    return "nchw" if layout == "nhwc" else "nhwc"


def _cudnn_flags() -> tuple:
    # benchmark=True: cuDNN times its algorithms once per shape (in the tuner's warm-up, before capture)
    return True, False, torch.backends.cudnn.allow_tf32  # benchmark, deterministic, tf32 (as eager's)


def _has_cudnn(device: torch.device) -> bool:
    return device.type == "cuda" and torch.backends.cudnn.is_available()


def conv(args: list, attrs: dict, out: torch.Tensor, device: torch.device) -> tuple[dict, dict]:
    """A CONV2D's or CONV's candidates (a CONV2D is a CONV without residual or divisor). A name's suffix is the layout
    it computes in; without one, the layout that needs no copy: "cudnn" computes in out's (cuDNN converts x first only
    where x is in the other), "torch" in x's (the epilogue converts where out is in the other)."""
    x, w, bias, residual = conv_operands(args, attrs)
    geometry = [attrs[k] for k in ("stride", "padding", "dilation", "groups")]
    divisor = attrs.get("divisor")
    if triton_ok(tce.DTYPES, x.dtype, device, tce.INTERPRET):
        candidates = _conv_candidates(x, w, geometry, (bias, residual, divisor), out, device)
    else:  # no Triton for this dtype / device: the op's reference, copied
        op = "CONV" if "residual" in attrs else "CONV2D"
        candidates = {"torch": lambda: out.copy_(OPS[op].ref(args, attrs))}
    what = {"op": "CONV", "x": list(x.shape), "x_stride": list(x.stride()), "w": list(w.shape), "dtype": str(x.dtype),
            "geometry": [list(g) if isinstance(g, tuple) else g for g in geometry], "bias": bias is not None,
            "residual": None if residual is None else [list(residual.shape), list(residual.stride())], "divisor": divisor,
            "out_stride": list(out.stride())}
    return what, candidates


def _conv_candidates(x, w, geometry: list, epilogue_ops: tuple, out, device: torch.device) -> dict:
    """``conv``'s candidates where kiln's epilogue runs: cuDNN (CUDA) in out's layout and in the other; torch's conv2d in
    x's layout. Each holds the weight in the layout it computes in (made once per plan; a closure not chosen lets its
    copy go)."""
    stride, padding, dilation, groups = geometry
    bias, residual, divisor = epilogue_ops
    x_layout, out_layout = memory_layout(x), memory_layout(out)
    flags, other = _cudnn_flags(), _other(out_layout)

    def epi(h):  # + bias, residual, / divisor, from h's layout into out's
        tce.conv_epilogue(h, bias, residual, divisor, out=out)

    def cudnn(w_out):  # cuDNN follows out's layout (x is made so first where it is in the other)
        torch.ops.aten.cudnn_convolution.out(x, w_out, padding, stride, dilation, groups, *flags, out=out)
        if bias is not None or residual is not None or divisor not in (None, 1.0):
            epi(out)

    def cudnn_other(w_other, fmt):  # in the other layout (cuDNN's channels-last kernels for an NCHW out): back in the epilogue
        epi(torch.ops.aten.cudnn_convolution(x.contiguous(memory_format=fmt), w_other, padding, stride, dilation, groups, *flags))

    def conv2d(w_x):
        epi(F.conv2d(x, w_x, None, stride, padding, dilation, groups))

    def weight(layout):
        return w.contiguous(memory_format=LAYOUTS[layout])
    candidates = {}
    if _has_cudnn(device):
        candidates["cudnn"] = partial(cudnn, weight(out_layout))
        candidates[f"cudnn-{other}"] = partial(cudnn_other, weight(other), LAYOUTS[other])
    candidates["torch"] = partial(conv2d, weight(x_layout))
    return candidates


def conv_layout_changes(choice: str, x: torch.Tensor, out: torch.Tensor) -> int:
    """Layout conversions a conv candidate (``conv``'s name ``choice``) makes per call: x into the layout it computes in
    (a copy), and the result into out's (a copy, or in the epilogue's pass). 0: NCHW or NHWC end to end."""
    name = choice.split(":")[0]
    compute = name[-4:] if name.endswith(tuple(LAYOUTS)) else memory_layout(out) if name == "cudnn" else memory_layout(x)
    return int(memory_layout(x) != compute) + int(compute != memory_layout(out))


def conv_layouts(x_shape: tuple, w: torch.Tensor, attrs: dict, device: torch.device) -> tuple[dict, dict] | None:
    """What the kernels plan measures to choose the layouts it stores a conv's x and result in: candidates "nchw" and
    "nhwc" run the convolution alone (cuDNN into its output; without cuDNN torch's conv2d) with x, the weight and the
    result all in that layout, on temporaries made at their first run (none when the choice is cached or forced). None
    where the conv's candidates do not depend on layouts (no kernels for its dtype / device: it runs the reference)."""
    if len(x_shape) != 4 or not triton_ok(tce.DTYPES, w.dtype, device, tce.INTERPRET):
        return None
    geometry = [attrs[k] for k in ("stride", "padding", "dilation", "groups")]
    stride, padding, dilation, groups = geometry
    cudnn = _has_cudnn(device)
    out_shape = F.conv2d(torch.empty(x_shape, dtype=w.dtype, device="meta"), w.to("meta"), None, stride, padding, dilation, groups).shape

    def run(layout: str):
        t = {}

        def once():
            if not t:
                fmt = LAYOUTS[layout]
                t.update(x=torch.randn(x_shape, dtype=w.dtype, device=device).contiguous(memory_format=fmt),
                         w=w.contiguous(memory_format=fmt), out=torch.empty(out_shape, dtype=w.dtype, device=device, memory_format=fmt))
            if cudnn:
                torch.ops.aten.cudnn_convolution.out(t["x"], t["w"], padding, stride, dilation, groups, *_cudnn_flags(), out=t["out"])
            else:
                F.conv2d(t["x"], t["w"], None, stride, padding, dilation, groups)
        return once
    what = {"op": "CONV_LAYOUT", "x": list(x_shape), "w": list(w.shape), "dtype": str(w.dtype),
            "geometry": [list(g) if isinstance(g, tuple) else g for g in geometry]}
    return what, {"nchw": run("nchw"), "nhwc": run("nhwc")}


def group_norm_scratch(shape: tuple, groups: int) -> tuple:
    """The float32 scratch of kiln's group norm kernel for an input of ``shape`` (planned by the kernels plan)."""
    return tgn.scratch_shape(shape, groups)


def group_norm(args: list, attrs: dict, out: torch.Tensor, scratch: torch.Tensor | None,
               device: torch.device) -> tuple[dict, dict]:
    """A GROUP_NORM's candidates. ``scratch``: the ``group_norm_scratch`` buffer."""
    x = args[0]
    w = args[1] if len(args) > 1 else None
    b = args[2] if len(args) > 2 else None
    groups, eps, act = attrs["groups"], attrs["eps"], attrs["act"]
    candidates = {"torch": lambda: out.copy_(OPS["GROUP_NORM"].ref(args, attrs))}
    if scratch is not None and triton_ok(tgn.DTYPES, x.dtype, device, tgn.INTERPRET):
        candidates["kiln"] = lambda: tgn.group_norm(x, w, b, groups, eps, act, out=out, scratch=scratch, form="group")
        if tgn.kernel_form(x) == "nhwc":  # channels-last x: also the position-tile pair that reads it in whole rows
            candidates["kiln-nhwc"] = lambda: tgn.group_norm(x, w, b, groups, eps, act, out=out, scratch=scratch, form="nhwc")
    what = {"op": "GROUP_NORM", "x": list(x.shape), "x_stride": list(x.stride()), "dtype": str(x.dtype), "groups": groups,
            "eps": eps, "act": act, "params": len(args) - 1, "out_stride": list(out.stride()),
            "kernels": sorted(candidates)}  # (a decision cached before "kiln-nhwc" existed is measured again)
    return what, candidates
