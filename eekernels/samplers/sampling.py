"""``sample()``: any solver, classifier-free guidance, early exit, and (on CUDA) one graph per exit depth.

A sampling run is a sequence of identical *steps* on static buffers (``Session``): read the table row at the
device-side step counter, call the model at the depth planned for that call, combine the CFG halves, update
the sample in place, increment the counter. The step -> depth plan is computed once, before the loop, from the
exit schedule, so no step waits on the host. Eagerly the step runs as Python; with graphs each depth's step is
one CUDA graph replay (``eekernels.samplers.graphs``). Both run exactly the same code.
"""
from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from typing import Callable

import torch

from eekernels.models.cache import FORECAST_TARGETS
from eekernels.models.condition import TextCondition, check_text_condition, check_values
from eekernels.models.scaffold import min_depth_of
from eekernels.samplers.solvers import SOLVERS, Solver, SolverState, draw_noise, make_solver, split_output

EXIT_POLICIES = ("drop", "cache", "forecast")
REUSES = ("cache", "forecast")  # policies that record what the skipped blocks add at full-depth calls
logger = logging.getLogger("eekernels")


class NonFiniteSampleWarning(RuntimeWarning):
    """``sample()`` returned samples with NaN or Inf values (e.g. a checkpoint with NaN weights, or overflow in
    float16). ``warnings.simplefilter("error", NonFiniteSampleWarning)`` turns it into an error."""


# ---- model introspection -------------------------------------------------------------------------------------------

def _attr(model, name: str):
    return getattr(model, name, None)


def _fingerprint(model) -> tuple:
    """Identity of a model's weights: a graph replays raw pointers, so re-created parameters need new graphs."""
    if isinstance(model, torch.nn.Module):
        return (id(model), hash(tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))))
    return (id(model),)


def _input_dtype(model, noise: torch.Tensor) -> torch.dtype:
    """What each model call gets x in: the dtype of a module's first floating parameter, else noise.dtype."""
    if isinstance(model, torch.nn.Module):
        p = next((p for p in model.parameters() if p.is_floating_point()), None)
        if p is not None:
            return p.dtype
    return noise.dtype


def model_solver_options(model, sampler: str, options: dict) -> dict:
    """``options`` with the solver defaults ``model`` declares filled in where the caller gave none: a flow
    model's unshifted sigma grid ``model.sigma_grid`` (FLUX: "flux", BFL's ``get_schedule`` grid) for a solver
    that takes ``sigma_grid``, unless the caller passes ``sigma_grid`` or ``sigmas``. ``sample()`` and
    ``calibrate()`` both build their solver from these options, so a model samples and calibrates on one grid."""
    out = dict(options)
    cls = SOLVERS.get(sampler)
    grid = _attr(model, "sigma_grid")
    takes = cls is not None and "sigma_grid" in {**cls.COMMON, **cls.OPTIONS}
    if grid is not None and takes and "sigma_grid" not in out and out.get("sigmas") is None:
        out["sigma_grid"] = grid
    return out


# ---- checks (all before any work on the device) ---------------------------------------------------------------------

def _is_text_model(model) -> bool:
    return _attr(model, "condition") == "text"


def check_condition(model, y, batch: int, device, *, name: str = "y", values: bool = False) -> TextCondition:
    """``y`` checked as the text condition of ``model`` for ``batch`` samples on ``device`` (named errors, before
    any model call); returns it with a bool mask. A model that declares ``token_dim`` / ``pooled_dim`` /
    ``condition_extras`` is checked against them; any other callable against the condition's own widths.
    ``values``: also refuse non-finite tensors and mask values other than 0/1 (one host read)."""
    if not isinstance(y, TextCondition):
        raise ValueError(f"{name}: expected an eekernels.TextCondition (caption tokens, mask, pooled, extra) for "
                         f"this text-conditioned model, got {type(y).__name__}")
    declares = _is_text_model(model) and _attr(model, "token_dim") is not None
    tok = y.tokens
    if not isinstance(tok, torch.Tensor) or tok.dim() != 3:
        got = tuple(tok.shape) if isinstance(tok, torch.Tensor) else type(tok).__name__
        raise ValueError(f"{name}.tokens: expected a (B, L, D) tensor, got {got}")
    token_dim = int(model.token_dim) if declares else tok.shape[2]
    if declares:
        pooled_dim, extras = _attr(model, "pooled_dim"), dict(_attr(model, "condition_extras") or {})
    else:
        pooled_dim = None if y.pooled is None else (y.pooled.shape[-1] if isinstance(y.pooled, torch.Tensor) else -1)
        extras = {k: tuple(v.shape[1:]) if isinstance(v, torch.Tensor) else () for k, v in y.extra.items()}
    try:
        return check_text_condition("sample", y, batch=batch, token_dim=token_dim, device=device,
                                    pooled_dim=pooled_dim, extras=extras, values=values)
    except ValueError as e:
        msg = str(e)
        if name != "y":  # say which condition: `negative.tokens` rather than `y.tokens`
            msg = msg.replace("`y.", f"`{name}.").replace("`y`", f"`{name}`")
        raise ValueError(msg) from None


