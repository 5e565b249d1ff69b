"""Every epsilon solver, driven by ``sample()``, against diffusers' scheduler driven by hand over the same toy model
(the flow solvers: test_flow_solvers.py).

Same options, same model, same depths, same CFG; the stochastic solvers (DDPM, DDIM with eta > 0) draw their
per-step noise in the same order and shape from equally seeded generators as diffusers' ``randn_tensor``, so
their trajectories are comparable exactly. Final-sample relative error <= 1e-4 in float32.
"""
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from eekernels.samplers import EPSILON_SOLVERS, sample
from eekernels.samplers.solvers import DDIM, DDPM, DPMSolverPP, Euler, Heun
from tests.samplers._toys import ToyModel, ToySchedule, relerr

TOL = 1e-4
SCHEDULE = [4, 4, 3, 3, 3, 2, 2, 2, 1, 1]  # deeper near data (t = 0), as ASE
NOISY = {"ddpm", "ddim"}  # options that take a generator in diffusers' step()


def _diffusers(name, options):
    o = dict(options)
    eta = o.pop("eta", 0.0)
    o.setdefault("beta_start", 1e-4)
    o.setdefault("beta_end", 0.02)
    if name == "ddim":
        o.setdefault("clip_sample", False)  # diffusers' default is True; ours is DiT's False
        return DDIMScheduler(**o), dict(eta=eta)
    if name == "ddpm":
        o.setdefault("clip_sample", False)
        o.setdefault("variance_type", "learned_range")  # ours picks it automatically for 2C-channel outputs
        return DDPMScheduler(**o), {}
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **o), {}
    if name == "euler":
        return EulerDiscreteScheduler(**o), {}
    return HeunDiscreteScheduler(**o), {}


def _by_hand(name, model, noise, y, steps, cfg_scale=1.0, schedule=None, seed=0, **options):
    """diffusers' scheduler in a plain loop: the reference trajectory."""
    sched, step_kw = _diffusers(name, options)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = noise * sched.init_noise_sigma
    B, C = noise.shape[:2]
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        tt = t.to(torch.float32).expand(B)
        kw = {} if schedule is None else {"depth": int(schedule.depth(tt[:1])[0])}
        if cfg_scale != 1:
            out = model(torch.cat([x_in, x_in]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, model.null_class)]),
                        **kw)
            eps_c, eps_u = out[:B, :C], out[B:, :C]
            out = torch.cat([eps_u + cfg_scale * (eps_c - eps_u), out[:B, C:]], 1)
        else:
            out = model(x_in, tt, y, **kw)
        if not (name == "ddpm" and sched.config.variance_type == "learned_range"):
            out = out[:, :C]  # eps only: the variance channels are for learned_range
        if name in NOISY:
            step_kw["generator"] = gen
        x = sched.step(out, t, x, **step_kw).prev_sample
    return x


def _compare(name, steps=8, cfg_scale=1.0, schedule=None, learn_sigma=False, seed=1, **options):
    model = ToyModel(learn_sigma=learn_sigma, seed=seed)
    noise = torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    y = torch.tensor([0, 3, 4])
    ref = _by_hand(name, model, noise, y, steps, cfg_scale, schedule, **options)
    model.calls.clear()
    out = sample(model, noise, y, sampler=name, steps=steps, cfg_scale=cfg_scale, schedule=schedule,
                 generator=torch.Generator().manual_seed(0), **options)
    assert out.shape == noise.shape and out.dtype == noise.dtype
    assert torch.isfinite(ref).all()
    err = relerr(out, ref)
    assert err <= TOL, f"{name} {options}: relative error {err:.3g} vs diffusers > {TOL}"
    return model


@pytest.mark.parametrize("name", sorted(EPSILON_SOLVERS))
@pytest.mark.parametrize("mode", ["full", "exit", "cfg", "exit+cfg"])
def test_matches_diffusers(name, mode):
    schedule = ToySchedule(SCHEDULE) if "exit" in mode else None
    cfg = 2.5 if "cfg" in mode else 1.0
    _compare(name, schedule=schedule, cfg_scale=cfg, learn_sigma=(name == "ddpm"))


