"""Greedy decoding between two decode steps, as one launch: the next token of each row, and the step's inputs
advanced to it.

    tok[b]                      = argmax_v logits[b, v]        first maximum; a NaN wins, the first NaN (torch.argmax)
    ids[b, 0]                   = tok[b]                       the next step's input_ids
    positions[b, :]            += 1
    slots[:]                   += 1
    mask[b, 0, 0, slot]         = True                         and, for a sliding window, mask[b, 0, 0, drop] = False
    window_mask[b, 0, 0, slot]  = True                         the sliding layers' mask (Gemma 2 / 3), where given, and
                                                               window_mask[b, 0, 0, window_drop] = False

A generator replays the step's CUDA graph, then picks each row's token and writes the next step's inputs into the
graph's input buffers (``llm/generator.py`` ``_Decoder``). With torch ops that is six launches between two replays,
~41-48 us of GPU time on an H200 against a 0.96-1.2 ms step (bench/NOTES.md, session 18): ``torch.argmax`` of one
[1, 128256] row alone took 27 us, one block walking the row (as long as one program of this kernel walking it: 30 us).

Here a row is cut into ``splits(V)`` chunks (at most MAX_SPLITS), one program each, walking its chunk in BLOCK-wide
steps, each lane keeping its own maximum and the index where it first met it (a strictly greater value replaces it, so
a lane keeps its first maximum; a NaN replaces anything but an earlier NaN), then reducing its lanes: the smallest index
among the lanes holding the chunk's maximum (or a NaN). The chunks' answers go to a scratch; the last of the row's
programs to count itself in (a counter a row, left zero) reduces them the same way, the chunks in column order, which
gives torch.argmax's answer, ties and NaNs included, and writes row b's token, ids, positions and mask column (row 0's
program also the slots). On the H200: 8 us between two replays at batch 1, 16 at batch 16, the host copy included.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK = 64 if INTERPRET else 2048  # logits a program loads per step (16 a thread at 4 warps on the GPU)
MAX_SPLITS = 32  # programs a row: Llama-3's 128256 logits as 32 chunks of 2 steps (a whole row in one program: 27+ us)
WARPS = 4


@triton.jit
def _best(val, idx, nan, V):
    # the smallest index among the lanes holding a NaN, or else the largest value: torch.argmax's answer over the lanes,
    # each lane holding its own first maximum (or first NaN) and where it is
    top = tl.max(tl.where(nan, float("-inf"), val), axis=0)
    any_nan = tl.max(nan.to(tl.int32), axis=0) > 0
    hit = tl.where(any_nan, nan, val == top)
    i = tl.min(tl.where(hit, idx, V), axis=0)
    return tl.where(any_nan, float("nan"), top), i


@triton.jit
def _greedy_kernel(logits_ptr, stride_lb, stride_lv, V, CHUNK, part_val_ptr, part_idx_ptr, cnt_ptr,
                   tok_ptr, ids_ptr, stride_ib,
                   pos_ptr, stride_pb, stride_pt, T, slots_ptr, N_SLOTS, mask_ptr, stride_mb, stride_ms, slot, drop,
                   wmask_ptr, stride_wb, stride_ws, wdrop,
                   SPLITS: tl.constexpr, HAS_IDS: tl.constexpr, ADVANCE: tl.constexpr, DROP: tl.constexpr,
                   WINDOW: tl.constexpr, WDROP: tl.constexpr,
                   BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr):
    # grid (B, SPLITS): program (b, c) walks columns [c * CHUNK, (c + 1) * CHUNK) of row b
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    row = logits_ptr + b * stride_lb
    lo = c * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    # the first step sets every lane (a row of -inf then answers its first index, as torch does); masked lanes hold
    # -inf at indices >= hi, behind every real one of the chunk in the reduction
    best_i = lo + offs
    best = tl.load(row + best_i * stride_lv, mask=best_i < hi, other=float("-inf")).to(tl.float32)
    best_nan = best != best
    for start in range(lo + BLOCK, hi, BLOCK):
        i = start + offs
        x = tl.load(row + i * stride_lv, mask=i < hi, other=float("-inf")).to(tl.float32)
        nan = x != x
        take = (nan | (x > best)) & ~best_nan  # (x > NaN is False: a NaN lane keeps its first NaN)
        best = tl.where(take, x, best)
        best_i = tl.where(take, i, best_i)
        best_nan = best_nan | nan
    val, tok = _best(best, best_i, best_nan, V)
    last = c == 0  # (one split: the only program)
    if SPLITS > 1:  # each chunk's answer to the scratch; the last of the row's programs to count itself in answers the row
        tl.store(part_val_ptr + b * SPLITS + c, val)
        tl.store(part_idx_ptr + b * SPLITS + c, tok)
        last = tl.atomic_add(cnt_ptr + b, 1, sem="acq_rel") == SPLITS - 1
        if last:
            s = tl.arange(0, BLOCK_S)
            vals = tl.load(part_val_ptr + b * SPLITS + s, mask=s < SPLITS, other=float("-inf"))
            idxs = tl.load(part_idx_ptr + b * SPLITS + s, mask=s < SPLITS, other=V)
            val, tok = _best(vals, idxs, vals != vals, V)
            tl.store(cnt_ptr + b, 0)  # left zero for the next call
    if last:
        tl.store(tok_ptr + b, tok.to(tl.int64))
        if HAS_IDS:
            tl.store(ids_ptr + b * stride_ib, tok.to(tl.int64))
        if ADVANCE:
            t = tl.arange(0, BLOCK_T)
            p = pos_ptr + b * stride_pb + t * stride_pt
            tl.store(p, tl.load(p, mask=t < T) + 1, mask=t < T)
            tl.store(mask_ptr + b * stride_mb + slot * stride_ms, 1)
            if DROP:
                tl.store(mask_ptr + b * stride_mb + drop * stride_ms, 0)
            if WINDOW:
                tl.store(wmask_ptr + b * stride_wb + slot * stride_ws, 1)
                if WDROP:
                    tl.store(wmask_ptr + b * stride_wb + wdrop * stride_ws, 0)
            if b == 0:
                sp = slots_ptr + t
                tl.store(sp, tl.load(sp, mask=t < N_SLOTS) + 1, mask=t < N_SLOTS)


def splits(v: int) -> int:
    """Programs a row of ``v`` logits is cut into: chunks of at least BLOCK, at most MAX_SPLITS."""
    return max(1, min(MAX_SPLITS, triton.cdiv(v, BLOCK)))


def scratch(rows: int, v: int, device) -> tuple:
    """What ``greedy`` needs for ``rows`` rows of ``v`` logits cut into ``splits(v)`` chunks: each chunk's value and
    index, and one counter a row (zero, and left zero by every call: a caller keeps it for its calls on one stream)."""
    n = splits(v)
    return (torch.empty(rows, n, dtype=torch.float32, device=device), torch.empty(rows, n, dtype=torch.int32, device=device),
            torch.zeros(rows, dtype=torch.int32, device=device))


def check(logits, ids=None, positions=None, slots=None, mask=None, slot=None, window_mask=None) -> str | None:
    """Why ``greedy`` cannot take these operands (None: it can)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.dtype not in DTYPES or 0 in logits.shape:
        return f"logits must be a non-empty [B, V] float16 / bfloat16 / float32 tensor, got {getattr(logits, 'dtype', logits)} " \
               f"{list(getattr(logits, 'shape', []))}"
    B = logits.shape[0]
    if ids is not None and (ids.dtype != torch.int64 or tuple(ids.shape) != (B, 1)):
        return f"ids {ids.dtype} {list(ids.shape)}: want int64 [{B}, 1]"
    if (positions is None) != (mask is None) or (positions is None) != (slots is None):
        return "positions, slots and mask advance together: give all three or none"
    if positions is not None:
        if positions.dtype != torch.int64 or positions.dim() != 2 or positions.shape[0] != B:
            return f"positions {positions.dtype} {list(positions.shape)}: want int64 [{B}, T]"
        if slots.dtype != torch.int64 or slots.dim() != 1 or not slots.is_contiguous():
            return f"slots {slots.dtype} {list(slots.shape)}: want a contiguous int64 vector"
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] != B or mask.shape[1] * mask.shape[2] != 1:
            return f"mask {mask.dtype} {list(mask.shape)}: want bool [{B}, 1, 1, S]"
        if not isinstance(slot, int) or not 0 <= slot < mask.shape[3]:
            return f"slot {slot!r} is not a column of the mask's {mask.shape[3]}"
    if window_mask is not None and (mask is None or window_mask.dtype != torch.bool or window_mask.shape != mask.shape):
        return f"window_mask {window_mask.dtype} {list(window_mask.shape)}: want bool, the mask's shape " \
               f"{list(mask.shape) if mask is not None else '(no mask given)'}"
    tensors = [t for t in (logits, ids, positions, slots, mask, window_mask) if t is not None]
    if len({t.device for t in tensors}) != 1:
        return "operands on different devices"
    return None


