"""ir.fx (importer + aten handlers): every handler family compiled with kiln.compile against eager torch.

Op coverage (irregular shapes, python-scalar operands, dtype promotion), dynamic shapes, the one
error that lists every unsupported op with its source line, and tiny HF / diffusers models.
"""
from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

import kiln
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

_GEN = torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=_GEN).to(dtype)


def randint(*shape, lo=0, hi=10, dtype=torch.int64):
    return torch.randint(lo, hi, shape, generator=_GEN, dtype=dtype)


def randbool(*shape):
    return torch.rand(*shape, generator=_GEN) < 0.5


def assert_matches(got, want):
    """Same structure, dtype and shape; floats within TOL[dtype], everything else exact."""
    gl, gspec = pytree.tree_flatten(got)
    wl, wspec = pytree.tree_flatten(want)
    assert gspec == wspec, f"output structure {gspec}, eager {wspec}"
    for i, (g, w) in enumerate(zip(gl, wl)):
        assert isinstance(g, torch.Tensor), f"output {i} is a {type(g).__name__}"
        assert g.dtype == w.dtype, f"output {i}: dtype {g.dtype}, eager {w.dtype}"
        assert g.shape == w.shape, f"output {i}: shape {tuple(g.shape)}, eager {tuple(w.shape)}"
        if w.is_floating_point():
            err = rel_err(g, w)
            assert err <= TOL[w.dtype], f"output {i}: rel err {err:.3g}"
        else:
            assert torch.equal(g, w), f"output {i} differs:\n{g}\n{w}"


def compile_and_check(fn, args, **kw):
    """kiln.compile(fn, args, **kw) run on ``args`` matches eager; returns the compiled model."""
    with torch.no_grad():
        want = fn(*args)
    m = kiln.compile(fn, args, **kw)
    assert_matches(m(*args), want)
    return m


def line_of(fn, text: str) -> int:
    """The line number of the first source line of ``fn`` that contains ``text``."""
    lines, first = inspect.getsourcelines(fn)
    for k, line in enumerate(lines):
        if text in line:
            return first + k
    raise AssertionError(f"{text!r} not in the source of {fn.__name__}")


# ----------------------------------------------------------------------------- op coverage

x357 = randn(3, 5, 7)
y357 = randn(3, 5, 7)
x57 = randn(5, 7)
pos357 = randn(3, 5, 7).abs() + 0.1
i357 = randint(3, 5, 7, lo=-20, hi=20)
j357 = randint(3, 5, 7, lo=1, hi=9)
i32_357 = randint(3, 5, 7, lo=-20, hi=20, dtype=torch.int32)
b357 = randbool(3, 5, 7)
c357 = randbool(3, 5, 7)
b57 = randbool(5, 7)
nan357 = torch.where(b357, torch.nan, x357)
scalar_t = torch.tensor(0.75)
x6 = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(6)) * 2 + 1  # [N, C, H, W]: a mean off zero


