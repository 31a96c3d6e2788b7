"""Dims, symbols and dtypes of the kiln IR.

A dim is a python ``int`` or a sympy expression over named symbols (``batch``, ``seq``,
``2*seq``, ``floor(h/2)``). Every symbol is created by :func:`sym` so that two symbols of the
same name are the same object to sympy. Dtypes are plain strings (``"bfloat16"``); the tables here
are the only place that maps them to torch. ``float8_e4m3fn`` is a storage dtype (quantized KV-cache codes,
``ir/kv_quant.py``): no op computes in it, so it is not one of ``FLOAT_DTYPES``.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Union

import sympy
import torch

Dim = Union[int, sympy.Expr]

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})
ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; kiln supports {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported torch dtype {dtype}; kiln supports {', '.join(DTYPES)}") from None


class TType(NamedTuple):
    """The type of a value: shape (tuple of dims) and dtype name."""

    shape: tuple
    dtype: str


# ----------------------------------------------------------------------------- symbols and dims

_SYMBOLS: dict[str, sympy.Symbol] = {}


def sym(name: str) -> sympy.Symbol:
    """The symbol called ``name`` (sizes are positive integers)."""
    s = _SYMBOLS.get(name)
    if s is None:
        s = _SYMBOLS[name] = sympy.Symbol(name, integer=True, positive=True)
    return s


def dim(value) -> Dim:
    """Normalise an int / sympy value into a dim: concrete values become python ints."""
    if isinstance(value, bool):
        raise TypeError("a bool is not a dim")
    if isinstance(value, int):
        return value
    if isinstance(value, sympy.Expr):
        if value.is_Integer:
            return int(value)
        if value.is_number:
            raise ValueError(f"dim {value} is not an integer")
        return value
    raise TypeError(f"not a dim: {value!r} ({type(value).__name__})")


def is_static(d) -> bool:
    return isinstance(d, int)


def dims_equal(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    diff = sympy.expand(sympy.sympify(a) - sympy.sympify(b))
    return diff == 0 or sympy.simplify(diff) == 0


def free_symbols(d) -> set[str]:
    return {s.name for s in d.free_symbols} if isinstance(d, sympy.Expr) else set()


def dim_to_json(d: Dim):
    """ints stay ints; expressions become their string (``"2*seq"``)."""
    return d if isinstance(d, int) else str(d)


def dim_from_json(v) -> Dim:
    if isinstance(v, int):
        return v
    if not isinstance(v, str):
        raise ValueError(f"bad dim {v!r}")
    return _parse_dim(v)


@functools.lru_cache(maxsize=4096)
def _parse_dim(text: str) -> Dim:
    # a graph.json repeats a few dim strings thousands of times and sympify is slow; the cached
    # expressions are immutable and their symbols come from sym(), so sharing them is safe
    names = {t for t in _identifiers(text)}
    local = {n: sym(n) for n in names if n not in ("floor", "ceiling", "Max", "Min", "Mod")}
    return dim(sympy.sympify(text, locals=local))


def _identifiers(text: str):
    import re

    return re.findall(r"[A-Za-z_][A-Za-z_0-9]*", text)


def eval_dim(d, bindings: dict[str, int]) -> int:
    """The value of a dim once every symbol has a value."""
    if isinstance(d, int):
        return d
    v = d.xreplace({sym(k): sympy.Integer(v) for k, v in bindings.items()})
    if not v.is_number:
        missing = sorted(s.name for s in v.free_symbols)
        raise KeyError(f"no value for symbol(s) {', '.join(missing)} in {d}")
    if not v.is_Integer:  # seq/2 at an odd seq: int() would truncate it silently
        raise ValueError(f"dim {d} is {v} for {bindings}, not an integer")
    return int(v)


def eval_attr(value, bindings: dict[str, int]):
    """An attribute with every symbolic dim replaced by its value (tuples recursively)."""
    if isinstance(value, sympy.Expr):
        return eval_dim(value, bindings)
    if isinstance(value, tuple):
        return tuple(eval_attr(v, bindings) for v in value)
    return value


def has_symbols(value) -> bool:
    if isinstance(value, sympy.Expr):
        return True
    if isinstance(value, tuple):
        return any(has_symbols(v) for v in value)
    return False


def numel(shape) -> Dim:
    n: Dim = 1
    for d in shape:
        n = n * d
    return dim(n) if not isinstance(n, int) else n


def shape_str(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
