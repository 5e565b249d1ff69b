"""benchmarks/bench_inplace.py --quick: every family and row, and the invariants behind RESULTS.md's full run.

- in place at full depth gives plain's final latents bit for bit;
- in place at ~0.7 gives the native tier's latents at the same schedule within 1e-4 (relative), and both run the
  schedule's depths: the blocks counted by hooks (U-Net: the FLOPs counted) equal what the plan declares;
- the early-exit rows and the peers (FirstBlockCache, TaylorSeer, MagCache; DeepCache for the U-Net) really skip
  work and move the result; a peer diffusers cannot run on a family is listed with diffusers' error, not a row.
"""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_inplace  # noqa: E402
from eekernels import families  # noqa: E402


@pytest.mark.slow  # an end-to-end run of the benchmark: 127 s on the 2-core CPU
def test_quick_mode_has_every_row_and_the_invariants(tmp_path):
    out = tmp_path / "bench_inplace.json"
    lines = []
    bench_inplace.main(["--quick", "--json", str(out)], log=lines.append)
    doc = json.loads(out.read_text())
    assert doc["info"]["threads"] == 1 and doc["info"]["mode"] == "quick" and doc["info"]["rounds"] == 2
    assert [f["family"] for f in doc["families"]] == list(bench_inplace.FAMILIES)
    table = "\n".join(lines)
    for f in doc["families"]:
        rows = {r["row"].split(" (")[0]: r for r in f["rows"]}
        names = [r["row"] for r in f["rows"]]
        native = families.get(f["family_table"]).native is not None
        assert names[:3] == ["plain", "in place full", "in place ~0.7"], names
        assert ("native ~0.7" in names) == native, names
        peers = ["DeepCache"] if f["family"] == "ddim" else list(bench_inplace.PEERS)
        # every peer is a row, or is in `unsupported` with diffusers' own error
        assert sorted(list(f["peers"]) + list(f["unsupported"])) == sorted(peers), (f["peers"], f["unsupported"])
        assert [n.split(" (")[0] for n in names[3 + native:]] == [p for p in peers if p in f["peers"]], names
        assert f["unit"] == ("FLOPs" if f["family"] == "ddim" else "blocks")
        per_step = f["calls"] // f["steps"]
        assert f["calls"] == per_step * f["steps"] and per_step in (1, 2, 3)  # CFG in the batch, true CFG (2 calls), LTX-2 (3)
        for r in f["rows"]:
            for key in ("seconds", "seconds_min", "seconds_max", "ratio", "cpu_ratio", "fraction", "run_flop_fraction"):
                assert math.isfinite(r[key]) and r[key] > 0, (f["family"], r["row"], key, r[key])
            assert r["seconds_min"] <= r["seconds"] <= r["seconds_max"]
            assert r["calls"] == f["calls"]
            assert f"| {f['pipeline']} | {r['row']} |" in table
        plain, full, inplace = rows["plain"], rows["in place full"], rows["in place ~0.7"]
        checks = f["checks"]
        # Full depth in place: the plain pipeline's latents, bit for bit, and every block run.
        assert checks["in_place_full_bit_identical"] and full["rel_diff"] == 0.0
        assert plain["rel_diff"] == 0.0 and full["fraction"] == plain["fraction"] == 1.0
        assert checks["in_place_full_counted"] == checks["full_counted"]
        # ~0.7: counted as declared; the native tier at the same schedule agrees.
        assert checks["in_place_07_counted"] == checks["declared"] < checks["full_counted"]
        assert inplace["fraction"] == round(f["schedule"]["fraction"], 4)
        assert 0.55 <= inplace["fraction"] <= 0.8
        assert inplace["rel_diff"] > 1e-5  # float32 noise is ~1e-7; FLUX.2's tiny model moves ~9e-5
        if native:
            assert checks["native_depths_match_plan"]
            assert rows["native ~0.7"]["fraction"] == inplace["fraction"]
            assert checks["in_place_07_vs_native_07"] <= 1e-4
            assert abs(rows["native ~0.7"]["rel_diff"] - inplace["rel_diff"]) <= 1e-4
        # The peers skip some of the work and move the result.
        for p in f["peers"]:
            assert 0.3 < rows[p]["fraction"] < 1.0 and rows[p]["rel_diff"] > 0, (f["family"], p, rows[p])
        # One hook per block and one on the model (U-Net, 3 levels: 3 down, 2 downsamplers, 3 up, the mid block);
        # each costs microseconds, not milliseconds.
        overhead = f["hook_overhead"]
        assert overhead["hooks_per_call"] == (f["total_depth"] + 1 if f["unit"] == "blocks" else 3 + 2 + 3 + 1 + 1)
        assert 0 < overhead["model_hook_us"] < 1000 and 0 < overhead["block_hook_us"] < 1000, overhead


def test_gpu_shapes_build_the_three_configs_and_refuse_without_cuda(monkeypatch):
    """``--gpu-shapes`` builds the three full-size configs (on ``meta``: Wan 2.1-1.3B, FLUX.2 [dev]-shaped 32B,
    Qwen-Image-shaped 20B) and, without CUDA, stops with a message saying it needs a GPU, before any run."""
    import pytest
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lines = []
    with pytest.raises(SystemExit, match="needs a GPU"):
        bench_inplace.main(["--gpu-shapes"], log=lines.append)
    assert len(lines) == 3, lines
    for line, model, millions in zip(lines, ("WanTransformer3DModel", "Flux2Transformer2DModel",
                                             "QwenImageTransformer2DModel"), (1419.0, 32223.3, 20430.4)):
        assert f"{model} {millions}M parameters" in line, line


def test_gpu_shapes_tiny_runs_the_same_code_on_the_cpu(tmp_path):
    """``--gpu-shapes --tiny``: the GPU mode's code (pipelines, rows applied and removed on one pipeline) at tiny
    sizes. Plain and in place full agree bit for bit where a family is registered (Qwen-Image here; Wan and FLUX.2
    are other branches' families: their in-place rows are listed as not run); FirstBlockCache skips blocks or is
    listed with diffusers' error (FLUX.2 in diffusers 0.42)."""
    out = tmp_path / "gpu.json"
    doc = bench_inplace.main(["--gpu-shapes", "--tiny", "--json", str(out)], log=lambda *a: None)
    assert json.loads(out.read_text())["info"]["tiny"] is True
    shapes = {s["pipeline"]: s for s in doc["shapes"]}
    assert list(shapes) == ["WanPipeline", "Flux2Pipeline", "QwenImagePipeline"]
    for s in shapes.values():
        rows = {r["row"].split(" (")[0]: r for r in s["rows"]}
        assert rows["plain"]["rel_diff"] == 0 and rows["plain"]["blocks_fraction"] == 1.0
        if "in place" in s["not_run"]:
            assert "no eekernels family" in s["not_run"]["in place"]
        else:
            assert rows["in place full"]["rel_diff"] == 0 and rows["in place full"]["blocks_fraction"] == 1.0
            assert 0.5 <= rows["in place ~0.7"]["blocks_fraction"] < 1 and rows["in place ~0.7"]["rel_diff"] > 0
        if "FirstBlockCache" in s["not_run"]:
            assert s["pipeline"] == "Flux2Pipeline", s["not_run"]
        else:
            assert rows["FirstBlockCache"]["blocks_fraction"] < 1
    assert "in place" not in shapes["QwenImagePipeline"]["not_run"]
