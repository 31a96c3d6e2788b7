"""The errors kiln raises on purpose. Each carries a one-line message and, where useful, a hint;
the CLI prints them without a traceback (unless KILN_DEBUG=1)."""
from __future__ import annotations


class KilnError(Exception):
    """Base class: a clear message plus an optional hint on what to do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message + (f"\nhint: {self.hint}" if self.hint else "")


class InputError(KilnError, ValueError):
    """A call's inputs do not fit the compiled signature (rank, dtype, a dim outside its range)."""


class CallFormError(InputError):
    """A call passes other arguments than the example call the model was compiled for (one given now and not then,
    one missing, a fixed non-tensor argument changed); ``argument`` names it."""

    def __init__(self, message: str, argument: str, hint: str | None = None):
        super().__init__(message, hint)
        self.argument = argument


class UnsupportedOpsError(KilnError):
    """The model uses ops kiln cannot import; ``.ops`` maps each op to the places that use it."""

    def __init__(self, ops: dict[str, list[str]], source: str = "model"):
        self.ops = ops
        lines = [f"{source} uses {len(ops)} unsupported op{'s' if len(ops) != 1 else ''}:"]
        for op, locs in ops.items():
            shown = ", ".join(locs[:4]) + (f" (+{len(locs) - 4} more)" if len(locs) > 4 else "")
            lines.append(f"  {op}  at {shown}")
        super().__init__("\n".join(lines), hint="rewrite these parts of the model with supported ops, "
                         "or file an issue with the op names above")


class CaptureError(KilnError):
    """torch.export (or an importer) could not turn the model into a graph."""


class ArtifactError(KilnError):
    """A .kiln file failed a check on load: which check, and which member."""


class SourceChangedError(KilnError):
    """The module a model was compiled from changed its parameters or buffers after the compile."""
