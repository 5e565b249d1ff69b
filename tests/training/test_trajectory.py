"""``rollout`` (``sample()`` with gradients) and ``trajectory_loss``: equal to ``sample()`` for every solver, CFG and
plan; gradients equal to a hand-written differentiable DDIM / DPM-Solver++ loop; a few optimizer steps through a
plan move the student toward the teacher; refusals by name, before any model call."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eekernels import ExitSchedule
from eekernels.calibration import _table_schedule
from eekernels.models.dit import DiT
from eekernels.samplers import make_solver, sample
from eekernels.training.trajectory import rollout, trajectory_loss
from tests.samplers._toys import TextToy, ToyModel, text_condition

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10)


def _dit(seed=0, **kw):
    torch.manual_seed(seed)
    model = DiT(**{**SMALL, **kw}).double().eval()
    with torch.no_grad():  # DiT zero-initialises its modulations and head: randomise every weight
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=p.dtype) * 0.3 / max(1, p.shape[-1]) ** 0.5)
    return model


def _plan(depths, sampler, steps, L, modes=None):
    """The t-indexed plan of per-call depths (and per-call unconditional modes, "run" or "drop")."""
    ts = make_solver(sampler, steps).timesteps.tolist()
    uncond = None
    if modes is not None:
        uncond = ["drop" if c == 2 else "run"
                  for c in _table_schedule([2 if m == "drop" else 1 for m in modes], ts, 2, 1000, "u").table]
    return ExitSchedule(_table_schedule(depths, ts, L, 1000, "t").table, L, 1000, uncond=uncond)


EPS_SOLVERS = [("ddim", 6, {}), ("ddim", 5, {"eta": 0.7}), ("ddpm", 5, {}), ("dpmsolver++", 5, {}),
               ("dpmsolver++", 4, {"solver_order": 1}), ("euler", 4, {}), ("heun", 3, {})]


@pytest.mark.parametrize("sampler,steps,opts", EPS_SOLVERS, ids=lambda v: str(v))
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_rollout_equals_sample_for_every_epsilon_solver(sampler, steps, opts, cfg_scale):
    model = _dit(1)
    noise = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 7, 4])
    calls = make_solver(sampler, steps, **opts).num_calls
    sched = _plan([3, 1, 2, 3, 2, 1, 3, 1, 2][:calls], sampler, steps, 3)
    args = dict(sampler=sampler, steps=steps, cfg_scale=cfg_scale, schedule=sched, **opts)
    gen = (lambda: torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = sample(model, noise, y, generator=gen(), **args)
    out = rollout(model, noise, y, generator=gen(), **args)
    assert out.requires_grad and out.dtype == noise.dtype
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampler", ["flow_euler", "flow_heun", "flow_dpmsolver++"])
def test_rollout_equals_sample_for_every_flow_solver(sampler):
    model = _dit(3, learn_sigma=False, prediction_type="flow")
    noise = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 9])
    calls = make_solver(sampler, 4).num_calls
    sched = _plan([2, 3, 1, 3, 2, 1, 3][:calls], sampler, 4, 3)
    with torch.no_grad():
        ref = sample(model, noise, y, sampler=sampler, steps=4, cfg_scale=1.8, schedule=sched, shift=3.0)
    out = rollout(model, noise, y, sampler=sampler, steps=4, cfg_scale=1.8, schedule=sched, shift=3.0)
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=1e-12)


def test_rollout_equals_sample_on_a_text_model_with_a_negative_prompt():
    model = TextToy(null=False).double()
    y = text_condition(batch=2, dtype=torch.float64, seed=1)
    neg = text_condition(batch=2, dtype=torch.float64, seed=2)
    noise = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sched = _plan([4, 2, 1, 3, 4], "ddim", 5, 4)
    args = dict(sampler="ddim", steps=5, cfg_scale=3.0, schedule=sched, negative=neg)
    with torch.no_grad():
        ref = sample(model, noise, y, **args)
    torch.testing.assert_close(rollout(model, noise, y, **args).detach(), ref, rtol=0, atol=1e-12)


def _hand_rollout(model, noise, y, sampler, steps, depths, s, modes=None):
    """DDIM (eta 0, leading spacing) or DPM-Solver++(2M) written out with ordinary tensor ops, CFG on every eps
    channel (none with ``s`` None), each call at ``depths[k]``, the conditional half alone where ``modes[k]`` is
    "drop": the reference whose autograd gradient ``rollout``'s must equal."""
    solver = make_solver(sampler, steps)
    ac_np = solver.alphas_cumprod
    ac = torch.as_tensor(ac_np, dtype=torch.float64)
    ts = solver.timesteps.double()
    B, C = noise.shape[:2]
    labels = torch.cat([y, torch.full_like(y, model.null_class)])
    x, prev_x0 = noise, None
    T = 1000
    for k, t in enumerate(ts.tolist()):
        if s is None or (modes is not None and modes[k] == "drop"):
            eps = model(x, torch.full((B,), t, dtype=torch.float64), y, depth=depths[k])[:, :C]
        else:
            out = model(torch.cat([x, x]), torch.full((2 * B,), t, dtype=torch.float64), labels, depth=depths[k])
            e_c, e_u = out[:B, :C], out[B:, :C]
            eps = e_u + s * (e_c - e_u)
        if sampler == "ddim":
            ab = ac[int(t)]
            prev = int(t) - T // steps
            ab_prev = ac[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
            continue
        # DPM-Solver++(2M) in the data prediction; sigma = sqrt((1 - ab) / ab) at t, held in float32 as diffusers
        def lam_sig(tt):
            sig = ((1 - ac_np) / ac_np) ** 0.5
            return torch.tensor(float(np.float32(np.interp(tt, np.arange(len(sig)), sig))), dtype=torch.float64)
        sig_now = lam_sig(t)
        sig_next = lam_sig(ts[k + 1].item()) if k + 1 < len(ts) else torch.tensor(0.0, dtype=torch.float64)
        a_now, s_now = 1 / (sig_now ** 2 + 1).sqrt(), sig_now / (sig_now ** 2 + 1).sqrt()
        a_next, s_next = 1 / (sig_next ** 2 + 1).sqrt(), sig_next / (sig_next ** 2 + 1).sqrt()
        x0 = (x - s_now * eps) / a_now
        if k + 1 == len(ts):  # final sigma 0: the data prediction itself
            x = x0
            continue
        h = torch.log(a_next / s_next) - torch.log(a_now / s_now)
        if k == 0:
            d = x0
        else:
            sig_prev = lam_sig(ts[k - 1].item())
            a_prev, s_prev = 1 / (sig_prev ** 2 + 1).sqrt(), sig_prev / (sig_prev ** 2 + 1).sqrt()
            r = (torch.log(a_now / s_now) - torch.log(a_prev / s_prev)) / h
            d = (1 + 0.5 / r) * x0 - 0.5 / r * prev_x0
        x = s_next / s_now * x - a_next * torch.expm1(-h) * d
        prev_x0 = x0
    return x


@pytest.mark.parametrize("cfg_scale,modes", [(1.7, None), (1.0, None), (1.7, ["run", "drop", "run", "drop", "drop"])],
                         ids=["cfg", "no-cfg", "uncond-drop"])
@pytest.mark.parametrize("sampler,steps", [("ddim", 5), ("dpmsolver++", 5)])
def test_rollout_gradients_equal_a_hand_written_differentiable_loop(sampler, steps, cfg_scale, modes):
    """With CFG, without it (the model's input is then the state the solver updates in place), and with CFG's
    unconditional half dropped at some calls (the student trained to give the guided output there)."""
    model = _dit(7)
    noise = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    y = torch.tensor([3, 5])
    depths = [1, 2, 3, 1, 3]
    sched = _plan(depths, sampler, steps, 3, modes)
    target = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    params = [p for p in model.parameters()]

    ref = _hand_rollout(model, noise, y, sampler, steps, depths, None if cfg_scale == 1 else cfg_scale, modes)
    g_ref = torch.autograd.grad((ref - target).pow(2).mean(), params, allow_unused=True)
    loss = trajectory_loss(model, target, noise, y, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                           schedule=sched)
    g = torch.autograd.grad(loss, params, allow_unused=True)
    torch.testing.assert_close(loss.detach(), (ref - target).pow(2).mean().detach(), rtol=1e-9, atol=0)
    n_checked = 0
    for a, b in zip(g, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            # DDIM agrees to the last digit; DPM-Solver++'s coefficients are rounded in another order (about 1e-10)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7 * float(b.abs().max()))
            n_checked += int(b.abs().max() > 0)
    assert n_checked > 10  # the blocks the plan runs, the embedders and the head all get gradient


def test_rollout_gradient_with_respect_to_the_noise_matches_finite_differences():
    model = ToyModel(channels=2, num_blocks=3, num_classes=4, input_size=3).double()
    noise = torch.randn(1, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([2])
    sched = ExitSchedule.piecewise([3, 2, 1, 2, 3], total_depth=3)
    f = lambda n: rollout(model, n, y, sampler="dpmsolver++", steps=4, cfg_scale=2.0, schedule=sched)  # noqa: E731
    assert torch.autograd.gradcheck(f, (noise.clone().requires_grad_(),), eps=1e-6, atol=1e-6)


def test_a_few_steps_through_the_plan_bring_the_student_toward_the_teacher():
    teacher = ToyModel(channels=3, num_blocks=4, num_classes=5, seed=3)
    student = ToyModel(channels=3, num_blocks=4, num_classes=5, seed=3)
    noise = torch.randn(32, 3, 5, 5, generator=torch.Generator().manual_seed(12))
    y = torch.arange(32) % 5
    args = dict(sampler="dpmsolver++", steps=4, cfg_scale=1.5)
    with torch.no_grad():
        target = sample(teacher, noise, y, **args)
    sched = _plan([4, 1, 1, 2], "dpmsolver++", 4, 4)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = trajectory_loss(student, target, noise, y, schedule=sched, **args)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1e-3 and losses[-1] < 0.3 * losses[0], losses
    with torch.no_grad():  # what sample() gives under the plan moved toward the teacher too
        after = sample(student, noise, y, schedule=sched, **args)
    assert (after - target).pow(2).mean().item() < 0.3 * losses[0]


def test_rollout_leaves_its_inputs_alone():
    model = _dit(2)
    noise = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 2])
    before = (noise.clone(), y.clone(), {k: v.clone() for k, v in model.state_dict().items()})
    rollout(model, noise, y, sampler="ddim", steps=3, cfg_scale=2.0).sum().backward()
    assert torch.equal(noise, before[0]) and torch.equal(y, before[1])
    assert all(torch.equal(v, before[2][k]) for k, v in model.state_dict().items())


def _counting(model):
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def test_rollout_refuses_reuse_policies_and_uncond_plans_by_name_before_any_call():
    model = _dit(4)
    calls = _counting(model)
    noise = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    y = torch.tensor([1])
    with pytest.raises(ValueError, match=r"schedule: rollout runs the 'drop' stand-in only.*'cache'"):
        rollout(model, noise, y, sampler="ddim", steps=4,
                schedule=ExitSchedule([3, 1], 3, 1000, policies=["cache", "cache"]))
    ts = make_solver("ddim", 4).timesteps.tolist()
    table = _table_schedule([3, 3, 3, 3], ts, 3, 1000, "t").table
    modes = _table_schedule([1, 1, 2, 1], ts, 2, 1000, "u").table
    half = ExitSchedule(table, 3, 1000, uncond=["forecast" if m == 2 else "run" for m in modes])
    with pytest.raises(ValueError, match=r"schedule: rollout runs or drops CFG's unconditional half.*forecasts it"):
        rollout(model, noise, y, sampler="ddim", steps=4, cfg_scale=2.0, schedule=half)
    with pytest.raises(ValueError, match=r"sampler: expected one of"):
        rollout(model, noise, y, sampler="nope", steps=4)
    with pytest.raises(ValueError, match=r"cfg_scale"):
        rollout(model, noise, y, sampler="ddim", steps=4, cfg_scale=math.nan)
    with pytest.raises(ValueError, match=r"target: expected the teacher's samples.*\(1, 4, 8, 8\).*\(2, 4, 8, 8\)"):
        trajectory_loss(model, torch.zeros(2, 4, 8, 8), noise, y, sampler="ddim", steps=4)
    assert calls == []
