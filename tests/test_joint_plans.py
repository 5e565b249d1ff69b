"""Plans over solver steps, depth and exit policy together (``calibrate(..., search=...)``,
calibration.calibrate_joint): the chooser against toys made for fewer steps or for a depth plan to win, the report's alternatives, per-call
policies in sample(), the file round trip and the named bad inputs."""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from eekernels import calibration as C
from eekernels.calibration import describe_joint as describe, parse_search, step_counts
from eekernels.models.cache import ForecastCache, lagrange_weights
from eekernels.samplers import alphas_cumprod, make_solver, sample
from eekernels.schedules import ExitSchedule


ABAR = alphas_cumprod(1000, 1e-4, 0.02, "linear").astype(np.float64)  # the solvers' default schedule


class JointToy(nn.Module):
    """eps = 0.1 x + shallow(t) + d * deep(t) at depth d (each of the 4 blocks adds deep(t)); with an exit cache a
    full call records (L - k) deep(t) per exit depth k and a truncated call adds what the cache gives (kept in
    ``added``, per call). ``shallow`` and ``deep`` pick which kind of saving wins."""

    num_blocks, min_depth, in_channels, out_channels = 4, 1, 1, 1
    num_classes = null_class = None
    learn_sigma = False

    def __init__(self, shallow, deep, exact=False):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.shallow, self.deep = shallow, deep
        # exact: the base is the exact eps of Gaussian data of std 0.5 (linear in x): a few steps sample it well
        self.exact = exact
        self.added: list = []
        self.calls = 0

    def forward(self, x, t, y=None, depth=None, exit_cache=None):
        self.calls += 1
        L = self.num_blocks
        d = L if depth is None else int(depth)
        tt = t.to(x.dtype)[:, None, None, None]
        if self.exact:
            abar = torch.from_numpy(np.interp(t.double().numpy(), np.arange(1000), ABAR))
            abar = abar.to(x.dtype)[:, None, None, None]
            base = x * self.w * (1 - abar).sqrt() / (abar * 0.25 + 1 - abar)
        else:
            base = 0.1 * x * self.w
        out = base + self.shallow(tt) + d * self.deep(tt) * torch.ones_like(x)
        if exit_cache is not None:
            if d == L:
                for k in exit_cache.depths:
                    exit_cache.store(k, (L - k) * self.deep(tt) * torch.ones_like(x))
            else:
                add = exit_cache.load(d)
                self.added.append((float(t[0]), add[0, 0, 0, 0].item()))
                out = out + add
        return out


def steps_win():
    """Every block counts (the deep blocks cancel an oscillation in t the shallow part adds, so no depth, reuse or
    forecast can stand in for them) while the full model (Gaussian data's exact eps) samples almost the same at any
    step count."""
    return JointToy(lambda t: 4000 * torch.sin(t / 3), lambda t: -1000 * torch.sin(t / 3), exact=True)


def depth_wins():
    """The deep blocks add almost nothing, while the shallow part curves in t, so fewer steps miss it."""
    return JointToy(lambda t: 2 * torch.sin(t / 60), lambda t: 1e-4 * torch.cos(t / 300))


KW = dict(sampler="dpmsolver++", steps=8, budget=0.6, noises=torch.randn(3, 1, 2, 2, generator=torch.Generator()
                                                                         .manual_seed(0)))


def test_the_fewer_steps_baseline_is_returned_where_no_plan_beats_it():
    m = steps_win()
    sched = C.calibrate(m, search="steps,policy", **KW)
    rep, j = sched.calibration, sched.calibration.joint
    assert j["baseline_steps"] == 4 and j["reference_steps"] == 8  # 4 full calls <= 0.6 of 8
    assert j["beats_baseline"] is False and "baseline" in j["chosen"]
    assert sched.steps == 4 and rep.steps == 4 and rep.plan == [4] * 4 and sched.sampler == "dpmsolver++"
    base = next(r for r in j["alternatives"] if r["policy"] == "full")
    assert all(r["real"] >= base["real"] for r in j["alternatives"])
    # sample() follows the plan: its step count, full depth; exactly the plain 4-step run
    assert torch.equal(sample(m, KW["noises"], schedule=sched), sample(m, KW["noises"], sampler="dpmsolver++", steps=4))
    assert any("no plan beat the fewer-steps baseline" in line for line in describe(rep))