def resolve_negative(model, y: TextCondition, negative) -> TextCondition:
    """The unconditional half of a text CFG batch: ``negative`` checked against ``y`` (same batch, length, fields,
    dtypes and device), or, when None, ``model.null_condition(batch, length)`` (PixArt's learned null caption).
    A model without one (SD3, FLUX) gets a ValueError saying to pass ``negative``."""
    B, L = y.batch, y.length
    if negative is None:
        make = _attr(model, "null_condition")
        if not callable(make):
            raise ValueError(f"negative: classifier-free guidance (cfg_scale != 1) with a text condition expected "
                             f"negative=TextCondition(...) (the negative-prompt embeddings, ({B}, {L}, D) tokens): "
                             f"{type(model).__name__} has no null_condition(), got negative=None")
        try:
            negative = make(B, L, device=y.tokens.device, dtype=y.tokens.dtype)
        except ValueError as e:
            raise ValueError(f"negative: classifier-free guidance (cfg_scale != 1) with this model expected "
                             f"negative=TextCondition(...) (the negative-prompt embeddings, ({B}, {L}, D) tokens), "
                             f"got None and the model has no null condition ({e})") from None
        negative = check_condition(model, negative, B, y.tokens.device, name="model.null_condition()")
    else:
        negative = check_condition(model, negative, B, y.tokens.device, name="negative")
    if negative.length != L:
        raise ValueError(f"negative.tokens: expected the caption length of y ({L} tokens; pad both to one length), "
                         f"got {negative.length}")
    if (negative.pooled is None) != (y.pooled is None) or set(negative.extra) != set(y.extra):
        raise ValueError(f"negative: expected the same fields as y (pooled: {y.pooled is not None}, extra: "
                         f"{sorted(y.extra)}), got pooled: {negative.pooled is not None}, extra: {sorted(negative.extra)}")
    for key, v in y.tensors().items():
        w = negative.tensors().get(key)
        if w is not None and key != "mask" and w.dtype != v.dtype:
            raise ValueError(f"negative.{key}: expected dtype {v.dtype} (as y.{key}), got {w.dtype}")
    return negative


def full_condition(model, y: TextCondition, negative, cfg: bool, batch: int, device) -> TextCondition:
    """The checked text condition of a model call's whole batch: ``[y; negative]`` (2B rows) with CFG
    (``resolve_negative``), else ``y``."""
    y = check_condition(model, y, batch, device)
    return y.cat(resolve_negative(model, y, negative)) if cfg else y


def _check_inputs(model, noise, y, sampler, steps, cfg_scale, exit_policy, schedule=None, generator=None,
                  cfg_channels=None, negative=None) -> None:
    if sampler not in SOLVERS:
        raise ValueError(f"sampler: expected one of {sorted(SOLVERS)}, got {sampler!r}")
    want = _attr(model, "prediction")
    have = SOLVERS[sampler].prediction
    if want is not None and want != have:
        flow = sorted(k for k, c in SOLVERS.items() if c.prediction == "flow")
        other = sorted(k for k, c in SOLVERS.items() if c.prediction == want)
        raise ValueError(f"sampler: {sampler!r} expects a model predicting {have!r}, but "
                         f"{type(model).__name__}.prediction is {want!r}; use one of {other or flow}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() < 2:
        got = f"{noise.dtype} tensor of shape {tuple(noise.shape)}" if isinstance(noise, torch.Tensor) else type(noise)
        raise ValueError(f"noise: expected a floating tensor (B, C, ...), got {got}")
    if noise.shape[0] == 0:
        raise ValueError(f"noise: expected a batch of at least one sample, got shape {tuple(noise.shape)}")
    in_ch = _attr(model, "in_channels")
    if in_ch is not None and noise.shape[1] != in_ch:
        raise ValueError(f"noise: expected {in_ch} channels (model.in_channels), got shape {tuple(noise.shape)}")
    size, multiple, fixed = _attr(model, "input_size"), _attr(model, "input_multiple"), _attr(model, "fixed_size")
    if noise.dim() == 4 and fixed is True and size and noise.shape[2:] != (size, size):
        raise ValueError(f"noise: expected spatial size {size} x {size} (model.input_size), got shape "
                         f"{tuple(noise.shape)}")
    if noise.dim() == 4 and fixed is False and multiple and any(v % multiple for v in noise.shape[2:]):
        raise ValueError(f"noise: expected H and W divisible by {multiple} (model.input_multiple), got shape "
                         f"{tuple(noise.shape)}")
    check_values("sample", {"noise": (noise, "finite")})  # one reduction, one host read
    if exit_policy not in EXIT_POLICIES:
        raise ValueError(f"exit_policy: expected one of {EXIT_POLICIES}, got {exit_policy!r}")
    if isinstance(schedule, (list, tuple, str)):
        raise TypeError(f"schedule: expected an ExitSchedule (or None), got {type(schedule).__name__} {schedule!r}; "
                        "build one with ExitSchedule.piecewise([...]) or ExitSchedule.preset(name)")
    if schedule is not None and not callable(getattr(schedule, "plan", None)):
        raise TypeError(f"schedule: expected an ExitSchedule (with .plan(timesteps)) or None, "
                        f"got {type(schedule).__name__}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__} "
                            f"{generator!r} (e.g. torch.Generator().manual_seed(seed))")
        gdev = torch.device(generator.device)
        if gdev.type != "cpu" and gdev != noise.device:
            raise ValueError(f"generator: expected a CPU generator or one on the noise's device {noise.device}, "
                             f"got one on {gdev}")
    if not isinstance(cfg_scale, (int, float)) or isinstance(cfg_scale, bool):
        raise ValueError(f"cfg_scale: expected a number, got {cfg_scale!r}")
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale: expected a finite number, got {cfg_scale!r}")
    text = _is_text_model(model) or isinstance(y, TextCondition)
    if text:
        if _attr(model, "condition") not in (None, "text"):
            raise ValueError(f"y: expected class labels (B,) or None for this {model.condition}-conditioned model, "
                             "got a TextCondition")
        if y is None:
            raise ValueError("y: expected an eekernels.TextCondition (caption tokens and mask) for this "
                             "text-conditioned model, got None")
        y = check_condition(model, y, noise.shape[0], noise.device, values=True)
        if negative is not None:
            check_condition(model, negative, noise.shape[0], noise.device, name="negative", values=True)
        if cfg_scale != 1:
            resolve_negative(model, y, negative)
        _check_cfg_channels(cfg_channels, noise)
        return
    if negative is not None:
        raise ValueError(f"negative: expected None for class labels (CFG uses the model's null class), got "
                         f"{type(negative).__name__}; negative= is for TextCondition inputs")
    num_classes, null_class = _attr(model, "num_classes"), _attr(model, "null_class")
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
            got = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y)
            raise ValueError(f"y: expected integer class labels of shape (B,), got {got}")
        if y.shape[0] != noise.shape[0]:
            raise ValueError(f"y: expected one label per sample, batch {noise.shape[0]} (noise), "
                             f"got {y.shape[0]} labels")
        if y.device != noise.device:
            raise ValueError(f"y: expected labels on the noise's device {noise.device}, got {y.device}")
        if num_classes is not None:
            # One host read per sample() call: an out-of-range label would be a device-side assert on a GPU.
            bad = y[(y < 0) | (y >= num_classes)]
            if null_class is not None:
                bad = bad[bad != null_class]
            if bad.numel():
                also = f" or the null class {null_class} (unconditional)" if null_class is not None else ""
                raise ValueError(f"y: expected labels in [0, {num_classes}){also}, got {int(bad[0])}")
    elif num_classes is not None and null_class is None:
        raise ValueError(f"y: the model is class-conditional ({num_classes} classes, no null class); "
                         "expected labels (B,), got None")
    _check_cfg_channels(cfg_channels, noise)
    if cfg_scale != 1:
        if num_classes is None or null_class is None:
            raise ValueError(f"cfg_scale: {cfg_scale} != 1 needs a class-conditional model with a null class "
                             f"(model.num_classes={num_classes}, model.null_class={null_class})")
        if y is None:
            raise ValueError("y: classifier-free guidance (cfg_scale != 1) needs class labels, got None")


