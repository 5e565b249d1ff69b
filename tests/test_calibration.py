"""Calibrated exit schedules (eekernels.calibration, eekernels calibrate): the DP against brute force on a toy model
whose errors are known, the budget, the files, every family, the CLI and the named errors."""
import itertools
import math
import re

import pytest
import torch
import torch.nn as nn

from eekernels import calibration as C
from eekernels.eval import baselines
from eekernels.models import DiT, TextCondition, UNet, UViT
from eekernels.samplers import make_solver, sample
from eekernels.schedules import ExitSchedule
from tests.utils import tiny_text_model


class Toy(nn.Module):
    """eps = 0.1 x + err: drop adds (L - d) * a(t); cache adds (L - d) * (t_rec - t) / 1000, t_rec the t of the
    last full call. Known error structure, so the DP can be checked against brute force."""

    num_blocks, min_depth, in_channels, out_channels = 4, 1, 1, 1
    num_classes = null_class = None
    learn_sigma = False

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    @staticmethod
    def a(t):
        return 0.3 + torch.sin(t / 150.0) ** 2

    def forward(self, x, t, y=None, depth=None, exit_cache=None):
        d = self.num_blocks if depth is None else depth
        base = 0.1 * x * self.w
        if exit_cache is not None:
            if d == self.num_blocks:
                for k in exit_cache.depths:
                    exit_cache.store(k, t.clone())
                return base
            return base + (self.num_blocks - d) * (exit_cache.load(d) - t)[:, None, None, None] / 1000
        return base + (self.num_blocks - d) * self.a(t)[:, None, None, None]


def _brute(weights, cost_units, err, depths, first_full=False):
    best = (math.inf, None)
    for plan in itertools.product(depths, repeat=len(weights)):
        if sum(plan) > cost_units or (first_full and plan[0] != max(depths)):
            continue
        e = err(plan)
        if e < best[0] - 1e-12 or (abs(e - best[0]) <= 1e-12 and sum(plan) < sum(best[1])):
            best = (e, list(plan))
    return best


@pytest.mark.parametrize("budget", [0.4, 0.6, 0.75])
def test_drop_dp_matches_brute_force_on_a_known_error_structure(budget):
    m, noise = Toy(), torch.randn(3, 1, 2, 2)
    steps, L = 5, 4
    sched = C.calibrate(m, sampler="ddim", steps=steps, budget=budget, noises=noise, measure="calls")
    rep = sched.calibration
    ts = make_solver("ddim", steps).timesteps.double()
    # the measured errors are the known ones
    for k in range(steps):
        for i, d in enumerate(rep.candidates):
            assert rep.errors[k][i] == pytest.approx(float((L - d) * Toy.a(ts[k])), rel=1e-5, abs=1e-7)
    w = C.solver_weights(make_solver("ddim", steps))
    units = int(budget * L * steps)
    want_e, want = _brute(w, units, lambda p: sum(w[k] * (L - p[k]) * float(Toy.a(ts[k])) for k in range(steps)),
                          range(1, L + 1))
    assert rep.plan == want and rep.proxy == pytest.approx(want_e, rel=1e-5)
    assert sum(rep.plan) <= units and rep.block_flop_fraction <= budget + 1e-12
    assert list(sched.plan(make_solver("ddim", steps).timesteps)) == rep.plan  # the schedule reproduces the plan
    assert sched.block_flop_fraction(make_solver("ddim", steps).timesteps) <= budget


@pytest.mark.parametrize("budget", [0.6, 0.75])
def test_cache_dp_matches_brute_force_and_runs_full_first(budget):
    m, noise = Toy(), torch.randn(2, 1, 2, 2)
    steps, L, R = 5, 4, 2
    sched = C.calibrate(m, sampler="ddim", steps=steps, budget=budget, noises=noise, exit_policy="cache",
                        max_reuse=R, measure="calls")
    rep = sched.calibration
    ts = [float(t) for t in make_solver("ddim", steps).timesteps]
    w = rep.weights

    def err(p):
        total, last = 0.0, None
        for k, d in enumerate(p):
            if d == L:
                last = k
            elif last is None or k - last > R:
                return math.inf
            else:
                total += w[k] * (L - d) * abs(ts[last] - ts[k]) / 1000
        return total

    want_e, want = _brute(w, int(budget * L * steps), err, range(1, L + 1), first_full=True)
    assert rep.plan[0] == L and rep.proxy == pytest.approx(want_e, rel=1e-5, abs=1e-12)
    assert err(rep.plan) == pytest.approx(want_e, rel=1e-5, abs=1e-12)
    assert C.plan_proxy(rep, rep.plan) == pytest.approx(rep.proxy, rel=1e-9, abs=1e-15)
    # the schedule samples with exit_policy="cache" (its first call is full depth)
    sample(m, noise, sampler="ddim", steps=steps, schedule=sched, exit_policy="cache")


