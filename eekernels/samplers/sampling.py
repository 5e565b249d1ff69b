"""``sample()``: any solver, classifier-free guidance, early exit, and (on CUDA) one graph per exit depth.

A sampling run is a sequence of identical *steps* on static buffers (``Session``): read the table row at the
device-side step counter, call the model at the depth planned for that call, combine the CFG halves, update
the sample in place, increment the counter. The step -> depth plan is computed once, before the loop, from the
exit schedule, so no step waits on the host. Eagerly the step runs as Python; with graphs each depth's step is
one CUDA graph replay (``eekernels.samplers.graphs``). Both run exactly the same code.
"""
from __future__ import annotations

import sys
import time
from typing import Callable

import torch

from eekernels.samplers.solvers import SOLVERS, Solver, SolverState, draw_noise, make_solver, split_output

EXIT_POLICIES = ("drop", "cache")


# ---- model introspection -------------------------------------------------------------------------------------------

def _attr(model, name: str):
    return getattr(model, name, None)


def _fingerprint(model) -> tuple:
    """Identity of a model's weights: a graph replays raw pointers, so re-created parameters need new graphs."""
    if isinstance(model, torch.nn.Module):
        return (id(model), hash(tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))))
    return (id(model),)


# ---- checks (all before any work on the device) ---------------------------------------------------------------------

def _check_inputs(model, noise, y, sampler, steps, cfg_scale, exit_policy) -> None:
    if sampler not in SOLVERS:
        raise ValueError(f"sampler: expected one of {sorted(SOLVERS)}, got {sampler!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() < 2:
        got = f"{noise.dtype} tensor of shape {tuple(noise.shape)}" if isinstance(noise, torch.Tensor) else type(noise)
        raise ValueError(f"noise: expected a floating tensor (B, C, ...), got {got}")
    in_ch = _attr(model, "in_channels")
    if in_ch is not None and noise.shape[1] != in_ch:
        raise ValueError(f"noise: expected {in_ch} channels (model.in_channels), got shape {tuple(noise.shape)}")
    if exit_policy not in EXIT_POLICIES:
        raise ValueError(f"exit_policy: expected one of {EXIT_POLICIES}, got {exit_policy!r}")
    num_classes = _attr(model, "num_classes")
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
            got = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y)
            raise ValueError(f"y: expected integer class labels of shape (B,), got {got}")
        if y.shape[0] != noise.shape[0]:
            raise ValueError(f"y: expected one label per sample, batch {noise.shape[0]} (noise), "
                             f"got {y.shape[0]} labels")
        if y.device != noise.device:
            raise ValueError(f"y: expected labels on the noise's device {noise.device}, got {y.device}")
    elif num_classes is not None and _attr(model, "null_class") is None:
        raise ValueError(f"y: the model is class-conditional ({num_classes} classes, no null class); "
                         "expected labels (B,), got None")
    if not isinstance(cfg_scale, (int, float)) or isinstance(cfg_scale, bool):
        raise ValueError(f"cfg_scale: expected a number, got {cfg_scale!r}")
    if cfg_scale != 1:
        if num_classes is None or _attr(model, "null_class") is None:
            raise ValueError(f"cfg_scale: {cfg_scale} != 1 needs a class-conditional model with a null class "
                             f"(model.num_classes={num_classes}, model.null_class={_attr(model, 'null_class')})")
        if y is None:
            raise ValueError("y: classifier-free guidance (cfg_scale != 1) needs class labels, got None")


def plan_depths(model, solver: Solver, schedule, exit_policy: str = "drop") -> list[int] | None:
    """The depth of every model call (host ints, computed once, ahead of the loop), or None without a schedule."""
    if schedule is None:
        if exit_policy == "cache":
            raise ValueError("exit_policy: 'cache' needs an exit schedule (e.g. ExitSchedule.periodic(k, depth)), "
                             "got schedule=None")
        return None
    num_blocks = _attr(model, "num_blocks")
    total = int(schedule.total_depth)
    if num_blocks is not None and total > num_blocks:
        raise ValueError(f"schedule: total_depth {total} is deeper than the model ({num_blocks} blocks)")
    full = num_blocks if num_blocks is not None else total
    # One transfer for the whole run: the plan is data for the host's replay choices, not a per-step sync.
    plan = [int(d) for d in torch.as_tensor(schedule.plan(solver.timesteps)).reshape(-1).cpu().tolist()]
    if len(plan) != solver.num_calls:
        raise ValueError(f"schedule: plan() gave {len(plan)} depths for {solver.num_calls} model calls")
    lo = int(_attr(model, "min_depth") or 1)  # e.g. U-ViT always runs its in_blocks and mid_block
    bad = [(k, d) for k, d in enumerate(plan) if not lo <= d <= full]
    if bad:
        k, d = bad[0]
        raise ValueError(f"schedule: depth {d} at call {k} (t={float(solver.timesteps[k]):g}) is outside "
                         f"[{lo}, {full}], the depths this model can run")
    if exit_policy == "cache":
        first_trunc = next((k for k, d in enumerate(plan) if d < full), None)
        first_full = next((k for k, d in enumerate(plan) if d == full), None)
        if first_trunc is not None and (first_full is None or first_full > first_trunc):
            raise ValueError(
                f"schedule: exit_policy='cache' needs a full-depth call ({full} blocks) before any truncated one, to "
                f"record what the skipped blocks add; this schedule runs depth {plan[first_trunc]} at call "
                f"{first_trunc} (t={float(solver.timesteps[first_trunc]):g}) first. Use a schedule that re-runs full "
                "depth periodically, e.g. ExitSchedule.periodic(k, depth)")
    return plan


