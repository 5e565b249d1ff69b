"""The README's two set-up commands stay true: CI runs the test command verbatim."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", text)
    assert m, f"README.md has no {marker} block"
    return m.group(1).strip()


def test_readme_has_exactly_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert len(re.findall(r"<!-- (main|test)-command -->", text)) == 2
    assert "eekernels sample" in _command("main-command")
    assert "pytest" in _command("test-command")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci or "test-command" in ci, ".ci/run must read the README's test command"
