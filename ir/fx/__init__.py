"""torch.export in: capturing a module (:mod:`.capture`, with the workarounds torch versions need) and importing
the ExportedProgram into kiln's IR (:mod:`.importer`, lowering each aten call by its handler)."""
from .importer import from_exported

__all__ = ["from_exported"]