def test_drop_and_cache_dp_with_unequal_depth_costs_match_brute_force():
    """depth_costs: a call at depth d costs c[d] (here: U-Net-like, the first level dearest) and the budget is a
    fraction of full depth's cost; the DP still finds the brute-force optimum under that cost."""
    m, noise = Toy(), torch.randn(2, 1, 2, 2)
    steps, L, R = 5, 4, 2
    raw = {1: 5.0, 2: 7.0, 3: 9.0, 4: 10.0}
    unit = {d: round(C.COST_UNITS * v / raw[L]) for d, v in raw.items()}
    ts = make_solver("ddim", steps).timesteps.double()
    for budget in (0.72, 0.85):  # the cache plans need full depth every R + 1 calls: 0.7 at the least here
        cap = int(budget * unit[L] * steps)
        drop = C.calibrate(m, sampler="ddim", steps=steps, budget=budget, noises=noise, measure="calls",
                           depth_costs=raw).calibration
        w = drop.weights
        best = min((sum(w[k] * (L - p[k]) * float(Toy.a(ts[k])) for k in range(steps)), sum(unit[d] for d in p), list(p))
                   for p in itertools.product(range(1, L + 1), repeat=steps) if sum(unit[d] for d in p) <= cap)
        assert drop.proxy == pytest.approx(best[0], rel=1e-5) and sum(unit[d] for d in drop.plan) <= cap
        assert drop.depth_costs == [unit[d] for d in drop.candidates]
        assert drop.cost_fraction == pytest.approx(sum(unit[d] for d in drop.plan) / (unit[L] * steps))
        cache = C.calibrate(m, sampler="ddim", steps=steps, budget=budget, noises=noise, measure="calls",
                            exit_policy="cache", max_reuse=R, depth_costs=[raw[d] for d in range(1, L + 1)]).calibration
        assert cache.plan[0] == L and sum(unit[d] for d in cache.plan) <= cap
        assert C.plan_proxy(cache, cache.plan) == pytest.approx(cache.proxy, rel=1e-9, abs=1e-15)
    with pytest.raises(ValueError, match="depth_costs"):
        C.calibrate(m, sampler="ddim", steps=steps, budget=0.7, noises=noise, depth_costs={1: 1.0, 4: 2.0})
    with pytest.raises(ValueError, match="depth_costs"):
        C.calibrate(m, sampler="ddim", steps=steps, budget=0.7, noises=noise, depth_costs="params")


def test_replan_equals_a_fresh_calibration_at_that_budget():
    m, noise = Toy(), torch.randn(3, 1, 2, 2)
    for policy in ("drop", "cache"):
        first = C.calibrate(m, sampler="ddim", steps=5, budget=0.9, noises=noise, measure="calls", exit_policy=policy)
        for budget in (0.6, 0.75):
            again = C.replan(first, budget)
            fresh = C.calibrate(m, sampler="ddim", steps=5, budget=budget, noises=noise, measure="calls",
                                exit_policy=policy)
            assert again.calibration.plan == fresh.calibration.plan and again.table == fresh.table
            assert again.calibration.proxy == pytest.approx(fresh.calibration.proxy, rel=1e-12)
            assert again.calibration.budget == budget and first.calibration.budget == 0.9  # the input is unchanged
    with pytest.raises(ValueError, match="budget"):
        C.replan(first, 1.5)
    with pytest.raises(ValueError, match="calibrated"):
        C.replan(ExitSchedule.piecewise([4, 3, 2]), 0.5)


def test_replan_takes_what_exit_schedule_load_returns(tmp_path):
    """One file format, one report attribute: a calibrated schedule saved and read back by ExitSchedule re-plans
    exactly as the in-memory one does, for both policies."""
    m, noise = Toy(), torch.randn(3, 1, 2, 2)
    for policy in ("drop", "cache"):
        sched = C.calibrate(m, sampler="ddim", steps=5, budget=0.9, noises=noise, measure="calls", exit_policy=policy)
        back = ExitSchedule.load(sched.save(tmp_path / f"{policy}.json"))
        assert back.calibration == sched.calibration
        for budget in (0.6, 0.75):
            a, b = C.replan(back, budget), C.replan(sched, budget)
            assert a.table == b.table and a.calibration == b.calibration
    assert not hasattr(C, "FORMAT") and not hasattr(C, "save_schedule") and not hasattr(C, "load_schedule")


def test_replan_of_a_file_written_by_the_earlier_code(tmp_path):
    """A calibrated file in the layout eekernels.calibration.save_schedule wrote (a literal dict of that layout):
    ExitSchedule.load reads its report and replan re-plans it, the DP's answer equal to brute force over its
    recorded errors."""
    import json

    from tests.test_schedules import OLD_FILE

    path = tmp_path / "old.json"
    path.write_text(json.dumps(OLD_FILE))
    rep = OLD_FILE["calibration"]
    w, errs, cands = rep["weights"], rep["errors"], rep["candidates"]
    for budget in (0.5, 0.6, 0.9):
        new = C.replan(ExitSchedule.load(path), budget)
        best = min((sum(w[k] * errs[k][cands.index(p[k])] for k in range(3)), sum(p), list(p))
                   for p in itertools.product(cands, repeat=3) if sum(p) <= math.floor(budget * 12 + 1e-9))
        assert new.calibration.plan == best[2] and new.calibration.proxy == pytest.approx(best[0], rel=1e-12)
        assert new.plan(torch.tensor(rep["call_timesteps"])).tolist() == best[2]  # at the recorded call timesteps
        assert new.calibration.budget == budget and new.calibration.validation is None


