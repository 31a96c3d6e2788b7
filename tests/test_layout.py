"""The package's shape, as design.md lays it out: one floor per layer (a module imports its own layer or lower
ones, no two modules import each other, however indirectly), and functions that read in one screen."""
import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent  # the repository root is the package

# bottom first. A module belongs to the most specific entry naming it or a package above it; entries in EXACT
# name only the package's own __init__ (a new module of that package must be placed explicitly)
LAYERS = [
    ("errors", "version", "numerics"),
    ("ir.types", "ir.registry", "ir.quant", "ir.kv_quant"),
    ("ir.ops", "ir.ops_fused", "ir.ops_collective"),
    ("ir.graph",),
    ("ir.serialize", "ir.bind", "ir.interpret"),
    ("ir.lowering", "ir.einsum", "ir.repeat"),
    ("ir.fx", "ir.onnx"),
    ("ir",),
    ("models",),
    ("passes",),
    ("config",),
    ("codegen.compile_pool",),  # Triton compiles in worker processes: imports no other kiln module (workers import it)
    ("codegen",),
    ("runtime",),
    ("api", "jit"),
    ("llm", "diffusion"),
    ("cli", "", "__main__"),
    ("testing",),  # helpers for tests and benchmarks: nothing in the product imports them
]
EXACT = {"ir", ""}
SKIP = {".venv", "tests", "bench", "build", "out", "__pycache__"}
MAX_LINES = 60


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if SKIP & set(rel.parts) or any(p.startswith(".") for p in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _layer(mod: str) -> int | None:
    best, depth = None, -1
    for k, entries in enumerate(LAYERS):
        for e in entries:
            hit = mod == e or (e not in EXACT and mod.startswith(e + "."))
            if hit and len(e) > depth:
                best, depth = k, len(e)
    return best


def _imports(mod: str, path: Path, mods: dict) -> list[tuple[str, int]]:
    """(module, line) of every kiln module ``mod`` imports, at the top or inside a function."""
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    package = [p for p in package if p]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] + ([node.module] if node.module else [])
            elif node.module and node.module.split(".")[0] == "kiln":
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                full = ".".join(base + [alias.name])
                target = full if full in mods else ".".join(base)
                if target in mods:
                    out.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "kiln" and ".".join(parts[1:]) in mods:
                    out.append((".".join(parts[1:]), node.lineno))
    return [(t, line) for t, line in out if t != mod]


def test_every_module_has_a_layer():
    unplaced = sorted(m or "kiln" for m in _modules() if _layer(m) is None)
    assert not unplaced, f"modules with no layer in tests/test_layout.py LAYERS: {unplaced}"


def test_no_import_circle_and_no_upward_import():
    mods = _modules()
    graph = nx.DiGraph()
    upward = []
    for mod, path in mods.items():
        graph.add_node(mod)
        for target, line in _imports(mod, path, mods):
            graph.add_edge(mod, target)
            lo, hi = _layer(mod), _layer(target)
            if lo is not None and hi is not None and hi > lo:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports kiln.{target} (layer {hi} > {lo})")
    circles = [" -> ".join("kiln." + m if m else "kiln" for m in c + c[:1]) for c in nx.simple_cycles(graph)]
    assert not circles and not upward, "\n".join(["import circles:"] + circles + ["upward imports:"] + upward)


def test_functions_fit_in_one_screen():
    """No function over 60 lines, outside the hand-written Triton kernels (codegen/kernels)."""
    long = []
    for mod, path in _modules().items():
        if mod.startswith("codegen.kernels"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)