def test_a_depth_plan_is_chosen_where_it_wins_and_the_report_lists_every_alternative():
    m = depth_wins()
    sched = C.calibrate(m, search="steps,policy", **KW)
    rep, j = sched.calibration, sched.calibration.joint
    assert j["beats_baseline"] is True and "baseline" not in j["chosen"]
    assert min(rep.plan) < 4 and sched.steps == rep.steps and len(rep.plan) == len(rep.policies) == rep.steps
    spent = sum(rep.plan) / (4 * 8)
    assert spent <= 0.6 + 1e-9 and j["spent_fraction"] == pytest.approx(spent)
    names = {r["name"] for r in j["alternatives"]}
    for pol in ("drop", "cache", "forecast"):  # each policy at the reference step count, and the baseline
        assert f"{pol} @ 8 steps" in names
    assert "full depth @ 4 steps (fewer-steps baseline)" in names
    assert {r["steps"] for r in j["alternatives"]} >= {8, 4} and len({r["steps"] for r in j["alternatives"]}) >= 3
    full = sample(m, KW["noises"], sampler="dpmsolver++", steps=8).double()
    chosen = next(r for r in j["alternatives"] if r["name"] == j["chosen"])
    assert chosen["real"] == min(r["real"] for r in j["alternatives"])
    x = sample(m, KW["noises"], schedule=sched).double()  # the chosen row's error is the returned plan's, sampled
    assert chosen["real"] == pytest.approx(float((x - full).square().mean().sqrt()), rel=1e-6)


def test_the_plan_round_trips_through_its_file_and_samples_the_same(tmp_path):
    m = depth_wins()
    sched = C.calibrate(m, search="steps,policy", **KW)
    back = ExitSchedule.load(sched.save(tmp_path / "joint.json"))
    assert (back.table, back.policies, back.steps, back.sampler) == (sched.table, sched.policies, sched.steps,
                                                                     sched.sampler)
    assert back.calibration.joint == sched.calibration.joint and back.calibration.policies == sched.calibration.policies
    assert torch.equal(sample(m, KW["noises"], schedule=back), sample(m, KW["noises"], schedule=sched))
    plain = ExitSchedule.piecewise([4, 3, 2]).to_dict()  # a schedule without a plan writes the format as before
    assert not {"policies", "steps", "sampler"} & set(plain)
    solver = make_solver("dpmsolver++", sched.steps)
    assert back.policy_plan(solver.timesteps) == sched.calibration.policies
    for fn in (lambda: C.replan(back, 0.5), lambda: C.validate_proxy(m, back, KW["noises"])):  # not the DP's plan
        with pytest.raises(ValueError, match="is a joint plan"):
            fn()


