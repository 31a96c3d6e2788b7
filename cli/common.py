"""What every ``kiln`` subcommand shares: the consoles, progress lines, and the parsing and checking of
dims, batch buckets, output paths, checkpoint directories and dtypes."""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

from rich.console import Console

from ..errors import KilnError
# piped output (logs, CI) gets a fixed width so tables and messages are not wrapped at 80 columns
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


class _Progress:
    """Shows a spinner while a phase runs and a line with its time when it ends."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._status = None

    def __call__(self, name: str, seconds):
        if self.quiet:
            return
        if seconds is None:
            self._status = err.status(f"{name}...")
            self._status.start()
            return
        if self._status is not None:
            self._status.stop()
            self._status = None
        mark = "[green]done[/green]" if seconds >= 0 else "[red]failed[/red]"
        err.print(f"  {mark} {name} [dim]{max(seconds, 0):.2f}s[/dim]")

    @contextmanager
    def step(self, name: str):
        self(name, None)
        t0 = time.perf_counter()
        ok = False
        try:
            yield
            ok = True
        finally:
            self(name, time.perf_counter() - t0 if ok else -1.0)


def _parse_dims(items, ranges: bool) -> dict:
    """``NAME=V`` (or ``NAME=MIN:MAX`` when ``ranges``) options into a dict; sizes are >= 1 and MIN <= MAX."""
    dims = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            bounds = tuple(int(v) for v in value.split(":"))
            if not sep or not name or len(bounds) != (2 if ranges else 1):
                raise ValueError
        except ValueError:
            raise KilnError(f"--dim {item!r} is not of the form {'NAME=MIN:MAX' if ranges else 'NAME=VALUE'}") from None
        if min(bounds) < 1:
            raise KilnError(f"--dim {item!r}: a dim is at least 1", hint=f"--dim {name}={':'.join(str(max(b, 1)) for b in bounds)}")
        if ranges and bounds[0] > bounds[1]:
            raise KilnError(f"--dim {item!r}: min {bounds[0]} > max {bounds[1]}", hint=f"--dim {name}={bounds[1]}:{bounds[0]}")
        dims[name] = bounds if ranges else bounds[0]
    return dims


def _parse_buckets(text: str) -> list[int]:
    """``--batch-buckets 1,2,4`` into sizes, each >= 1."""
    try:
        buckets = [int(b) for b in text.split(",")]
    except ValueError:
        buckets = []
    if not buckets or min(buckets) < 1:
        raise KilnError(f"--batch-buckets {text!r}: give batch sizes >= 1 separated by commas", hint="--batch-buckets 1,2,4,8")
    return buckets


def _check_output(path: str | None, force: bool, hint: str = "use --force to replace it") -> None:
    """Refuse an output path before any work: a directory, a missing parent directory, an existing file without --force."""
    if path:
        from ..runtime.artifact import check_output_path

        check_output_path(path, force, replace_hint=hint)


def _check_weights(path: str) -> None:
    """``--weights`` must be a checkpoint directory with its config.json (a diffusers pipeline's in transformer/)."""
    hint = "an HF / diffusers checkpoint directory: config.json + *.safetensors, sharded or not"
    if not os.path.exists(path):
        raise KilnError(f"--weights {path}: no such directory", hint=hint)
    if not os.path.isdir(path):
        raise KilnError(f"--weights {path} is a file, not a checkpoint directory", hint=hint)
    if not any(os.path.isfile(os.path.join(path, *f)) for f in (("config.json",), ("transformer", "config.json"))):
        raise KilnError(f"--weights {path} has no config.json", hint=hint)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _emit_onnx(graph, path: str, progress) -> None:
    from ..ir.onnx import save_onnx

    with progress.step(f"write ONNX {path}"):
        save_onnx(graph, path)
