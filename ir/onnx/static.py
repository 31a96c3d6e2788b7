"""Values an ONNX import knows before the graph runs: :class:`Static` (initializers, ``Constant`` nodes and
everything computed from them and from ``Shape``; elements are python numbers or sympy dims), and the
ONNX <-> kiln dtype tables."""
from __future__ import annotations

import math

import numpy as np
import sympy
import torch
from onnx import TensorProto, numpy_helper

from ..lowering import Unsupported
from ..types import FLOAT_DTYPES, dim, torch_dtype

STATIC_LIMIT = 4096  # largest int / bool tensor evaluated at import time (shape arithmetic is tiny)

ONNX_DTYPES = {
    TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64", TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16", TensorProto.INT64: "int64", TensorProto.INT32: "int32",
    TensorProto.INT16: "int16", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.BOOL: "bool",
}
KILN_TO_ONNX = {v: k for k, v in ONNX_DTYPES.items()} | {"float8_e4m3fn": TensorProto.FLOAT8E4M3FN}  # (fp8 AQGEMM codes: export only)
_NP = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "int64": np.int64, "int32": np.int32,
       "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


def kiln_dtype(elem_type: int) -> str:
    d = ONNX_DTYPES.get(elem_type)
    if d is None:
        raise Unsupported(f"element type {TensorProto.DataType.Name(elem_type)}")
    return d


class CannotEval(Exception):
    """A static evaluation that is not possible (a comparison of symbols sympy cannot decide...):
    the op is lowered into the graph instead."""


def py_scalar(v, dtype: str):
    """``v`` as the python / sympy value an element of ``dtype`` holds (float32 values rounded to float32)."""
    if isinstance(v, sympy.Basic):
        if dtype == "bool":
            raise CannotEval(f"bool of {v}")
        return dim(v) if dtype not in FLOAT_DTYPES else (float(v) if v.is_number else v)
    if dtype == "bool":
        return bool(v)
    if dtype in FLOAT_DTYPES:
        return float(torch.tensor(float(v), dtype=torch_dtype(dtype)).item()) if dtype != "float64" else float(v)
    return int(v)


class Static:
    """A value known at import time: elements are python numbers or sympy dims (``seq``, ``seq + 1``).
    An initializer keeps its name and proto, and is decoded only when it is read."""

    __slots__ = ("_value", "shape", "dtype", "name", "proto", "node")

    def __init__(self, value=None, dtype: str = "int64", name: str | None = None, proto=None):
        self.dtype, self.name, self.proto, self.node = dtype, name, proto, None
        if proto is not None:
            self._value = None
            self.shape = tuple(int(d) for d in proto.dims)
        else:
            arr = np.empty(np.shape(value), dtype=object)
            arr[...] = value if not isinstance(value, np.ndarray) else value.astype(object)
            self._value = np.vectorize(lambda v: py_scalar(v, dtype), otypes=[object])(arr) if arr.size else arr
            self.shape = arr.shape

    @property
    def value(self) -> np.ndarray:
        """The elements as an object array."""
        if self._value is None:
            arr = _to_array(self.proto)
            if arr.dtype.name == "bfloat16":
                arr = arr.astype(np.float32)
            obj = np.empty(arr.shape, dtype=object)
            obj[...] = arr.tolist() if arr.ndim else arr.item()
            self._value = obj
        return self._value

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def concrete(self) -> bool:
        return self.proto is not None or all(not isinstance(v, sympy.Basic) for v in self.value.flat)

    def item(self):
        return self.value.reshape(-1)[0]

    def ints(self) -> list:
        return [int(v) if not isinstance(v, sympy.Basic) else v for v in self.value.reshape(-1)]

    def tensor(self) -> torch.Tensor:
        if self.proto is not None:
            arr = _to_array(self.proto)
            if arr.dtype.name == "bfloat16":
                return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
            return torch.from_numpy(np.array(arr, copy=True))
        if not self.concrete:
            raise CannotEval("symbolic value")
        if self.dtype == "bfloat16":
            return torch.tensor(self.value.tolist(), dtype=torch.float32).reshape(self.shape).to(torch.bfloat16)
        return torch.from_numpy(np.array(self.value.tolist(), dtype=_NP[self.dtype]).reshape(self.shape))

    def __repr__(self) -> str:
        return f"Static({self.name or ''} {self.dtype}{list(self.shape)})"


def _to_array(proto) -> np.ndarray:
    return numpy_helper.to_array(proto)