def test_per_call_policies_in_sample_drop_cache_and_forecast_as_planned():
    """A hand-made mixed plan: full, cache, full, drop, forecast, ...: each truncated call adds what its own policy
    gives (nothing, the last full call's record, the line through the last two), one ForecastCache for the run."""
    m = JointToy(lambda t: 0 * t, lambda t: t / 1000)
    solver = make_solver("ddim", 6)
    ts = [float(t) for t in solver.timesteps]
    plan, pols = [4, 2, 4, 2, 2, 3], ["cache", "cache", "cache", "drop", "forecast", "cache"]
    rep = C.CalibrationReport(exit_policy="cache", sampler="ddim", steps=6, cfg_scale=1.0, budget=0.9, num_blocks=4,
                              candidates=[2, 3, 4], call_timesteps=ts, weights=[1.0] * 6, plan=plan, proxy=0.0,
                              block_flop_fraction=0.7, measure="calls", num_samples=1, model_calls=0,
                              block_evaluations=0.0, seconds=0.0, trajectory_seconds=0.0)
    sched = C._plan_schedule(plan, pols, rep, 1000, 6, "ddim", "mixed")
    assert sched.policy_plan(solver.timesteps) == pols
    sample(m, torch.randn(1, 1, 2, 2), schedule=sched)
    got = dict(m.added)
    deep = lambda t: t / 1000  # noqa: E731
    assert got[ts[1]] == pytest.approx(2 * deep(ts[0]))       # cache: the record of call 0 at depth 2
    assert got[ts[3]] == 0.0                                    # drop: nothing added
    w = lagrange_weights([ts[0], ts[2]], ts[4])                 # forecast: the line through calls 0 and 2
    assert got[ts[4]] == pytest.approx(2 * (w[0] * deep(ts[0]) + w[1] * deep(ts[2])), rel=1e-5)
    assert got[ts[5]] == pytest.approx(1 * deep(ts[2]))         # cache at depth 3: the last full call's record
    with pytest.raises(ValueError, match="exit_policy"):
        sample(m, torch.randn(1, 1, 2, 2), schedule=sched, exit_policy="drop")
    with pytest.raises(ValueError, match="steps"):
        sample(m, torch.randn(1, 1, 2, 2), schedule=sched, steps=7)


def test_forecast_cache_weights_per_call_policy():
    c = ForecastCache([1], order=1)
    c.restart()
    for t, v in ((900.0, 1.0), (700.0, 3.0)):
        c.begin_call(t, True)
        c.store(1, torch.tensor([v]))
    for pol, want in (("drop", 0.0), ("cache", 3.0), ("forecast", 5.0), (None, 5.0)):
        c.begin_call(500.0, False, pol)
        assert float(c.load(1)) == pytest.approx(want)
    with pytest.raises(ValueError, match="policy"):
        c.begin_call(500.0, False, "reuse")


def test_step_counts_and_search_names():
    heun = lambda s: 2 * s - 1  # noqa: E731
    assert step_counts(lambda s: s, 20, 0.7, False) == (14, [20])
    base, counts = step_counts(lambda s: s, 20, 0.7, True)
    assert base == 14 and counts[0] == 20 and all(14 < s <= 20 for s in counts) and len(counts) >= 2
    assert step_counts(heun, 10, 0.5, False)[0] == 5  # 9 calls <= 0.5 of 19
    assert parse_search("steps,policy", "drop") == (True, ("drop", "cache", "forecast"))
    assert parse_search(["forecast"], "drop") == (False, ("drop", "forecast"))
    assert parse_search(None, "forecast") == (False, ("forecast",))


@pytest.mark.parametrize("kwargs, match", [
    (dict(search="steps,polcy"), r"search: expected names from .*got 'polcy'"),
    (dict(search="steps,reuse"), r"search: .*got 'reuse'"),
    (dict(search=3), r"search: expected None, a comma-separated string"),
    (dict(search="steps", budget=1.5), r"budget: expected a block-FLOP fraction in \(0, 1\], got 1.5"),
    (dict(search="steps", budget=0.0), r"budget: expected a block-FLOP fraction in \(0, 1\], got 0.0"),
    (dict(exit_policy="reuse"), r"exit_policy: expected one of"),
    (dict(search="steps", holdout=(torch.randn(2, 1, 2, 2), None)), r"holdout: the joint search"),
])
def test_bad_inputs_are_named_before_any_model_call(kwargs, match):
    m = depth_wins()
    with pytest.raises(ValueError, match=match):
        C.calibrate(m, **{**KW, **kwargs})
    assert m.calls == 0


def test_bad_plan_fields_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"`policies` expected names in .*got 'reuse'"):
        ExitSchedule([4, 2], 4, policies=["drop", "reuse"])
    with pytest.raises(ValueError, match=r"`policies` expected one exit policy per table bin \(2\)"):
        ExitSchedule([4, 2], 4, policies=["drop"])
    with pytest.raises(ValueError, match=r"`steps` expected an integer >= 1"):
        ExitSchedule([4, 2], 4, steps=0)
    doc = ExitSchedule([4, 2], 4, policies=["cache", "forecast"], steps=5, sampler="ddim").to_dict()
    doc["policies"][1] = "forcast"
    (tmp_path / "bad.json").write_text(__import__("json").dumps(doc))
    with pytest.raises(ValueError, match=r"bad.json.*`policies` expected names in .*'forcast'"):
        ExitSchedule.load(tmp_path / "bad.json")


