"""benchmarks/knee.py (issue 23's benchmark at the solver's knee): the forecast plans it searches and, on a
CI-sized run, that every peer row is paired against eekernels' best row and every budget row against the
fewer-steps row of its budget."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import knee  # noqa: E402

from eekernels.calibration import regular_forecast_plans  # noqa: E402


def forecast_candidates(L, steps, budget, max_candidates=12):
    """The candidates knee.forecast_plans scores on a DiT (the library's regular plans, up to the peer's tolerance,
    depth 0 included: ``min_reuse_depth`` 0)."""
    return regular_forecast_plans(L, steps, budget, max_candidates, over=knee.PEER_TOLERANCE, depths=range(0, L))


def test_forecast_candidates_hold_the_budget_window_and_taylorseers_shape():
    L, steps = 8, 20
    for b in (0.7, 0.5, 0.35):
        cands = forecast_candidates(L, steps, b, max_candidates=10_000)
        assert cands, b
        for p in cands:
            assert len(p) == steps and p[0] == L
            assert sum(v == L for v in p) >= 2  # a forecast extrapolates from two full calls
            assert b - 0.06 <= sum(p) / (L * steps) <= b + 0.02
            assert all(0 <= v <= L for v in p)
        depths = list(dict.fromkeys(min(p) for p in cands))
        assert [min(p) for p in cands[:len(depths)]] == depths  # the depths take turns
        for d in depths:  # each depth's plans spending most first
            mine = [p for p in cands if min(p) == d]
            assert mine == sorted(mine, key=lambda p: -sum(p))
    assert (L, 0, 0) * 6 + (L, 0) in forecast_candidates(L, steps, 0.35)  # TaylorSeer's interval 3, among 12
    # diffusers' TaylorSeer at interval 2 runs full depth every other call: the same shape, depth 1 between
    # (0.5625 of the blocks at 20 calls), is a candidate at 0.55
    alternate = tuple(L if i % 2 == 0 else 1 for i in range(steps))
    assert alternate in forecast_candidates(L, steps, 0.55, max_candidates=10_000)
    assert forecast_candidates(L, steps, 0.55, max_candidates=3) == \
        forecast_candidates(L, steps, 0.55, max_candidates=10_000)[:3]
    # five calls: two full calls are already 0.4 of the blocks, so nothing reaches 0.35
    assert forecast_candidates(L, 5, 0.35) == []


def test_budgets_quick_pairs_every_row(tmp_path, capsys):
    out = tmp_path / "knee.json"
    knee.main(["budgets", "--quick", "--sampler", "dpmsolver++", "--steps", "4", "--budgets", "0.7",
               "--calib-samples", "8", "--rows", "fewer-steps,calibrated-forecast,forecast,taylorseer,fastercache", "--json",
               str(out)])
    doc = json.loads(out.read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert {"full", "steps-2", "steps-3", "taylorseer@0.7"} <= set(rows)
    ours = [n for n in rows if n.startswith("forecast")]
    assert ours, sorted(rows)
    # the library's own joint search: its row samples what it chose (a forecast plan, or the fewer-steps plan)
    cal = doc["setup"]["calibrated-forecast@0.7"]
    assert "calibrated-forecast@0.7" in rows and cal["chose"] and rows["calibrated-forecast@0.7"]["steps"] == (
        cal["steps"] or 4)
    ours.append("calibrated-forecast@0.7")
    for n in ours + ["taylorseer@0.7", "fastercache@0.7"]:
        g = rows[n]["gap_vs_fewer_steps"]
        assert g["steps"] == 2 and g["lo"] <= g["diff"] <= g["hi"]
    best = min(ours, key=lambda n: rows[n]["frechet"])
    for n in ("taylorseer@0.7", "fastercache@0.7"):
        peer = rows[n]["gap_vs_best_eekernels"]
        assert peer["row"] == best
        assert peer["diff"] == pytest.approx(rows[n]["frechet"] - rows[best]["frechet"], rel=1e-6)
    fc = doc["setup"]["fastercache@0.7"]  # its settings, and the fraction it spent on the calibration noise
    assert fc["calibration_fraction"] <= 0.7 + knee.PEER_TOLERANCE and fc["uncond_every"] >= 2
    assert rows["fastercache@0.7"]["gap_vs_fewer_steps"]["steps"] == 2
    assert "vs eekernels' best row at its budget" in capsys.readouterr().out


@pytest.mark.parametrize("objective,search", (("frechet", None), ("pixel-frechet", "steps")))
def test_budgets_quick_calibrates_on_a_frechet_objective(tmp_path, objective, search):
    out = tmp_path / "knee_fd.json"
    knee.main(["budgets", "--quick", "--sampler", "dpmsolver++", "--steps", "4", "--budgets", "0.7",
               "--calib-samples", "8", "--rows", "calibrated-forecast,calibrated-forecast-orders", "--calib-objective",
               objective, "--json",
               str(out)] + (["--calib-search", search] if search else []))
    doc = json.loads(out.read_text())
    assert doc["settings"]["calibration_objective"] == objective
    assert doc["settings"]["calibration_search"] == search
    cal = doc["setup"]["calibrated-forecast@0.7"]
    assert cal["objective"] == "frechet" and cal["chose"]
    names = {r["variant"] for r in doc["rows"]}
    assert "calibrated-forecast@0.7" in names
    want = {f"calibrated-forecast-order{3 - cal['forecast_order']}@0.7"} if cal["forecast_order"] in (1, 2) else set()
    assert {n for n in names if "order" in n} == want  # the same plan at the other order beside it, if it forecasts


def test_at_other_order_flips_the_order_of_a_copy_and_samples_it():
    from eekernels.samplers import sample
    from eekernels.schedules import ExitSchedule

    from tests.test_joint_plans import JointToy

    m = JointToy(lambda t: 0 * t, lambda t: 0.2 + t / 500 + (t / 400) ** 2)  # a parabola: the orders differ
    s = ExitSchedule.periodic(2, 1, 4)
    s.forecast_order = 1
    other = knee.at_other_order(s)
    assert (s.forecast_order, other.forecast_order, other.table, other.period) == (1, 2, s.table, 2)
    assert knee.at_other_order(other).forecast_order == 1 and knee.at_other_order(ExitSchedule([4], 4)) is None
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    kw = dict(sampler="ddim", steps=8, exit_policy="forecast")
    a, b = sample(m, noise, schedule=s, **kw), sample(m, noise, schedule=other, **kw)
    assert torch.equal(a, sample(m, noise, schedule=s, forecast_order=1, **kw)) and not torch.allclose(a, b)
    assert torch.equal(b, sample(m, noise, schedule=other, forecast_order=2, **kw))


@torch.no_grad()
def test_fastercache_for_holds_the_budget_and_picks_the_nearest_to_full_depth():
    """knee.fastercache_for on a tiny DiT: a setting within budget + 0.02 whose counted fraction is what the
    returned config spends on the calibration noises, the nearest to full depth (RMS) among the scored ones;
    without CFG it refuses (nothing for FasterCache to skip)."""
    from eekernels.eval import baselines
    from eekernels.models import DiT
    from eekernels.samplers import sample

    torch.manual_seed(0)
    m = baselines.randomized(DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=4, num_heads=3,
                                 num_classes=10))
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    opts = dict(sampler="dpmsolver++", steps=4, cfg_scale=1.5)
    logged = []
    cfg, f, info = knee.fastercache_for(m, 0.7, x, y, log=logged.append, **opts)
    assert 0.7 - 0.06 <= f <= 0.7 + knee.PEER_TOLERANCE and len(info["scored"]) >= 2
    assert info["rms"] == min(c["rms"] for c in info["scored"]) > 0
    assert info["rule"].startswith("nearest") and "FasterCache at 0.7" in logged[0]
    peer = baselines.DiffusersCacheDiT(m, cfg)
    sample(peer, x, y, **opts)
    run, possible = peer.block_counts()
    assert run / possible == pytest.approx(f, rel=1e-9)
    low = knee.fastercache_for(m, 0.1, x, y, log=logged.append, **opts)  # below its reach: the cheapest setting
    assert low[2]["rule"].startswith("the cheapest") and low[1] < f
    with pytest.raises(ValueError, match="cfg_scale"):
        knee.fastercache_for(m, 0.6, x, y, log=print, sampler="dpmsolver++", steps=4, cfg_scale=1.0)
