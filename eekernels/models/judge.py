"""The fidelity judge's network: a small CNN classifier of 32x32 glyphs and its penultimate features.

A shipped model (``glyph-judge``). Its scores, the Fréchet distance and its training live in
``eekernels.eval.judge``.
"""
from __future__ import annotations

import torch
import torch.nn as nn


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
