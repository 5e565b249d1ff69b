"""``enable_model_cpu_offload`` on every family's accelerated pipeline (issue 22's checklist), one test per Case
that the family test modules define."""
import importlib
import pathlib

import pytest

from tests.families import operations
from tests.families.harness import Case


def _cases() -> dict[str, list[Case]]:
    """{family test module: the pipeline Cases it defines}."""
    out = {}
    for path in sorted(pathlib.Path(__file__).parent.glob("test_*.py")):
        if path.stem != "test_every_family_offload":
            module = importlib.import_module(f"tests.families.{path.stem}")
            out[path.stem] = [v for v in vars(module).values() if isinstance(v, Case) and v.make_pipeline is not None]
    return out


MODULES = _cases()
CASES = sorted({c.name: c for cases in MODULES.values() for c in cases}.values(), key=lambda c: c.name)


def test_every_family_module_gives_a_case():
    assert len(MODULES) >= 14 and all(MODULES.values()), {k: len(v) for k, v in MODULES.items()}


# a case that names this check in its ``slow_checks`` (minutes on the 2-core CPU) runs in the slow tier
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if "model_cpu_offload" in c.slow_checks
                                  else c for c in CASES], ids=[c.name for c in CASES])
def test_model_cpu_offload(case):
    operations.model_cpu_offload(case)
