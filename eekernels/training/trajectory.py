"""Fine-tuning through a whole sampling run: ``rollout`` is ``sample()`` with gradients, and
``trajectory_loss`` compares a student's run under an exit plan with a teacher's samples from the same noise.

The per-timestep losses of ``eekernels.training.loss`` train each call's truncated output on its own, at x_t
drawn from the data. At a solver's knee (a few calls, e.g. DPM-Solver++ at 5 steps) the calls of a plan are few
and far apart, and what matters is where the whole run lands: an error at the first call moves every later input.
``rollout`` runs the solver exactly as ``sample()`` does (same checks, same solver table, same CFG rule, each
call at the plan's depth) but keeps the autograd graph, so a loss on the final sample trains every call of the
plan for the inputs that the plan itself produces. The state buffers ``sample()`` updates in place are replaced
by fresh ones before each call, and with gradients on ``Session.step`` hands the model a copy of the state, so the
in-place solver updates never overwrite a tensor that autograd saved.

Only the "drop" stand-ins run here (what fine-tuning is for): the skipped blocks contribute nothing, and a plan's
``uncond`` "drop" calls run CFG's conditional half alone and take its output as the guided one, so a loss on the
final sample teaches the student to give the guided output in one pass (guidance distillation). The reuse
policies' caches and the unconditional branch's "forecast" keep state in fixed buffers across calls, which a
gradient would have to flow through; those are refused by name.
"""
from __future__ import annotations

import torch

from eekernels.models.condition import TextCondition
from eekernels.samplers.sampling import (Session, _check_inputs, _input_dtype, _is_text_model, check_uncond_plan,
                                         full_condition, plan_depths, resolve_plan, solver_for)
from eekernels.samplers.solvers import draw_noise


def _named(schedule) -> str:
    name = getattr(schedule, "name", None)
    return f" {name!r}" if name else ""


def rollout(model, noise: torch.Tensor, y=None, *, sampler: str | None = None, steps: int | None = None,
            cfg_scale: float = 1.0, schedule=None, generator: torch.Generator | None = None,
            cfg_channels: int | None = None, negative: TextCondition | None = None,
            **solver_options) -> torch.Tensor:
    """``sample(model, noise, y, ...)`` with the autograd graph kept: the final samples (B, C, ...) in
    ``noise.dtype``, differentiable with respect to the model's parameters (and ``noise``, where it requires
    grad). Equal to ``sample()`` with the same arguments (eager, ``exit_policy="drop"``).

    Arguments as ``sample()``; ``schedule`` is an ``ExitSchedule`` whose plan gives each call's depth (a joint plan
    also fixes ``sampler`` and ``steps``). Refused by name, before any model call: a schedule with reuse policies
    ("cache" / "forecast") or an ``uncond`` "forecast", and everything ``sample()`` refuses. ``uncond`` "drop"
    calls run the conditional half alone, as ``sample()`` does. Memory grows with the
    number of calls: every call's activations are kept for the backward pass.
    """
    sampler, steps, exit_policy, _ = resolve_plan(schedule, sampler, steps, None)
    if exit_policy != "drop":
        raise ValueError(f"schedule: rollout runs the 'drop' stand-in only (the reuse policies keep their caches in "
                         f"fixed buffers a gradient cannot flow through); the schedule{_named(schedule)} plans "
                         f"{exit_policy!r} calls")
    _check_inputs(model, noise, y, sampler, steps, cfg_scale, exit_policy, schedule, generator, cfg_channels,
                  negative)
    solver = solver_for(model, sampler, steps, **solver_options)
    plan = plan_depths(model, solver, schedule, exit_policy)
    cfg = cfg_scale != 1
    modes = check_uncond_plan(schedule, solver, cfg)
    if modes is not None and "forecast" in modes:
        raise ValueError(f"schedule: rollout runs or drops CFG's unconditional half; the schedule{_named(schedule)} "
                         f"forecasts it at some calls (ExitSchedule.uncond 'forecast', a cache across calls); pass a "
                         f"schedule whose `uncond` holds 'run' and 'drop' only")
    full = None
    if isinstance(y, TextCondition) or _is_text_model(model):
        full = full_condition(model, y, negative, cfg, noise.shape[0], noise.device)
    session = Session(model, solver, noise, full if full is not None else y, cfg, None,
                      cfg_channels=cfg_channels if cfg else None, in_dtype=_input_dtype(model, noise))
    with torch.no_grad():
        session.reset(noise, y, cfg_scale, full=full)
    st = session.state
    if noise.requires_grad:  # the start, differentiable too: x = noise * init_noise_sigma, as reset() writes it
        st.x = noise.to(st.x.dtype) * solver.init_noise_sigma
    for k in range(solver.num_calls):
        # fresh buffers for this call's in-place update: what autograd saved at earlier calls stays intact
        st.x = st.x.clone()
        st.aux = {name: buf.clone() for name, buf in st.aux.items()}
        if solver.noise_at[k]:
            st.noise = torch.empty_like(st.noise)
            draw_noise(st.noise, generator)
        session.step(None if plan is None else plan[k], "run" if modes is None else modes[k])
    return st.x.to(noise.dtype)


def trajectory_loss(student, target: torch.Tensor, noise: torch.Tensor, y=None, **sample_args) -> torch.Tensor:
    """The mean squared error between ``rollout(student, noise, y, **sample_args)`` and ``target`` (B, C, ...):
    a teacher's final samples from the same noise and condition, e.g. ``sample(teacher, noise, y, ...)`` at full
    depth. A 0-d tensor to call ``backward()`` on."""
    if not isinstance(noise, torch.Tensor):
        raise ValueError(f"noise: expected a (B, C, ...) tensor, got {type(noise).__name__}")
    if not isinstance(target, torch.Tensor) or target.shape != noise.shape:
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target: expected the teacher's samples, a tensor shaped like noise {tuple(noise.shape)}, "
                         f"got {got}")
    x = rollout(student, noise, y, **sample_args)
    return (x - target.to(x.dtype)).pow(2).mean()
