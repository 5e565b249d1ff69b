"""ExitSchedule: how many blocks a score network runs at each model call (ASE early exit).

Two kinds:
- **timestep-indexed** (``piecewise``, ``linear``, ``from_fn``, presets): depth is a function of the
  timestep t in [0, num_timesteps) (t = 0 is data, t = num_timesteps - 1 is noise). It is stored as a table
  of ``resolution`` equal-width bins over [0, num_timesteps): bin ``floor(t * resolution / num_timesteps)``,
  clamped to the table. ``depth(t)`` is one gather from a device copy of the table: no host sync, so it
  can sit inside a CUDA graph. Fractional t (from DPM-Solver, Euler, EDM...) falls in the bin that
  contains it.
- **step-indexed** (``periodic``, for ``exit_policy="cache"``): depth is a function of the model-call index
  within a sampler run (full depth every k-th call). Only ``plan()`` applies; ``depth(t)`` raises.

Samplers call ``plan(call_timesteps)`` once per run to get the depth of every model call.
Depths lie in [0, total_depth]. Depth 0 runs no block at all: only a reuse policy (``exit_policy="cache"`` or
``"forecast"``) may take it, on a model whose skipped part can be its whole block stack (``min_reuse_depth`` 0:
the prefix models, DiT, PixArt, SD3, FLUX and their in-place families); the whole stack's contribution is then the
last full call's (cache, FirstBlockCache's skipped steps without the first block) or its extrapolation (forecast,
TaylorSeer's skipped steps). Schedules need not be monotone in t (any shape is accepted; ASE's are
non-increasing toward the noise end, but a user may e.g. spend more blocks mid-trajectory).

**Flow-matching models** (SD3, FLUX; the ``flow_*`` solvers) use the same t in [0, 1000): the model is called
with t = sigma * 1000 (sigma in [0, 1], 1 is pure noise), what diffusers' SD3 transformer takes. So a schedule
over t is a schedule over sigma: ``piecewise_sigma`` bins sigma (the same table as ``piecewise``), and
``from_sigmas({0.7: 12, 0.3: 18, 0.0: 24})`` gives depths by sigma thresholds. Shifted flow schedules (SD3's
shift 3) spend most steps at high sigma: the presets "ase-sd3" (24 blocks) and "ase-flux" (19 double + 38 single
= 57 blocks) are written for a 28-step, shift-3 flow schedule and spend the DiT reference's block fraction there
(20/28 of full depth, as "ase-dit-xl" does over uniform t).

Schedules are saved and loaded as small JSON files, one format (``FORMAT``) with one writer (``save``) and one
reader (``load``; ``from_spec("calibrated:FILE", model)``). A calibrated schedule (``eekernels.calibrate``) carries
its :class:`CalibrationReport` in ``schedule.calibration``, which the file keeps. ``load`` checks every field
and the file's size (before reading it).
"""
from __future__ import annotations

import json
import math
import operator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import torch

from eekernels.models.cache import FORECAST_TARGETS
from eekernels.models.scaffold import min_depth_of

#: the exit policies a plan may give a call (``eekernels.models.cache.CALL_POLICIES``)
POLICIES = ("drop", "cache", "forecast")
#: what a plan's call does with classifier-free guidance's unconditional branch (``ExitSchedule(uncond=...)``): "run"
#: it (the whole [cond; uncond] batch); "forecast" it: only the conditional half runs, at full depth, and the
#: unconditional output is the conditional one minus the guidance difference (cond - uncond) extrapolated in t from
#: the calls that ran both halves; or "drop" it: only the conditional half runs, at the call's planned depth, and its
#: output is the guided one, as at cfg_scale 1 (the stand-in of a model fine-tuned to give the guided output in one
#: pass, guidance distillation through ``eekernels.training.rollout``; an untuned model samples that call unguided)
UNCOND_MODES = ("run", "forecast", "drop")
# ASE reference schedule for DiT-XL/2 (28 blocks): ten equal bins of t, full depth near the data end.
ASE_DIT_XL = (28, 28, 24, 24, 20, 20, 16, 16, 12, 12)