def _check_cfg_channels(cfg_channels, noise) -> None:
    if cfg_channels is not None:
        C = noise.shape[1]
        if isinstance(cfg_channels, bool) or not isinstance(cfg_channels, int):
            raise TypeError(f"cfg_channels: expected None or an int in [1, {C}], got {cfg_channels!r}")
        if not 1 <= cfg_channels <= C:
            raise ValueError(f"cfg_channels: expected None or an int in [1, {C}] (the noise's channels), "
                             f"got {cfg_channels}")


def plan_depths(model, solver: Solver, schedule, exit_policy: str = "drop") -> list[int] | None:
    """The depth of every model call (host ints, computed once, ahead of the loop), or None without a schedule."""
    if schedule is None:
        if exit_policy in REUSES:
            raise ValueError(f"exit_policy: {exit_policy!r} needs an exit schedule (e.g. ExitSchedule.periodic(k, "
                             "depth)), got schedule=None")
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
    # e.g. U-ViT always runs its in_blocks and mid_block; depth 0 (no block) only under a reuse policy
    lo = min_depth_of(model, reuse=exit_policy in REUSES)
    bad = [(k, d) for k, d in enumerate(plan) if not lo <= d <= full]
    if bad:
        k, d = bad[0]
        why = ("; depth 0 runs no block: only with exit_policy 'cache' or 'forecast' (the whole stack's part re-added "
               f"or extrapolated), got exit_policy={exit_policy!r}" if d == 0 and min_depth_of(model, reuse=True) == 0
               else "")
        raise ValueError(f"schedule: depth {d} at call {k} (t={float(solver.timesteps[k]):g}) is outside "
                         f"[{lo}, {full}], the depths this model can run{why}")
    if exit_policy in REUSES:
        first_trunc = next((k for k, d in enumerate(plan) if d < full), None)
        first_full = next((k for k, d in enumerate(plan) if d == full), None)
        if first_trunc is not None and (first_full is None or first_full > first_trunc):
            raise ValueError(
                f"schedule: exit_policy={exit_policy!r} needs a full-depth call ({full} blocks) before any truncated one, to "
                f"record what the skipped blocks add; this schedule runs depth {plan[first_trunc]} at call "
                f"{first_trunc} (t={float(solver.timesteps[first_trunc]):g}) first. Use a schedule that re-runs full "
                "depth periodically, e.g. ExitSchedule.periodic(k, depth)")
    return plan


# ---- CFG -------------------------------------------------------------------------------------------------------------

def guide(out: torch.Tensor, channels: int, scale: torch.Tensor | None, dtype: torch.dtype,
          cfg_channels: int | None = None):
    """eps (B, C, ...) and variance channels (or None) from a model output; with ``scale`` (a 0-d tensor) the
    output is [cond; uncond] (2B, ...) and eps = eps_u + s * (eps_c - eps_u).

    Guidance never touches a learned-sigma model's variance channels: they come from the conditional half.
    ``cfg_channels=None`` guides all C eps channels (diffusers' ``DiTPipeline``, the standard rule);
    ``cfg_channels=k`` guides only the first k and takes the other eps channels from the conditional half,
    which with k = 3 is exactly DiT's ``forward_with_cfg`` (``model_out[:, :3]``, kept "for exact
    reproducibility" of its released samples)."""
    eps, var = split_output(out, channels)
    eps = eps.to(dtype)
    var = None if var is None else var.to(dtype)
    if scale is None:
        return eps, var
    B = eps.shape[0] // 2
    eps_c, eps_u = eps[:B], eps[B:]
    var = None if var is None else var[:B]
    if cfg_channels is None or cfg_channels >= channels:
        return eps_u + scale * (eps_c - eps_u), var
    k = cfg_channels
    guided = eps_u[:, :k] + scale * (eps_c[:, :k] - eps_u[:, :k])
    return torch.cat([guided, eps_c[:, k:]], 1), var


