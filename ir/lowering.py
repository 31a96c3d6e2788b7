"""What the two importers (torch.export in ``ir/fx``, ONNX in ``ir/onnx``) share: the lowering loop and its
one collector of unsupported ops.

An importer is a :class:`Lowering`: it names the items of its source program (FX nodes, ONNX nodes), the
handler of each, where each comes from (file:line, node name), how to read an item's inputs and how to
store its value. :meth:`Lowering.lower_all` then lowers every item in order. A handler raises
:class:`Unsupported` for a call it cannot lower; the item's value is then :data:`POISON` and everything
reading it is skipped, so that every unsupported op of the program is listed, with its locations, in ONE
:class:`~kiln.errors.UnsupportedOpsError`. Any other exception is a kiln bug, reported with the location.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Callable

from ..errors import CaptureError, KilnError, UnsupportedOpsError

INT_MAX = 2**31 - 1  # upper bound stored for a symbol the source leaves unbounded


class Unsupported(Exception):
    """Raised by a handler: this call cannot be imported (the message says why)."""


class _Poison:
    """The value of an item that could not be imported; anything reading it is skipped."""

    def __repr__(self) -> str:
        return "POISON"


POISON = _Poison()


def poisoned(x) -> bool:
    """``x`` (a value, or a list / tuple / dict of values) holds POISON somewhere."""
    if x is POISON:
        return True
    if isinstance(x, (list, tuple)):
        return any(poisoned(v) for v in x)
    if isinstance(x, dict):
        return any(poisoned(v) for v in x.values())
    return False


class Lowering(ABC):
    """The lowering loop of one import. Subclasses define the hooks below."""

    source = "model"  # how errors name the program

    def __init__(self):
        self.loc: str | None = None  # location of the item being lowered (handlers stamp it on the nodes they add)
        self.unsupported: dict[str, list[str]] = {}

    # -- hooks ----------------------------------------------------------------------------------------------
    @abstractmethod
    def key(self, item) -> str:
        """The op name an item's handler is registered under."""

    @abstractmethod
    def where(self, item) -> str:
        """Where the item comes from, for error messages."""

    @abstractmethod
    def handler(self, item) -> Callable | None:
        """``fn(item, inputs) -> value`` lowering the item, or None when kiln has no handler for its op."""

    @abstractmethod
    def inputs(self, item):
        """The item's inputs as kiln values (POISON where an input could not be imported)."""

    @abstractmethod
    def store(self, item, value) -> None:
        """Record the item's value (POISON when it could not be lowered)."""

    # -- the loop -------------------------------------------------------------------------------------------
    def refuse(self, what: str, where: str) -> None:
        self.unsupported.setdefault(what, []).append(where)

    def lower_all(self, items: list) -> None:
        """Lower ``items`` in order; raise one UnsupportedOpsError listing everything that could not be."""
        for item in items:  # ops with no handler at all come first in the error, in program order
            if self.handler(item) is None:
                self.refuse(self.key(item), self.where(item))
        for item in items:  # lower the rest too, so the calls a handler refuses are listed in the same error
            fn = self.handler(item)
            ins = self.inputs(item) if fn is not None else None
            if fn is None or poisoned(ins):
                self.store(item, POISON)
                continue
            self.loc = self.where(item)
            try:
                value = fn(item, ins)
            except Unsupported as e:
                self.refuse(f"{self.key(item)} ({e})", self.loc)
                self.store(item, POISON)
                continue
            except KilnError:
                raise
            except Exception as e:  # a bug or an unexpected argument: say where it happened
                if os.environ.get("KILN_DEBUG"):
                    raise
                raise CaptureError(f"cannot import {self.key(item)} at {self.loc}: {type(e).__name__}: {e}",
                                   hint="rerun with KILN_DEBUG=1 for the traceback and report it") from e
            self.store(item, value)
        if self.unsupported:
            raise UnsupportedOpsError(self.unsupported, source=self.source)
