"""The ASE training loss: DiT's diffusion loss applied to the truncated network's output.

For a batch ``(x0, y)`` with per-sample timesteps ``t``, each sample exits after ``schedule.depth(t)``
blocks; the model runs the batch sorted by depth (each block sees only the samples still in it) and
returns outputs in the caller's order. The loss is DiT's (improved-diffusion ``training_losses`` with
``LossType.MSE``): eps-MSE, plus for learned-sigma models the variational bound term ``vb`` whose gradient
reaches only the variance channels (the mean is detached inside ``vb``, as DiT does).
"""
from __future__ import annotations

import math
from typing import Callable

import torch


# --------------------------------------------------------------------------------------------------
# Diffusion tables (DiT: linear betas 1e-4 .. 0.02 over 1000 steps), computed in float64
# --------------------------------------------------------------------------------------------------
class DiffusionTables:
    """The q(x_t | x_0) and posterior tables of a discrete-time Gaussian diffusion, on one device."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, device="cpu"):
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        t = {
            "sqrt_ac": ac.sqrt(),
            "sqrt_1m_ac": (1.0 - ac).sqrt(),
            "sqrt_recip_ac": (1.0 / ac).sqrt(),
            "sqrt_recipm1_ac": (1.0 / ac - 1.0).sqrt(),
            "post_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "post_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
            # log of the posterior variance, clipped at t = 0 (where it is 0) to its t = 1 value
            "post_logvar": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            "log_betas": torch.log(betas),
            "snr": ac / (1.0 - ac),
        }
        self.num_timesteps = num_timesteps
        self.config = dict(num_timesteps=num_timesteps, beta_start=beta_start, beta_end=beta_end)
        self._t = {k: v.to(device=device, dtype=torch.float32) for k, v in t.items()}

    def to(self, device) -> "DiffusionTables":
        self._t = {k: v.to(device) for k, v in self._t.items()}
        return self

    def __call__(self, name: str, t: torch.Tensor, ndim: int = 4) -> torch.Tensor:
        """Table ``name`` at integer timesteps ``t`` (B,), shaped (B, 1, ...) to broadcast over ``ndim`` dims."""
        return self._t[name][t].view(-1, *([1] * (ndim - 1)))


# --------------------------------------------------------------------------------------------------
# Pieces of the variational bound (improved-diffusion losses.py)
# --------------------------------------------------------------------------------------------------
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of data in [-1, 1] quantized to 256 levels under N(means, e^(2 log_scales)), elementwise."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_flat(x):
    return x.flatten(1).mean(1)


def vb_term(tables: DiffusionTables, x0, x_t, t, eps, var_values):
    """The variational bound term per sample (B,), in bits/dim, for a learned-range variance.

    eps is the predicted noise (the caller detaches it, so only ``var_values`` get gradient, as in DiT).
    """
    n = x0.ndim
    # the true posterior q(x_{t-1} | x_t, x_0)
    true_mean = tables("post_coef1", t, n) * x0 + tables("post_coef2", t, n) * x_t
    true_logvar = tables("post_logvar", t, n)
    # the model's p(x_{t-1} | x_t): mean from eps, log-variance interpolated between beta_t and beta~_t
    pred_x0 = tables("sqrt_recip_ac", t, n) * x_t - tables("sqrt_recipm1_ac", t, n) * eps
    pred_mean = tables("post_coef1", t, n) * pred_x0 + tables("post_coef2", t, n) * x_t
    frac = (var_values + 1) / 2
    pred_logvar = frac * tables("log_betas", t, n) + (1 - frac) * true_logvar
    kl = _mean_flat(normal_kl(true_mean, true_logvar, pred_mean, pred_logvar)) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, pred_mean, 0.5 * pred_logvar)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


# --------------------------------------------------------------------------------------------------
# λ(t) weighting
# --------------------------------------------------------------------------------------------------
def loss_weights(weighting, t: torch.Tensor, tables: DiffusionTables) -> torch.Tensor | None:
    """Per-sample weights λ(t) (B,) or None (unweighted).

    ``weighting``: None / ``"none"``; ``"min-snr"`` (min(SNR(t), 5) / SNR(t), Hang et al. 2023, for eps
    prediction); a callable ``t -> (B,)``; or a 1-D tensor of length ``num_timesteps`` indexed by t.
    Weights are used as given (not renormalized).
    """
    if weighting is None or (isinstance(weighting, str) and weighting == "none"):
        return None
    if isinstance(weighting, str):
        if weighting == "min-snr":
            snr = tables._t["snr"][t]
            return snr.clamp(max=5.0) / snr
        raise ValueError(f"loss weighting: expected None, 'none', 'min-snr', a callable or a tensor, got {weighting!r}")
    if isinstance(weighting, torch.Tensor):
        if weighting.ndim != 1 or weighting.shape[0] != tables.num_timesteps:
            raise ValueError(f"loss weighting: a tensor expected shape ({tables.num_timesteps},), got {tuple(weighting.shape)}")
        return weighting.to(t.device, torch.float32)[t]
    if callable(weighting):
        w = torch.as_tensor(weighting(t), device=t.device, dtype=torch.float32)
        if w.shape != t.shape:
            raise ValueError(f"loss weighting: the callable expected to return shape {tuple(t.shape)}, got {tuple(w.shape)}")
        return w
    raise ValueError(f"loss weighting: expected None, 'none', 'min-snr', a callable or a tensor, got {type(weighting).__name__}")


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------
def diffusion_loss(
    model: Callable,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    tables: DiffusionTables,
    y: torch.Tensor | None = None,
    depth=None,
    weighting=None,
    learn_sigma: bool | None = None,
) -> dict:
    """DiT's training loss at per-sample timesteps, with the model exiting at ``depth``.

    x0, noise: (B, C, H, W); t: (B,) long in [0, T); y: (B,) labels (the null class for dropped labels) or
    None; depth: None, int or (B,) long (the model sorts by depth and restores the order).
    Returns ``{"loss": scalar, "mse": (B,), "vb": (B,) or None, "per_sample": (B,)}``.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"diffusion_loss: `noise` expected shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    if t.shape != (x0.shape[0],) or t.dtype != torch.long:
        raise ValueError(f"diffusion_loss: `t` expected a ({x0.shape[0]},) LongTensor, got {tuple(t.shape)} {t.dtype}")
    n, C = x0.ndim, x0.shape[1]
    x_t = tables("sqrt_ac", t, n) * x0 + tables("sqrt_1m_ac", t, n) * noise
    out = model(x_t, t, y, depth=depth)
    if learn_sigma is None:
        learn_sigma = out.shape[1] == 2 * C
    if out.shape[1] != (2 * C if learn_sigma else C):
        raise ValueError(f"diffusion_loss: model output expected {2 * C if learn_sigma else C} channels, got {out.shape[1]}")
    eps = out[:, :C].float()
    mse = _mean_flat((noise.float() - eps) ** 2)
    vb = None
    per_sample = mse
    if learn_sigma:
        vb = vb_term(tables, x0.float(), x_t.float(), t, eps.detach(), out[:, C:].float())
        per_sample = mse + vb
    w = loss_weights(weighting, t, tables)
    loss = (per_sample if w is None else per_sample * w).mean()
    return {"loss": loss, "mse": mse.detach(), "vb": None if vb is None else vb.detach(), "per_sample": per_sample.detach()}