# ---- one trajectory's static buffers and its step ---------------------------------------------------------------

class Session:
    """Static buffers of a sampling run (sample, history, counter, condition, CFG scale, exit cache) and the step
    that a CUDA graph captures. Sessions are reused across ``sample()`` calls of the same shape, so that the
    graphs captured on their buffers are too.

    ``y``: (B,) labels, a ``TextCondition`` (its shapes and dtypes: one static buffer per tensor, [cond; uncond]
    with CFG, refilled by ``reset``, so graphs replay with new captions) or None."""

    def __init__(self, model, solver: Solver, noise: torch.Tensor, y, cfg: bool,
                 exit_depths: tuple[int, ...] | None, *, cfg_channels: int | None = None,
                 in_dtype: torch.dtype | None = None, forecast_order: int | None = None,
                 forecast_target: str = "residual", guidance_order: int | None = None):
        self.model, self.solver = model, solver
        self.in_dtype = noise.dtype if in_dtype is None else in_dtype
        self.cfg_channels = cfg_channels
        self.batch = noise.shape[0]
        self.state: SolverState = solver.new_state(noise)
        dev = noise.device
        self.cfg = torch.ones((), dtype=self.state.x.dtype, device=dev) if cfg else None
        self.y = None
        n = 2 * self.batch if cfg else self.batch
        if isinstance(y, TextCondition):
            # One buffer per tensor, (n, ...) with y's trailing shapes and dtypes (a bool mask). ``y`` may be the
            # B-row condition or the whole [cond; uncond] batch (``full_condition``): a mask on either half
            # means a mask buffer.
            self.y = y.map(lambda v: torch.empty((n, *v.shape[1:]), dtype=v.dtype, device=v.device))
            if self.y.mask is not None:
                self.y.mask = torch.empty(self.y.mask.shape, dtype=torch.bool, device=dev)
        elif y is not None:
            self.y = torch.empty(n, dtype=torch.int64, device=dev)
        self.exit_cache = None
        if exit_depths:
            from eekernels.models.cache import ExitCache, ForecastCache

            self.exit_cache = (ExitCache(exit_depths) if forecast_order is None
                               else ForecastCache(exit_depths, order=forecast_order, target=forecast_target))
        # A plan that forecasts CFG's unconditional branch (``ExitSchedule.uncond``) keeps the guidance difference
        # eps_c - eps_u of the last calls that ran both halves, one fixed buffer extrapolated in t as an exit forecast.
        self.guidance = None
        if guidance_order is not None:
            from eekernels.models.cache import ForecastCache

            self.guidance = ForecastCache((0,), order=guidance_order)

    @property
    def text(self) -> bool:
        return isinstance(self.y, TextCondition)

    def reset(self, noise: torch.Tensor, y, cfg_scale: float, negative: TextCondition | None = None, *,
              full: TextCondition | None = None) -> None:
        """Start a new trajectory from ``noise`` (B, C, ...) in the same buffers (the inputs are not modified).

        Text conditions: ``y`` (and with CFG the unconditional half: ``negative``, or the model's
        ``null_condition`` when None) are copied into the static buffers; a None mask copies as all ones.
        ``full``: the already checked whole batch (``full_condition``), copied as it is."""
        st = self.state
        st.x.copy_(noise)
        st.x.mul_(self.solver.init_noise_sigma)
        st.counter.zero_()
        for buf in st.aux.values():
            buf.zero_()
        if self.text:
            y = full if full is not None else full_condition(self.model, y, negative, self.cfg is not None,
                                                             self.batch, st.x.device)
            if y.mask is None and self.y.mask is not None:
                y = TextCondition(y.tokens, torch.ones(y.tokens.shape[:2], dtype=torch.bool, device=y.tokens.device),
                                  y.pooled, y.extra)
            src, dst = y.tensors(), self.y.tensors()
            if set(src) != set(dst) or any(src[k].shape != dst[k].shape for k in dst):
                raise ValueError(f"y: expected a condition with the session's fields and shapes "
                                 f"{ {k: tuple(v.shape) for k, v in dst.items()} }, got "
                                 f"{ {k: tuple(v.shape) for k, v in src.items()} }")
            for k, buf in dst.items():
                buf.copy_(src[k])
        elif self.y is not None:
            self.y[: self.batch].copy_(y)
            if self.cfg is not None:
                self.y[self.batch:].fill_(int(self.model.null_class))
        if self.cfg is not None:
            self.cfg.fill_(cfg_scale)

    def mutable(self) -> list[torch.Tensor]:
        """What a step writes: restored after a graph's warm-up so that capturing never advances the run."""
        out = self.state.mutable()
        if self.exit_cache is not None:
            out += self.exit_cache.buffers()
        if self.guidance is not None:
            out += self.guidance.buffers()
        return out

    def step(self, depth: int | None, uncond: str = "run") -> None:
        """One whole step at ``depth``: model call, CFG combine, solver update, counter += 1. No host sync.

        ``uncond`` (a plan's ``ExitSchedule.uncond``, with CFG): "run" both halves; "forecast": only the conditional
        half runs, at full depth and outside the exit cache, and the unconditional eps is the conditional one minus
        the guidance difference extrapolated from the calls that ran both halves (``self.guidance``); "drop": only
        the conditional half runs, at ``depth`` and outside the exit cache, and its output is the guided one."""
        st, solver = self.state, self.solver
        row = st.row()
        x = st.x * solver.c(row, "c_in") if solver.scales_input else st.x
        x = x.to(self.in_dtype)
        if x is st.x and torch.is_grad_enabled():  # a differentiable run (rollout): the update below writes st.x
            x = x.clone()                           # in place, and autograd keeps the model's input
        half = self.cfg is not None and uncond != "run"
        if self.cfg is not None and not half:
            x = torch.cat([x, x])
        t = solver.c(row, "t").expand(x.shape[0]).contiguous()
        y = self.y
        if half:
            y = None if y is None else y.index(slice(0, self.batch)) if self.text else y[: self.batch]
        kwargs = {}
        if depth is not None and uncond != "forecast":  # a forecast call runs every block
            kwargs["depth"] = depth
        if self.exit_cache is not None and not half:  # the cache holds the whole batch
            kwargs["exit_cache"] = self.exit_cache
        out = self.model(x, t, y, **kwargs)
        if not isinstance(out, torch.Tensor) or out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)
            raise ValueError(f"model output: expected shape ({x.shape[0]}, C or 2C, {', '.join(map(str, x.shape[2:]))})"
                             f" for input {tuple(x.shape)}, got {got}")
        if self.guidance is not None and uncond != "drop":
            C = st.x.shape[1]
            if half:  # the [cond; uncond] output the guidance rule expects, its uncond eps forecast
                eps_c, var_c = split_output(out, C)
                eps_u = eps_c - self.guidance.load(0).to(eps_c.dtype)
                out = torch.cat([out, eps_u if var_c is None else torch.cat([eps_u, var_c], 1)])
            else:
                eps = split_output(out, C)[0]
                self.guidance.store(0, eps[: self.batch] - eps[self.batch:])
        # a dropped unconditional branch: the conditional output is the guided one (as at cfg_scale 1)
        scale = None if uncond == "drop" else self.cfg
        eps, var = guide(out, st.x.shape[1], scale, st.x.dtype, None if scale is None else self.cfg_channels)
        solver.update(st, row, eps, var)
        st.counter.add_(1)


