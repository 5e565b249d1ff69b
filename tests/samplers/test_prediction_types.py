"""Every native family declares what it predicts, and sample() refuses the other kind of solver by name, before
any model call. A DiT trained with velocity prediction declares ``prediction_type="flow"`` and samples with the
flow solvers (its kwargs survive the shipped file format)."""
import re

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from eekernels.models import DiT, UNet, UViT, configs, load_pretrained
from eekernels.models.pretrained import load_model_file, save_model_file
from eekernels.samplers import EPSILON_SOLVERS, FLOW_SOLVERS, sample
from eekernels.training import model_kwargs
from tests.samplers._toys import relerr

EXPECTED = {"DiT": "epsilon", "UViT": "epsilon", "UNet": "epsilon", "PixArt": "epsilon", "SD3": "flow", "Flux": "flow"}
SMALL_DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10)


def test_every_native_family_declares_its_prediction():
    classes = {cls.__name__: cls for cls, _ in configs().values()}
    assert set(classes) == set(EXPECTED), "a family was added: declare its prediction and list it here"
    for name, cls in classes.items():
        assert cls.__dict__.get("prediction") == EXPECTED[name], name  # on the class itself, not inherited


def _small(family):
    torch.manual_seed(0)
    if family == "DiT":
        return DiT(**SMALL_DIT).eval(), torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    if family == "UViT":
        return UViT(input_size=8, embed_dim=24, depth=4, num_heads=2, num_classes=10).eval(), torch.randn(2, 4, 8, 8), \
            torch.tensor([1, 2])
    return (UNet(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                 norm_num_groups=4, attention_head_dim=None).eval(), torch.randn(2, 3, 8, 8), None)


def _calls(model):
    seen = []
    model.register_forward_pre_hook(lambda *a: seen.append(1))
    return seen


@pytest.mark.parametrize("family", ["DiT", "UViT", "UNet"])
@pytest.mark.parametrize("sampler", FLOW_SOLVERS)
def test_epsilon_families_refuse_flow_solvers(family, sampler):
    model, noise, y = _small(family)
    calls = _calls(model)
    with pytest.raises(ValueError, match=rf"sampler: '{re.escape(sampler)}' expects a model predicting 'flow', but "
                                         rf"{family}.prediction is 'epsilon'; use one of \['ddim'"):
        sample(model, noise, y, sampler=sampler, steps=3)
    assert calls == []
    sample(model, noise, y, sampler="ddim", steps=2)  # the kind it predicts runs
    assert len(calls) == 2


def test_shipped_checkpoint_is_epsilon():
    model = load_pretrained("glyph-dit")
    assert model.prediction == "epsilon"
    with pytest.raises(ValueError, match=r"sampler: 'flow_euler' expects a model predicting 'flow'"):
        sample(model, torch.randn(1, model.in_channels, model.input_size, model.input_size), torch.tensor([0]),
               sampler="flow_euler", steps=2)


@torch.no_grad()
def test_flow_dit_samples_with_flow_solvers_only():
    model = DiT(**SMALL_DIT, learn_sigma=False, prediction_type="flow").eval()
    for p in model.parameters():  # a nonzero velocity (DiT's init zeroes adaLN and the output layer)
        torch.nn.init.normal_(p, std=0.05)
    noise, y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 7])
    out = sample(model, noise, y, sampler="flow_euler", steps=5, shift=3.0, cfg_scale=2.0)
    # By hand: diffusers' FlowMatchEulerDiscreteScheduler with the same CFG over [cond; uncond].
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(5)
    x = noise.clone()
    labels = torch.cat([y, torch.full_like(y, model.null_class)])
    for t in sched.timesteps:
        v = model(torch.cat([x, x]), t.expand(4), labels)
        cond, uncond = v.chunk(2)
        x = sched.step(uncond + 2.0 * (cond - uncond), t, x).prev_sample
    assert relerr(out, x) <= 1e-5 and relerr(out, noise) > 1e-2
    with pytest.raises(ValueError, match=r"sampler: 'ddim' expects a model predicting 'epsilon', but "
                                         r"DiT.prediction is 'flow'; use one of \['flow_dpmsolver\+\+'"):
        sample(model, noise, y, sampler="ddim", steps=3)
    for name in FLOW_SOLVERS:
        assert torch.isfinite(sample(model, noise, y, sampler=name, steps=2)).all()
    assert not set(EPSILON_SOLVERS) & set(FLOW_SOLVERS)


def test_flow_dit_kwargs_round_trip(tmp_path):
    model = DiT(**SMALL_DIT, learn_sigma=False, prediction_type="flow")
    kw = model_kwargs(model)
    assert kw["prediction_type"] == "flow" and DiT(**kw).prediction == "flow"
    assert "prediction_type" not in model_kwargs(DiT(**SMALL_DIT))  # epsilon files are written as before
    save_model_file(model, tmp_path / "flow.pt", "dit", kw)
    back = load_model_file(tmp_path / "flow.pt")
    assert back.prediction == "flow" and back.learn_sigma is False
    np.testing.assert_array_equal(back.blocks[0].attn.qkv.weight.detach().numpy(),
                                  model.blocks[0].attn.qkv.weight.detach().half().float().numpy())


@pytest.mark.parametrize("kw,match", [
    (dict(prediction_type="v_prediction"), r"DiT: `prediction_type` expected one of \('epsilon', 'flow'\), "
                                           r"got 'v_prediction'"),
    (dict(prediction_type="flow"), r"DiT: `prediction_type` 'flow' expected learn_sigma=False"),
])
def test_bad_prediction_type(kw, match):
    with pytest.raises(ValueError, match=match):
        DiT(**SMALL_DIT, **kw)
