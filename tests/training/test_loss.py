"""DiT's diffusion loss: tables, the eps-MSE term, the variational term, λ(t), and early-exit gradients."""
import math

import pytest
import torch

from eekernels.models import DiT
from eekernels.eval.naive import NaiveExitModel, naive_exit_forward
from eekernels.training import DiffusionTables, diffusion_loss, vb_term


def _tiny_dit(learn_sigma=True, depth=5):
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=depth, num_heads=3, num_classes=10,
            learn_sigma=learn_sigma)
    for p in m.parameters():  # DiT zero-inits adaLN and the output layer: randomize everything
        torch.nn.init.normal_(p, std=0.05)
    return m.eval()  # train mode would drop labels at random (DiT's own CFG dropout)


def test_tables_match_closed_form():
    tab = DiffusionTables()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    t = torch.tensor([0, 1, 499, 999])
    assert torch.allclose(tab("sqrt_ac", t, 1), ac[t].sqrt().float())
    post_var = betas * (1 - torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])) / (1 - ac)
    assert torch.allclose(tab("post_logvar", t, 1)[1:], post_var[t[1:]].log().float())
    assert tab("post_logvar", t, 1)[0] == tab("post_logvar", t, 1)[1]  # clipped at t = 0


def test_vb_is_zero_for_a_perfect_model_and_closed_form_at_the_upper_variance():
    tab = DiffusionTables()
    x0 = torch.rand(4, 3, 6, 6) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([5, 100, 500, 999])
    x_t = tab("sqrt_ac", t) * x0 + tab("sqrt_1m_ac", t) * noise
    # the true noise and var_values = -1 (posterior variance) give p = q: KL 0
    vb = vb_term(tab, x0, x_t, t, noise, -torch.ones_like(x0))
    assert vb.abs().max() < 1e-4
    # var_values = +1: variance beta_t; KL = 0.5 (-1 + log b - log b~ + b~/b) / ln 2 per element
    vb = vb_term(tab, x0, x_t, t, noise, torch.ones_like(x0))
    lb, lbt = tab("log_betas", t, 1), tab("post_logvar", t, 1)
    expect = 0.5 * (-1 + lb - lbt + torch.exp(lbt - lb)) / math.log(2)
    assert torch.allclose(vb, expect, rtol=1e-4, atol=1e-6)


def test_loss_terms_and_gradient_routing():
    m = _tiny_dit()
    tab = DiffusionTables()
    x0 = torch.rand(5, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 3, 250, 600, 999])
    y = torch.tensor([1, 2, 3, 10, 4])  # 10: the null class
    terms = diffusion_loss(m, x0, t, noise, tab, y=y)
    x_t = tab("sqrt_ac", t) * x0 + tab("sqrt_1m_ac", t) * noise
    out = m(x_t, t, y)
    mse = ((noise - out[:, :3]) ** 2).flatten(1).mean(1)
    assert torch.allclose(terms["mse"], mse, rtol=1e-5)
    assert torch.allclose(terms["loss"], (terms["mse"] + terms["vb"]).mean(), rtol=1e-5)
    # the vb term's gradient reaches only the variance channels (the eps in vb is detached, as in DiT)
    out = out.detach().requires_grad_(True)
    vb = vb_term(tab, x0, x_t, t, out[:, :3].detach(), out[:, 3:])
    (g,) = torch.autograd.grad(vb.sum(), out)
    assert g[:, :3].abs().max() == 0 and g[:, 3:].abs().max() > 0


def test_weighting_and_bad_inputs():
    m = _tiny_dit(learn_sigma=False)
    tab = DiffusionTables()
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([10, 200, 700, 900])
    base = diffusion_loss(m, x0, t, noise, tab)
    assert base["vb"] is None
    w = torch.rand(1000)
    weighted = diffusion_loss(m, x0, t, noise, tab, weighting=w)
    assert torch.allclose(weighted["loss"], (base["per_sample"] * w[t]).mean(), rtol=1e-5)
    snr = diffusion_loss(m, x0, t, noise, tab, weighting="min-snr")
    assert snr["loss"] < base["loss"]  # min(SNR, 5)/SNR <= 1, < 1 at small t
    with pytest.raises(ValueError, match="weighting"):
        diffusion_loss(m, x0, t, noise, tab, weighting="p2")
    with pytest.raises(ValueError, match="`t`"):
        diffusion_loss(m, x0, t.float(), noise, tab)
    with pytest.raises(ValueError, match="`noise`"):
        diffusion_loss(m, x0, t, noise[:2], tab)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_early_exit_gradients_equal_the_naive_all_blocks_then_pick(learn_sigma):
    """Sorted-prefix execution (each sample through its own blocks only) vs every block for every sample."""
    m = _tiny_dit(learn_sigma)
    tab = DiffusionTables()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(7, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(7, 3, 8, 8, generator=g)
    t = torch.tensor([0, 950, 120, 640, 333, 999, 480])
    y = torch.tensor([3, 10, 1, 4, 1, 5, 9])
    depth = torch.tensor([5, 1, 4, 2, 3, 1, 3])  # deepest sample not first, repeated and unique depths

    def grads(forward):
        m.zero_grad(set_to_none=True)
        diffusion_loss(forward, x0, t, noise, tab, y=y, depth=depth)["loss"].backward()
        return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in m.named_parameters()}

    fast, naive = grads(m), grads(NaiveExitModel(m))
    for name in fast:
        scale = naive[name].abs().max().clamp_min(1e-12)
        err = (fast[name] - naive[name]).abs().max() / scale
        assert err < 2e-5, f"{name}: max rel error {err:.2e}"
    # a block that only depth-5 samples use gets gradient from those samples alone
    assert fast["blocks.4.mlp.fc1.weight"].abs().max() > 0


def test_naive_forward_equals_solo_runs():
    m = _tiny_dit()
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([1, 500, 900, 20]), torch.tensor([0, 1, 2, 3])
    depth = torch.tensor([2, 5, 1, 4])
    out = naive_exit_forward(m, x, t, y, depth)
    for i in range(4):
        solo = m(x[i : i + 1], t[i : i + 1], y[i : i + 1], depth=int(depth[i]))
        torch.testing.assert_close(out[i : i + 1], solo, rtol=1e-5, atol=1e-6)