def test_depth_flops_of_a_unet_rise_with_depth_and_calibrate_spends_them():
    m = UNet(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1,
             down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, norm_num_groups=4,
             attention_head_dim=None).eval()
    flops = C.depth_flops(m, torch.randn(1, 3, 8, 8))
    assert sorted(flops) == [1, 2, 3] and flops[1] < flops[2] < flops[3]
    assert flops[1] > flops[3] / 3  # the full-resolution level costs most: depth 1 is not 1/3 of the work
    sched = C.calibrate(m, sampler="ddim", steps=4, budget=0.8, noises=torch.randn(2, 3, 8, 8), depth_costs="flops")
    rep = sched.calibration
    assert rep.cost_fraction <= 0.8 + 1e-12 and rep.block_flop_fraction <= 1.0


def test_solver_weights_ddim_closed_form():
    s = make_solver("ddim", 6)
    sb = lambda ab: math.sqrt((1 - ab) / ab)  # noqa: E731
    ab = [float(s.table[k, s.col["s0"]]) ** 2 for k in range(6)]
    ab_prev = [float(s.table[k, s.col["p0"]]) ** 2 for k in range(6)]
    want = [abs(sb(ab_prev[k]) - sb(ab[k])) for k in range(6)]
    assert C.solver_weights(s, None) == pytest.approx(want, rel=1e-6)
    # with the Gaussian reference denoiser the noisy end weighs far less
    w = C.solver_weights(s)
    assert w[0] < want[0] / 5 and all(v >= 0 for v in w)


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++", "euler", "heun", "flow_euler", "flow_heun",
                                     "flow_dpmsolver++"])
def test_solver_weights_are_the_final_samples_sensitivity_to_each_call(sampler):
    """Run the real sampler with the exact (linear) Gaussian denoiser as the model, perturb call k's output by
    delta: the final sample moves by w[k] delta in every element (the weights' definition, flow solvers too)."""
    import numpy as np

    s, std, delta = make_solver(sampler, 5), 0.5, 1e-3
    flow = s.prediction == "flow"
    ac = None if flow else np.asarray(s.alphas_cumprod, dtype=np.float64)

    def exact(x, t):
        t = float(t[0])
        if flow:  # exact E[noise - x0 | x] for x0 ~ N(0, std^2)
            sg = t / 1000
            return (sg - (1 - sg) * std**2) / ((1 - sg) ** 2 * std**2 + sg**2) * x
        ab = float(np.interp(t, np.arange(len(ac)), ac))
        return math.sqrt(1 - ab) / (ab * std**2 + 1 - ab) * x

    noise = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    base = sample(lambda x, t, y: exact(x, t), noise, sampler=sampler, steps=5)
    moved = []
    for k in range(s.num_calls):
        calls = [0]

        def model(x, t, y, k=k):
            calls[0] += 1
            return exact(x, t) + (delta if calls[0] == k + 1 else 0.0)

        d = ((sample(model, noise, sampler=sampler, steps=5) - base) / delta).abs()
        assert float(d.max() - d.min()) <= 1e-6 * float(d.max()) + 1e-9  # the same in every element
        moved.append(float(d.mean()))
    assert C.solver_weights(s, std) == pytest.approx(moved, rel=1e-5, abs=1e-9)


def _dit():
    torch.manual_seed(0)
    return baselines.randomized(DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=3, num_heads=2,
                                    num_classes=5)).eval()


