"""Calibration on a diffusers pipeline, in place: ``eekernels.calibrate(pipe, inputs=[...], budget=0.7)``.

The pipeline runs its own ``__call__``: its scheduler, its classifier-free guidance, its conditioning, whatever it
does. Nothing here names a family: the denoiser comes from the family table (``family_of_pipeline``), its depth
from the in-place :class:`~eekernels.inplace.Controller`.

1. **Measure, by calls.** The calibration inputs (the pipeline's call kwargs, one dict per sample, or callables
   ``pipe -> anything`` that run it) are run at full depth. A forward hook on the denoiser sees every model call
   of the pipeline's loop with its exact inputs, and calls the model again on them at every candidate depth d
   (``eekernels.inplace.at_depth``): ``e[k, d] = RMS(out_d - out_full)`` over the calibration set, on the output
   channels the scheduler consumes (the whole CFG batch; learned-sigma models' variance channels are left out
   when the scheduler takes only the first channels). The host timestep of each call is the loop's own
   (``scheduler.timesteps``, the timestep convention of ``accelerate(pipe, schedule=...)``).
2. **Weights: the pipeline's own scheduler.** The scheduler's state before the first step is copied and its
   ``step`` calls (their arguments) recorded; replaying them on a zero latent with the model output perturbed by
   a small delta at step j alone gives, for every scheduler that is linear in (sample, model output) (DDIM,
   DDPM, Euler, Heun, DPM-Solver, flow matching; noise is replayed identically), two sensitivities per step:
   ``step[j]`` = how far the next latent moves per unit output error, and ``final[j]`` = how far the final latent
   moves with every other output held fixed. ``final`` ignores the network's feedback, which damps errors made at
   high noise (for DDIM it weighs the noisiest steps by ``|sigma_bar(j+1) - sigma_bar(j)|``, up to hundreds of
   times the data end's); ``step`` ignores all amplification. The proxy of a plan is ``sum_k w[k] e[k, d_k]``
   with ``w = step`` (reported in ``report.weights``); no weighting of raw model outputs is right for every
   pipeline (CFG scales the error a depth introduces by the guidance, which the model output does not show), so:
3. **Select, closed loop (the default).** The DP's optima (``choose_drop``, the block-FLOP budget over model
   calls; calls of one step share a depth) under the weightings ``step``, ``final``, ``sqrt(step * final)`` and
   uniform, plus the constant-depth plan of the budget (the naive plan), are each run through the pipeline on the
   calibration inputs, and the plan whose final latents (the last ``scheduler.step`` output) are nearest the
   full-depth ones (RMS; ``objective`` replaces it) is kept: it sees the guidance, the scheduler and the
   compounding along the truncated trajectory, and is never worse than the naive plan on the calibration set.
   ``select="proxy"`` keeps the DP's optimum under ``step`` and runs no candidate.

The result is an ordinary t-indexed ``ExitSchedule`` (one bin per integer timestep) with its
:class:`~eekernels.schedules.CalibrationReport` (``sampler``: the scheduler's class; ``solver_options``: the
pipeline, scheduler, denoiser and weighting; ``errors``, ``plan``, ``selection``, cost). Cost: the measurement run is
one pipeline run of the set plus, per model call, one call per candidate depth below full (``sum_d d / L`` full
forwards: about ``(L - 1) / 2`` for every depth of L blocks; restrict ``candidates`` to spend less); the closed loop
adds one run of the set per distinct candidate plan (at most 5, each at about the budget's cost).

Only ``exit_policy="drop"`` is calibrated on a pipeline (a cached call's error depends on which earlier call
recorded the cache; calibrate "cache" on an eekernels model with ``calibrate(model, exit_policy="cache", ...)``).
The pipeline is left as it was given: accelerated in place (its schedules restored) or not (accelerated for the
calibration and disabled after).
"""
from __future__ import annotations

import copy
import inspect
import math
import time
from types import SimpleNamespace

import torch

SELECTS = ("proxy", "closed-loop")
WEIGHTINGS = ("step", "final", "geometric", "uniform")
_NONE = object()