def test_default_calibrate_is_unchanged_by_the_joint_search():
    """No search: the ordinary calibration (no joint report, no plan fields: sample() runs it at any step count)."""
    m = depth_wins()
    sched = C.calibrate(m, **KW)
    assert sched.calibration.joint is None and sched.policies is None and sched.steps is None
    assert math.isfinite(sched.calibration.proxy)


def test_accelerate_refuses_a_plan_of_several_policies_by_name():
    """Per-call policies run in sample()'s loop; accelerate() (in place, or native behind the diffusers API) runs one
    policy per model: a mixed plan (or a plan of another policy than the one asked for) is refused before any hook
    is attached; a plan of the asked policy alone is taken."""
    import eekernels
    from tests.test_accelerate import tiny_dit_transformer

    model = tiny_dit_transformer()
    mixed = ExitSchedule([4, 2, 2], 4, policies=["cache", "drop", "forecast"], steps=3, sampler="ddim")
    for native in (False, True):  # in place, and eekernels' own model behind the diffusers API
        with pytest.raises(ValueError, match=r"exit policies \['cache', 'drop', 'forecast'\].*tier runs one policy"):
            eekernels.accelerate(model, mixed, exit_policy="cache", native=native)
    drops = ExitSchedule([4, 2, 2], 4, policies=["drop"] * 3)
    with pytest.raises(ValueError, match=r"exit policies \['drop'\]"):
        eekernels.accelerate(model, drops, exit_policy="cache")
    assert not hasattr(model, "_diffusers_hook") or not model._diffusers_hook.hooks
    assert eekernels.accelerate(model, drops, exit_policy="drop") is model
    eekernels.disable(model)


