"""A plan that forecasts classifier-free guidance's unconditional branch (``ExitSchedule(uncond=...)``): at those calls
only the conditional half runs, at full depth, and the unconditional eps is the conditional one minus the guidance
difference (cond - uncond) extrapolated in t from the calls that ran both halves. Checked against a hand-written
extrapolation on a toy, on class labels and on text; its counted FLOPs, its file, and every refusal."""
import pytest
import torch

from eekernels import ExitSchedule
from eekernels.calibration import _table_schedule, uncond_plans
from eekernels.samplers import make_solver, sample
from tests.samplers._toys import TextToy, ToyModel, text_condition


def _plan_schedule(depths, halves, sampler, steps, L, order):
    """The t-indexed schedule of per-call depths and per-call uncond modes (True: forecast)."""
    ts = make_solver(sampler, steps).timesteps.tolist()
    table = _table_schedule(depths, ts, L, 1000, "t").table
    modes = _table_schedule([2 if h else 1 for h in halves], ts, 2, 1000, "u").table
    return ExitSchedule(table, L, 1000, uncond=["forecast" if m == 2 else "run" for m in modes], forecast_order=order,
                        steps=steps, sampler=sampler)


def _extrapolate(kept, t):
    """The guidance difference at t from the kept (t_j, delta_j), oldest first, by hand: the last one (one kept), the
    line through the last two, or Newton's divided differences through the last three."""
    if len(kept) == 1:
        return kept[0][1]
    if len(kept) == 2:
        (t0, d0), (t1, d1) = kept
        return d1 + (t - t1) * (d1 - d0) / (t1 - t0)
    (t0, d0), (t1, d1), (t2, d2) = kept
    f01, f12 = (d1 - d0) / (t1 - t0), (d2 - d1) / (t2 - t1)
    f012 = (f12 - f01) / (t2 - t0)
    return d0 + (t - t0) * f01 + (t - t0) * (t - t1) * f012


class _ByHand:
    """Runs every call of a plain CFG run (no schedule) and does by hand what an ``uncond`` plan does: at the calls
    in ``halves`` the model sees the conditional half alone and the unconditional output is extrapolated."""

    def __init__(self, model, halves, order, channels):
        self.model, self.halves, self.order, self.C = model, halves, order, channels
        self.k, self.kept = 0, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, t, y, **kw):
        k, B, C = self.k, x.shape[0] // 2, self.C
        self.k += 1
        tk = float(t[0])
        if not self.halves[k]:
            out = self.model(x, t, y)
            self.kept = (self.kept + [(tk, out[:B, :C] - out[B:, :C])])[-(self.order + 1):]
            return out
        yc = y[:B] if isinstance(y, torch.Tensor) else y.index(slice(0, B))
        oc = self.model(x[:B], t[:B], yc)
        eps_u = oc[:, :C] - _extrapolate(self.kept, tk)
        return torch.cat([oc, torch.cat([eps_u, oc[:, C:]], 1)])


@pytest.mark.parametrize("learn_sigma", (False, True))
@pytest.mark.parametrize("order", (1, 2))
@pytest.mark.parametrize("sampler,steps,halves", [
    ("dpmsolver++", 4, [False, False, False, True]),
    ("ddim", 7, [False, False, False, True, False, True, True]),
])
def test_uncond_forecast_equals_a_hand_written_guidance_extrapolation(sampler, steps, halves, order, learn_sigma):
    model = ToyModel(num_blocks=3, learn_sigma=learn_sigma, seed=4).double()
    noise = torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([0, 2, 4])
    sched = _plan_schedule([3] * steps, halves, sampler, steps, 3, order)
    got = sample(model, noise, y, schedule=sched, cfg_scale=2.5)
    ref = sample(_ByHand(model, halves, order, 3), noise, y, sampler=sampler, steps=steps, cfg_scale=2.5)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10)
    plain = sample(model, noise, y, sampler=sampler, steps=steps, cfg_scale=2.5)
    assert (got - plain).abs().max() > 1e-6  # the forecast calls did change the run


def test_forecast_calls_run_the_conditional_half_alone_at_full_depth():
    model = ToyModel(num_blocks=3, seed=2)
    halves = [False, False, True, False, True]
    sched = _plan_schedule([3, 3, 3, 3, 3], halves, "ddim", 5, 3, 1)
    noise = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    sample(model, noise, torch.tensor([1, 3]), schedule=sched, cfg_scale=1.5)
    assert [c[1].shape[0] for c in model.calls] == [2 if h else 4 for h in halves]
    assert all(c[0] is None for c, h in zip(model.calls, halves) if h)