def perturbed(module: nn.Module) -> nn.Module:
    """Norms init to ones / zeros and zero-init biases hide bugs: move every parameter."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval()


def _setitem(x, v, m):
    """Functionalised into select_scatter / slice_scatter."""
    y = x.clone()
    y[:, 0] = v
    y[1:, :, 2:5] = 0.5
    y[..., -1] = 2
    y[:, -2:] = y[:, :2] * 3
    y[:, 10:] = 1.0  # empty
    n = m.clone()
    n[0] = True
    return y, n


def _fill(x, i):
    """fill_ / zero_ become aten.fill / aten.zero."""
    y = torch.empty_like(x)
    y.fill_(1.5)
    w = torch.zeros(7)
    w.fill_(x[0, 0, 0])  # a 0-d tensor value
    return y * x, i.clone().zero_(), i.clone().fill_(2.7), w


# id -> (function or module, example args). Each entry is one compile: related variants share one
# function returning a tuple, which keeps the file fast (a compile costs ~0.2 s, mostly torch.export).
OPS = {
    # unary
    "unary": (lambda x: (-x, x.abs(), x.exp(), torch.sin(x), torch.cos(x), torch.tanh(x), torch.sigmoid(x),
                         torch.erf(x), F.relu(x), F.silu(x), torch.floor(x * 3), torch.ceil(x * 3), torch.square(x)),
              (x357,)),
    "unary_positive": (lambda x: (x.log(), x.sqrt(), x.rsqrt(), x.reciprocal(), 1 / x), (pos357,)),
    "unary_int": (lambda i: (-i, i.abs(), torch.square(i)), (i357,)),
    "unary_of_int_is_float": (lambda i: (i.exp(), torch.sigmoid(i), i.sqrt()), (j357,)),
    "gelu": (lambda x: (F.gelu(x), F.gelu(x, approximate="tanh"), nn.GELU("tanh")(x)), (x357,)),
    "logical_not_isnan": (lambda x, m: (torch.logical_not(x), ~m, torch.isnan(x), x.isnan().logical_not()),
                          (nan357.nan_to_num(0.0), b357)),
    "isinf_isfinite": (lambda x, i: (torch.isinf(x), torch.isposinf(x), torch.isneginf(x), torch.isfinite(x), torch.isinf(i),
                                     torch.isfinite(i), torch.where(torch.isinf(x), 0.0, x)),
                       (torch.tensor([[1.0, float("inf"), -float("inf"), float("nan"), -0.0, 3e38]]), i357)),
    # binary arithmetic and promotion
    "add_sub_mul_div": (lambda x, y: (x + y, x - y, x * y, x / (y.abs() + 1), torch.true_divide(x, 2)), (x357, y357)),
    "broadcast": (lambda x, y: (x + y, x * y[0], y[:, :1] - x), (randn(3, 1, 7), x57)),
    "alpha": (lambda x, y: (torch.add(x, y, alpha=0.5), torch.sub(x, y, alpha=2), torch.sub(x, 2, alpha=3)), (x357, y357)),
    "alpha_int": (lambda i, j: (torch.sub(i, j, alpha=3), torch.add(i, j, alpha=2)), (i357, j357)),
    "python_scalars": (lambda x: (x + 2, x - 0.5, 3 * x, x / 4, x ** 2), (x357,)),
    "rsub": (lambda x, y, i: (2 - x, torch.rsub(x, y, alpha=2), torch.rsub(x, 3), 1.5 - i, 1 - i), (x357, y357, i357)),
    "int_times_float": (lambda i, k: (i * 1.5, k + 0.5, i * 2, k * i), (i357, i32_357)),
    "int_floordiv": (lambda i, j: (i // 2, i // -3, i // j, torch.floor_divide(i, j)), (i357, j357)),
    "float_floordiv": (lambda x, y: (x // 0.3, x // y), (x357, y357)),
    "int_truediv": (lambda i, j: (i / 2, i / j, 3 / j), (i357, j357)),
    "float_div_int_tensor": (lambda x, j: (x / j, j / x), (x357, j357)),
    "div_rounding": (lambda x, y: (torch.div(x, y, rounding_mode="floor"), torch.div(x, y, rounding_mode="trunc")),
                     (x357, y357)),
    "div_rounding_int": (lambda i, j: (torch.div(i, j, rounding_mode="trunc"), torch.div(i, j, rounding_mode="floor"),
                                       torch.div(i, 3, rounding_mode="floor"), torch.div(i, 2.5, rounding_mode="floor")),
                         (i357, j357)),
    "remainder": (lambda i, x, y: (i % 3, i % -4, torch.remainder(x, y.abs() + 0.5), x % 0.7), (i357, x357, y357)),
    "mixed_dtypes": (lambda i, k, m, x: (k + i, i + m, x * m, m + m, k * 2.5), (i357, i32_357, b357, x357)),
    "half": (lambda x, y: (x.half() * 3 + 1, x.half() + y, x.half() / 3), (x357, y357)),
    "zero_dim_tensor": (lambda x, i, s: (x + s, x.half() + s, i + s, i * torch.tensor(3)), (x357, i357, scalar_t)),
    "maximum_minimum": (lambda x, y, i: (torch.maximum(x, y), torch.minimum(x, y), torch.max(x, y), torch.min(x, y),
                                         torch.maximum(i, x)), (x357, y357, i357)),
    # pow
    "pow": (lambda x, p, y: (x ** 2, p ** 0.5, torch.pow(p, -1.5), 2 ** x, torch.pow(p, y), x ** 3.0), (x357, pos357, y357)),
    "pow_int": (lambda i, j: (i ** 2, j ** 0.5, 2 ** j, torch.pow(2.5, j), j ** j), (i357, randint(3, 5, 7, lo=0, hi=6))),
    # comparisons and logic
    "compare": (lambda x, y: (x == y, x != y, x < y, x <= y, x > y, x >= y),
                (randint(3, 5, 7, hi=3).float(), randint(3, 5, 7, hi=3).float())),
    "compare_scalar": (lambda x, i: (x > 0.5, x <= -0.5, x == 0, x != 1, i >= 2.5, i < 3, i == -1), (x357, i357)),
    "compare_mixed": (lambda i, x, m: (i < x, x >= i, m == i, m != x), (i357, x357 * 10, b357)),
    "logical": (lambda a, b, x: (torch.logical_and(a, b), torch.logical_or(a, b), torch.logical_xor(a, b),
                                 torch.logical_and(x, b), torch.logical_or(x, x > 1)), (b357, c357, x357.round())),
    "bitwise": (lambda a, b, i, j: ((a & b) ^ (a | ~b), i & j, i | j, i ^ 5), (b357, c357, i357, j357)),
    # where / masked_fill
    "where": (lambda m, x, y: (torch.where(m, x, y), torch.where(m, x, 0.0), torch.where(m, -1.5, x)), (b357, x357, y357)),
    "where_scalars": (lambda m: (torch.where(m, 1.0, 0.0), torch.where(m, 3, -2), torch.where(m, True, False)), (b357,)),
    "where_promotion": (lambda m, i, x: (torch.where(m, i, x), torch.where(m, i, 0.5), torch.where(m, x.half(), x),
                                         torch.where(m, 2, x)), (b357, i357, x357)),
    "where_broadcast": (lambda m, x: (torch.where(m, x, x.mean(-1, keepdim=True)), torch.where(x > 0, x, -x)), (b57, x357)),
    "masked_fill": (lambda x, m, n: (x.masked_fill(m, float("-inf")), x.masked_fill(n, 0.25), x.masked_fill(m, -1)),
                    (x357, b357, b57)),
    "masked_fill_softmax": (lambda x, m: x.masked_fill(m, float("-inf")).softmax(-1), (x357, b357 & torch.arange(7).ne(0))),
    "masked_fill_tensor_int": (lambda x, m, v, i: (x.masked_fill(m, v), i.masked_fill(m, -1), i.masked_fill(m, 2.0),
                                                   m.masked_fill(i > 0, 1), x.half().masked_fill(m, v)),
                               (x357, b357, scalar_t, i357)),
    # clamp
    "clamp": (lambda x: (x.clamp(-0.5, 0.7), x.clamp(min=0.1), torch.clamp(x, max=-0.2), x.clamp_min(0), x.clamp_max(0.5)),
              (x357,)),
    "clamp_tensors": (lambda x, lo, hi: (torch.clamp(x, lo, lo + hi.abs()), x.clamp_min(lo), torch.clamp(x, max=hi)),
                      (x357, y357, x57)),
    "clamp_int": (lambda i: (i.clamp(-3, 4), i.clamp(-2.5, 3.5), i.clamp(min=0)), (i357,)),
    # reductions
    "sum": (lambda x: (x.sum(), x.sum(1), x.sum((0, -1), keepdim=True), x.sum([]), torch.sum(x, -1, keepdim=True)), (x357,)),
    "sum_int_bool": (lambda k, m: (k.sum(-1), m.sum(1), m.sum(), k.sum()), (i32_357, b357)),
    "sum_dtype": (lambda x, i: (x.sum(-1, dtype=torch.float64), torch.sum(i, 0, dtype=torch.float32), x.sum(dtype=torch.float64)),
                  (x357, i357)),
    "mean": (lambda x: (x.mean(), x.mean((1, 2), keepdim=True), x.mean(-2), x.half().mean(-1, dtype=torch.float32)), (x357,)),
    "amax_amin": (lambda x: (x.amax(-1), x.amin((0, 2)), x.amax((0, 1), keepdim=True), x.amax(), x.max(), x.min()), (x357,)),
    "amax_int": (lambda i: (i.amax(1), i.amin(-1, keepdim=True), i.max()), (i357,)),
    "prod": (lambda x, i: (x.prod(1), (x * 0.1 + 1).prod(), i.prod(-1, keepdim=True)), (x357, randint(3, 5, 4, lo=-3, hi=3))),
    "any_all": (lambda m, x: (m.any(-1), m.all(-1), m.any((0, 2)), m.all(dim=(0, 2)), m.any(), m.all(),
                              (x > 1).any(1, keepdim=True), x.bool().all(0)), (b357 | c357, x357)),
    "max_min_dim": (lambda x: (*x.max(dim=1), *x.min(-1, keepdim=True), *torch.max(x, 0)), (x357,)),
    "max_min_dim_int": (lambda i: (*i.max(-1), *i.min(1, keepdim=True)), (randint(3, 5, 7, hi=1000),)),
    "argmax_argmin": (lambda x: (torch.argmax(x), x.argmax(-1), x.argmax(1, keepdim=True), torch.argmax(x, keepdim=True),
                                 x.argmin(0), x.argmin()), (x357,)),
    "var_std": (lambda x: (x.var(-1, keepdim=True, unbiased=False), x.std(), *torch.var_mean(x, (0, 2), correction=0),
                           *torch.std_mean(x, 1), x.var((0, 1), correction=2, keepdim=True), x.half().var(-1)), (x357,)),
    "vector_norm": (lambda x: (x.norm(dim=-1), F.normalize(x, dim=-1), x.norm(p=2), torch.linalg.vector_norm(x, dim=(0, 2), keepdim=True),
                               torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)), (x357,)),
    "cumsum": (lambda x, k, m: (x.cumsum(1), torch.cumsum(x, -1), k.cumsum(-1), m.cumsum(-1), x.cumsum(0, dtype=torch.float64)),
               (x357, i32_357, b357)),
    "softmax": (lambda x: (x.softmax(-1), F.softmax(x, dim=0), F.log_softmax(x, 1), x.log_softmax(-1, dtype=torch.float64)),
                (x357,)),
    "softmax_half": (lambda x: (F.softmax(x.half(), -1, dtype=torch.float32), F.softmax(x.half(), 1),
                                F.log_softmax(x.bfloat16(), -1, dtype=torch.float32)), (x357,)),
    # norms
    "layer_norm": (lambda x, w, b, w2, b2: (F.layer_norm(x, (7,), w, b, eps=1e-3), F.layer_norm(x, (7,)),
                                            F.layer_norm(x, (7,), w), F.layer_norm(x, (5, 7), w2, b2)),
                   (x357, randn(7), randn(7), randn(5, 7), randn(5, 7))),
    "layer_norm_bias_only": (lambda x, b: F.layer_norm(x, (7,), None, b), (x357, randn(7))),
    "layer_norm_module": (perturbed(nn.LayerNorm(7)), (x357,)),
    "layer_norm_module_no_affine": (nn.LayerNorm(7, elementwise_affine=False), (x357,)),
    "rms_norm": (lambda x, w, w2: (F.rms_norm(x, (7,), w, eps=1e-6), F.rms_norm(x, (7,)), F.rms_norm(x, (5, 7), w2, eps=1e-5)),
                 (x357, randn(7), randn(5, 7))),
    "rms_norm_module": (perturbed(nn.RMSNorm(7, eps=1e-5)), (x357,)),
    # eps=None is float32's eps for half types (torch computes in float32): small inputs tell it from bf16's
    "rms_norm_bf16": (lambda x, w: (F.rms_norm(x, (7,), w, eps=1e-6), F.rms_norm(x, (7,)), F.rms_norm(x, (7,), w)),
                      (randn(3, 5, 7, dtype=torch.bfloat16) * 0.05, randn(7, dtype=torch.bfloat16))),
    "rms_norm_half": (lambda x, w: (F.rms_norm(x, (7,), w, eps=1e-6), F.rms_norm(x, (7,))),
                      (randn(3, 5, 7, dtype=torch.float16) * 0.02, randn(7, dtype=torch.float16))),
    # linear algebra
    "linear": (lambda x, w, b, v: (F.linear(x, w, b), F.linear(x, w), F.linear(v, w, b)), (x357, randn(6, 7), randn(6), randn(7))),
    "linear_module": (perturbed(nn.Linear(7, 3)), (x357,)),
    "matmul": (lambda x, w, a, b, v: (x @ w, torch.matmul(a, b), x @ v, v @ x.transpose(-1, -2), v @ v),
               (x357, randn(7, 4), randn(2, 1, 5, 7), randn(3, 7, 4), randn(7))),
    "mm_bmm": (lambda a, b, c, d: (torch.mm(a, b), torch.bmm(c, d), a.t() @ a), (x57, randn(7, 3), x357, randn(3, 7, 2))),
    "addmm": (lambda b, b2, m1, m2: (torch.addmm(b, m1, m2, beta=0.5, alpha=2.0), torch.addmm(b2, m1, m2),
                                     torch.addmm(b, m1, m2, beta=0)), (randn(3), randn(5, 3), x57, randn(7, 3))),
    "baddbmm": (lambda b, m1, m2: (torch.baddbmm(b, m1, m2, beta=0.25, alpha=-1.0), torch.baddbmm(b, m1, m2),
                                   torch.addbmm(b, m1, m2)), (randn(5, 2), x357, randn(3, 7, 2))),
    "outer": (lambda u, v, i: (torch.outer(u, v), torch.ger(v, v), torch.outer(i, u)), (randn(5), randn(7), randint(3))),
    "t": (lambda a, v: (a.t(), v.t() * 2, a.T, a.mT), (x57, randn(7))),
    # convolution
    "conv2d": (lambda x, w, b: (F.conv2d(x, w, b), F.conv2d(x, w, stride=2, padding=1), F.conv2d(x, w, b, stride=(2, 1), padding=(0, 2))),
               (randn(2, 3, 9, 11), randn(4, 3, 3, 3), randn(4))),
    "conv2d_same_dilation": (lambda x, w: (F.conv2d(x, w, padding="same", dilation=2), F.conv2d(x, w, padding="same"),
                                           F.conv2d(x, w, padding="valid", dilation=(2, 1))), (randn(1, 3, 9, 11), randn(4, 3, 3, 5))),
    "conv2d_groups": (lambda x, w, b, wd: (F.conv2d(x, w, b, padding=1, groups=2), F.conv2d(x, wd, padding=2, dilation=2, groups=4)),
                      (randn(2, 4, 7, 6), randn(6, 2, 3, 3), randn(6), randn(4, 1, 3, 3))),
    "conv2d_same_even": (lambda x, w, w2: (F.conv2d(x, w, padding="same"), F.conv2d(x, w2, padding="same", dilation=(1, 2))),
                         (randn(2, 3, 9, 11), randn(4, 3, 2, 2), randn(4, 3, 2, 3))),
    "conv2d_unbatched": (lambda x, w, b: (F.conv2d(x, w, b, padding=1), F.conv2d(x, w, padding="same")),
                         (randn(3, 9, 11), randn(4, 3, 3, 3), randn(4))),
    "conv2d_module_patchify": (perturbed(nn.Conv2d(3, 8, kernel_size=2, stride=2)), (randn(2, 3, 8, 10),)),
    "conv1d": (lambda x, w, b, wd: (F.conv1d(x, w, b, padding=1), F.conv1d(x, w, stride=2), F.conv1d(x, w, b, padding="same"),
                                     F.conv1d(x, wd, padding=2, dilation=2, groups=4), F.conv1d(x, w[:, :, :2], padding="same")),
               (randn(2, 4, 11), randn(6, 4, 3), randn(6), randn(4, 1, 3))),
    "conv1d_unbatched": (lambda x, w, b: (F.conv1d(x, w, b, stride=2, padding=1), F.conv1d(x, w, padding="same")),
                         (randn(4, 10), randn(5, 4, 3), randn(5))),
    "conv1d_module": (perturbed(nn.Conv1d(4, 5, kernel_size=3, stride=2, padding=1)), (randn(2, 4, 10),)),
    # adaptive average pooling (poolers)
    "adaptive_avg_pool": (lambda x: (F.adaptive_avg_pool1d(x[:, 0], 1), F.adaptive_avg_pool1d(x[:, 0], 3), F.adaptive_avg_pool2d(x, 1),
                                     F.adaptive_avg_pool2d(x, (2, None)), F.adaptive_avg_pool2d(x, (1, 6)), nn.AdaptiveAvgPool2d((2, 3))(x)),
                          (randn(2, 3, 4, 6),)),
    # attention
    "sdpa": (lambda q, k, v: (F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, scale=0.3)),
             (randn(2, 3, 5, 8), randn(2, 3, 7, 8), randn(2, 3, 7, 6))),
    "sdpa_causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                    (randn(2, 3, 7, 8), randn(2, 3, 7, 8), randn(2, 3, 7, 8))),
    "sdpa_causal_rectangular": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                (randn(2, 3, 4, 8), randn(2, 3, 7, 8), randn(2, 3, 7, 8))),
    "sdpa_masks": (lambda q, k, v, mb, mf: (F.scaled_dot_product_attention(q, k, v, attn_mask=mb),
                                            F.scaled_dot_product_attention(q, k, v, attn_mask=mf)),
                   (randn(2, 3, 5, 8), randn(2, 3, 7, 8), randn(2, 3, 7, 8),
                    randbool(2, 1, 5, 7) | torch.eye(5, 7, dtype=torch.bool), randn(5, 7))),
    "sdpa_gqa": (lambda q, k, v: (F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                                  F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5, enable_gqa=True)),
                 (randn(2, 6, 7, 8), randn(2, 2, 7, 8), randn(2, 2, 7, 8))),
    "sdpa_gqa_mask": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
                      (randn(2, 4, 5, 8), randn(2, 2, 7, 8), randn(2, 2, 7, 8), randn(2, 1, 5, 7))),
    "sdpa_3d": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), (randn(3, 5, 8), randn(3, 7, 8), randn(3, 7, 8))),
    "sdpa_half": (lambda q, k, v: F.scaled_dot_product_attention(q.half(), k.half(), v.half(), is_causal=True).float(),
                  (randn(1, 2, 6, 8), randn(1, 2, 6, 8), randn(1, 2, 6, 8))),
    # gathers
    "embedding": (lambda ids, w: (F.embedding(ids, w), F.embedding(ids.int(), w)), (randint(3, 5, hi=11), randn(11, 6))),
    "embedding_module": (perturbed(nn.Embedding(11, 6)), (randint(3, 5, hi=11),)),
    "index": (lambda x, i, j: (x[i], x[:, j], x[..., i], x[:, :, -1 - i]), (x357, randint(4, hi=3), randint(2, 3, hi=5))),
    "index_two_tensors": (lambda x, i, j, k: (x[i, :, j], x[:, k, j], x[i, k[0]], x[i[:, None], :, j]),
                          (x357, randint(4, hi=3), randint(4, lo=-7, hi=7), randint(2, 1, hi=5))),
    "index_int32_2d": (lambda x, a, i: (x[:, i], a[i.long().view(2, 2)]), (x357, x57, randint(4, hi=5, dtype=torch.int32))),
    "index_select": (lambda x, i, j: (torch.index_select(x, 1, i), x.index_select(-1, j), x.index_select(0, j[:2] % 3)),
                     (x357, randint(6, hi=5), randint(3, hi=7))),
    "gather": (lambda x, i, j: (torch.gather(x, 1, i), x.gather(-1, j), x.gather(0, j[:2] % 3)),
               (x357, randint(3, 2, 7, hi=5), randint(3, 5, 3, hi=7))),
    "select": (lambda x, i: (x[1], x[:, -2], x[..., -1], x.select(0, -3), i[:, 0, -1]), (x357, i357)),
    # views
    "view_reshape": (lambda x: (x.view(-1, 7), x.view(x.shape[0], -1), x.transpose(0, 1).reshape(5, 21), x.reshape(-1),
                                x.view(105).view_as(x)), (x357,)),
    "flatten_unflatten": (lambda x: (x.flatten(1), x.flatten(), torch.flatten(x, 0, 1), x.unflatten(-1, (1, 7)),
                                     x.unflatten(0, (3, 1)), x.unflatten(2, (-1, 1))), (x357,)),
    "squeeze_unsqueeze": (lambda x: (x.squeeze(), x.squeeze(1), x.squeeze(-1), x.squeeze((1, 3)), x.squeeze(0),
                                     x.unsqueeze(-1), x.unsqueeze(0), x[:, None], x[None, ..., None]), (randn(3, 1, 5, 1),)),
    "permute_transpose": (lambda x: (x.permute(2, 0, 1), x.permute(-1, -3, -2), x.transpose(0, 2), x.transpose(-1, -2),
                                     x.swapaxes(-2, -1), x.transpose(1, 1) + 1, x.mT), (x357,)),
    "movedim": (lambda x: (x.movedim(0, -1), torch.movedim(x, (2, 0), (0, 1)), x.moveaxis(-1, 0)), (x357,)),
    "expand": (lambda x, y: (x.expand(4, 3, 5, 7), x.expand(-1, 5, -1), x.expand_as(y) + y, x[:, :1].broadcast_to(3, 4, 7)),
               (randn(3, 1, 7), x357)),
    "repeat_interleave_tile": (lambda x, i: (x.repeat_interleave(2, dim=1), torch.repeat_interleave(i, 3), x.repeat_interleave(2, -1),
                                             x.tile(2), x.tile(2, 1, 1, 1), i.tile((1, 2))), (x357, i357)),
    "repeat": (lambda x, a, i: (x.repeat(2, 1, 3), a.repeat(2, 3, 1), i.repeat(1, 2, 1)), (x357, x57, i357)),
    "slice": (lambda x: (x[:, 1:-1], x[:, ::2, 1::3], x[:, 2:100], x[-100:2], x[..., -1:], x[:, -4:-1:2], x[:, :] + x[:, 0:],
                         x[1:, 1:, 1:], x[:, :, 5:1000:3]), (x357,)),
    "slice_empty": (lambda x: (x[:, 4:2].sum(1), x[:, 6:].sum(1), x[:, 4:2]), (x357,)),
    "narrow": (lambda x: (x.narrow(2, 1, 4), torch.narrow(x, -2, -3, 2), x.narrow(0, 0, 3)), (x357,)),
    "split": (lambda x: (*x.split(2, dim=1), *torch.split(x, [1, 4, 2], dim=-1), *x.split_with_sizes([2, 3], 1)), (x357,)),
    "chunk": (lambda x: (*x.chunk(3, dim=-1), *x.chunk(2, dim=1), *torch.tensor_split(x, 3, dim=2)), (x357,)),
    "split_sum": (lambda x: sum(c.sum((1, 2)) for c in x.chunk(3, dim=-1)) + torch.split(x, [2, 3], 1)[1].mean(), (x357,)),
    "unbind": (lambda x: (*x.unbind(1), sum(x.unbind(-1)), *torch.unbind(x)), (x357,)),
    "cat": (lambda x, y, z: (torch.cat([x, y, x], dim=1), torch.cat((x, z), -1), torch.cat([x]), torch.concat([x, x], 0)),
            (x357, randn(3, 2, 7), randn(3, 5, 2))),
    "cat_mixed_dtypes": (lambda x, i, m, k: (torch.cat([x, i], dim=0), torch.cat([m, k], dim=2), torch.cat([x.half(), x], 0),
                                             torch.cat([k, i], 1)), (x357, i357, b357, i32_357)),
    "stack": (lambda x, y, i: (torch.stack([x, y]), torch.stack((x, y, x), dim=-1), torch.stack([x, i], 1), torch.stack([x])),
              (x357, y357, i357)),
    "pad": (lambda x: (F.pad(x, (1, 2)), F.pad(x, (0, 1, 2, 0), value=-1.5), F.pad(x, (1, 1, 0, 2, 3, 0), "constant", 0.5),
                       F.pad(x, (0, 0, 1, 0))), (x357,)),
    "pad_int_bool": (lambda i, m: (F.pad(i, (2, 0), value=7), F.pad(m, (1, 1)), F.pad(m, (1, 0), value=True)), (i357, b357)),
    "triu_tril": (lambda x, m: (torch.triu(x), torch.tril(x, -1), x.triu(2), x.tril(diagonal=1), m.tril(), m.triu(-2),
                                torch.ones(5, 7, dtype=torch.bool).tril()), (x357, b57)),
    "diff": (lambda x, p, a: (torch.diff(x), torch.diff(x, prepend=p), torch.diff(x, dim=0, append=a), torch.diff(x, n=2, dim=1),
                              torch.diff(x, n=2, prepend=p, append=p)), (x357, randn(3, 5, 2), randn(1, 5, 7))),
    "diff_bool_int": (lambda m, i: (torch.diff(m, dim=-1), torch.diff(m, n=2), torch.diff(i, prepend=torch.zeros(3, 5, 1, dtype=torch.int64)),
                                    torch.diff(i, dim=1, append=i[:, :1])), (b357, i357)),
    # einsum
    "einsum_permute": (lambda x, p: (torch.einsum("abc->cab", x), torch.einsum("nhwpqc->nchpwq", p), torch.einsum("abc->b", x),
                                     torch.einsum("abc->ca", x), torch.einsum("abc->abc", x)),
                       (x357, randn(2, 3, 4, 2, 2, 5))),
    "einsum_bmm": (lambda a, b: (torch.einsum("bij,bjk->bik", a, b), torch.einsum("bij,bjk->bki", a, b)), (x357, randn(3, 7, 4))),
    "einsum_summed_away": (lambda a, b, c: (torch.einsum("bij,bjk->bi", a, b), torch.einsum("ij,kl->ik", a[0], c),
                                            torch.einsum("bij,bjk->", a, b)), (x357, randn(3, 7, 4), randn(4, 2))),
    "einsum_outer_dot": (lambda u, v, a: (torch.einsum("i,j->ij", u, v), torch.einsum("bi,i->b", a, v), torch.einsum("i,i->", v, v),
                                          torch.einsum("i j , j k -> k i", a, a.t())), (randn(5), randn(7), x57)),
    "einsum_ellipsis": (lambda x, w, v: (torch.einsum("...ij->...ji", x), torch.einsum("...d,de->...e", x, w),
                                         torch.einsum("b...,b...->b", x, x), torch.einsum("...i,...j->...ij", v, v),
                                         torch.einsum("bhi,...i->bh...", x, v[None])), (x357, randn(7, 3), randn(4, 7))),
    "einsum_attention": (lambda q, k, v: torch.einsum("bhqk,bhkd->bqhd", torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1), v),
                         (randn(2, 3, 5, 8), randn(2, 3, 7, 8), randn(2, 3, 7, 6))),
    # creation
    "arange": (lambda x: (x + torch.arange(7), x * torch.arange(2, 9), x[:, torch.arange(1, 5, 2)], torch.arange(x.shape[-1]) * x,
                          torch.arange(6, -1, -1) + x, torch.arange(3, 10, 3)), (x357,)),
    "arange_float": (lambda x: (x + torch.arange(0, 1.75, 0.25), x + torch.arange(7, dtype=torch.float32), torch.arange(0.5, 4),
                                torch.arange(1, 8, dtype=torch.float64), torch.arange(5, dtype=torch.int32)), (x357,)),
    "eye": (lambda x: (torch.eye(5), torch.eye(3, 7, dtype=torch.bool), x + torch.eye(5, 7), torch.eye(4, dtype=torch.int64)), (x357,)),
    "full_zeros_ones": (lambda x, i: (x + torch.full((5, 7), 2.5), i + torch.full((7,), 3), torch.full((7,), True),
                                      torch.zeros(3, 5, 7) + x, x * torch.ones(7), torch.zeros(3, dtype=torch.int32),
                                      torch.ones(2, 2, dtype=torch.bool), torch.full((2,), 1.5, dtype=torch.float16)), (x357, i357)),
    "like": (lambda x, i: (torch.zeros_like(x) + 2 * torch.ones_like(x), torch.full_like(x, -3.5), torch.ones_like(i),
                           torch.full_like(i, 4), torch.ones_like(x, dtype=torch.int32), torch.zeros_like(i, dtype=torch.float16)),
             (x357, i357)),
    "new": (lambda x, i: (x.new_ones(2, 3), x.new_zeros((4,)), x.new_full((2,), 5.0), i.new_ones(3), i.new_full((3,), 7),
                          x.new_zeros(2, dtype=torch.int64), x.new_tensor([1.0, 2.0])), (x357, i357)),
    "scalar_tensor_constants": (lambda x: (x * torch.scalar_tensor(2.5), x * torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0, 1.5, -1.0]),
                                           x + torch.tensor(3)), (x357,)),
    # casts
    "casts": (lambda x: ((x * 4).to(torch.int32), x.half(), x.to(torch.bfloat16) * 2, x.double() + 1, x.long(), x.bool(),
                         x.to(torch.float32) + 1, x.float()), (randint(3, 5, 7, lo=-2, hi=3).float() * 1.7,)),
    "casts_int": (lambda i, m: (i.float() / 3, i.to(torch.int32), m.float().mean(-1), m.long() + i, i.bool(), i.half()), (i357, b357)),
    "type_as_to_other": (lambda x, i, k: (i.type_as(x) + x, x.to(k), x.to(i.dtype), x.to(dtype=torch.float16), x.to("cpu")),
                         (x357 * 10, i357, i32_357)),
    # identities
    "dropout_eval": (lambda x: (F.dropout(x, 0.5, training=False), F.dropout(x, 0.2, False) * 2, F.dropout1d(x, 0.1, False)), (x357,)),
    "dropout_module": (nn.Sequential(perturbed(nn.Linear(7, 7)), nn.Dropout(0.3)).eval(), (x357,)),
    "copies": (lambda x: (x.transpose(0, 1).contiguous().clone().detach() * 2, x.clone().mul_(2).add_(1), x.clone().clamp_(0, 1)),
               (x357,)),
    "copy_broadcast": (lambda x, v, i: (torch.empty_like(x).copy_(v), x.clone().copy_(i[0]), torch.zeros(2, 7).copy_(v[0, :1])),
                       (x357, randn(5, 7), i357)),
    "fill_zero": (_fill, (x357, i357)),
    "setitem": (_setitem, (x357, randn(3, 7), b357)),
    # group norm, nearest upsampling (the VAE decoder's)
    "group_norm": (lambda x, y, w, b: (F.group_norm(x, 2, w, b, eps=1e-3), F.group_norm(x, 3), F.group_norm(x, 6, None, b),
                                       F.group_norm(y, 3, w), F.silu(F.group_norm(x.half(), 2, w.half(), b.half())).float()),
                   (x6, randn(2, 6, 9), randn(6), randn(6))),
    "group_norm_module": (perturbed(nn.GroupNorm(2, 6)), (x6,)),
    "upsample_nearest": (lambda x: (F.interpolate(x, scale_factor=2.0, mode="nearest"), F.interpolate(x, size=(10, 21)),
                                    F.interpolate(x, scale_factor=(1, 3), mode="nearest-exact"), nn.Upsample(scale_factor=2)(x),
                                    F.interpolate(x, size=(5, 7))), (randn(2, 3, 5, 7),)),
    "upsample_nearest_1d_3d": (lambda x, v: (F.interpolate(x, scale_factor=3), F.interpolate(v, scale_factor=2, mode="nearest-exact")),
                               (randn(2, 3, 5), randn(1, 2, 3, 4, 2))),
}


@pytest.mark.parametrize("fn, args", list(OPS.values()), ids=list(OPS))
def test_op_matches_eager(fn, args):
    compile_and_check(fn, args)


def test_outputs_keep_eager_structure():
    compile_and_check(lambda x: {"a": x + 1, "b": [x.sum(0), (x.mean(), x.max(-1).indices)]}, (x357,))


def test_return_types_output():
    compile_and_check(lambda x: x.max(dim=1), (x357,))


# ----------------------------------------------------------------------------- dynamic shapes

DYNAMIC = {"x": {0: ("batch", 1, 16), 1: ("seq", 1, 64)}}


def _dyn_views(x):  # [batch, seq, 6]
    b, s, c = x.shape
    h = x.view(b, s, 2, 3).transpose(1, 2)  # [b, 2, s, 3]
    return (h.reshape(b * 2, s, 3), x.reshape(b, -1), x.flatten(0, 1), x.unflatten(2, (3, 2)), x.view(-1, c).sum(0),
            x.permute(2, 0, 1).contiguous().view(c, b * s), x[:, None].squeeze(1) * 2)


def _dyn_arange(x):
    b, s, _ = x.shape
    causal = torch.arange(s)[None, :] <= torch.arange(s)[:, None]  # [s, s]
    return (x + torch.arange(s, dtype=x.dtype)[:, None], torch.arange(1, s + 1) * 2, torch.arange(s - 1, -1, -1),
            torch.arange(b * s).view(b, s), causal, torch.arange(s, dtype=torch.float32) / s,
            x[:, torch.arange(s - 1, -1, -1)])


def _dyn_slice_expand(x):
    b, s, c = x.shape
    m = x.mean(1, keepdim=True)  # [b, 1, c]
    return (x[:, -1:], x[:, -1], x[..., 1:4], x[:, :, ::2], x.narrow(1, 0, s), m.expand(-1, s, -1), m.expand(b, s, c),
            x[:, :1].expand_as(x), torch.zeros(b, s), x.new_ones(s, s).tril(), torch.full((b, 1, s), 2.0),
            torch.ones_like(x[..., 0]).cumsum(-1), x.repeat(1, 2, 1), torch.cat([x, x[:, -1:]], 1), F.pad(x, (0, 0, 1, 2)),
            x.chunk(2, dim=-1)[1], torch.stack([x, x], 1).flatten(1, 2), x.unbind(-1)[0])


def _dyn_attention(x):
    b, s, c = x.shape
    q = x.view(b, s, 2, 3).transpose(1, 2)  # [b, 2, s, 3]
    keep = torch.arange(s)[None, :] < (s - torch.arange(b))[:, None]  # [b, s]: row i ends i tokens early
    mask = keep[:, None, None, :] & keep[:, None, :, None]  # [b, 1, s, s]
    out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask | torch.eye(s, dtype=torch.bool))
    causal = F.scaled_dot_product_attention(q, q * 2, q, is_causal=True)
    return out.transpose(1, 2).reshape(b, s, c), causal.sum(1)


@pytest.mark.parametrize("fn", [_dyn_views, _dyn_arange, _dyn_slice_expand, _dyn_attention])
def test_dynamic_shapes(fn):
    m = compile_and_check(fn, (randn(2, 5, 6),), dynamic=DYNAMIC)
    assert m.graph.symbols == {"batch": (1, 16), "seq": (1, 64)}
    assert [str(d) for d in m.graph.inputs[0].shape] == ["batch", "seq", "6"]
    for b, s in [(1, 1), (3, 2), (16, 64), (1, 9)]:  # size 1 runs the same graph: no recompile
        x = randn(b, s, 6)
        with torch.no_grad():
            assert_matches(m(x), fn(x))


def _dyn_vae_ops(x):
    """The decoder's group norm and 2x nearest upsampling over a dynamic batch and height."""
    return F.silu(F.group_norm(F.interpolate(x, scale_factor=2.0), 3)), F.interpolate(x, scale_factor=(3, 1), mode="nearest-exact")


