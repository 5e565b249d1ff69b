"""Samplers: DDPM, DDIM, DPM-Solver++ (2M), Euler and Heun with classifier-free guidance, early exit and one
CUDA graph per exit depth.

``sample(model, noise, y, sampler="ddim", steps=50, cfg_scale=1.0, schedule=None, ...)`` runs a whole
trajectory; each solver is also a class usable step by step (``DDIM(steps=50).step(model_output, x)``).
"""
from eekernels.samplers.sampling import EXIT_POLICIES, Session, guide, plan_depths, sample
from eekernels.samplers.solvers import (
    DDIM,
    DDPM,
    SOLVERS,
    DPMSolverPP,
    Euler,
    Heun,
    Solver,
    SolverState,
    alphas_cumprod,
    make_solver,
)

__all__ = ["sample", "SOLVERS", "Solver", "SolverState", "DDPM", "DDIM", "DPMSolverPP", "Euler", "Heun",
           "make_solver", "alphas_cumprod", "plan_depths", "guide", "Session", "EXIT_POLICIES"]
