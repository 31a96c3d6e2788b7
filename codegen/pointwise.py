"""ONE renderer for pointwise / row-reduction groups: IR nodes -> one Triton kernel's source.

A group (see ``codegen/schedule.py``) is a set of elementwise ops and last-axis row reductions that all
run over one *domain*: the shape of the group's outputs, ``[*lead, N]``. The kernel walks it as a
``[M, N]`` matrix of rows (``M = prod(lead)``) in ``[BLOCK_M, BLOCK_N]`` tiles; a group with a row
reduction holds whole rows (``BLOCK_N = next_pow2(N)``, N <= ``MAX_ROW``). Every tensor operand is
read through explicit per-dim strides of the operand expanded to the domain (stride 0 on broadcast
dims, so a [B, 1, C] gate or a [C] weight costs nothing, and a PERMUTE / SLICE / EXPAND view of a
buffer is read in place). Values are computed in float32 (float64 for float64 nodes) and stored in
each output's dtype; an explicit CAST to a half type rounds, so the numbers follow the graph's casts.

``EXPR`` is the one op -> Triton expression table; ``ROW_OPS`` renders the row reductions. Anything
not in them (or declined by ``fusible``) is not scheduled into a pointwise group.

Codes (the activation quantizer of the AQGEMMs an output x feeds, fused: see ``schedule.py``'s ``Group.codes``). With
whole rows in a tile the kernel can store x as the quantizer would, in place of x itself:

    s[m] = max(amax_k |x[m, k] * c[k]| / qmax, tiny)          float32 [M]      (c: the optional smooth vector)
    q[m, k] = round(x[m, k] * c[k] / s[m])                    int8 / e4m3 [M, K]   (|.| <= qmax)

with x first rounded to its own dtype (the value the float store would have written) and the scale and codes of
``kernels/quantize_rows.py`` (``row_scale``, ``row_codes``): the same numbers as the row quantizer reading x.
"""
from __future__ import annotations

import math
import weakref

import sympy
import torch
import triton

from ..ir.interpret import eval_nodes
from ..ir.types import eval_dim, torch_dtype
from .cache import Cache, key
from .kernels import pdl
from .kernels import quantize_rows as tqr

MAX_ROW = 16384  # longest row a reduction group holds in one tile
# a launch's tile: about TILE_ELEMENTS elements (whole rows at least: BLOCK_M = TILE_ELEMENTS // BLOCK_N rows of a
# row-reduction group) run by WARPS[0] warps, or WARPS[1] where the tile is wider than 4096. bench/rows.py sweeps them
# over a DiT-XL/2 step's 60 pointwise calls (H200, session 10: 2048 -> 244 us, 4096 -> 268, 8192 -> 287; 1152-wide
# rows, one a program)
TILE_ELEMENTS = 2048
WARPS = (4, 8)

# compute type of a value of IR dtype d (half types widen; they are rounded only by CAST and at the store)
_CT = {"float16": "tl.float32", "bfloat16": "tl.float32", "float32": "tl.float32", "float64": "tl.float64",
       "bool": "tl.int1", "int8": "tl.int8", "uint8": "tl.uint8", "int16": "tl.int16", "int32": "tl.int32",
       "int64": "tl.int64"}
_TL = {**_CT, "float16": "tl.float16", "bfloat16": "tl.bfloat16"}

