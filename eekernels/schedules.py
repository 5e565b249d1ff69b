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

**Flow-matching models** (SD3, FLUX; the ``flow_*`` solvers) use the same t in [0, 1000): the model is called
with t = sigma * 1000 (sigma in [0, 1], 1 is pure noise), what diffusers' SD3 transformer takes. So a schedule
over t is a schedule over sigma: ``piecewise_sigma`` bins sigma (the same table as ``piecewise``), and
``from_sigmas({0.7: 12, 0.3: 18, 0.0: 24})`` gives depths by sigma thresholds. Shifted flow schedules (SD3's
shift 3) spend most steps at high sigma: the presets "ase-sd3" (24 blocks) and "ase-flux" (19 double + 38 single
= 57 blocks) are written for a 28-step, shift-3 flow schedule and spend the DiT reference's block fraction there
(20/28 of full depth, as "ase-dit-xl" does over uniform t).

Schedules are saved and loaded as small JSON files (``save`` / ``load``; ``from_spec("calibrated:FILE", model)``),
the format ``eekernels.calibration`` writes for calibrated schedules.
"""
from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Callable, Sequence

import torch

# ASE reference schedule for DiT-XL/2 (28 blocks): ten equal bins of t, full depth near the data end.
ASE_DIT_XL = (28, 28, 24, 24, 20, 20, 16, 16, 12, 12)
# The same block fraction (20/28) under a 28-step shift-3 flow schedule (FlowMatchEulerDiscreteScheduler(shift=3),
# SD3's default), over ten equal bins of sigma: the calls per bin there are [1, 2, 1, 1, 2, 2, 3, 4, 5, 7] (data
# end first), so the tables keep more depth toward the noise end than the DiT reference does. Chosen as the
# monotone tables of at most 5 levels nearest (call-weighted) to the DiT shape mapped by trajectory position.
ASE_SD3 = (24, 24, 24, 24, 20, 20, 20, 17, 15, 11)   # SD3 / SD3.5-medium: 24 joint blocks
ASE_FLUX = (57, 57, 57, 57, 57, 46, 46, 41, 33, 26)  # FLUX.1: 19 double + 38 single blocks, in execution order
FORMAT = "eekernels.ExitSchedule"  # the JSON files of save() / load() (and of eekernels.calibration)


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
        """Step-indexed (``exit_policy="cache"``): full depth at model calls 0, k, 2k, ..., ``depth`` otherwise."""
        k = _as_int("periodic", "k", k)
        if k < 1:
            raise ValueError(f"ExitSchedule.periodic: `k` expected >= 1, got {k}")
        return cls([total_depth, depth], total_depth, period=k, name=f"periodic(k={k}, depth={depth})")

    @classmethod
    def preset(cls, name: str, total_depth: int | None = None) -> "ExitSchedule":
        """A named schedule (``PRESETS``): "ase-dit-xl" (the ASE reference, 28 blocks), "ase-demo" (its shape
        rescaled to ``total_depth``, default 28; mean depth about 0.71 of full), "ase-sd3" (24 blocks) and
        "ase-flux" (57 = 19 double + 38 single blocks): 20/28 of the blocks under a 28-step shift-3 flow
        schedule (rescaled for another ``total_depth``), "full" (needs total_depth)."""
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

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict:
        """The JSON document ``save`` writes: format, version, table, total_depth, num_timesteps, period, name
        (and ``calibration``: the report a calibration attached, when it has one)."""
        doc = {"format": FORMAT, "version": 1, "table": list(self.table), "total_depth": self.total_depth,
               "num_timesteps": self.num_timesteps, "period": self.period, "name": self.name}
        rep = getattr(self, "calibration", None)
        if rep is None:
            rep = getattr(self, "calibration_data", None)
        if rep is not None:
            doc["calibration"] = rep.to_dict() if hasattr(rep, "to_dict") else rep
        return doc

    def save(self, path) -> Path:
        """Write this schedule as a small JSON file (``to_dict``); ``ExitSchedule.load`` reads it back."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"ExitSchedule.save: `path` expected a file name, got the directory {str(path)!r}")
        doc = self.to_dict()
        try:
            text = json.dumps(doc)
        except (TypeError, ValueError) as e:
            raise ValueError(f"ExitSchedule.save: the schedule's calibration report is not JSON-serializable ({e})") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    @classmethod
    def from_dict(cls, doc, *, where: str = "ExitSchedule.from_dict") -> "ExitSchedule":
        """The schedule of a ``to_dict`` document (named ValueErrors for anything malformed). A ``calibration``
        entry is kept, as a plain dict, in ``schedule.calibration_data``."""
        if not isinstance(doc, dict):
            raise ValueError(f"{where}: expected a JSON object with keys format, table, total_depth, got "
                             f"{type(doc).__name__}")
        if doc.get("format") != FORMAT:
            raise ValueError(f"{where}: `format` expected {FORMAT!r}, got {doc.get('format')!r}")
        version = doc.get("version", 1)
        if version != 1:
            raise ValueError(f"{where}: `version` expected 1 (this eekernels reads version 1), got {version!r}")
        table = doc.get("table")
        if not isinstance(table, list) or not table or not all(isinstance(d, int) and not isinstance(d, bool)
                                                             for d in table):
            raise ValueError(f"{where}: `table` expected a non-empty list of integer depths, got {table!r}"[:300])
        for key in ("total_depth", "num_timesteps", "period"):
            v = doc.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{where}: `{key}` expected a positive integer or null, got {v!r}")
        name = doc.get("name")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"{where}: `name` expected a string or null, got {name!r}")
        period = doc.get("period")
        if period is not None and len(table) != 2:
            raise ValueError(f"{where}: `table` expected [full, truncated] for a step-indexed schedule (period "
                             f"{period}), got {len(table)} entries")
        try:
            sched = cls(table, doc.get("total_depth"), doc.get("num_timesteps") or 1000, period=period, name=name)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if doc.get("calibration") is not None:
            sched.calibration_data = doc["calibration"]
        return sched

    @classmethod
    def load(cls, path) -> "ExitSchedule":
        """Read a schedule ``save`` (or ``eekernels.calibration.save_schedule``) wrote. Named ValueErrors for a
        missing file, bad JSON, another format, a bad table or bad depths."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"ExitSchedule.load: `path` expected a schedule file, got {str(path)!r} (no such file)")
        try:
            doc = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"ExitSchedule.load: `path` expected a JSON schedule file, got {str(path)!r} ({e})") from None
        return cls.from_dict(doc, where=f"ExitSchedule.load({str(path)!r})")

    @classmethod
    def from_spec(cls, spec: str, model, *, option: str = "spec") -> "ExitSchedule | None":
        """A schedule for ``model`` from a text spec, or None for full depth (what the CLI's ``--schedule`` takes).

        ``auto`` (the schedule the model records in ``pretrained_meta``, else ``ase-demo``), ``full`` / ``none``,
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
        elif spec.startswith("calibrated:"):
            file = spec[len("calibrated:"):].strip()
            if not file:
                raise ValueError(f"{option}: expected 'calibrated:FILE' (a schedule JSON file), got {spec!r}")
            sched = cls.load(file)
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
                raise ValueError(f"{option}: expected 'auto', 'full', a preset {sorted(PRESETS)}, 'periodic:K:D', "
                                 f"'calibrated:FILE' or comma-separated depths, got {spec!r}") from None
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


def _flow_preset(name: str, table: tuple, native: int):
    def make(total_depth):
        sched = ExitSchedule.piecewise_sigma(table)
        if total_depth not in (None, native):
            sched = sched.rescaled(total_depth)
        return sched._named(name if total_depth in (None, native) else f"{name}({total_depth})")
    return make


PRESETS = {"ase-dit-xl": _ase_dit_xl, "ase-demo": _ase_demo, "full": _full,
           "ase-sd3": _flow_preset("ase-sd3", ASE_SD3, 24), "ase-flux": _flow_preset("ase-flux", ASE_FLUX, 57)}

__all__ = ["ExitSchedule", "PRESETS", "ASE_DIT_XL", "ASE_SD3", "ASE_FLUX", "FORMAT"]