# ---- CFG -------------------------------------------------------------------------------------------------------------

def guide(out: torch.Tensor, channels: int, scale: torch.Tensor | None, dtype: torch.dtype):
    """eps (B, C, ...) and variance channels (or None) from a model output; with ``scale`` (a 0-d tensor) the
    output is [cond; uncond] (2B, ...) and eps = eps_u + s * (eps_c - eps_u). As DiT, guidance applies to eps
    only: a learned-sigma model's variance channels come from the conditional half."""
    eps, var = split_output(out, channels)
    eps = eps.to(dtype)
    var = None if var is None else var.to(dtype)
    if scale is None:
        return eps, var
    B = eps.shape[0] // 2
    eps_c, eps_u = eps[:B], eps[B:]
    return eps_u + scale * (eps_c - eps_u), None if var is None else var[:B]


# ---- one trajectory's static buffers and its step ---------------------------------------------------------------

class Session:
    """Static buffers of a sampling run (sample, history, counter, labels, CFG scale, exit cache) and the step
    that a CUDA graph captures. Sessions are reused across ``sample()`` calls of the same shape, so that the
    graphs captured on their buffers are too."""

    def __init__(self, model, solver: Solver, noise: torch.Tensor, y: torch.Tensor | None, cfg: bool,
                 exit_depths: tuple[int, ...] | None):
        self.model, self.solver = model, solver
        self.in_dtype = noise.dtype
        self.batch = noise.shape[0]
        self.state: SolverState = solver.new_state(noise)
        dev = noise.device
        self.cfg = torch.ones((), dtype=self.state.x.dtype, device=dev) if cfg else None
        self.y = None
        if y is not None:
            n = 2 * self.batch if cfg else self.batch
            self.y = torch.empty(n, dtype=torch.int64, device=dev)
        self.exit_cache = None
        if exit_depths:
            from eekernels.models.cache import ExitCache

            self.exit_cache = ExitCache(exit_depths)

    def reset(self, noise: torch.Tensor, y: torch.Tensor | None, cfg_scale: float) -> None:
        """Start a new trajectory from ``noise`` (B, C, ...) in the same buffers (the inputs are not modified)."""
        st = self.state
        st.x.copy_(noise)
        st.x.mul_(self.solver.init_noise_sigma)
        st.counter.zero_()
        for buf in st.aux.values():
            buf.zero_()
        if self.y is not None:
            self.y[: self.batch].copy_(y)
            if self.cfg is not None:
                self.y[self.batch:].fill_(int(self.model.null_class))
        if self.cfg is not None:
            self.cfg.fill_(cfg_scale)

    def mutable(self) -> list[torch.Tensor]:
        """What a step writes: restored after a graph's warm-up so that capturing never advances the run."""
        out = self.state.mutable()
        if self.exit_cache is not None:
            out += [self.exit_cache.load(d) for d in self.exit_cache.depths if self.exit_cache.has(d)]
        return out

    def step(self, depth: int | None) -> None:
        """One whole step at ``depth``: model call, CFG combine, solver update, counter += 1. No host sync."""
        st, solver = self.state, self.solver
        row = st.row()
        x = st.x * solver.c(row, "c_in") if solver.scales_input else st.x
        x = x.to(self.in_dtype)
        if self.cfg is not None:
            x = torch.cat([x, x])
        t = solver.c(row, "t").expand(x.shape[0]).contiguous()
        kwargs = {}
        if depth is not None:
            kwargs["depth"] = depth
        if self.exit_cache is not None:
            kwargs["exit_cache"] = self.exit_cache
        out = self.model(x, t, self.y, **kwargs)
        if not isinstance(out, torch.Tensor) or out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)
            raise ValueError(f"model output: expected shape ({x.shape[0]}, C or 2C, {', '.join(map(str, x.shape[2:]))})"
                             f" for input {tuple(x.shape)}, got {got}")
        eps, var = guide(out, st.x.shape[1], self.cfg, st.x.dtype)
        solver.update(st, row, eps, var)
        st.counter.add_(1)


# ---- sample ---------------------------------------------------------------------------------------------------------

