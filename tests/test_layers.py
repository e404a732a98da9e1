"""The package's import graph, read with `ast` (module-level and function-level imports):
no cycles, and every import points to the same or a lower layer."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fasq"

# lowest first; a module's layer is that of the longest prefix listed
LAYERS = [
    ("fasq.version", "fasq.core"),  # configs, storage format, reference ops, PQLinear
    ("fasq.kernels",),              # kernels beside their references
    ("fasq.quant",),                # k-means, PQ and RTN, importance, tensor-parallel fits, solver
    ("fasq.io",),                   # checkpoint files, sources, save and load
    ("fasq.integrations",),         # transformers, vLLM
    ("fasq.stream",),               # the quantization pipeline
    ("fasq.eval",),                 # data, perplexity, zero-shot, speed, baselines
    ("fasq.cli", "fasq"),           # entry points
]


def _modules() -> dict[str, Path]:
    mods = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(name: str, path: Path, mods) -> set[str]:
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
                break
    return found


def _graph():
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _layer(name: str) -> int:
    best = (-1, None)
    for i, group in enumerate(LAYERS):
        for prefix in group:
            inside = name.startswith(prefix + ".") and prefix != "fasq"  # the package itself: its __init__ only
            if (name == prefix or inside) and len(prefix) > best[0]:
                best = (len(prefix), i)
    assert best[1] is not None, f"{name} is in no layer: add it to LAYERS"
    return best[1]


def _cycles(graph) -> list[list[str]]:
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def _upward(graph) -> list[str]:
    return sorted(f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
                  for m, deps in graph.items() for d in deps if _layer(d) > _layer(m))


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_point_down_the_layers():
    up = _upward(_graph())
    assert not up, "imports from a higher layer:\n" + "\n".join(up)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    pkg = tmp_path / "fasq"
    for sub in ("core", "kernels", "quant"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "config.py").write_text("from .ops import x\n")
    (pkg / "core" / "ops.py").write_text("def f():\n    from . import config\n    from ..quant import solver\n")  # inside a function counts too
    (pkg / "quant" / "solver.py").write_text("")
    (pkg / "kernels" / "__init__.py").write_text("from ..cli import main\n")
    (pkg / "cli.py").write_text("")
    monkeypatch.setitem(globals(), "SRC", pkg)
    g = _graph()
    assert _cycles(g) == [["fasq.core.config", "fasq.core.ops", "fasq.core.config"]]
    assert _upward(g) == ["fasq.core.ops (layer 0) imports fasq.quant.solver (layer 2)",
                          "fasq.kernels (layer 1) imports fasq.cli (layer 7)"]