def test_prefix_fast_path_equals_the_model_at_every_depth():
    m = _dit()
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([3.0, 411.0, 977.0]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        out, states, cond = C.prefix_forward(m, x, t, y)
        torch.testing.assert_close(out, m(x, t, y), rtol=1e-5, atol=1e-6)
        for d in range(1, 4):
            torch.testing.assert_close(C.prefix_output(m, states[d], cond), m(x, t, y, depth=d), rtol=1e-5, atol=1e-6)
    # and the two ways of measuring agree
    noise, lab = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for policy in ("drop", "cache"):
        a = C.calibrate(m, sampler="dpmsolver++", steps=4, cfg_scale=1.5, budget=0.7, noises=noise, conditions=lab,
                        exit_policy=policy, measure="prefix").calibration
        b = C.calibrate(m, sampler="dpmsolver++", steps=4, cfg_scale=1.5, budget=0.7, noises=noise, conditions=lab,
                        exit_policy=policy, measure="calls").calibration
        assert a.plan == b.plan and a.model_calls < b.model_calls
        fa = [v for row in a.errors for v in (row if policy == "drop" else [u for r in row if r for u in r])]
        fb = [v for row in b.errors for v in (row if policy == "drop" else [u for r in row if r for u in r])]
        assert fa == pytest.approx(fb, rel=1e-4, abs=1e-7)


def test_save_load_round_trip(tmp_path):
    m = _dit()
    sched = C.calibrate(m, sampler="heun", steps=3, budget=0.6, noises=torch.randn(2, 3, 8, 8),
                        conditions=torch.tensor([1, 2]))
    rep = sched.calibration
    groups = C._groups(rep.call_timesteps, 1000)
    assert any(len(g) == 2 for g in groups)  # Heun's repeated t share a depth
    for g in groups:
        assert len({rep.plan[k] for k in g}) == 1
    path = sched.save(tmp_path / "s.json")
    back = ExitSchedule.load(path)
    assert back.table == sched.table and back.total_depth == sched.total_depth and back.name == sched.name
    assert back.calibration.plan == rep.plan and back.calibration.errors == rep.errors
    assert len(back.table) == 1000  # one bin per integer timestep
    ts = make_solver("heun", 3).timesteps
    assert back.plan(ts).tolist() == rep.plan


@pytest.mark.parametrize("family", ["dit", "uvit", "unet"])
def test_every_family_calibrates(family):
    torch.manual_seed(0)
    if family == "dit":
        m, y = _dit(), torch.tensor([0, 3])
    elif family == "uvit":
        m = baselines.randomized(UViT(input_size=8, patch_size=2, in_channels=3, embed_dim=24, depth=4, num_heads=2,
                                      num_classes=5)).eval()
        y = torch.tensor([1, 2])
    else:
        m = UNet(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                 norm_num_groups=4, attention_head_dim=None).eval()
        y = None
    noise = torch.randn(2, 3, 8, 8)
    cfg = 1.5 if y is not None else 1.0
    for policy in ("drop", "cache"):
        sched = C.calibrate(m, sampler="ddim", steps=4, cfg_scale=cfg, exit_policy=policy, budget=0.8, noises=noise,
                            conditions=y, holdout=(torch.randn(2, 3, 8, 8), y), validate_plans=3)
        rep = sched.calibration
        assert rep.measure == ("prefix" if family == "dit" else "calls")
        assert min(rep.plan) >= m.min_depth and rep.block_flop_fraction <= 0.8
        assert -1 <= rep.validation["spearman"] <= 1 or math.isnan(rep.validation["spearman"])
        sched.validate_for(m)
        sample(m, noise, y, sampler="ddim", steps=4, cfg_scale=cfg, schedule=sched, exit_policy=policy)


@pytest.mark.parametrize("policy", ["drop", "cache"])
def test_closed_loop_keeps_the_sampled_plan_closest_to_full_depth(policy, tmp_path):
    m = _dit()
    g = torch.Generator().manual_seed(7)
    noise, y = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 4])
    kw = dict(sampler="dpmsolver++", steps=6, cfg_scale=1.5, budget=0.6, noises=noise, conditions=y,
              exit_policy=policy)
    prox = C.calibrate(m, **kw).calibration
    sched = C.calibrate(m, select="closed-loop", **kw)
    rep = sched.calibration
    assert rep.select == "closed-loop" and len(rep.selection) >= (2 if policy == "cache" else 1)
    plans = [r["plan"] for r in rep.selection]
    assert prox.plan in plans and rep.plan in plans and len({tuple(p) for p in plans}) == len(plans)
    assert all(sum(p) <= 0.6 * m.num_blocks * 6 for p in plans)
    full = sample(m, noise, y, sampler="dpmsolver++", steps=6, cfg_scale=1.5).double()
    for r in rep.selection:  # each row's error is that plan's real one, sampled again here
        s = C._table_schedule(r["plan"], make_solver("dpmsolver++", 6).timesteps, 3, 1000, "check")
        x = sample(m, noise, y, sampler="dpmsolver++", steps=6, cfg_scale=1.5, schedule=s, exit_policy=policy)
        assert r["real"] == pytest.approx(float((x.double() - full).square().mean().sqrt()), rel=1e-6)
    best = min(r["real"] for r in rep.selection)
    assert [r["real"] for r in rep.selection if r["plan"] == rep.plan] == [best]
    assert sched.plan(make_solver("dpmsolver++", 6).timesteps).tolist() == rep.plan
    assert rep.model_calls > prox.model_calls and rep.block_flop_fraction <= 0.6
    back = ExitSchedule.load(sched.save(tmp_path / "cl.json")).calibration
    assert back.selection == rep.selection and back.select == "closed-loop"
    with pytest.raises(ValueError, match="select"):
        C.calibrate(m, select="best", **kw)


def _text_inputs(name, B, seed):
    m = tiny_text_model(name)
    g = torch.Generator().manual_seed(seed)

    def cond():
        tok = torch.randn(B, 6, m.token_dim, generator=g)
        mask = (torch.arange(6)[None] < torch.randint(1, 7, (B,), generator=g)[:, None]) if name == "pixart" else None
        pooled = None if m.pooled_dim is None else torch.randn(B, m.pooled_dim, generator=g)
        extra = {"guidance": torch.full((B,), 3.5)} if name == "flux" else {}
        return TextCondition(tok, mask, pooled, extra)

    size = m.input_size or 8
    return m, torch.randn(B, m.in_channels, size, size, generator=g), cond(), cond()


@pytest.mark.parametrize("name,sampler", [("pixart", "dpmsolver++"), ("sd3", "flow_euler"),
                                          ("flux", "flow_dpmsolver++")])