# ---- sample ---------------------------------------------------------------------------------------------------------

def resolve_plan(schedule, sampler, steps, exit_policy, defaults: tuple = ("ddim", 50)) -> tuple:
    """``(sampler, steps, exit_policy, mixed)`` of a run: a joint plan's schedule (``ExitSchedule.steps``,
    ``.sampler``, ``.policies``) fills in what the caller left None and refuses what contradicts it (its depths and
    policies are per call of that solver run); otherwise ``defaults`` (sampler, steps) and "drop". ``mixed``: the
    plan gives its calls different policies (run on a ``ForecastCache`` whose weights each call sets; its
    ``exit_policy`` is then "forecast", the reuse kind that records the full calls)."""
    for name, given, default in (("steps", steps, defaults[1]), ("sampler", sampler, defaults[0])):
        planned = getattr(schedule, name, None)
        if given is not None and planned is not None and given != planned:
            raise ValueError(f"{name}: the schedule {getattr(schedule, 'name', '')!r} is a plan for {name} {planned!r} "
                             f"(its depths and policies are per call of that run); expected None or {planned!r}, "
                             f"got {given!r}")
        if name == "steps":
            steps = given if given is not None else planned if planned is not None else default
        else:
            sampler = given if given is not None else planned if planned is not None else default
    kinds = sorted(set(getattr(schedule, "policies", None) or ()))
    if not kinds:
        return sampler, steps, "drop" if exit_policy is None else exit_policy, False
    if exit_policy is not None and kinds != [exit_policy]:
        raise ValueError(f"exit_policy: the schedule {getattr(schedule, 'name', '')!r} gives its calls the policies "
                         f"{kinds}; expected None (the plan's own){f' or {kinds[0]!r}' if len(kinds) == 1 else ''}, "
                         f"got {exit_policy!r}")
    if len(kinds) == 1:
        return sampler, steps, kinds[0], False
    return sampler, steps, "forecast", True


def _plan_field(schedule, name: str, given, valid, default, what: str, where: str):
    """A run's ``name`` (a joint plan's forecast setting): the caller's (one of ``valid``), else the schedule's own
    (``ExitSchedule.<name>``, the plan was chosen with it), else ``default``; a caller's value that contradicts the
    schedule's is refused. ``what`` says what the valid values mean, for the error."""
    if given is not None and (isinstance(given, bool) or given not in valid):
        raise ValueError(f"{where} expected {what} or None (the schedule's own, else {default!r}), got {given!r}")
    planned = getattr(schedule, name, None)
    if given is not None and planned is not None and given != planned:
        raise ValueError(f"{where} expected None or {planned!r} (the schedule {getattr(schedule, 'name', '')!r} is a "
                         f"plan chosen with {name.replace('_', ' ')} {planned!r}), got {given!r}")
    return given if given is not None else planned if planned is not None else default


