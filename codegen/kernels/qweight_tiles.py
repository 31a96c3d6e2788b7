"""The quantized weight operand of qgemm.py's template in registers: its tiles dequantized, and the WORDS GEMV's step.

Format: qgemm.py's module docstring. Dequantization is ALU work per weight, and at 4 bits an H200 SM must dequantize
~36 weights a clock to keep up with HBM, so it is a handful of instructions:

Byte tiles (``_weight_tile``: ``_group_scales`` then ``_codes_tile``). The code goes into the top mantissa bits of
float32 1.0 by bit operations, f = 1 + q / 2**bits exactly (no int -> float conversion, a quarter-rate instruction
on sm_90), and one FMA gives w = f * S - C with S = 2**bits * scale, C = (2**bits + zero) * scale per row and group
(one rounding; f in [1, 2) keeps the error near 2**-24 * C). At 4 bits the byte tile [BLOCK_N, BLOCK_K / 2] splits
into its low (even k) and high (odd k) nibbles, interleaved back into k order in registers. A step spans SUB =
BLOCK_K / group groups when group < BLOCK_K (the tile is reshaped [BLOCK_N, SUB, group] against scales [BLOCK_N,
SUB]); otherwise one scale per row and step. The byte tiles' SASS (triton 3.6, sm_90): ~7.4 instructions a 4-bit code.

The WORDS GEMV (one row of x; ``_words_x`` / ``_words_sz`` load a step, ``_words_step`` computes it). The codes are
read as int32 words of 8 / 4 codes and x is de-interleaved to match; each code becomes a float by one shift (shared
by code pairs at 4 bits) and one LOP3, its product is one FMA, and the group's scale and zero apply once a word:
sum_k (q_k - z) s x_k = s (sum_k f_k x'_k - X' - z X). No interleave, no dequantizing FMA a code: ~4.5 instructions
a 4-bit code (4.4 counted in the loop's SASS, 5.0 with the norm prologue; triton 3.6, sm_90, 1B gate/up). An 8-bit code
with 16-bit x is one PRMT (``_byte_f32``: the byte under 1.0's exponent at bits 8..15) and x goes in unscaled
(``_words_step8``): 3.7-4.5 instructions a code at the 1B shapes, 4.3-5.6 with the norm prologue (6.0-7.5 with a
shift and a LOP3 a code, x scaled per code position). IDOT (4 bits, 16-bit x; ``_words_step_idot``): x in 16-bit
fixed point a word column, a word's codes four dp4a, 1.25 instructions a code (its section below). x loads as
[WORDS, CPW] 16-byte vectors split into its CPW columns in registers. The kernel loads a step's x, norm weight and
scales a step before its use (plain loads wait for their round trip at first use; the weight tiles go through
cp.async's pipeline).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .pdl import INTERPRETED

ONE = tl.constexpr(0x3F800000)  # the bits of float32 1.0: OR a code into the top mantissa bits for 1 + q / 2**bits


@triton.jit
def _rms_scale(a, r, w):
    # RMSNORM's rounding of x values a (in x's dtype) by their row's rstd r and the norm weight w, broadcast alike: the
    # normalised value to x's dtype, then times the norm weight, rounded again (as the op's reference rounds)
    y = (a.to(tl.float32) * r).to(a.dtype)
    return (y.to(tl.float32) * w.to(tl.float32)).to(a.dtype)


@triton.jit
def _dequant(q, S, C, SUB: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr):
    # q: int32 [BLOCK_N, KP] holding a code in mantissa bits 23 - B .. 22 (B = bits) and zeros elsewhere;
    # S, C: float32 [BLOCK_N, SUB], 2**B * scale and (2**B + zero) * scale of the SUB groups the tile spans
    # (KP // SUB columns each). Returns (code - zero) * scale = (1 + code / 2**B) * S - C, float32 [BLOCK_N, KP].
    f = (q | ONE).to(tl.float32, bitcast=True)  # 1 + code / 2**B exactly: no int -> float conversion
    if SUB == 1:
        w = tl.fma(f, S, -C)
    else:
        f3 = tl.reshape(f, (BLOCK_N, SUB, KP // SUB))
        w = tl.reshape(tl.fma(f3, S[:, :, None], -C[:, :, None]), (BLOCK_N, KP))
    return w


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, n_idx, mask_n, kk, K,
                 stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                 BITS: tl.constexpr, PACK: tl.constexpr, HAS_ZEROS: tl.constexpr, QGROUP: tl.constexpr, SUB: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # W's rows n_idx [BLOCK_N] (int64), columns kk .. kk + BLOCK_K: [BLOCK_N, BLOCK_K], plain in its own dtype,
    # quantized dequantized to float32
    s = s_ptr  # (unused for a plain weight)
    z = s_ptr
    if BITS != 0:
        s, z = _group_scales(s_ptr, z_ptr, n_idx, mask_n, kk, K, stride_sn, stride_sg, stride_zn, stride_zg, HAS_ZEROS, QGROUP, SUB)
    return _codes_tile(w_ptr, n_idx, mask_n, kk, K, stride_wn, stride_wk, s, z, BITS, PACK, HAS_ZEROS, SUB, BLOCK_N, BLOCK_K)


@triton.jit
def _group_scales(s_ptr, z_ptr, n_idx, mask_n, kk, K, stride_sn, stride_sg, stride_zn, stride_zg,
                  HAS_ZEROS: tl.constexpr, QGROUP: tl.constexpr, SUB: tl.constexpr):
    # the scales (and zeros; else the scales again) of rows n_idx in the SUB groups the K step at kk spans, raw [BLOCK_N,
    # SUB] (the last ones past K when K is no multiple of BLOCK_K: a masked scale of 0 makes padded rows and columns
    # exactly 0)
    offs_g = kk // QGROUP + tl.arange(0, SUB)
    mask_g = mask_n[:, None] & (offs_g < tl.cdiv(K, QGROUP))[None, :]
    s = tl.load(s_ptr + n_idx[:, None] * stride_sn + offs_g[None, :] * stride_sg, mask=mask_g, other=0.0)
    z = s
    if HAS_ZEROS:
        z = tl.load(z_ptr + n_idx[:, None] * stride_zn + offs_g[None, :] * stride_zg, mask=mask_g, other=0)
    return s, z


@triton.jit
def _codes_tile(w_ptr, n_idx, mask_n, kk, K, stride_wn, stride_wk, s, z,
                BITS: tl.constexpr, PACK: tl.constexpr, HAS_ZEROS: tl.constexpr, SUB: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # _weight_tile with the step's scales and zeros given (_group_scales's, perhaps loaded a step before)
    offs_j = kk // PACK + tl.arange(0, BLOCK_K // PACK)  # packed columns of this step
    mask = mask_n[:, None] & (offs_j < K // PACK)[None, :]  # in packed columns: keeps the mask 16-byte uniform for cp.async
    b = tl.load(w_ptr + n_idx[:, None] * stride_wn + offs_j[None, :] * stride_wk, mask=mask, other=0)
    if BITS == 0:
        w = b
    else:
        s = s.to(tl.float32)
        if HAS_ZEROS:
            z = z.to(tl.float32)
        else:
            z = tl.full((BLOCK_N, SUB), 2 ** (BITS - 1), tl.float32)
        q = b.to(tl.int32)  # zero-extended bytes
        if BITS == 8:
            q = q << 15  # the code to mantissa bits 15..22
        else:  # low nibble (k = 2j) and high nibble (k = 2j + 1) to bits 19..22, back in k order
            q = tl.interleave((q << 19) & 0x780000, (q << 15) & 0x780000)
        S = s * 2 ** BITS
        w = _dequant(q, S, tl.fma(z, s, S), SUB, BLOCK_N, BLOCK_K)  # C = (zero + 2**bits) * scale
    return w


@triton.jit
def _code_f32(wd, j: tl.constexpr, PAIRED4: tl.constexpr, BITS: tl.constexpr):
    # code q of position j of each int32 word wd (bits BITS*j..) as the float32 1 + q * 2**(P - 23), exactly: the code
    # shifted to bits P.. (P + BITS <= 23) of the mantissa of 1.0 and OR-ed with its exponent bits (an arithmetic right
    # shift's sign bits land above bit P + BITS and are masked off). One shift and one LOP3 a code (the compiler keeps
    # both constants of a masked OR immediate, two LOP3: written as one lop3 with the constants in registers).
    # P: 23 - BITS; PAIRED4 (4 bits): 19 for even j, 15 for odd, so codes 2i - 1 and 2i share their shift
    P: tl.constexpr = 23 - BITS - 4 * (j % 2) * PAIRED4
    SH: tl.constexpr = P - BITS * j
    if SH >= 0:
        v = wd << SH
    else:
        v = wd >> -SH
    mask = tl.full(v.shape, ((1 << BITS) - 1) << P, tl.int32)
    if INTERPRETED:
        bits = (v & mask) | ONE
    else:  # (a & c) | b: LUT 0xEC for a = 0xF0, b = 0xCC, c = 0xAA
        bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEC;", "=r,r,r,r",
                                         [v, tl.full(v.shape, 0x3F800000, tl.int32), mask], dtype=tl.int32, is_pure=True, pack=1)
    return bits.to(tl.float32, bitcast=True)


# byte j of a word to bits 8..15 between a zero byte 0 and the upper two bytes of float32 1.0: prmt's first operand is 1.0
# (0x3F800000, its bytes 0..3), the second the word (bytes 4..7); selector nibble i names result byte i's source byte. In
# this order the selector is SASS's immediate and 1.0 one register for all: with the word first, ptxas takes 1.0 as the
# immediate and spends a move a code re-making the selector register each PRMT overwrites
PRMT_BYTE0 = tl.constexpr("prmt.b32 $0, $1, $2, 0x3240;")
PRMT_BYTE1 = tl.constexpr("prmt.b32 $0, $1, $2, 0x3250;")
PRMT_BYTE2 = tl.constexpr("prmt.b32 $0, $1, $2, 0x3260;")
PRMT_BYTE3 = tl.constexpr("prmt.b32 $0, $1, $2, 0x3270;")


@triton.jit
def _byte_f32(wd, j: tl.constexpr):
    # 8-bit code j of each int32 word wd as the float32 1 + q * 2**-15, exactly, by one PRMT (_code_f32 spends a shift and
    # a LOP3 putting it at the top of the mantissa, where only float32 x needs it: _words_step8)
    if INTERPRETED:
        bits = (((wd >> (8 * j)) & 0xFF) << 8) | ONE
    else:
        one = tl.full(wd.shape, 0x3F800000, tl.int32)
        if j == 0:
            bits = tl.inline_asm_elementwise(PRMT_BYTE0, "=r,r,r", [one, wd], dtype=tl.int32, is_pure=True, pack=1)
        elif j == 1:
            bits = tl.inline_asm_elementwise(PRMT_BYTE1, "=r,r,r", [one, wd], dtype=tl.int32, is_pure=True, pack=1)
        elif j == 2:
            bits = tl.inline_asm_elementwise(PRMT_BYTE2, "=r,r,r", [one, wd], dtype=tl.int32, is_pure=True, pack=1)
        else:
            bits = tl.inline_asm_elementwise(PRMT_BYTE3, "=r,r,r", [one, wd], dtype=tl.int32, is_pure=True, pack=1)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _split8(v, WORDS: tl.constexpr, CPW: tl.constexpr):
    # v [WORDS, CPW] -> its CPW columns [WORDS] (CPW 4: the last four are column 0 again, unused), split in registers
    if CPW == 8:
        e, o = tl.split(tl.reshape(v, (WORDS, 4, 2)))  # j even / odd: [WORDS, 4] of j = 0 2 4 6 / 1 3 5 7
        e0, e1 = tl.split(tl.reshape(e, (WORDS, 2, 2)))  # j 0 4 / 2 6
        o0, o1 = tl.split(tl.reshape(o, (WORDS, 2, 2)))  # j 1 5 / 3 7
        c0, c4 = tl.split(e0)
        c2, c6 = tl.split(e1)
        c1, c5 = tl.split(o0)
        c3, c7 = tl.split(o1)
    else:
        e, o = tl.split(tl.reshape(v, (WORDS, 2, 2)))  # j 0 2 / 1 3
        c0, c2 = tl.split(e)
        c1, c3 = tl.split(o)
        c4, c5, c6, c7 = c0, c0, c0, c0
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _words_x(x_ptr, nw_ptr, row0, kk, K, stride_xk, NORM: tl.constexpr, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    # the loads of one K step of the WORDS GEMV's x (and the norm weight's), raw, de-interleaved as the words are: code
    # position j of word w is x[kk + CPW * w + j]. One [WORDS, CPW] load (16-byte vectors where x's rows are contiguous)
    # split into its CPW columns in registers: strided loads of each column were 8 scalar loads a word, repeated by
    # every thread sharing the words, and kept L1 68% busy (Nsight Compute, session 9). Issued a step ahead of their
    # use (_wgemm_kernel): a plain load waits for its L2 round trip (cold: HBM) at its first use
    CPW: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // CPW
    offs_w = kk // CPW + tl.arange(0, WORDS)
    mask_w = (offs_w < K // CPW)[:, None]
    offs = offs_w[:, None] * CPW + tl.arange(0, CPW)[None, :]
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(tl.load(x_ptr + row0 + offs * stride_xk, mask=mask_w, other=0.0), WORDS, CPW)
    n0, n1, n2, n3, n4, n5, n6, n7 = x0, x1, x2, x3, x4, x5, x6, x7
    if NORM:
        n0, n1, n2, n3, n4, n5, n6, n7 = _split8(tl.load(nw_ptr + offs, mask=mask_w, other=0.0), WORDS, CPW)
    return x0, x1, x2, x3, x4, x5, x6, x7, n0, n1, n2, n3, n4, n5, n6, n7


@triton.jit
def _words_sz(s_ptr, z_ptr, cols, mask_n, kk, K, N, stride_sn, stride_sg, stride_zn, stride_zg,
              HAS_ZEROS: tl.constexpr, QGROUP: tl.constexpr, GLU: tl.constexpr, BLOCK_K: tl.constexpr):
    # _group_scales of one K step, and the up half's with GLU (else the same again); loaded a step ahead like _words_x's
    SUB: tl.constexpr = (BLOCK_K + QGROUP - 1) // QGROUP
    s, z = _group_scales(s_ptr, z_ptr, cols, mask_n, kk, K, stride_sn, stride_sg, stride_zn, stride_zg, HAS_ZEROS, QGROUP, SUB)
    s_u, z_u = s, z
    if GLU:
        s_u, z_u = _group_scales(s_ptr, z_ptr, cols + N, mask_n, kk, K, stride_sn, stride_sg, stride_zn, stride_zg,
                                 HAS_ZEROS, QGROUP, SUB)
    return s, z, s_u, z_u


@triton.jit
def _x_use(xj, nj, rstd, j: tl.constexpr, PAIRED4: tl.constexpr, NORM: tl.constexpr, BITS: tl.constexpr):
    # x_j as float32 (normalised, _x_f32) and x'_j = x_j * 2**(23 - P_j) (_code_f32's P)
    xj = _x_f32(xj, nj, rstd, NORM)
    P: tl.constexpr = 23 - BITS - 4 * (j % 2) * PAIRED4
    return xj, xj * (1 << (23 - P))


@triton.jit
def _words_load(w_ptr, cols, mask_n, kk, K, N, stride_wn, BITS: tl.constexpr, GLU: tl.constexpr, BLOCK_K: tl.constexpr):
    # the int32 words [BLOCK_N, WORDS] of one K step of the WORDS GEMV's weight rows (and the up half's with GLU: rows
    # N + j of the merged [gate; up] weight, else the same words again)
    CPW: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // CPW
    offs_w = kk // CPW + tl.arange(0, WORDS)  # the step's words of a row
    mask = mask_n[:, None] & (offs_w < K // CPW)[None, :]
    rows = (w_ptr + cols * stride_wn).to(tl.pointer_type(tl.int32))  # [BLOCK_N] row starts, as words (4-byte aligned)
    wd = tl.load(rows[:, None] + offs_w[None, :], mask=mask, other=0)
    wu = wd
    if GLU:
        rows_u = (w_ptr + (cols + N) * stride_wn).to(tl.pointer_type(tl.int32))
        wu = tl.load(rows_u[:, None] + offs_w[None, :], mask=mask, other=0)
    return wd, wu


@triton.jit
def _words_step(acc, acc_u, wd, wu, rstd,
                x0, x1, x2, x3, x4, x5, x6, x7, n0, n1, n2, n3, n4, n5, n6, n7, s, z, s_u, z_u,
                BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, QGROUP: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IDOT: tl.constexpr = False):
    # one K step of the WORDS GEMV (one row of x, a quantized weight): the weight's [BLOCK_N, BLOCK_K] codes as int32
    # words [BLOCK_N, WORDS] (CPW codes each: ``_words_load``'s wd, and wu with GLU) and x's BLOCK_K values
    # de-interleaved to match, CPW vectors x_j [WORDS] (_words_x's, with the scales _words_sz's, loaded a step before).
    # With f_j = 1 + q_j * 2**(P_j - 23) (_code_f32) and x'_j = x_j * 2**(23 - P_j) (exact: a power of two),
    # f_j x'_j = x'_j + q_j x_j, so a word's sum of (q_j - z) * s * x_j is
    #     s * (t - X' - z * X),   t = sum_j f_j x'_j,  X' = sum_j x'_j,  X = sum_j x_j
    # X' and X are the row's (all BLOCK_N rows share them), s and z are the word's group's: per code one shift, one
    # LOP3 and one FMA (module docstring). acc [BLOCK_N, WORDS] float32, summed over words after the loop.
    # Where code j goes, P_j: at the top, 23 - BITS, with float32 x (as exact as the byte-tile path); with 16-bit x at
    # 4 bits, codes 2i - 1 and 2i share one shift to P 15 and 19 (5 shifts for 8 codes), whose x'_j = x_j * 2**8 costs
    # the sums ~2**-16 relative, far below the 16-bit output's rounding.
    # NORM (_x_normed): 1, x normalised by the row's 1 / rms (rstd); 2 (NORM_POST), x times the norm weight, and rstd
    # the word columns' running sums of squares [WORDS], this step's added. IDOT (4 bits, 16-bit x): _words_step_idot.
    # Returns (acc, acc_u, rstd)
    if NORM == 2:
        rstd += _squares(x0, x1, x2, x3, x4, x5, x6, x7, 32 // BITS)
    # (if / elif / else: Triton compiles the statements after a return in a constexpr if, dead code typed and compiled)
    if IDOT and BITS == 4 and x0.dtype != tl.float32:
        acc, acc_u = _words_step_idot(acc, acc_u, wd, wu, rstd, x0, x1, x2, x3, x4, x5, x6, x7, n0, n1, n2, n3, n4, n5, n6,
                                      n7, s, z, s_u, z_u, HAS_ZEROS, QGROUP, NORM, GLU, BLOCK_N, BLOCK_K)
    elif BITS == 8 and x0.dtype != tl.float32:
        acc, acc_u = _words_step8(acc, acc_u, wd, wu, rstd, x0, x1, x2, x3, n0, n1, n2, n3, s, z, s_u, z_u,
                                  HAS_ZEROS, QGROUP, NORM, GLU, BLOCK_N, BLOCK_K)
    else:
        acc, acc_u = _words_step_floats(acc, acc_u, wd, wu, rstd, x0, x1, x2, x3, x4, x5, x6, x7, n0, n1, n2, n3, n4, n5,
                                        n6, n7, s, z, s_u, z_u, BITS, HAS_ZEROS, QGROUP, NORM, GLU, BLOCK_N, BLOCK_K)
    return acc, acc_u, rstd


@triton.jit
def _words_step_floats(acc, acc_u, wd, wu, rstd, x0, x1, x2, x3, x4, x5, x6, x7, n0, n1, n2, n3, n4, n5, n6, n7,
                       s, z, s_u, z_u, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, QGROUP: tl.constexpr,
                       NORM: tl.constexpr, GLU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # _words_step by floats: each code one shift, one LOP3 and one FMA (_words_step's comment)
    CPW: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // CPW
    PAIRED4: tl.constexpr = BITS == 4 and x0.dtype != tl.float32  # (float32 x: every code at the top)
    t = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    t_u = t
    xs = tl.zeros((WORDS,), dtype=tl.float32)
    xs_s = xs
    t, t_u, xs, xs_s = _code_term(t, t_u, xs, xs_s, wd, wu, x0, n0, rstd, 0, PAIRED4, NORM, BITS, GLU)
    t, t_u, xs, xs_s = _code_term(t, t_u, xs, xs_s, wd, wu, x1, n1, rstd, 1, PAIRED4, NORM, BITS, GLU)
    t, t_u, xs, xs_s = _code_term(t, t_u, xs, xs_s, wd, wu, x2, n2, rstd, 2, PAIRED4, NORM, BITS, GLU)
    t, t_u, xs, xs_s = _code_term(t, t_u, xs, xs_s, wd, wu, x3, n3, rstd, 3, PAIRED4, NORM, BITS, GLU)
    if CPW == 8:
        t, t_u, xs, xs_s = _code_term(t, t_u, xs, xs_s, wd, wu, x4, n4, rstd, 4, PAIRED4, NORM, BITS, GLU)
        t, t_u, xs, xs_s = _code_term(t, t_u, xs, xs_s, wd, wu, x5, n5, rstd, 5, PAIRED4, NORM, BITS, GLU)
        t, t_u, xs, xs_s = _code_term(t, t_u, xs, xs_s, wd, wu, x6, n6, rstd, 6, PAIRED4, NORM, BITS, GLU)
        t, t_u, xs, xs_s = _code_term(t, t_u, xs, xs_s, wd, wu, x7, n7, rstd, 7, PAIRED4, NORM, BITS, GLU)
    acc = _words_scale(acc, t, xs, xs_s, s, z, BITS, HAS_ZEROS, QGROUP, BLOCK_N, BLOCK_K)
    if GLU:
        acc_u = _words_scale(acc_u, t_u, xs, xs_s, s_u, z_u, BITS, HAS_ZEROS, QGROUP, BLOCK_N, BLOCK_K)
    return acc, acc_u


@triton.jit
def _words_step8(acc, acc_u, wd, wu, rstd, x0, x1, x2, x3, n0, n1, n2, n3, s, z, s_u, z_u,
                 HAS_ZEROS: tl.constexpr, QGROUP: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # _words_step at 8 bits with 16-bit x. With f_j = 1 + q_j * 2**-15 (_byte_f32, one PRMT a code) and x_j as it is,
    #     t = sum_j f_j x_j = X + 2**-15 sum_j q_j x_j,   so   sum_j (q_j - z) s x_j = 2**15 s (t - (1 + z 2**-15) X)
    # t starts at -(1 + z 2**-15) X (per word column, or per row and word with zero points), so a code costs one PRMT
    # and one FMA, a word one FMA more for its scale, and x only its conversion and sum (no scaled copy x'). The running
    # sum holds X's magnitude: an FMA rounds at ~2**-24 |X|, 2**-9 |x| of the word's sum in scale units, ~2**-16 of the
    # row's whole sum over K, far below a 16-bit output's rounding (float32 x keeps _words_step's codes at the top)
    WORDS: tl.constexpr = BLOCK_K // 4
    SUB: tl.constexpr = (BLOCK_K + QGROUP - 1) // QGROUP
    x0 = _x_f32(x0, n0, rstd, NORM)
    x1 = _x_f32(x1, n1, rstd, NORM)
    x2 = _x_f32(x2, n2, rstd, NORM)
    x3 = _x_f32(x3, n3, rstd, NORM)
    X = x0 + x1 + x2 + x3
    acc += _word_sums8(wd, x0, x1, x2, x3, X, s, z, HAS_ZEROS, SUB, BLOCK_N, WORDS)
    if GLU:
        acc_u += _word_sums8(wu, x0, x1, x2, x3, X, s_u, z_u, HAS_ZEROS, SUB, BLOCK_N, WORDS)
    return acc, acc_u


@triton.jit
def _word_sums8(wd, x0, x1, x2, x3, X, s, z, HAS_ZEROS: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr,
                WORDS: tl.constexpr):
    # each word's sum of (q_j - z) s x_j [BLOCK_N, WORDS] (_words_step8): t from -(1 + z 2**-15) X, a PRMT and an FMA a
    # code, then 2**15 s t
    t = _words_start8(X, z, HAS_ZEROS, SUB, BLOCK_N, WORDS)
    t += _byte_f32(wd, 0) * x0[None, :]
    t += _byte_f32(wd, 1) * x1[None, :]
    t += _byte_f32(wd, 2) * x2[None, :]
    t += _byte_f32(wd, 3) * x3[None, :]
    return _words_scaled8(t, s, SUB, BLOCK_N, WORDS)


@triton.jit
def _x_f32(xj, nj, rstd, NORM: tl.constexpr):
    # x_j as float32, normalised (_x_normed)
    return _x_normed(xj, nj, rstd, NORM).to(tl.float32)


@triton.jit
def _x_normed(xj, nj, rstd, NORM: tl.constexpr):
    # the WORDS GEMV's x_j with its norm weight's n_j, in x's dtype. NORM 1 (the prologue; rstd: the row's 1 / rms, a
    # scalar): normalised as _norm_tile rounds; NORM 2 (NORM_POST; the row's 1 / rms scales the sums after the loop):
    # x_j times n_j, rounded once; 0: x_j
    if NORM == 2:
        xj = (xj.to(tl.float32) * nj.to(tl.float32)).to(xj.dtype)
    elif NORM == 1:
        xj = _rms_scale(xj, rstd, nj)
    return xj


@triton.jit
def _squares(x0, x1, x2, x3, x4, x5, x6, x7, CPW: tl.constexpr):
    # NORM_POST's statistics of one WORDS step: each word column's sum of x_j**2 (raw x), [WORDS] float32
    ss = x0.to(tl.float32) * x0.to(tl.float32) + x1.to(tl.float32) * x1.to(tl.float32)
    ss += x2.to(tl.float32) * x2.to(tl.float32) + x3.to(tl.float32) * x3.to(tl.float32)
    if CPW == 8:
        ss += x4.to(tl.float32) * x4.to(tl.float32) + x5.to(tl.float32) * x5.to(tl.float32)
        ss += x6.to(tl.float32) * x6.to(tl.float32) + x7.to(tl.float32) * x7.to(tl.float32)
    return ss


@triton.jit
def _words_start8(X, z, HAS_ZEROS: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    # _words_step8's t before the codes, -(1 + z 2**-15) X [BLOCK_N, WORDS] (X [WORDS]: each word column's sum of x; z the
    # raw zeros [BLOCK_N, SUB], else the symmetric 128: one multiply a word column)
    if not HAS_ZEROS:
        return tl.broadcast_to((X * -(1.0 + 2.0 ** -8))[None, :], (BLOCK_N, WORDS))
    nz = z.to(tl.float32) * -(2.0 ** -15)
    if SUB == 1:
        return nz * X[None, :] - X[None, :]
    X3 = tl.reshape(X, (SUB, WORDS // SUB))[None, :, :]
    return tl.reshape(nz[:, :, None] * X3 - X3, (BLOCK_N, WORDS))


@triton.jit
def _words_scaled8(t, s, SUB: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    # 2**15 s t: each word's t by its group's raw scale s [BLOCK_N, SUB] times 2**15 (exact)
    s = s.to(tl.float32) * 32768.0
    if SUB == 1:
        return s * t
    return tl.reshape(s[:, :, None] * tl.reshape(t, (BLOCK_N, SUB, WORDS // SUB)), (BLOCK_N, WORDS))


@triton.jit
def _code_term(t, t_u, xs, xs_s, wd, wu, xj, nj, rstd, j: tl.constexpr, PAIRED4: tl.constexpr, NORM: tl.constexpr,
               BITS: tl.constexpr, GLU: tl.constexpr):
    # code position j of the words: t += f_j x'_j (and the up half's with GLU), X += x_j, X' += x'_j
    xa, xb = _x_use(xj, nj, rstd, j, PAIRED4, NORM, BITS)
    t += _code_f32(wd, j, PAIRED4, BITS) * xb[None, :]
    if GLU:
        t_u += _code_f32(wu, j, PAIRED4, BITS) * xb[None, :]
    return t, t_u, xs + xa, xs_s + xb


@triton.jit
def _words_scale(acc, t, xs, xs_s, s, z, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, QGROUP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # acc += s * (t - X' - z * X) with the scale s and zero z [BLOCK_N, SUB] (raw, _words_sz's) of each word's group
    CPW: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // CPW
    SUB: tl.constexpr = (BLOCK_K + QGROUP - 1) // QGROUP
    s = s.to(tl.float32)
    if SUB == 1:
        if HAS_ZEROS:
            acc += s * (t - xs_s[None, :] - z.to(tl.float32) * xs[None, :])
        else:
            acc += s * (t - (xs_s + 2 ** (BITS - 1) * xs)[None, :])
    else:  # words of SUB groups: [BLOCK_N, SUB, WORDS // SUB] against [BLOCK_N, SUB]
        t3 = tl.reshape(t, (BLOCK_N, SUB, WORDS // SUB))
        x3 = tl.reshape(xs, (SUB, WORDS // SUB))
        xs3 = tl.reshape(xs_s, (SUB, WORDS // SUB))
        if HAS_ZEROS:
            d = s[:, :, None] * (t3 - xs3[None, :, :] - z.to(tl.float32)[:, :, None] * x3[None, :, :])
        else:
            d = s[:, :, None] * (t3 - (xs3 + 2 ** (BITS - 1) * x3)[None, :, :])
        acc += tl.reshape(d, (BLOCK_N, WORDS))
    return acc


# ----------------------------------------------------------------------------- IDOT: 4-bit codes by integer dot products
#
# The WORDS step at 4 bits with 16-bit x on the integer dot-product unit (dp4a: four byte products summed into an int32,
# one instruction). A word column's 8 x values x_j become 16-bit fixed point on the column's own power of two,
#     v_j = round(x_j 2**(14 - e)),   e = floor(log2 max_j |x_j|),
# |v_j| <= 2**15 - 2**7 (a 16-bit x's largest is a multiple of 2**7 there: no rounding up to 2**15); v_j is x_j exactly
# for every x_j within 2**-8 of the column's largest, else within 2**-16 of that largest. v_j = 256 h_j + l_j (h a
# signed byte, l an unsigned one), split into four byte planes [l_0, l_2, l_4, l_6], [h_0, ..], [l_1, ..], [h_1, ..] by
# 8 PRMTs a column (IDOT_PLANES). A word's codes become bytes by two LOP3 and a shift (even and odd positions, the
# planes' order), four dp4a give sum_j q_j h_j and C + sum_j q_j l_j, one IMAD C + sum_j q_j v_j (IDOT_WORD). C = M - z V
# (V = sum_j v_j; M the bits of 1.5 * 2**23), so the int32 is M + sum_j (q_j - z) v_j, |sum| < 8 * 15 * 2**15 < 2**22:
# its bits are the float 1.5 * 2**23 + that sum, exactly, and one FMA by the column's 2**(e - 14) (a power of two) less
# 1.5 * 2**23 times it gives the word's sum of (q_j - z) v_j 2**(e - 14) exactly; one more FMA applies the scale. 10
# instructions a word (1.25 a code), ~41 a column for x (shared by the rows a thread holds), against _words_step's ~2.6
# a code. The products and the word's sum are exact; what rounds is v_j (2**-16 of its column's largest x, far below a
# 16-bit output's rounding) and float32's sums over words. A NaN or inf in x makes its column's sums non-finite.

IDOT_M = tl.constexpr(0x4B400000)  # the bits of 1.5 * 2**23: M + i (int32, |i| < 2**22) is the float 1.5 * 2**23 + i
IDOT_M_F = tl.constexpr(12582912.0)  # 1.5 * 2**23
IDOT_UP = tl.constexpr(0x86000000 - 2 ** 32)  # (268 << 23) as int32: minus a float's exponent bits, 2**(141 - its field)
# v's of a column (even positions $4-$7: v0 v2 v4 v6, odd $8-$11) -> planes $0 [l0 l2 l4 l6], $1 [h0 h2 h4 h6], $2, $3
# (odd): prmt 0x5140 takes [a.b0 b.b0 a.b1 b.b1] of two v's, 0x5410 / 0x7632 the low / high halves of two of those
IDOT_PLANES = tl.constexpr(
    "{.reg .b32 a, b, c, d; prmt.b32 a, $4, $5, 0x5140; prmt.b32 b, $6, $7, 0x5140; prmt.b32 c, $8, $9, 0x5140; "
    "prmt.b32 d, $10, $11, 0x5140; prmt.b32 $0, a, b, 0x5410; prmt.b32 $1, a, b, 0x7632; prmt.b32 $2, c, d, 0x5410; "
    "prmt.b32 $3, c, d, 0x7632;}")
# a word $1 of 8 codes (code j at bits 4j) against its column's planes ($2 $3 even l h, $4 $5 odd l h), from C ($6):
# $0 = C + sum_j q_j v_j (mod 2**32)
IDOT_WORD = tl.constexpr(
    "{.reg .b32 qe, qo, h, l; and.b32 qe, $1, 0x0F0F0F0F; shr.u32 qo, $1, 4; and.b32 qo, qo, 0x0F0F0F0F; "
    "dp4a.u32.s32 h, qe, $3, 0; dp4a.u32.s32 h, qo, $5, h; dp4a.u32.u32 l, qe, $2, $6; dp4a.u32.u32 l, qo, $4, l; "
    "mad.lo.u32 $0, h, 256, l;}")


@triton.jit
def _words_step_idot(acc, acc_u, wd, wu, rstd, x0, x1, x2, x3, x4, x5, x6, x7, n0, n1, n2, n3, n4, n5, n6, n7,
                     s, z, s_u, z_u, HAS_ZEROS: tl.constexpr, QGROUP: tl.constexpr, NORM: tl.constexpr,
                     GLU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # _words_step at 4 bits with 16-bit x by dp4a (the section's comment): x to each column's fixed point and planes,
    # then each word's exact integer sum, scaled
    x0 = _x_f32(x0, n0, rstd, NORM)
    x1 = _x_f32(x1, n1, rstd, NORM)
    x2 = _x_f32(x2, n2, rstd, NORM)
    x3 = _x_f32(x3, n3, rstd, NORM)
    x4 = _x_f32(x4, n4, rstd, NORM)
    x5 = _x_f32(x5, n5, rstd, NORM)
    x6 = _x_f32(x6, n6, rstd, NORM)
    x7 = _x_f32(x7, n7, rstd, NORM)
    m = _absmax(_absmax(_absmax(x0, x1), _absmax(x2, x3)), _absmax(_absmax(x4, x5), _absmax(x6, x7)))
    m = tl.maximum(m, 2.0 ** -100, propagate_nan=tl.PropagateNan.ALL)  # (all zeros: any power of two)
    eb = m.to(tl.int32, bitcast=True) & 0x7F800000  # 2**e's bits
    up = (-eb + IDOT_UP).to(tl.float32, bitcast=True)  # 2**(14 - e)
    dn = eb.to(tl.float32, bitcast=True) * 2.0 ** -14  # 2**(e - 14); inf for a NaN / inf column: sums not finite
    v0 = tl.fma(x0, up, IDOT_M_F).to(tl.int32, bitcast=True)
    v1 = tl.fma(x1, up, IDOT_M_F).to(tl.int32, bitcast=True)
    v2 = tl.fma(x2, up, IDOT_M_F).to(tl.int32, bitcast=True)
    v3 = tl.fma(x3, up, IDOT_M_F).to(tl.int32, bitcast=True)
    v4 = tl.fma(x4, up, IDOT_M_F).to(tl.int32, bitcast=True)
    v5 = tl.fma(x5, up, IDOT_M_F).to(tl.int32, bitcast=True)
    v6 = tl.fma(x6, up, IDOT_M_F).to(tl.int32, bitcast=True)
    v7 = tl.fma(x7, up, IDOT_M_F).to(tl.int32, bitcast=True)
    V = ((v0 - IDOT_M) + (v1 - IDOT_M)) + ((v2 - IDOT_M) + (v3 - IDOT_M)) + ((v4 - IDOT_M) + (v5 - IDOT_M)) + (
        (v6 - IDOT_M) + (v7 - IDOT_M))
    if INTERPRETED:  # (no PTX: the words are summed from the v's, _idot_word_values; tests/codegen/test_skinny_idot.py
        le, he, lo, ho = v0, v1, v2, v3  # runs IDOT_PLANES and IDOT_WORD on an emulator against the same sums)
        vs = (v0, v1, v2, v3, v4, v5, v6, v7)
    else:
        le, he, lo, ho = tl.inline_asm_elementwise(IDOT_PLANES, "=r,=r,=r,=r,r,r,r,r,r,r,r,r", [v0, v2, v4, v6, v1, v3, v5, v7],
                                                   dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        vs = (v0, v0, v0, v0, v0, v0, v0, v0)  # (unused)
    c = dn * -IDOT_M_F
    acc = _idot_sums(acc, wd, le, he, lo, ho, vs, V, dn, c, s, z, HAS_ZEROS, QGROUP, BLOCK_N, BLOCK_K)
    if GLU:
        acc_u = _idot_sums(acc_u, wu, le, he, lo, ho, vs, V, dn, c, s_u, z_u, HAS_ZEROS, QGROUP, BLOCK_N, BLOCK_K)
    return acc, acc_u


@triton.jit
def _absmax(a, b):
    return tl.maximum(tl.abs(a), tl.abs(b), propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _idot_sums(acc, wd, le, he, lo, ho, vs, V, dn, c, s, z, HAS_ZEROS: tl.constexpr, QGROUP: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # acc [BLOCK_N, WORDS] += s * sum_j (q_j - z) x_j of each word (_words_step_idot's planes of its column, V, 2**(e - 14)
    # as dn and c = -1.5 * 2**23 dn; s, z: raw [BLOCK_N, SUB])
    WORDS: tl.constexpr = BLOCK_K // 8
    SUB: tl.constexpr = (BLOCK_K + QGROUP - 1) // QGROUP
    if HAS_ZEROS:  # C = M - z V, a row's group's zero
        zi = z.to(tl.int32)
        if SUB == 1:
            C = -zi * V[None, :] + IDOT_M
        else:
            C = tl.reshape(-zi[:, :, None] * tl.reshape(V, (SUB, WORDS // SUB))[None, :, :] + IDOT_M, (BLOCK_N, WORDS))
    else:
        C = tl.broadcast_to((V * -8 + IDOT_M)[None, :], (BLOCK_N, WORDS))
    if INTERPRETED:
        r = _idot_word_values(wd, vs, C)
    else:
        r = tl.inline_asm_elementwise(IDOT_WORD, "=r,r,r,r,r,r,r", [wd, le[None, :], he[None, :], lo[None, :], ho[None, :], C],
                                      dtype=tl.int32, is_pure=True, pack=1)
    t = tl.fma(r.to(tl.float32, bitcast=True), dn[None, :], c[None, :])  # exact: sum_j (q_j - z) v_j 2**(e - 14)
    s = s.to(tl.float32)
    if SUB == 1:
        return acc + s * t
    return acc + tl.reshape(s[:, :, None] * tl.reshape(t, (BLOCK_N, SUB, WORDS // SUB)), (BLOCK_N, WORDS))


@triton.jit
def _idot_word_values(wd, vs, C):
    # IDOT_WORD's result by plain integer arithmetic (the interpreter runs no PTX): C + sum_j q_j v_j
    v0, v1, v2, v3, v4, v5, v6, v7 = vs
    r = C + ((wd & 0xF) * (v0[None, :] - IDOT_M) + ((wd >> 4) & 0xF) * (v1[None, :] - IDOT_M))
    r += ((wd >> 8) & 0xF) * (v2[None, :] - IDOT_M) + ((wd >> 12) & 0xF) * (v3[None, :] - IDOT_M)
    r += ((wd >> 16) & 0xF) * (v4[None, :] - IDOT_M) + ((wd >> 20) & 0xF) * (v5[None, :] - IDOT_M)
    return r + ((wd >> 24) & 0xF) * (v6[None, :] - IDOT_M) + ((wd >> 28) & 0xF) * (v7[None, :] - IDOT_M)


# ----------------------------------------------------------------------------- MAGIC: 4-bit codes for the tensor cores
#
# The swapped tl.dot tile of a 4-bit weight (qgemm.py MAGIC; decode at 1..16 rows) feeds the tensor cores the codes
# minus their zero, exactly, in x's 16-bit dtype, and applies the group's scale once to each step's product:
#     sum_k (q_k - z) s x_k = s * dot(q - z, x)       (BLOCK_K within one group)
# A byte b (codes k = 2j low, 2j + 1 high) becomes one 32-bit register of two 16-bit values, the pair the MMA's
# operand holds: one PRMT puts b at bits 0..7 and b >> 4 (the word shifted once for four bytes) at bits 16..23, one
# LOP3 keeps bits 0..3 and 16..19 and ORs in the exponent bits of M = 128 (bfloat16) / 1024 (float16), whose ulp is 1,
# so each half is M + code exactly; one packed FMA (x2: 1 * v - (M + z)) leaves code - zero, a small integer, exact.
# 3.25 instructions a byte, two codes; the products and their sums are the tensor cores' (float32), the scale one FMA
# a row a step.
#
# The K order inside a step is permuted (the same permutation for the codes and x, so the dot is unchanged): wgmma's
# register operand gives a thread the k pairs t and t + 4 (t = lane % 4) of every 8, which in memory order are single
# bytes 4 apart (one shared-memory load a byte); permuted, a thread's bytes of a row are contiguous (16-byte loads).
# Byte m = (BJ / 4) t + 2 g + h of a step's BJ bytes is logical pair 8 g + 4 h + t.

# -(M + 8) twice as int32, the symmetric zero's operand: bfloat16 -136 = 0xC308, float16 -1032 = 0xE408
MAGIC_SYM_BF16 = tl.constexpr(0xC308C308 - 2 ** 32)
MAGIC_SYM_F16 = tl.constexpr(0xE408E408 - 2 ** 32)
# four bytes ($4, elements 0..3 of a pack) -> four pairs (code - zero of the low nibble, of the high nibble) ($0..$3):
# y = word >> 4 holds each byte's high nibble in its low bits; PRMT takes byte i of the word to byte 0 and byte i of y to
# byte 2; LOP3 keeps the bits of $5 (0x000F000F) and ORs in M's bits ($9); FMA (the op named FMA) computes
# 1 * v - (M + z) ($13: ones; $17 + i: -(M + z) of element i). $6-$8, $10-$12, $14-$16: the other pack elements' copies
# of the constants, unused
_MAGIC_ASM = ("{.reg .b32 y, t; shr.b32 y, $4, 4; " + " ".join(
    f"prmt.b32 t, $4, y, 0x{4 + i}{4 + i}{i}{i}; lop3.b32 t, t, $5, $9, 0xEA; FMA ${i}, t, $13, ${17 + i};" for i in range(4)) + "}")
MAGIC_ASM_BF16 = tl.constexpr(_MAGIC_ASM.replace("FMA", "fma.rn.bf16x2"))
MAGIC_ASM_F16 = tl.constexpr(_MAGIC_ASM.replace("FMA", "fma.rn.f16x2"))
MAGIC_CONSTRAINTS = tl.constexpr("=r," * 4 + "r," * 16 + "r")  # 4 pairs out; the bytes (one register), 4 x 4 words in


@triton.jit
def _perm_codes(b):
    # a step's bytes [BN, BJ] in memory order -> the MAGIC K order (the block comment above)
    BN: tl.constexpr = b.shape[0]
    BJ: tl.constexpr = b.shape[1]
    return tl.reshape(tl.permute(tl.reshape(b, (BN, 4, BJ // 8, 2)), (0, 2, 3, 1)), (BN, BJ))


@triton.jit
def _perm_x(a):
    # x's tile [BM, BK] in k order -> the MAGIC K order of its k pairs (2 m + e for byte m, nibble e)
    BM: tl.constexpr = a.shape[0]
    BK: tl.constexpr = a.shape[1]
    return tl.reshape(tl.permute(tl.reshape(a, (BM, 4, BK // 16, 2, 2)), (0, 2, 3, 1, 4)), (BM, BK))


@triton.jit
def _magic_tile(w_ptr, s_ptr, z_ptr, n_idx, mask_n, kk, K, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                HAS_ZEROS: tl.constexpr, QGROUP: tl.constexpr, DT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # the 4-bit weight's rows n_idx at columns kk .. kk + BLOCK_K (one group): (the group's scales [BLOCK_N, 1] float32,
    # code - zero exactly in DT [BLOCK_N, BLOCK_K], columns in the MAGIC K order)
    offs_j = kk // 2 + tl.arange(0, BLOCK_K // 2)
    mask = mask_n[:, None] & (offs_j < K // 2)[None, :]
    b = _perm_codes(tl.load(w_ptr + n_idx[:, None] * stride_wn + offs_j[None, :] * stride_wk, mask=mask, other=0))
    s = tl.load(s_ptr + n_idx * stride_sn + (kk // QGROUP) * stride_sg, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    if HAS_ZEROS:
        zf = tl.load(z_ptr + n_idx * stride_zn + (kk // QGROUP) * stride_zg, mask=mask_n, other=0).to(tl.float32)
    else:
        zf = tl.full((BLOCK_N,), 8.0, tl.float32)
    if INTERPRETED or DT == tl.float32:
        q = b.to(tl.int32)
        return s, (tl.interleave(q & 15, q >> 4).to(tl.float32) - zf[:, None]).to(DT)
    BF16: tl.constexpr = DT == tl.bfloat16
    if HAS_ZEROS:  # -(M + z) as DT's bits in both halves (a splat of a computed scalar would stop Triton from loading the
        # codes in the MMA operand's layout: the symmetric case's is a constant)
        nz = (-(zf + (128.0 if BF16 else 1024.0))).to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        nz = (nz * 0x10001)[:, None] + tl.zeros(b.shape, tl.int32)
    else:
        nz = tl.full(b.shape, MAGIC_SYM_BF16 if BF16 else MAGIC_SYM_F16, tl.int32)
    one: tl.constexpr = 0x3F803F80 if BF16 else 0x3C003C00  # (1, 1)
    args = [b, tl.full(b.shape, 0x000F000F, tl.int32), tl.full(b.shape, 0x43004300 if BF16 else 0x64006400, tl.int32),
            tl.full(b.shape, one, tl.int32), nz]
    # then each pair split into its two halves, which the interleave below pairs again (no instructions: the halves of
    # one register); the MMA's operand holds k pairs (2 m, 2 m + 1) as one register
    if BF16:
        v = tl.inline_asm_elementwise(MAGIC_ASM_BF16, MAGIC_CONSTRAINTS, args, dtype=tl.int32, is_pure=True, pack=4)
        lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [v], dtype=(tl.bfloat16, tl.bfloat16),
                                           is_pure=True, pack=1)
    else:
        v = tl.inline_asm_elementwise(MAGIC_ASM_F16, MAGIC_CONSTRAINTS, args, dtype=tl.int32, is_pure=True, pack=4)
        lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [v], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=1)
    return s, tl.interleave(lo, hi)
