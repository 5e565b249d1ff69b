"""A plan that drops classifier-free guidance's unconditional branch (``ExitSchedule(uncond=[..., "drop", ...])``):
at those calls only the conditional half runs, at the call's planned depth, and its output is taken as the guided
one (the stand-in of a model fine-tuned for it, guidance distillation). Checked against a hand-written run on a
toy, on class labels and on text, mixed with depth exits and with unconditional forecasts; its counted FLOPs, its
file and a model's recorded plan, and every refusal."""
import pytest
import torch

from eekernels import ExitSchedule
from eekernels.calibration import _table_schedule
from eekernels.samplers import make_solver, sample
from tests.samplers._toys import TextToy, ToyModel, text_condition
from tests.samplers.test_uncond_forecast import _extrapolate

MODES = ("run", "forecast", "drop")


def _plan_schedule(depths, modes, sampler, steps, L, order=1):
    """The t-indexed schedule of per-call depths and per-call unconditional modes."""
    ts = make_solver(sampler, steps).timesteps.tolist()
    table = _table_schedule(depths, ts, L, 1000, "t").table
    codes = _table_schedule([MODES.index(m) + 1 for m in modes], ts, 3, 1000, "u").table
    return ExitSchedule(table, L, 1000, uncond=[MODES[c - 1] for c in codes], forecast_order=order, steps=steps,
                        sampler=sampler)


class _ByHand:
    """Runs every call of a plain CFG run (no schedule) and does by hand what the plan does per call: the planned
    depth; at a "drop" call the conditional half alone, its output returned for both halves (so that the guidance
    rule gives it back unchanged); at a "forecast" call the conditional half at full depth with the unconditional
    output extrapolated (order 1) from the calls that ran both halves."""

    def __init__(self, model, depths, modes, channels, L):
        self.model, self.depths, self.modes, self.C, self.L = model, depths, modes, channels, L
        self.k, self.kept = 0, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, t, y, **kw):
        k, B, C = self.k, x.shape[0] // 2, self.C
        self.k += 1
        depth = None if self.depths[k] == self.L else self.depths[k]
        mode = self.modes[k]
        if mode == "run":
            out = self.model(x, t, y, depth=depth)
            self.kept = (self.kept + [(float(t[0]), out[:B, :C] - out[B:, :C])])[-2:]
            return out
        yc = y[:B] if isinstance(y, torch.Tensor) else y.index(slice(0, B))
        if mode == "drop":
            oc = self.model(x[:B], t[:B], yc, depth=depth)
            return torch.cat([oc, oc])
        oc = self.model(x[:B], t[:B], yc)
        eps_u = oc[:, :C] - _extrapolate(self.kept, float(t[0]))
        return torch.cat([oc, torch.cat([eps_u, oc[:, C:]], 1)])


@pytest.mark.parametrize("learn_sigma", (False, True))
@pytest.mark.parametrize("sampler,steps,depths,modes", [
    ("dpmsolver++", 4, [3, 3, 2, 1], ["run", "drop", "drop", "drop"]),
    ("ddim", 6, [3, 2, 3, 2, 2, 3], ["drop", "run", "run", "forecast", "drop", "forecast"]),
    ("euler", 5, [2, 3, 3, 3, 1], ["drop", "drop", "run", "run", "drop"]),
])
def test_uncond_drop_equals_a_hand_written_run(sampler, steps, depths, modes, learn_sigma):
    L = 3
    model = ToyModel(num_blocks=L, learn_sigma=learn_sigma, seed=6).double()
    noise = torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.tensor([0, 2, 4])
    depths = [L if m == "forecast" else d for d, m in zip(depths, modes)]
    sched = _plan_schedule(depths, modes, sampler, steps, L)
    got = sample(model, noise, y, schedule=sched, cfg_scale=2.5)
    ref = sample(_ByHand(model, depths, modes, 3, L), noise, y, sampler=sampler, steps=steps, cfg_scale=2.5)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    plain = sample(model, noise, y, sampler=sampler, steps=steps, cfg_scale=2.5,
                   schedule=_plan_schedule(depths, ["run"] * steps, sampler, steps, L))
    assert (got - plain).abs().max() > 1e-6  # the dropped calls did change the run


def test_dropping_the_unconditional_branch_at_every_call_is_sampling_without_guidance():
    model = ToyModel(num_blocks=4, seed=1)
    noise = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 3])
    sched = _plan_schedule([4] * 5, ["drop"] * 5, "dpmsolver++", 5, 4)
    got = sample(model, noise, y, schedule=sched, cfg_scale=3.0)
    assert torch.equal(got, sample(model, noise, y, sampler="dpmsolver++", steps=5, cfg_scale=1.0))
    text = TextToy(num_blocks=3, seed=2)
    cond = text_condition(batch=2)
    tsched = _plan_schedule([3] * 4, ["drop"] * 4, "ddim", 4, 3)
    got = sample(text, noise, cond, schedule=tsched, cfg_scale=4.0)
    assert torch.equal(got, sample(text, noise, cond, sampler="ddim", steps=4, cfg_scale=1.0))


