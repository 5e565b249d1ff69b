"""The fidelity judge: a small CNN classifier of 32x32 glyphs, its penultimate features, and the Fréchet distance.

Generated samples are scored by (1) the judge's class accuracy against the labels they were asked for and
(2) the Fréchet distance between Gaussian fits of the judge's penultimate features on samples and on real
data (FID's recipe with a judge trained on this data instead of Inception).
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class GlyphJudge(nn.Module):
    """CNN classifier: 3 stages of two 3x3 convs (32 -> 16 -> 8 -> 4 px), then a feature layer and a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = dict(num_classes=num_classes, in_channels=in_channels, width=width, feature_dim=feature_dim)
        w = width
        self.body = nn.Sequential(
            _conv(in_channels, w), _conv(w, w), nn.MaxPool2d(2),
            _conv(w, 2 * w), _conv(2 * w, 2 * w), nn.MaxPool2d(2),
            _conv(2 * w, 4 * w), nn.MaxPool2d(2),
        )
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, 32, 32) in [-1, 1] -> penultimate features (B, feature_dim), float32."""
        return self.feature(self.body(x)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, 32, 32) in [-1, 1] -> logits (B, num_classes)."""
        return self.head(self.feature(self.body(x)))

    @torch.no_grad()
    def score(self, x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted labels (B,), features (B, feature_dim)) in eval mode, batched; on x's device."""
        was_training = self.training
        self.eval()
        preds, feats = [], []
        for chunk in x.split(batch_size):
            f = self.feature(self.body(chunk.to(next(self.parameters()).dtype)))
            preds.append(self.head(f).argmax(1))
            feats.append(f.float())
        self.train(was_training)
        return torch.cat(preds), torch.cat(feats)


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


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(a, b) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2).

    ``a``, ``b``: feature tensors (N, F) or precomputed ``(mean, cov)`` pairs. Computed in float64 with
    symmetric eigendecompositions (no scipy): tr((S_a S_b)^1/2) = tr((S_a^1/2 S_b S_a^1/2)^1/2).
    """
    mu_a, s_a = a if isinstance(a, tuple) else feature_stats(a)
    mu_b, s_b = b if isinstance(b, tuple) else feature_stats(b)
    mu_b, s_b = mu_b.to(mu_a.device), s_b.to(mu_a.device)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"frechet_distance: feature dims differ: {tuple(mu_a.shape)} vs {tuple(mu_b.shape)}")
    root_a = _sqrt_psd(s_a)
    inner = root_a @ s_b @ root_a
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