def test_uncond_forecast_with_text_conditions_equals_by_hand():
    model = TextToy(num_blocks=3, seed=5).double()
    y = text_condition(batch=2, dtype=torch.float64)
    noise = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    halves = [False, False, False, True, True]
    sched = _plan_schedule([3] * 5, halves, "dpmsolver++", 5, 3, 2)
    got = sample(model, noise, y, schedule=sched, cfg_scale=3.0)
    ref = sample(_ByHand(model, halves, 2, 3), noise, y, sampler="dpmsolver++", steps=5, cfg_scale=3.0)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10)


def test_a_depth_plan_with_uncond_forecasts_keeps_its_exit_forecast_on_the_calls_that_ran_both_halves():
    """Calls 0-2 full, call 3 truncated (exit forecast from 0-2), call 4 the conditional half alone: the truncated
    call sees the same exit cache as in the plan without the last call's forecast, so the two runs agree up to call 3
    and the cond-only call records nothing."""
    model = ToyModel(num_blocks=4, seed=3).double()
    noise = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.tensor([1, 2])
    ts = make_solver("ddim", 5).timesteps.tolist()
    table = _table_schedule([4, 4, 4, 2, 4], ts, 4, 1000, "t").table
    modes = _table_schedule([1, 1, 1, 1, 2], ts, 2, 1000, "u").table
    both = ExitSchedule(table, 4, 1000, policies=["forecast"] * len(table), steps=5, sampler="ddim")
    half = ExitSchedule(table, 4, 1000, policies=["forecast"] * len(table), steps=5, sampler="ddim",
                        uncond=["forecast" if m == 2 else "run" for m in modes])
    a = sample(model, noise, y, schedule=half, cfg_scale=2.0)
    ref = sample(_ByHand(_Truncating(model, [4, 4, 4, 2, 4]), [False] * 4 + [True], 1, 3), noise, y,
                 sampler="ddim", steps=5, cfg_scale=2.0)
    assert torch.allclose(a, ref, rtol=1e-10, atol=1e-10)
    b = sample(model, noise, y, schedule=both, cfg_scale=2.0)
    assert (a - b).abs().max() > 1e-8


class _Truncating:
    """Runs the toy's calls at a plan's depths with its own ForecastCache (order 1), as ``sample`` does, recording at
    full calls that run both halves only."""

    def __init__(self, model, plan):
        from eekernels.models.cache import ForecastCache

        self.model, self.plan, self.k = model, plan, 0
        self.cache = ForecastCache(sorted({d for d in plan if d < model.num_blocks}), order=1)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, t, y, **kw):
        d, full = self.plan[self.k], self.plan[self.k] == self.model.num_blocks
        if x.shape[0] != 2 * 2:  # the conditional half alone: full depth, no exit cache
            self.k += 1
            return self.model(x, t, y)
        self.cache.begin_call(float(t[0]), full)
        self.k += 1
        return self.model(x, t, y, depth=d, exit_cache=self.cache)


def test_block_flop_fraction_counts_a_conditional_half_as_half_a_call():
    ts = make_solver("dpmsolver++", 4).timesteps
    s = _plan_schedule([8] * 4, [False, False, False, True], "dpmsolver++", 4, 8, 2)
    assert s.uncond_plan(ts) == [False, False, False, True]
    assert s.block_flop_fraction(ts) == pytest.approx(3.5 / 4)
    assert s.block_flop_fraction(ts) * 4 / 5 == pytest.approx(0.7)  # 0.7 of DPM-Solver++ 5's calls


def test_the_schedule_file_keeps_uncond(tmp_path):
    s = _plan_schedule([8] * 4, [False, False, True, True], "dpmsolver++", 4, 8, 2)
    path = s.save(tmp_path / "p.json")
    back = ExitSchedule.load(path)
    assert back.uncond == s.uncond and back.forecast_order == 2
    ts = make_solver("dpmsolver++", 4).timesteps
    assert back.uncond_plan(ts) == [False, False, True, True]
    plain = ExitSchedule.piecewise([8, 8, 4, 4])
    assert "uncond" not in plain.to_dict() and ExitSchedule.from_dict(plain.to_dict()).uncond is None