def test_dynamic_group_norm_and_upsampling():
    dims = {"x": {0: ("batch", 1, 4), 2: ("h", 2, 16)}}
    m = compile_and_check(_dyn_vae_ops, (randn(2, 6, 5, 3),), dynamic=dims)
    assert m.graph.histogram().get("GROUP_NORM") == 1
    for b, h in [(1, 2), (3, 7), (4, 16)]:
        x = randn(b, 6, h, 3)
        assert_matches(m(x), _dyn_vae_ops(x))


def test_upsampling_by_a_fraction_is_refused():
    with pytest.raises(kiln.UnsupportedOpsError) as info:
        kiln.compile(lambda x: F.interpolate(x, scale_factor=1.5), (randn(1, 2, 4, 4),))
    assert "nearest resampling from 4 to 6" in str(info.value)
    with pytest.raises(kiln.UnsupportedOpsError, match="scales .* differ from the size ratios"):
        kiln.compile(lambda x: F.interpolate(x, scale_factor=2.1), (randn(1, 2, 5, 5),))  # 10 x 10, picking floor(i / 2.1)


def _dyn_conv1d_pool(x, w1, w2):
    """An audio encoder's stem (two 1-d convolutions, the second strided) and a pooler's mean, over dynamic lengths."""
    h = F.gelu(F.conv1d(F.gelu(F.conv1d(x, w1, padding=1)), w2, padding=1, stride=2))
    return h, F.adaptive_avg_pool1d(h, 1)


