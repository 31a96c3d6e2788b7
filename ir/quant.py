"""kiln's weight-only quantized weight format, its reference dequantization, and round-to-nearest (RTN).

A linear weight W [N, K] (out, in, like ``F.linear``) is cut into groups of ``group`` consecutive input
features (group == K: one group per output channel, else 32, 64 or 128 dividing K). Codes are unsigned
integers with a zero point per (row, group):

    w[n, k] = (q[n, k] - zero[n, k // group]) * scale[n, k // group]

- bits 8: qweight uint8 [N, K], codes 0..255.
- bits 4: qweight uint8 [N, K // 2]; byte j holds k = 2j in bits 0-3 and k = 2j + 1 in bits 4-7 (K even).
- scales [N, K // group], float32 or float16 (kernels compute in float32).
- zeros: uint8 [N, K // group] when asymmetric; None when symmetric, the zero point then being
  2**(bits - 1) (128 or 8): codes 0..15 mean -8..7 (bits 4), 0..255 mean -128..127 (bits 8).
- perm: None, or int64 [K], a permutation of 0..K-1 (an act-order GPTQ checkpoint's groups, made consecutive): the
  packed column j holds the float weight's input feature perm[j], so the GEMM reads x[..., perm]. ``dequantize``
  returns the float weight in its own order (column perm[j] from packed column j).

Grids (``fit_grid``), with qmax = 2**(bits - 1) - 1 and maxq = 2**bits - 1:

- symmetric: s = max(max(w, 0) / (qmax + 1/2), -min(w, 0) / (qmax + 3/2)). The smallest step for which
  every weight lies within half a step of a code in -(qmax + 1)..qmax. Plain absmax / qmax leaves the extra
  negative code unused and rounds no better: this grid is 7/7.5 of that step when the group's extreme
  weight is positive and 7/8.5 when it is negative (4 bits), i.e. 13% / 32% less rounding noise (MSE).
- asymmetric: the range [min(w, 0), max(w, 0)] (it holds 0, so the integer zero point needs no clamp):
  s = (hi - lo) / maxq, zero = round(-lo / s). Every weight again lies within half a step of a code.

Scale dtype: float32 when group == K (N scales: free), float16 otherwise (a g128 int4 weight then spends
0.125 bit per weight on scales instead of 0.25, the convention of GPTQ / Marlin kernels). Stored scales
are clamped into the dtype's normal range [tiny, max] (a zero group gets the tiny scale and code = zero
point, so it dequantizes to exact zeros, never NaN) and rounded UP to the next representable value, and
the codes are computed with the stored scale: the half-step bound holds for the numbers kernels read.
Only weights beyond max * (qmax + 1/2) (float16: ~4.9e5) are clamped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GROUPS = (32, 64, 128)  # group sizes besides K that kernels accept
SCALE_DTYPES = (torch.float32, torch.float16)


@dataclass
class QuantWeight:
    """A packed weight-only quantized linear weight in kiln's format (see the module docstring)."""

    qweight: torch.Tensor  # uint8 [N, K] (bits 8) or [N, K // 2] (bits 4)
    scales: torch.Tensor  # float32 / float16 [N, K // group]
    zeros: torch.Tensor | None  # uint8 [N, K // group]; None: symmetric, zero point 2**(bits - 1)
    bits: int
    group: int
    shape: tuple[int, int]  # (N, K) of the float weight
    perm: torch.Tensor | None = None  # int64 [K]: packed column j is input feature perm[j] (module docstring)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def zero_point(self) -> torch.Tensor:
        """The zero points as float32 [N, K // group] (the stored zeros, or 2**(bits - 1) everywhere)."""
        if self.zeros is not None:
            return self.zeros.float()
        return torch.full(self.scales.shape, float(2 ** (self.bits - 1)), device=self.scales.device)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight, scales and zeros together."""
        ts = [t for t in (self.qweight, self.scales, self.zeros, self.perm) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    def rows(self, start: int, end: int) -> QuantWeight:
        """Output rows [start, end) of this weight (views of its codes, scales and zeros: nothing copied)."""
        z = self.zeros[start:end] if self.zeros is not None else None
        return QuantWeight(self.qweight[start:end], self.scales[start:end], z, self.bits, self.group, (end - start, self.shape[1]),
                           self.perm)

    def to(self, device) -> QuantWeight:
        """This weight's tensors on ``device``."""
        def move(t):
            return None if t is None else t.to(device)
        return QuantWeight(move(self.qweight), move(self.scales), move(self.zeros), self.bits, self.group, self.shape,
                           move(self.perm))

    def check(self) -> QuantWeight:
        """Raise ValueError naming the first thing that breaks the format; return self when valid."""
        check_layout(self.bits, self.group, self.shape)
        n, k = self.shape
        g = k // self.group
        _expect("qweight", self.qweight, (torch.uint8,), (n, k if self.bits == 8 else k // 2))
        _expect("scales", self.scales, SCALE_DTYPES, (n, g))
        if self.zeros is not None:
            _expect("zeros", self.zeros, (torch.uint8,), (n, g))
            if self.zeros.numel() and int(self.zeros.max()) > 2 ** self.bits - 1:
                raise ValueError(f"zeros: a zero point {int(self.zeros.max())} > {2 ** self.bits - 1} for {self.bits} bits")
        if self.perm is not None:
            _expect("perm", self.perm, (torch.int64,), (k,))
            if not torch.equal(torch.sort(self.perm).values, torch.arange(k, device=self.perm.device)):
                raise ValueError(f"perm: not a permutation of 0..{k - 1}")
        devices = {t.device for t in (self.qweight, self.scales, self.zeros, self.perm) if t is not None}
        if len(devices) > 1:
            raise ValueError(f"qweight, scales, zeros and perm are on different devices: {sorted(map(str, devices))}")
        if not bool(torch.isfinite(self.scales).all() and (self.scales > 0).all()):
            raise ValueError("scales: every scale must be finite and > 0")
        return self


def check_layout(bits: int, group: int, shape) -> None:
    """Raise ValueError unless (bits, group, (N, K)) is a layout of the format."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"shape must be (N, K) with N, K > 0, got {tuple(shape)}")
    k = shape[1]
    if group != k and group not in GROUPS:
        raise ValueError(f"group must be K ({k}) or one of {GROUPS}, got {group}")
    if k % group:
        raise ValueError(f"K = {k} is not a multiple of group = {group}")
    if bits == 4 and k % 2:
        raise ValueError(f"4-bit weights need an even K (two codes per byte), got K = {k}")


def _expect(name: str, t, dtypes, shape) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} dtype must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} shape must be {tuple(shape)}, got {tuple(t.shape)}")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] in 0..15 -> uint8 [..., K // 2]: byte j = codes[2j] | codes[2j + 1] << 4."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack_int4 takes uint8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got {codes.shape[-1]}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"pack_int4: a code {int(codes.max())} > 15")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] -> uint8 codes [..., K] (the inverse of ``pack_int4``)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 takes uint8, got {packed.dtype}")
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def codes_of(qw: QuantWeight) -> torch.Tensor:
    """The unpacked uint8 codes [N, K] of ``qw``."""
    return unpack_int4(qw.qweight) if qw.bits == 4 else qw.qweight


def dequantize(qw: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w[n, k] = (q[n, k] - zero[n, k // group]) * scale[n, k // group] -> [N, K] in ``dtype``, in the float
    weight's column order (a ``perm``'s packed column j is column perm[j]).

    Computed in float32 like the kernels (float64 when ``dtype`` is float64): the reference kernels are
    tested against."""
    qw.check()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n, k = qw.shape
    q = codes_of(qw).to(acc).reshape(n, k // qw.group, qw.group)  # [N, G, group]: each group's scale and zero broadcast
    w = ((q - qw.zero_point().to(acc)[..., None]) * qw.scales.to(acc)[..., None]).reshape(n, k)
    if qw.perm is not None:
        w = w[:, torch.argsort(qw.perm)]
    return w.to(dtype)


def default_scale_dtype(group: int, k: int) -> torch.dtype:
    """float32 for per-channel scales (group == K), float16 for grouped ones (see the module docstring)."""
    return torch.float32 if group == k else torch.float16


def fit_grid(w: torch.Tensor, bits: int, group: int, symmetric: bool, scale_dtype: torch.dtype):
    """The grid of each (row, group) of w [N, G * group]: (scales [N, G] in ``scale_dtype``, zero points
    [N, G] float32 holding integers). Formulas in the module docstring."""
    n = w.shape[0]
    wg = w.double().reshape(n, -1, group)  # [N, G, group]; float64 so that rounding the scale up is exact
    hi = wg.amax(-1).clamp_min(0)  # [N, G]
    lo = wg.amin(-1).clamp_max(0)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = _store_scale(torch.maximum(hi / (qmax + 0.5), -lo / (qmax + 1.5)), scale_dtype)
        return scale, torch.full(hi.shape, float(qmax + 1), device=w.device)
    scale = _store_scale((hi - lo) / (2 ** bits - 1), scale_dtype)
    zero = torch.round(-lo / scale.double()).clamp(0, 2 ** bits - 1)
    return scale, zero.float()


def _store_scale(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 scales -> ``dtype``, clamped into its normal range and rounded up (never a finer step)."""
    if dtype not in SCALE_DTYPES:
        raise ValueError(f"scale dtype must be float32 or float16, got {dtype}")
    info = torch.finfo(dtype)
    s = s.clamp(info.tiny, info.max)
    t = s.to(dtype)
    return torch.where(t.double() < s, torch.nextafter(t, torch.full_like(t, info.max)), t)


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes clamp(round(w / scale) + zero, 0, 2**bits - 1) as float32; scale, zero broadcast against w.

    The quotient is float64: a float32 one can land past a rounding boundary by ~2**bits ulps."""
    return (torch.round(w.double() / scale.double()) + zero).clamp(0, 2 ** bits - 1).float()


def from_codes(codes: torch.Tensor, scales: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
               symmetric: bool) -> QuantWeight:
    """Assemble (and check) a QuantWeight from float codes [N, K], scales [N, G] and zero points [N, G]."""
    q = codes.to(torch.uint8)
    qweight = pack_int4(q) if bits == 4 else q
    zeros = None if symmetric else zero.to(torch.uint8)
    return QuantWeight(qweight, scales, zeros, bits, group, tuple(codes.shape)).check()


def quantize_rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool,
                 scale_dtype: torch.dtype | None = None) -> QuantWeight:
    """Round-to-nearest: w [N, K] -> QuantWeight, q = clamp(round(w / s) + zero, 0, 2**bits - 1) per group.

    Every weight ends within half a step of its dequantized value (see the module docstring)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_rtn takes a weight [N, K], got shape {tuple(w.shape)}")
    check_layout(bits, group, tuple(w.shape))
    if not bool(torch.isfinite(torch.stack((w.amax(), w.amin()))).all()):  # (NaN propagates through both; no [N, K] mask)
        raise ValueError("quantize_rtn: the weight has non-finite values")
    scale_dtype = scale_dtype or default_scale_dtype(group, w.shape[1])
    scales, zero = fit_grid(w, bits, group, symmetric, scale_dtype)  # [N, G]
    n, k = w.shape  # (each group's scale and zero broadcast over its [N, G, group] view: no [N, K] copies of them)
    codes = round_to_grid(w.reshape(n, k // group, group), scales.float()[..., None], zero[..., None], bits).reshape(n, k)
    return from_codes(codes, scales, zero, bits, group, symmetric)


# ----------------------------------------------------------------------------- activation-quantized formats (W8A8, FP8)
#
# Weights AND activations are quantized symmetrically, one scale per row: a weight [N, K] per output channel (at
# compile time), an activation [..., K] per token (at run time, from that row's values: dynamic):
#
#     s = max(amax |t_row| / qmax, tiny)            (float32; qmax 127 for int8, 448 for fp8 e4m3; a zero row: tiny)
#     int8:  q = clamp(round(t / s), -127, 127)     (round half to even; -128 unused: the grid is symmetric)
#     fp8:   q = e4m3(clamp(t / s, -448, 448))      (torch.float8_e4m3fn, rounded to nearest even)
#     t ~ q * s
#
# A matmul of two such operands is exact integer (or fp8 product) arithmetic scaled once per output element:
# x W^T ~ (qx qw^T) * s_x[m] * s_w[n], the row scale of x times the column scale of W (the GEMM's epilogue).

ACT_FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}


def quantize_rows(t: torch.Tensor, fmt: str, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """t [..., K] -> (codes [..., K] in the format's dtype, scales [...]), one symmetric scale per row (see above).
    ``group=G`` (dividing K): a scale per row and G columns, scales [..., K / G] (fine-grained, as DeepSeek-V3's
    1 x 128 activation blocks: each group quantized as a row of its own).

    Scales are float32 (float64 for float64 t: the interpreter's float64 mode); the division is one IEEE rounding,
    as in the kernels, so a kernel's codes equal these."""
    if group is not None:
        if group <= 0 or t.shape[-1] % group:
            raise ValueError(f"quantize_rows: group {group} does not divide the rows' {t.shape[-1]} columns")
        codes, scales = quantize_rows(t.reshape(*t.shape[:-1], t.shape[-1] // group, group), fmt)
        return codes.reshape(t.shape), scales
    dtype, qmax = ACT_FORMATS[fmt]
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    t = t.to(acc)
    amax = t.abs().amax(-1)  # [...]
    # a tensor divisor: CUDA divides by a python scalar as a multiply by its reciprocal, not one IEEE division
    scale = (amax / torch.full_like(amax, qmax)).clamp_min(torch.finfo(torch.float32).tiny)
    v = (t / scale[..., None]).clamp(-qmax, qmax)
    return (torch.round(v) if fmt == "int8" else v).to(dtype), scale


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [..., K] * scales [...] per row, in ``dtype``; scales [..., K / G]: a scale per G columns."""
    if scales.dim() == codes.dim():
        g = codes.shape[-1] // scales.shape[-1]
        return (codes.to(dtype).unflatten(-1, (scales.shape[-1], g)) * scales.to(dtype)[..., None]).flatten(-2)
    return codes.to(dtype) * scales.to(dtype)[..., None]
