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
Depths must lie in [1, total_depth]. Schedules need not be monotone in t (any shape is accepted; ASE's are
non-increasing toward the noise end, but a user may e.g. spend more blocks mid-trajectory).
"""
from __future__ import annotations

import operator
from typing import Callable, Sequence

import torch

# ASE reference schedule for DiT-XL/2 (28 blocks): ten equal bins of t, full depth near the data end.
ASE_DIT_XL = (28, 28, 24, 24, 20, 20, 16, 16, 12, 12)


class ExitSchedule:
    """Maps timesteps (or model-call indices) to exit depths; see the module docstring."""

    def __init__(self, table: Sequence[int], total_depth: int | None = None, num_timesteps: int = 1000,
                 *, period: int | None = None, name: str | None = None):
        """``table``: depth per bin (equal-width bins over [0, num_timesteps)); ``total_depth``: the model
        depth the schedule is written for (default: the table's maximum). With ``period`` the schedule is
        step-indexed: ``table`` holds ``(full, truncated)`` and call i runs full depth when ``i % period == 0``.
        Prefer the named constructors."""
        table = [_as_int("ExitSchedule", "depths", d) for d in table]
        if not table:
            raise ValueError("ExitSchedule: `depths` expected at least one depth, got an empty sequence")
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"ExitSchedule: `num_timesteps` expected a positive int, got {num_timesteps!r}")
        total = max(table) if total_depth is None else _as_int("ExitSchedule", "total_depth", total_depth)
        bad = [d for d in table if not 1 <= d <= total]
        if bad or total < 1:
            raise ValueError(f"ExitSchedule: depths expected in [1, total_depth={total}], got {bad or total}")
        self.table = tuple(table)
        self.total_depth = total
        self.num_timesteps = num_timesteps
        self.period = period
        self.name = name
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
        """Step-indexed (``exit_policy="cache"``): full depth at model calls 0, k, 2k, ..., ``depth`` otherwise."""
        k = _as_int("periodic", "k", k)
        if k < 1:
            raise ValueError(f"ExitSchedule.periodic: `k` expected >= 1, got {k}")
        return cls([total_depth, depth], total_depth, period=k, name=f"periodic(k={k}, depth={depth})")

    @classmethod
    def preset(cls, name: str, total_depth: int | None = None) -> "ExitSchedule":
        """A named schedule (``PRESETS``): "ase-dit-xl" (the ASE reference, 28 blocks), "ase-demo" (its shape
        rescaled to ``total_depth``, default 28; mean depth about 0.71 of full), "full" (needs total_depth)."""
        if name not in PRESETS:
            raise ValueError(f"ExitSchedule.preset: unknown name {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[name](total_depth)

    def rescaled(self, total_depth: int) -> "ExitSchedule":
        """The same shape for a model of ``total_depth`` blocks: each depth scaled and rounded, at least 1."""
        new = _as_int("rescaled", "total_depth", total_depth)
        if new < 1:
            raise ValueError(f"ExitSchedule.rescaled: `total_depth` expected >= 1, got {new}")
        table = [min(new, max(1, int(d * new / self.total_depth + 0.5))) for d in self.table]
        return ExitSchedule(table, new, self.num_timesteps, period=self.period, name=f"{self.name} -> {new}")

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

    def mean_depth(self, timesteps: torch.Tensor) -> float:
        """Average depth over the model calls (a report figure: syncs once)."""
        return float(self.plan(timesteps).double().mean())

    def block_flop_fraction(self, timesteps: torch.Tensor) -> float:
        """Fraction of the full model's block FLOPs spent over these calls: mean depth / total depth."""
        return self.mean_depth(timesteps) / self.total_depth

    @classmethod
    def from_spec(cls, spec: str, model, *, option: str = "spec") -> "ExitSchedule | None":
        """A schedule for ``model`` from a text spec, or None for full depth (what the CLI's ``--schedule`` takes).

        ``auto`` (the schedule the model records in ``pretrained_meta``, else ``ase-demo``), ``full`` / ``none``,
        a preset name, ``periodic:K:DEPTH`` (full depth every K-th call), or depths per t-bin ``"12,12,10,..."``.
        ``option`` names the spec in error messages (the CLI passes ``"--schedule"``).
        """
        if not isinstance(spec, str):
            raise TypeError(f"ExitSchedule.from_spec: `{option}` expected a string, got {type(spec).__name__}")
        L = model.num_blocks
        spec = spec.strip()
        if spec in ("full", "none"):
            return None
        if spec == "auto":
            meta = (getattr(model, "pretrained_meta", None) or {}).get("schedule") or {}
            preset = meta.get("preset", "ase-demo")
            if preset == "full":  # a full-depth fine-tune (eekernels finetune --schedule full records it so)
                return None
            sched = cls.preset(preset, L) if preset in PRESETS else None
            if meta.get("table") and (sched is None or list(sched.table) != list(meta["table"])):
                sched = cls.piecewise(meta["table"], total_depth=L)  # the table it was tuned with
            if sched is None:
                raise ValueError(f"{option} auto: the model records schedule {preset!r}, which is neither a preset "
                                 f"{sorted(PRESETS)} nor has a table; give the schedule explicitly")
        elif spec in PRESETS:
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
                raise ValueError(f"{option}: expected 'auto', 'full', a preset {sorted(PRESETS)}, 'periodic:K:D' "
                                 f"or comma-separated depths, got {spec!r}") from None
            sched = cls.piecewise(depths, total_depth=L)
        sched.validate_for(model)
        return sched

    def validate_for(self, model) -> None:
        """Raise ValueError unless every depth of this schedule is valid for ``model`` (its
        ``num_blocks`` and ``min_depth``)."""
        total = getattr(model, "num_blocks", None)
        if total is None:
            raise ValueError(f"ExitSchedule.validate_for: `model` expected a score network with `num_blocks`, "
                             f"got {type(model).__name__}")
        lo = getattr(model, "min_depth", 1)
        if max(self.table) > total or self.total_depth > total:
            raise ValueError(f"ExitSchedule: schedule {self.name} goes to depth {max(max(self.table), self.total_depth)} "
                             f"but {type(model).__name__} has {total} blocks; use schedule.rescaled({total})")
        if min(self.table) < lo:
            raise ValueError(f"ExitSchedule: schedule {self.name} goes down to depth {min(self.table)} but "
                             f"{type(model).__name__} needs at least {lo} (its always-run blocks)")

    def _named(self, name: str) -> "ExitSchedule":
        self.name = name
        return self

    def __repr__(self) -> str:
        kind = f"period={self.period}" if self.step_indexed else f"bins={len(self.table)}, T={self.num_timesteps}"
        return f"ExitSchedule({self.name}, total_depth={self.total_depth}, {kind}, levels={self.levels})"


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


PRESETS = {"ase-dit-xl": _ase_dit_xl, "ase-demo": _ase_demo, "full": _full}

__all__ = ["ExitSchedule", "PRESETS", "ASE_DIT_XL"]