def test_text_and_flow_families_calibrate(name, sampler, tmp_path):
    """PixArt (epsilon, prefix measurement), SD3 and FLUX (flow, calls): CFG with negative prompts, both policies,
    the budget, the held-out validation, the file, and sample() running the plan's depths."""
    m, noise, y, neg = _text_inputs(name, 3, seed=1)
    _, hn, hy, hneg = _text_inputs(name, 2, seed=2)
    for policy in ("drop", "cache"):
        sched = C.calibrate(m, sampler=sampler, steps=4, cfg_scale=2.0, exit_policy=policy, budget=0.7,
                            noises=noise, conditions=y, negative=neg, holdout=(hn, hy, hneg), validate_plans=3)
        rep = sched.calibration
        assert rep.measure == ("prefix" if name == "pixart" else "calls")
        assert rep.block_flop_fraction <= 0.7 and min(rep.plan) >= m.min_depth and max(rep.plan) <= m.num_blocks
        assert len(rep.validation["plans"]) >= 3 and all(math.isfinite(p["real"]) for p in rep.validation["plans"])
        if policy == "cache":
            assert rep.plan[0] == m.num_blocks
        back = ExitSchedule.load(sched.save(tmp_path / f"{name}_{policy}.json"))
        assert back.table == sched.table and back.calibration.plan == rep.plan
        seen = []
        hook = m.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw.get("depth")), with_kwargs=True)
        try:
            sample(m, noise, y, sampler=sampler, steps=4, cfg_scale=2.0, negative=neg, schedule=back,
                   exit_policy=policy)
        finally:
            hook.remove()
        assert [m.num_blocks if d is None else int(d) for d in seen] == rep.plan


def _call_sigmas(model, run) -> list[float]:
    """The t of every full-depth model call ``run()`` makes (one per solver call), as sigma = t / 1000."""
    seen = []

    def hook(mod, args, kw):
        if kw.get("depth") is None:
            t = args[1] if len(args) > 1 else kw["t"]
            seen.append(float(t.reshape(-1)[0]) / 1000)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("options", [dict(use_dynamic_shifting=True, image_seq_len=16), {}])
def test_flux_calibration_runs_the_sigmas_sample_runs(options):
    """FLUX's grid (BFL / FluxPipeline shift linspace(1, 1/N, N), the scheduler's default is linspace(1, 0.001,
    N)): whatever sample() uses for a FLUX-family model, with or without dynamic shifting, the calibration's
    trajectory uses too; compared with sample()'s own calls, not with a constant."""
    m, noise, y, _ = _text_inputs("flux", 2, seed=3)
    kw = dict(sampler="flow_euler", steps=5, **options)
    want = _call_sigmas(m, lambda: sample(m, noise, y, **kw))
    rep = None

    def run():
        nonlocal rep
        rep = C.calibrate(m, budget=0.7, noises=noise, conditions=y, **kw).calibration

    got = _call_sigmas(m, run)
    assert len(want) == 5 and got == want
    assert [t / 1000 for t in rep.call_timesteps] == pytest.approx(want, rel=1e-6)


def test_calibration_builds_its_solver_as_sample_does(monkeypatch):
    """One code path: a change to how sample() builds its solver (here another sigma grid, as a family's declared
    default would be) reaches the calibration's trajectory, its weights and its schedule unchanged."""
    from eekernels.samplers import sampling

    m, noise, y, _ = _text_inputs("flux", 2, seed=3)
    plain = _call_sigmas(m, lambda: sample(m, noise, y, sampler="flow_euler", steps=4))
    make = sampling.make_solver

    def declared(sampler, steps, **options):
        options.pop("sigma_grid", None)  # explicit sigmas replace the model's declared grid
        return make(sampler, steps, **dict(options, sigmas=[0.9, 0.7, 0.4, 0.2]))

    monkeypatch.setattr(sampling, "make_solver", declared)
    want = _call_sigmas(m, lambda: sample(m, noise, y, sampler="flow_euler", steps=4))
    assert want != pytest.approx(plain)  # sample() follows it
    sched = None

    def run():
        nonlocal sched
        sched = C.calibrate(m, sampler="flow_euler", steps=4, budget=0.7, noises=noise, conditions=y)

    assert _call_sigmas(m, run) == want
    assert [t / 1000 for t in sched.calibration.call_timesteps] == pytest.approx(want)
    assert sched.plan(torch.tensor(sched.calibration.call_timesteps)).tolist() == sched.calibration.plan


def test_pixart_prefix_and_calls_measure_the_same_errors():
    m, noise, y, _ = _text_inputs("pixart", 3, seed=4)  # CFG against PixArt's learned null caption
    for policy in ("drop", "cache"):
        a, b = (C.calibrate(m, sampler="ddim", steps=4, cfg_scale=1.5, budget=0.7, noises=noise, conditions=y,
                            exit_policy=policy, measure=how).calibration for how in ("prefix", "calls"))
        flat = lambda r: [v for row in r.errors for v in (row if policy == "drop" else  # noqa: E731
                                                          [u for c in row if c for u in c])]
        assert a.plan == b.plan and flat(a) == pytest.approx(flat(b), rel=1e-4, abs=1e-7)


