"""A FLUX sample follows FLUX's own schedule: black-forest-labs' ``get_schedule`` + ``denoise`` and diffusers'
``FluxPipeline`` (sigmas = linspace(1, 1/N, N) through ``FlowMatchEulerDiscreteScheduler``).

The reference below is written here from black-forest-labs/flux ``src/flux/sampling.py``: the N + 1 times
``linspace(1, 0, N + 1)`` (float32), shifted when ``shift=True`` by ``e^mu / (e^mu + (1/t - 1))`` with mu on the
line through (256, base_shift) and (4096, max_shift); then Euler, ``img = img + (t_prev - t_curr) * pred``, the
model seeing t in [0, 1] (x 1000 inside BFL's model; eekernels' FLUX takes t = sigma * 1000 directly).
"""
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift

from eekernels.models import Flux
from eekernels.samplers import make_solver, model_solver_options, sample
from tests.samplers._toys import ToyModel, relerr, text_condition
from tests.utils import tiny_text_model

# FLUX.1's scheduler_config.json (dev; schnell: use_dynamic_shifting False, shift 1.0)
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def bfl_get_schedule(num_steps, image_seq_len, base_shift=0.5, max_shift=1.15, shift=True) -> list[float]:
    t = torch.linspace(1, 0, num_steps + 1)
    if shift:
        slope = (max_shift - base_shift) / (4096 - 256)
        mu = base_shift + slope * (image_seq_len - 256)
        t = math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return t.tolist()


def bfl_denoise(model, img, cond, timesteps):
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
        t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype)
        pred = model(img, t_vec * 1000, cond)
        img = img + (t_prev - t_curr) * pred
    return img


def flux_pipeline_loop(model, x, cond, steps, image_seq_len, config):
    """FluxPipeline's denoising loop: its sigmas and mu through FlowMatchEulerDiscreteScheduler."""
    sched = FlowMatchEulerDiscreteScheduler(**config)
    mu = diffusers_calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(x.shape[0]).to(x.dtype), cond), t, x).prev_sample
    return x


def _flux(variant: str, seed=0):
    """A tiny FLUX.1-dev (guidance-distilled) or -schnell shaped model, every parameter N(0, 0.05^2) and the output
    layer N(0, 0.5^2): a velocity of order 1, so that a schedule's error shows at its real size."""
    if variant == "dev":
        m = tiny_text_model("flux", seed=seed)
    else:
        torch.manual_seed(seed)
        m = Flux(latent_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=12, pooled_projection_dim=5, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.05)
    torch.nn.init.normal_(m.final_layer.linear.weight, std=0.5)
    return m.eval()


def _inputs(guidance: bool, seed: int):
    """Noise of a (1, 4, 12, 16) latent (48 packed 2x2 tokens) and a caption."""
    noise = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(seed))
    cond = text_condition(batch=1, length=3, token_dim=12, pooled_dim=5, seed=seed, mask=False,
                          guidance=3.5 if guidance else None)
    return noise, cond


# dev: 8 steps at 48 and 4096 tokens, 20 at 1024 (shifted); schnell: 4 unshifted steps. The schedule sees the
# token count only as image_seq_len (BFL's get_schedule and diffusers' calculate_shift take the number), so the
# larger counts are run on the 48-token latent: the model's cost, not the schedule, grows with the latent.
CASES = [("dev", 8, 48), ("dev", 8, 4096), ("dev", 20, 1024), ("schnell", 4, 1024)]


@torch.no_grad()
@pytest.mark.parametrize("variant,steps,tokens", CASES)
def test_sample_is_bfl_get_schedule_and_denoise(variant, steps, tokens):
    dev = variant == "dev"
    model = _flux(variant)
    noise, cond = _inputs(dev, seed=steps + tokens)
    shift = dict(use_dynamic_shifting=True, image_seq_len=tokens) if dev else {}  # the README's recipe
    out = sample(model, noise, cond, sampler="flow_euler", steps=steps, **shift)
    ref = bfl_denoise(model, noise, cond, bfl_get_schedule(steps, tokens, shift=dev))
    assert relerr(out, ref) <= 1e-6, f"{variant} {steps} steps at {tokens} tokens: {relerr(out, ref):.3g} to BFL"
    pipe = flux_pipeline_loop(model, noise, cond, steps, tokens, DEV_SCHEDULER if dev else SCHNELL_SCHEDULER)
    assert relerr(out, pipe) <= 1e-6, f"{variant} {steps} steps at {tokens} tokens: {relerr(out, pipe):.3g} to the pipe"


@pytest.mark.parametrize("steps,tokens,shift", [(8, 48, True), (8, 4096, True), (20, 1024, True), (4, 4096, False),
                                                (1, 256, True), (50, 4000, True)])
def test_flux_grid_is_bfl_get_schedule(steps, tokens, shift):
    """The solver's N + 1 sigmas under the FLUX grid: BFL's get_schedule to float32 rounding, for each solver."""
    opts = dict(sigma_grid="flux", **(dict(use_dynamic_shifting=True, image_seq_len=tokens) if shift else {}))
    want = np.array(bfl_get_schedule(steps, tokens, shift=shift))
    for name in ("flow_euler", "flow_heun", "flow_dpmsolver++"):
        got = make_solver(name, steps, **opts).sigmas
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_flux_declares_its_grid_and_the_caller_overrides_it():
    model = tiny_text_model("flux")
    assert model_solver_options(model, "flow_euler", {}) == {"sigma_grid": "flux"}
    # What the caller passes wins: an explicit grid, or its own sigmas (the grid is then unused).
    assert model_solver_options(model, "flow_euler", {"sigma_grid": "scheduler"}) == {"sigma_grid": "scheduler"}
    assert model_solver_options(model, "flow_euler", {"sigmas": [1.0, 0.5]}) == {"sigmas": [1.0, 0.5]}
    # SD3 samples with the scheduler's own grid (its pipeline passes no sigmas); so does an undeclared model.
    assert model_solver_options(tiny_text_model("sd3"), "flow_euler", {"shift": 3.0}) == {"shift": 3.0}
    assert model_solver_options(ToyModel(num_classes=None), "flow_euler", {}) == {}


@torch.no_grad()
def test_scheduler_grid_still_reachable_on_flux():
    """sigma_grid="scheduler" on FLUX is the scheduler's default linspace(1, 0.001, N), as before."""
    model = _flux("dev")
    noise, cond = _inputs(True, seed=3)
    kw = dict(sampler="flow_euler", steps=6, use_dynamic_shifting=True, image_seq_len=48)
    out = sample(model, noise, cond, sigma_grid="scheduler", **kw)
    sched = FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
    sched.set_timesteps(6, mu=diffusers_calculate_shift(48, 256, 4096, 0.5, 1.15))
    x = noise
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(1), cond), t, x).prev_sample
    assert relerr(out, x) <= 1e-5
    assert relerr(sample(model, noise, cond, **kw), out) > 1e-3  # the FLUX grid differs


@pytest.mark.parametrize("options,match", [
    (dict(sigma_grid="karras"), r"sigma_grid: expected one of \('scheduler', 'flux'\), got 'karras'"),
    (dict(sigma_grid="flux", sigmas=[1.0, 0.5, 0.25]), r"sigmas, sigma_grid: expected one of them"),
])
def test_bad_sigma_grid(options, match):
    model = ToyModel(num_classes=None)
    with pytest.raises(ValueError, match=match):
        sample(model, torch.randn(1, 3, 5, 5), sampler="flow_euler", steps=3, **options)
    assert model.calls == []