@pytest.mark.parametrize("kw,match", [
    (dict(uncond=["run", "forecast"]), "`uncond` expected one of"),
    (dict(uncond=["run", "skip", "run", "run"]), "`uncond` expected names in"),
    (dict(uncond="forecast"), "`uncond` expected one of"),
])
def test_bad_uncond_is_named(kw, match):
    with pytest.raises(ValueError, match=match):
        ExitSchedule([8, 8, 8, 8], 8, 1000, **kw)


def test_uncond_forecast_below_full_depth_or_step_indexed_is_refused():
    with pytest.raises(ValueError, match="full depth .8. only"):
        ExitSchedule([8, 4, 8, 8], 8, 1000, uncond=["run", "forecast", "run", "run"])
    with pytest.raises(ValueError, match="timestep-indexed"):
        ExitSchedule([8, 4], 8, period=2, uncond=["run", "forecast"])


def test_sample_refuses_uncond_forecasts_without_cfg_or_at_the_first_call():
    model = ToyModel(num_blocks=3)
    noise = torch.randn(2, 3, 5, 5)
    y = torch.tensor([0, 1])
    sched = _plan_schedule([3] * 4, [False, False, True, True], "ddim", 4, 3, 1)
    model.calls.clear()
    with pytest.raises(ValueError, match="cfg_scale: .* expected cfg_scale != 1, got 1"):
        sample(model, noise, y, schedule=sched, cfg_scale=1.0)
    first = _plan_schedule([3] * 4, [True, False, False, False], "ddim", 4, 3, 1)
    with pytest.raises(ValueError, match="schedule: .* at model call 0 .* before any call runs both CFG halves"):
        sample(model, noise, y, schedule=first, cfg_scale=2.0)
    assert model.calls == []  # refused before any model call