def test_cli_search_prints_the_choice_and_every_alternative_and_names_bad_names(tmp_path, capsys):
    from eekernels import cli

    out, never = tmp_path / "joint.json", tmp_path / "never.json"
    base = ["calibrate", "--steps", "3", "--samples", "2", "--budget", "0.7", "--device", "cpu", "--no-progress"]
    assert cli.main(base + ["--search", "steps,policy", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    sched = ExitSchedule.load(out)
    j = sched.calibration.joint
    assert "joint search (steps, drop, cache, forecast)" in text and j["chosen"] in text
    assert all(r["name"] in text for r in j["alternatives"]) and j["baseline_steps"] == 2
    assert sched.steps == sched.calibration.steps and sched.sampler == "dpmsolver++"
    show = ["sample", "--model", "glyph-dit", "--schedule", f"calibrated:{out}", "--num-images", "2", "--repeats",
            "1", "--no-compare", "--no-progress", "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(show) == 0  # `eekernels sample` takes the plan's sampler, steps and policies
    assert f"{sched.sampler} {sched.steps} steps" in capsys.readouterr().out
    assert cli.main(show + ["--steps", str(sched.steps + 1)]) == 2
    assert re.search(rf"--steps: the schedule .* is a plan for steps {sched.steps}", capsys.readouterr().err)
    for extra, match in ((["--search", "steps,polcy"], r"--search: expected names from .*'polcy'"),
                         (["--search", "steps", "--validate"], r"--validate: the joint search")):
        assert cli.main(base + extra + ["--out", str(never)]) == 2
        assert re.search(match, capsys.readouterr().err) and not never.exists()


def test_a_budget_of_one_returns_full_depth_at_the_steps_asked():
    m = depth_wins()
    sched = C.calibrate(m, search="steps,policy", **{**KW, "budget": 1.0})
    j = sched.calibration.joint
    assert sched.steps == 8 and set(sched.table) == {4} and j["beats_baseline"] is None and j["baseline_steps"] == 8
    assert [r["policy"] for r in j["alternatives"]] == ["full"]
    assert any("full depth fits the budget" in line for line in describe(sched.calibration))


def forecast_wins():
    """The deep blocks add a line in t (a first-order forecast from two full calls is exact; replaying the last
    full call's is not) while the shallow part curves in t (fewer steps miss it)."""
    return JointToy(lambda t: 2 * torch.sin(t / 60), lambda t: 0.2 + t / 500)


def test_forecast_calibration_samples_the_regular_plans_and_returns_one_where_it_wins(tmp_path):
    # 10 steps at 0.6: the cache DP's depths forecasting (one full call before its first truncated one: a replay
    # there) lose to full depth at 6 steps, so without the regular plans the baseline was returned; a regular plan
    # with full depth at the first two calls forecasts every skipped call exactly
    m = forecast_wins()
    kw = {**KW, "steps": 10, "budget": 0.6}
    sched = C.calibrate(m, exit_policy="forecast", **kw)
    rep, j = sched.calibration, sched.calibration.joint
    rows = j["alternatives"]
    regular = [r for r in rows if r["from"].startswith("regular plan")]
    assert 1 <= len(regular) <= 2 * C.REGULAR_PLANS and {r["forecast_order"] for r in regular} == {1, 2}
    for r in regular:
        assert r["policy"] == "forecast" and r["steps"] == 10 and set(r["policies"]) == {"forecast"}
        assert r["name"].endswith(", order 2") == (r["forecast_order"] == 2)
        assert 0.6 - 0.06 - 1e-9 <= r["spent_fraction"] <= 0.6 + 1e-9 and r["plan"].count(4) >= 2
        assert tuple(r["plan"]) in C.regular_forecast_plans(4, 10, 0.6)
        assert r["name"].startswith("forecast @ 10 steps, regular plan (full at the first")
    assert len({r["name"] for r in rows}) == len(rows)  # the chosen row is named uniquely
    base = next(r for r in rows if r["policy"] == "full")
    dp = next(r for r in rows if r["name"] == "forecast @ 10 steps")
    assert base["steps"] == 6 and dp["real"] > base["real"]  # the cache plan's depths alone lose to fewer steps
    chosen = next(r for r in rows if r["name"] == j["chosen"])
    assert chosen in regular and j["beats_baseline"] is True
    assert chosen["real"] == min(r["real"] for r in rows) and chosen["real"] < 1e-3 * base["real"]
    assert sched.steps == 10 and rep.plan == chosen["plan"] and set(rep.policies) == {"forecast"}
    assert math.isfinite(rep.proxy) and rep.proxy >= 0  # measured for the chosen plan, for the report
    back = ExitSchedule.load(sched.save(tmp_path / "regular.json"))  # the plan round-trips through its file
    assert (back.table, back.policies, back.steps) == (sched.table, sched.policies, 10)
    full = sample(m, kw["noises"], sampler="dpmsolver++", steps=10).double()
    x = sample(m, kw["noises"], schedule=sched).double()  # sample()'s default forecast_order, as calibrated
    assert float((x - full).square().mean().sqrt()) == pytest.approx(chosen["real"], abs=1e-9)


def test_regular_forecast_plans_hold_the_budget_depths_costs_and_groups():
    L, calls = 4, 10
    plans = C.regular_forecast_plans(L, calls, 0.6, max_candidates=10_000)
    assert plans and all(0.54 - 1e-9 <= sum(p) / (L * calls) <= 0.6 + 1e-9 for p in plans)  # never over the budget
    assert tuple([L, L] + [2] * 8) in plans and tuple([L, 2] * 5) not in plans  # 0.6 in; 0.75 out
    assert all(set(p) <= {L, 2} for p in C.regular_forecast_plans(L, calls, 0.6, 10_000, depths=[2, 4]))
    # a costlier depth 1 (costs counted as calibrate's depth_costs): depth-1 plans now spend more than 0.6
    costs = {1: 3, 2: 4, 3: 5, 4: 6}
    for p in C.regular_forecast_plans(L, calls, 0.6, 10_000, costs=costs):
        assert 0.54 - 1e-9 <= sum(costs[v] for v in p) / (6 * calls) <= 0.6 + 1e-9
    # calls 0 and 1 share one depth (Heun's repeated t): a plan splitting them is left out
    split = C.regular_forecast_plans(L, calls, 0.6, 10_000, groups=[[0, 1]] + [[k] for k in range(2, calls)])
    assert split and all(p[0] == p[1] for p in split) and set(split) < set(plans)
    assert C.regular_forecast_plans(L, calls, 0.6, max_candidates=2) == plans[:2]
    # the depths take turns: at 0.35 of 20 calls on 8 blocks (the peer's 0.02 above allowed), the depth-2 plans at
    # 0.362 no longer crowd out depth 0's (TaylorSeer's full-every-third-call shape, 0.35)
    few = C.regular_forecast_plans(8, 20, 0.35, 12, over=0.02, depths=range(0, 8))
    assert {min(p) for p in few} >= {0, 1, 2} and tuple([8, 0, 0] * 6 + [8, 0]) in few


def test_forecast_calibration_may_skip_every_block_between_full_calls(tmp_path):
    """A model whose whole stack a forecast can stand in for (``min_reuse_depth`` 0): at 0.3 of 10 calls no plan
    with a block per call fits two full calls (0.4 at least), while TaylorSeer's shape (full every few calls, no block
    between) does, and here forecasts exactly; given explicit candidate depths, depth 0 is not offered."""
    m = forecast_wins()
    m.min_reuse_depth = 0
    kw = {**KW, "steps": 10, "budget": 0.3}
    sched = C.calibrate(m, exit_policy="forecast", **kw)
    rep, j = sched.calibration, sched.calibration.joint
    rows = j["alternatives"]
    chosen = next(r for r in rows if r["name"] == j["chosen"])
    base = next(r for r in rows if r["policy"] == "full")
    assert chosen["from"].startswith("regular plan") and 0 in chosen["plan"] and chosen["plan"].count(4) == 3
    assert "no block between" in chosen["name"] and chosen["spent_fraction"] == pytest.approx(0.3)
    assert j["beats_baseline"] is True and chosen["real"] < 1e-3 * base["real"]
    assert rep.candidates[0] == 0 and rep.errors is None  # depth 0 was not measured by the per-depth proxy
    back = ExitSchedule.load(sched.save(tmp_path / "taylor.json"))
    assert (back.table, back.policies, back.calibration.plan) == (sched.table, sched.policies, chosen["plan"])
    full = sample(m, kw["noises"], sampler="dpmsolver++", steps=10).double()
    x = sample(m, kw["noises"], schedule=back).double()
    assert float((x - full).square().mean().sqrt()) == pytest.approx(chosen["real"], abs=1e-9)
    with pytest.raises(ValueError, match="depth 0 at call 1 .*only with exit_policy 'cache' or 'forecast'"):
        sample(m, kw["noises"], sampler="dpmsolver++", steps=10, schedule=ExitSchedule.periodic(3, 0, 4))
    restricted = C.calibrate(m, exit_policy="forecast", candidates=[1, 2, 3, 4], **kw).calibration.joint
    assert all(0 not in r["plan"] for r in restricted["alternatives"])


def test_the_forecast_order_is_chosen_stored_and_used():
    """The deep blocks add a parabola in t: order 2 forecasts it exactly, order 1 does not. The joint search samples
    both orders, keeps order 2, and the schedule carries it to sample() (a contradicting order is refused);
    ``forecast_order=1`` restricts the search to order 1."""
    m = JointToy(lambda t: 2 * torch.sin(t / 60), lambda t: 0.2 + (t / 500) ** 2)
    kw = {**KW, "steps": 10, "budget": 0.6}
    sched = C.calibrate(m, exit_policy="forecast", **kw)
    j = sched.calibration.joint
    chosen = next(r for r in j["alternatives"] if r["name"] == j["chosen"])
    assert chosen["forecast_order"] == 2 and sched.forecast_order == 2 and chosen["real"] < 1e-3
    same_plan = [r for r in j["alternatives"] if r["plan"] == chosen["plan"] and r.get("forecast_order") == 1]
    assert same_plan and all(r["real"] > 1e3 * chosen["real"] for r in same_plan)  # order 1 misses the curve
    full = sample(m, kw["noises"], sampler="dpmsolver++", steps=10).double()
    for order in (None, 2):
        x = sample(m, kw["noises"], schedule=sched, forecast_order=order).double()
        assert float((x - full).square().mean().sqrt()) == pytest.approx(chosen["real"], abs=1e-9)
    with pytest.raises(ValueError, match="forecast_order: expected None or 2 \\(the schedule .* chosen with "
                                         "forecast order 2\\), got 1"):
        sample(m, kw["noises"], schedule=sched, forecast_order=1)
    only1 = C.calibrate(m, exit_policy="forecast", forecast_order=1, **kw)
    assert {r.get("forecast_order") for r in only1.calibration.joint["alternatives"]} <= {None, 1}
    assert only1.forecast_order in (None, 1)
    with pytest.raises(ValueError, match=r"forecast_order: expected None \(try orders 1 and 2\) or 1 or 2, got 3"):
        C.calibrate(m, exit_policy="forecast", forecast_order=3, **kw)


def test_accelerate_takes_the_schedules_forecast_order_and_refuses_another():
    import eekernels
    from eekernels.models import DiT

    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=24, depth=3, num_heads=2, num_classes=4).eval()
    plan = ExitSchedule([3, 0, 3], 3, policies=["forecast"] * 3, forecast_order=2, name="order-2 plan")
    acc = eekernels.accelerate(model, schedule=plan, exit_policy="forecast")  # native: an eekernels model
    assert acc.exit_plan.cache.order == 2 and 0 in acc.exit_plan.cache.depths
    assert eekernels.accelerate(model, schedule=plan, exit_policy="forecast", forecast_order=2).exit_plan.cache.order == 2
    with pytest.raises(ValueError, match="accelerate: `forecast_order` expected None or 2 \\(the schedule 'order-2 "
                                         "plan' is a plan chosen with forecast order 2\\), got 1"):
        eekernels.accelerate(model, schedule=plan, exit_policy="forecast", forecast_order=1)
    assert eekernels.accelerate(model, schedule=ExitSchedule.periodic(2, 0, 3),
                                exit_policy="forecast").exit_plan.cache.order == 1  # no order in the schedule: 1
    with pytest.raises(ValueError, match="needs at least 1 under exit_policy='drop' \\(depth 0 runs no block"):
        eekernels.accelerate(model, schedule=ExitSchedule.periodic(2, 0, 3), exit_policy="drop")


def test_in_place_takes_the_schedules_forecast_order():
    """In place: ``accelerate`` resolves the order as ``sample()`` does; ``set_schedule`` with a plan that carries its
    order runs at that order (the caches are made anew), and a plan without one keeps the controller's."""
    import eekernels
    from eekernels import inplace
    from tests.test_inplace import _inputs, _model

    model = _model("dit")
    plan2 = ExitSchedule([0, 4, 4], 4, policies=["forecast"] * 3, forecast_order=2, name="order-2 plan")
    eekernels.accelerate(model, schedule=ExitSchedule.periodic(2, 0, 4), exit_policy="forecast")
    ctl = inplace.controller(model)
    assert ctl.forecast_order == 1
    inplace.set_schedule(model, plan2)
    with torch.no_grad():
        model(**_inputs("dit"))  # t = 550: a full call, which makes the caches
    assert ctl.forecast_order == 2 and all(c.order == 2 for cs in ctl._caches.values() for c in cs)
    inplace.set_schedule(model, ExitSchedule.periodic(2, 0, 4))
    assert ctl.forecast_order == 2
    eekernels.disable(model)
    with pytest.raises(ValueError, match="accelerate: `forecast_order` expected None or 2"):
        eekernels.accelerate(model, schedule=plan2, exit_policy="forecast", forecast_order=1)
    eekernels.accelerate(model, schedule=plan2, exit_policy="forecast")
    assert inplace.controller(model).forecast_order == 2


def test_the_forecast_target_is_searched_stored_and_used(tmp_path):
    """On a model whose blocks forecast their branch outputs (the native DiT) the joint search samples every
    forecasting alternative with the residual and with the per-block forecast; the chosen target is stored, round-trips
    and is what sample() runs; accelerate refuses it in place and a contradicting target anywhere."""
    import eekernels
    from eekernels.models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=24, depth=4, num_heads=2, num_classes=4,
                learn_sigma=False).eval()
    noises = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(sampler="ddim", steps=8, budget=0.5, noises=noises, conditions=torch.tensor([0, 1, 2]), cfg_scale=1.5)
    sched = C.calibrate(model, exit_policy="forecast", forecast_order=1, **kw)
    rows = sched.calibration.joint["alternatives"]
    regular = [r for r in rows if r["from"].startswith("regular plan")]
    assert {r.get("forecast_target") for r in regular} == {"residual", "blocks"}
    for r in regular:
        assert r["name"].endswith(", blocks") == (r["forecast_target"] == "blocks")
    chosen = next(r for r in rows if r["name"] == sched.calibration.joint["chosen"])
    assert sched.forecast_target == chosen.get("forecast_target")
    back = ExitSchedule.load(sched.save(tmp_path / "s.json"))
    assert back.forecast_target == sched.forecast_target
    full = sample(model, noises, kw["conditions"], sampler="ddim", steps=8, cfg_scale=1.5).double()
    for r in regular[:4]:  # each row's distance is the one sample() gives for its plan, order and target
        s = C._plan_schedule(r["plan"], r["policies"], sched.calibration, 1000, 8, "ddim", "row", 1,
                             r["forecast_target"])
        x = sample(model, noises, kw["conditions"], schedule=s, cfg_scale=1.5).double()
        assert float((x - full).square().mean().sqrt()) == pytest.approx(r["real"], abs=1e-9)
    blocks = ExitSchedule([0, 4], 4, policies=["forecast"] * 2, forecast_target="blocks", name="blocks plan")
    with pytest.raises(ValueError, match="forecast_target: expected None or 'blocks'"):
        sample(model, noises, kw["conditions"], schedule=blocks, steps=2, sampler="ddim", forecast_target="residual")
    assert eekernels.accelerate(model, schedule=blocks, exit_policy="forecast").exit_plan.cache.target == "blocks"
    with pytest.raises(ValueError, match="forecast_target: 'blocks' expected a model whose blocks forecast"):
        C.calibrate(JointToy(lambda t: t, lambda t: t), exit_policy="forecast", forecast_target="blocks", **{
            **KW, "steps": 10})
    with pytest.raises(ValueError, match="forecast_target: expected None .* got 'modules'"):
        C.calibrate(model, exit_policy="forecast", forecast_target="modules", **kw)


def test_in_place_refuses_the_per_block_forecast_by_name():
    import eekernels
    from eekernels import inplace
    from tests.test_inplace import _model

    model = _model("dit")
    with pytest.raises(ValueError, match="accelerate: `forecast_target` expected 'residual' in place"):
        eekernels.accelerate(model, schedule=ExitSchedule.periodic(2, 0, 4), exit_policy="forecast",
                             forecast_target="blocks")
    assert inplace.controller(model) is None  # nothing attached
    eekernels.accelerate(model, schedule=ExitSchedule.periodic(2, 0, 4), exit_policy="forecast")
    blocks = ExitSchedule([0, 4], 4, policies=["forecast"] * 2, forecast_target="blocks", name="blocks plan")
    with pytest.raises(ValueError, match="set_schedule: `schedule` 'blocks plan' expected a plan whose forecast"):
        inplace.set_schedule(model, blocks)
