"""Classifier-free guidance: one batched [cond; uncond] call per step, eps-only guidance, shared depth."""
import pytest
import torch

from eekernels.samplers import SOLVERS, make_solver, sample
from tests.samplers._toys import ToyModel, ToySchedule, relerr


class Recorder:
    """Wraps a model; records the (batch, labels, depth) of each call."""

    def __init__(self, model):
        self.model, self.calls = model, []
        for a in ("num_classes", "null_class", "in_channels", "num_blocks"):
            setattr(self, a, getattr(model, a))

    def __call__(self, x, t, y, depth=None):
        self.calls.append((x.shape[0], y.clone(), depth))
        return self.model(x, t, y, depth=depth)


class GuidedByHand:
    """CFG done outside the sampler, as two separate calls: the reference for the batched combine."""

    def __init__(self, model, scale):
        self.model, self.scale = model, scale
        self.in_channels = model.in_channels

    def __call__(self, x, t, y, depth=None):
        cond = self.model(x, t, y, depth=depth)
        uncond = self.model(x, t, torch.full_like(y, self.model.null_class), depth=depth)
        C = x.shape[1]
        eps = uncond[:, :C] + self.scale * (cond[:, :C] - uncond[:, :C])
        return torch.cat([eps, cond[:, C:]], 1)  # DiT: the variance channels of the conditional half


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_batched_cfg_equals_two_calls(name):
    model = ToyModel(learn_sigma=True)
    noise, y = torch.randn(3, 3, 5, 5), torch.tensor([0, 2, 4])
    kw = dict(sampler=name, steps=6, schedule=ToySchedule([4, 3, 3, 2]))
    got = sample(model, noise, y, cfg_scale=4.0, generator=torch.Generator().manual_seed(1), **kw)
    want = sample(GuidedByHand(model, 4.0), noise, y, generator=torch.Generator().manual_seed(1), **kw)
    assert relerr(got, want) < 1e-5
    plain = sample(model, noise, y, generator=torch.Generator().manual_seed(1), **kw)
    assert relerr(got, plain) > 1e-3  # guidance really changes the samples


def test_one_call_per_step_with_both_halves():
    rec = Recorder(ToyModel())
    y = torch.tensor([1, 3])
    sample(rec, torch.randn(2, 3, 5, 5), y, sampler="heun", steps=4, cfg_scale=1.5, schedule=ToySchedule([4, 2]))
    assert len(rec.calls) == make_solver("heun", 4).num_calls
    for batch, labels, depth in rec.calls:
        assert batch == 4 and labels.tolist() == [1, 3, 5, 5]  # [cond; uncond], null class 5
        assert isinstance(depth, int)  # one depth for both halves


def test_no_cfg_means_no_unconditional_half():
    rec = Recorder(ToyModel())
    sample(rec, torch.randn(2, 3, 5, 5), torch.tensor([1, 3]), steps=3)
    assert [(b, lab.tolist()) for b, lab, _ in rec.calls] == [(2, [1, 3])] * 3


def test_cfg_scale_zero_is_unconditional():
    """s = 0 gives eps_u: the same trajectory as sampling with the null label."""
    model = ToyModel()
    noise = torch.randn(2, 3, 5, 5)
    got = sample(model, noise, torch.tensor([1, 3]), steps=5, cfg_scale=0.0)
    want = sample(model, noise, torch.tensor([5, 5]), steps=5)
    assert relerr(got, want) < 1e-5
