"""ONNX's transformer ops (opset 23+) -> kiln's ATTENTION and ROPE (see :mod:`.importer`).

``Attention(Q, K, V[, attn_mask, past_key, past_value, nonpad_kv_seqlen])`` is kiln's ATTENTION: 3-d inputs
``[B, S, H*D]`` are viewed as ``[B, H, S, D]`` and back, past keys / values are concatenated in front of the new
ones (the ``present_key`` / ``present_value`` outputs), and a causal frontier that is not top-left aligned, a
sliding window or per-batch key lengths become a bool mask from key-minus-query positions. What ATTENTION cannot
compute (logit soft-capping, the scores as an output, a softmax precision below float32) is refused by name.

``RotaryEmbedding(X, cos_cache, sin_cache[, position_ids])`` is kiln's rotate-half ROPE on the rotated part of
each head, with ``cos = cat(cos_cache[position_ids], same)`` broadcast over the heads; the interleaved form is
de-interleaved by a view ``[.., r/2, 2] -> [.., 2, r/2]`` around it.
"""
from __future__ import annotations

from ..graph import Node
from ..lowering import Unsupported
from ..registry import registrar
from ..types import dim
from .lower import cast
from .static import kiln_dtype

HANDLERS: dict[str, object] = {}
handles = registrar(HANDLERS)


