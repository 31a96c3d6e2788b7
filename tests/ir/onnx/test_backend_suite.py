"""ONNX's own backend conformance suite through ``kiln.compile`` (reference backend, CPU).

The cases: every node case of ``onnx.backend.test.case.node.collect_testcases()`` (a one-op model, inputs and
expected outputs), the model directories onnx ships (``simple``, ``pytorch-converted``, ``pytorch-operator``)
and its ``real`` models (small CNNs, run on onnx's own dummy inputs). Each case either passes (kiln's outputs
equal the expected ones within the per-dtype tolerance of :func:`close`) or is refused with kiln's clear error:
an :class:`UnsupportedOpsError` naming the ops / attributes, or one of the :data:`REFUSALS` (unsupported dtype
or feature). Never a wrong answer, an internal error or a raw exception. Cases in ``backend_suite_passing.txt``
passed when it was written and must keep passing; no case is skipped.

``python tests/ir/onnx/test_backend_suite.py`` prints the counts (README's "ONNX in and out") and rewrites
that list.
"""
from __future__ import annotations

import functools
import glob
import os
import re
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import kiln
from kiln.errors import CaptureError, KilnError, UnsupportedOpsError

PASSING = os.path.join(os.path.dirname(__file__), "backend_suite_passing.txt")
MODEL_DIRS = ("simple", "pytorch-converted", "pytorch-operator")

# The KilnErrors (besides UnsupportedOpsError) that refuse a case: reason -> what the message says
REFUSALS = {
    "an element type kiln has no dtype for (string, float8, int4, uint64, ...)": r": element type [A-Z0-9_]+$",
    "a sequence / optional / map input": r"kiln imports tensors of known rank only$",
    "an opset onnx.version_converter cannot upgrade": r"onnx\.version_converter cannot upgrade it",
}

# ONNX's tolerance (rtol 1e-3, atol 1e-7 unless a case says) suits float32 / float64; a half-precision result may
# differ from ONNX's reference (numpy, often float32 inside) by a rounding or two: 2 units in the last place
HALF_ULP = {"float16": 2.0**-10, "bfloat16": 2.0**-7}


@dataclass
class Case:
    name: str
    model: onnx.ModelProto
    data_sets: list  # [(inputs, expected outputs)]
    rtol: float = 1e-3
    atol: float = 1e-7


def _array(x) -> np.ndarray:
    return numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else np.asarray(x)


def _dir_case(kind: str, d: str) -> Case:
    model = onnx.load(os.path.join(d, "model.onnx"))
    sets = []
    for s in sorted(glob.glob(os.path.join(d, "test_data_set_*"))):
        load = lambda pattern: [onnx.load_tensor(f) for f in sorted(glob.glob(os.path.join(s, pattern)))]  # noqa: E731
        sets.append((load("input_*.pb"), load("output_*.pb")))
    return Case(f"{kind}/{os.path.basename(d)}", model, sets)


def _real_case(c) -> Case:
    """A ``real`` model stored with onnx (``url`` under data/light): onnx's dummy inputs, its stored outputs."""
    from onnx.backend.test.runner import Runner

    path = os.path.join(os.path.dirname(onnx.__file__), "..", c.url)
    model = onnx.load(path)
    inits = {t.name for t in model.graph.initializer}
    inputs = [Runner.generate_dummy_data(x) for x in model.graph.input if x.name not in inits]
    outputs = [onnx.load_tensor(f"{os.path.splitext(path)[0]}_output_{i}.pb") for i in range(len(model.graph.output))]
    return Case(f"real/{c.name}", model, [(inputs, outputs)], c.rtol, c.atol)


@functools.cache
def cases() -> dict[str, Case]:
    from onnx.backend.test.case import model as model_cases
    from onnx.backend.test.case import node as node_cases
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():  # the cases' own numpy (casts to float8, log(0), ...)
        warnings.simplefilter("ignore")
        out = {c.name: Case(c.name, c.model, c.data_sets, c.rtol, c.atol) for c in node_cases.collect_testcases()}
        for kind in MODEL_DIRS:
            out.update((c.name, c) for c in (_dir_case(kind, t.model_dir) for t in load_model_tests(kind=kind)))
        out.update((c.name, c) for c in (_real_case(t) for t in model_cases.collect_testcases() if t.url))
    return out


def _torch(x) -> torch.Tensor:
    a = _array(x)
    if a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, which torch.from_numpy does not take
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a, copy=True))