# op -> expression over the operands {0}, {1}, ... (already in the node's compute type, except where
# RAW_OPERANDS says otherwise) and the node's attributes by name
EXPR: dict[str, str] = {
    "ADD": "{0} + {1}", "SUB": "{0} - {1}", "MUL": "{0} * {1}", "DIV": "{0} / {1}", "NEG": "-{0}",
    "ABS": "tl.abs({0})", "EXP": "tl.exp({0})", "LOG": "tl.log({0})", "SQRT": "tl.sqrt({0})",
    "RSQRT": "tl.rsqrt({0})", "RECIPROCAL": "1.0 / {0}", "SIN": "tl.sin({0})", "COS": "tl.cos({0})",
    # tl has no portable tanh (libdevice is CUDA-only). sign(x) (1 - t) / (1 + t), t = exp(-2|x|), cancels near 0
    # (as 2 sigmoid(2x) - 1 did: 3e-6 relative at Gemma 2's soft caps), so |x| < 1/8 takes tanh's series to x**15
    # (the next term is 6e-4 x**17: 2e-18 of tanh(x) there); {0} is a name (see _compute)
    "TANH": "tl.where(tl.abs({0}) < 0.125, {0} + {0} * ({0} * {0}) * (-0.3333333333333333 + ({0} * {0}) * "
            "(0.13333333333333333 + ({0} * {0}) * (-0.05396825396825397 + ({0} * {0}) * (0.021869488536155203 + "
            "({0} * {0}) * (-0.008863235529902197 + ({0} * {0}) * (0.003592128036572481 + ({0} * {0}) * "
            "-0.0014558343870513183)))))), "
            "tl.where({0} < 0, -1.0, 1.0) * (1.0 - tl.exp(-2.0 * tl.abs({0}))) / (1.0 + tl.exp(-2.0 * tl.abs({0}))))",
    "SIGMOID": "tl.sigmoid({0})", "ERF": "tl.math.erf({0})",
    "RELU": "tl.maximum({0}, 0)", "SILU": "{0} * tl.sigmoid({0})",
    "GELU:none": "0.5 * {0} * (1.0 + tl.math.erf({0} * 0.7071067811865476))",
    # 0.5 (1 + tanh(u)) == sigmoid(2u): no tanh, no cancellation near 0
    "GELU:tanh": "{0} * tl.sigmoid(1.5957691216057308 * ({0} + 0.044715 * {0} * {0} * {0}))",
    "FLOOR": "tl.floor({0})", "CEIL": "tl.ceil({0})", "NOT": "{0} == 0", "ISNAN": "{0} != {0}",
    "CLAMP": "tl.minimum(tl.maximum({0}, {min}), {max})", "CLAMP:min": "tl.maximum({0}, {min})",
    "CLAMP:max": "tl.minimum({0}, {max})",
    "MAXIMUM": "tl.maximum({0}, {1})", "MINIMUM": "tl.minimum({0}, {1})",
    # torch.remainder takes the divisor's sign, C's % the dividend's
    "MOD": "tl.where(({0} % {1} != 0) & (({0} % {1} < 0) != ({1} < 0)), {0} % {1} + {1}, {0} % {1})",
    "EQ": "{0} == {1}", "NE": "{0} != {1}", "LT": "{0} < {1}", "LE": "{0} <= {1}", "GT": "{0} > {1}",
    "GE": "{0} >= {1}", "AND": "{0} & {1}", "OR": "{0} | {1}", "XOR": "{0} ^ {1}",
    "WHERE": "tl.where({0}, {1}, {2})",
    "POW:2": "{0} * {0}", "POW:3": "{0} * {0} * {0}", "POW:1": "{0}", "POW:0.5": "tl.sqrt({0})",
    "POW:-0.5": "tl.rsqrt({0})", "POW:-1": "1.0 / {0}", "POW:-2": "1.0 / ({0} * {0})",
    "POW:base": "tl.exp({log_base} * {1})",  # c ** x for a constant c > 0 (RoPE's theta ** (-2i / d))
    "CAST:half": "{0}.to({tl_dtype}).to(tl.float32)", "CAST": "{0}.to({ct})", "CAST:bool": "{0} != 0",
    # x * cos + rotate_half(x) * sin; {p} is x at the partner column (j + N/2 or j - N/2)
    "ROPE": "{0} * {1} + tl.where(cols < N // 2, -{p}, {p}) * {2}",
}
# operands that keep their own type (comparisons promote between themselves; WHERE's condition is bool)
_PROMOTE_OPERANDS = {"EQ", "NE", "LT", "LE", "GT", "GE"}
_RAW_OPERANDS = {"CAST", "NOT", "ISNAN", "AND", "OR", "XOR"}
ROW_OPS = ("RMSNORM", "LAYERNORM", "LAYERNORM_MODULATE", "SOFTMAX", "LOG_SOFTMAX")


