"""The family table (eekernels.families): one declaration per family, read by accelerate, the loaders, configs(),
the trainer and `eekernels info`; a family added in a test touches no other module."""
import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import eekernels
from eekernels import ExitSchedule, families, inplace
from eekernels.families import Family, PrefixExit

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# A toy family, registered here and nowhere else
# --------------------------------------------------------------------------------------------------
class ToyBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x, c):
        return x + torch.tanh(self.lin(x) + c[:, None])


class ToyModel(nn.Module):
    def __init__(self, dim=12, depth=5):
        super().__init__()
        self.t_proj = nn.Linear(1, dim)
        self.early = nn.ModuleList(ToyBlock(dim) for _ in range(2))
        self.late = nn.ModuleList(ToyBlock(dim) for _ in range(depth - 2))
        self.head = nn.Linear(dim, 3)

    def forward(self, x, timestep):
        c = self.t_proj(timestep[:, None] / 1000)
        for b in (*self.early, *self.late):
            x = b(x, c)
        return self.head(x)


@pytest.fixture
def toy_family():
    fam = families.register(Family(name="toy", classes=(ToyModel,),
                                   exit=PrefixExit(blocks=("early", "late"),
                                                   streams={"early": (0, None, "x", None), "late": (0, None, "x", None)}),
                                   param_roles={"t-embedder": ("t_proj.",)}))
    yield fam
    families.unregister("toy")


def test_a_toy_family_runs_in_place_from_its_registration_alone(toy_family):
    from eekernels.training import frozen_prefixes

    torch.manual_seed(0)
    model, x = ToyModel().eval(), torch.randn(2, 7, 12)
    plain = copy.deepcopy(model)
    assert families.family_of(model) is toy_family
    assert "toy (ToyModel)" in families.supported()
    assert frozen_prefixes(model, "no-t-embedder") == ("t_proj.",)
    schedule = ExitSchedule.piecewise([5, 5, 4, 4, 3, 3, 2, 2, 1, 1])
    assert eekernels.accelerate(model, schedule=schedule) is model
    for t, d in ((50.0, 5), (450.0, 3), (950.0, 1)):
        with torch.no_grad():
            got = model(x, torch.full((2,), t))
            ref = copy.deepcopy(plain)
            ref.early, ref.late = ref.early[:min(d, 2)], ref.late[:max(0, d - 2)]  # depth counts early, then late
            assert torch.equal(got, ref(x, torch.full((2,), t))), (t, d)
    eekernels.disable(model)
    from eekernels.info import collect

    assert "toy" in collect()["families"]


def test_registration_is_checked():
    with pytest.raises(ValueError, match="already registered"):
        families.register(families.get("flux"))
    with pytest.raises(ValueError, match="`prediction` expected"):
        Family(name="x", exit=PrefixExit(blocks=("b",)), prediction="v")
    with pytest.raises(ValueError, match="expected an `exit` rule"):
        Family(name="x")
    with pytest.raises(ValueError, match="`native` and `native_build` go together"):
        Family(name="x", native="eekernels.models.dit:DiT")
    with pytest.raises(ValueError, match="eekernels.families.Family"):
        families.register("flux")
    with pytest.raises(ValueError, match="unknown family"):
        families.get("no-such")


def test_a_block_class_nobody_declared_is_refused_by_name():
    fam = families.register(Family(name="toy-undeclared", classes=(ToyModel,), exit=PrefixExit(blocks=("early",))))
    try:
        with pytest.raises(ValueError, match="ToyBlock is neither in diffusers' TransformerBlockRegistry"):
            eekernels.accelerate(ToyModel())
    finally:
        families.unregister(fam.name)


def test_every_family_file_registers_and_configs_come_from_the_table():
    table = families.families()
    for path in (ROOT / "eekernels" / "families").glob("[!_]*.py"):
        assert any(path.stem in name for name in table), f"{path.name} registers no family named after it"
    from eekernels.models import configs

    natives = {f.load("native") for f in table.values() if f.native}
    assert {cls for cls, _ in configs().values()} <= natives


def _family_names():
    out = set()
    for fam in families.families().values():
        for spec in (*fam.classes, *fam.pipelines):
            if isinstance(spec, str):
                out.add(spec.partition(":")[2])
    return out


def test_no_module_outside_the_table_dispatches_on_a_family_class():
    """A string literal that IS a family's class or pipeline name (what a dispatch table or a class-name test is made
    of) appears only in eekernels/families/: adding a family is one file. (Error messages may mention names.)"""
    names = _family_names()
    found = []
    for path in (ROOT / "eekernels").rglob("*.py"):
        if "families" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip() in names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "family names outside eekernels/families/:\n" + "\n".join(found)
