"""The package's layers (docs/design.md): each module imports only from its own layer or the ones below it, and
no two modules import each other, directly or through others. Function-local (lazy) imports count too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "eekernels"

# Lowest first. A module's layer is that of its longest matching prefix.
LAYERS = [
    ("eekernels._backend", "eekernels._ext", "eekernels.serialization", "eekernels._version", "eekernels._hook_chain"),
    ("eekernels.ops",),
    ("eekernels.data",),
    ("eekernels.models", "eekernels.families", "eekernels.patches"),
    ("eekernels.schedules",),
    ("eekernels.graphs", "eekernels.samplers"),
    ("eekernels.training", "eekernels._accelerate", "eekernels.inplace", "eekernels.calibration",
     "eekernels.pipeline_calibration"),
    ("eekernels.eval",),
    ("eekernels.jobs", "eekernels.info", "eekernels.cli", "eekernels.__main__"),
]
ROOT = "eekernels"  # the package's __init__: the public facade, allowed to import (lazily) from every layer


def layer_of(module: str) -> int | None:
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    return rank


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every eekernels module ``path`` imports, anywhere in the file (``from eekernels.x import y`` gives
    ``eekernels.x.y`` when that is a module, else ``eekernels.x``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(ROOT))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith(ROOT):
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if _is_module(sub) else mod)
    found.discard(me)
    return found


def _is_module(name: str) -> bool:
    p = PKG.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_module_has_a_layer():
    missing = [m for m in _graph() if m != ROOT and layer_of(m) is None]
    assert not missing, f"modules with no layer in tests/test_layers.py LAYERS (add them): {missing}"


def test_no_upward_imports():
    bad = []
    for mod, deps in _graph().items():
        if mod == ROOT:
            continue
        for dep in sorted(deps):
            if dep == ROOT:
                bad.append(f"{mod} imports the package root (import the module it needs instead)")
            elif layer_of(dep) is not None and layer_of(dep) > layer_of(mod):
                bad.append(f"{mod} (layer {layer_of(mod)}) imports {dep} (layer {layer_of(dep)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()

    def resolve(dep: str) -> str:  # `from eekernels.models import DiT` depends on the package module
        return dep if dep in graph else dep.rpartition(".")[0]

    edges = {m: {resolve(d) for d in deps if resolve(d) in graph and resolve(d) != ROOT} for m, deps in graph.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle of design: drop parent -> child edges.
    for m in edges:
        edges[m] = {d for d in edges[m] if not d.startswith(m + ".")}
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("source,expected", [
    ("from eekernels.ops import layer_norm\n", {"eekernels.ops.layer_norm"}),
    ("import eekernels.schedules as s\n", {"eekernels.schedules"}),
    ("def f():\n    from eekernels.jobs import sample\n", {"eekernels.jobs.sample"}),
])
def test_the_scan_sees_imports(tmp_path, source, expected, monkeypatch):
    """The scanner itself: top-level, aliased and function-local imports are all found."""
    f = PKG / "ops" / "_layer_scan_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == f else Path.read_bytes(self).decode())
    assert imports_of(f) == expected