def _const_value(node):
    return node.attrs["value"] if node.op == "CONST" and not isinstance(node.attrs["value"], sympy.Expr) else None


def expr_key(node) -> str | None:
    """The ``EXPR`` / ``ROW_OPS`` entry that renders ``node``; None when the renderer cannot."""
    op, a = node.op, node.attrs
    if node.dtype not in _CT or any(i.dtype not in _CT for i in node.inputs):
        return None
    if op in ROW_OPS:
        if op in ("SOFTMAX", "LOG_SOFTMAX"):
            ok = a["axis"] == len(node.shape) - 1 and node.dtype in ("float16", "bfloat16", "float32", "float64")
        else:
            ok = a["dims"] == 1
        return op if ok else None
    if op == "GELU":
        return f"GELU:{a['approximate']}"
    if op == "DIV":
        return "DIV" if a["rounding"] is None else None
    if op == "CLAMP":
        return {(True, True): "CLAMP", (True, False): "CLAMP:min", (False, True): "CLAMP:max"}.get(
            (a["min"] is not None, a["max"] is not None))
    if op == "CAST":
        return {"float16": "CAST:half", "bfloat16": "CAST:half", "bool": "CAST:bool"}.get(a["dtype"], "CAST")
    if op == "POW":
        e, b = _const_value(node.inputs[1]), _const_value(node.inputs[0])
        if e is not None and not isinstance(e, bool) and f"POW:{float(e):g}" in EXPR:
            return f"POW:{float(e):g}"
        return "POW:base" if isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0 else None
    if op == "ROPE":
        return "ROPE" if node.inputs[0].shape and node.inputs[0].shape[-1] % 2 == 0 else None
    return op if op in EXPR else None


def fusible(node) -> bool:
    """Whether the renderer can compute ``node`` inside a pointwise group."""
    return expr_key(node) is not None


# ----------------------------------------------------------------------------- rendering


def _literal(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float) and not math.isfinite(v):
        return "float('nan')" if v != v else f"float('{'inf' if v > 0 else '-inf'}')"
    return repr(v)


def _row_op(op, v, args, a, ct) -> list[str]:
    """Lines computing row reduction ``op`` over the tile's rows into ``v`` (whole rows, masked lanes 0)."""
    x, eps = args[0], _literal(float(a.get("eps", 0.0)))
    if a.get("residual"):
        x, args = f"({x} + {args[-1]})", args[:-1]
    keep = "cmask[None, :]"
    if op == "RMSNORM":
        lines = [f"{v} = tl.where({keep}, {x}, 0.0)",
                 f"{v} = {v} * tl.rsqrt(tl.sum({v} * {v}, axis=1)[:, None] / N + {eps})"]
        return lines + ([f"{v} = {v} * {args[1]}"] if len(args) > 1 else [])
    if op in ("LAYERNORM", "LAYERNORM_MODULATE"):
        lines = [f"{v} = tl.where({keep}, {x}, 0.0)",
                 f"{v} = tl.where({keep}, {v} - tl.sum({v}, axis=1)[:, None] / N, 0.0)",
                 f"{v} = {v} * tl.rsqrt(tl.sum({v} * {v}, axis=1)[:, None] / N + {eps})"]
        params = args[1:] if op == "LAYERNORM" else args[3:]
        if params:
            lines.append(f"{v} = {v} * {params[0]}")
        if len(params) > 1:
            lines.append(f"{v} = {v} + {params[1]}")
        if op == "LAYERNORM_MODULATE":
            lines.append(f"{v} = {v} * (1.0 + {args[1]}) + {args[2]}")
        return lines
    # SOFTMAX / LOG_SOFTMAX: max-shifted, masked lanes are -inf before the max and 0 after the exp
    lines = [f"{v} = tl.where({keep}, {x}, float('-inf'))",
             f"{v} = {v} - tl.max({v}, axis=1)[:, None]",
             f"{v}_e = tl.where({keep}, tl.exp({v}), 0.0)"]
    if op == "SOFTMAX":
        return lines + [f"{v} = {v}_e / tl.sum({v}_e, axis=1)[:, None]"]
    return lines + [f"{v} = {v} - tl.log(tl.sum({v}_e, axis=1)[:, None])"]


