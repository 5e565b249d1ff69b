"""DiT's own sampler, reproduced: ADM respacing (``create_diffusion(str(N))``) and ``forward_with_cfg``.

The references are written here from the ADM / DiT equations (``respace.py``: ``space_timesteps``,
``SpacedDiffusion``; ``gaussian_diffusion.py``: ``p_sample``, ``ddim_sample``; ``models.py``:
``forward_with_cfg``) in float64 numpy / torch, without eekernels' solver code, and drive the same toy model
with the same noise.
"""
import re

import numpy as np
import pytest
import torch

from eekernels.samplers import SOLVERS, guide, make_solver, respaced_timesteps, sample
from tests.samplers._toys import ToyModel, relerr


# ---- ADM / DiT, from its equations ----------------------------------------------------------------------------

def adm_space_timesteps(num_timesteps, n):
    """``space_timesteps(num_timesteps, [n])``: one section, fractional stride, rounded."""
    frac_stride = 1 if n <= 1 else (num_timesteps - 1) / (n - 1)
    cur_idx, taken = 0.0, []
    for _ in range(n):
        taken.append(round(cur_idx))
        cur_idx += frac_stride
    return set(taken)


class ADMSpacedDiffusion:
    """``create_diffusion(str(n))``: linear betas (float64), kept timesteps, betas recomputed from them."""

    def __init__(self, n, T=1000):
        betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)
        base_ac = np.cumprod(1.0 - betas)
        use = adm_space_timesteps(T, n)
        last, new_betas, self.timestep_map = 1.0, [], []
        for i, a in enumerate(base_ac):
            if i in use:
                new_betas.append(1 - a / last)
                last = a
                self.timestep_map.append(i)
        b = self.betas = np.array(new_betas)
        ac = self.ac = np.cumprod(1.0 - b)
        self.ac_prev = np.append(1.0, ac[:-1])
        self.post_var = b * (1.0 - self.ac_prev) / (1.0 - ac)
        self.post_log_var = np.log(np.append(self.post_var[1], self.post_var[1:])) if len(b) > 1 else np.zeros(1)
        self.coef1 = b * np.sqrt(self.ac_prev) / (1.0 - ac)
        self.coef2 = (1.0 - self.ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)

    def _x0(self, model, x, i, y):
        t = torch.full((x.shape[0],), self.timestep_map[i], dtype=torch.int64)  # _WrappedModel's map
        out = model(x, t, y)
        C = x.shape[1]
        eps, v = out[:, :C], out[:, C:]
        x0 = float(np.sqrt(1.0 / self.ac[i])) * x - float(np.sqrt(1.0 / self.ac[i] - 1)) * eps
        return x0, v

    def p_sample_loop(self, model, z, y, gen):
        """Learned-range variance (DiT: learn_sigma=True), clip_denoised=False."""
        x = z
        for i in reversed(range(len(self.betas))):
            x0, v = self._x0(model, x, i, y)
            frac = (v + 1) / 2
            log_var = frac * float(np.log(self.betas[i])) + (1 - frac) * float(self.post_log_var[i])
            mean = float(self.coef1[i]) * x0 + float(self.coef2[i]) * x
            noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            x = mean + float(i != 0) * torch.exp(0.5 * log_var) * noise
        return x

    def ddim_sample_loop(self, model, z, y, gen, eta=0.0):
        x = z
        for i in reversed(range(len(self.betas))):
            x0, _ = self._x0(model, x, i, y)
            eps = (float(np.sqrt(1.0 / self.ac[i])) * x - x0) / float(np.sqrt(1.0 / self.ac[i] - 1))
            ab, abp = float(self.ac[i]), float(self.ac_prev[i])
            sigma = eta * np.sqrt((1 - abp) / (1 - ab)) * np.sqrt(1 - ab / abp)
            noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            mean = x0 * float(np.sqrt(abp)) + float(np.sqrt(1 - abp - sigma**2)) * eps
            x = mean + float(i != 0) * float(sigma) * noise
        return x