def test_dynamic_conv1d_and_pooling():
    w1, w2 = randn(6, 4, 3), randn(5, 6, 3)
    m = compile_and_check(_dyn_conv1d_pool, (randn(2, 4, 9), w1, w2), dynamic={"x": {0: ("batch", 1, 4), 2: ("len", 4, 32)}})
    for b, n in [(1, 4), (3, 17), (4, 32)]:
        x = randn(b, 4, n)
        assert_matches(m(x, w1, w2), _dyn_conv1d_pool(x, w1, w2))


def test_adaptive_pooling_to_a_size_that_does_not_divide_is_refused():
    with pytest.raises(kiln.UnsupportedOpsError, match="adaptive average pooling from 6 to 4"):
        kiln.compile(lambda x: F.adaptive_avg_pool1d(x, 4), (randn(1, 2, 6),))


def test_dynamic_dims_captured_from_an_example_of_size_one():
    m = compile_and_check(_dyn_slice_expand, (randn(1, 1, 6),), dynamic=DYNAMIC)
    for b, s in [(2, 3), (1, 1), (5, 1)]:
        x = randn(b, s, 6)
        with torch.no_grad():
            assert_matches(m(x), _dyn_slice_expand(x))


def test_dynamic_size_outside_range_is_an_input_error():
    m = kiln.compile(_dyn_views, (randn(2, 5, 6),), dynamic=DYNAMIC)
    with pytest.raises(kiln.InputError) as err:
        m(randn(17, 5, 6))
    assert all(s in str(err.value) for s in ("'x'", "dim 0", "batch", "17", "[1, 16]")), str(err.value)
    with pytest.raises(kiln.InputError) as err:
        m(randn(2, 65, 6))
    assert all(s in str(err.value) for s in ("'x'", "dim 1", "seq", "65", "[1, 64]")), str(err.value)
    with pytest.raises(kiln.InputError, match="dim 2"):
        m(randn(2, 5, 7))  # a static dim


