"""cfg_step: the CFG combine + solver update of a sampling step against the sampler's unfused torch ops
(``eekernels.samplers.sampling.guide`` then ``DDIM.update`` / ``Euler.update``), same process, same timer.

The baseline (``torch_eager``) is exactly what ``Session.step`` runs after the model call today: split the
eps channels off the learned-sigma output, cast to the state's float32, ``u + s * (c - u)``, then DDIM's
``x0 = (x - s1 eps) / s0; p0 x0 + p1 eps`` (or Euler's ``x + dt * eps``), each a separate kernel reading and
writing a full float32 temporary: 8 to 10 launches. Ours is one launch. ``coeffs="device"`` includes
``solver_coefficients`` (DDIM's a = p0 / s0, b = p1 - a s1: three 0-d device ops per step); ``"table"`` has a
and b precomputed, what table columns ``a``/``b`` in the solver would give (the notes' wiring plan).

Byte floor (one read of x, one read of the cond and uncond eps channels of ``out``, one write of x): on CUDA
at DiT-XL/2 256^2, batch 64 with CFG (x (64, 4, 32, 32) float32, out (128, 8, 32, 32) bf16): 1.05 + 1.05 +
1.05 MB = 3.1 MB, 1.0 us at 3.0 TB/s, so both sides are launch-bound and the ratio is about launches saved.
Note: CPU timings run the torch reference (the Triton interpreter is skipped), which is the same unfused ops.
"""
import pytest
import torch

from eekernels.ops import cfg_step
from eekernels.ops.cfg_step import solver_coefficients
from eekernels.samplers.sampling import guide
from eekernels.samplers.solvers import make_solver

CUDA = torch.cuda.is_available()
SHAPE = (64, 4, 32, 32) if CUDA else (4, 4, 16, 16)  # x: (B, C, H, W); out (2B, 2C, H, W): DiT learned sigma
OUT_DTYPE = torch.bfloat16 if CUDA else torch.float32


def _setup(sampler):
    solver = make_solver(sampler, 50)
    dev = "cuda" if CUDA else "cpu"
    B, C = SHAPE[0], SHAPE[1]
    st = solver.new_state(torch.randn(*SHAPE, device=dev) * solver.init_noise_sigma)
    st.counter.fill_(10)
    row = st.row()
    out = torch.randn(2 * B, 2 * C, *SHAPE[2:], device=dev).to(OUT_DTYPE)
    scale = torch.tensor(4.0, device=dev)
    return solver, st, row, out, scale


def _eager(solver, st, row, out, scale):
    """guide + the solver update, as Session.step, writing a new tensor (so repeated calls do not drift)."""
    eps, _ = guide(out, st.x.shape[1], scale, st.x.dtype)
    c = lambda k: solver.c(row, k)  # noqa: E731
    if solver.name == "ddim":
        return c("p0") * ((st.x - c("s1") * eps) / c("s0")) + c("p1") * eps
    return st.x + c("dt") * eps


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("coeffs", ["table", "device"])
@pytest.mark.parametrize("provider", ["torch_eager", "torch_compile", "eekernels", "triton"])
def test_cfg_step(bench, provider, coeffs, sampler):
    bench.require(provider)
    if coeffs == "device" and provider.startswith("torch"):
        pytest.skip("coeffs only changes our op's call; the torch baselines are the coeffs='table' cases")
    solver, st, row, out, scale = _setup(sampler)
    a, b = solver_coefficients(solver, row)

    def ours(x, out, scale, row):
        ca, cb = solver_coefficients(solver, row) if coeffs == "device" else (a, b)
        return cfg_step(x, out, scale, ca, cb)

    def eager(x, out, scale, row):
        return _eager(solver, st, row, out, scale)

    args = (st.x, out, scale, row)
    fn = bench.provider(provider, ours, eager, args)
    moved = 2 * st.x.numel() * st.x.element_size() + 2 * st.x.numel() * out.element_size()
    bench.record(fn, lambda: eager(*args), bytes_moved=moved)
