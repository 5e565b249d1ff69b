"""The README's two set-up commands stay true: CI runs the test command, and the slow tier, verbatim."""
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

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


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("awk") is None,
                    reason=".ci/run is a bash script that reads the README with awk; neither is on PATH here")
def test_ci_runs_the_readme_test_commands():
    """.ci/run reads both commands from the README (`--commands` prints what it would run, then stops)."""
    res = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--commands"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines() == [_command("test-command"), _command("slow-test-command")]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index('eval "$TEST_CMD"') < ci.index('eval "$SLOW_CMD"'), ".ci/run runs both tiers"


def test_the_default_tier_prints_skip_reasons_and_the_slow_command_runs_the_slow_tier(tmp_path):
    """With pyproject's options, the README's `pytest -q` prints why a test skipped and leaves out the tests
    marked slow; the README's slow-tier command runs exactly those (its later -m replaces the configured one)."""
    (tmp_path / "test_tiers.py").write_text(
        "import pytest\n"
        "def test_skipped():\n    pytest.skip('the reason is shown')\n"
        "@pytest.mark.slow\ndef test_slow():\n    pass\n"
        "def test_plain():\n    pass\n")

    def run(command: str) -> str:
        args = shlex.split(command)
        args = args[args.index("pytest") + 1:]  # the README's options for pytest, on a small file of our own
        res = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
                              str(tmp_path), *args, str(tmp_path / "test_tiers.py")], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
        return res.stdout

    default = run(_command("test-command").split("&&")[-1])
    assert "SKIPPED [1] test_tiers.py:3: the reason is shown" in default, default
    assert "1 passed, 1 skipped, 1 deselected" in default, default
    slow = run(_command("slow-test-command"))
    assert "1 passed, 2 deselected" in slow, slow


def test_readme_family_table_lists_every_family_in_the_table():
    """The README's family table has one row per registered family (and no row for a family that is not one)."""
    from eekernels import families

    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- family-table -->", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \|", block, flags=re.M)
    assert sorted(rows) == sorted(families.families()), (sorted(rows), sorted(families.families()))