# ----------------------------------------------------------------------------- what kiln refuses


class SortAndTopk(nn.Module):
    def forward(self, x):
        s = torch.sort(x, dim=-1).values
        t = torch.topk(x, 2, dim=-1).values
        u = torch.sort(x, dim=0).values
        return s[..., :2] + t + u[..., :2]


class SortAndMaskIndex(nn.Module):
    def forward(self, x):
        s = torch.sort(x, dim=-1).values
        return s + x[x > 0].sum()


def _assert_lists(err, op: str, module: type, text: str):
    """``err`` lists ``op`` (part of an entry's name) at the line of ``module.forward`` containing ``text``."""
    where = f"{os.path.basename(__file__)}:{line_of(module.forward, text)} (in forward)"
    locs = [loc for key, locs in err.ops.items() if op in key for loc in locs]
    assert any(where in loc for loc in locs), f"{op} not listed at {where}: {err.ops}"
    assert op in str(err) and where in str(err)


def test_unsupported_ops_are_listed_at_once_with_their_lines():
    with pytest.raises(kiln.UnsupportedOpsError) as info:
        kiln.compile(SortAndTopk(), (randn(3, 7),))
    err = info.value
    assert set(err.ops) == {"aten.sort", "aten.topk"}
    assert "2 unsupported ops" in str(err)
    _assert_lists(err, "aten.sort", SortAndTopk, "torch.sort(x, dim=-1)")
    _assert_lists(err, "aten.sort", SortAndTopk, "torch.sort(x, dim=0)")  # every place, under one entry
    _assert_lists(err, "aten.topk", SortAndTopk, "torch.topk(")


