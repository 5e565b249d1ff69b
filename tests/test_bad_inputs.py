"""benchmarks/bad_inputs.py (the "bad inputs tried" table of RESULTS.md §8) as a regression test: no bad input
crashes, loses data or is accepted, except the documented schema case (torch.ops converts a bool eps to 1.0)."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bad_inputs.py"


def test_every_bad_input_gets_a_clear_error(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bad_inputs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--json", str(tmp_path / "cases.json")]) == 0
    rows = json.loads((tmp_path / "cases.json").read_text())
    assert len(rows) > 600
    by = lambda outcome: [r for r in rows if r["outcome"] == outcome]  # noqa: E731
    assert not by("crash"), by("crash")[:5]
    assert not by("data lost"), by("data lost")
    silent = by("silent")
    assert all(r["category"] == "ops (torch.ops)" and ("eps: a bool" in r["case"] or "num_groups: a bool" in r["case"])
               for r in silent), silent
    assert len(by("unnamed")) <= 1, by("unnamed")