def test_text_calibration_bad_inputs_name_the_argument():
    m, noise, y, neg = _text_inputs("sd3", 2, seed=0)
    kw = dict(sampler="flow_euler", steps=3, budget=0.7, noises=noise)
    with pytest.raises(ValueError, match=r"conditions: expected an eekernels.TextCondition .* got Tensor"):
        C.calibrate(m, conditions=torch.tensor([0, 1]), **kw)
    with pytest.raises(ValueError, match=r"conditions: expected 2 rows"):
        C.calibrate(m, conditions=y.index(slice(0, 1)), **kw)
    with pytest.raises(ValueError, match="negative"):  # SD3 has no null caption: CFG needs the negative prompt
        C.calibrate(m, conditions=y, cfg_scale=2.0, **kw)
    with pytest.raises(ValueError, match="sampler"):  # a flow model with an epsilon solver
        C.calibrate(m, conditions=y, **dict(kw, sampler="ddim"))
    with pytest.raises(ValueError, match="holdout: expected conditions"):
        C.calibrate(m, conditions=y, holdout=(noise, torch.tensor([0, 1])), **kw)
    with pytest.raises(ValueError, match="holdout: expected noises"):
        C.calibrate(m, conditions=y, holdout=(noise[:, :2], y), **kw)
    with pytest.raises(ValueError, match=r"conditions: expected \(B,\) integer class labels or None .* got "
                                         "TextCondition"):
        C.calibrate(_dit(), sampler="ddim", steps=3, noises=torch.randn(2, 3, 8, 8), conditions=y)


def test_bad_inputs_raise_named_value_errors():
    m, noise = _dit(), torch.randn(2, 3, 8, 8)
    y = torch.tensor([0, 1])
    cases = [
        (dict(budget=0.0), "budget"), (dict(budget=1.5), "budget"), (dict(exit_policy="skip"), "exit_policy"),
        (dict(sampler="rk4"), "sampler"), (dict(steps=0), "steps"), (dict(candidates=[0, 3]), "candidates"),
        (dict(max_reuse=0), "max_reuse"), (dict(measure="x"), "measure"), (dict(noises=torch.randn(3, 8, 8)), "noises"),
        (dict(conditions=torch.tensor([0, 1, 2])), "conditions"), (dict(budget=0.2, exit_policy="cache"), "budget"),
    ]
    for kw, name in cases:
        args = dict(sampler="ddim", steps=3, budget=0.7, noises=noise, conditions=y)
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            C.calibrate(m, **args)
    uvit = UViT(input_size=8, patch_size=2, in_channels=3, embed_dim=24, depth=4, num_heads=2, num_classes=5)
    with pytest.raises(ValueError, match="measure"):
        C.calibrate(uvit, steps=2, noises=noise, conditions=y, measure="prefix")
    with pytest.raises(ValueError, match="schedule"):
        C.validate_proxy(m, ExitSchedule.full(3), noise, y)