def test_unknown_and_refused_ops_are_listed_together():
    # aten.sort has no handler; aten.index has one, which refuses a boolean mask (data-dependent shape)
    with pytest.raises(kiln.UnsupportedOpsError) as info:
        kiln.compile(SortAndMaskIndex(), (randn(3, 7),))
    err = info.value
    assert len(err.ops) == 2, err.ops
    _assert_lists(err, "aten.sort", SortAndMaskIndex, "torch.sort(")
    _assert_lists(err, "aten.index (boolean-mask indexing", SortAndMaskIndex, "x[x > 0]")


def _function_with_sort(x):
    return torch.sort(x).values


def test_unsupported_op_in_a_function_names_its_line():
    with pytest.raises(kiln.UnsupportedOpsError) as info:
        kiln.compile(_function_with_sort, (randn(3, 7),))
    assert f"{os.path.basename(__file__)}:{line_of(_function_with_sort, 'torch.sort(')}" in str(info.value)


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(7, 7)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return F.dropout(self.drop(self.lin(x)), 0.3, self.training) * 2


class AlwaysDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.5, training=True) + 1


def test_module_in_train_mode_is_captured_in_eval_mode_and_left_as_it_was():
    net = perturbed(DropoutNet()).train()
    net.drop.eval()  # a mix, to check each submodule's own flag comes back
    m = kiln.compile(net, (x357,))
    assert net.training and net.lin.training and not net.drop.training
    with torch.no_grad():
        want = copy.deepcopy(net).eval()(x357)
    assert_matches(m(x357), want)