def dit_forward_with_cfg(model, x, t, y, cfg_scale):
    """DiT's ``forward_with_cfg``: guidance on the first 3 output channels only, the rest of each half as is."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = model(combined, t, y)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


# ---- respaced DDPM / DDIM -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 7, 25, 250, 999, 1000])
def test_respaced_timesteps_are_adms(n):
    ts = respaced_timesteps(1000, n)
    assert sorted(ts.tolist()) == sorted(adm_space_timesteps(1000, n)) and len(ts) == n
    assert list(ts) == sorted(ts, reverse=True)
    assert make_solver("ddpm", n, timestep_spacing="respaced").timesteps.tolist() == ts.tolist()


def _toy64(channels=3):
    return ToyModel(channels=channels, learn_sigma=True, seed=4).double()


@pytest.mark.parametrize("n", [1, 5, 17])
def test_respaced_ddpm_matches_dit_p_sample_loop(n):
    model = _toy64()
    z = torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 2, 4])
    ref = ADMSpacedDiffusion(n).p_sample_loop(model, z, y, torch.Generator().manual_seed(9))
    model.calls.clear()
    got = sample(model, z, y, sampler="ddpm", steps=n, timestep_spacing="respaced",
                 generator=torch.Generator().manual_seed(9))
    assert [int(t[0]) for _, t in model.calls] == ADMSpacedDiffusion(n).timestep_map[::-1]
    assert relerr(got, ref) < 1e-6
    if n > 1:  # diffusers' spacings are other trajectories
        other = sample(model, z, y, sampler="ddpm", steps=n, generator=torch.Generator().manual_seed(9))
        assert relerr(other, ref) > 1e-4


@pytest.mark.parametrize("n,eta", [(1, 0.0), (6, 0.0), (20, 0.0), (8, 0.6)])
def test_respaced_ddim_matches_dit_ddim_sample_loop(n, eta):
    model = _toy64()
    z = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([1, 3])
    ref = ADMSpacedDiffusion(n).ddim_sample_loop(model, z, y, torch.Generator().manual_seed(5), eta=eta)
    got = sample(model, z, y, sampler="ddim", steps=n, eta=eta, timestep_spacing="respaced",
                 generator=torch.Generator().manual_seed(5))
    assert relerr(got, ref) < 1e-6
    if n > 1:
        leading = sample(model, z, y, sampler="ddim", steps=n, eta=eta, generator=torch.Generator().manual_seed(5))
        assert relerr(leading, ref) > 1e-4


def test_respaced_float32_close_to_dit():
    """A float32 run tracks the float64 reference to float32 precision (the table is float64 either way)."""
    model = ToyModel(learn_sigma=True, seed=4)
    z = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 3])
    ref = ADMSpacedDiffusion(10).ddim_sample_loop(_toy64(), z.double(), y, torch.Generator())
    got = sample(model, z, y, sampler="ddim", steps=10, timestep_spacing="respaced")
    assert got.dtype == torch.float32 and relerr(got, ref) < 1e-5


@pytest.mark.parametrize("name", ["dpmsolver++", "euler", "heun"])
def test_respaced_only_for_ddim_and_ddpm(name):
    match = rf"timestep_spacing: expected one of .* for {re.escape(name)}, got 'respaced'"
    with pytest.raises(ValueError, match=match):
        sample(ToyModel(), torch.randn(1, 3, 5, 5), torch.tensor([0]), sampler=name, steps=3,
               timestep_spacing="respaced")


# ---- DiT's CFG rule ---------------------------------------------------------------------------------------------

def test_full_dit_pipeline_cfg_channels_3():
    """DiT's sample.py end to end (DDIM, deterministic): z doubled, y + null, forward_with_cfg, first half."""
    model = _toy64(channels=4)  # DiT's latents: 4 channels, so channel 3 is left unguided
    z = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([1, 4])
    s = 4.0
    y2 = torch.cat([y, torch.full_like(y, model.null_class)])
    ref = ADMSpacedDiffusion(12).ddim_sample_loop(lambda x, t, yy: dit_forward_with_cfg(model, x, t, yy, s),
                                                  torch.cat([z, z]), y2, torch.Generator())[:2]
    got = sample(model, z, y, sampler="ddim", steps=12, cfg_scale=s, cfg_channels=3, timestep_spacing="respaced")
    assert relerr(got, ref) < 1e-6
    all_channels = sample(model, z, y, sampler="ddim", steps=12, cfg_scale=s, timestep_spacing="respaced")
    assert relerr(all_channels, ref) > 1e-4  # the default (diffusers' rule) guides channel 3 too


class DiTGuided:
    """forward_with_cfg as a plain (B -> B) model: the first half of its output, as DiT's sampler keeps."""

    def __init__(self, model, scale):
        self.model, self.scale, self.in_channels = model, scale, model.in_channels

    def __call__(self, x, t, y, depth=None):
        y2 = torch.cat([y, torch.full_like(y, self.model.null_class)])
        return dit_forward_with_cfg(self.model, torch.cat([x, x]), torch.cat([t, t]), y2, self.scale)[: len(x)]


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_cfg_channels_3_is_forward_with_cfg(name, learn_sigma):
    model = ToyModel(channels=4, learn_sigma=learn_sigma, seed=3)
    z, y = torch.randn(3, 4, 5, 5), torch.tensor([0, 2, 4])
    got = sample(model, z, y, sampler=name, steps=6, cfg_scale=3.0, cfg_channels=3,
                 generator=torch.Generator().manual_seed(1))
    want = sample(DiTGuided(model, 3.0), z, y, sampler=name, steps=6, generator=torch.Generator().manual_seed(1))
    assert relerr(got, want) < 1e-6


def test_guide_channel_rules():
    B, C = 2, 4
    out = torch.randn(2 * B, 2 * C, 3, 3, dtype=torch.float64)
    s = torch.tensor(2.5, dtype=torch.float64)
    eps, var = guide(out, C, s, torch.float64, cfg_channels=3)
    dit = dit_forward_with_cfg(lambda x, t, y: out, out[:, :C], None, None, 2.5)[:B]
    assert torch.allclose(eps, dit[:, :C], rtol=0, atol=1e-12) and torch.equal(var, out[:B, C:])
    eps_all, var_all = guide(out, C, s, torch.float64)
    want = out[B:, :C] + 2.5 * (out[:B, :C] - out[B:, :C])  # diffusers' DiTPipeline: every eps channel
    assert torch.allclose(eps_all, want, rtol=0, atol=1e-12) and torch.equal(var_all, out[:B, C:])
    assert torch.equal(guide(out, C, s, torch.float64, cfg_channels=C)[0], eps_all)