class ExitSchedule:
    """Maps timesteps (or model-call indices) to exit depths; see the module docstring."""

    def __init__(self, table: Sequence[int], total_depth: int | None = None, num_timesteps: int = 1000,
                 *, period: int | None = None, name: str | None = None, policies: Sequence[str] | None = None,
                 steps: int | None = None, sampler: str | None = None, forecast_order: int | None = None,
                 forecast_target: str | None = None, uncond: Sequence[str] | None = None):
        """``table``: depth per bin (equal-width bins over [0, num_timesteps)); ``total_depth``: the model
        depth the schedule is written for (default: the table's maximum). With ``period`` the schedule is
        step-indexed: ``table`` holds ``(full, truncated)`` and call i runs full depth when ``i % period == 0``.
        A joint plan (``eekernels.calibrate(..., search=...)``) also fixes ``policies`` (one exit policy per bin,
        parallel to ``table``: "drop", "cache" or "forecast"), ``steps`` and ``sampler`` (the solver run the plan is
        for), ``forecast_order`` (1 or 2) and ``forecast_target`` ("residual" or "blocks"), how its forecasting
        calls were chosen to run; ``sample()`` and ``accelerate()`` take them from the schedule. ``uncond`` (one per
        bin, "run", "forecast" or "drop"; ``UNCOND_MODES``): a plan for a CFG run may forecast the unconditional
        branch at some calls instead of running it (only the conditional half runs there, at full depth), or drop it
        (the conditional half alone at the bin's depth, its output taken as the guided one: for a model fine-tuned
        so); ``eekernels.sample`` alone runs such plans. Prefer the named constructors."""
        table = [_as_int("ExitSchedule", "depths", d) for d in table]
        if not table:
            raise ValueError("ExitSchedule: `depths` expected at least one depth, got an empty sequence")
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"ExitSchedule: `num_timesteps` expected a positive int, got {num_timesteps!r}")
        total = max(table) if total_depth is None else _as_int("ExitSchedule", "total_depth", total_depth)
        bad = [d for d in table if not 0 <= d <= total]
        if bad or total < 1:
            raise ValueError(f"ExitSchedule: depths expected in [0, total_depth={total}] (0: no block, for a reuse "
                             f"policy), got {bad or total}")
        self.table = tuple(table)
        self.total_depth = total
        self.num_timesteps = num_timesteps
        self.period = period
        self.name = name
        self.policies, self.steps, self.sampler = _check_plan_fields("ExitSchedule", policies, steps, sampler,
                                                                     len(self.table), period)
        if forecast_order is not None and (isinstance(forecast_order, bool) or forecast_order not in (1, 2)):
            raise ValueError(f"ExitSchedule: `forecast_order` expected None, 1 or 2, got {forecast_order!r}")
        self.forecast_order = forecast_order
        if forecast_target is not None and forecast_target not in FORECAST_TARGETS:
            raise ValueError(f"ExitSchedule: `forecast_target` expected None or one of {FORECAST_TARGETS}, got "
                             f"{forecast_target!r}")
        self.forecast_target = forecast_target
        if self.policies is not None and any(d == 0 and p == "drop" for d, p in zip(self.table, self.policies)):
            raise ValueError("ExitSchedule: `policies` expected 'cache' or 'forecast' at every depth-0 bin (depth 0 runs "
                             "no block; 'drop' would leave nothing), got 'drop'")
        self.uncond = _check_uncond("ExitSchedule", uncond, self.table, total, period, self.policies)
        self.calibration: CalibrationReport | None = None  # set by eekernels.calibrate and by load()
        self._device_tables: dict = {}

    # ---------------------------------------------------------------- constructors
    @classmethod
    def piecewise(cls, depths: Sequence[int], num_timesteps: int = 1000, total_depth: int | None = None) -> "ExitSchedule":
        """Equal-width bins over [0, num_timesteps): bin i gives ``depths[i]``.

        ``piecewise([28, 28, 24, 24, 20, 20, 16, 16, 12, 12])`` is the ASE reference for DiT-XL/2, bins of 100:
        depth(0) = depth(199) = 28, depth(200) = 24, depth(550) = 20, depth(999) = 12 (t = 100 is in bin 1,
        depth 28: docs/design.md's "bin i covers [100 i, 100 (i + 1))").
        """
        return cls(depths, total_depth, num_timesteps, name=f"piecewise{list(depths)}")

    @classmethod
    def piecewise_sigma(cls, depths: Sequence[int], total_depth: int | None = None,
                        num_timesteps: int = 1000) -> "ExitSchedule":
        """Flow matching: equal-width bins over sigma in [0, 1]: bin i (sigma in [i / n, (i + 1) / n)) gives
        ``depths[i]``, data end (sigma 0) first. The model sees t = sigma * num_timesteps, so this is the table
        ``piecewise`` builds; sigma 1 (t = num_timesteps) falls in the last bin."""
        return cls(depths, total_depth, num_timesteps, name=f"piecewise_sigma{list(depths)}")

    @classmethod
    def from_sigmas(cls, depths_by_sigma, total_depth: int | None = None, num_timesteps: int = 1000,
                    resolution: int = 10000) -> "ExitSchedule":
        """Depths by sigma thresholds (flow matching, t = sigma * num_timesteps): ``{0.7: 12, 0.3: 18, 0.0: 24}``
        (or ``[(0.7, 12), (0.3, 18), (0.0, 24)]``) runs 12 blocks for sigma >= 0.7, 18 for 0.3 <= sigma < 0.7
        and 24 below. The thresholds lie in [0, 1], one of them 0 (every sigma needs a depth); they are
        placed on a grid of ``resolution`` bins over [0, 1] (exact for multiples of 1 / resolution)."""
        items = list(depths_by_sigma.items()) if isinstance(depths_by_sigma, dict) else list(depths_by_sigma)
        if not items:
            raise ValueError("ExitSchedule.from_sigmas: `depths_by_sigma` expected {sigma_threshold: depth, ...} "
                             "with a threshold at 0, got nothing")
        res = _as_int("from_sigmas", "resolution", resolution)
        if res < 1:
            raise ValueError(f"ExitSchedule.from_sigmas: `resolution` expected >= 1, got {res}")
        pairs = []
        for item in items:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"ExitSchedule.from_sigmas: `depths_by_sigma` expected (sigma, depth) pairs, "
                                 f"got {item!r}")
            sig, d = item
            if isinstance(sig, bool) or not isinstance(sig, (int, float)) or not (0 <= sig <= 1):
                raise ValueError(f"ExitSchedule.from_sigmas: thresholds expected numbers in [0, 1], got {sig!r}")
            pairs.append((float(sig), _as_int("from_sigmas", "depth", d)))
        pairs.sort(reverse=True)
        if pairs[-1][0] != 0.0:
            raise ValueError(f"ExitSchedule.from_sigmas: expected a threshold at sigma 0 (the depth near the data "
                             f"end), got thresholds {[p[0] for p in pairs]}")
        edges = [round(sig * res) for sig, _ in pairs]
        if len(set(edges)) != len(edges):
            raise ValueError(f"ExitSchedule.from_sigmas: thresholds {[p[0] for p in pairs]} expected distinct on the "
                             f"grid of {res} bins; raise `resolution`")
        table = [0] * res
        for (sig, d), lo in sorted(zip(pairs, edges), key=lambda z: z[1]):
            for k in range(lo, res):
                table[k] = d
        name = "from_sigmas{" + ", ".join(f"{sig:g}: {d}" for sig, d in pairs) + "}"
        return cls(table, total_depth, num_timesteps, name=name)

    @classmethod
    def linear(cls, min_depth: int, max_depth: int, num_timesteps: int = 1000) -> "ExitSchedule":
        """``max_depth`` at t = 0 down to ``min_depth`` at t = num_timesteps - 1, rounded, per integer timestep."""
        lo, hi = _as_int("linear", "min_depth", min_depth), _as_int("linear", "max_depth", max_depth)
        if not 1 <= lo <= hi:
            raise ValueError(f"ExitSchedule.linear: expected 1 <= min_depth <= max_depth, got {lo}, {hi}")
        last = max(num_timesteps - 1, 1)
        table = [int(hi - (hi - lo) * k / last + 0.5) for k in range(num_timesteps)]
        return cls(table, hi, num_timesteps, name=f"linear({lo}, {hi})")

    @classmethod
    def from_fn(cls, fn: Callable[[int], int], num_timesteps: int = 1000, total_depth: int | None = None) -> "ExitSchedule":
        """``fn(t)`` evaluated once at each integer timestep; a fractional t uses ``fn(floor(t))``."""
        table = [fn(k) for k in range(num_timesteps)]
        return cls(table, total_depth, num_timesteps, name=getattr(fn, "__name__", "from_fn"))

    @classmethod
    def full(cls, total_depth: int, num_timesteps: int = 1000) -> "ExitSchedule":
        """No early exit: every call runs all ``total_depth`` blocks."""
        return cls([total_depth], total_depth, num_timesteps, name="full")

    @classmethod
    def periodic(cls, k: int, depth: int, total_depth: int) -> "ExitSchedule":
        """Step-indexed (``exit_policy="cache"`` or ``"forecast"``): full depth at model calls 0, k, 2k, ...,
        ``depth`` otherwise. ``periodic(k, 0, L)`` with ``exit_policy="forecast"`` is diffusers' TaylorSeer shape
        (every block skipped between full calls, their contribution extrapolated)."""
        k = _as_int("periodic", "k", k)
        if k < 1:
            raise ValueError(f"ExitSchedule.periodic: `k` expected >= 1, got {k}")
        return cls([total_depth, depth], total_depth, period=k, name=f"periodic(k={k}, depth={depth})")

    @classmethod
    def preset(cls, name: str, total_depth: int | None = None) -> "ExitSchedule":
        """A named schedule (``presets()``): "ase-dit-xl" (the ASE reference, 28 blocks), "ase-demo" (its shape
        rescaled to ``total_depth``, default 28; mean depth about 0.71 of full), "full" (needs total_depth), and
        each family's own presets from the family table (``Family.presets``: e.g. "ase-sd3", "ase-flux"; rescaled
        for another ``total_depth``)."""
        known = presets()
        if name not in known:
            raise ValueError(f"ExitSchedule.preset: unknown name {name!r}; known: {sorted(known)}")
        return known[name](total_depth)

    def rescaled(self, total_depth: int) -> "ExitSchedule":
        """The same shape for a model of ``total_depth`` blocks: each depth scaled and rounded, at least 1 (0 stays 0)."""
        new = _as_int("rescaled", "total_depth", total_depth)
        if new < 1:
            raise ValueError(f"ExitSchedule.rescaled: `total_depth` expected >= 1, got {new}")
        table = [min(new, max(1 if d else 0, int(d * new / self.total_depth + 0.5))) for d in self.table]
        return ExitSchedule(table, new, self.num_timesteps, period=self.period, name=f"{self.name} -> {new}",
                            policies=self.policies, steps=self.steps, sampler=self.sampler,
                            forecast_order=self.forecast_order, forecast_target=self.forecast_target,
                            uncond=self.uncond)

    # ---------------------------------------------------------------- queries
    @property
    def step_indexed(self) -> bool:
        """True for ``periodic``: depth depends on the model-call index, not on t."""
        return self.period is not None

    @property
    def levels(self) -> tuple[int, ...]:
        """The distinct depths this schedule can produce, deepest first (one CUDA graph each)."""
        return tuple(sorted(set(self.table), reverse=True))

    def table_on(self, device) -> torch.Tensor:
        """The depth table as a LongTensor on ``device`` (copied once per device, then cached).

        Call it before CUDA-graph capture so that the copy is not captured.
        """
        device = torch.device(device)
        tab = self._device_tables.get(device)
        if tab is None:
            tab = self._device_tables[device] = torch.tensor(self.table, dtype=torch.long, device=device)
        return tab

    def depth(self, t: torch.Tensor) -> torch.Tensor:
        """t: tensor of timesteps (any shape, fractional allowed) -> LongTensor of depths, same shape and device.

        One gather from the device table, no host sync. Finite t outside [0, num_timesteps) clamps to the end
        bins. NaN / Inf t raise ValueError when t is on the CPU (reading host memory costs no sync); on a device
        they are not checked (that would need a sync, e.g. inside a CUDA graph): check there with ``plan()``.
        """
        if self.step_indexed:
            raise ValueError(f"ExitSchedule.depth: {self.name} is step-indexed (depends on the model-call index, "
                             "not on t); use plan(call_timesteps)")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"ExitSchedule.depth: `t` expected a torch.Tensor of timesteps, got {type(t).__name__}")
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"ExitSchedule.depth: `t` expected a real (float or integer) tensor, got {t.dtype}")
        if t.device.type == "cpu":
            _check_finite("depth", "t", t)
        tab = self.table_on(t.device)
        res = len(self.table)
        # float64 keeps bin edges exact: t * res / T is exact for integer t up to 2**53.
        tf = t.to(torch.float64) if t.device.type != "mps" else t.to(torch.float32)
        idx = torch.floor(tf * res / self.num_timesteps).clamp_(0, res - 1).long()
        return tab[idx]

    def plan(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The depth of each model call of a sampler run, given its call timesteps (S,) -> LongTensor (S,).

        Timestep-indexed: ``depth(timesteps)``. Step-indexed: call i runs full depth when ``i % period == 0``.
        Runs on the host ahead of a sampling loop: NaN / Inf timesteps raise ValueError (one read on a device).
        """
        if not isinstance(timesteps, torch.Tensor) or timesteps.dim() != 1:
            got = tuple(timesteps.shape) if isinstance(timesteps, torch.Tensor) else type(timesteps).__name__
            raise ValueError(f"ExitSchedule.plan: `timesteps` expected a 1-D tensor (one per model call), got {got}")
        if timesteps.device.type != "meta":  # a meta tensor has no values to check
            _check_finite("plan", "timesteps", timesteps)
        if not self.step_indexed:
            return self.depth(timesteps)
        calls = torch.arange(timesteps.shape[0], device=timesteps.device)
        full, short = self.table
        return torch.where(calls % self.period == 0, full, short)

    def policy_plan(self, timesteps: torch.Tensor) -> list[str] | None:
        """The exit policy of each model call (host strings, from the bins ``plan`` reads), or None when the schedule
        carries no per-call policies (the caller's ``exit_policy`` applies to every call)."""
        if self.policies is None:
            return None
        res = len(self.table)
        tf = timesteps.detach().to("cpu", torch.float64).reshape(-1)
        idx = torch.floor(tf * res / self.num_timesteps).clamp_(0, res - 1).long().tolist()
        return [self.policies[i] for i in idx]

    def uncond_modes(self, timesteps: torch.Tensor) -> list[str] | None:
        """Per model call, what the plan does with CFG's unconditional branch: "run", "forecast" or "drop"
        (``uncond``; from the bins ``plan`` reads), or None when it runs it at every call."""
        if self.uncond is None or set(self.uncond) == {"run"}:
            return None
        res = len(self.table)
        tf = timesteps.detach().to("cpu", torch.float64).reshape(-1)
        idx = torch.floor(tf * res / self.num_timesteps).clamp_(0, res - 1).long().tolist()
        return [self.uncond[i] for i in idx]

    def uncond_plan(self, timesteps: torch.Tensor) -> list[bool] | None:
        """Per model call, True where the plan forecasts CFG's unconditional branch (``uncond`` "forecast"), or
        None when it forecasts it nowhere."""
        modes = self.uncond_modes(timesteps)
        return None if modes is None or "forecast" not in modes else [m == "forecast" for m in modes]

    def check_one_policy(self, exit_policy: str, where: str) -> None:
        """For a runner of one exit policy per model (``accelerate``: in place or native): ValueError unless every
        call of this plan takes ``exit_policy`` (a schedule without per-call policies takes any)."""
        kinds = sorted(set(self.policies or ()))
        if kinds and kinds != [exit_policy]:
            raise ValueError(f"{where}: `schedule` {self.name!r} gives its calls the exit policies {kinds} (a joint "
                             f"plan); this tier runs one policy per model: expected a schedule of "
                             f"exit_policy={exit_policy!r} alone, or sample the plan with eekernels.sample")
        if self.uncond is not None and set(self.uncond) != {"run"}:
            verbs = {"forecast": "forecasts", "drop": "drops"}
            what = " or ".join(sorted(verbs[u] for u in set(self.uncond) - {"run"}))
            raise ValueError(f"{where}: `schedule` {self.name!r} {what} CFG's unconditional branch at some calls "
                             "(`uncond`); this tier leaves guidance to the pipeline or the caller: expected a schedule "
                             "that runs both halves at every call, or sample the plan with eekernels.sample")

    def mean_depth(self, timesteps: torch.Tensor) -> float:
        """Average depth over the model calls (a report figure: syncs once)."""
        return float(self.plan(timesteps).double().mean())

    def block_flop_fraction(self, timesteps: torch.Tensor) -> float:
        """Fraction of the full model's block FLOPs spent over these calls: mean depth / total depth, where a call
        that forecasts or drops CFG's unconditional branch (``uncond``) counts half (it runs half the batch)."""
        modes = self.uncond_modes(timesteps)
        if modes is None:
            return self.mean_depth(timesteps) / self.total_depth
        depths = self.plan(timesteps).double().tolist()
        return sum(d * (1.0 if m == "run" else 0.5) for d, m in zip(depths, modes)) / (len(depths) * self.total_depth)

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict:
        """The JSON document ``save`` writes (the one schedule file format, ``FORMAT``): format, version, table,
        total_depth, num_timesteps, period, name, calibration (the :class:`CalibrationReport` as a dict, or None)."""
        doc = {"format": FORMAT, "version": FORMAT_VERSION, "table": list(self.table),
               "total_depth": self.total_depth, "num_timesteps": self.num_timesteps, "period": self.period,
               "name": self.name, "calibration": None if self.calibration is None else self.calibration.to_dict()}
        # A joint plan's fields, only when set: a file without them is the one earlier eekernels write and read.
        for key in ("policies", "steps", "sampler", "forecast_order", "forecast_target", "uncond"):
            if getattr(self, key) is not None:
                doc[key] = list(getattr(self, key)) if key in ("policies", "uncond") else getattr(self, key)
        return doc

    def save(self, path) -> Path:
        """Write this schedule (and its calibration report) as a small JSON file; ``ExitSchedule.load`` reads it.
        The document is checked by the reader's rules first, so every file written here loads."""
        path = Path(path)
        where = f"ExitSchedule.save({str(path)!r})"
        if path.is_dir():
            raise ValueError(f"ExitSchedule.save: `path` expected a file name, got the directory {str(path)!r}")
        doc = self.to_dict()
        try:
            text = json.dumps(doc)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: `calibration` expected JSON-serializable values ({e})") from None
        type(self).from_dict(json.loads(text), where=where)
        if len(text.encode()) > MAX_FILE_BYTES:
            raise ValueError(f"{where}: the schedule file expected at most {MAX_FILE_BYTES} bytes, got "
                             f"{len(text.encode())}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    @classmethod
    def from_dict(cls, doc, *, where: str = "ExitSchedule.from_dict") -> "ExitSchedule":
        """The schedule of a ``to_dict`` document, every field checked (``_check_document``); its
        ``calibration`` entry becomes ``schedule.calibration``, a :class:`CalibrationReport`."""
        _check_document(doc, where)
        try:
            sched = cls(doc["table"], doc["total_depth"], doc["num_timesteps"], period=doc.get("period"),
                        name=doc["name"], policies=doc.get("policies"), steps=doc.get("steps"),
                        sampler=doc.get("sampler"), forecast_order=doc.get("forecast_order"),
                        forecast_target=doc.get("forecast_target"), uncond=doc.get("uncond"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if doc.get("calibration") is not None:
            sched.calibration = _report_from_dict(doc["calibration"], where, sched)
        return sched

    @classmethod
    def load(cls, path) -> "ExitSchedule":
        """Read a schedule file ``save`` wrote (also those of earlier eekernels: ``ExitSchedule.save`` and
        ``eekernels.calibration.save_schedule`` wrote this format). Named ValueErrors, naming the file and the
        field, for a missing file, a file over ``MAX_FILE_BYTES`` (checked before reading), bad JSON, another
        format, and any missing, unexpected or malformed field."""
        p = Path(path)
        where = f"ExitSchedule.load({str(path)!r})"
        if not p.is_file():
            raise ValueError(f"ExitSchedule.load: `path` expected a schedule file, got {str(path)!r} (no such file)")
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{where}: `path` expected a schedule file of at most {MAX_FILE_BYTES} bytes, got "
                             f"{size} bytes (not read)")
        with p.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # the size may have changed since stat
        if len(data) > MAX_FILE_BYTES:
            raise ValueError(f"{where}: `path` expected a schedule file of at most {MAX_FILE_BYTES} bytes, got more")
        try:
            doc = json.loads(data.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise ValueError(f"ExitSchedule.load: `path` expected a JSON schedule file, got {str(path)!r} "
                             f"({why})") from None
        return cls.from_dict(doc, where=where)

    @staticmethod
    def recorded(model) -> "dict | None":
        """The exit schedule ``model`` records in ``pretrained_meta["schedule"]`` (``{"preset": name, "table":
        depths}``, and ``"uncond"``, one mode per bin, for a plan that drops CFG's unconditional half; preset "full"
        for a full-depth fine-tune), or None where it records none: a model not
        fine-tuned for early exit (the shipped base models, a facebookresearch/DiT checkpoint)."""
        meta = (getattr(model, "pretrained_meta", None) or {}).get("schedule") or {}
        return meta if (meta.get("preset") or meta.get("table")) else None

    @classmethod
    def from_spec(cls, spec: str, model, *, option: str = "spec") -> "ExitSchedule | None":
        """A schedule for ``model`` from a text spec, or None for full depth (what the CLI's ``--schedule`` takes).

        ``auto`` (the schedule the model records, :meth:`recorded`; full depth where it records none, as a model
        not fine-tuned for early exit loses quality when truncated), ``full`` / ``none``,
        a preset name, ``periodic:K:DEPTH`` (full depth every K-th call), ``calibrated:FILE`` (a JSON schedule
        file, ``ExitSchedule.save`` / ``eekernels.calibration``), or depths per t-bin ``"12,12,10,..."``.
        ``option`` names the spec in error messages (the CLI passes ``"--schedule"``).
        """
        if not isinstance(spec, str):
            raise TypeError(f"ExitSchedule.from_spec: `{option}` expected a string, got {type(spec).__name__}")
        L = model.num_blocks
        spec = spec.strip()
        if spec in ("full", "none"):
            return None
        if spec == "auto":
            meta = cls.recorded(model)
            preset = None if meta is None else meta.get("preset")
            if meta is None or preset == "full":  # none recorded, or a full-depth fine-tune (finetune --schedule full)
                return None
            sched = cls.preset(preset, L) if preset in presets() else None
            if meta.get("uncond"):  # a plan that drops or forecasts CFG's unconditional half at some calls
                sched = cls(meta["table"], L, name=preset, uncond=meta["uncond"])
            elif meta.get("table") and (sched is None or list(sched.table) != list(meta["table"])):
                sched = cls.piecewise(meta["table"], total_depth=L)  # the table it was tuned with
            if sched is None:
                raise ValueError(f"{option} auto: the model records schedule {preset!r}, which is neither a preset "
                                 f"{sorted(presets())} nor has a table; give the schedule explicitly")
        elif spec.startswith("calibrated:"):
            file = spec[len("calibrated:"):].strip()
            if not file:
                raise ValueError(f"{option}: expected 'calibrated:FILE' (a schedule JSON file), got {spec!r}")
            sched = cls.load(file)
        elif spec in presets():
            sched = cls.preset(spec, L if spec != "ase-dit-xl" else None)
        elif spec.startswith("periodic:"):  # periodic:K:DEPTH, for exit_policy="cache"
            parts = spec.split(":")[1:]
            if len(parts) != 2 or not all(v.strip().isdigit() for v in parts):
                raise ValueError(f"{option}: expected 'periodic:K:DEPTH' (full depth every K-th model call, DEPTH "
                                 f"blocks otherwise, e.g. periodic:3:{max(1, L // 2)}), got {spec!r}")
            sched = cls.periodic(int(parts[0]), int(parts[1]), L)
        else:
            try:
                depths = [int(v) for v in spec.split(",")]
            except ValueError:
                raise ValueError(f"{option}: expected 'auto', 'full', a preset {sorted(presets())}, 'periodic:K:D', "
                                 f"'calibrated:FILE' or comma-separated depths, got {spec!r}") from None
            sched = cls.piecewise(depths, total_depth=L)
        sched.validate_for(model)
        return sched

    def validate_for(self, model, exit_policy: str | None = None) -> None:
        """Raise ValueError unless every depth of this schedule is valid for ``model`` (its ``num_blocks``,
        ``min_depth`` and, below it, ``min_reuse_depth``: a reuse policy's lowest depth) under ``exit_policy``
        (None: any policy; "drop": no depth below ``min_depth``, so no depth 0)."""
        total = getattr(model, "num_blocks", None)
        if total is None:
            raise ValueError(f"ExitSchedule.validate_for: `model` expected a score network with `num_blocks`, "
                             f"got {type(model).__name__}")
        lo = min_depth_of(model, reuse=exit_policy != "drop")
        if max(self.table) > total or self.total_depth > total:
            raise ValueError(f"ExitSchedule: schedule {self.name} goes to depth {max(max(self.table), self.total_depth)} "
                             f"but {type(model).__name__} has {total} blocks; use schedule.rescaled({total})")
        if min(self.table) < lo:
            raise ValueError(f"ExitSchedule: schedule {self.name} goes down to depth {min(self.table)} but "
                             f"{type(model).__name__} needs at least {lo} under exit_policy={exit_policy!r}"
                             + (" (depth 0 runs no block: only exit_policy 'cache' or 'forecast', on a model whose "
                                "min_reuse_depth is 0, can stand in for the whole stack)" if min(self.table) == 0 else
                                " (its always-run blocks)"))

    def _named(self, name: str) -> "ExitSchedule":
        self.name = name
        return self

    def __repr__(self) -> str:
        kind = f"period={self.period}" if self.step_indexed else f"bins={len(self.table)}, T={self.num_timesteps}"
        return f"ExitSchedule({self.name}, total_depth={self.total_depth}, {kind}, levels={self.levels})"


# ---------------------------------------------------------------- the schedule file

# One format, written by ExitSchedule.save and read by ExitSchedule.load (eekernels.calibration writes through them).
FORMAT = "eekernels.ExitSchedule"
FORMAT_VERSION = 1
MAX_FILE_BYTES = 8 * 2**20     # checked before a file is read; the largest real ones are about 1 MB (a cache
                               # calibration of FLUX's 57 blocks over 199 Heun calls), a 1000-bin table is 4 kB
MAX_NUM_TIMESTEPS = 100_000    # diffusion models train on 1000 (DDPM, flow) to 4000 (iDDPM) timesteps
MAX_BINS_PER_TIMESTEP = 10     # a table has at most 10 bins per timestep (from_sigmas' default: 10,000 over 1000)
MAX_DEPTH = 100_000            # total_depth (blocks)
_KEYS = {"format": True, "version": True, "table": True, "total_depth": True, "num_timesteps": True, "name": True,
         "period": False, "calibration": False, "policies": False, "steps": False, "sampler": False,
         "forecast_order": False, "forecast_target": False, "uncond": False}
# key: required (period and calibration: absent in older files; policies, steps, sampler, forecast_order,
# forecast_target, uncond: only a joint plan's)


@dataclass
class CalibrationReport:
    """What a calibration measured and chose (``eekernels.calibrate``): ``schedule.calibration``, saved and
    loaded with the schedule (the ``calibration`` entry of its file)."""

    exit_policy: str
    sampler: str
    steps: int
    cfg_scale: float
    budget: float
    num_blocks: int
    candidates: list
    call_timesteps: list
    weights: list
    plan: list              # depth per model call
    proxy: float            # the plan's proxy of the final-sample error
    block_flop_fraction: float
    measure: str            # "prefix" or "calls"
    num_samples: int
    model_calls: int        # forwards (prefix: full ones; calls: one per candidate and call)
    block_evaluations: float  # blocks run, in units of one full forward of the set
    seconds: float
    trajectory_seconds: float  # the full-depth trajectory alone (inside the calibration)
    reference_seconds: float | None = None  # one plain full-depth sample() run of the set, if timed
    max_reuse: int | None = None
    data_std: float | None = 0.5
    solver_options: dict = field(default_factory=dict)
    validation: dict | None = None  # validate_proxy's result (with its "seconds"), if run
    errors: list | None = None  # drop: [call][candidate]; cache: [j][k][candidate] (None = not measured)
    depth_costs: list | None = None  # integer cost per candidate (None: the depth itself, block units)
    cost_fraction: float | None = None  # the plan's cost over full depth's, under depth_costs
    select: str = "proxy"   # how the plan was chosen: "proxy" (the DP's optimum) or "closed-loop"
    selection: list | None = None  # closed-loop: [{"plan", "proxy", "real", "from"}], the candidates it sampled
    objective: str = "rms"  # what the closed loop's "real" is: "rms" to full depth, or the objective's __name__
    policies: list | None = None  # a joint plan: the exit policy per model call (exit_policy: the measurements')
    joint: dict | None = None  # a joint search (``calibrate(..., search=...)``): what it chose and what else it
    # measured: {"budget", "reference_steps", "baseline_steps", "beats_baseline", "chosen", "spent_fraction",
    #  "search", "alternatives": [{"steps", "policy", "plan", "policies", "spent_fraction", "real", "from"}]}

    def costs(self) -> dict:
        """{depth: integer cost} the DP used: ``depth_costs``, or the depth itself (block units)."""
        return dict(zip(self.candidates, self.depth_costs or self.candidates))

    def full_units(self, num_calls: int) -> int:
        return int(self.costs()[self.num_blocks]) * num_calls

    def to_dict(self) -> dict:
        return asdict(self)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    """A JSON number that is not NaN (Infinity allowed)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _is_finite(v) -> bool:
    return _is_real(v) and math.isfinite(v)


def _need(ok: bool, where: str, name: str, expected: str, got) -> None:
    if not ok:
        text = repr(got)
        raise ValueError(f"{where}: `{name}` expected {expected}, got {text if len(text) <= 80 else text[:77] + '...'}")


def _check_keys(doc: dict, where: str, prefix: str, required: list, known: list, what: str) -> None:
    missing = [k for k in required if k not in doc]
    if missing:
        raise ValueError(f"{where}: `{prefix}{missing[0]}` expected (a required key), got nothing: "
                         f"{'the file' if not prefix else 'the report'} lacks {', '.join(missing)}")
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise ValueError(f"{where}: `{prefix}{unknown[0]}` is not {what}")


def _check_document(doc, where: str) -> None:
    """Every top-level field of a schedule file: named ValueErrors (``where`` names the file)."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a JSON object with keys {', '.join(_KEYS)}, got {type(doc).__name__}")
    _need(doc.get("format") == FORMAT, where, "format", repr(FORMAT), doc.get("format"))
    _check_keys(doc, where, "", [k for k, required in _KEYS.items() if required], list(_KEYS),
                f"a key of the {FORMAT} format (keys: {', '.join(_KEYS)})")
    _need(doc["version"] == FORMAT_VERSION and _is_int(doc["version"]), where, "version",
          f"{FORMAT_VERSION} (this eekernels reads version {FORMAT_VERSION})", doc["version"])
    T, total, period = doc["num_timesteps"], doc["total_depth"], doc.get("period")
    _need(_is_int(T) and 1 <= T <= MAX_NUM_TIMESTEPS, where, "num_timesteps",
          f"a positive integer <= {MAX_NUM_TIMESTEPS}", T)
    _need(_is_int(total) and 1 <= total <= MAX_DEPTH, where, "total_depth", f"a positive integer <= {MAX_DEPTH}", total)
    _need(period is None or (_is_int(period) and period >= 1), where, "period", "a positive integer or null", period)
    _need(doc["name"] is None or isinstance(doc["name"], str), where, "name", "a string or null", doc["name"])
    table = doc["table"]
    most = 2 if period is not None else MAX_BINS_PER_TIMESTEP * T
    if not isinstance(table, list) or not 1 <= len(table) <= most or (period is not None and len(table) != 2):
        what = (f"[full, truncated] for a step-indexed schedule (period {period})" if period is not None else
                f"a list of 1 to {most} depths ({MAX_BINS_PER_TIMESTEP} bins per timestep, num_timesteps {T})")
        got = f"{len(table)} entries" if isinstance(table, list) else table
        raise ValueError(f"{where}: `table` expected {what}, got {got}"[:400])
    for i, d in enumerate(table):
        _need(_is_int(d), where, f"table[{i}]", "an integer depth", d)
        _need(0 <= d <= total, where, f"table[{i}]", f"a depth in [0, total_depth={total}]", d)


def _report_from_dict(rep, where: str, sched: ExitSchedule) -> CalibrationReport:
    """The ``calibration`` entry of a schedule file as a :class:`CalibrationReport`, every field checked: types,
    ranges, and lengths against the model calls (``call_timesteps``) and the candidate depths."""
    if not isinstance(rep, dict):
        raise ValueError(f"{where}: `calibration` expected a JSON object (a calibration report) or null, got "
                         f"{type(rep).__name__}")
    _check_keys(rep, where, "calibration.", [f.name for f in fields(CalibrationReport) if f.default is MISSING
                                              and f.default_factory is MISSING],
                [f.name for f in fields(CalibrationReport)], "a field of a calibration report")

    g = rep.get
    nonneg = lambda v: _is_finite(v) and v >= 0  # noqa: E731
    for name, ok, expected in (
        ("exit_policy", g("exit_policy") in ("drop", "cache"), "'drop' or 'cache'"),
        ("sampler", isinstance(g("sampler"), str) and g("sampler") != "", "a sampler name"),
        ("steps", _is_int(g("steps")) and g("steps") >= 1, "an integer >= 1"),
        ("cfg_scale", _is_finite(g("cfg_scale")), "a finite number"),
        ("budget", _is_finite(g("budget")) and 0 < g("budget") <= 1, "a fraction in (0, 1]"),
        ("num_blocks", g("num_blocks") == sched.total_depth and _is_int(g("num_blocks")),
         f"the schedule's total_depth {sched.total_depth}"),
        ("proxy", _is_real(g("proxy")) and g("proxy") >= 0, "a number >= 0"),
        ("block_flop_fraction", _is_finite(g("block_flop_fraction")) and 0 < g("block_flop_fraction") <= 1,
         "a fraction in (0, 1]"),
        ("measure", g("measure") in ("prefix", "calls"), "'prefix' or 'calls'"),
        ("num_samples", _is_int(g("num_samples")) and g("num_samples") >= 1, "an integer >= 1"),
        ("model_calls", _is_int(g("model_calls")) and g("model_calls") >= 0, "an integer >= 0"),
        ("block_evaluations", nonneg(g("block_evaluations")), "a finite number >= 0"),
        ("seconds", nonneg(g("seconds")), "a finite number >= 0"),
        ("trajectory_seconds", nonneg(g("trajectory_seconds")), "a finite number >= 0"),
        ("reference_seconds", g("reference_seconds") is None or nonneg(g("reference_seconds")),
         "a finite number >= 0 or null"),
        ("max_reuse", (_is_int(g("max_reuse")) and g("max_reuse") >= 1) if g("exit_policy") == "cache"
         else g("max_reuse") is None, "an integer >= 1 for exit_policy 'cache', null for 'drop'"),
        ("data_std", g("data_std") is None or (_is_finite(g("data_std")) and g("data_std") > 0),
         "a finite number > 0 or null"),
        ("solver_options", isinstance(g("solver_options", {}), dict), "a JSON object of solver options"),
        ("validation", g("validation") is None or isinstance(g("validation"), dict), "a JSON object or null"),
        ("cost_fraction", g("cost_fraction") is None or (_is_finite(g("cost_fraction")) and 0 < g("cost_fraction") <= 1),
         "a fraction in (0, 1] or null"),
        ("select", g("select", "proxy") in ("proxy", "closed-loop"), "'proxy' or 'closed-loop'"),
        ("objective", isinstance(g("objective", "rms"), str) and 0 < len(g("objective", "rms")) <= 200,
         "a name (1 to 200 characters)"),
    ):
        _need(ok, where, f"calibration.{name}", expected, g(name))

    def items(name, value, n, ok, expected):
        """``value`` is a list of ``n`` entries (any length >= 1 for n None), each passing ``ok``."""
        if not isinstance(value, list) or not (len(value) == n if n is not None else len(value) >= 1):
            got = f"{len(value)} entries" if isinstance(value, list) else repr(value)[:80]
            raise ValueError(f"{where}: `calibration.{name}` expected a list of {n if n is not None else '1 or more'} "
                             f"entries, got {got}")
        for i, v in enumerate(value):
            _need(ok(v), where, f"calibration.{name}[{i}]", expected, v)

    L = sched.total_depth
    cands = g("candidates")
    items("candidates", cands, None, lambda d: _is_int(d) and 0 <= d <= L, f"a depth in [0, {L}]")
    _need(cands == sorted(set(cands)) and cands[-1] == L, where, "calibration.candidates",
          f"increasing depths ending at num_blocks {L}", cands)
    calls = g("call_timesteps")
    items("call_timesteps", calls, None, lambda t: _is_finite(t) and t >= 0, "a finite timestep >= 0")
    n, C = len(calls), len(cands)
    items("weights", g("weights"), n, lambda w: _is_finite(w) and w >= 0, "a finite weight >= 0")
    in_cands = lambda d: _is_int(d) and d in cands  # noqa: E731
    items("plan", g("plan"), n, in_cands, f"a candidate depth {cands}")
    row_ok = lambda r: isinstance(r, list) and len(r) == C and all(_is_finite(e) and e >= 0 for e in r)  # noqa: E731
    errors = g("errors")
    if errors is not None:
        if g("exit_policy") == "drop":
            items("errors", errors, n, row_ok, f"a list of {C} finite errors >= 0 (one per candidate)")
        else:
            items("errors", errors, n, lambda r: isinstance(r, list) and len(r) == n and
                  all(c is None or row_ok(c) for c in r), f"a list of {n} entries, each null or {C} errors >= 0")
    if g("depth_costs") is not None:
        items("depth_costs", g("depth_costs"), C, lambda c: _is_int(c) and c >= 0, "an integer cost >= 0")
        for i, (c, d) in enumerate(zip(g("depth_costs"), cands)):  # only depth 0 (no block) may cost nothing
            _need(c >= 1 or d == 0, where, f"calibration.depth_costs[{i}]", "an integer cost >= 1 (depth "
                  f"{d} runs blocks)", c)
    if g("selection") is not None:
        items("selection", g("selection"), None, lambda r: isinstance(r, dict) and isinstance(r.get("plan"), list)
              and len(r["plan"]) == n and all(in_cands(d) for d in r["plan"]) and _is_real(r.get("proxy"))
              and _is_finite(r.get("real")), f'{{"plan": {n} candidate depths, "proxy", "real"}}')
    if g("policies") is not None:
        items("policies", g("policies"), n, lambda p: p in POLICIES, f"an exit policy {POLICIES}")
    if g("joint") is not None:
        _check_joint(g("joint"), where)
    if g("validation") is not None:
        val = g("validation")
        items("validation.plans", val.get("plans"), None, lambda r: isinstance(r, dict)
              and isinstance(r.get("plan"), list) and len(r["plan"]) == n and all(in_cands(d) for d in r["plan"])
              and _is_real(r.get("proxy")) and _is_finite(r.get("real")),
              f'{{"plan": {n} candidate depths, "proxy", "real", ...}}')
        _need(isinstance(val.get("spearman"), (int, float)) and not isinstance(val.get("spearman"), bool), where,
              "calibration.validation.spearman", "a number (NaN when undefined)", val.get("spearman"))
    return CalibrationReport(**rep)


def _check_joint(joint, where: str) -> None:
    """A report's ``joint`` entry: the search's choice and its alternatives, each checked."""
    _need(isinstance(joint, dict), where, "calibration.joint", "a JSON object", joint)
    _check_keys(joint, where, "calibration.joint.", list(_JOINT_KEYS), list(_JOINT_KEYS), "a field of a joint search")
    g = joint.get
    steps_ok = lambda v: _is_int(v) and v >= 1  # noqa: E731
    for name, ok, expected in (
        ("budget", _is_finite(g("budget")) and 0 < g("budget") <= 1, "a fraction in (0, 1]"),
        ("reference_steps", steps_ok(g("reference_steps")), "an integer >= 1"),
        ("baseline_steps", g("baseline_steps") is None or steps_ok(g("baseline_steps")), "an integer >= 1 or null"),
        ("beats_baseline", g("beats_baseline") in (True, False, None), "true, false or null"),
        ("chosen", isinstance(g("chosen"), str), "the chosen alternative's name"),
        ("spent_fraction", _is_finite(g("spent_fraction")) and 0 < g("spent_fraction") <= 1, "a fraction in (0, 1]"),
        ("search", isinstance(g("search"), list) and all(isinstance(v, str) for v in g("search")), "a list of names"),
        ("alternatives", isinstance(g("alternatives"), list) and len(g("alternatives")) >= 1,
         "a list of 1 or more rows"),
    ):
        _need(ok, where, f"calibration.joint.{name}", expected, g(name))
    for i, r in enumerate(g("alternatives")):
        ok = (isinstance(r, dict) and set(_ALTERNATIVE_KEYS) <= set(r) <= {*_ALTERNATIVE_KEYS, *_FORECAST_KEYS, "uncond"}
              and (r.get("uncond") is None or isinstance(r["uncond"], list) and len(r["uncond"]) == len(r["plan"])
                   and all(u in UNCOND_MODES for u in r["uncond"]))
              and r.get("forecast_order") in (None, 1, 2) and r.get("forecast_target") in (None, *FORECAST_TARGETS)
              and steps_ok(r["steps"])
              and isinstance(r["plan"], list) and all(_is_int(d) and d >= 0 for d in r["plan"])
              and isinstance(r["policies"], list) and len(r["policies"]) == len(r["plan"])
              and all(p in POLICIES for p in r["policies"]) and _is_finite(r["spent_fraction"])
              and _is_finite(r["real"]) and all(isinstance(r[k], str) for k in ("name", "policy", "from")))
        _need(ok, where, f"calibration.joint.alternatives[{i}]",
              f"{{{', '.join(_ALTERNATIVE_KEYS)}}} (and optionally forecast_order 1 or 2, forecast_target "
              f"{FORECAST_TARGETS}, uncond {UNCOND_MODES} per call) with one depth and one policy per call", r)


_JOINT_KEYS = ("budget", "reference_steps", "baseline_steps", "beats_baseline", "chosen", "spent_fraction", "search",
               "alternatives")
_ALTERNATIVE_KEYS = ("name", "steps", "policy", "plan", "policies", "spent_fraction", "real", "from")
_FORECAST_KEYS = ("forecast_order", "forecast_target")  # optional in a row: how its forecasting calls ran


def _check_uncond(where: str, uncond, table, total: int, period, policies=None) -> tuple | None:
    """A plan's ``uncond`` (one of ``UNCOND_MODES`` per bin), checked: a timestep-indexed schedule, full depth
    wherever the unconditional branch is forecast (that call runs the conditional half alone, at full depth), and
    the "drop" exit policy wherever it is dropped below full depth (that call runs the conditional half alone,
    outside the reuse caches, which hold the whole batch)."""
    if uncond is None:
        return None
    uncond = _per_bin(where, "uncond", uncond, UNCOND_MODES, f"one of {UNCOND_MODES}", len(table), period)
    short = [i for i, (u, d) in enumerate(zip(uncond, table)) if u == "forecast" and d != total]
    if short:
        raise ValueError(f"{where}: `uncond` 'forecast' expected at full depth ({total}) only (the call runs the "
                         f"conditional half alone, every block), got depth {table[short[0]]} in bin {short[0]}")
    reuse = [i for i, u in enumerate(uncond) if u == "drop" and table[i] < total and policies is not None
             and policies[i] != "drop"]
    if reuse:
        i = reuse[0]
        raise ValueError(f"{where}: `uncond` 'drop' below full depth expected with the 'drop' exit policy (the call "
                         f"runs the conditional half alone, outside the reuse caches), got policy {policies[i]!r} at "
                         f"depth {table[i]} in bin {i}")
    return uncond


def _per_bin(where: str, key: str, values, names: tuple, one: str, bins: int, period) -> tuple:
    """``values``: a list or tuple of ``bins`` entries from ``names`` (``one`` says what one entry is), on a
    timestep-indexed schedule; named ValueError otherwise."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)) or len(values) != bins:
        got = f"{len(values)} entries" if isinstance(values, (list, tuple)) else repr(values)[:80]
        raise ValueError(f"{where}: `{key}` expected {one} per table bin ({bins}), got {got}")
    bad = [v for v in values if v not in names]
    if bad:
        raise ValueError(f"{where}: `{key}` expected names in {names}, got {bad[0]!r}")
    if period is not None:
        raise ValueError(f"{where}: `{key}` expected only on a timestep-indexed schedule, got period {period}")
    return tuple(values)


def _check_plan_fields(where: str, policies, steps, sampler, bins: int, period) -> tuple:
    """A joint plan's ``policies`` (one per bin, a policy name each), ``steps`` and ``sampler``, checked."""
    if policies is not None:
        policies = _per_bin(where, "policies", policies, POLICIES, "one exit policy", bins, period)
    if steps is not None and (not _is_int(steps) or steps < 1):
        raise ValueError(f"{where}: `steps` expected an integer >= 1 or None, got {steps!r}")
    if sampler is not None and (not isinstance(sampler, str) or not sampler):
        raise ValueError(f"{where}: `sampler` expected a sampler name or None, got {sampler!r}")
    return policies, steps, sampler


def _check_finite(where: str, name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = t[~torch.isfinite(t)].reshape(-1)[0].item()
        raise ValueError(f"ExitSchedule.{where}: `{name}` expected finite timesteps, got {bad} "
                         f"(at {int((~torch.isfinite(t)).reshape(-1).nonzero()[0])} of {t.numel()} entries, flattened)")


def _as_int(where: str, name: str, v) -> int:
    """Python and numpy ints (anything with ``__index__``), not bools or floats."""
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise ValueError(f"ExitSchedule.{where}: `{name}` expected an int, got {v!r}")
    return operator.index(v)


def _ase_dit_xl(total_depth):
    if total_depth not in (None, 28):
        raise ValueError(f"ExitSchedule.preset('ase-dit-xl'): the reference is for 28 blocks, got total_depth="
                         f"{total_depth}; use preset('ase-demo', total_depth={total_depth})")
    return ExitSchedule.piecewise(ASE_DIT_XL)._named("ase-dit-xl")


def _ase_demo(total_depth):
    return ExitSchedule.piecewise(ASE_DIT_XL).rescaled(total_depth or 28)._named(f"ase-demo({total_depth or 28})")


def _full(total_depth):
    if total_depth is None:
        raise ValueError("ExitSchedule.preset('full'): `total_depth` expected the model's depth, got None")
    return ExitSchedule.full(total_depth)


def _family_preset(name: str, spec: tuple):
    """A family's preset ``(table over ten equal bins, the depth it is for, "t" or "sigma")`` as a factory."""
    table, native, axis = spec

    def make(total_depth):
        sched = ExitSchedule.piecewise_sigma(table) if axis == "sigma" else ExitSchedule.piecewise(table)
        if total_depth not in (None, native):
            sched = sched.rescaled(total_depth)
        return sched._named(name if total_depth in (None, native) else f"{name}({total_depth})")
    return make


#: The method's presets; each family adds its own (``presets()``).
PRESETS = {"ase-dit-xl": _ase_dit_xl, "ase-demo": _ase_demo, "full": _full}


def presets() -> dict:
    """Every preset name: the method's (``PRESETS``) and the family table's (``Family.presets``)."""
    from eekernels import families

    out = dict(PRESETS)
    for fam in families.families().values():
        for name, spec in fam.presets.items():
            if name in out:
                raise ValueError(f"ExitSchedule presets: family {fam.name!r} declares {name!r}, which is taken")
            out[name] = _family_preset(name, spec)
    return out


__all__ = ["ExitSchedule", "CalibrationReport", "PRESETS", "presets", "ASE_DIT_XL", "FORMAT", "MAX_FILE_BYTES"]
