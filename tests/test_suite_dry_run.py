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
    assert ops == {"layer_norm", "modulated_layer_norm", "gated_residual_norm", "group_norm_act", "linear_act",
                   "rms_norm", "qk_norm_rope", "fp8_linear"}
    assert all(r["status"] == "ok" or r["status"].startswith("unavailable") for r in report["correctness"])
    assert any(r["impl"] == "triton" and r["status"] == "ok" for r in report["correctness"])
    timed = [r for r in report["timings"] if r.get("status") == "ok"]
    assert {r["op"] for r in timed} == ops and all(r["ms"] > 0 for r in timed)
    assert res.stdout.rstrip().splitlines()[-1].startswith("Ceilings:")  # the table is printed last
    # fp8_linear: the dequantizing torch path ran and matched its float64 spec; scaled_mm says why not here
    fp8 = {r["impl"]: r for r in report["correctness"] if r["op"] == "fp8_linear"}
    assert fp8["torch"]["status"] == "ok" and fp8["auto"]["status"] == "ok"
    assert fp8["scaled_mm"]["status"].startswith("unavailable: scaled_mm: needs CUDA")
    # static analysis: the subprocess ran (one op in --dry-run) and its JSON report is embedded
    static = report["static_analysis"]
    assert static["status"] == "ok", static
    assert [r["op"] for r in static["report"]["triton"]] == ["rms_norm"]
    assert static["report"]["triton"][0]["registers"] > 0
    assert "| rms_norm | _rms_norm_kernel |" in res.stdout
    # models: the eager rows ran; the compiled rows say why not; graphs need CUDA
    models = {(r["section"], r["system"]): r for r in report["models"]}
    for key in [("forward", "plain torch eager"), ("forward", "eekernels eager"),
                ("forward", "eekernels + to_fp8 (per row), eager"), ("sampling", "plain torch eager"),
                ("sampling", "eekernels eager")]:
        assert models[key]["status"] == "ok" and models[key]["ms"] > 0, models[key]
    compiled = [k for k in models if "torch.compile" in k[1]]
    assert len(compiled) == 4 and all(models[k]["status"] == "skipped: no torch.compile in --dry-run"
                                      for k in compiled)
    assert models[("sampling", "eekernels CUDA graphs")]["status"].startswith("unavailable: CUDA graphs")
    # fp8 is quantized, so not bit-equal to the float32 model, and eekernels eager samples match plain torch
    assert 0 < models[("forward", "eekernels + to_fp8 (per row), eager")]["rel_err_vs_fp32"] < 0.05
    assert models[("sampling", "eekernels eager")]["rel_err_vs_plain_eager"] < 1e-4
    # text-to-image: diffusers' PixArt pipeline against accelerate() at full depth and under the ASE schedule
    text = {r["system"]: r for r in report["text_pipelines"]}
    assert set(text) == {"diffusers", "eekernels full", "eekernels ASE"}, report["text_pipelines"]
    assert all(r["images_per_s"] > 0 for r in text.values())
    assert text["eekernels full"]["max_abs_diff"] < 1e-3 and text["eekernels ASE"]["block_flop_fraction"] < 1
    # calibration: a schedule within the budget, its cost against one sampling run (graphs: on a GPU only)
    cal = report["calibration"]
    assert "error" not in cal, cal
    assert cal["measure"] == "prefix" and cal["block_flop_fraction"] <= 0.7 and len(cal["plan"]) == cal["steps"]
    assert cal["calibration_s"] > 0 and cal["one_sampling_run_s"] > 0 and "syncs_in_replayed_run" not in cal


def test_models_table_renders_every_status():
    rows = [{"section": "forward", "system": "plain torch eager", "status": "ok", "ms": 54.1, "vs_plain_eager": 1.0,
             "rel_err_vs_fp32": 0.0172},
            {"section": "forward", "system": "plain torch, torch.compile default", "status": "ok", "ms": 40.0,
             "compile_s": 61.2, "vs_plain_eager": 1.3525, "rel_err_vs_fp32": 0.017},
            {"section": "sampling", "system": "eekernels CUDA graphs", "status": "skipped: time budget spent"}]
    table = gpu_suite.models_table(rows).splitlines()
    assert table[2] == "| forward | plain torch eager | 54.10 |  | 1.00× | 1.72e-02 | ok |"
    assert table[3] == "| forward | plain torch, torch.compile default | 40.00 | 61.2 | 1.35× | 1.70e-02 | ok |"
    assert table[4] == "| sampling | eekernels CUDA graphs |  |  |  |  | skipped: time budget spent |"


def test_compiled_rows_are_not_started_past_the_budget():
    """A deadline already passed: every compiled row is skipped with its estimate, nothing compiles."""
    import time

    rows = gpu_suite.run_models("cpu", dry=True, compile_=True, deadline=time.time() + 30)
    skipped = [r for r in rows if "torch.compile" in r["system"]]
    assert len(skipped) == 4
    assert all(r["status"].startswith("skipped: time budget (needs ~") for r in skipped), skipped


def test_static_analysis_failure_is_reported():
    started = gpu_suite.static_analysis_start(dry=True)
    started[0].kill()
    out = gpu_suite.static_analysis_finish(started, 30)
    assert out["status"].startswith("error: exit"), out
