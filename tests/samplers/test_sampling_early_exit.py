"""Early exit in sample(): every model call gets exactly schedule.depth(t), planned ahead; exit_policy="cache"."""
import pytest
import torch

from eekernels import ExitSchedule
from eekernels.samplers import SOLVERS, Session, make_solver, sample
from tests.samplers._toys import ToyModel, ToySchedule, relerr

SCHEDULE = [4, 4, 3, 3, 3, 2, 2, 2, 1, 1]


def _check_calls(model, schedule, solver, batch):
    assert len(model.calls) == solver.num_calls
    for k, (depth, t) in enumerate(model.calls):
        assert t.shape == (batch,) and torch.all(t == t[0]), f"call {k}: one timestep per call, got {t}"
        assert t[0].item() == pytest.approx(solver.timesteps[k].item())
        want = int(schedule.depth(t[:1])[0])
        assert isinstance(depth, int) and depth == want, f"call {k} at t={t[0].item():g}: depth {depth}, want {want}"


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_model_sees_schedule_depth_at_every_call(name, cfg_scale):
    model, schedule = ToyModel(learn_sigma=True), ToySchedule(SCHEDULE)
    steps = 9
    sample(model, torch.randn(2, 3, 5, 5), torch.tensor([1, 4]), sampler=name, steps=steps, cfg_scale=cfg_scale,
           schedule=schedule, generator=torch.Generator().manual_seed(0))
    solver = make_solver(name, steps)
    _check_calls(model, schedule, solver, 4 if cfg_scale != 1 else 2)
    assert len({d for d, _ in model.calls}) > 1  # the schedule really varies over this trajectory


@pytest.mark.parametrize("name", ["ddim", "euler", "heun"])
def test_real_exit_schedule(name):
    """eekernels.ExitSchedule (fractional t from Euler/Heun falls in its bin)."""
    model = ToyModel(num_blocks=6)
    schedule = ExitSchedule.piecewise([6, 6, 5, 5, 4, 4, 3, 3, 2, 2])
    sample(model, torch.randn(1, 3, 5, 5), torch.tensor([2]), sampler=name, steps=12, schedule=schedule)
    _check_calls(model, schedule, make_solver(name, 12), 1)


def test_early_exit_changes_samples_and_full_schedule_does_not():
    model = ToyModel()
    noise, y = torch.randn(2, 3, 5, 5), torch.tensor([0, 1])
    full = sample(model, noise, y, steps=6)
    same = sample(model, noise, y, steps=6, schedule=ToySchedule([4]))
    early = sample(model, noise, y, steps=6, schedule=ToySchedule(SCHEDULE))
    assert relerr(same, full) < 1e-6
    assert relerr(early, full) > 1e-2


# ---- exit_policy="cache" ----------------------------------------------------------------------------------------

def test_cached_step_equals_full_step_when_nothing_changed():
    """A truncated step that adds the residual recorded at a full step, from the same state, equals that step."""
    model = ToyModel(num_blocks=5)
    noise, y = torch.randn(2, 3, 5, 5), torch.tensor([3, 0])
    for name in sorted(SOLVERS):
        solver = make_solver(name, 6)
        s = Session(model, solver, noise, y, cfg=True, exit_depths=(2, 4))
        s.reset(noise, y, 2.0)
        s.step(5)  # full depth: records h_5 - h_2 and h_5 - h_4
        full = s.state.x.clone()
        for d in (2, 4):
            s.reset(noise, y, 2.0)  # the same state and call index: nothing changed
            s.step(d)
            assert relerr(s.state.x, full) < 1e-6, f"{name}: cached step at depth {d} != full step"
        s.reset(noise, y, 2.0)
        s.exit_cache = None
        s.step(2)  # dropping the blocks instead of adding the cached residual does differ
        assert relerr(s.state.x, full) > 1e-3


def test_cache_policy_equals_full_depth_when_skipped_part_is_constant():
    """If the skipped blocks add the same value at every step, exit_policy="cache" reproduces full depth."""
    model = ToyModel(num_blocks=4, deep_ignores_input=True)
    noise, y = torch.randn(2, 3, 5, 5), torch.tensor([3, 0])
    schedule = ExitSchedule.periodic(3, 1, 4)
    for name in ("ddim", "dpmsolver++", "heun"):
        full = sample(model, noise, y, sampler=name, steps=7, cfg_scale=1.5)
        model.calls.clear()
        cached = sample(model, noise, y, sampler=name, steps=7, cfg_scale=1.5, schedule=schedule,
                        exit_policy="cache")
        dropped = sample(model, noise, y, sampler=name, steps=7, cfg_scale=1.5, schedule=schedule)
        assert relerr(cached, full) < 1e-5, name
        assert relerr(dropped, full) > 1e-3, name
        assert model.calls[0][0] == 4 and model.calls[1][0] == 1  # periodic: full at calls 0, 3, 6, ...


def test_cache_policy_needs_full_depth_first():
    model = ToyModel()
    with pytest.raises(ValueError, match="full-depth call"):
        sample(model, torch.randn(1, 3, 5, 5), torch.tensor([0]), steps=4, schedule=ToySchedule(SCHEDULE),
               exit_policy="cache")
    with pytest.raises(ValueError, match="exit schedule"):
        sample(model, torch.randn(1, 3, 5, 5), torch.tensor([0]), steps=4, exit_policy="cache")
    assert model.calls == []


def test_real_tiny_dit_cached_step():
    """The eekernels DiT through the sampler's step: a cached truncated step from the same state equals the
    full step; sample() with the cache policy uses the recorded residual (differs from dropping blocks)."""
    from eekernels.models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=4, num_heads=2, num_classes=5)
    with torch.no_grad():
        for p in model.parameters():  # DiT zero-initializes adaLN and the output layer: randomize everything
            p.copy_(torch.randn_like(p) * 0.1)
    model.eval()
    noise, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 4])
    s = Session(model, make_solver("dpmsolver++", 5), noise, y, cfg=True, exit_depths=(1, 3))
    s.reset(noise, y, 2.0)
    s.step(4)
    full = s.state.x.clone()
    for d in (1, 3):
        s.reset(noise, y, 2.0)
        s.step(d)
        assert relerr(s.state.x, full) < 1e-5
    periodic = ExitSchedule.periodic(2, 2, 4)
    cached = sample(model, noise, y, sampler="ddim", steps=6, cfg_scale=2.0, schedule=periodic, exit_policy="cache")
    dropped = sample(model, noise, y, sampler="ddim", steps=6, cfg_scale=2.0, schedule=periodic)
    assert torch.isfinite(cached).all() and relerr(cached, dropped) > 1e-4
