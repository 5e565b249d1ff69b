"""The ASE training losses: DiT's diffusion loss, or flow matching, applied to the truncated network's output.

For a batch ``(x0, y)`` with per-sample timesteps ``t``, each sample exits after ``schedule.depth(t)``
blocks; the model runs the batch sorted by depth (each block sees only the samples still in it) and
returns outputs in the caller's order. The loss is DiT's (improved-diffusion ``training_losses`` with
``LossType.MSE``): eps-MSE, plus for learned-sigma models the variational bound term ``vb`` whose gradient
reaches only the variance channels (the mean is detached inside ``vb``, as DiT does).

Flow matching (``flow_loss``, models with ``prediction == "flow"``: SD3, FLUX): x_t = (1 - σ) x0 + σ ε, the
target is the velocity ε - x0, and the model is called with t = σ·1000 (``sample_sigmas``: SD3's logit-normal
or uniform σ, with an optional shift).

Self-distillation (both losses, ``teacher=``): where a sample's depth is below the full depth, the truncated
output also matches the full-depth prediction of a teacher (a frozen copy or the EMA) at the same x_t and
condition; ``distill_weight`` weighs that term against the diffusion term. Full-depth samples get no such term.
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
    return _table_or_callable("loss weighting", weighting, t, t, tables.num_timesteps, "'min-snr', ")


def _table_or_callable(where: str, weighting, t: torch.Tensor, index: torch.Tensor, num_timesteps: int,
                       named: str) -> torch.Tensor:
    """λ(t) from a length-``num_timesteps`` tensor read at ``index``, or from a callable ``t -> (B,)``."""
    if isinstance(weighting, torch.Tensor):
        if weighting.ndim != 1 or weighting.shape[0] != num_timesteps:
            raise ValueError(f"{where}: a tensor expected shape ({num_timesteps},), got {tuple(weighting.shape)}")
        return weighting.to(t.device, torch.float32)[index]
    if callable(weighting):
        w = torch.as_tensor(weighting(t), device=t.device, dtype=torch.float32)
        if w.shape != t.shape:
            raise ValueError(f"{where}: the callable expected to return shape {tuple(t.shape)}, got {tuple(w.shape)}")
        return w
    raise ValueError(f"{where}: expected None, 'none', {named}a callable or a tensor, got {type(weighting).__name__}")


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------
def _truncated(depth, batch: int, full_depth: int | None, device) -> torch.Tensor:
    """(B,) float: 1 where a sample exits before ``full_depth``, else 0."""
    if depth is None or full_depth is None:
        return torch.zeros(batch, device=device)
    if isinstance(depth, int):
        return torch.full((batch,), float(depth < full_depth), device=device)
    return (depth.to(device) < full_depth).float()


def distill_term(teacher: Callable, x_t, t, y, pred: torch.Tensor, channels: int, depth, full_depth: int | None):
    """Per-sample (B,) MSE between ``pred`` (the student's first ``channels`` output channels) and the teacher's
    full-depth prediction at the same ``(x_t, t, y)`` (no gradient into the teacher), zero where the sample
    runs at full depth."""
    if full_depth is None:
        raise ValueError("distillation: `full_depth` expected the model's number of blocks, got None")
    with torch.no_grad():
        target = teacher(x_t, t, y, depth=None)[:, :channels].float()
    keep = _truncated(depth, x_t.shape[0], full_depth, pred.device)
    return _mean_flat((pred - target) ** 2) * keep


def diffusion_loss(
    model: Callable,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    tables: DiffusionTables,
    y=None,
    depth=None,
    weighting=None,
    learn_sigma: bool | None = None,
    teacher: Callable | None = None,
    distill_weight: float = 0.0,
    full_depth: int | None = None,
) -> dict:
    """DiT's training loss at per-sample timesteps, with the model exiting at ``depth``.

    x0, noise: (B, C, H, W); t: (B,) long in [0, T); y: (B,) labels (the null class for dropped labels), a
    ``TextCondition`` or None; depth: None, int or (B,) long (the model sorts by depth and restores the order).
    ``teacher`` / ``distill_weight`` / ``full_depth``: self-distillation (module docstring).
    Returns ``{"loss": scalar, "mse": (B,), "vb": (B,) or None, "distill": (B,) or None, "per_sample": (B,)}``.
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
    distill = None
    if teacher is not None and distill_weight > 0:
        distill = distill_term(teacher, x_t, t, y, eps, C, depth, full_depth)
        per_sample = per_sample + distill_weight * distill
    w = loss_weights(weighting, t, tables)
    loss = (per_sample if w is None else per_sample * w).mean()
    return {"loss": loss, "mse": mse.detach(), "vb": None if vb is None else vb.detach(),
            "distill": None if distill is None else distill.detach(), "per_sample": per_sample.detach()}


# --------------------------------------------------------------------------------------------------
# Flow matching (SD3 / FLUX: rectified flow, velocity prediction, t = sigma * 1000)
# --------------------------------------------------------------------------------------------------
SIGMA_SAMPLING = ("logit-normal", "uniform")


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift: ``shift * σ / (1 + (shift - 1) σ)`` (shift 1: unchanged; > 1: toward noise)."""
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift_sigmas: `shift` expected a finite number > 0, got {shift}")
    return sigma if shift == 1.0 else shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(n: int, generator: torch.Generator, device, mode: str = "logit-normal", mean: float = 0.0,
                  std: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """``n`` noise levels σ in (0, 1), float32 on ``device``: ``sigmoid(N(mean, std))`` (SD3's logit-normal,
    mean 0 / std 1 in its recipe) or ``U(0, 1)``, then :func:`shift_sigmas`. ``generator`` lives on ``device``."""
    if mode not in SIGMA_SAMPLING:
        raise ValueError(f"sample_sigmas: `mode` expected one of {SIGMA_SAMPLING}, got {mode!r}")
    if not (math.isfinite(std) and std > 0) or not math.isfinite(mean):
        raise ValueError(f"sample_sigmas: `mean`/`std` expected finite numbers with std > 0, got {mean}, {std}")
    if mode == "logit-normal":
        u = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    else:
        u = torch.rand(n, generator=generator, device=device)
    return shift_sigmas(u.clamp(1e-5, 1 - 1e-5), shift)


def flow_weights(weighting, t: torch.Tensor, num_timesteps: int = 1000) -> torch.Tensor | None:
    """λ(t) (B,) for flow matching at float ``t`` = σ·1000, or None. ``weighting``: None / ``"none"``; a
    callable ``t -> (B,)``; or a 1-D tensor of length ``num_timesteps`` read at ``floor(t)``."""
    if weighting is None or (isinstance(weighting, str) and weighting == "none"):
        return None
    if isinstance(weighting, str):
        raise ValueError(f"flow loss weighting: expected None, 'none', a callable or a tensor ('min-snr' is for "
                         f"epsilon prediction), got {weighting!r}")
    idx = t.floor().long().clamp(0, num_timesteps - 1)
    return _table_or_callable("flow loss weighting", weighting, t, idx, num_timesteps, "")


def flow_loss(
    model: Callable,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    y=None,
    depth=None,
    weighting=None,
    teacher: Callable | None = None,
    distill_weight: float = 0.0,
    full_depth: int | None = None,
    num_timesteps: int = 1000,
) -> dict:
    """The flow-matching loss at per-sample noise levels, with the model exiting at ``depth``.

    x0, noise: (B, C, H, W); sigma: (B,) float in [0, 1]; the model sees x_t = (1 - σ) x0 + σ noise at
    t = σ·``num_timesteps`` and predicts the velocity noise - x0. ``weighting``: :func:`flow_weights`.
    Returns ``{"loss": scalar, "mse": (B,), "distill": (B,) or None, "per_sample": (B,), "t": (B,)}``.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"flow_loss: `noise` expected shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    if sigma.shape != (x0.shape[0],) or not sigma.is_floating_point():
        raise ValueError(f"flow_loss: `sigma` expected a floating ({x0.shape[0]},) tensor, got "
                         f"{tuple(sigma.shape)} {sigma.dtype}")
    if sigma.device.type == "cpu" and not bool(((sigma >= 0) & (sigma <= 1)).all()):
        raise ValueError(f"flow_loss: `sigma` expected values in [0, 1], got min {sigma.min().item()} max "
                         f"{sigma.max().item()}")
    C = x0.shape[1]
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    x_t = (1 - s) * x0 + s * noise
    t = sigma.float() * num_timesteps
    out = model(x_t, t, y, depth=depth)
    if out.shape[1] != C:
        raise ValueError(f"flow_loss: model output expected {C} channels (the velocity), got {out.shape[1]}")
    v = out.float()
    mse = _mean_flat(((noise.float() - x0.float()) - v) ** 2)
    per_sample = mse
    distill = None
    if teacher is not None and distill_weight > 0:
        distill = distill_term(teacher, x_t, t, y, v, C, depth, full_depth)
        per_sample = per_sample + distill_weight * distill
    w = flow_weights(weighting, t, num_timesteps)
    loss = (per_sample if w is None else per_sample * w).mean()
    return {"loss": loss, "mse": mse.detach(), "distill": None if distill is None else distill.detach(),
            "per_sample": per_sample.detach(), "t": t}
