"""Flow-matching solvers (flow_euler, flow_heun, flow_dpmsolver++) against diffusers' schedulers driven by hand.

The same toy velocity model in both loops; diffusers' ``FlowMatchEulerDiscreteScheduler``,
``FlowMatchHeunDiscreteScheduler`` and ``DPMSolverMultistepScheduler(use_flow_sigmas=True,
prediction_type="flow_prediction")`` step in float32, so float32 runs must agree to about 1e-6 relative. Float64
runs are checked against a float64 loop written here from diffusers' own sigmas and timesteps (the update
formulas of the schedulers' ``step``), to 1e-12.
"""
import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift

from eekernels.samplers import FLOW_SOLVERS, calculate_shift, make_solver, sample
from tests.samplers._toys import TextToy, ToyModel, ToySchedule, relerr, text_condition

TOL32 = {"flow_euler": 1e-6, "flow_heun": 3e-6, "flow_dpmsolver++": 1e-6}  # Heun: diffusers' (x - x0) / sigma


def _diffusers(name, o):
    """The diffusers scheduler for our options, and set_timesteps' keyword arguments."""
    o = dict(o)
    kw = {}
    if "mu" in o:
        kw["mu"] = o.pop("mu")
    if "sigmas" in o:
        kw["sigmas"] = o.pop("sigmas")
    if name == "flow_euler":
        return FlowMatchEulerDiscreteScheduler(**o), kw
    if name == "flow_heun":
        return FlowMatchHeunDiscreteScheduler(**o), kw
    if "shift" in o:
        o["flow_shift"] = o.pop("shift")
    return DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", **o), kw


def _model(seed=1, dtype=torch.float32):
    return ToyModel(num_classes=None, seed=seed).to(dtype)


