"""python/examples/ run as a user runs them: each script in a subprocess on the CPU, with tiny settings.

Each example checks its own claims (full depth equals the original, the model ran the schedule's depths,
fine-tuning lowers the truncated network's loss) with asserts, so a zero exit status means they held.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "python" / "examples"

# (script, arguments, files it must write relative to its working directory)
CASES = [
    ("01_dit_sample_loop.py", ["--steps", "4", "--num-images", "4", "--out", "ex01.png"], ["ex01.png"]),
    ("02_diffusers_pipeline.py", ["--steps", "3", "--out", "ex02"], ["ex02/dit.png", "ex02/ddpm.png"]),
    ("03_custom_schedule.py", ["--steps", "6", "--num-images", "2"], []),
    ("04_finetune_own_model.py", ["--steps", "12", "--batch-size", "8", "--out", "ex04"],
     ["ex04/your_dit_ase.pt", "ex04/samples.png", "ex04/checkpoint.pt"]),
    ("05_text_to_image.py", ["--steps", "5", "--num-images", "2", "--out", "ex05.png"], ["ex05.png"]),
    ("06_flow_matching.py", ["--steps", "5", "--out", "ex06"], ["ex06/sd3.png", "ex06/flux.png"]),
    ("07_register_family.py", [], []),
]


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("[0-9]*.py")) == sorted(c[0] for c in CASES)


@pytest.mark.parametrize("script, args, outputs", CASES, ids=[c[0] for c in CASES])
def test_example_runs(script, args, outputs, tmp_path):
    if script.startswith(("02", "05", "06")):
        pytest.importorskip("diffusers", reason="the diffusers example needs diffusers (pip install -e .[test])")
    # One thread: these models are tiny, and on a shared 2-core runner extra threads only wait for each other.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)  # as a user runs them: the CPU takes the torch reference ops
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for rel in outputs:
        assert (tmp_path / rel).is_file(), f"{script} did not write {rel}; stdout:\n{proc.stdout[-2000:]}"
