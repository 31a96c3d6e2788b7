"""``einsum`` lowered to PERMUTE / RESHAPE / SUM / MATMUL.

One operand: a permutation (letters summed away become a SUM). Two operands: letters in both
inputs and the output are batch dims, in both inputs only are contracted, in one input and the
output are free; the product is one batched MATMUL ``[B, M, K] @ [B, K, N]``. ``...`` becomes
letters of its own, right-aligned across the operands.
"""
from __future__ import annotations

import string

from .lowering import Unsupported
from .types import dim, dims_equal


def _prod(dims):
    n = 1
    for d in dims:
        n = n * d
    return dim(n) if not isinstance(n, int) else n


def _parse(equation: str, ranks: list[int]):
    eq = equation.replace(" ", "")
    if "->" not in eq:
        raise Unsupported("einsum without an explicit output ('->')")
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != len(ranks):
        raise Unsupported(f"einsum {equation!r} with {len(ranks)} operands")
    if "..." in eq:  # '...' stands for the same letters in every term, aligned on the right like broadcasting
        free = [c for c in string.ascii_letters if c not in eq]
        n = max((r - len(t) + 3 for t, r in zip(ins, ranks) if "..." in t), default=0)
        ell = "".join(free[:n])
        ins = [t.replace("...", ell[n - (r - len(t) + 3):]) for t, r in zip(ins, ranks)]
        out = out.replace("...", ell)
    for term in ins + [out]:
        if len(set(term)) != len(term):
            raise Unsupported(f"einsum with a repeated index ({equation!r})")
    return ins, out


def _sum_away(cx, x, letters, keep):
    """Sum the letters of ``x`` that ``keep`` does not contain."""
    axes = tuple(i for i, c in enumerate(letters) if c not in keep)
    if not axes:
        return x, letters
    return cx.add("SUM", [x], axes=axes), "".join(c for c in letters if c in keep)


def _permute(cx, x, letters, order):
    perm = tuple(letters.index(c) for c in order)
    return x if perm == tuple(range(len(perm))) else cx.add("PERMUTE", [x], perm=perm)


def lower_einsum(cx, equation: str, operands: list, want):
    ins, out = _parse(equation, [len(o.shape) for o in operands])
    if len(operands) == 1:
        x, letters = _sum_away(cx, operands[0], ins[0], out)
        return _permute(cx, x, letters, out)
    if len(operands) != 2:
        raise Unsupported("einsum with more than two operands")
    a, b = operands
    la, lb = ins
    a, la = _sum_away(cx, a, la, lb + out)
    b, lb = _sum_away(cx, b, lb, la + out)
    size = {c: d for c, d in zip(la, a.shape)}
    if any(c in size and not dims_equal(size[c], d) for c, d in zip(lb, b.shape)):
        raise Unsupported(f"einsum {equation!r} broadcasting a size-1 dim")
    size.update({c: d for c, d in zip(lb, b.shape)})
    batch = [c for c in out if c in la and c in lb]
    m = [c for c in out if c in la and c not in lb]
    n = [c for c in out if c in lb and c not in la]
    k = [c for c in la if c in lb and c not in out]
    bs = tuple(size[c] for c in batch)
    a = _permute(cx, a, la, batch + m + k)
    b = _permute(cx, b, lb, batch + k + n)
    a = cx.add("RESHAPE", [a], shape=bs + (_prod(size[c] for c in m), _prod(size[c] for c in k)))
    b = cx.add("RESHAPE", [b], shape=bs + (_prod(size[c] for c in k), _prod(size[c] for c in n)))
    y = cx.add("MATMUL", [a, b])
    y = cx.add("RESHAPE", [y], shape=bs + tuple(size[c] for c in m + n))
    return _permute(cx, y, "".join(batch + m + n), out)
