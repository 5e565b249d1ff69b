"""The family table: every model family eekernels runs is declared here once, one file per family.

A :class:`Family` says which classes and pipelines it covers, which block lists run in which order (and, for
families whose blocks are not in diffusers' ``TransformerBlockRegistry``, which output is the image stream), how
the model's timestep relates to eekernels' t in [0, 1000), its native fused model and converter if it has one,
and which parameters are which for fine-tuning. ``accelerate``, the loaders, ``configs()``, the trainer and
``eekernels info`` read the table; nothing else names a family.

The built-in families are the modules of this package (found by listing it, not by a list of names). A user
registers their own transformer the same way, with :func:`register` (see ``python/examples/07_register_family.py``).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

__all__ = ["Family", "PrefixExit", "LevelExit", "register", "unregister", "families", "family_of",
           "family_of_pipeline", "get", "scaled_step_t"]


# --------------------------------------------------------------------------------------------------
# Exit rules
# --------------------------------------------------------------------------------------------------
JOINT_ORDERS = ("text-first", "image-first")


@dataclass(frozen=True)
class PrefixExit:
    """``depth = d`` runs the first d blocks of the block lists taken in execution order, then the model's own head.

    blocks: the attribute names of the ``nn.ModuleList``s (or single blocks), in execution order (FLUX: the
    double-stream ``transformer_blocks``, then the single-stream ``single_transformer_blocks``).
    always: those of ``blocks`` that always run (the smallest depth covers them: U-ViT's in and mid blocks).
    streams: for blocks that diffusers' ``TransformerBlockRegistry`` does not know, ``{block list name or block
    class name: (return index of the image stream, return index of the text stream or None, name of the
    image-stream argument, name of the text-stream argument)}``; a block returning one tensor has 0 and None.
    skip: optional ``{block list name or class name: fn(block, args, kwargs) -> output}`` for blocks whose stand-in
    when skipped is not the identity on their streams (U-ViT's out blocks keep their ``skip_linear``).
    out_streams: how many of the two streams the model's heads read after the blocks: 1 (the image stream; the
    text stream only feeds later blocks) or 2 (both are outputs, each with its own head: LTX-2's video and audio).
    With 2, ``exit_policy="cache"`` replays the skipped blocks' residual on both streams.
    joint: ``{block list name or class name: "text-first" or "image-first"}`` for blocks whose image-stream argument
    carries the text tokens too, concatenated along dim 1 before the image tokens (FLUX.2's and Chroma's
    single-stream blocks) or after them (HiDream's). With ``exit_policy="cache"``, an exit at an image-only block
    takes the residual on the image part of the last block's output (its last / first tokens, as many as the exit
    block's image stream has): the part the model's head reads.
    """

    blocks: tuple[str, ...]
    always: tuple[str, ...] = ()
    streams: Mapping[str, tuple] = field(default_factory=dict)
    skip: Mapping[str, Callable] = field(default_factory=dict)
    out_streams: int = 1
    joint: Mapping[str, str] = field(default_factory=dict)
    kind: str = "prefix"

    def __post_init__(self):
        if self.out_streams not in (1, 2):
            raise ValueError(f"PrefixExit: `out_streams` expected 1 or 2, got {self.out_streams!r}")
        bad = {k: v for k, v in self.joint.items() if v not in JOINT_ORDERS}
        if bad:
            raise ValueError(f"PrefixExit: `joint` expected values in {JOINT_ORDERS}, got {bad}")


@dataclass(frozen=True)
class LevelExit:
    """U-Net: ``depth = d`` runs resolution levels 0..d-1 (0 = full resolution); the deeper levels, the mid block and
    their up blocks are skipped, and the up block of level d-1 receives zeros (``drop``) or the cached value
    (``cache``) in place of the skipped part's output."""

    down: str = "down_blocks"
    mid: str = "mid_block"
    up: str = "up_blocks"
    kind: str = "levels"


def scaled_step_t(scale: float) -> Callable[[Any], list[float]]:
    """A ``Family.step_t`` for pipelines whose scheduler timesteps times ``scale`` are t (ACE-Step's scheduler
    counts sigma in [0, 1]: ``scaled_step_t(1000.0)``)."""
    if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scaled_step_t: `scale` expected a positive number, got {scale!r}")

    def step_t(pipe):
        return [float(t) * scale for t in pipe.scheduler.timesteps]

    step_t.__qualname__ = f"scaled_step_t({scale!r})"
    return step_t


# --------------------------------------------------------------------------------------------------
# The family record
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One model family. See the module docstring; every field but ``name`` is optional.

    classes: the model classes, as ``"package:ClassName"`` (matched by name over the object's class hierarchy, so
    that nothing is imported to test a match) or class objects (user registrations).
    pipelines: ``{pipeline class (same forms): denoiser attribute names}``; several names for pipelines with several
    denoisers (Wan 2.2's ``transformer`` and ``transformer_2``).
    route: for pipelines with several denoisers, ``fn(pipe, t) -> name`` of the one the pipeline calls at host
    timestep ``t`` (Wan 2.2's boundary; read by ``eekernels.inplace.plan``); None: the first one present.
    exit: the exit rule (:class:`PrefixExit`, :class:`LevelExit`), or None with ``refused`` saying why.
    timestep_scale, timestep_offset: eekernels' t in [0, 1000), t near 1000 meaning noise, is ``timestep_offset +
    timestep_scale *`` the model's ``timestep`` argument (FLUX takes sigma: scale 1000; Z-Image takes 1 - sigma:
    offset 1000, scale -1000); for direct calls. Pipelines' own scheduler timesteps are already in that unit, unless
    ``step_t`` says otherwise.
    step_t: ``fn(pipe) -> eekernels' t of each of ``pipe.scheduler.timesteps`` (or None: those timesteps as they
    are)``, for pipelines whose scheduler timesteps are in another unit (Cosmos: EDM sigmas times 1000; ACE-Step:
    sigma in [0, 1], :func:`scaled_step_t`). Called once per pipeline run, when the denoising loop starts, and by
    ``eekernels.inplace.plan``.
    timestep_map: ``fn(x) -> t`` for a model whose ``timestep`` argument ``x`` (one number) is not an affine function
    of t as above; replaces ``timestep_scale`` and ``timestep_offset`` for direct calls.
    full_depth_call: ``fn(the call's arguments by name, exit policy) -> bool``: True for a model call that runs every
    block whatever the schedule says (Qwen-Image 2.1's KV-cache prefill, whose keys and values of every block the
    later calls read); it raises a ValueError for a call that the exit policy cannot serve.
    prediction: ``"epsilon"`` or ``"flow"``.
    native: ``"module:Class"`` of the fused eekernels model, if any (``accelerate(..., native=True)``, the loaders).
    native_build: ``fn(module) -> native model`` sharing the module's weights (the native tier's converter).
    native_adapter: ``"module:Class"`` of the stand-in that gives the native model the module's call convention
    (default: ``eekernels._accelerate:EarlyExitModel``, facebookresearch DiT's).
    checkpoint_keys: ``{layout name: keys}``: a state dict holding every key of one layout is this family's, and
    ``load_model_file`` reads it with the native model's ``from_checkpoint``.
    param_roles: ``{role: parameter-name prefixes, or fn(model) -> prefixes}`` for fine-tuning, in the native and
    the diffusers naming: ``"t-embedder"`` (frozen by ``trainable="no-t-embedder"``), ``"caption"``,
    ``"embedders"``.
    configs: ``"module:ATTR"`` of the native named configs.
    presets: ``{schedule preset name: (depth table over ten equal bins, the depth it is for, "t" or "sigma")}``:
    bins of t in [0, 1000) or of sigma in [0, 1] (``ExitSchedule.piecewise`` / ``piecewise_sigma``), read by
    ``ExitSchedule.preset``.
    refused: a reason, for a family that ``accelerate`` refuses by name.
    detect: a test of a module's structure, for models that are not a class of a known package (the
    facebookresearch DiT and baofff U-ViT modules users copy into their code).
    """

    name: str
    classes: tuple = ()
    pipelines: Mapping[Any, tuple[str, ...]] = field(default_factory=dict)
    exit: PrefixExit | LevelExit | None = None
    timestep_scale: float = 1.0
    step_t: Callable[[Any], Any] | None = None
    timestep_offset: float = 0.0
    prediction: str = "epsilon"
    native: str | None = None
    native_build: Callable[[Any], Any] | None = None
    native_adapter: str | None = None
    checkpoint_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    param_roles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    configs: str | None = None
    presets: Mapping[str, tuple] = field(default_factory=dict)
    refused: str | None = None
    detect: Callable[[Any], bool] | None = None
    full_depth_call: Callable[[Mapping[str, Any], str], bool] | None = None
    notes: str = ""
    route: Callable[[Any, float], str] | None = None
    timestep_map: Callable[[float], float] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Family: `name` expected a non-empty string, got {self.name!r}")
        if self.prediction not in ("epsilon", "flow"):
            raise ValueError(f"Family {self.name}: `prediction` expected 'epsilon' or 'flow', got {self.prediction!r}")
        if self.route is not None and not callable(self.route):
            raise ValueError(f"Family {self.name}: `route` expected fn(pipe, t) -> denoiser name or None, "
                             f"got {self.route!r}")
        if (self.native_build is None) != (self.native is None):
            raise ValueError(f"Family {self.name}: `native` and `native_build` go together")
        if self.exit is None and self.refused is None and self.native is None:
            raise ValueError(f"Family {self.name}: expected an `exit` rule, a `native` model or a `refused` reason")
        if not (isinstance(self.timestep_scale, (int, float)) and self.timestep_scale != 0):
            raise ValueError(f"Family {self.name}: `timestep_scale` expected a nonzero number, "
                             f"got {self.timestep_scale!r}")
        if self.step_t is not None and not callable(self.step_t):
            raise ValueError(f"Family {self.name}: `step_t` expected a function of the pipeline, got {self.step_t!r}")
        if self.timestep_map is not None and not callable(self.timestep_map):
            raise ValueError(f"Family {self.name}: `timestep_map` expected fn(timestep) -> t or None, "
                             f"got {self.timestep_map!r}")
        if not isinstance(self.timestep_offset, (int, float)):
            raise ValueError(f"Family {self.name}: `timestep_offset` expected a number, got {self.timestep_offset!r}")
        for name, spec in self.presets.items():
            ok = (isinstance(spec, tuple) and len(spec) == 3 and len(spec[0]) > 0
                  and all(isinstance(d, int) and d >= 1 for d in spec[0]) and isinstance(spec[1], int)
                  and max(spec[0]) <= spec[1] and spec[2] in ("t", "sigma"))
            if not ok:
                raise ValueError(f"Family {self.name}: preset {name!r} expected (depths, the depth they are for, "
                                 f"'t' or 'sigma'), got {spec!r}")
        for cls, names in self.pipelines.items():
            if not names or not all(isinstance(n, str) for n in names):
                raise ValueError(f"Family {self.name}: pipeline {cls!r} expected a tuple of denoiser attribute "
                                 f"names, got {names!r}")

    def t_of_timestep(self, x: float) -> float:
        """eekernels' t of the model's ``timestep`` argument ``x`` (one number)."""
        if self.timestep_map is not None:
            return float(self.timestep_map(x))
        return self.timestep_offset + x * self.timestep_scale

    # -- matching ----------------------------------------------------------------------------------
    def matches(self, obj) -> bool:
        """Whether ``obj`` (a model) is one of this family's classes (in place or native)."""
        return _matches(obj, self.classes) or (self.detect is not None and bool(self.detect(obj)))

    def matches_native_only(self, obj) -> bool:
        """``obj`` is this family's native eekernels model."""
        return self.native is not None and _matches(obj, (self.native,))

    def denoisers(self, pipe) -> tuple[str, ...] | None:
        """The denoiser attribute names of ``pipe`` if it is one of this family's pipelines, else None."""
        for spec, names in self.pipelines.items():
            if _matches(pipe, (spec,)):
                return names
        return None

    def load(self, what: str):
        """Import the object a ``"module:attr"`` field names (``native``, ``configs``)."""
        spec = getattr(self, what)
        if spec is None:
            return None
        module, _, attr = spec.partition(":")
        return getattr(importlib.import_module(module), attr)


def _matches(obj, specs) -> bool:
    mro = type(obj).__mro__
    for spec in specs:
        if isinstance(spec, type):
            if isinstance(obj, spec):
                return True
            continue
        package, _, name = spec.partition(":")
        if any(c.__name__ == name and (c.__module__ == package or c.__module__.startswith(package + "."))
               for c in mro):
            return True
    return False


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Family] = {}
_BUILTINS_LOADED = False


def _load_builtins() -> None:
    """Import every module of this package once: each registers its family."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def register(family: Family, *, replace: bool = False) -> Family:
    """Add ``family`` to the table (``replace=True`` to redefine a name). Returns it."""
    if not isinstance(family, Family):
        raise ValueError(f"register: `family` expected an eekernels.families.Family, got {type(family).__name__}")
    if family.name in _REGISTRY and not replace:
        raise ValueError(f"register: a family named {family.name!r} is already registered; pass replace=True to "
                         "redefine it")
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a family (user registrations, tests)."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unregister: no family named {name!r}; registered: {sorted(_REGISTRY)}")
    del _REGISTRY[name]


def families() -> dict[str, Family]:
    """Every registered family, by name."""
    _load_builtins()
    return dict(_REGISTRY)


def get(name: str) -> Family:
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"eekernels.families.get: unknown family {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def family_of(obj) -> Family | None:
    """The family whose classes (in place or native) ``obj`` belongs to; the last registered wins, so that a
    user's registration can refine a built-in one."""
    _load_builtins()
    for family in reversed(list(_REGISTRY.values())):
        if family.matches(obj) or family.matches_native_only(obj):
            return family
    return None


def family_of_pipeline(pipe) -> tuple[Family, tuple[str, ...]] | None:
    """``(family, denoiser attribute names)`` for a registered pipeline class, else None."""
    _load_builtins()
    for family in reversed(list(_REGISTRY.values())):
        names = family.denoisers(pipe)
        if names is not None:
            return family, names
    return None


def supported() -> str:
    """A one-paragraph list of what ``accelerate`` takes, for error messages."""
    fams = families()
    parts = []
    for f in fams.values():
        if f.refused:
            continue
        names = [c.partition(":")[2] if isinstance(c, str) else c.__qualname__ for c in (*f.classes, *f.pipelines)]
        if f.detect is not None and f.notes:
            names.append(f.notes)
        parts.append(f"{f.name} ({', '.join(names)})")
    return "; ".join(parts)
