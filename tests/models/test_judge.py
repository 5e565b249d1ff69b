"""The fidelity judge: Fréchet distance against closed forms, features, and the shipped judge's accuracy."""
import pytest
import torch

from eekernels.eval.judge import feature_stats, frechet_distance
from eekernels.models.judge import GlyphJudge


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 5, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-8
    # Gaussians N(m1, diag(s1^2)) and N(m2, diag(s2^2)): |m1 - m2|^2 + sum (s1 - s2)^2
    m1, m2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.5, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.5, 1.0, 0.5])
    exact = float((m1 - m2).square().sum() + (s1 - s2).square().sum())
    got = frechet_distance((m1.double(), torch.diag(s1.double() ** 2)), (m2.double(), torch.diag(s2.double() ** 2)))
    assert abs(got - exact) < 1e-9
    # a non-diagonal case against the eigendecomposition of S1^1/2 S2 S1^1/2 done by hand in float64
    q = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    c1 = q @ torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)) @ q.T
    c2 = torch.diag(torch.tensor([0.5, 1.5, 4.0], dtype=torch.float64))
    w, v = torch.linalg.eigh(c1)
    r1 = v @ torch.diag(w.sqrt()) @ v.T
    tr = torch.linalg.eigvalsh(r1 @ c2 @ r1).sqrt().sum()
    expect = float(torch.trace(c1) + torch.trace(c2) - 2 * tr)
    zero = torch.zeros(3, dtype=torch.float64)
    assert abs(frechet_distance((zero, c1), (zero, c2)) - expect) < 1e-9


def test_feature_stats_and_bad_inputs():
    x = torch.randn(10, 4)
    mu, cov = feature_stats(x)
    torch.testing.assert_close(cov, torch.cov(x.double().T))
    with pytest.raises(ValueError, match="features"):
        feature_stats(torch.randn(1, 4))
    with pytest.raises(ValueError, match="dims"):
        frechet_distance(torch.randn(5, 3), torch.randn(5, 4))


def test_judge_shapes():
    j = GlyphJudge(width=8, feature_dim=16).eval()
    x = torch.rand(7, 3, 32, 32) * 2 - 1
    assert j(x).shape == (7, 10)
    pred, feats = j.score(x, batch_size=3)
    assert pred.shape == (7,) and feats.shape == (7, 16) and feats.dtype == torch.float32
    torch.testing.assert_close(pred, j(x).argmax(1))
