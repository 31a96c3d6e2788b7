"""kiln's IR: types, the closed op set, graphs, serialization, binding and the reference interpreter.

The op set is ``ops.py`` (the base ops, the table and the helpers every op definition uses) plus
``ops_fused.py`` (the ops the pass pipeline fuses into), which fills the same table: importing this package
loads both, so ``kiln.ir.ops.OPS`` is always the whole op set.
"""
from . import ops_fused  # noqa: F401  (completes ops.OPS; see above)
