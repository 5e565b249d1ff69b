"""Samplers: DDPM, DDIM, DPM-Solver++ (2M), Euler and Heun, and for flow-matching models (SD3, FLUX) flow Euler,
Heun and DPM-Solver++, with classifier-free guidance (class labels or text conditions), early exit and one CUDA
graph per exit depth.

``sample(model, noise, y, sampler="ddim", steps=50, cfg_scale=1.0, schedule=None, ...)`` runs a whole
trajectory; each solver is also a class usable step by step (``DDIM(steps=50).step(model_output, x)``).
``timestep_spacing="respaced"`` (DDIM, DDPM) and ``cfg_channels=3`` reproduce DiT's own sampler exactly.
"""
from eekernels.samplers.sampling import (
    EXIT_POLICIES,
    NonFiniteSampleWarning,
    Session,
    check_condition,
    full_condition,
    guide,
    model_solver_options,
    plan_depths,
    resolve_negative,
    sample,
)
from eekernels.samplers.solvers import (
    DDIM,
    DDPM,
    EPSILON_SOLVERS,
    FLOW_SOLVERS,
    SIGMA_GRIDS,
    SOLVERS,
    TIMESTEP_SPACINGS,
    DPMSolverPP,
    Euler,
    FlowDPMSolverPP,
    FlowEuler,
    FlowHeun,
    FlowSolver,
    Heun,
    Solver,
    SolverState,
    alphas_cumprod,
    alphas_cumprod_adm,
    calculate_shift,
    make_solver,
    respaced_timesteps,
)

__all__ = ["sample", "SOLVERS", "Solver", "SolverState", "DDPM", "DDIM", "DPMSolverPP", "Euler", "Heun",
           "make_solver", "alphas_cumprod", "alphas_cumprod_adm", "respaced_timesteps", "TIMESTEP_SPACINGS",
           "plan_depths", "guide", "Session", "EXIT_POLICIES", "EPSILON_SOLVERS", "FLOW_SOLVERS", "FlowSolver",
           "FlowEuler", "FlowHeun", "FlowDPMSolverPP", "calculate_shift", "check_condition", "full_condition",
           "resolve_negative", "model_solver_options", "SIGMA_GRIDS",
           "NonFiniteSampleWarning"]