def _heads(cx, x: Node, n: int, what: str) -> Node:
    """[B, S, n*D] -> [B, n, S, D]"""
    b, s, hidden = x.shape
    if not isinstance(hidden, int) or hidden % n:
        raise Unsupported(f"{what} hidden size {hidden} is not a multiple of its {n} heads")
    x = cx.add("RESHAPE", [x], shape=(b, s, n, hidden // n))
    return cx.add("PERMUTE", [x], perm=(0, 2, 1, 3))


def _merge_heads(cx, y: Node) -> Node:
    """[B, H, S, D] -> [B, S, H*D]"""
    b, h, s, d = y.shape
    y = cx.add("PERMUTE", [y], perm=(0, 2, 1, 3))
    return cx.add("RESHAPE", [y], shape=(b, s, dim(h * d) if not isinstance(h * d, int) else h * d))


def _refuse_unsupported(node, attrs, dtype: str) -> None:
    """What kiln's ATTENTION does not compute, named by its attribute or output."""
    if attrs.get("softcap", 0.0) < 0:
        raise Unsupported(f"softcap={attrs['softcap']} (a soft cap is a positive number; 0: none)")
    if len(node.output) > 3 and node.output[3]:
        raise Unsupported(f"the qk_matmul_output output (qk_matmul_output_mode={attrs.get('qk_matmul_output_mode', 0)}; "
                          "kiln's ATTENTION does not expose its scores)")
    precision = attrs.get("softmax_precision")
    if precision is not None and kiln_dtype(precision) not in ("float32", dtype):
        raise Unsupported(f"softmax_precision={kiln_dtype(precision)} (kiln's ATTENTION takes the softmax in float32 "
                          f"or {dtype})")


def _offset(cx, q: Node, past, nonpad):
    """How many keys precede the query block: past_len, or per batch ``nonpad_kv_seqlen - S_q`` as [B, 1, 1, 1]."""
    if past is not None:
        return past.shape[2]
    if nonpad is None:
        return 0
    n = cx.add("RESHAPE", [cast(cx, nonpad, "int64")], shape=(nonpad.shape[0], 1, 1, 1))
    return cx.add("SUB", [n, cx.const(q.shape[2])])


def _allowed(cx, sq, skv, offset, causal: bool, left: int, right: int, nonpad) -> Node | None:
    """The keys each query may attend as a bool [S_q, S_kv] (or [B, 1, S_q, S_kv]) tensor, or None for all:
    with ``rel = j - i`` (key minus query index), causal is ``rel <= offset``, the windows are
    ``offset - left <= rel <= offset + right``, and ``j < nonpad_kv_seqlen[b]``."""
    if not causal and left < 0 and right < 0 and nonpad is None:
        return None
    keys = cx.add("RESHAPE", [cx.add("ARANGE", [], start=0, end=skv, step=1, dtype="int64")], shape=(1, skv))
    queries = cx.add("RESHAPE", [cx.add("ARANGE", [], start=0, end=sq, step=1, dtype="int64")], shape=(sq, 1))
    rel = cx.add("SUB", [keys, queries])  # [S_q, S_kv]
    off = offset if isinstance(offset, Node) else cx.const(offset)
    terms = []
    if causal:
        terms.append(cx.add("LE", [rel, off]))
    if right >= 0:
        terms.append(cx.add("LE", [rel, cx.add("ADD", [off, cx.const(right)])]))
    if left >= 0:
        terms.append(cx.add("GE", [rel, cx.add("SUB", [off, cx.const(left)])]))
    if nonpad is not None:
        n = cx.add("RESHAPE", [cast(cx, nonpad, "int64")], shape=(nonpad.shape[0], 1, 1, 1))
        terms.append(cx.add("LT", [cx.add("RESHAPE", [keys], shape=(1, 1, 1, skv)), n]))
    out = terms[0]
    for t in terms[1:]:
        out = cx.add("AND", [out, t])
    return out


def _with_mask(cx, mask, allowed: Node | None, q: Node, skv) -> Node | None:
    """``attn_mask`` (bool: attend where True; float: a bias) padded to S_kv keys and limited to ``allowed``."""
    if mask is not None:
        mask = cx.node(mask)
        if mask.dtype != "bool":
            mask = cast(cx, mask, q.dtype)
        short = skv - mask.shape[-1]
        if not isinstance(short, int):
            raise Unsupported(f"an attn_mask of {mask.shape[-1]} keys for {skv} keys")
        if short > 0:  # the missing keys are masked out
            mask = cx.add("PAD", [mask], pads=((0, short),), value=0.0 if mask.dtype == "bool" else float("-inf"))
    if allowed is None or mask is None:
        return mask if allowed is None else allowed
    if mask.dtype == "bool":
        return cx.add("AND", [mask, allowed])
    return cx.add("WHERE", [allowed, mask, cx.const(float("-inf"))])


@handles("Attention")
def _attention(cx, node, ins, attrs):
    """softmax(q k^T * scale + mask) v with past keys / values in front; see the module docstring."""
    q, k, v, mask, past_k, past_v, nonpad = (list(ins) + [None] * 7)[:7]
    q, k, v = cx.node(q), cx.node(k), cx.node(v)
    _refuse_unsupported(node, attrs, q.dtype)
    three_d = len(q.shape) == 3
    if three_d:
        hq, hkv = attrs.get("q_num_heads"), attrs.get("kv_num_heads")
        if not hq or not hkv:
            raise Unsupported("3-d inputs without q_num_heads / kv_num_heads")
        q, k, v = _heads(cx, q, hq, "Q"), _heads(cx, k, hkv, "K"), _heads(cx, v, hkv, "V")
    elif len(q.shape) != 4:
        raise Unsupported(f"rank-{len(q.shape)} inputs (ONNX Attention takes 3-d or 4-d)")
    if (past_k is None) != (past_v is None):
        raise Unsupported("past_key without past_value or the reverse")
    if past_k is not None:
        past_k, past_v = cx.node(past_k), cx.node(past_v)
        k, v = cx.add("CONCAT", [past_k, k], axis=2), cx.add("CONCAT", [past_v, v], axis=2)
    hq, hkv = q.shape[1], k.shape[1]
    gqa = not (isinstance(hq, int) and isinstance(hkv, int) and hq == hkv)
    if gqa and not (isinstance(hq, int) and isinstance(hkv, int) and hq % hkv == 0):
        raise Unsupported(f"{hq} query heads over {hkv} key / value heads")
    causal, left, right = bool(attrs.get("is_causal", 0)), attrs.get("left_window_size", -1), attrs.get("right_window_size", -1)
    offset = _offset(cx, q, past_k, nonpad)
    top_left = isinstance(offset, int) and offset == 0 and left < 0 and right < 0 and nonpad is None
    allowed = None if top_left else _allowed(cx, q.shape[2], k.shape[2], offset, causal, left, right, nonpad)
    mask = _with_mask(cx, mask, allowed, q, k.shape[2])
    scale = attrs.get("scale")
    y = cx.add("ATTENTION", [q, k, v] + ([mask] if mask is not None else []), causal=causal and top_left,
               scale=float(scale) if scale is not None else None, gqa=gqa, softcap=float(attrs.get("softcap", 0.0)) or None)
    return [_merge_heads(cx, y) if three_d else y, k, v, None]


# ----------------------------------------------------------------------------- rotary embedding


def _interleave(cx, x: Node, forward: bool) -> Node:
    """[.., r] with the pairs (x1, x2) interleaved <-> [x1 halves, x2 halves] (``forward``: de-interleave)."""
    lead, r = x.shape[:-1], x.shape[-1]
    perm = tuple(range(len(lead))) + (len(lead) + 1, len(lead))
    y = cx.add("RESHAPE", [x], shape=lead + ((r // 2, 2) if forward else (2, r // 2)))
    return cx.add("RESHAPE", [cx.add("PERMUTE", [y], perm=perm)], shape=lead + (r,))


def _cos_sin(cx, cache, pos, x: Node, heads_axis: int) -> Node:
    """cos_cache[position_ids] ([B, S, r/2]) as the [.., r] table ROPE takes, with a 1 at the heads axis."""
    t = cast(cx, cache, x.dtype)
    if pos is not None:
        t = cx.add("INDEX", [t, pos], axes=(0,))
    if len(t.shape) != 3:
        raise Unsupported(f"a rank-{len(t.shape)} cos / sin table (want [B, S, r/2] after position_ids)")
    t = cx.add("CONCAT", [t, t], axis=2)  # [B, S, r]
    shape = list(t.shape)
    shape.insert(heads_axis, 1)
    return cx.add("RESHAPE", [t], shape=tuple(shape))


@handles("RotaryEmbedding")
def _rotary_embedding(cx, node, ins, attrs):
    """x * cos + rotate_half(x) * sin on the first r dims of each head; see the module docstring."""
    x, cos, sin = cx.node(ins[0]), ins[1], ins[2]
    pos = ins[3] if len(ins) > 3 else None
    if pos is not None:
        pos = cast(cx, pos, "int64")
    three_d = len(x.shape) == 3
    if three_d:  # [B, S, H*D] -> [B, S, H, D]
        h = attrs.get("num_heads")
        b, s, hidden = x.shape
        if not h or not isinstance(hidden, int) or hidden % h:
            raise Unsupported(f"3-d input of hidden size {hidden} with num_heads={h}")
        x4 = cx.add("RESHAPE", [x], shape=(b, s, h, hidden // h))
    elif len(x.shape) == 4:  # [B, H, S, D]
        x4 = x
    else:
        raise Unsupported(f"rank-{len(x.shape)} input (ONNX RotaryEmbedding takes 3-d or 4-d)")
    d = x4.shape[-1]
    r = attrs.get("rotary_embedding_dim", 0) or d
    if not isinstance(d, int) or r % 2 or r > d:
        raise Unsupported(f"rotary_embedding_dim={r} for heads of {d}")
    last = len(x4.shape) - 1
    rot = x4 if r == d else cx.add("SLICE", [x4], axis=last, start=0, end=r, step=1)
    if attrs.get("interleaved", 0):
        rot = _interleave(cx, rot, forward=True)
    heads_axis = 2 if three_d else 1
    out = cx.add("ROPE", [rot, _cos_sin(cx, cos, pos, rot, heads_axis), _cos_sin(cx, sin, pos, rot, heads_axis)])
    if attrs.get("interleaved", 0):
        out = _interleave(cx, out, forward=False)
    if r < d:
        out = cx.add("CONCAT", [out, cx.add("SLICE", [x4], axis=last, start=r, end=d, step=1)], axis=last)
    return cx.add("RESHAPE", [out], shape=x.shape) if three_d else out