def test_the_tiers_that_run_the_pipelines_guidance_refuse_it():
    import eekernels
    from eekernels.models import DiT

    sched = _plan_schedule([8] * 4, [False, False, True, True], "ddim", 4, 8, 1)
    with pytest.raises(ValueError, match="accelerate: `schedule` .* forecasts CFG's unconditional branch"):
        sched.check_one_policy("drop", "accelerate")
    model = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2, num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="accelerate: `schedule` .* forecasts CFG's unconditional branch"):
        eekernels.accelerate(model, schedule=_plan_schedule([4] * 4, [False, False, True, True], "ddim", 4, 4, 1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused, the model untouched


@pytest.mark.parametrize("calls,budget", [(4, 0.875), (5, 0.7), (8, 0.7), (10, 0.6), (3, 0.7)])
def test_uncond_plans_spend_within_the_budget_and_run_both_halves_first(calls, budget):
    plans = uncond_plans(calls, budget)
    assert plans
    for u in plans:
        spent = sum(0.5 if m == "forecast" else 1.0 for m in u) / calls
        assert budget - 0.06 - 1e-9 <= spent <= budget + 1e-9
        assert u[0] == "run"
    assert uncond_plans(2, 0.75) == [("run", "forecast")]
    assert uncond_plans(4, 0.5) == []  # the first call runs both halves: 2.5 of 4 at least
    assert uncond_plans(10, 0.5) == []  # at best (1 + 9 / 2) / 10 = 0.55


def test_the_joint_search_samples_uncond_plans_counts_them_half_and_the_plan_round_trips(tmp_path):
    import eekernels

    model = ToyModel(num_blocks=4, seed=1)
    noises = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(9))
    y = torch.arange(6) % 5
    sched = eekernels.calibrate(model, sampler="dpmsolver++", steps=5, cfg_scale=2.0, budget=0.7, noises=noises,
                                conditions=y, exit_policy="forecast", search="steps,uncond", forecast_order=2)
    joint = sched.calibration.joint
    assert "uncond" in joint["search"]
    rows = [r for r in joint["alternatives"] if r.get("uncond")]
    assert {r["steps"] for r in rows} == {4, 5}  # 4 steps, one call halved; 5 steps, three calls halved
    for r in rows:
        n_ref = 5
        spent = sum(0.5 if u == "forecast" else 1.0 for u in r["uncond"]) / n_ref
        assert r["spent_fraction"] == pytest.approx(spent) and spent <= 0.7 + 1e-9
        assert r["uncond"][0] == "run" and r["policy"] == "uncond"

    back = ExitSchedule.load(sched.save(tmp_path / "plan.json"))
    assert back.uncond == sched.uncond
    if sched.uncond is not None:  # an uncond plan won: its counted FLOPs are the report's
        ts = make_solver("dpmsolver++", sched.steps).timesteps
        assert sched.block_flop_fraction(ts) == pytest.approx(sched.calibration.block_flop_fraction)
        a = sample(model, noises, y, schedule=sched, cfg_scale=2.0)
        b = sample(model, noises, y, schedule=back, cfg_scale=2.0)
        assert torch.equal(a, b)
    both = eekernels.calibrate(model, sampler="dpmsolver++", steps=5, cfg_scale=2.0, budget=0.7, noises=noises,
                               conditions=y, exit_policy="forecast", search="steps,uncond")  # orders 1 and 2
    rows = [r for r in both.calibration.joint["alternatives"] if r.get("uncond")]
    assert {r["forecast_order"] for r in rows} == {1, 2}
    for r in rows:  # order 2 from two calls is order 1: sampled once, at order 1
        last = max(i for i, u in enumerate(r["uncond"]) if u == "forecast")
        assert r["forecast_order"] == 1 or r["uncond"][:last].count("run") >= 3
    with pytest.raises(ValueError, match="search: 'uncond' .* expected cfg_scale != 1"):
        eekernels.calibrate(model, sampler="dpmsolver++", steps=5, cfg_scale=1.0, budget=0.7, noises=noises,
                            conditions=y, exit_policy="forecast", search="uncond")


def test_search_names_take_uncond_apart_from_the_policies():
    from eekernels.calibration import parse_search, search_names

    assert search_names("steps, uncond") == ["steps", "uncond"]
    assert parse_search("steps,uncond", "forecast") == (True, ("forecast",))
    with pytest.raises(ValueError, match="search: expected names from"):
        search_names("steps,unconditional")


def test_a_reused_session_starts_each_trajectory_afresh():
    """The graph path reuses a session (and its guidance buffer) across sample() calls: a second run with other
    noise must equal a fresh one (the kept timesteps of the first run are forgotten). Run eagerly on a reused
    session through the same GraphCache machinery the GPU uses is not possible here; the restart is checked on the
    session's forecast directly."""
    from eekernels.models.cache import ForecastCache

    g = ForecastCache((0,), order=2)
    for t in (900.0, 700.0, 500.0):
        g.begin_call(t, True)
        g.store(0, torch.full((1,), t))
    g.restart()
    assert g.times == []
    model = ToyModel(num_blocks=3, seed=6).double()
    sched = _plan_schedule([3] * 5, [False, False, False, True, True], "ddim", 5, 3, 2)
    n1 = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    n2 = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    y = torch.tensor([1, 4])
    first = sample(model, n1, y, schedule=sched, cfg_scale=2.0)
    again = sample(model, n1, y, schedule=sched, cfg_scale=2.0)
    assert torch.equal(first, again)
    assert not torch.equal(first, sample(model, n2, y, schedule=sched, cfg_scale=2.0))


def test_cli_plans_uncond_prints_each_calls_half_and_samples_the_plan(tmp_path, capsys):
    import re

    from eekernels import cli

    out, never = tmp_path / "plan.json", tmp_path / "never.json"
    base = ["calibrate", "--sampler", "dpmsolver++", "--steps", "5", "--samples", "3", "--budget", "0.7",
            "--exit-policy", "forecast", "--device", "cpu", "--no-progress"]
    assert cli.main(base + ["--search", "steps,uncond", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    sched = ExitSchedule.load(out)
    j = sched.calibration.joint
    assert "joint search (steps, forecast, uncond)" in text and j["chosen"] in text
    assert f"block-FLOP fraction {j['spent_fraction']:.3f} of full depth at 5 steps" in text or sched.steps == 5
    if sched.uncond is not None:
        halves = sched.uncond_plan(make_solver("dpmsolver++", sched.steps).timesteps)
        assert f"{['forecast' if h else 'run' for h in halves]}" in text
    show = ["sample", "--model", "glyph-dit", "--schedule", f"calibrated:{out}", "--num-images", "2", "--repeats",
            "1", "--no-compare", "--no-progress", "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(show) == 0
    assert cli.main(base + ["--search", "steps,uncond", "--cfg-scale", "1", "--out", str(never)]) == 2
    assert re.search(r"--search: 'uncond' .* expected --cfg-scale != 1", capsys.readouterr().err)
    assert not never.exists()