def test_dropout_that_is_always_on_is_refused():
    with pytest.raises(kiln.UnsupportedOpsError) as info:
        kiln.compile(AlwaysDropout(), (x357,))
    _assert_lists(info.value, "dropout in training mode", AlwaysDropout, "F.dropout(")


# ----------------------------------------------------------------------------- real models

LLM = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)
LLM_CASES = {
    "llama": ("Llama", dict(attn_implementation="sdpa")),
    "mistral": ("Mistral", dict(attn_implementation="eager", sliding_window=4)),  # eager attention: matmul + softmax
    "qwen2": ("Qwen2", dict(attn_implementation="sdpa", tie_word_embeddings=True)),
}
LLM_DYNAMIC = {"batch": ("batch", 1, 8), "seq": ("seq", 1, 32)}


@pytest.fixture(scope="module")
def transformers_models():
    transformers = pytest.importorskip("transformers")
    models = {}
    for case, (arch, kw) in LLM_CASES.items():
        cfg = getattr(transformers, f"{arch}Config")(**{**LLM, **kw})
        torch.manual_seed(0)
        models[case] = perturbed(getattr(transformers, f"{arch}ForCausalLM")(cfg))
    return models


def _ids_and_mask(batch: int, seq: int, pad: int):
    gen = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(0, LLM["vocab_size"], (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :pad] = 0  # left padding on the first row
    return ids, mask


def _check_llm(model, with_mask: bool, tol: float):
    ids, mask = _ids_and_mask(2, 7, 3)
    dims = {0: LLM_DYNAMIC["batch"], 1: LLM_DYNAMIC["seq"]}
    kwargs = {"attention_mask": mask} if with_mask else {}
    m = kiln.compile(model, (ids,), kwargs, dynamic={"input_ids": dims, **({"attention_mask": dims} if with_mask else {})})
    for batch, seq in [(2, 7), (3, 4), (1, 11)]:  # two sizes or more per dynamic dim
        ids, mask = _ids_and_mask(batch, seq, min(seq - 1, 2))
        kwargs = {"attention_mask": mask} if with_mask else {}
        with torch.no_grad():
            want = model(ids, use_cache=False, **kwargs).logits
        got = m(ids, **kwargs).logits
        err = rel_err(got, want)
        assert got.dtype == want.dtype and err <= tol, f"batch {batch} seq {seq}: rel err {err:.3g}"


@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "left_padding"])
@pytest.mark.parametrize("case", list(LLM_CASES))
def test_transformers_llm(transformers_models, case, with_mask):
    _check_llm(transformers_models[case], with_mask, 1e-5)