def is_pipeline(obj) -> bool:
    """A pipeline of a registered family (what ``calibrate`` calibrates by its own loop)."""
    from eekernels import families

    return not isinstance(obj, torch.nn.Module) and families.family_of_pipeline(obj) is not None


def _output(out) -> torch.Tensor:
    """A model call's main output tensor: itself, ``.sample``, or the first tensor of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        out = out.sample
    if isinstance(out, (tuple, list)) and out and all(isinstance(v, torch.Tensor) for v in out) and \
            len({v.shape for v in out}) == 1 and not isinstance(out, tuple):
        return torch.stack(list(out))  # one tensor per sample (Z-Image)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, torch.Tensor):
                return v
            if isinstance(v, list) and v and all(isinstance(x, torch.Tensor) for x in v):
                return _output(v)
    raise ValueError(f"calibrate: the denoiser returned {type(out).__name__}, expected a tensor, an output with "
                     "`.sample`, a list of per-sample tensors, or a tuple whose first tensor is the prediction")


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


def _prev_sample(res) -> torch.Tensor:
    return res.prev_sample if hasattr(res, "prev_sample") else res[0]


# ---- the pipeline's scheduler: its steps, recorded and replayed -----------------------------------------------------

class _Tapped:
    """The tapped ``step`` on the scheduler instance. A deep copy of the scheduler (LTX-2's pipelines copy theirs
    for the audio latents) steps with its class's own method, untapped: not the original's steps."""

    def __init__(self, fn, scheduler):
        self.fn, self.scheduler = fn, scheduler

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        twin = memo.get(id(self.scheduler))  # the scheduler's copy being made (copy registers it first)
        return None if twin is None else type(twin).step.__get__(twin)


class _StepTap:
    """Wraps ``scheduler.step`` (an instance attribute, removed after): counts steps, keeps the last step's output
    (the final latents), and on the first recorded run copies the scheduler before its first step and records every
    step's arguments, for :func:`scheduler_weights`."""

    def __init__(self, scheduler):
        self.scheduler, self.steps, self.last = scheduler, 0, None
        self.recording, self.start, self.records = False, None, []
        self._prev = vars(scheduler).get("step", _NONE)
        bound = scheduler.step
        sig = inspect.signature(type(scheduler).step)
        names = list(sig.parameters)[1:]
        self._names = names

        def step(*args, **kwargs):
            index = getattr(scheduler, "_step_index", None)
            if index is not None and index == self._index:
                raise ValueError(f"pipe: its scheduler ({type(scheduler).__name__}) was stepped twice at step index "
                                 f"{index} (the pipeline rewinds `_step_index` between two `step` calls of one "
                                 "step, as CosmosTextToWorldPipeline does); calibrate replays one scheduler step "
                                 "per step and cannot calibrate this pipeline")
            self._index = index
            if self.recording:
                if self.start is None:
                    self.start = copy.deepcopy(scheduler)
                    self.start.__dict__.pop("step", None)  # the copy steps with the class's own method
                self.records.append(self._record(args, kwargs))
            res = bound(*args, **kwargs)
            self.steps += 1
            self.last = _prev_sample(res)
            return res

        self._index = None
        scheduler.step = _Tapped(step, scheduler)

    def _record(self, args, kwargs) -> dict:
        """The step's arguments by name; model_output and sample as (shape without batch, dtype, device)."""
        given = dict(zip(self._names, args))
        given.update(kwargs)
        rec = {}
        for name, v in given.items():
            if name in ("model_output", "sample"):
                rec[name] = (tuple(v.shape[1:]), v.dtype, v.device)
            elif name == "generator":
                rec[name] = None  # the replay's noise comes from the seeded global generator
            else:
                rec[name] = v
        return rec

    def remove(self) -> None:
        if self._prev is _NONE:
            self.scheduler.__dict__.pop("step", None)
        else:
            self.scheduler.step = self._prev


