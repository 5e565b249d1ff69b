"""benchmarks/bad_inputs.py (the "bad inputs tried" table of RESULTS.md) as a regression test: every bad input, in
every category, gets a named error. The one other outcome allowed is the documented schema class: a direct
``torch.ops.eekernels.*`` call given a value of the wrong Python type, which torch's dispatcher refuses naming the
argument and the expected type before eekernels' code runs. Nothing is silent, unnamed, a crash or loses data."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bad_inputs.py"


def test_every_bad_input_gets_a_named_error(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bad_inputs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--json", str(tmp_path / "cases.json")]) == 0
    rows = json.loads((tmp_path / "cases.json").read_text())
    assert len(rows) > 1600
    assert {r["outcome"] for r in rows} <= set(mod.OUTCOMES)
    wrong = [r for r in rows if not (r["outcome"] == "named" or (r["outcome"] == "schema"
                                                                 and r["category"] == "ops (torch.ops)"))]
    assert not wrong, f"{len(wrong)} case(s) not named: {wrong[:10]}"
    # the schema class is what the script's docstring says: torch's refusal, naming the argument and its type
    schema = [r for r in rows if r["outcome"] == "schema"]
    assert all("Expected a value of type" in r["detail"] and "for argument '" in r["detail"] for r in schema), schema
    # every category is exercised, and the table printed on stdout counts them all
    table = capsys.readouterr().out
    assert f"| **all** | {len(rows)} | {sum(r['outcome'] == 'named' for r in rows)} | {len(schema)} | 0 | 0 | 0 | 0 |" \
        in table, table