def check_uncond_plan(schedule, solver: Solver, cfg: bool, plan=None, full_depth=None,
                      exit_policy: str = "drop") -> list[str] | None:
    """Per call, what the plan does with CFG's unconditional branch (``ExitSchedule.uncond_modes``: "run",
    "forecast" or "drop"), or None where it runs it at every call. Such a plan needs CFG; a "forecast" call needs an
    earlier call that ran both halves (the guidance difference is extrapolated from such calls); a "drop" call
    below full depth (``plan``, ``full_depth``) runs outside the exit cache, so only with the "drop" exit policy.
    Named ValueError otherwise, before any model call."""
    modes = None if schedule is None or not hasattr(schedule, "uncond_modes") else schedule.uncond_modes(
        solver.timesteps)
    if modes is None:
        return None
    name = getattr(schedule, "name", "")
    if not cfg:
        what = "forecasts" if "forecast" in modes else "drops"
        raise ValueError(f"cfg_scale: the schedule {name!r} {what} classifier-free guidance's unconditional branch at "
                         "some calls (`uncond`); expected cfg_scale != 1, got 1")
    first = modes.index("forecast") if "forecast" in modes else None
    if first is not None and "run" not in modes[:first]:
        raise ValueError(f"schedule: {name!r} forecasts the unconditional branch at model call {first} "
                         f"(t={float(solver.timesteps[first]):g}) before any call runs both CFG halves; expected a "
                         "plan that runs both halves first (the guidance difference is extrapolated from such calls)")
    if exit_policy != "drop" and plan is not None:
        short = [k for k, m in enumerate(modes) if m == "drop" and plan[k] < full_depth]
        if short:
            k = short[0]
            raise ValueError(f"exit_policy: the schedule {name!r} drops the unconditional branch at model call {k} "
                             f"at depth {plan[k]} (the conditional half alone, outside the exit cache); expected "
                             f"exit_policy 'drop' with such a plan, got {exit_policy!r}")
    return modes


def resolve_forecast_order(schedule, given, where: str = "forecast_order:") -> int:
    """The forecast order of a run: the caller's (1 or 2), else the schedule's own (``ExitSchedule.forecast_order``),
    else 1."""
    return _plan_field(schedule, "forecast_order", given, (1, 2), 1,
                       "1 or 2 (the degree of the polynomial in t through the last full calls)", where)


def resolve_forecast_target(schedule, given, where: str = "forecast_target:") -> str:
    """What a run's forecast extrapolates: the caller's ("residual" or "blocks"), else the schedule's own
    (``ExitSchedule.forecast_target``), else "residual"."""
    return _plan_field(schedule, "forecast_target", given, FORECAST_TARGETS, "residual",
                       f"one of {FORECAST_TARGETS}", where)


def check_forecast_target(target: str, model, exit_policy, where: str = "forecast_target:") -> None:
    """ValueError unless ``target`` can run: "blocks" needs forecasting calls on a model whose blocks forecast their
    branch outputs (``forecast_blocks``: the native DiT)."""
    if target == "blocks" and not (exit_policy == "forecast" and _attr(model, "forecast_blocks")):
        raise ValueError(f"{where} 'blocks' expected exit_policy 'forecast' (or a plan of forecasting calls) on a model "
                         f"whose blocks forecast their branch outputs (the native DiT), got exit_policy={exit_policy!r} "
                         f"on {type(model).__name__}")


def solver_for(model, sampler: str, steps: int, **solver_options) -> Solver:
    """The solver ``sample()`` runs for ``model`` (``make_solver`` with the caller's options, plus any default the
    model declares, ``model_solver_options``). ``eekernels.calibrate`` builds its trajectory with it too: one code
    path."""
    return make_solver(sampler, steps, **model_solver_options(model, sampler, solver_options))


