"""The fidelity judge's scores: Fréchet distance between Gaussian fits of its penultimate features, its
training on the glyph stream, and its accuracy on fresh glyphs.

Generated samples are scored by (1) the judge's class accuracy against the labels they were asked for and
(2) the Fréchet distance between Gaussian fits of the judge's penultimate features on samples and on real
data (FID's recipe with a judge trained on this data instead of Inception). The network itself,
``GlyphJudge``, is a shipped model (``eekernels.models.judge``, loaded by ``load_pretrained("glyph-judge")``).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from eekernels.models.judge import GlyphJudge


# --------------------------------------------------------------------------------------------------
# Fréchet distance between Gaussian fits of two feature sets
# --------------------------------------------------------------------------------------------------
def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """features (N, F) -> (mean (F,), covariance (F, F)) in float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_stats: `features` expected (N >= 2, F), got {tuple(features.shape)}")
    f = features.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a covariance (symmetrized first; rounding's negative eigenvalues taken as 0)."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(a, b, *, root_b: torch.Tensor | None = None) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2): the one Fréchet distance of eekernels.

    ``a``, ``b``: feature tensors (N, F) or precomputed ``(mean, cov)`` pairs (``feature_stats``). Computed in
    float64 with symmetric eigendecompositions (no scipy): tr((S_a S_b)^1/2) = tr((S_b^1/2 S_a S_b^1/2)^1/2), the
    inner matrix symmetric PSD. ``root_b``: ``sqrt_psd(S_b)`` when it is already known (a real set's, shared by
    many generated sets, as ``eval.fidelity``'s bootstrap does).
    """
    mu_a, s_a = a if isinstance(a, tuple) else feature_stats(a)
    mu_b, s_b = b if isinstance(b, tuple) else feature_stats(b)
    mu_b, s_b = mu_b.to(mu_a.device), s_b.to(mu_a.device)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"frechet_distance: feature dims differ: {tuple(mu_a.shape)} vs {tuple(mu_b.shape)}")
    root = sqrt_psd(s_b) if root_b is None else root_b.to(s_a.device)
    inner = root @ s_a @ root
    tr_cross = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * tr_cross)


# --------------------------------------------------------------------------------------------------
# Training on the glyph stream
# --------------------------------------------------------------------------------------------------
def train_judge(
    steps: int = 1500, batch_size: int = 256, lr: float = 2e-3, seed: int = 1, device="cpu",
    width: int = 32, feature_dim: int = 128, log=print,
) -> tuple[GlyphJudge, dict]:
    """Train a judge on fresh glyphs (AdamW, one-cycle cosine lr). Returns (model in eval mode, record)."""
    from eekernels.data.batches import BatchSource

    torch.manual_seed(seed)
    model = GlyphJudge(width=width, feature_dim=feature_dim).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    batches = BatchSource("glyphs", batch_size=batch_size, seed=seed, device=device).iterate()
    t0 = time.time()
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step + 1) % max(1, steps // 5) == 0:
            log(f"judge step {step + 1}/{steps} loss {loss.item():.4f}")
    model.eval()
    record = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "final_loss": float(loss.detach()),
              "train_seconds": round(time.time() - t0, 1)}
    return model, record


@torch.no_grad()
def judge_accuracy(model: GlyphJudge, n: int = 2000, seed: int = 12345, device="cpu") -> float:
    """Accuracy on ``n`` fresh glyphs from a seed the judge never trained on."""
    from eekernels.data.glyphs import generator_for, glyph_batch

    x, y = glyph_batch(n, generator_for(seed, 0), device)
    pred, _ = model.score(x)
    return float((pred == y).float().mean())