def test_transformers_llama_bfloat16(transformers_models):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**LLM, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg)
    model.load_state_dict(transformers_models["llama"].state_dict())
    _check_llm(model.to(torch.bfloat16).eval(), True, TOL[torch.bfloat16])


@pytest.fixture(scope="module")
def dit():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                            num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return perturbed(model)  # ada_norm_zero zero-inits its modulation and output layers


def _dit_inputs(batch: int):
    gen = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, 4, 8, 8, generator=gen), torch.randint(0, 1000, (batch,), generator=gen),
            torch.randint(0, 10, (batch,), generator=gen))


def test_diffusers_dit(dit):
    x, t, y = _dit_inputs(2)
    batch = {0: ("batch", 1, 8)}
    m = kiln.compile(dit, (x,), {"timestep": t, "class_labels": y},
                     dynamic={"hidden_states": batch, "timestep": batch, "class_labels": batch})
    for b in (2, 3, 1):
        x, t, y = _dit_inputs(b)
        with torch.no_grad():
            want = dit(x, timestep=t, class_labels=y).sample
        got = m(x, timestep=t, class_labels=y).sample
        assert rel_err(got, want) <= 1e-5, f"batch {b}: rel err {rel_err(got, want):.3g}"


def test_functional_programs_skip_the_retrace_others_are_functionalised():
    """A program with no mutation and no higher-order op imports as exported; an in-place op or a grad-mode
    region sends it through run_decompositions first. Both give eager's numbers."""

    class Plain(nn.Module):
        def forward(self, x):
            return torch.relu(x * 2).sum(-1)

    class InPlace(nn.Module):
        def forward(self, x):
            y = x * 2
            y.add_(1)
            return y.relu_()

    class GradRegion(nn.Module):
        def forward(self, x):
            with torch.enable_grad():
                y = x * 3
            return y + 1

    for module, functional in ((Plain(), True), (InPlace(), False), (GradRegion(), False)):
        check_import(module, randn(3, 5), functional)


def check_import(module: nn.Module, x: torch.Tensor, direct: bool) -> None:
    """``module(x)`` imports as exported (``direct``) or through run_decompositions, and kiln gives eager's numbers."""
    from kiln.ir.fx.importer import _functional

    with torch.no_grad():
        ep = torch.export.export(module, (x,), strict=False)
    assert _functional(ep) is direct, type(module).__name__
    assert_matches(kiln.compile(module, (x,))(x), module(x))


def test_an_index_copy_into_an_input_imports_without_the_retrace():
    """A KV-cache write (index_copy_ into a user input, then reads of it) is imported as exported: the input's
    new value becomes an update output, readers after the write see it."""
    from kiln.ir.fx.importer import _functional

    class Write(nn.Module):
        def forward(self, x, slots, cache):
            n = cache.shape[0]  # a shape read before the write is fine
            cache.index_copy_(1, slots, x * 2)
            return cache.sum(1) + n

    class ReadBefore(nn.Module):
        def forward(self, x, slots, cache):
            old = cache * 1
            cache.index_copy_(1, slots, x)
            return old + cache

    args = (randn(3, 2, 4), torch.tensor([4, 0]), randn(3, 6, 4))
    for module, direct in ((Write(), True), (ReadBefore(), False)):
        with torch.no_grad():
            ep = torch.export.export(module, tuple(a.clone() for a in args), strict=False)
        assert _functional(ep) is direct, type(module).__name__
        c_eager, c_kiln = args[2].clone(), args[2].clone()
        m = kiln.compile(module, tuple(a.clone() for a in args))
        assert m.graph.updates == {"cache:updated": "cache"}
        assert_matches(m(args[0], args[1], c_kiln), module(args[0], args[1], c_eager))
        assert_matches(c_kiln, c_eager)


def test_last_writes_into_inputs_import_without_the_retrace():
    """A pipeline step's end (copy_ of the new latents, add_ on the step index: each input's last use) is imported as
    exported, each input's final value an update; a read of a view of the input taken before the write, after it, sends
    the program through run_decompositions. Both give eager's numbers and inputs."""
    from kiln.ir.fx.importer import _functional

    class Step(nn.Module):
        def forward(self, latents, step, table):
            row = table.index_select(0, step)  # [1, C]
            out = (latents.float() * row).to(torch.promote_types(latents.dtype, row.dtype))
            latents.copy_(out)  # float32 -> float16: the copy casts
            step.add_(1)
            return out

    class ViewReadAfter(nn.Module):
        def forward(self, latents, step, table):
            first = latents[0]  # a view: after the copy it holds the new values
            latents.copy_(latents.float() * table[0])
            return first * 2

    class ReadAfter(nn.Module):  # (export records the later read as one of the write's result: the new value)
        def forward(self, latents, step, table):
            latents.copy_(latents * 3)
            return latents + 1

    class IdentityTo(nn.Module):  # a float16 input's .to(float16) is the input itself: export hands the write that node
        def forward(self, latents, step, table):
            x = latents.to(latents.dtype)
            out = x * 2
            x.copy_(out)
            return out

    class MixedAdd(nn.Module):  # float16 += float32: eager adds in float32, then rounds; the retrace keeps that
        def forward(self, latents, step, table):
            latents.add_(table[0], alpha=2)
            return table * 1

    example = (randn(2, 4, dtype=torch.float16), torch.tensor([1]), randn(3, 4))

    def args():
        return tuple(a.clone() for a in example)
    cases = ((Step(), True), (ViewReadAfter(), False), (ReadAfter(), True), (IdentityTo(), True), (MixedAdd(), False))
    for module, direct in cases:
        with torch.no_grad():
            ep = torch.export.export(module, args(), strict=False)
        assert _functional(ep) is direct, type(module).__name__
        a_eager, a_kiln = args(), args()
        m = kiln.compile(module, args())
        assert set(m.graph.updates.values()) == ({"latents", "step"} if isinstance(module, Step) else {"latents"})
        assert_matches(m(*a_kiln), module(*a_eager))
        for got, want in zip(a_kiln, a_eager):
            assert_matches(got, want)


def test_a_last_write_into_a_fresh_tensor_imports_without_the_retrace():
    """``y += ...`` on a tensor an op made (T5's ``relative_buckets``), as its last write, imports as exported; on a view
    of another tensor, or with a view of it read after, the program is functionalised first. Eager's numbers both ways."""

    class Fresh(nn.Module):
        def forward(self, x):
            y = x * 2
            y.add_(x.abs())
            return y + 1

    class IntoView(nn.Module):  # writes x's storage through its view
        def forward(self, x):
            y = x * 2
            v = y[0]
            v.mul_(3)
            return y

    class ViewReadAfter(nn.Module):
        def forward(self, x):
            y = x * 2
            v = y[1:]
            y.sub_(1)
            return v + 0

    for module, direct in ((Fresh(), True), (IntoView(), False), (ViewReadAfter(), False)):
        check_import(module, randn(3, 5), direct)