def sample(model: Callable, noise: torch.Tensor, y: "torch.Tensor | TextCondition | None" = None, *,
           sampler: str | None = None, steps: int | None = None, cfg_scale: float = 1.0, schedule=None,
           generator: torch.Generator | None = None, graphs: bool | None = None, progress: bool = False,
           exit_policy: str | None = None, graph_cache=None, cfg_channels: int | None = None,
           negative: TextCondition | None = None, forecast_order: int | None = None,
           forecast_target: str | None = None, **solver_options) -> torch.Tensor:
    """Sample from a diffusion model with any solver, CFG and early exit.

    Args:
        model: an eekernels model, or any callable ``model(x, t, y, depth=None)`` returning eps (B, C, ...) or,
            with learned sigma, (B, 2C, ...) whose first C channels are eps; for the flow solvers the velocity
            (B, C, ...). ``t`` is a float tensor (B,) in [0, num_train_timesteps) units (flow: sigma * 1000).
            A model that declares ``prediction`` ("epsilon" or "flow") is refused by the other kind of solver.
        noise: (B >= 1, C, ...) standard normal starting noise (scaled by the solver's ``init_noise_sigma``).
            Its dtype sets the solver state's: float32, or float64 for float64 noise. It need not match the
            model's: an ``nn.Module`` with floating parameters gets every x cast to the dtype of its first
            floating parameter (e.g. float64 noise with a float32 model: float32 model calls, float64 solver
            state); any other callable gets x in ``noise.dtype``.
        y: (B,) integer class labels on the noise's device, or None for an unconditional model. Labels lie in
            [0, model.num_classes); a model with a ``null_class`` (DiT trained with class dropout) also takes
            ``y == null_class``, which samples that entry unconditionally. Checked once per call (one host read).
            For a text-conditioned model (``model.condition == "text"``: PixArt, SD3, FLUX) an
            ``eekernels.TextCondition`` (tokens (B, L, token_dim), mask, pooled, extra), checked against the
            model's ``token_dim`` / ``pooled_dim`` / ``condition_extras`` before any model call. FLUX.1-dev's
            ``extra["guidance"]`` passes through to the model (guidance-distilled: run it with cfg_scale=1).
        sampler: "ddpm", "ddim", "dpmsolver++", "euler" or "heun" (epsilon models); "flow_euler", "flow_heun"
            or "flow_dpmsolver++" (flow matching: diffusers' FlowMatchEulerDiscreteScheduler,
            FlowMatchHeunDiscreteScheduler, DPMSolverMultistepScheduler(use_flow_sigmas=True,
            prediction_type="flow_prediction")), which start from x = noise and take ``shift``,
            ``use_dynamic_shifting`` with ``mu`` or ``image_seq_len``, ``sigmas``, ``num_train_timesteps`` and
            ``sigma_grid`` (default: the model's ``sigma_grid``, ``model_solver_options``: FLUX samples on
            black-forest-labs' ``get_schedule`` grid, as ``FluxPipeline``; others on the scheduler's).
            Default: the schedule's own (a joint plan, ``ExitSchedule.sampler``), else "ddim".
        steps: number of solver steps (Heun calls the model 2 * steps - 1 times). Default: the schedule's own (a
            joint plan fixes its step count, ``ExitSchedule.steps``; another count is refused), else 50.
        cfg_scale: classifier-free guidance scale (finite); != 1 runs [cond; uncond] as one batch of 2B (both
            halves at the same depth) with the model's ``null_class`` as the unconditional label, or for text
            ``negative`` (default ``model.null_condition(B, L)`` where the model has one).
        negative: a ``TextCondition`` for CFG's unconditional half (negative-prompt embeddings): same batch,
            caption length, fields and dtypes as ``y``. Needed for CFG with SD3 / FLUX (no null condition);
            validated but unused at cfg_scale=1; refused with class labels.
        schedule: an ``ExitSchedule`` (``ExitSchedule.piecewise([...])``, ``ExitSchedule.preset(name)``, ...);
            each model call runs ``schedule.depth(t)`` blocks (planned ahead). A plan with ``uncond`` (CFG only)
            runs the conditional half alone at its "forecast" calls, at full depth, the unconditional eps being the
            conditional one minus the guidance difference extrapolated in t at the run's ``forecast_order`` from the
            calls that ran both halves; at its "drop" calls the conditional half alone runs, at the call's depth,
            and its output is taken as the guided one (for a model fine-tuned to give it: guidance distillation).
        generator: a ``torch.Generator`` on the CPU or on the noise's device, for the stochastic solvers'
            noise (DDPM, DDIM with eta > 0).
        graphs: one CUDA graph per exit depth for a whole step (default: True on CUDA, False elsewhere).
        progress: show a tqdm bar (on stderr) with images/s at the end.
        exit_policy: None (default: the schedule's per-call policies where it has them, a joint plan's
            ``ExitSchedule.policies``; else "drop"), "drop" (ASE: skipped blocks contribute nothing), "cache"
            (training-free: truncated calls add what the skipped blocks added at the last full-depth call; needs a
            schedule that re-runs full depth, e.g. ``ExitSchedule.periodic``) or "forecast" (training-free: what
            the skipped blocks add, extrapolated in t through the last ``forecast_order`` + 1 full-depth calls,
            TaylorSeer's idea on a fixed plan; ``eekernels.models.cache.ForecastCache``).
        forecast_order: 1 (a line through the last two full calls) or 2 (a parabola through the last three);
            None (default): the schedule's own (``ExitSchedule.forecast_order``, a calibrated plan's), else 1.
        forecast_target: what the forecast extrapolates: "residual" (default: the skipped blocks' whole residual) or
            "blocks" (each skipped block's attention and MLP outputs, its norms, gates and residual adds run on the
            call's own input: diffusers' TaylorSeer's predictor; models with ``forecast_blocks``, the native DiT);
            None (default): the schedule's own (``ExitSchedule.forecast_target``), else "residual".
        graph_cache: the ``eekernels.graphs.GraphCache`` to use (default: the process-wide one).
        cfg_channels: which eps channels CFG guides: None (default) all of them, as diffusers' ``DiTPipeline``;
            k guides the first k only, the others taken from the conditional half: ``cfg_channels=3`` is DiT's
            ``forward_with_cfg`` exactly. Variance channels are never guided (see ``guide``).
        **solver_options: diffusers' scheduler arguments, e.g. ``eta``, ``timestep_spacing``, ``solver_order``.
            ``timestep_spacing="respaced"`` (DDIM and DDPM) reproduces DiT's ``create_diffusion(str(steps))``.

    Returns:
        (B, C, ...) samples in ``noise.dtype``. Non-finite noise, condition tensors (caption tokens, pooled text,
        extras) and caption masks with values other than 0/1 are refused before any work (a named ValueError;
        one reduction per input). Samples that come out non-finite all the same (NaN weights, float16
        overflow) are returned as they are, with a ``NonFiniteSampleWarning`` saying how many and which.

    Nothing is printed: the run's throughput goes to ``logging.getLogger("eekernels")`` (INFO for runs over
    20 s, DEBUG otherwise) and, with ``progress=True``, to the tqdm bar.
    """
    sampler, steps, exit_policy, mixed = resolve_plan(schedule, sampler, steps, exit_policy)
    _check_inputs(model, noise, y, sampler, steps, cfg_scale, exit_policy, schedule, generator, cfg_channels,
                  negative)
    solver = solver_for(model, sampler, steps, **solver_options)
    if solver_options.get("variance_type") == "learned_range" and _attr(model, "learn_sigma") is False:
        raise ValueError("variance_type: 'learned_range' needs a learned-sigma model (2C output channels); "
                         "this model has learn_sigma=False")
    plan = plan_depths(model, solver, schedule, exit_policy)
    cfg = cfg_scale != 1
    cfg_channels = cfg_channels if cfg else None  # no guidance, nothing to choose
    in_dtype = _input_dtype(model, noise)
    exit_depths = None
    full_depth = None if plan is None else (max(plan) if _attr(model, "num_blocks") is None else int(model.num_blocks))
    if exit_policy in REUSES and plan is not None:
        exit_depths = tuple(sorted({d for d in plan if d < full_depth}))
    forecast_order = resolve_forecast_order(schedule, forecast_order)
    forecast = forecast_order if exit_policy == "forecast" else None
    forecast_target = resolve_forecast_target(schedule, forecast_target)
    check_forecast_target(forecast_target, model, exit_policy)
    uncond_modes = check_uncond_plan(schedule, solver, cfg, plan, full_depth, exit_policy)

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
        full = None
        if isinstance(y, TextCondition) or _is_text_model(model):
            full = full_condition(model, y, negative, cfg, noise.shape[0], noise.device)
            cond_key = ("text", full.signature())  # graphs per (depth, batch, caption length, fields)
        else:
            cond_key = y is not None
        session_args = (model, solver, noise, full if full is not None else y, cfg, exit_depths)
        guidance = None if uncond_modes is None or "forecast" not in uncond_modes else forecast_order
        session_kw = dict(cfg_channels=cfg_channels, in_dtype=in_dtype, forecast_order=forecast,
                          forecast_target=forecast_target, guidance_order=guidance)
        if cache is not None:
            from eekernels.samplers.graphs import StepGraphs

            key = ("sample", _fingerprint(model), solver.signature(), tuple(noise.shape), noise.dtype,
                   str(noise.device), cond_key, cfg, exit_depths, forecast, forecast_target, cfg_channels, in_dtype,
                   guidance)
            session = cache.owner(key)
            if session is None:
                session = Session(*session_args, **session_kw)
            run_step = StepGraphs(cache, key, session)
        else:
            session = Session(*session_args, **session_kw)
            run_step = session.step
        session.reset(noise, y, cfg_scale, full=full)
        for kept in (session.exit_cache, session.guidance):
            if kept is not None:
                kept.restart()  # a new trajectory (the buffers stay: graphs captured on them stay valid)
        policies = schedule.policy_plan(solver.timesteps) if mixed else None
        _loop(session, run_step, plan, generator, progress, noise.shape[0], full_depth, policies, uncond_modes)
        out = session.state.x.to(dtype=noise.dtype, copy=True)
    warn_nonfinite(out, in_dtype)
    return out