def test_drop_calls_run_the_conditional_half_alone_at_their_depth():
    model = ToyModel(num_blocks=4, seed=2)
    depths, modes = [4, 2, 3, 1, 4], ["run", "drop", "run", "drop", "drop"]
    sched = _plan_schedule(depths, modes, "ddim", 5, 4)
    noise = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    sample(model, noise, torch.tensor([1, 3]), schedule=sched, cfg_scale=1.5)
    assert [c[1].shape[0] for c in model.calls] == [2 if m == "drop" else 4 for m in modes]
    assert [c[0] for c in model.calls] == depths


def test_text_models_drop_the_negative_prompt_half_too():
    model = TextToy(num_blocks=3, seed=5).double()
    y = text_condition(batch=2, dtype=torch.float64)
    neg = text_condition(batch=2, seed=9, dtype=torch.float64)
    noise = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    depths, modes = [3, 2, 3, 3, 1], ["run", "drop", "run", "forecast", "drop"]
    sched = _plan_schedule(depths, modes, "dpmsolver++", 5, 3)
    got = sample(model, noise, y, schedule=sched, cfg_scale=3.0, negative=neg)
    ref = sample(_ByHand(model, depths, modes, 3, 3), noise, y, sampler="dpmsolver++", steps=5, cfg_scale=3.0,
                 negative=neg)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert [c[2].shape[0] for c in model.calls[-5:]] == [4, 2, 4, 2, 2]  # the captions of the halves that ran


def test_dropped_calls_count_half_and_the_plan_round_trips_and_a_model_records_it(tmp_path):
    sched = _plan_schedule([8, 4, 8, 8], ["run", "drop", "drop", "run"], "dpmsolver++", 4, 8)
    ts = make_solver("dpmsolver++", 4).timesteps
    assert sched.uncond_modes(ts) == ["run", "drop", "drop", "run"]
    assert sched.uncond_plan(ts) is None  # nothing forecast
    assert sched.block_flop_fraction(ts) == pytest.approx((8 + 2 + 4 + 8) / 32)
    back = ExitSchedule.load(sched.save(tmp_path / "plan.json"))
    assert back.uncond == sched.uncond and back.uncond_modes(ts) == sched.uncond_modes(ts)
    assert ExitSchedule([8, 8], 8, uncond=["run", "run"]).uncond_modes(ts) is None

    # a fine-tuned model's recorded plan (``pretrained_meta``), what --schedule auto reads
    model = ToyModel(num_blocks=8)
    model.pretrained_meta = {"schedule": {"preset": "mine", "total_depth": 8, "table": list(sched.table),
                                          "uncond": list(sched.uncond)}}
    auto = ExitSchedule.from_spec("auto", model)
    assert auto.uncond == sched.uncond and auto.table == sched.table and auto.name == "mine"


def test_refusals_before_any_model_call():
    import eekernels
    from eekernels.models import DiT

    model = ToyModel(num_blocks=3)
    noise = torch.randn(2, 3, 5, 5)
    y = torch.tensor([0, 1])
    drop = _plan_schedule([3, 2, 2, 3], ["run", "drop", "drop", "run"], "ddim", 4, 3)
    with pytest.raises(ValueError, match="cfg_scale: .* drops classifier-free guidance's .* expected cfg_scale != 1"):
        sample(model, noise, y, schedule=drop, cfg_scale=1.0)
    early = _plan_schedule([3] * 4, ["drop", "forecast", "run", "run"], "ddim", 4, 3)
    with pytest.raises(ValueError, match="schedule: .* forecasts the unconditional branch at model call 1 .* before "
                                         "any call runs both CFG halves"):
        sample(model, noise, y, schedule=early, cfg_scale=2.0)
    with pytest.raises(ValueError, match="exit_policy: .* drops the unconditional branch at model call 1 at depth 2 "
                                         ".* expected exit_policy 'drop'"):
        sample(model, noise, y, schedule=drop, cfg_scale=2.0, exit_policy="cache")
    assert model.calls == []
    with pytest.raises(ValueError, match="`uncond` 'drop' below full depth expected with the 'drop' exit policy"):
        ExitSchedule([3, 2], 3, uncond=["run", "drop"], policies=["drop", "cache"])
    ExitSchedule([3, 3], 3, uncond=["run", "drop"], policies=["drop", "cache"])  # at full depth: no cache needed
    with pytest.raises(ValueError, match="`uncond` expected names in"):
        ExitSchedule([3, 3], 3, uncond=["run", "skip"])
    with pytest.raises(ValueError, match="accelerate: `schedule` .* drops CFG's unconditional branch"):
        drop.check_one_policy("drop", "accelerate")
    dit = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2, num_classes=5)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    with pytest.raises(ValueError, match="accelerate: `schedule` .* drops CFG's unconditional branch"):
        eekernels.accelerate(dit, schedule=_plan_schedule([4] * 4, ["run", "drop", "drop", "drop"], "ddim", 4, 4))
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())