def close(got: torch.Tensor, want, rtol: float, atol: float) -> str | None:
    """Why ``got`` is not ``want`` (None when it is): same shape and dtype, ints and bools exactly, floats within
    (rtol, atol), widened to 2 ulps for float16 / bfloat16; NaN where NaN is expected, infinities exactly."""
    want = _array(want)
    if str(got.dtype).removeprefix("torch.") != want.dtype.name or tuple(got.shape) != want.shape:
        return f"got {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
    if not got.is_floating_point():
        return None if np.array_equal(got.numpy(), want) else f"{int((got.numpy() != want).sum())} of {want.size} elements differ"
    ulp = HALF_ULP.get(want.dtype.name, 0.0)
    rtol, atol = max(rtol, 2 * ulp), max(atol, 2 * ulp)
    g, w = got.double().numpy(), want.astype(np.float64)
    if not np.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True):
        return f"max |got - expected| = {np.nanmax(np.abs(g - w)):.3g} (rtol {rtol:g}, atol {atol:g})"
    return None


def _compile(case: Case, tmp: str):
    path = os.path.join(tmp, case.name.replace("/", "_") + ".onnx")
    onnx.save(case.model, path)
    return kiln.compile(path, config=kiln.CompileConfig(device="cpu", backend="reference"))


def outcome(case: Case) -> tuple[str, str]:
    """("pass", "") or ("refused", reason); a wrong answer, internal error or raw exception raises."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            m = _compile(case, tmp)
        except UnsupportedOpsError as e:  # "Op" (no handler) or "Op (the feature its handler declines)"
            declined = any(" (" in op for op in e.ops)
            return "refused", (f"{'a feature of an op kiln imports' if declined else 'an op kiln does not import'}: "
                               + " | ".join(sorted(e.ops)))
        except KilnError as e:
            line = e.message.splitlines()[0]
            reason = next((r for r, pattern in REFUSALS.items() if re.search(pattern, line)), None)
            if reason is None or isinstance(e, CaptureError):
                raise AssertionError(f"{case.name}: not a clear refusal: {type(e).__name__}: {e}") from e
            return "refused", reason
    for k, (inputs, expected) in enumerate(case.data_sets):
        got = m(*[_torch(x) for x in inputs])
        got = list(got.values()) if isinstance(got, dict) else [got]  # several outputs: a dict in the model's order
        assert len(got) == len(expected), f"{case.name}: {len(got)} outputs, expected {len(expected)}"
        for name, g, w in zip(m.graph.output_names, got, expected):
            why = close(g, w, case.rtol, case.atol)
            assert why is None, f"{case.name}: data set {k}, output {name!r}: {why}"
    return "pass", ""


@functools.cache
def _passing() -> set[str]:
    with open(PASSING) as f:
        return {line.strip() for line in f if line.strip() and not line.startswith("#")}


@pytest.mark.parametrize("name", list(cases()))
def test_case(name):
    """Every case passes or is refused clearly; one that passed when the list was written still passes."""
    result, reason = outcome(cases()[name])
    if name in _passing():
        assert result == "pass", f"{name} passed before, now it is refused: {reason}"


def _opset(case: Case) -> int | None:
    return next((o.version for o in case.model.opset_import if o.domain in ("", "ai.onnx")), None)


def main() -> None:
    """Print the counts by outcome and reason (README's "ONNX in and out"), and rewrite the list of passing cases."""
    from collections import Counter

    results = {name: outcome(case) for name, case in cases().items()}
    passed = [name for name, (r, _) in results.items() if r == "pass"]
    upgraded = sum(1 for name in passed if (_opset(cases()[name]) or 17) < 17)
    print(f"{len(results)} cases: {len(passed)} pass ({upgraded} upgraded from an older opset), "
          f"{len(results) - len(passed)} refused")
    reasons = Counter(reason.split(":")[0] for r, reason in results.values() if r == "refused")
    ops, features = Counter(), Counter()
    for r, reason in results.values():
        items = reason.split(": ", 1)[1].split(" | ") if reason.startswith(("an op", "a feature")) else []
        ops.update(op for op in items if " (" not in op)
        features.update({re.sub(r"^\S+ \(.* computed from tensor data.*", "(an input given as a graph input, not a constant)", op)
                         for op in items if " (" in op})
    for reason, n in reasons.most_common():
        print(f"  {n:5d}  {reason}")
    print(f"{len(ops)} ops kiln does not import, by cases: {', '.join(f'{op} {n}' for op, n in ops.most_common(12))}, ...")
    print("features declined, by cases:\n" + "\n".join(f"  {n:5d}  {f}" for f, n in features.most_common()))
    with open(PASSING, "w") as f:
        f.write("# cases of ONNX's backend suite kiln passes (tests/ir/onnx/test_backend_suite.py rewrites this)\n")
        f.writelines(f"{name}\n" for name in sorted(passed))


if __name__ == "__main__":
    main()
