"""A missing or broken module of this project fails; it never turns into a skip or a silently smaller feature.

Guards stay only for what is optional by design: third-party packages (Triton on macOS, diffusers in a test)
and the compiled ``eekernels._C`` (built only where a GPU or EEKERNELS_CUDA_ARCHS asks for it; setup.py).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL_OWN = {"eekernels._C"}  # read through eekernels._ext, which says how to build it


def _own_imports(node: ast.AST) -> list[str]:
    """The eekernels modules that the statements under `node` import (import, from-import, import_module)."""
    found = []
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            found += [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            found += [n.module] + [f"{n.module}.{a.name}" for a in n.names]
        elif (isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", None)) in
              ("import_module", "importorskip") and n.args and isinstance(n.args[0], ast.Constant)
              and isinstance(n.args[0].value, str)):
            found.append(n.args[0].value)
        elif isinstance(n, ast.JoinedStr) and any(isinstance(v, ast.Constant) and str(v.value).startswith("eekernels.")
                                                  for v in n.values):
            found.append("eekernels.<formatted>")
    return [m for m in found if (m == "eekernels" or m.startswith("eekernels.")) and m not in OPTIONAL_OWN]


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(getattr(n, "id", getattr(n, "attr", None)) in ("ImportError", "ModuleNotFoundError", "Exception")
               for n in names if n is not None) or handler.type is None


def test_no_import_guard_on_our_own_modules():
    """No try/except ImportError around an eekernels import, no importorskip of one, anywhere in the tree."""
    offenders = []
    for folder in ("eekernels", "tests", "python", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
                    guarded = _own_imports(ast.Module(body=node.body, type_ignores=[]))
                    if guarded:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} guards {sorted(set(guarded))}")
                if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
                        and _own_imports(node)):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} importorskip of {_own_imports(node)}")
    assert not offenders, "a missing module of ours must fail, not skip:\n" + "\n".join(offenders)


def test_a_missing_model_family_fails_configs(monkeypatch):
    """eekernels.models.configs() used to drop a family whose module was missing ("not in this checkout (yet)")."""
    import eekernels.models as models

    monkeypatch.setitem(sys.modules, "eekernels.models.flux", None)  # as if flux.py were gone
    with pytest.raises(ModuleNotFoundError, match="eekernels.models.flux"):
        models.configs()


def test_accelerate_needs_eekernels_graphs():
    """_accelerate imports eekernels.graphs plainly; it used to run without graphs when that import failed."""
    code = ("import sys; sys.modules['eekernels.graphs'] = None\n"
            "try:\n    import eekernels._accelerate\nexcept ImportError as e:\n    print('ImportError', e)\n"
            "else:\n    print('imported without eekernels.graphs')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("ImportError") and "eekernels.graphs" in res.stdout, res.stdout
