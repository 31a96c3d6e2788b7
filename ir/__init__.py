"""kiln's IR: types, the closed op set, graphs, serialization, binding and the reference interpreter.

The op set is ``ops.py`` (the base ops, the table and the helpers every op definition uses) plus
``ops_fused.py`` (the ops the pass pipeline fuses into) and ``ops_collective.py`` (tensor parallelism's collectives),
which fill the same table: importing this package loads them all, so ``kiln.ir.ops.OPS`` is always the whole op set.
"""
from . import ops_collective, ops_fused  # noqa: F401  (complete ops.OPS; see above)