@torch.no_grad()
def scheduler_weights(start, records: list[dict], delta: float = 1e-4) -> dict[str, list[float]]:
    """``{"step": [...], "final": [...]}`` per scheduler step j: the RMS change of the next latent (step) and of the
    final latent (final) per unit change of the model output at step j alone, the other outputs held at zero, from a
    zero latent (module docstring). ``start``: the scheduler before its first step; ``records``: each step's
    arguments (``_StepTap``). Exact for schedulers linear in (sample, model output); the noise of stochastic ones is
    drawn identically in every replay (the global generator, seeded per step), so it cancels."""
    n = len(records)

    def run(perturb: int | None) -> list[torch.Tensor]:
        sched = copy.deepcopy(start)
        shape, dtype, device = records[0]["sample"]
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        x = torch.zeros((1, *shape), dtype=dtype, device=device)
        after = []
        for j, rec in enumerate(records):
            oshape = rec["model_output"][0]
            out = torch.full((1, *oshape), delta if j == perturb else 0.0, dtype=dtype, device=device)
            kw = {k: v for k, v in rec.items() if k not in ("model_output", "sample")}
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(0)
                x = _prev_sample(sched.step(model_output=out, sample=x, **kw))
            after.append(x.double())
        return after

    base = run(None)
    step, final = [], []
    for j in range(n):
        pert = run(j)
        rms = lambda a, b: float((a - b).square().mean().sqrt()) / delta  # noqa: E731
        step.append(rms(pert[j], base[j]))
        final.append(rms(pert[-1], base[-1]))
    return {"step": step, "final": final}


def _weighting(kind: str, sens: dict, step_of_call: list[int]) -> list[float]:
    """Per model call: the weight of the scheduler step the call feeds."""
    if kind == "uniform":
        return [1.0] * len(step_of_call)
    if kind == "geometric":
        per_step = [math.sqrt(a * b) for a, b in zip(sens["step"], sens["final"])]
    else:
        per_step = sens[kind]
    last = len(per_step) - 1
    return [per_step[min(j, last)] for j in step_of_call]


class HostTimestep:
    """A model call's timestep in eekernels' unit: the pipeline loop's host value (``Controller.loop_t``), else the
    call's own ``timestep`` argument (its second, if none is named so) times the family's ``timestep_scale``."""

    def __init__(self, model, ctl):
        self.ctl = ctl
        self.params = tuple(inspect.signature(type(model).forward).parameters)[1:]
        self.name = "timestep" if "timestep" in self.params else self.params[1]

    def __call__(self, args, kwargs) -> float:
        if self.ctl.loop_t is not None:
            return float(self.ctl.loop_t)
        t = kwargs[self.name] if self.name in kwargs else args[self.params.index(self.name)]
        return float(torch.as_tensor(t).reshape(-1)[0]) * self.ctl.family.timestep_scale


# ---- the probe on the denoiser --------------------------------------------------------------------------------------