def warn_nonfinite(out: torch.Tensor, in_dtype: torch.dtype, *, where: str = "eekernels.sample") -> int:
    """Warn (``NonFiniteSampleWarning``) when samples of ``out`` (B, ...) hold NaN or Inf, saying how many and
    which; returns how many. One reduction and one host read, after the run."""
    bad = (~torch.isfinite(out).flatten(1).all(1)).nonzero().flatten().tolist()
    if bad:
        which = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
        half = torch.float16 in (in_dtype, out.dtype)
        why = (f"; or float16 overflow (model calls in {in_dtype}, result in {out.dtype}): try float32 or bfloat16"
               if half else "")
        warnings.warn(NonFiniteSampleWarning(
            f"{where}: {len(bad)} of {out.shape[0]} samples are not finite (NaN or Inf): samples {which}. The "
            f"inputs were finite, so the run produced them: check the model's weights for NaN/Inf{why}"),
            stacklevel=3)
    return len(bad)


def _loop(session: Session, run_step, plan, generator, progress: bool, batch: int, full_depth=None,
          policies=None, uncond_modes=None) -> None:
    solver, st = session.solver, session.state
    cache, guidance = session.exit_cache, session.guidance
    # The forecast's weights come from each call's host timestep, known ahead (one transfer for the run).
    host_t = (solver.timesteps.detach().to("cpu", torch.float64).reshape(-1).tolist()
              if cache is not None or guidance is not None else None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=solver.num_calls, desc=f"{solver.name} x{batch}", unit="call", file=sys.stderr)
    start = time.perf_counter()
    for k in range(solver.num_calls):
        if solver.noise_at[k]:  # host-known ahead: which calls add fresh noise
            draw_noise(st.noise, generator)
        mode = "run" if uncond_modes is None else uncond_modes[k]
        if cache is not None:  # a call that runs the conditional half alone records nothing
            cache.begin_call(host_t[k], plan[k] >= full_depth and mode == "run",
                             None if policies is None else policies[k])
        if guidance is not None:
            guidance.begin_call(host_t[k], mode == "run")
        if mode == "run":
            run_step(None if plan is None else plan[k])
        else:
            run_step(None if plan is None else plan[k], mode)
        if bar is not None:
            bar.update()
    if bar is None and not logger.isEnabledFor(logging.INFO):  # nobody listens: no sync, no report
        return
    if st.x.is_cuda:  # time the work, not its launches
        torch.cuda.synchronize(st.x.device)
    elapsed = max(time.perf_counter() - start, 1e-9)
    rate = f"{batch / elapsed:.2f} images/s"
    if bar is not None:
        bar.set_postfix_str(rate)
        bar.close()
    # A library never prints on its own: long runs report at INFO, others at DEBUG.
    logger.log(logging.INFO if elapsed > 20.0 else logging.DEBUG,
               "eekernels.sample: %d images in %.2f s (%s, %s, %d model calls)", batch, elapsed, rate, solver.name,
               solver.num_calls)