def _noise(dtype=torch.float32, seed=2, shape=(3, 3, 5, 5)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _by_hand(name, model, noise, steps, schedule=None, **options):
    sched, kw = _diffusers(name, options)
    sched.set_timesteps(steps, **kw)
    x = noise.clone()
    for t in sched.timesteps:
        tt = t.to(torch.float32).expand(len(x))
        depth = {} if schedule is None else {"depth": int(schedule.depth(tt[:1])[0])}
        v = model(x, tt, None, **depth)
        x = sched.step(v, t, x).prev_sample
    return x, sched


@pytest.mark.parametrize("name", FLOW_SOLVERS)
@pytest.mark.parametrize("steps", [1, 2, 7, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_matches_diffusers(name, steps, shift):
    model, noise = _model(), _noise()
    ref, sched = _by_hand(name, model, noise, steps, shift=shift)
    model.calls.clear()
    out = sample(model, noise, sampler=name, steps=steps, shift=shift)
    assert out.dtype == noise.dtype and out.shape == noise.shape
    err = relerr(out, ref)
    if name == "flow_heun" and err > TOL32[name]:
        # diffusers' Heun correction computes v as (x - (x - sigma v)) / sigma in float32: with a tiny sigma_next
        # (shift 1, 2 steps: 0.001) that loses digits. Then ours must be the one nearer the float64 trajectory.
        exact = _float64_reference(name, _model().double(), noise.double(), make_solver(name, steps, shift=shift))
        assert relerr(out, exact) < 0.5 * relerr(ref, exact), f"steps={steps} shift={shift}: {err:.3g}"
    else:
        assert err <= TOL32[name], f"{name} steps={steps} shift={shift}: relative error {err:.3g}"
    # The model sees diffusers' timesteps (t = sigma * 1000; DPM-Solver's cast to int, as diffusers does).
    seen = torch.stack([t[0] for _, t in model.calls])
    assert torch.equal(seen, sched.timesteps.to(torch.float32))
    assert relerr(out, noise) > 0.05  # the trajectory moved (guard against a no-op)


@pytest.mark.parametrize("name", ["flow_euler", "flow_dpmsolver++"])
@pytest.mark.parametrize("mu", [0.5, 1.15, 1.6])
def test_dynamic_shifting_matches_diffusers(name, mu):
    model, noise = _model(seed=3), _noise(seed=4)
    ref, _ = _by_hand(name, model, noise, 9, use_dynamic_shifting=True, mu=mu)
    out = sample(model, noise, sampler=name, steps=9, use_dynamic_shifting=True, mu=mu)
    assert relerr(out, ref) <= TOL32[name]


@pytest.mark.parametrize("seq", [256, 1024, 4096, 777])
def test_image_seq_len_is_the_pipelines_mu(seq):
    """image_seq_len -> mu exactly as the SD3 / FLUX pipelines compute it (calculate_shift with the scheduler's
    base/max seq len and shift), then the same sigmas as with that mu."""
    kw = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    mu = diffusers_calculate_shift(seq, 256, 4096, 0.5, 1.15)
    assert calculate_shift(seq, 256, 4096, 0.5, 1.15) == mu
    for name in FLOW_SOLVERS:
        a = make_solver(name, 6, use_dynamic_shifting=True, image_seq_len=seq, **kw)
        b = make_solver(name, 6, use_dynamic_shifting=True, mu=mu)
        assert torch.equal(a.table, b.table) and a.mu == mu
    # other base/max values (FLUX.1's scheduler config: max_shift 1.15, base 0.5, 256 .. 4096; SD3.5: 3.0 ...)
    s = make_solver("flow_euler", 4, use_dynamic_shifting=True, image_seq_len=seq, base_shift=0.7, max_shift=3.0,
                    base_image_seq_len=128, max_image_seq_len=2048)
    assert s.mu == pytest.approx(diffusers_calculate_shift(seq, 128, 2048, 0.7, 3.0), abs=0)


def test_flux_pipeline_sigmas_with_mu():
    """FLUX's pipeline passes sigmas = linspace(1, 1/N, N) and mu: custom sigmas through the dynamic shift."""
    model, noise = _model(seed=5), _noise(seed=6)
    for steps in (1, 4, 13):
        sig = np.linspace(1.0, 1 / steps, steps)
        mu = diffusers_calculate_shift(64, 256, 4096, 0.5, 1.15)
        ref, _ = _by_hand("flow_euler", model, noise, steps, use_dynamic_shifting=True, mu=mu, sigmas=sig)
        out = sample(model, noise, sampler="flow_euler", steps=steps, use_dynamic_shifting=True, mu=mu, sigmas=sig)
        assert relerr(out, ref) <= 1e-6


@pytest.mark.parametrize("shift", [1.0, 2.5])
def test_custom_sigmas_match_diffusers_euler(shift):
    model, noise = _model(seed=7), _noise(seed=8)
    sig = [0.97, 0.8, 0.61, 0.42, 0.3, 0.11, 0.02]  # uneven, odd count, not starting at 1
    ref, _ = _by_hand("flow_euler", model, noise, len(sig), shift=shift, sigmas=sig)
    out = sample(model, noise, sampler="flow_euler", steps=len(sig), shift=shift, sigmas=torch.tensor(sig))
    assert relerr(out, ref) <= 1e-6


def _float64_reference(name, model, noise, solver):
    """Heun / DPM-Solver++ (2M) / Euler on the given sigmas and timesteps, written out in float64 from the update
    formulas of diffusers' step(): the reference for float64 runs and for options diffusers lacks."""
    sig = [float(s) for s in solver.sigmas]
    N = len(sig) - 1
    ts = solver.timesteps
    x = noise.double().clone()
    v = lambda x, k: model(x, ts[k].double().expand(len(x)), None).double()  # noqa: E731
    if name == "flow_euler":
        for k in range(N):
            x = x + (sig[k + 1] - sig[k]) * v(x, k)
        return x
    if name == "flow_heun":
        call = 0
        for k in range(N):
            d = v(x, call)
            call += 1
            if k == N - 1:
                return x + (sig[k + 1] - sig[k]) * d
            x1 = x + (sig[k + 1] - sig[k]) * d
            d2 = v(x1, call)
            call += 1
            x = x + (sig[k + 1] - sig[k]) * (d + d2) / 2
    def lam(s):  # log(alpha / sigma), alpha = 1 - sigma: +inf at sigma 0, -inf at sigma 1
        return math.inf if s == 0 else -math.inf if s == 1 else math.log(1 - s) - math.log(s)
    prev = None
    for k in range(N):
        x0 = x - sig[k] * v(x, k)
        s_t, a_t = sig[k + 1], 1 - sig[k + 1]
        h = lam(sig[k + 1]) - lam(sig[k])
        em1 = math.expm1(-h) if math.isfinite(h) else -1.0
        if prev is None or k == N - 1:
            x = (s_t / sig[k]) * x - a_t * em1 * x0
        else:
            r0 = (lam(sig[k]) - lam(sig[k - 1])) / h
            D1 = (x0 - prev) / r0
            x = (s_t / sig[k]) * x - a_t * em1 * x0 - 0.5 * a_t * em1 * D1
        prev = x0
    return x


@pytest.mark.parametrize("name", FLOW_SOLVERS)
@pytest.mark.parametrize("options", [dict(shift=3.0), dict(use_dynamic_shifting=True, mu=0.9),
                                     dict(sigmas=[1.0, 0.75, 0.5, 0.3, 0.1], shift=2.0),
                                     dict(use_dynamic_shifting=True, time_shift_type="linear", mu=1.3)])
def test_float64_against_written_out_reference(name, options):
    """Float64 noise and model: the solver state is float64, and every option (also those diffusers' Heun and
    DPM-Solver lack: custom sigmas, dynamic shifting, linear time shift) follows the written-out update."""
    model, noise = _model(seed=9, dtype=torch.float64), _noise(torch.float64, seed=10)
    steps = len(options.get("sigmas", [0] * 5))
    solver = make_solver(name, steps, **options)
    out = sample(model, noise, sampler=name, steps=steps, **options)
    assert out.dtype == torch.float64
    ref = _float64_reference(name, model, noise, solver)
    assert relerr(out, ref) <= 1e-12
    if name != "flow_dpmsolver++" and "time_shift_type" not in options:
        # and diffusers' float32 scheduler's sigmas are the ones used (Euler's sigmas for Heun's extras)
        d, kw = _diffusers("flow_euler", options)
        d.set_timesteps(steps, **kw)
        assert np.array_equal(solver.sigmas, d.sigmas.double().numpy())


def test_float64_run_close_to_diffusers_float32():
    model, noise = _model(seed=11, dtype=torch.float64), _noise(torch.float64, seed=12)
    for name in FLOW_SOLVERS:
        ref, _ = _by_hand(name, model.float(), noise.float(), 7, shift=3.0)
        model.double()
        out = sample(model, noise, sampler=name, steps=7, shift=3.0)
        assert relerr(out, ref) <= 1e-5


def test_timesteps_are_sigma_times_num_train_timesteps():
    for T in (1000, 500):
        s = make_solver("flow_euler", 5, shift=3.0, num_train_timesteps=T)
        assert torch.allclose(s.timesteps.double(), torch.from_numpy(s.sigmas[:-1]) * T, rtol=1e-7)
        h = make_solver("flow_heun", 5, shift=3.0, num_train_timesteps=T)
        assert h.num_calls == 9 and h.timesteps[1] == h.timesteps[2]
        d = make_solver("flow_dpmsolver++", 5, shift=3.0, num_train_timesteps=T)
        assert torch.equal(d.timesteps, torch.floor(d.timesteps))  # integers, as diffusers'
        sched, _ = _diffusers("flow_dpmsolver++", dict(shift=3.0, num_train_timesteps=T))
        sched.set_timesteps(5)
        assert torch.equal(d.timesteps, sched.timesteps.float())


@pytest.mark.parametrize("name", FLOW_SOLVERS)
def test_step_by_step_equals_sample_with_exit_schedule(name):
    model, noise = _model(seed=13), _noise(seed=14)
    schedule = ToySchedule([4, 4, 3, 3, 2, 2, 1, 1])
    want = sample(model, noise, sampler=name, steps=6, shift=3.0, schedule=schedule)
    plan = [d for d, _ in model.calls]
    solver = make_solver(name, 6, shift=3.0)
    assert plan == schedule.plan(solver.timesteps).tolist()  # depth from t = sigma * 1000
    assert solver.init_noise_sigma == 1.0
    x = noise * solver.init_noise_sigma
    for t, d in zip(solver.timesteps, plan):
        x = solver.step(model(solver.scale_model_input(x), t.expand(len(x)), None, depth=d), x)
    assert relerr(x, want) <= 1e-6
    ref, _ = _by_hand(name, model, noise, 6, schedule=schedule, shift=3.0)
    assert relerr(want, ref) <= TOL32[name]


def test_prediction_mismatch_refused_before_any_call():
    flow, eps = TextToy(prediction="flow"), TextToy(prediction="epsilon")
    y, noise = text_condition(), torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match=r"sampler: 'ddim' expects a model predicting 'epsilon', but "
                                         r"TextToy.prediction is 'flow'; use one of \['flow_dpmsolver\+\+'"):
        sample(flow, noise, y, sampler="ddim", steps=3)
    with pytest.raises(ValueError, match=r"sampler: 'flow_euler' expects a model predicting 'flow', but "
                                         r"TextToy.prediction is 'epsilon'; use one of \['ddim'"):
        sample(eps, noise, y, sampler="flow_euler", steps=3)
    assert flow.calls == [] and eps.calls == []
    # A model that does not declare `prediction` takes either kind.
    sample(ToyModel(num_classes=None), torch.randn(1, 3, 5, 5), sampler="flow_heun", steps=2)


@pytest.mark.parametrize("options,match", [
    (dict(mu=1.0), r"mu: only used with use_dynamic_shifting=True"),
    (dict(image_seq_len=1024), r"image_seq_len: only used with use_dynamic_shifting=True"),
    (dict(use_dynamic_shifting=True), r"mu: use_dynamic_shifting=True expected `mu` or `image_seq_len`"),
    (dict(use_dynamic_shifting=True, mu=1.0, image_seq_len=64), r"mu, image_seq_len: expected one of them"),
    (dict(use_dynamic_shifting=True, image_seq_len=0), r"image_seq_len: expected an integer >= 1"),
    (dict(use_dynamic_shifting=True, mu=float("nan")), r"mu: expected a finite number"),
    (dict(use_dynamic_shifting=1, mu=1.0), r"use_dynamic_shifting: expected a bool"),
    (dict(shift=0.0), r"shift: expected a number > 0, got 0.0"),
    (dict(shift="3"), r"shift: expected a finite number"),
    (dict(sigmas=[1.0, 0.5]), r"sigmas: expected 4 values \(one per step"),
    (dict(sigmas=[1.0, 0.5, 0.5, 0.1]), r"sigmas: expected strictly decreasing"),
    (dict(sigmas=[1.5, 0.5, 0.3, 0.1]), r"sigmas: expected values in \(0, 1\]"),
    (dict(sigmas=[1.0, 0.5, 0.3, 0.0]), r"sigmas: expected values in \(0, 1\]"),
    (dict(sigmas="abc"), r"sigmas: expected a sequence of numbers"),
    (dict(time_shift_type="cubic"), r"time_shift_type: expected one of \('exponential', 'linear'\)"),
    (dict(use_dynamic_shifting=True, time_shift_type="linear", mu=-1.0), r"mu: time_shift_type='linear' expected"),
    (dict(max_image_seq_len=256), r"max_image_seq_len: expected a value different from base_image_seq_len"),
    (dict(eta=0.5), r"flow_euler: unknown solver option\(s\) \['eta'\]"),
    (dict(timestep_spacing="linspace"), r"unknown solver option\(s\) \['timestep_spacing'\]"),
    (dict(num_train_timesteps=1), r"num_train_timesteps: expected an integer >= 2"),
])
def test_bad_options(options, match):
    model = ToyModel(num_classes=None)
    with pytest.raises(ValueError, match=match):
        sample(model, torch.randn(1, 3, 5, 5), sampler="flow_euler", steps=4, **options)
    assert model.calls == []


def test_dpm_solver_order_and_inputs_unmodified():
    with pytest.raises(ValueError, match=r"flow_dpmsolver\+\+: solver_order: expected 1 or 2, got 3"):
        make_solver("flow_dpmsolver++", 4, solver_order=3)
    model, noise = _model(seed=15), _noise(seed=16)
    ref, _ = _by_hand("flow_dpmsolver++", model, noise, 5, solver_order=1)
    sig = [0.9, 0.5, 0.2]
    before = (noise.clone(), list(sig))
    out = sample(model, noise, sampler="flow_dpmsolver++", steps=5, solver_order=1)
    assert relerr(out, ref) <= 1e-6
    sample(model, noise, sampler="flow_dpmsolver++", steps=3, sigmas=sig)
    assert torch.equal(noise, before[0]) and sig == before[1]