class _Probe:
    """A forward hook on the denoiser. ``measure`` mode: after each full-depth call of the pipeline's loop, call the
    model at every candidate depth on the same inputs and accumulate the squared error per output channel (dim 1,
    so that the channels the scheduler does not consume can be left out once its first step is seen); ``follow``
    mode: only count the calls and check that the run reproduces the measured one (its first call's latents)."""

    def __init__(self, model, ctl, candidates, tap: _StepTap, flops: bool):
        self.model, self.ctl, self.cands, self.tap = model, ctl, candidates, tap
        self.L = ctl.num_blocks
        self.mode = None
        self.inner = False
        self.run_calls: list[dict] = []  # this run: {"t", "step"} per call
        self.sse: list[list] = []  # [call][candidate]: squared error summed over the set, per channel (dim 1)
        self.count: list[int] = []  # [call]: elements per channel, over the set
        self.first_inputs: dict[int, torch.Tensor] = {}
        self.sample = 0
        self.calls, self.blocks = 0, 0.0
        self.traj_seconds = 0.0
        self.flops = {} if flops else None
        self._t0 = 0.0
        self.progress, self.done = None, 0
        self.host_t = HostTimestep(model, ctl)
        self.handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                        model.register_forward_hook(self._post, with_kwargs=True)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _pre(self, module, args, kwargs):
        if not self.inner:
            self._t0 = time.perf_counter()
        return None

    def _post(self, module, args, kwargs, out):
        if self.inner or self.mode is None:
            return None
        self.traj_seconds += time.perf_counter() - self._t0
        k = len(self.run_calls)
        self.run_calls.append({"t": self.host_t(args, kwargs), "step": self.tap.steps})
        self.calls += 1
        self.blocks += 1.0
        if k == 0:
            x = _first_tensor(args, kwargs)
            seen = self.first_inputs.get(self.sample)
            if seen is None:
                self.first_inputs[self.sample] = x.detach().clone()
            elif not (seen.shape == x.shape and torch.equal(seen, x.to(seen.device))):
                raise ValueError(f"inputs[{self.sample}]: the pipeline's run is not reproducible (its first model call "
                                 "got other latents than in the measured run); give the input a seeded `generator` "
                                 "or fixed `latents`, or make the callable seed its own")
        if self.mode == "measure":
            self._measure(k, args, kwargs, _output(out))
        return None

    def _measure(self, k, args, kwargs, full):
        from torch.utils.flop_counter import FlopCounterMode

        from eekernels.inplace import at_depth

        if len(self.sse) <= k:
            self.sse.append([0.0] * len(self.cands))
            self.count.append(0)
        row = self.sse[k]
        self.inner = True
        try:
            for i, d in enumerate(self.cands):
                if d == self.L:
                    continue
                counter = FlopCounterMode(display=False) if self.flops is not None and d not in self.flops else None
                with torch.no_grad(), at_depth(self.model, d):
                    if counter is not None:
                        with counter:
                            got = _output(self.model(*args, **kwargs))
                        self.flops[d] = counter.get_total_flops()
                    else:
                        got = _output(self.model(*args, **kwargs))
                self.calls += 1
                self.blocks += d / self.L
                row[i] = row[i] + _per_channel((got.double() - full.double()).square())
            if self.flops is not None and self.L not in self.flops:
                counter = FlopCounterMode(display=False)
                with torch.no_grad(), at_depth(self.model, None), counter:
                    self.model(*args, **kwargs)
                self.flops[self.L] = counter.get_total_flops()
                self.calls += 1
                self.blocks += 1.0
        finally:
            self.inner = False
        self.count[k] += full.numel() // (full.shape[1] if full.dim() >= 2 else 1)
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, None)

    def errors(self, channels: int | None) -> list[list[float]]:
        """``e[k][candidate]``: the RMS error over the set, on the first ``channels`` output channels (None: all)."""
        out = []
        for row, count in zip(self.sse, self.count):
            vals = []
            for v in row:
                if isinstance(v, float):  # full depth: no error
                    vals.append(0.0)
                    continue
                c = v.numel() if channels is None else min(channels, v.numel())
                vals.append(math.sqrt(float(v[:c].sum()) / max(count * c, 1)))
            out.append(vals)
        return out


def _per_channel(sq: torch.Tensor) -> torch.Tensor:
    """Sum over every dim but 1 (the channels), on the host: (C,) float64."""
    if sq.dim() < 2:
        return sq.sum().reshape(1).cpu()
    return sq.transpose(0, 1).reshape(sq.shape[1], -1).sum(1).cpu()


# ---- running the inputs -------------------------------------------------------------------------------------------

class _Inputs:
    """The calibration inputs, each run identically every time: a dict's generator is seeded (its own, restored to
    the state it came with; else ``torch.Generator().manual_seed(i)``) and its output is the latents."""

    def __init__(self, pipe, inputs):
        self.pipe, self.items = pipe, list(inputs)
        params = inspect.signature(type(pipe).__call__).parameters
        self.latent_out = "output_type" in params
        self.states = []
        for item in self.items:
            gens = item.get("generator") if isinstance(item, dict) else None
            gens = gens if isinstance(gens, (list, tuple)) else [gens] if gens is not None else []
            self.states.append([(g, g.get_state()) for g in gens if isinstance(g, torch.Generator)])

    def __len__(self):
        return len(self.items)

    def run(self, i: int) -> None:
        item = self.items[i]
        if callable(item):
            item(self.pipe)
            return
        kw = dict(item)
        for g, state in self.states[i]:
            g.set_state(state)
        if kw.get("generator") is None:
            kw["generator"] = torch.Generator().manual_seed(i)
        if self.latent_out:
            kw["output_type"] = "latent"  # the final latents are read from the scheduler: no decode needed
        with torch.no_grad():
            self.pipe(**kw)

    def restore(self) -> None:
        for states in self.states:
            for g, state in states:
                g.set_state(state)