def render(group, rank: int, codes: tuple = ()) -> str:
    """Triton source of the kernel computing ``group`` over a domain of ``rank`` dims (>= 2, padded).

    Signature: one pointer per tensor input, then per output; ``M, N``; the lead sizes ``size_0 ..
    size_{rank-2}``; per tensor input and output its ``rank`` domain strides; ``BLOCK_M, BLOCK_N``.
    ``codes``: (output index, format, smooth) of each output stored as codes (module docstring, whole rows in a
    tile): its pointer and strides are the codes' [*lead, N], and after the outputs' pointers come its scales'
    (float32, contiguous [M]) and, with ``smooth``, the smooth vector's (float32 [N])."""
    tensors = [i for i in group.inputs if _const_value(i) is None]
    name = {n: f"in{k}" for k, n in enumerate(tensors)}
    name.update({n: f"out{k}" for k, n in enumerate(group.outputs)})
    coded = {group.outputs[k]: (fmt, smooth) for k, fmt, smooth in codes}
    lead = [f"size_{d}" for d in range(rank - 1)]
    strides = [f"s_{name[t]}_{d}" for t in tensors + list(group.outputs) for d in range(rank)]
    extra = [f"{p}_{name[n]}_ptr" for n, (_, smooth) in coded.items() for p in ("sc", "c")[:1 + smooth]]
    params = [f"{name[t]}_ptr" for t in tensors + list(group.outputs)] + extra + ["M", "N"] + lead + strides
    body = [
        "gdc(PDL)",  # (launched with programmatic dependent launch at few rows: kernels/pdl.py, ``pointwise_rows``)
        "pid_m = tl.program_id(0)",
        "rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)",
        "cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)",
        "cmask = cols < N",
        "mask = (rows < M)[:, None] & cmask[None, :]",
        "rem = rows",
    ]
    for d in reversed(range(1, rank - 1)):
        body += [f"i{d} = rem % size_{d}", f"rem = rem // size_{d}"]
    body.append("i0 = rem")

    def offsets(t, col="cols"):
        row = " + ".join(f"i{d} * s_{name[t]}_{d}" for d in range(rank - 1))
        return f"({row})[:, None] + {col}[None, :] * s_{name[t]}_{rank - 1}"

    val: dict = {}
    for k, t in enumerate(group.inputs):
        c = _const_value(t)
        if c is not None:
            val[t] = _literal(c)
            continue
        val[t] = f"x{k}"
        body.append(f"x{k} = tl.load({name[t]}_ptr + {offsets(t)}, mask=mask, other=0).to({_CT[t.dtype]})")
    for k, n in enumerate(group.nodes):
        body += _compute(n, f"v{k}", val, name, offsets)
    for n in group.outputs:
        if n in coded:
            body += _store_codes(name[n], val[n], n.dtype, *coded[n], offsets(n))
        else:
            body.append(f"tl.store({name[n]}_ptr + {offsets(n)}, {val[n]}.to({name[n]}_ptr.dtype.element_ty), mask=mask)")
    sig = ",\n    ".join(params + ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr", "PDL: tl.constexpr = False"])
    ops = " -> ".join(n.op for n in group.nodes) + "".join(f"; {name[n]} as {fmt} codes" for n, (fmt, _) in coded.items())
    imports = f"from {pdl.__name__} import gdc\n" + (f"from {tqr.__name__} import row_codes, row_scale\n" if coded else "")
    return ("# generated by kiln.codegen.pointwise: " + ops + "\n"
            f"import triton\nimport triton.language as tl\n{imports}\n\n@triton.jit\n"
            f"def kernel(\n    {sig},\n):\n" + "".join(f"    {line}\n" for line in body))


def _compute(n, v: str, val: dict, name: dict, offsets) -> list[str]:
    """Lines computing node ``n`` into ``v`` (its compute type) from the values ``val`` (which gains ``n``)."""
    ct, key = _CT[n.dtype], expr_key(n)
    val[n] = v
    if key in ROW_OPS:
        args = [_as(val[i], ct, i) for i in n.inputs]
        return _row_op(key, v, args, n.attrs, ct) + [f"{v} = {v}.to({ct})"]
    lines, args = [], _operands(n, val)
    fields = dict(n.attrs, ct=ct, tl_dtype=_TL.get(n.attrs.get("dtype"), ct))
    if key == "POW:base":
        fields["log_base"] = _literal(math.log(_const_value(n.inputs[0])))
    if key == "TANH":  # its expression names x many times: once as a value
        lines.append(f"{v}_x = {args[0]}")
        args = [f"{v}_x"]
    if key == "ROPE":  # x is a group input (schedule ensures it): load it again at the partner column
        x = n.inputs[0]
        partner = "tl.where(cols < N // 2, cols + N // 2, cols - N // 2)"
        lines.append(f"{v}_p = tl.load({name[x]}_ptr + {offsets(x, partner)}, mask=mask, other=0).to({ct})")
        fields["p"] = f"{v}_p"
    return lines + [f"{v} = ({EXPR[key].format(*args, **fields)}).to({ct})"]


def _store_codes(o: str, v: str, dtype: str, fmt: str, smooth: bool, at: str) -> list[str]:
    """Lines storing ``v`` (an output of IR dtype ``dtype``, in its compute type) as ``fmt`` codes at ``{o}_ptr + at``
    and its rows' scales at ``sc_{o}_ptr + rows`` (module docstring; masked lanes hold anything: not in the maxima)."""
    qmax = tqr.FORMATS[fmt][1]
    x = f"{v}.to({_TL[dtype]}).to(tl.float32)" if dtype in ("float16", "bfloat16") else v  # the value x's store rounds to
    if smooth:
        x = f"{x} * tl.load(c_{o}_ptr + cols, mask=cmask, other=0.0)[None, :]"
    return [f"{v}_a = {x}",
            f"{v}_s = row_scale(tl.max(tl.where(mask, tl.abs({v}_a), 0.0), axis=1), {qmax})",
            f"tl.store(sc_{o}_ptr + rows, {v}_s, mask=rows < M)",
            f"tl.store({o}_ptr + {at}, row_codes({v}_a, {v}_s, {qmax}, {fmt == 'fp8'}, {tqr.INTERPRET}), mask=mask)"]


def _operands(n, val) -> list[str]:
    ct = _CT[n.dtype]
    if n.op in _RAW_OPERANDS:
        return [val[i] for i in n.inputs]
    if n.op in _PROMOTE_OPERANDS:  # compare in the wider of the operands' compute types
        float_in = [i.dtype for i in n.inputs if i.dtype.startswith(("float", "bfloat"))]
        ct = ("tl.float64" if "float64" in float_in else "tl.float32") if float_in else "tl.int64"
    if n.op == "WHERE":
        return [val[n.inputs[0]]] + [_as(val[i], ct, i) for i in n.inputs[1:]]
    return [_as(val[i], ct, i) for i in n.inputs]


def _as(v: str, ct: str, node) -> str:
    return v if _const_value(node) is not None or _CT[node.dtype] == ct else f"{v}.to({ct})"


# ----------------------------------------------------------------------------- loading and launching


_LOADED: dict[tuple[str, str], object] = {}  # (cache root, source) -> module: Triton keeps compiled kernels per function


def load(source: str, cache: Cache):
    """The module for ``source``, content-addressed in ``cache`` (ONE place to change how)."""
    k = (str(cache.root), source)
    mod = _LOADED.get(k)
    if mod is None:
        entry = key("pointwise", source)
        cache.get_or_create("pointwise", entry, lambda: source)
        mod = _LOADED[k] = cache.load_module("pointwise", entry)
    return mod


def row_length_ok(group, bindings, whole: bool = False) -> bool:
    """The group's rows fit one tile where it must hold them whole (a row reduction, or ``whole``: codes)."""
    n = eval_dim(group.outputs[0].shape[-1], bindings) if group.outputs[0].shape else 1
    return n <= MAX_ROW or not (whole or any(expr_key(m) in ROW_OPS for m in group.nodes))


def launch(group, tensors: list, bindings: dict, out: list | None = None, cache: Cache | None = None,
           codes: dict | None = None) -> list[torch.Tensor]:
    """Run ``group``: ``tensors`` align with ``group.inputs`` (CONST inputs may be None); returns (or
    fills ``out``) the tensors of ``group.outputs``, contiguous, in their IR dtypes. The kernel's source lives
    in ``cache`` (the target's; default: the default cache directory). ``codes``: output -> (format, codes, scales,
    smooth or None) for outputs stored as the AQGEMM quantizer's codes [*lead, N] and contiguous float32 scales
    [*lead] instead (module docstring; their entries of ``out`` are not written, None when allocated here)."""
    codes = codes or {}
    shape = [eval_dim(d, bindings) for d in group.outputs[0].shape]
    given = [t for t in tensors if isinstance(t, torch.Tensor)]
    device = given[0].device if given else torch.device("cpu")
    if out is None:
        out = [None if n in codes else torch.empty(shape, dtype=torch_dtype(n.dtype), device=device) for n in group.outputs]
    if not row_length_ok(group, bindings, bool(codes)):  # a row longer than one tile: the reference ops
        if codes:
            raise ValueError(f"pointwise launch: codes need whole rows in a tile, rows of {shape[-1]} > {MAX_ROW}")
        return _reference(group, tensors, bindings, out)
    dom = [1] * max(0, 2 - len(shape)) + shape  # rank >= 2: [*lead, N]
    rank = len(dom)
    spec = tuple((k, codes[n][0], codes[n][3] is not None) for k, n in enumerate(group.outputs) if n in codes)
    kern = load(_render_cached(group, rank, spec), cache if cache is not None else Cache()).kernel
    stored = [codes[n][1] if n in codes else t for n, t in zip(group.outputs, out)]
    ptrs, strides = [], []
    for node, t in list(zip(group.inputs, tensors)) + list(zip(group.outputs, stored)):
        if _const_value(node) is not None:
            continue
        e = t.expand(shape) if shape else t.reshape(())  # broadcast dims get stride 0
        ptrs.append(e)
        strides += [0] * (rank - len(shape)) + [s if n > 1 else 0 for s, n in zip(e.stride(), shape)]
    ptrs += [_contiguous(t, n) for n in group.outputs if n in codes for t in codes[n][2:] if t is not None]
    m, n = math.prod(dom[:-1]), dom[-1]
    whole = codes or any(expr_key(x) in ROW_OPS for x in group.nodes)  # whole rows in a tile
    block_n = triton.next_power_of_2(n) if whole else min(triton.next_power_of_2(n), 1024)
    block_m = max(1, min(triton.next_power_of_2(m), TILE_ELEMENTS // block_n))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    if m * n:
        kern[grid](*ptrs, m, n, *dom[:-1], *strides, BLOCK_M=block_m, BLOCK_N=block_n,
                   num_warps=WARPS[0] if block_m * block_n <= 4096 else WARPS[1],
                   **(pdl.kwargs(ptrs[0]) if m <= pdl.pointwise_rows() else {}))
    return out


def _contiguous(t: torch.Tensor, node) -> torch.Tensor:
    if t.dtype != torch.float32 or not t.is_contiguous():
        raise ValueError(f"pointwise launch: the scales / smooth vector of {node!r}'s codes must be contiguous float32, "
                         f"got {t.dtype} {tuple(t.stride())}")
    return t


_RENDERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # group -> {(rank, codes): source}


def _render_cached(group, rank: int, codes: tuple = ()) -> str:
    per_rank = _RENDERED.setdefault(group, {})
    if (rank, codes) not in per_rank:
        per_rank[rank, codes] = render(group, rank, codes)
    return per_rank[rank, codes]


def _reference(group, tensors, bindings, out):
    env = {node: t for node, t in zip(group.inputs, tensors) if node.op != "CONST"}
    eval_nodes([i for i in group.inputs if i.op == "CONST"] + list(group.nodes), env, bindings, device=out[0].device)
    for o, node in zip(out, group.outputs):
        o.copy_(env[node])
    return out
