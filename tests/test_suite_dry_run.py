"""benchmarks/gpu_suite.py imports and runs end to end on the CPU (``--dry-run``): the correctness and
timing code paths and the markdown table, at tiny sizes. The GPU run itself happens on a GPU machine."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


def test_tables_render_every_status():
    timings = [
        {"op": "modulated_layer_norm", "shape": "(64, 256, 1152)", "provider": "eager", "status": "ok", "ms": 0.158,
         "ms_p20": 0.157, "ms_p80": 0.159, "TBps": 0.48, "vs_baseline": 1.0, "baseline": "eager"},
        {"op": "modulated_layer_norm", "shape": "(64, 256, 1152)", "provider": "cuda",
         "status": "unavailable: cuda: eekernels._C is not built"},
        {"op": "linear_act", "shape": "M×K", "provider": "cublas", "status": "ok", "ms": 0.29, "ms_p20": 0.28,
         "ms_p80": 0.3, "TFLOPs": 600.0, "vs_baseline": 0.89, "baseline": "F.linear"},
    ]
    table = gpu_suite.timing_table(timings, {"copy_TBps": 3.0, "gemm_bf16_TFLOPs": 787.0})
    lines = table.splitlines()
    assert lines[0].startswith("| op | shape | provider | median µs")
    assert "| 158.0 | 157.0–159.0 | 0.48 |" in table
    assert "unavailable: cuda: eekernels._C is not built" in table
    assert "0.89× F.linear" in table and "≥ 0.95× F.linear" in table
    assert lines[-1] == "Ceilings: copy_TBps 3.00, gemm_bf16_TFLOPs 787.00"
    corr = gpu_suite.correctness_table([{"op": "layer_norm", "shape": "(2, 5, 72)", "dtype": "bfloat16",
                                         "impl": "triton", "status": "MISMATCH", "rel_err": 0.5}])
    assert "| layer_norm | (2, 5, 72) | bfloat16 | triton | MISMATCH | 5.00e-01 |" in corr


def test_refuses_without_gpu_unless_dry_run():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the no-GPU refusal is not reachable here")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "--dry-run" in res.stderr


def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "suite.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    ops = {r["op"] for r in report["correctness"]}
    assert ops == {"layer_norm", "modulated_layer_norm", "gated_residual_norm", "group_norm_act", "linear_act"}
    assert all(r["status"] == "ok" or r["status"].startswith("unavailable") for r in report["correctness"])
    assert any(r["impl"] == "triton" and r["status"] == "ok" for r in report["correctness"])
    timed = [r for r in report["timings"] if r.get("status") == "ok"]
    assert {r["op"] for r in timed} == ops and all(r["ms"] > 0 for r in timed)
    assert res.stdout.rstrip().splitlines()[-1].startswith("Ceilings:")  # the table is printed last