def _check_inputs(inputs) -> None:
    if not isinstance(inputs, (list, tuple)) or not inputs:
        got = f"an empty {type(inputs).__name__}" if isinstance(inputs, (list, tuple)) else type(inputs).__name__
        raise ValueError(f"inputs: expected a non-empty list of the pipeline's call kwargs (one dict per calibration "
                         f"sample, e.g. prompt_embeds=...) or callables pipe -> None, got {got}")
    for i, item in enumerate(inputs):
        if isinstance(item, dict):
            bad = [k for k in item if not isinstance(k, str)]
            if bad:
                raise ValueError(f"inputs[{i}]: expected keyword names (str), got {bad[0]!r}")
        elif not callable(item):
            raise ValueError(f"inputs[{i}]: expected a dict of the pipeline's call kwargs or a callable pipe -> None, "
                             f"got {type(item).__name__}")
    dicts = [it for it in inputs if isinstance(it, dict)]
    for key in ("num_inference_steps", "timesteps", "sigmas"):
        vals = [repr(d.get(key)) for d in dicts]
        if len(set(vals)) > 1:
            raise ValueError(f"inputs: expected the same `{key}` in every input (one trajectory of model calls to "
                             f"plan), got {sorted(set(vals))}")


def _pick_denoiser(pipe, names, denoiser) -> str:
    present = [n for n in names if getattr(pipe, n, None) is not None]
    if denoiser is None:
        if len(present) != 1:
            raise ValueError(f"denoiser: expected one of {present} (this {type(pipe).__name__} has "
                             f"{len(present)} denoisers present; calibrate each), got None")
        return present[0]
    if denoiser not in present:
        raise ValueError(f"denoiser: expected one of the pipeline's denoisers present {present}, got {denoiser!r}")
    return denoiser


# ---- calibrate -----------------------------------------------------------------------------------------------------