def greedy(logits: torch.Tensor, ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
           slots: torch.Tensor | None = None, mask: torch.Tensor | None = None, slot: int | None = None,
           drop: int | None = None, out: torch.Tensor | None = None, work: tuple | None = None,
           window_mask: torch.Tensor | None = None, window_drop: int | None = None) -> torch.Tensor:
    """Each row's greedy token (int64 [B], torch.argmax's answer), written to ``ids`` [B, 1] too where given; with
    ``positions`` [B, T], ``slots`` [n] and ``mask`` [B, 1, 1, S] the step's inputs advance in the same launch
    (module docstring; ``drop``: a column set False, the sliding window's oldest); ``window_mask`` (the mask's shape)
    likewise, its oldest column ``window_drop``. ``work``: ``scratch(B, V, device)``, kept by a caller that calls again
    (None: allocated for this call)."""
    reason = check(logits, ids, positions, slots, mask, slot, window_mask)
    if reason:
        raise ValueError(f"greedy: {reason}")
    for name, col, m in (("drop", drop, mask), ("window_drop", window_drop, window_mask)):
        if col is not None and (m is None or not 0 <= col < m.shape[3]):
            raise ValueError(f"greedy: {name} {col!r} needs its mask, and a column of it")
    B, V = logits.shape
    n = splits(V)
    work = work if work is not None else scratch(B, V, logits.device)
    if tuple(work[0].shape) != (B, n) or work[2].shape[0] < B:
        raise ValueError(f"greedy: work {[list(t.shape) for t in work]} is not scratch({B}, {V})'s")
    tok = out if out is not None else torch.empty(B, dtype=torch.int64, device=logits.device)
    advance = positions is not None
    pos = positions if advance else tok.view(B, 1)
    msk = mask if advance else tok
    wmsk = window_mask if window_mask is not None else msk
    chunk = triton.cdiv(triton.cdiv(V, n), BLOCK) * BLOCK
    _greedy_kernel[(B, n)](
        logits, logits.stride(0), logits.stride(1), V, chunk, *work,
        tok, ids if ids is not None else tok, ids.stride(0) if ids is not None else 0,
        pos, pos.stride(0), pos.stride(1), pos.shape[1], slots if advance else tok, slots.numel() if advance else 0,
        msk, msk.stride(0) if advance else 0, msk.stride(3) if advance else 0, slot or 0, drop or 0,
        wmsk, wmsk.stride(0) if advance else 0, wmsk.stride(3) if advance else 0, window_drop or 0,
        SPLITS=n, HAS_IDS=ids is not None, ADVANCE=advance, DROP=drop is not None, WINDOW=window_mask is not None,
        WDROP=window_drop is not None, BLOCK=BLOCK,
        BLOCK_S=triton.next_power_of_2(n), BLOCK_T=triton.next_power_of_2(max(pos.shape[1], slots.numel() if advance else 1)),
        num_warps=WARPS)
    return tok
