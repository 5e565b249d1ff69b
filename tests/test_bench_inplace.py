"""benchmarks/bench_inplace.py --quick: every family and row, and the invariants behind RESULTS.md's full run.

- in place at full depth gives plain's final latents bit for bit;
- in place at ~0.7 gives the native tier's latents at the same schedule within 1e-4 (relative), and both run the
  schedule's depths: the blocks counted by hooks (U-Net: the FLOPs counted) equal what the plan declares;
- the early-exit rows and the peer (FirstBlockCache; DeepCache for the U-Net) really skip work and move the result.
"""
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_inplace  # noqa: E402


def test_quick_mode_has_every_row_and_the_invariants(tmp_path):
    out = tmp_path / "bench_inplace.json"
    lines = []
    bench_inplace.main(["--quick", "--json", str(out)], log=lines.append)
    doc = json.loads(out.read_text())
    assert doc["info"]["threads"] == 1 and doc["info"]["mode"] == "quick" and doc["info"]["rounds"] == 2
    assert [f["family"] for f in doc["families"]] == list(bench_inplace.FAMILIES)
    table = "\n".join(lines)
    for f in doc["families"]:
        rows = f["rows"]
        names = [r["row"] for r in rows]
        assert names[:4] == ["plain", "in place full", "in place ~0.7", "native ~0.7"], names
        assert names[4].startswith("DeepCache (" if f["family"] == "ddim" else "FirstBlockCache (threshold "), names
        assert f["unit"] == ("FLOPs" if f["family"] == "ddim" else "blocks")
        for r in rows:
            for key in ("seconds", "seconds_min", "seconds_max", "ratio", "cpu_ratio", "fraction", "run_flop_fraction"):
                assert math.isfinite(r[key]) and r[key] > 0, (f["family"], r["row"], key, r[key])
            assert r["seconds_min"] <= r["seconds"] <= r["seconds_max"]
            assert r["calls"] == f["calls"] == f["steps"]  # one batched model call per step (CFG in the batch)
            assert f"| {f['pipeline']} | {r['row']} |" in table
        plain, full, inplace, native, peer = rows
        checks = f["checks"]
        # Full depth in place: the plain pipeline's latents, bit for bit, and every block run.
        assert checks["in_place_full_bit_identical"] and full["rel_diff"] == 0.0
        assert plain["rel_diff"] == 0.0 and full["fraction"] == plain["fraction"] == 1.0
        assert checks["in_place_full_counted"] == checks["full_counted"]
        # ~0.7: counted as declared, the native tier at the same schedule agrees.
        assert checks["in_place_07_counted"] == checks["declared"] < checks["full_counted"]
        assert checks["native_depths_match_plan"]
        assert inplace["fraction"] == native["fraction"] == round(f["schedule"]["fraction"], 4)
        assert 0.55 <= inplace["fraction"] <= 0.8
        assert checks["in_place_07_vs_native_07"] <= 1e-4
        assert inplace["rel_diff"] > 1e-4 and abs(native["rel_diff"] - inplace["rel_diff"]) <= 1e-4
        # The peer skips some of the work and moves the result.
        assert 0.3 < peer["fraction"] < 1.0 and peer["rel_diff"] > 0
        # One hook per block and one on the model (U-Net, 3 levels: 3 down, 2 downsamplers, 3 up, the mid block);
        # each costs microseconds, not milliseconds.
        overhead = f["hook_overhead"]
        assert overhead["hooks_per_call"] == (f["total_depth"] + 1 if f["unit"] == "blocks" else 3 + 2 + 3 + 1 + 1)
        assert 0 < overhead["model_hook_us"] < 1000 and 0 < overhead["block_hook_us"] < 1000, overhead