def sample(model: Callable, noise: torch.Tensor, y: torch.Tensor | None = None, *, sampler: str = "ddim",
           steps: int = 50, cfg_scale: float = 1.0, schedule=None, generator: torch.Generator | None = None,
           graphs: bool | None = None, progress: bool = False, exit_policy: str = "drop", graph_cache=None,
           **solver_options) -> torch.Tensor:
    """Sample from a diffusion model with any solver, CFG and early exit.

    Args:
        model: an eekernels model, or any callable ``model(x, t, y, depth=None)`` returning eps (B, C, ...) or,
            with learned sigma, (B, 2C, ...) whose first C channels are eps. ``t`` is a float tensor (B,).
        noise: (B, C, ...) standard normal starting noise (scaled by the solver's ``init_noise_sigma``).
        y: (B,) integer class labels, or None for an unconditional model.
        sampler: "ddpm", "ddim", "dpmsolver++", "euler" or "heun".
        steps: number of solver steps (Heun calls the model 2 * steps - 1 times).
        cfg_scale: classifier-free guidance scale; != 1 runs [cond; uncond] as one batch of 2B with the
            model's ``null_class`` as the unconditional label.
        schedule: an ``ExitSchedule``; each model call runs ``schedule.depth(t)`` blocks (planned ahead).
        generator: random generator for the stochastic solvers' noise (DDPM, DDIM with eta > 0).
        graphs: one CUDA graph per exit depth for a whole step (default: True on CUDA, False elsewhere).
        progress: show a tqdm bar and print images/s at the end.
        exit_policy: "drop" (ASE: skipped blocks contribute nothing) or "cache" (training-free: truncated
            calls add what the skipped blocks added at the last full-depth call; needs a schedule that
            re-runs full depth, e.g. ``ExitSchedule.periodic``).
        graph_cache: the ``eekernels.graphs.GraphCache`` to use (default: the process-wide one).
        **solver_options: diffusers' scheduler arguments, e.g. ``eta``, ``timestep_spacing``, ``solver_order``.

    Returns:
        (B, C, ...) samples in ``noise.dtype``. The solver state is kept in float32 (float64 for float64 noise).
    """
    _check_inputs(model, noise, y, sampler, steps, cfg_scale, exit_policy)
    solver = make_solver(sampler, steps, **solver_options)
    if solver_options.get("variance_type") == "learned_range" and _attr(model, "learn_sigma") is False:
        raise ValueError("variance_type: 'learned_range' needs a learned-sigma model (2C output channels); "
                         "this model has learn_sigma=False")
    plan = plan_depths(model, solver, schedule, exit_policy)
    cfg = cfg_scale != 1
    exit_depths = None
    if exit_policy == "cache" and plan is not None:
        full = max(plan) if _attr(model, "num_blocks") is None else int(model.num_blocks)
        exit_depths = tuple(sorted({d for d in plan if d < full}))

    cache = None
    if graphs is None:
        graphs = noise.is_cuda
    if graphs:
        from eekernels.graphs import default_cache

        cache = graph_cache if graph_cache is not None else default_cache()
        if not cache.supports(noise.device):
            raise ValueError(f"graphs: CUDA graphs need CUDA tensors, got noise on {noise.device}; "
                             "pass graphs=False (the default off CUDA)")

    with torch.no_grad():
        if cache is not None:
            from eekernels.samplers.graphs import StepGraphs

            key = ("sample", _fingerprint(model), solver.signature(), tuple(noise.shape), noise.dtype,
                   str(noise.device), y is not None, cfg, exit_depths)
            session = cache.owner(key)
            if session is None:
                session = Session(model, solver, noise, y, cfg, exit_depths)
            run_step = StepGraphs(cache, key, session)
        else:
            session = Session(model, solver, noise, y, cfg, exit_depths)
            run_step = session.step
        session.reset(noise, y, cfg_scale)
        _loop(session, run_step, plan, generator, progress, noise.shape[0])
        return session.state.x.to(dtype=noise.dtype, copy=True)


def _loop(session: Session, run_step, plan, generator, progress: bool, batch: int) -> None:
    solver, st = session.solver, session.state
    calls = range(solver.num_calls)
    if progress:
        from tqdm.auto import tqdm

        calls = tqdm(calls, desc=f"{solver.name} x{batch}", unit="call")
    start = time.perf_counter()
    for k in calls:
        if solver.noise_at[k]:  # host-known ahead: which calls add fresh noise
            draw_noise(st.noise, generator)
        run_step(None if plan is None else plan[k])
    elapsed = time.perf_counter() - start
    if progress or elapsed > 20.0:  # long runs report their throughput once, at the end
        if st.x.is_cuda:
            torch.cuda.synchronize(st.x.device)
        elapsed = time.perf_counter() - start
        print(f"eekernels.sample: {batch} images in {elapsed:.2f} s ({batch / elapsed:.2f} images/s, "
              f"{solver.name}, {solver.num_calls} model calls)", file=sys.stderr)