@pytest.mark.parametrize("name,options", [
    ("ddim", dict(eta=0.7)),
    ("ddim", dict(eta=1.0, timestep_spacing="trailing", set_alpha_to_one=False)),
    ("ddim", dict(clip_sample=True, clip_sample_range=1.5, beta_schedule="scaled_linear", beta_start=8.5e-4,
                  beta_end=0.012)),
    ("ddim", dict(timestep_spacing="linspace", steps_offset=0, beta_schedule="squaredcos_cap_v2")),
    ("ddim", dict(timestep_spacing="leading", steps_offset=1)),
    ("ddpm", dict(timestep_spacing="linspace", variance_type="learned_range")),
    ("ddpm", dict(variance_type="fixed_small", beta_schedule="squaredcos_cap_v2")),
    ("ddpm", dict(variance_type="fixed_large", clip_sample=True, timestep_spacing="trailing")),
    ("dpmsolver++", dict(solver_order=1)),
    ("dpmsolver++", dict(timestep_spacing="leading", beta_schedule="scaled_linear")),
    ("dpmsolver++", dict(timestep_spacing="trailing", num_train_timesteps=500)),
    ("euler", dict(timestep_spacing="leading", steps_offset=1)),
    ("euler", dict(timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2")),
    ("heun", dict(timestep_spacing="leading")),
    ("heun", dict(timestep_spacing="trailing", beta_schedule="scaled_linear")),
])
def test_options_match_diffusers(name, options):
    learn_sigma = options.get("variance_type") in (None, "learned_range") and name == "ddpm"
    _compare(name, steps=7, learn_sigma=learn_sigma, **options)


@pytest.mark.parametrize("name", sorted(EPSILON_SOLVERS))
def test_single_step_and_long_run(name):
    _compare(name, steps=1)
    _compare(name, steps=30, cfg_scale=1.5, schedule=ToySchedule(SCHEDULE), learn_sigma=(name == "ddpm"))


@pytest.mark.parametrize("cls", [DDPM, DDIM, DPMSolverPP, Euler, Heun])
def test_step_by_step_class_equals_sample(cls):
    """The solver classes drive a loop by hand and give sample()'s trajectory."""
    model = ToyModel(learn_sigma=True)
    noise = torch.randn(2, 3, 5, 5)
    y = torch.tensor([1, 2])
    opts = dict(eta=0.5) if cls is DDIM else {}
    want = sample(model, noise, y, sampler=cls.name, steps=6, generator=torch.Generator().manual_seed(3), **opts)
    solver = cls(steps=6, **opts)
    gen = torch.Generator().manual_seed(3)
    x = noise * solver.init_noise_sigma
    for t in solver.timesteps:
        x = solver.step(model(solver.scale_model_input(x), t.expand(2), y), x, generator=gen)
    assert relerr(x, want) <= 1e-6
    with pytest.raises(ValueError, match="calls are done"):
        solver.step(model(x, solver.timesteps[-1].expand(2), y), x)
    solver.reset()
    assert solver.step_index == 0


def test_determinism_and_inputs_untouched():
    model = ToyModel(learn_sigma=True)
    noise = torch.randn(2, 3, 5, 5)
    y = torch.tensor([1, 2])
    keep_noise, keep_y = noise.clone(), y.clone()
    a = sample(model, noise, y, sampler="ddpm", steps=5, generator=torch.Generator().manual_seed(7))
    b = sample(model, noise, y, sampler="ddpm", steps=5, generator=torch.Generator().manual_seed(7))
    c = sample(model, noise, y, sampler="ddpm", steps=5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert relerr(a, c) > 1e-3  # the generator matters: ancestral noise is really drawn
    assert torch.equal(noise, keep_noise) and torch.equal(y, keep_y)


def test_low_precision_model_input():
    """bf16 noise: the model gets bf16 inputs; the solver state stays float32; the result is bf16."""
    model = ToyModel()
    noise = torch.randn(2, 3, 5, 5)
    y = torch.tensor([0, 1])
    seen = []

    def spy(x, t, y, depth=None):
        seen.append(x.dtype)
        return model(x.float(), t, y).to(x.dtype)

    out = sample(spy, noise.bfloat16(), y, sampler="ddim", steps=5)
    ref = sample(model, noise, y, sampler="ddim", steps=5)
    assert out.dtype == torch.bfloat16 and set(seen) == {torch.bfloat16}
    assert relerr(out, ref) < 3e-2


def test_progress_prints_images_per_second(capsys):
    model = ToyModel()
    sample(model, torch.randn(2, 3, 5, 5), torch.tensor([0, 1]), steps=3, progress=True)
    assert "images/s" in capsys.readouterr().err


def test_no_printing_even_for_long_runs(capsys, caplog, monkeypatch):
    """A 30 s run (fake clock) prints nothing; its throughput goes to the 'eekernels' logger at INFO."""
    import types

    import eekernels.samplers.sampling as sampling

    clock = iter([0.0] + [30.0] * 10)
    monkeypatch.setattr(sampling, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    with caplog.at_level("INFO", logger="eekernels"):
        sample(ToyModel(), torch.randn(2, 3, 5, 5), torch.tensor([0, 1]), steps=3)
    assert capsys.readouterr() == ("", "")
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "2 images in 30.00 s (0.07 images/s, ddim, 3 model calls)" in caplog.records[0].getMessage()


def test_short_runs_log_at_debug_only(caplog):
    with caplog.at_level("INFO", logger="eekernels"):
        sample(ToyModel(), torch.randn(2, 3, 5, 5), torch.tensor([0, 1]), steps=3)
    assert caplog.records == []
    with caplog.at_level("DEBUG", logger="eekernels"):
        sample(ToyModel(), torch.randn(2, 3, 5, 5), torch.tensor([0, 1]), steps=3)
    assert [r.levelname for r in caplog.records] == ["DEBUG"] and "images/s" in caplog.records[0].getMessage()