def calibrate_pipeline(pipe, *, inputs, budget: float = 0.7, candidates=None, exit_policy: str = "drop",
                       select: str = "closed-loop", denoiser: str | None = None, depth_costs=None,
                       time_reference: bool = False, progress=None, name: str | None = None, objective=None):
    """A calibrated ``ExitSchedule`` for ``pipe``'s denoiser under the pipeline's own loop (module docstring).

    Args:
        inputs: the calibration set: a list of the pipeline's call kwargs (one dict per sample: prompt_embeds,
            num_inference_steps, guidance_scale, ...; the same steps in each), or callables ``pipe -> None`` that
            call it reproducibly. A dict without a generator gets ``torch.Generator().manual_seed(i)``; its
            ``output_type`` is set to "latent".
        budget: the block-FLOP fraction (over the model calls of a run) not to exceed.
        candidates: the depths to consider (default every depth in [min_depth, num_blocks]).
        select: "closed-loop" (default) or "proxy" (module docstring).
        denoiser: which denoiser to calibrate, for pipelines with several (the others run at full depth).
        depth_costs: None (block units), "flops" (measured by ``torch.utils.flop_counter`` on the first call), or
            {depth: cost} / a sequence indexed by depth - 1, as ``calibrate(model, ...)`` takes them.
        time_reference: also time one full-depth run of the set (``report.reference_seconds``).
        progress: callable(done, None) after each measured model call.
        objective: what the closed loop ranks the candidate plans by: None (RMS of the final latents to full
            depth's) or a callable ``objective(latents, reference) -> float``, lower is better, as
            ``calibrate(model, objective=...)`` takes it; ``latents``: the runs' final latents concatenated along the
            batch (a list, one per run, where their shapes differ), ``reference`` likewise at full depth. It is
            called once on the full-depth latents right after the measurement run, to check that it returns a
            finite number; ``report.objective`` keeps its name.
    """
    from eekernels import families, inplace
    from eekernels.calibration import (_groups, _normalized_costs, _table_schedule, _unit_costs, choose_drop,
                                       closed_loop_objective)
    from eekernels.schedules import CalibrationReport

    _check_inputs(inputs)
    objective_name, distance = closed_loop_objective(objective)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget: expected a block-FLOP fraction in (0, 1], got {budget!r}")
    if exit_policy != "drop":
        raise ValueError(f"exit_policy: a pipeline calibrates 'drop' (a cached call's error depends on which call "
                         f"recorded the cache; calibrate 'cache' on an eekernels model), got {exit_policy!r}")
    if select not in SELECTS:
        raise ValueError(f"select: expected one of {SELECTS}, got {select!r}")
    if objective is not None and select != "closed-loop":
        raise ValueError("objective: ranks the plans the closed loop runs; expected select='closed-loop' with it, got "
                         f"select={select!r}")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress: expected None or a callable (done, total), got {type(progress).__name__}")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"name: expected None or a str, got {type(name).__name__}")
    if depth_costs is not None and isinstance(depth_costs, str) and depth_costs != "flops":
        raise ValueError(f"depth_costs: expected None, 'flops', or {{depth: cost}}, got {depth_costs!r}")
    family, names = families.family_of_pipeline(pipe)
    dname = _pick_denoiser(pipe, names, denoiser)
    model = getattr(pipe, dname)

    ours = inplace.controller(model) is None
    if ours:
        if getattr(pipe, "_eekernels_denoisers", None):
            raise ValueError(f"pipe: its `{dname}` is not accelerated while the pipeline is (disabled by hand or set "
                             "after accelerate and not run yet); call eekernels.disable(pipe) or run it once first")
        from eekernels._accelerate import accelerate

        accelerate(pipe)
    ctls = {n: inplace.controller(getattr(pipe, n)) for n in names if getattr(pipe, n, None) is not None}
    saved = {n: c.schedule for n, c in ctls.items()}
    ctl = ctls[dname]
    tap = probe = None
    try:
        cache = [key for key, c in ctls.items() if c.policy != "drop"]
        if cache:
            raise ValueError(f"pipe: its `{cache[0]}` is accelerated with exit_policy={ctls[cache[0]].policy!r}; "
                             "calibrate measures 'drop' (call eekernels.disable(pipe) first, or accelerate it with "
                             "'drop')")
        L, lo = ctl.num_blocks, ctl.min_depth
        if candidates is not None:
            c = list(candidates)
            if not c or any(isinstance(d, bool) or not isinstance(d, int) or not lo <= d <= L for d in c):
                raise ValueError(f"candidates: expected depths in [{lo}, {L}] (the denoiser's range), got {c}")
        cands = sorted(set(candidates if candidates is not None else range(lo, L + 1)) | {L})
        if depth_costs is not None and not isinstance(depth_costs, str):
            _normalized_costs(SimpleNamespace(num_blocks=L), cands, depth_costs, None, None)  # checked before work
        runs = _Inputs(pipe, inputs)
        for c in ctls.values():
            c.use(None)  # the measured trajectory runs at full depth
        tap = _StepTap(pipe.scheduler)
        probe = _Probe(model, ctl, cands, tap, flops=depth_costs == "flops")
        probe.progress = progress

        # 1. measure: every input at full depth, every candidate depth at every call
        start = time.perf_counter()
        finals, call_t, step_of_call = [], None, None
        for i in range(len(runs)):
            probe.mode, probe.sample, probe.run_calls = "measure", i, []
            tap.recording, tap.steps = i == 0, 0
            runs.run(i)
            got_t = [c["t"] for c in probe.run_calls]
            if tap.last is None or not got_t:
                raise ValueError(f"inputs[{i}]: the pipeline ran no scheduler step or no call of its `{dname}`; "
                                 "expected a denoising loop")
            if i == 0:
                call_t, step_of_call = got_t, [c["step"] for c in probe.run_calls]
            elif got_t != call_t:
                raise ValueError(f"inputs[{i}]: expected the model calls of inputs[0] ({len(call_t)} at t = "
                                 f"{call_t[:4]}...), got {len(got_t)} at t = {got_t[:4]}...; give every input the "
                                 "same steps")
            finals.append(tap.last.detach().double().clone())
        tap.recording, probe.mode = False, None
        if objective is not None:  # a finite number on full depth's own latents, before the closed loop's runs
            distance(_batched(finals), _batched(finals))
        n = len(call_t)
        # the channels the scheduler consumes (learned-sigma models: the first half of the output)
        consumed = tap.records[0]["model_output"][0]
        errors = probe.errors(consumed[0] if consumed else None)
        sens = scheduler_weights(tap.start, tap.records)
        weights = {kind: _weighting(kind, sens, step_of_call) for kind in WEIGHTINGS}

        # 2. plan
        if depth_costs == "flops":
            costs = _normalized_costs(SimpleNamespace(num_blocks=L), cands, probe.flops, None, None)
        else:
            costs = _normalized_costs(SimpleNamespace(num_blocks=L), cands, depth_costs, None, None)
        unit = _unit_costs(cands, costs)
        units = int(math.floor(budget * unit[L] * n + 1e-9))
        T = int(getattr(pipe.scheduler.config, "num_train_timesteps", 1000) or 1000)
        T = max(T, int(math.floor(max(call_t))) + 1)
        groups = _groups(call_t, T)
        plans: dict = {}
        for kind in WEIGHTINGS:
            plan, _ = choose_drop(errors, weights[kind], groups, cands, units, costs)
            plans.setdefault(tuple(plan), f"weights={kind}")
        fits = [d for d in cands if unit[d] * n <= units]
        if fits:
            plans.setdefault(tuple([max(fits)] * n), "constant depth (naive)")
        proxy_of = lambda p: sum(w * errors[k][cands.index(d)] for k, (w, d) in enumerate(zip(weights["step"], p)))  # noqa: E731
        best = list(next(p for p, origin in plans.items() if origin == "weights=step"))
        label = f"calibrated(drop, {type(pipe).__name__} {n} calls, budget {budget:g})"
        selection = None

        # 3. closed loop: each candidate plan through the pipeline, final latents against full depth's
        if select == "closed-loop":
            selection = []
            for plan, origin in plans.items():
                ctl.use(_table_schedule(list(plan), call_t, L, T, "closed-loop candidate"))
                sse, cnt, got = 0.0, 0, []
                for i in range(len(runs)):
                    probe.mode, probe.sample, probe.run_calls = "follow", i, []
                    tap.steps = 0
                    runs.run(i)
                    probe.blocks += sum(plan) / L - len(probe.run_calls)  # follow mode counted full calls
                    if objective is None:
                        sse += float((tap.last.double() - finals[i]).square().sum())
                        cnt += finals[i].numel()
                    else:
                        got.append(tap.last.detach().double().clone())
                probe.mode = None
                real = math.sqrt(sse / cnt) if objective is None else distance(_batched(got), _batched(finals))
                selection.append({"plan": list(plan), "proxy": proxy_of(plan), "real": real, "from": origin})
            pick = min(selection, key=lambda r: (r["real"], sum(r["plan"])))
            best = pick["plan"]
            ctl.use(None)
        seconds = time.perf_counter() - start

        reference = None
        if time_reference:
            probe.remove()
            t0 = time.perf_counter()
            for i in range(len(runs)):
                runs.run(i)
            reference = round(time.perf_counter() - t0, 4)
    finally:
        if probe is not None:
            probe.remove()
        if tap is not None:
            tap.remove()
        for key, c in ctls.items():
            c.use(saved[key])
        if ours:
            inplace.disable(pipe)
        if "runs" in locals():
            runs.restore()

    sched = _table_schedule(best, call_t, L, T, name or label)
    rep = CalibrationReport(
        exit_policy="drop", sampler=type(pipe.scheduler).__name__, steps=len(tap.records),
        cfg_scale=_guidance(pipe, inputs), budget=float(budget), num_blocks=L, candidates=cands,
        call_timesteps=call_t, weights=weights["step"], plan=list(best), proxy=proxy_of(best),
        block_flop_fraction=sum(best) / (L * n), measure="calls", num_samples=len(runs),
        model_calls=probe.calls, block_evaluations=round(probe.blocks, 4), seconds=round(seconds, 4),
        trajectory_seconds=round(probe.traj_seconds, 4), reference_seconds=reference, data_std=None,
        solver_options={"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                        "denoiser": dname, "weights": "step"},
        errors=errors, depth_costs=None if costs is None else [costs[d] for d in cands],
        cost_fraction=sum(unit[d] for d in best) / (unit[L] * n), select=select, selection=selection,
        objective=objective_name if select == "closed-loop" else "rms")
    sched.calibration = rep
    return sched


def _batched(latents: list):
    """The runs' final latents as one batch (concatenated along dim 0), or the list itself where their shapes
    differ (beyond the batch)."""
    return torch.cat(latents) if len({tuple(x.shape[1:]) for x in latents}) == 1 else list(latents)


def _guidance(pipe, inputs) -> float:
    """The guidance scale of the calibration runs (the inputs' or the pipeline's default; 1.0 if it has none)."""
    first = inputs[0] if isinstance(inputs[0], dict) else {}
    v = first.get("guidance_scale", _NONE)
    if v is _NONE:
        p = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
        v = p.default if p is not None and p.default is not inspect.Parameter.empty else 1.0
    try:
        v = float(v)
    except (TypeError, ValueError):
        return 1.0
    return v if math.isfinite(v) else 1.0


#: what ``calibrate`` passes on for a pipeline (every other argument of ``calibration.calibrate`` is a model's)
PIPELINE_ARGS = ("budget", "candidates", "exit_policy", "select", "denoiser", "depth_costs", "time_reference",
                 "progress", "name", "objective")


def calibrate(model, *, inputs=None, denoiser: str | None = None, **kwargs):
    """``eekernels.calibrate``: a calibrated ``ExitSchedule`` for an eekernels model or a diffusers pipeline.

    - An eekernels model (``ScoreModel``): ``eekernels.calibration.calibrate(model, noises=..., sampler=..., ...)``,
      every argument as documented there.
    - A diffusers pipeline of a registered family, accelerated in place or not: :func:`calibrate_pipeline`
      (``inputs``, the pipeline's call kwargs per calibration sample; ``budget``, ``candidates``, ``exit_policy``,
      ``select`` (default "closed-loop"), ``denoiser``, ``depth_costs``, ``time_reference``, ``progress``,
      ``name``, ``objective``; ``measure`` may be "auto" or "calls"). Its scheduler, steps and guidance come from ``inputs``: a
      model's arguments (``sampler``, ``steps``, ``noises``, ...) are refused by name.
    """
    if not is_pipeline(model):
        if not isinstance(model, torch.nn.Module) and hasattr(model, "components"):
            from eekernels import families

            raise ValueError(f"model: expected an eekernels model or a diffusers pipeline of a registered family "
                             f"({families.supported()}), got a {type(model).__name__} (register its family: "
                             "eekernels.families.register)")
        for key, value in (("inputs", inputs), ("denoiser", denoiser)):
            if value is not None:
                raise ValueError(f"{key}: only a diffusers pipeline of a registered family takes {key} (a model "
                                 f"calibrates on `noises`), got {key}={type(value).__name__} for a "
                                 f"{type(model).__name__}")
        from eekernels.calibration import calibrate as calibrate_model

        return calibrate_model(model, **kwargs)
    if kwargs.get("measure", "calls") in ("auto", "calls"):
        kwargs.pop("measure", None)
    else:
        raise ValueError(f"measure: a pipeline is measured by calls; expected 'auto' or 'calls', got "
                         f"{kwargs['measure']!r}")
    other = [k for k in kwargs if k not in PIPELINE_ARGS]
    if other:
        v = kwargs[other[0]]
        got = f"a tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)[:80]
        raise ValueError(f"{other[0]}: a pipeline is calibrated under its own loop (its scheduler, steps, guidance "
                         f"and conditioning come from `inputs`); expected none of {other}, got {got}")
    return calibrate_pipeline(model, inputs=inputs, denoiser=denoiser, **kwargs)


__all__ = ["calibrate", "calibrate_pipeline", "scheduler_weights", "is_pipeline", "SELECTS", "WEIGHTINGS"]
