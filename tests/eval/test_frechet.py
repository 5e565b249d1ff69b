"""The one Fréchet distance (eekernels.eval.judge.frechet_distance) against scipy's sqrtm formula in float64, and
eval.fidelity computing its figures through it."""
import inspect

import numpy as np
import pytest
import scipy.linalg
import torch

from eekernels.eval import fidelity
from eekernels.eval.judge import feature_stats, frechet_distance, sqrt_psd


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula as pytorch-fid / the TTUR code write it: ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b)
    - 2 tr(sqrtm(S_a S_b)), in float64 (the real part of scipy's sqrtm)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = scipy.linalg.sqrtm(s_a @ s_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross).real)


@pytest.mark.parametrize("n,f,mix", [(400, 7, 0.0), (257, 24, 0.5), (1000, 3, 2.0), (60, 31, 1.0)])
def test_frechet_distance_matches_scipys_sqrtm_formula(n, f, mix):
    """Correlated (non-diagonal) covariances of odd sizes, one set shifted and mixed: within 1e-9 relative."""
    g = torch.Generator().manual_seed(n + f)
    a = torch.randn(n, f, generator=g, dtype=torch.float64) @ torch.randn(f, f, generator=g, dtype=torch.float64)
    b = (torch.randn(n + 13, f, generator=g, dtype=torch.float64) @ torch.randn(f, f, generator=g, dtype=torch.float64)
         + mix * torch.randn(f, generator=g, dtype=torch.float64))
    want = scipy_frechet(a.numpy(), b.numpy())
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert frechet_distance(b, a) == pytest.approx(want, rel=1e-9, abs=1e-9)  # symmetric
    sb = feature_stats(b)
    assert frechet_distance(feature_stats(a), sb, root_b=sqrt_psd(sb[1])) == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert fidelity.frechet(a, b) == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert fidelity.frechet(a.float(), b.float()) == pytest.approx(want, rel=1e-4)  # float32 features, float64 math


def test_fidelity_computes_every_frechet_figure_through_the_judges(monkeypatch):
    """One implementation: fidelity's plain figure and FD-infinity's subsets go through judge.frechet_distance,
    and fidelity holds no matrix square root of its own (its bootstrap passes the real set's root to it)."""
    calls = []

    def counted(a, b, **kw):
        calls.append(kw.get("root_b") is not None)
        return frechet_distance(a, b, **kw)

    monkeypatch.setattr(fidelity, "frechet_distance", counted, raising=False)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(80, 5, generator=g), torch.randn(80, 5, generator=g)
    fidelity.frechet(a, b)
    assert calls == [False]
    fidelity.frechet_infinity(a, b, points=3, draws=1)
    assert len(calls) == 4
    src = inspect.getsource(fidelity)
    assert "eigvalsh" not in src and "eigh(" not in src  # the matrix square roots live in judge.py alone