def test_cli_calibrate_writes_a_schedule_sample_reads(tmp_path, capsys):
    """The default run is the calibration alone and says so in its time split; --validate (held-out validation)
    and --time-reference (one full-depth sampling run) each add their part, timed on its own, and change nothing
    in the schedule."""
    from eekernels import cli

    out, full = tmp_path / "cal.json", tmp_path / "cal_full.json"
    base = ["calibrate", "--steps", "3", "--samples", "2", "--budget", "0.7", "--device", "cpu", "--no-progress"]
    assert cli.main(base + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "block-FLOP fraction" in text and f"calibrated:{out}" in text and "Spearman" not in text
    assert "validation not run (--validate)" in text and "reference timing not run (--time-reference)" in text
    rep = ExitSchedule.load(out).calibration
    assert rep.block_flop_fraction <= 0.7 and rep.validation is None and rep.reference_seconds is None
    assert cli.main(base + ["--validate", "--holdout", "2", "--validate-plans", "2", "--time-reference", "--out",
                            str(full)]) == 0
    text = capsys.readouterr().out
    both = ExitSchedule.load(full).calibration
    assert "Spearman" in text and both.validation["num_samples"] == 2 and both.reference_seconds > 0
    line = next(s for s in text.splitlines() if s.strip().startswith("time:"))
    assert f"calibration {both.seconds:.2f} s" in line and f"validation {both.validation['seconds']:.2f} s" in line
    assert f"reference timing {both.reference_seconds:.2f} s" in line
    assert both.plan == rep.plan and both.errors == rep.errors
    assert cli.main(["calibrate", "--budget", "2", "--no-progress", "--out", str(out)]) == 2
    assert "--budget" in capsys.readouterr().err
    flops = tmp_path / "cal_flops.json"  # the budget in measured FLOPs (a DiT's depths cost almost d)
    assert cli.main(base + ["--costs", "flops", "--out", str(flops)]) == 0
    assert "FLOP fraction" in capsys.readouterr().out and ExitSchedule.load(flops).calibration.cost_fraction <= 0.7
    rc = cli.main(["sample", "--model", "glyph-dit", "--schedule", f"calibrated:{out}", "--steps", "3",
                   "--num-images", "2", "--repeats", "1", "--no-compare", "--no-progress", "--device", "cpu",
                   "--out", str(tmp_path)])
    assert rc == 0


def _cli_bad_options(tmp_path):
    """(extra options, message) for `eekernels calibrate` options that would be ignored or fail after the work."""
    from eekernels.models.condition import save_prompt_embeds
    from eekernels.models.pretrained import pretrained_path

    prompts = tmp_path / "prompts.safetensors"
    save_prompt_embeds(prompts, TextCondition(torch.randn(2, 3, 8)))
    (tmp_path / "a_file").write_text("")
    ckpt = str(pretrained_path("glyph-dit"))
    return [
        (["--prompt-embeds", str(prompts)], r"--prompt-embeds: only used with a text-conditioned model .* got "
                                            r"glyph-dit, a class-label DiT"),
        (["--guidance", "4"], r"--guidance: only used with a guidance-distilled model \(FLUX.1-dev\), got glyph-dit"),
        (["--max-reuse", "2"], r"--max-reuse: only used with --exit-policy cache, got --max-reuse 2 with --exit-policy"),
        (["--holdout", "8"], r"--holdout: only used with --validate"),
        (["--validate-plans", "3"], r"--validate-plans: only used with --validate"),
        (["--validate", "--holdout", "1"], r"--holdout: expected an integer >= 2 with --validate, got 1"),
        (["--num-heads", "4"], r"--num-heads: only used with --checkpoint"),
        (["--model", "glyph-dit", "--checkpoint", ckpt], r"--model: expected --model or --checkpoint, got both"),
        (["--checkpoint", ckpt, "--num-heads", "7"], r"--num-heads: .* has \d+ heads from its own file .* got "
                                                     r"--num-heads 7"),
        (["--shift", "3", "--dynamic-shift"], r"--shift: --dynamic-shift replaces it"),
        (["--shift", "3"], r"--shift: expected a flow sampler"),
        (["--seed", str(2**64)], r"--seed: expected an integer in \[-9223372036854775808, 18446744073709551614\] "
                                 r".* got 18446744073709551616"),  # was torch's "Overflow when unpacking long long"
        (["--seed", str(-2**63 - 1)], r"--seed: expected an integer in .* got -9223372036854775809"),
        (["--num-heads", "0"], r"--num-heads: expected an integer >= 1, got 0"),
        (["--checkpoint", ckpt, "--num-heads", "0"], r"--num-heads: expected an integer >= 1, got 0"),
        (["--size", "0"], r"--size: expected an integer >= 1, got 0"),
        (["--sampler", "rk4"], r"--sampler: expected one of \[.*\], got 'rk4'"),
        (["--sampler", "flow_euler"], r"^eekernels calibrate: error: --sampler: 'flow_euler' expects a model "
                                      r"predicting 'flow'"),  # was "sampler: ..."
        (["--device", "cuda:x"], r"--device: expected cpu, cuda"),
        (["--out", str(tmp_path / "a_file" / "cal.json")], r"--out: cannot create .*cal\.json': .*a_file' is not a "
                                                           r"folder"),
        (["--out", str(tmp_path)], r"--out: expected a file path, got the folder"),
    ]


def test_cli_calibrate_refuses_ignored_or_late_failing_options_before_any_work(tmp_path, capsys, monkeypatch):
    """Each option that the run would ignore (e.g. --prompt-embeds with a class-label checkpoint) or that would
    fail only after the calibration (an --out that cannot be written): one error line, exit code 2, before any
    calibration work, and no file written."""
    from eekernels import cli

    def no_work(*a, **k):
        raise AssertionError("the calibration ran")

    monkeypatch.setattr(C, "calibrate", no_work)
    out = tmp_path / "never.json"
    for extra, match in _cli_bad_options(tmp_path):
        argv = ["calibrate", "--steps", "2", "--samples", "2", "--device", "cpu", "--no-progress", "--out", str(out)]
        rc = cli.main(argv + extra)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, (extra, err)
        assert re.search(match, err), (extra, err)
        assert not out.exists()


def test_cli_guidance_is_refused_where_the_prompt_file_sets_it(tmp_path):
    """FLUX-dev's guidance: --guidance (default 3.5) fills it in, unless the --prompt-embeds file holds its own,
    which the run uses; --guidance given as well would be ignored: refused by name."""
    import argparse

    from eekernels.jobs.calibrate import text_conditions
    from eekernels.models.condition import save_prompt_embeds

    m = tiny_text_model("flux")
    cond = lambda extra: TextCondition(torch.randn(2, 6, 12), None, torch.randn(2, 5), extra)  # noqa: E731
    own, plain = tmp_path / "own.safetensors", tmp_path / "plain.safetensors"
    save_prompt_embeds(own, cond({"guidance": torch.full((2,), 2.0)}))
    save_prompt_embeds(plain, cond({}))
    args = lambda f, g: argparse.Namespace(prompt_embeds=str(f), guidance=g, cfg_scale=1.0)  # noqa: E731
    with pytest.raises(ValueError, match=r"--guidance: the --prompt-embeds file holds its own guidance"):
        text_conditions(args(own, 4.0), m, 3)
    assert text_conditions(args(own, None), m, 3)[0].extra["guidance"].tolist() == [2.0, 2.0, 2.0]
    assert text_conditions(args(plain, None), m, 3)[0].extra["guidance"].tolist() == [3.5, 3.5, 3.5]
    assert text_conditions(args(plain, 4.0), m, 3)[0].extra["guidance"].tolist() == [4.0, 4.0, 4.0]


def test_cli_calibrates_a_text_checkpoint_from_prompt_embeddings(tmp_path, capsys):
    """A PixArt .safetensors and a caption-embedding file: one command, a schedule sample() can use."""
    from eekernels import cli
    from eekernels.models.condition import load_prompt_embeds, save_prompt_embeds
    from eekernels.serialization import save_state

    m, _, y, _ = _text_inputs("pixart", 3, seed=5)
    ckpt, prompts, out = tmp_path / "pixart.safetensors", tmp_path / "prompts.safetensors", tmp_path / "cal.json"
    save_state(m.state_dict(), ckpt)
    save_prompt_embeds(prompts, y)
    back, neg = load_prompt_embeds(prompts)
    assert neg is None and torch.equal(back.tokens, y.tokens) and torch.equal(back.mask, y.mask)
    base = ["calibrate", "--checkpoint", str(ckpt), "--num-heads", "2", "--steps", "3", "--samples", "4",
            "--validate", "--holdout", "2", "--validate-plans", "2", "--budget", "0.7", "--device", "cpu", "--no-progress",
            "--out", str(out)]
    assert cli.main(base) == 2  # a text model needs captions
    assert "--prompt-embeds: expected a caption-embedding file" in capsys.readouterr().err
    assert cli.main(base + ["--prompt-embeds", str(prompts)]) == 0
    text = capsys.readouterr().out
    assert "dpmsolver++ 3 steps" in text and "Spearman" in text
    sched = ExitSchedule.load(out)
    assert sched.calibration.block_flop_fraction <= 0.7 and sched.calibration.num_samples == 4
    sample(m, torch.randn(2, 4, 8, 8), y.index(slice(0, 2)), sampler="dpmsolver++", steps=3, cfg_scale=1.5,
           schedule=sched)
    bad = tmp_path / "bad.safetensors"
    save_state({"prompt_embeds": y.tokens, "prompt_attention_mask": y.mask[:, :3]}, bad)
    assert cli.main(base + ["--prompt-embeds", str(bad)]) == 2
    assert "prompt_attention_mask' expected shape (3, 6)" in capsys.readouterr().err
    wide = tmp_path / "wide.safetensors"  # captions of another text encoder's width
    save_prompt_embeds(wide, TextCondition(torch.randn(3, 6, 7)))
    assert cli.main(base + ["--prompt-embeds", str(wide)]) == 2
    assert "--prompt-embeds:" in capsys.readouterr().err


def test_cli_calibrates_a_flow_checkpoint_with_its_shift(tmp_path, capsys):
    """An SD3 .safetensors (flow): flow_euler by default, --shift / --dynamic-shift reach the solver, CFG needs the
    file's negative prompt (SD3 has no null caption)."""
    from eekernels import cli
    from eekernels.models import SD3
    from eekernels.models.condition import save_prompt_embeds
    from eekernels.serialization import save_state

    torch.manual_seed(0)
    m = SD3(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=1,
            joint_attention_dim=12, pooled_projection_dim=5, out_channels=4, pos_embed_max_size=8, qk_norm=None)
    for p in m.parameters():
        nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(1)
    cond = lambda: TextCondition(torch.randn(2, 6, 12, generator=g), None, torch.randn(2, 5, generator=g))  # noqa: E731
    ckpt, prompts, only_pos = tmp_path / "sd3.safetensors", tmp_path / "p.safetensors", tmp_path / "pos.safetensors"
    save_state(m.state_dict(), ckpt)
    save_prompt_embeds(prompts, cond(), cond())
    save_prompt_embeds(only_pos, cond())
    base = ["calibrate", "--checkpoint", str(ckpt), "--prompt-embeds", str(prompts), "--steps", "3", "--samples", "2",
            "--holdout", "0", "--size", "8", "--device", "cpu", "--no-progress"]
    assert cli.main(base + ["--shift", "3", "--out", str(tmp_path / "a.json")]) == 0
    assert "flow_euler 3 steps" in capsys.readouterr().out
    rep = ExitSchedule.load(tmp_path / "a.json").calibration
    assert rep.sampler == "flow_euler" and rep.solver_options == {"shift": 3.0}
    assert rep.call_timesteps == pytest.approx([float(t) for t in make_solver("flow_euler", 3, shift=3.0).timesteps])
    assert cli.main(base + ["--dynamic-shift", "--sampler", "flow_dpmsolver++", "--out", str(tmp_path / "b.json")]) == 0
    capsys.readouterr()
    assert ExitSchedule.load(tmp_path / "b.json").calibration.solver_options == {"use_dynamic_shifting": True,
                                                                               "image_seq_len": 16}
    assert cli.main(base + ["--shift", "3", "--sampler", "ddim", "--out", str(tmp_path / "c.json")]) == 2
    assert "--shift: expected a flow sampler" in capsys.readouterr().err
    nopos = [a if a != str(prompts) else str(only_pos) for a in base]
    assert cli.main(nopos + ["--out", str(tmp_path / "d.json")]) == 2  # CLI default CFG 1.5, no negative prompt
    assert "negative_prompt_embeds" in capsys.readouterr().err
    assert cli.main(nopos + ["--cfg-scale", "1", "--out", str(tmp_path / "d.json")]) == 0
