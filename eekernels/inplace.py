"""Early exit in place: the user's own diffusers model, with eekernels deciding which of its blocks run.

``eekernels.accelerate(pipe)`` (the default tier) keeps the pipeline's transformer or U-Net object: same class,
same parameters, same ``state_dict`` keys. It attaches diffusers hooks (``diffusers.hooks.HookRegistry``):

- one on the model, which sets the depth of each call;
- one on every block of the family's block lists (from the family table, :mod:`eekernels.families`), which runs
  the block when its index is below the depth and otherwise returns its input streams unchanged, in the order
  the block returns them (diffusers' ``TransformerBlockRegistry`` says which output is the image stream and which
  the text stream). With ``exit_policy="cache"`` the first skipped block adds what the skipped blocks added to the
  image stream at the last full-depth call (``"forecast"``: extrapolated in t from the last full calls). Under
  those two a call may run depth 0: no block, and the first block adds the whole stack's residual. A family whose
  skipped blocks have a stand-in (``PrefixExit.skip``: U-ViT's out blocks keep their ``skip_linear``) runs the
  stand-ins and adds, after the last one, the full call's output minus its exit input carried through the same
  stand-ins (``x_L - skip_only(x_d)``, as the native U-ViT).

The depth of a call comes from the host timestep, known before the loop: an accelerated pipeline's progress bar
(every diffusers pipeline loops inside ``self.progress_bar``) reads the scheduler's timesteps once per call on the
host and sets the depth of each step before the model runs, so a step costs no host sync and the model's
forward only reads one Python int (``torch.compile`` guards on it: one graph per depth). Called directly, the
model takes the depth from its ``timestep`` argument when that is a number or a CPU tensor, or from
:func:`at_depth`.

Everything a diffusers user does with the model keeps working because the model is theirs: ``save_pretrained``
(hooks are not saved), LoRA, attention processors, fused QKV, layerwise casting, offloading, ``torch.compile``
(tests/test_inplace_diffusers.py). :func:`disable` removes every hook and patch; the hooks sit inside
accelerate's offload hooks and are removed without touching them (:mod:`eekernels._hook_chain`).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import numbers
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from eekernels import _hook_chain, patches
from eekernels.families import Family, LevelExit, PrefixExit
from eekernels.models.cache import ExitCache, ForecastCache

EXIT_POLICIES = ("drop", "cache", "forecast")
_MODEL_HOOK = "eekernels_exit"
_BLOCK_HOOK = "eekernels_exit_block"
_ATTR = "_eekernels_exit"  # the controller, on the model (not a module, not a parameter: never saved)
_UNSET = object()


# --------------------------------------------------------------------------------------------------
# The controller: one per accelerated model
# --------------------------------------------------------------------------------------------------
@dataclass
class _Stream:
    """Where a block's image (and text) stream is among its arguments and its return values."""

    out_hidden: int | None
    out_text: int | None
    arg_hidden: str
    arg_text: str | None
    params: tuple[str, ...]  # the forward's argument names after self, for positional arguments

    def get(self, name: str, args, kwargs):
        if name in kwargs:
            return kwargs[name]
        i = self.params.index(name)
        return args[i] if i < len(args) else None

    def hidden(self, args, kwargs):
        return self.get(self.arg_hidden, args, kwargs)

    def text(self, args, kwargs):
        return None if self.arg_text is None else self.get(self.arg_text, args, kwargs)

    def pack(self, hidden, text):
        """The block's return value made of its two streams."""
        if self.out_text is None:
            return hidden
        out = [None, None]
        out[self.out_hidden], out[self.out_text] = hidden, text
        return tuple(out)

    def unpack(self, out):
        """``(hidden, text or None)`` of the block's return value ``out``."""
        if self.out_text is None:
            return (out[self.out_hidden] if isinstance(out, tuple) else out), None
        return out[self.out_hidden], out[self.out_text]

    def replace(self, args, kwargs, hidden, text):
        """The block's arguments with its input streams set to ``hidden`` and ``text`` (the others as given)."""
        args, kwargs = list(args), dict(kwargs)
        for name, value in ((self.arg_hidden, hidden), (self.arg_text, text)):
            if name is None:
                continue
            i = self.params.index(name) if name in self.params else len(args)
            if name not in kwargs and i < len(args):
                args[i] = value
            else:
                kwargs[name] = value
        return tuple(args), kwargs


class Controller:
    """The exit state of one accelerated model: schedule, policy, the depth of the current call, the exit cache.

    ``depth`` is None for a full-depth call. Hooks read it; the pipeline loop (or :func:`at_depth`, or the call's
    own host timestep) sets it before the model runs.
    """

    def __init__(self, model: nn.Module, family: Family, schedule, exit_policy: str, graphs=None,
                 forecast_order: int = 1):
        where = "accelerate"
        if graphs not in (None, True, False):
            raise ValueError(f"{where}: `graphs` expected None, True or False, got {graphs!r}")
        if exit_policy not in EXIT_POLICIES:
            raise ValueError(f"{where}: `exit_policy` expected one of {EXIT_POLICIES}, got {exit_policy!r}")
        if isinstance(forecast_order, bool) or forecast_order not in (1, 2):
            raise ValueError(f"{where}: `forecast_order` expected 1 or 2, got {forecast_order!r}")
        self.forecast_order = forecast_order
        self.family, self.policy = family, exit_policy
        self.num_blocks = _count_depth(model, family)
        rule = family.exit
        self.min_depth = 1 + (sum(len(_block_list(model, family, n)) for n in rule.always)
                              if isinstance(rule, PrefixExit) else 0)
        self.uses_cache = exit_policy in ("cache", "forecast")
        # Skipped blocks with a stand-in (PrefixExit.skip, U-ViT's skip_linear): a truncated call runs the stand-ins
        # of every skipped block and adds the cached value after the last one, and a full call records, per exit
        # depth d, h_L minus h_d carried through those stand-ins (a side stream), as the native U-ViT does.
        self.stand_ins = isinstance(rule, PrefixExit) and bool(rule.skip)
        # Depth 0 (no block runs; the cache or forecast gives the whole stack's residual on h_0, the input of the
        # first block): why this model cannot run it, or None. `min_reuse_depth`: the fewest blocks a call may run.
        self.no_depth0 = _no_depth0(family, exit_policy)
        self.min_reuse_depth = self.min_depth if self.no_depth0 else 0
        self.cache: ExitCache | None = None  # the current call's exit cache (one per diffusers cache context)
        self.cache2: ExitCache | None = None  # the second stream's, for a rule whose two streams are outputs
        self._caches: dict = {}
        self._memo: dict[float, int] = {}
        self.step_calls: int | None = None  # calls so far in the pipeline loop's current step (None: no loop)
        self.use(schedule, where)
        self.manager = None  # diffusers' StateManager on the model hook: its context names cond/uncond calls
        self.depth: int | None = None  # this call's depth (None: full)
        self.loop_depth = _UNSET  # set by an accelerated pipeline's loop, per step
        self.loop_t: float | None = None  # that step's host timestep (eekernels' unit)
        self._step = 0  # counts the loop's steps: each cache hears of a step once (``announce``)
        self._heard: dict = {}
        self.forced_depth = _UNSET  # set by at_depth()
        self.cache_key = None  # the name of the current call's exit cache (the CUDA graph runner keys graphs by it)
        self.recording = False
        self.joint_last: str | None = None  # the last block's `PrefixExit.joint` order, if its stream is joint
        self._inputs: dict[int, torch.Tensor] = {}
        self.calls = 0
        self.graphs = None if graphs is False else _GraphRunner(self, graphs)

    def use(self, schedule, where: str = "set_schedule") -> None:
        """Run under ``schedule`` (an ``ExitSchedule``, or None for full depth) from the next call on; a schedule
        that carries its forecast order (a calibrated plan's ``ExitSchedule.forecast_order``) runs at that order."""
        self.check(schedule, where)
        self.schedule = schedule
        if getattr(schedule, "forecast_order", None) is not None:
            self.forecast_order = schedule.forecast_order  # the caches below are made anew at this order
        self.levels = tuple(sorted(schedule.levels)) if schedule is not None else (self.num_blocks,)
        self._memo.clear()
        self._caches.clear()
        self._heard = {}

    def check(self, schedule, where: str = "set_schedule") -> None:
        """Raise the named ValueError unless this model can run under ``schedule``."""
        from eekernels.schedules import ExitSchedule

        if schedule is not None and not isinstance(schedule, ExitSchedule):
            raise ValueError(f"{where}: `schedule` expected an eekernels.ExitSchedule or None, "
                             f"got {type(schedule).__name__}")
        if self.policy in ("cache", "forecast") and schedule is None:
            raise ValueError(f"{where}: `exit_policy={self.policy!r}` expected a schedule (which calls run "
                             "truncated), got schedule=None")
        if getattr(schedule, "forecast_target", None) == "blocks":
            raise ValueError(f"{where}: `schedule` {schedule.name!r} expected a plan whose forecast extrapolates the "
                             "skipped blocks' residual (forecast_target 'residual' or None) in place, got 'blocks' (a "
                             "per-block forecast, which the native tier's DiT runs)")
        if schedule is not None and min(schedule.table) == 0 and self.no_depth0:
            raise ValueError(f"{where}: `schedule` {schedule.name!r} expected depths in [{self.min_reuse_depth}, "
                             f"{self.num_blocks}], got depth 0: {self.no_depth0}")
        if schedule is not None:
            schedule.validate_for(self)

    # -- depth of a call ---------------------------------------------------------------------------
    def depth_at(self, t: float, step: int) -> int:
        """The depth at host timestep ``t`` (eekernels' unit), or at ``step`` for a step-indexed schedule."""
        s = self.schedule
        if s is None:
            return self.num_blocks
        if s.step_indexed:
            full, short = s.table
            return full if step % s.period == 0 else short
        key = float(t)
        d = self._memo.get(key)
        if d is None:
            d = self._memo[key] = int(s.depth(torch.tensor([key], dtype=torch.float64))[0])
        return d

    def _depth_from_call(self, timestep) -> int:
        if self.schedule is None:
            return self.num_blocks
        if self.schedule.step_indexed:
            return self.depth_at(0.0, self.calls)
        t_of = self.family.t_of_timestep
        if isinstance(timestep, numbers.Number):
            return self.depth_at(t_of(float(timestep)), self.calls)
        if isinstance(timestep, torch.Tensor):
            flat = timestep.detach().reshape(-1)
            if flat.device.type != "cpu":
                raise ValueError(
                    "eekernels in place: the model was called outside an accelerated pipeline with a timestep on "
                    f"{flat.device}; the depth must be known on the host without a device read. Pass the timestep "
                    "as a number or a CPU tensor, call it inside an accelerated pipeline, or wrap the call in "
                    "`with eekernels.inplace.at_depth(model, d):`")
            first = float(flat[0]) if flat.numel() else 0.0
            if flat.numel() > 1 and not bool((flat == flat[0]).all()):
                raise ValueError("eekernels in place: `timestep` expected one value for the whole batch (every "
                                 f"sample of a call runs the same blocks), got {flat.numel()} different values")
            return self.depth_at(t_of(first), self.calls)
        raise ValueError(f"eekernels in place: `timestep` expected a number or a tensor, got "
                         f"{type(timestep).__name__}")

    def begin(self, timestep, full: bool = False) -> None:
        """Set the depth of a call; ``full``: the family says this call runs every block (``full_depth_call``)."""
        in_loop = self.loop_depth is not _UNSET
        if self.forced_depth is not _UNSET:
            d = self.forced_depth
        elif in_loop:
            d = self.loop_depth
        elif torch.compiler.is_compiling():
            raise ValueError("eekernels in place: under torch.compile the depth must be set before the call (inside "
                             "an accelerated pipeline, or `with eekernels.inplace.at_depth(model, d):`)")
        else:
            d = self._depth_from_call(timestep)
            self.calls += 1
        self.depth = None if full or d >= self.num_blocks else d
        if self.uses_cache:
            # One exit cache per call kind: pipelines that run cond and uncond as two calls name them with
            # diffusers' `cache_context`, which sets the context of the model hook's StateManager.
            # Pipelines that make several calls per step without naming them (Cosmos' cond and uncond) get one
            # cache per call of the step, by its order.
            ctx = getattr(self.manager, "_context", None)
            name = None if ctx is None else ctx.name
            if name is None and self.step_calls is not None:
                name, self.step_calls = ("call", self.step_calls), self.step_calls + 1
            self.cache_key = name
            if in_loop:  # the loop told the caches of this step already (eagerly, outside any compiled region)
                caches = self.announce(name)
            else:
                if torch.compiler.is_compiling():
                    raise ValueError(f"eekernels in place: exit_policy={self.policy!r} under torch.compile needs the "
                                     "pipeline's loop (the caches hear of each step outside the compiled region)")
                caches = self._cache(name)
                for cache in caches:
                    cache.begin_call(self._host_t(timestep), self.depth is None)
            self.cache, self.cache2 = caches[0], (caches[1] if len(caches) > 1 else None)
            self.recording = self.depth is None
            if self.depth is not None and not self.cache.has(self.depth):
                self.cache.load(self.depth)  # raises the named error before any block runs

    def _cache(self, name) -> tuple:
        """The exit caches of call kind ``name``: one per stream the rule replays (``out_streams``)."""
        caches = self._caches.get(name)
        if caches is None:
            depths = [d for d in self.levels if d < self.num_blocks]
            n = getattr(self.family.exit, "out_streams", 1)
            caches = self._caches[name] = tuple(
                ForecastCache(depths, self.forecast_order) if self.policy == "forecast" else ExitCache(depths)
                for _ in range(n))
            for cache in caches:
                cache.restart()
        return caches

    def announce(self, name=None) -> tuple:
        """The caches of call kind ``name``, told once per loop step of the step's host timestep and whether it runs
        at full depth (a forecast's weights depend on both). Eager: called by the loop and by diffusers'
        ``cache_context`` before the model runs."""
        caches = self._cache(name)
        if self._heard.get(name) != self._step:
            self._heard[name] = self._step
            depth = self.loop_depth if self.forced_depth is _UNSET else self.forced_depth  # at_depth() wins
            for cache in caches:
                cache.begin_call(0.0 if self.loop_t is None else self.loop_t, depth >= self.num_blocks)
        return caches

    def _host_t(self, timestep) -> float:
        """This direct call's host timestep in eekernels' unit (a forecast needs it)."""
        if isinstance(timestep, numbers.Number):
            return self.family.t_of_timestep(float(timestep))
        if isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu" and timestep.numel():
            return self.family.t_of_timestep(float(timestep.reshape(-1)[0]))
        if self.policy == "forecast":
            raise ValueError("eekernels in place: exit_policy='forecast' called outside an accelerated pipeline "
                             "needs the call's timestep on the host (a number or a CPU tensor) for its weights")
        return 0.0

    def end(self) -> None:
        self.depth = None
        self.recording = False
        self.cache = self.cache2 = None
        self._inputs.clear()

    def start_run(self) -> None:
        """A new sampling run: the exit caches start a new trajectory (their buffers stay, so CUDA graphs captured on
        them stay valid) and the call count restarts."""
        self.calls = 0
        self._heard.clear()
        for caches in self._caches.values():
            for cache in caches:
                cache.restart()

    # -- cache recording ---------------------------------------------------------------------------
    def record_input(self, index: int, hidden: torch.Tensor, second: torch.Tensor | None = None) -> None:
        """Block ``index``'s input streams, at an exit depth: the start of its side stream (``_inputs[index]``)."""
        if index in self.levels and index < self.num_blocks:
            self._inputs[index] = (hidden, second)

    def carry(self, stand_in) -> None:
        """Carry every side stream through a block's stand-in, ``stand_in(hidden, second) -> (hidden, second)``: after
        the last block each one is what a call at its depth reaches with the skipped blocks' stand-ins."""
        for d, (h, s) in self._inputs.items():
            self._inputs[d] = stand_in(h, s)

    def record_output(self, hidden: torch.Tensor, second: torch.Tensor | None = None) -> None:
        """The last block's output streams: store, per exit depth, them minus its side stream."""
        for d, (h, s) in self._inputs.items():
            self.cache.store(d, _image_part(hidden, h, self.joint_last, self.family) - h)
            if self.cache2 is not None:
                self.cache2.store(d, second - s)
        self._inputs.clear()


def _image_part(out: torch.Tensor, like: torch.Tensor, order: str | None, family: Family) -> torch.Tensor:
    """The part of the last block's image stream ``out`` that lines up with an exit block's image stream ``like``:
    all of it when their shapes agree, else (``out`` joint, ``like`` the image tokens alone) the image tokens of
    ``out``, at its end (``"text-first"``) or start (``"image-first"``)."""
    if out.shape == like.shape:
        return out
    n = like.shape[1] if like.dim() > 1 else -1
    if (order is None or out.dim() != like.dim() or out.shape[0] != like.shape[0] or out.shape[2:] != like.shape[2:]
            or not 0 < n < out.shape[1]):
        raise ValueError(
            f"eekernels in place (family {family.name!r}): the last block's image stream {tuple(out.shape)} does not "
            f"line up with an exit block's {tuple(like.shape)}; a block list whose stream carries the text tokens "
            "too needs `PrefixExit(joint={list: 'text-first' or 'image-first'})` in the family table")
    return out[:, out.shape[1] - n:] if order == "text-first" else out[:, :n]


def _no_depth0(family: Family, policy: str) -> str | None:
    """Why a call at depth 0 (no block runs) cannot serve ``family`` under exit ``policy``, or None: it can when the
    skipped part may be the whole block stack, a prefix rule whose skipped blocks are the identity on their streams,
    with the policy re-adding the stack's residual."""
    rule = family.exit
    if policy not in ("cache", "forecast"):
        return f"depth 0 runs no block: only with exit_policy 'cache' or 'forecast', got exit_policy={policy!r}"
    if isinstance(rule, LevelExit):
        return (f"family {family.name!r} exits by U-Net levels, which have no residual path around the whole stack "
                "(at depth 0 nothing of the call's input would reach its output): it runs at least 1 level")
    if rule.always:
        return f"family {family.name!r} always runs its {', '.join(rule.always)} (PrefixExit.always)"
    if rule.skip:
        return (f"family {family.name!r} gives skipped blocks of {', '.join(rule.skip)} a stand-in that is not the "
                "identity (PrefixExit.skip), so the whole stack's residual is not what a call skips")
    return None


def _count_depth(model: nn.Module, family: Family) -> int:
    rule = family.exit
    if isinstance(rule, PrefixExit):
        return sum(len(_block_list(model, family, name)) for name in rule.blocks)
    if isinstance(rule, LevelExit):
        return len(getattr(model, rule.down))
    raise ValueError(f"accelerate: family {family.name!r} has no exit rule that runs in place"
                     + (f" ({family.refused})" if family.refused else ""))


def _block_list(model: nn.Module, family: Family, name: str) -> list[nn.Module]:
    blocks = getattr(model, name, None)
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    if isinstance(blocks, nn.Module):
        return [blocks]  # a single block (U-ViT's mid_block)
    raise ValueError(f"accelerate: family {family.name!r} expected `{name}` to be an nn.ModuleList of blocks (or one "
                     f"block) on {type(model).__name__}, got {type(blocks).__name__}")


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------
def _hooks():
    from diffusers.hooks import HookRegistry, ModelHook

    return HookRegistry, ModelHook


def _declared(table, list_name: str, block: nn.Module):
    """A per-family entry keyed by the block list's name or by one of the block's class names."""
    if list_name in table:
        return table[list_name]
    return next((table[c.__name__] for c in type(block).__mro__ if c.__name__ in table), None)


def _stream_of(block: nn.Module, rule: PrefixExit, list_name: str) -> _Stream:
    import inspect

    cls = type(block)
    declared = _declared(rule.streams, list_name, block)
    if declared is not None:
        out_h, out_t, arg_h, arg_t = declared
    else:
        from diffusers.hooks._helpers import TransformerBlockRegistry

        try:
            meta = TransformerBlockRegistry.get(cls)
        except ValueError:
            raise ValueError(
                f"accelerate: block class {cls.__name__} is neither in diffusers' TransformerBlockRegistry nor "
                "declared in its family's `PrefixExit(streams=...)`: say which output is the image stream") from None
        out_h, out_t = meta.return_hidden_states_index, meta.return_encoder_hidden_states_index
        arg_h = meta.hidden_states_argument_name
        arg_t = meta.encoder_hidden_states_argument_name if out_t is not None else None
    params = tuple(inspect.signature(cls.forward).parameters)[1:]
    return _Stream(out_h, out_t, arg_h, arg_t, params)


def _make_block_hook(ModelHook):
    class BlockExitHook(ModelHook):
        """Runs the block below the depth; above it returns the block's input streams, or its stand-in's output
        (``skip_fn``, ``PrefixExit.skip``). With ``exit_policy="cache"`` or ``"forecast"`` the cached residual is added
        at the first skipped block, or, for a rule with stand-ins, to the last block's output."""

        def __init__(self, ctl: Controller, index: int, stream: _Stream, last: bool, skip_fn=None):
            super().__init__()
            self.ctl, self.index, self.stream, self.last, self.skip_fn = ctl, index, stream, last, skip_fn

        def new_forward(self, module, *args, **kwargs):
            ctl, i = self.ctl, self.index
            d = ctl.depth
            both = ctl.cache2 is not None  # the second stream is an output too (its residual is replayed)
            if d is None or i < d:
                if ctl.recording:
                    ctl.record_input(i, self.stream.hidden(args, kwargs), self.stream.text(args, kwargs)
                                     if both or ctl.stand_ins else None)
                    if self.skip_fn is not None:
                        ctl.carry(lambda h, s: self.stream.unpack(
                            self.skip_fn(module, *self.stream.replace(args, kwargs, h, s))))
                out = self.fn_ref.original_forward(*args, **kwargs)
                if ctl.recording and self.last:
                    h, s = self.stream.unpack(out)
                    ctl.record_output(h, s if both else None)
                return out
            replay = ctl.uses_cache and (self.last if ctl.stand_ins else i == d)
            if self.skip_fn is not None:
                out = self.skip_fn(module, args, kwargs)
                if not replay:
                    return out
                hidden, text = self.stream.unpack(out)
            else:
                hidden, text = self.stream.hidden(args, kwargs), self.stream.text(args, kwargs)
            if replay:
                hidden = hidden + ctl.cache.load(d)
                if both:
                    text = text + ctl.cache2.load(d)
            return self.stream.pack(hidden, text)

    return BlockExitHook


def _make_model_hook(ModelHook):
    from diffusers.hooks.hooks import BaseState, StateManager

    class _Contexts(StateManager):
        """diffusers' StateManager, which also tells the controller's cache of each call kind about the step when the
        pipeline opens ``cache_context(name)`` (eagerly, before the model runs)."""

        def __init__(self, ctl: Controller):
            super().__init__(BaseState)
            self._ctl = ctl

        def set_context(self, context) -> None:
            super().set_context(context)
            ctl = self._ctl
            if context is not None and ctl.uses_cache and ctl.loop_depth is not _UNSET:
                ctl.announce(context.name)

    class ModelExitHook(ModelHook):
        """Sets the depth of each call before the blocks run. Stateful for diffusers, so that the pipeline's
        ``cache_context("cond" / "uncond")`` reaches it (its StateManager) and each call kind has its own cache."""

        _is_stateful = True

        def __init__(self, ctl: Controller, timestep_arg: str, params: tuple[str, ...]):
            super().__init__()
            self.ctl, self.timestep_arg, self.params = ctl, timestep_arg, params
            self.manager = ctl.manager = _Contexts(ctl)

        def reset_state(self, module):
            self.ctl.start_run()
            return module

        def pre_forward(self, module, *args, **kwargs):
            t = kwargs.get(self.timestep_arg, _UNSET)
            if t is _UNSET:
                i = self.params.index(self.timestep_arg) if self.timestep_arg in self.params else len(args)
                t = args[i] if i < len(args) else None
            rule = self.ctl.family.full_depth_call
            if rule is not None and rule({**dict(zip(self.params, args)), **kwargs}, self.ctl.policy):
                self.ctl.begin(t, full=True)
            else:
                self.ctl.begin(t)
            return args, kwargs

        def new_forward(self, module, *args, **kwargs):
            runner = self.ctl.graphs
            if runner is not None:
                out = runner(module, self.fn_ref.original_forward, args, kwargs)
                if out is not _UNSET:
                    return out
            return self.fn_ref.original_forward(*args, **kwargs)

        def post_forward(self, module, output):
            self.ctl.end()
            return output

    return ModelExitHook


def _make_level_hook(ModelHook):
    class LevelExitHook(ModelHook):
        """U-Net levels: down blocks at or below the depth, the mid block and their up blocks are skipped; the up block
        of level d-1 gets zeros or the cached value in place of the skipped part's output."""

        def __init__(self, ctl: Controller, role: str, level: int):
            super().__init__()
            self.ctl, self.role, self.level = ctl, role, level

        def new_forward(self, module, *args, **kwargs):
            ctl, role, level = self.ctl, self.role, self.level
            d = ctl.depth
            run = self.fn_ref.original_forward
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if d is None:
                if ctl.recording and role == "up" and level + 1 in ctl.levels and level + 1 < ctl.num_blocks:
                    ctl.cache.store(level + 1, hidden)
                return run(*args, **kwargs)
            if role == "down" and level >= d:  # (sample, res_samples): shapes only feed skipped blocks
                n = len(module.resnets) + len(getattr(module, "downsamplers", None) or ())
                return hidden, (hidden,) * n
            if (role == "downsampler" and level >= d - 1) or role == "mid" or (role == "up" and level >= d):
                return hidden
            if role == "up" and level == d - 1:
                res = kwargs["res_hidden_states_tuple"] if "res_hidden_states_tuple" in kwargs else args[1]
                if ctl.uses_cache:
                    deep = ctl.cache.load(d)
                else:
                    skip = res[-1]
                    channels = module.resnets[0].in_channels - skip.shape[1]
                    deep = skip.new_zeros((skip.shape[0], channels, *skip.shape[2:]))
                if "hidden_states" in kwargs:
                    kwargs = {**kwargs, "hidden_states": deep}
                else:
                    args = (deep, *args[1:])
            return run(*args, **kwargs)

    return LevelExitHook


def _attach(model: nn.Module, family: Family, ctl: Controller) -> list:
    """Register the hooks; returns the (module, hook name) pairs to remove on disable."""
    import inspect

    _, ModelHook = _hooks()
    attached = []
    rule = family.exit
    if isinstance(rule, PrefixExit):
        Hook = _make_block_hook(ModelHook)
        blocks = [(name, b) for name in rule.blocks for b in _block_list(model, family, name)]
        streams = [_stream_of(block, rule, name) for name, block in blocks]  # every refusal before any hook
        for (name, block), stream in zip(blocks, streams):
            if rule.out_streams == 2 and stream.out_text is None:
                raise ValueError(f"accelerate: family {family.name!r} says its blocks return two output streams "
                                 f"(`out_streams=2`), but {type(block).__name__} in `{name}` returns one")
        for i, ((name, block), stream) in enumerate(zip(blocks, streams)):
            hook = Hook(ctl, i, stream, last=i == len(blocks) - 1, skip_fn=_declared(rule.skip, name, block))
            _hook_chain.register(block, hook, _BLOCK_HOOK)
            attached.append((block, _BLOCK_HOOK))
        if blocks:
            ctl.joint_last = _declared(rule.joint, *blocks[-1])
    else:
        Hook = _make_level_hook(ModelHook)
        down, up = getattr(model, rule.down), getattr(model, rule.up)
        L = len(down)
        parts = [(blk, "down", lvl) for lvl, blk in enumerate(down)]
        parts += [(ds, "downsampler", lvl) for lvl, blk in enumerate(down) for ds in (getattr(blk, "downsamplers", None) or ())]
        parts += [(blk, "up", L - 1 - j) for j, blk in enumerate(up)]
        mid = getattr(model, rule.mid, None)
        if mid is not None:
            parts.append((mid, "mid", L - 1))
        for module, role, level in parts:
            _hook_chain.register(module, Hook(ctl, role, level), _BLOCK_HOOK)
            attached.append((module, _BLOCK_HOOK))
    params = tuple(inspect.signature(type(model).forward).parameters)[1:]
    timestep_arg = "timestep" if "timestep" in params else params[1]
    _hook_chain.register(model, _make_model_hook(ModelHook)(ctl, timestep_arg, params), _MODEL_HOOK)
    attached.append((model, _MODEL_HOOK))
    return attached


# --------------------------------------------------------------------------------------------------
# CUDA graphs: one per (depth, input signature, call kind), replayed with no host sync
# --------------------------------------------------------------------------------------------------
def _offloaded(model: nn.Module) -> str | None:
    """Why the model's weights move between calls (so a captured graph would be stale), or None."""
    for m in model.modules():
        if hasattr(m, "_hf_hook"):
            return "accelerate's offload hooks move its weights between calls (enable_model_cpu_offload)"
        reg = getattr(m, "_diffusers_hook", None)
        if reg is not None and any("offload" in name for name in reg.hooks):
            return "diffusers' group offloading moves its weights between calls"
    return None


def _parallel(model: nn.Module) -> str | None:
    """Why the model's forward runs collectives (diffusers' ``enable_parallelism``), or None."""
    if getattr(model, "_parallel_config", None) is not None:
        return ("diffusers' parallelism (enable_parallelism) runs collectives inside the forward, which eekernels "
                "does not capture")
    return None


def _fingerprint(model: nn.Module) -> int:
    """Changes when what a captured graph baked in changes: a parameter's storage or dtype (``.to()``, LoRA, fused
    QKV), the module tree, or an attention processor (``set_attn_processor``). One pass over the modules."""
    parts = []
    for m in model.modules():
        parts.append(id(m))
        proc = getattr(m, "processor", None)
        if proc is not None:
            parts.append(id(proc))
        for p in m._parameters.values():
            if p is not None:
                parts.append(p.data_ptr())
                parts.append(id(p.dtype))
    return hash(tuple(parts))


class _Statics:
    """A captured call's own copies of its tensor inputs, and its outputs per depth."""

    def __init__(self, leaves):
        self.leaves = [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in leaves]
        self.out: dict = {}

    def load(self, leaves) -> None:
        for buf, v in zip(self.leaves, leaves):
            if isinstance(buf, torch.Tensor):
                buf.copy_(v)


class _GraphRunner:
    """Replays one CUDA graph per (depth, input signature, cache context, model fingerprint) of the hooked forward.

    ``graphs``: None captures when the inputs are on a device the graph cache supports (CUDA) and the weights stay
    put (no offloading); True requires that and raises otherwise; the cache is ``eekernels.graphs.default_cache()``
    unless ``cache`` is given (tests on machines without a GPU pass an eager stand-in).
    """

    def __init__(self, ctl: Controller, graphs, cache=None):
        self.ctl, self.required, self.cache = ctl, graphs is True, cache
        self._statics: dict = {}
        self._token = ("inplace", id(self), next(_GraphRunner._count))
        self.reason: str | None = None  # why the last call ran eagerly

    _count = itertools.count()

    def _eager(self, why: str):
        self.reason = why
        if self.required:
            raise ValueError(f"accelerate: `graphs=True` expected a call that CUDA graphs can capture, but {why}")
        return _UNSET

    def __call__(self, module, forward, args, kwargs):
        from eekernels import graphs as graphs_module

        cache = self.cache if self.cache is not None else graphs_module.default_cache()
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
        if first is not None and not cache.supports(first.device):  # the CPU path: no flattening per call
            return self._eager(f"the inputs are on {first.device}, not CUDA")
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
        if not tensors or not cache.supports(tensors[0].device):
            return self._eager(f"the inputs are on {tensors[0].device if tensors else 'no device'}, not CUDA")
        if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            return self._eager("gradients are enabled (wrap sampling in torch.no_grad())")
        why = _offloaded(module) or _parallel(module)
        if why is not None:
            return self._eager(why)
        try:
            sig = (spec, tuple((tuple(v.shape), v.dtype, v.device, v.stride()) if isinstance(v, torch.Tensor) else v
                               for v in leaves))
            hash(sig)
        except TypeError:
            return self._eager("an argument is neither a tensor nor hashable")
        ctl = self.ctl
        static = self._statics.get(sig)
        if static is None:
            static = self._statics[sig] = _Statics(leaves)
        else:
            static.load(leaves)
        depth = ctl.depth
        key = (self._token, sig, depth, ctl.cache_key if ctl.uses_cache else None, _fingerprint(module))
        graph = cache.get(key)
        if graph is None:
            ref = weakref.ref(static)

            def run():
                st = ref()
                a, k = tree_unflatten(st.leaves, spec)
                with torch.no_grad():
                    st.out[key] = forward(*a, **k)

            # The warm-ups run the call for real: what it writes into the exit cache (a forecast shifts its history)
            # is put back, so capturing never advances the run.
            restore = ([b for c in (ctl.cache, ctl.cache2) if c is not None for b in c.buffers()]
                       if ctl.uses_cache else [])
            graph = cache.capture(key, run, device=tensors[0].device, owner_key=self._token, restore=restore,
                                  what=f"{type(module).__name__} at depth "
                                       f"{ctl.num_blocks if depth is None else depth}")
            if graph is None:
                return self._eager("its capture failed (see the warning)")
            static.load(leaves)
        graph.replay()
        self.reason = None
        return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, static.out[key])


# --------------------------------------------------------------------------------------------------
# The pipeline loop: the depth of each step, on the host, before the model runs
# --------------------------------------------------------------------------------------------------
class _Timeline:
    """A pipeline run: its scheduler's timesteps on the host, and which step the loop is at.

    The step is the scheduler's ``step_index`` (multistep, Euler, Heun and flow-matching schedulers keep one;
    None before the first step means ``begin_index``, else ``skipped``), else, for schedulers without one (DDIM,
    DDPM), ``skipped`` plus the number of progress-bar updates so far. ``skipped``: the timesteps before the loop's
    first, for pipelines that run only the last ``total`` steps (image- and video-to-video with ``strength``, which
    slice ``scheduler.timesteps`` without ``set_begin_index``).
    """

    def __init__(self, scheduler, total, values=None):
        ts = getattr(scheduler, "timesteps", None)
        if values is not None:  # the family's own t of each scheduler timestep (Family.step_t)
            self.values = [float(v) for v in values]
        else:
            self.values = (ts.detach().to("cpu", torch.float64).reshape(-1).tolist()  # one copy per pipeline call
                           if isinstance(ts, torch.Tensor) else None)
        order = int(getattr(scheduler, "order", 1) or 1)
        self.skipped = (max(0, len(self.values) - int(total) * order)
                        if self.values is not None and isinstance(total, numbers.Integral) and total > 0 else 0)
        self.scheduler, self.updates = scheduler, 0
        self.by_index = isinstance(getattr(type(scheduler), "step_index", None), property)
        self._step = _UNSET  # the scheduler's own `step` attribute while followed (usually none: the class's)

    def follow(self, on_step) -> None:
        """Call ``on_step()`` after each ``scheduler.step``: schedulers of order 2 (Heun, KDPM2) take two model calls
        per progress-bar update, each at its own timestep. Undone by :meth:`unfollow`."""
        sched = self.scheduler
        if not self.by_index or getattr(sched, "order", 1) == 1:
            return
        self._step = vars(sched).get("step")
        step = sched.step

        def stepped(*args, **kwargs):
            out = step(*args, **kwargs)
            on_step()
            return out

        sched.step = stepped

    def unfollow(self) -> None:
        if self._step is _UNSET:
            return
        if self._step is None:
            del self.scheduler.__dict__["step"]
        else:
            self.scheduler.step = self._step
        self._step = _UNSET

    def current(self) -> tuple[float | None, int]:
        """(host timestep of the current step or None, step count)."""
        if self.values is None:
            return None, self.updates
        i = self.skipped + self.updates
        if self.by_index:
            i = self.scheduler.step_index
            if i is None:
                begin = getattr(self.scheduler, "begin_index", None)
                i = self.skipped if begin is None else begin
        return (self.values[i] if 0 <= i < len(self.values) else None), self.updates


def _controllers(pipe) -> list[Controller]:
    names = getattr(pipe, "_eekernels_denoisers", ())
    out = []
    for name in names:
        ctl = getattr(getattr(pipe, name, None), _ATTR, None)
        if ctl is not None:
            out.append(ctl)
    return out


def _set_step(pipe, t, step: int) -> None:
    for ctl in _controllers(pipe):
        ctl.step_calls = 0
        if t is None and not (ctl.schedule is None or ctl.schedule.step_indexed):
            ctl.loop_depth = _UNSET  # unknown step: the call's own timestep decides
            continue
        ctl.loop_depth = ctl.depth_at(0.0 if t is None else t, step)
        ctl.loop_t = t
        ctl._step += 1
        if ctl.uses_cache:
            for name in {None, *ctl._caches}:  # every call kind seen so far; new ones hear at `cache_context`
                ctl.announce(name)


def _end_loop(pipe) -> None:
    for ctl in _controllers(pipe):
        ctl.loop_depth = _UNSET
        ctl.loop_t = None
        ctl.step_calls = None


def _step_t(pipe, family: Family | None = None):
    """eekernels' t of each of ``pipe.scheduler.timesteps`` by the family's ``step_t`` (``family``, default: the one
    ``pipe`` is accelerated with), or None: the scheduler's timesteps are t. The one place the loop tracking,
    :func:`plan` and the tests read a step's t from."""
    if family is None:
        plan = vars(pipe).get("_eekernels_plan")
        family = plan[0] if plan is not None else None
    return None if family is None or family.step_t is None else [float(v) for v in family.step_t(pipe)]


class _Bar:
    """The pipeline's progress bar (``with self.progress_bar(total=N)``), which also sets each step's depth."""

    def __init__(self, bar, pipe, total):
        self._bar, self._pipe, self._total, self._timeline = bar, pipe, total, None

    def __enter__(self):
        _start_run(self._pipe)
        self._bar.__enter__()
        timeline = self._timeline = _Timeline(self._pipe.scheduler, self._total, _step_t(self._pipe))
        _set_step(self._pipe, *timeline.current())
        timeline.follow(lambda: _set_step(self._pipe, *timeline.current()))
        return self

    def __exit__(self, *exc):
        if self._timeline is not None:
            self._timeline.unfollow()
        _end_loop(self._pipe)
        return self._bar.__exit__(*exc)

    def update(self, n=1):
        out = self._bar.update(n)
        if self._timeline is not None:
            self._timeline.updates += n
            _set_step(self._pipe, *self._timeline.current())
        return out

    def __getattr__(self, name):
        return getattr(self._bar, name)


def _iterate(bar, pipe):
    """``for t in self.progress_bar(timesteps)`` (DiT, DDPM, DDIM): each t is the step's host timestep."""
    _start_run(pipe)
    values = _step_t(pipe)
    try:
        for step, t in enumerate(bar):
            if values is not None:  # the family's t of this step (the pipeline still gets its own t)
                host = float(values[step]) if step < len(values) else None
            else:
                on_host = isinstance(t, numbers.Number) or (isinstance(t, torch.Tensor) and t.device.type == "cpu"
                                                            and t.numel() == 1)
                host = float(t) if on_host else None
            _set_step(pipe, host, step)
            yield t
    finally:
        _end_loop(pipe)


def _start_run(pipe) -> None:
    """A pipeline run begins: accelerate denoisers set on the pipeline since ``accelerate`` (it was built with
    ``transformer=None``, or the user set another one) with the pipeline's plan, then reset every exit cache."""
    plan = vars(pipe).get("_eekernels_plan")
    if plan is not None:
        family, schedule, options, seen = plan
        for name in pipe._eekernels_denoisers:
            model = getattr(pipe, name, None)
            if model is None or model in seen or getattr(model, _ATTR, None) is not None:
                continue  # absent, accelerated through this pipeline before (or disabled by hand), or accelerated
            if not family.matches(model):
                raise ValueError(f"accelerate: the pipeline's `{name}` was set after accelerate to a "
                                 f"{type(model).__name__}, which family {family.name!r} does not cover")
            accelerate_model(model, family, schedule.get(name) if isinstance(schedule, dict) else schedule,
                             **options)
            seen.add(model)
    for ctl in _controllers(pipe):
        ctl.start_run()


def _install_loop(pipe, names: tuple[str, ...]) -> None:
    pipe._eekernels_denoisers = tuple(dict.fromkeys((*getattr(pipe, "_eekernels_denoisers", ()), *names)))
    if "progress_bar" in vars(pipe):
        return  # installed already (a second denoiser of the same pipeline)
    cls_bar = type(pipe).progress_bar

    def progress_bar(iterable=None, total=None):
        bar = cls_bar(pipe, iterable=iterable, total=total)
        if iterable is not None:
            return _iterate(bar, pipe)
        return _Bar(bar, pipe, total)

    progress_bar._eekernels = True
    object.__setattr__(pipe, "progress_bar", progress_bar)


def _uninstall_loop(pipe, names) -> None:
    left = tuple(n for n in getattr(pipe, "_eekernels_denoisers", ()) if n not in names)
    if left:
        pipe._eekernels_denoisers = left
        return
    if getattr(vars(pipe).get("progress_bar"), "_eekernels", False):
        del pipe.__dict__["progress_bar"]
    pipe.__dict__.pop("_eekernels_denoisers", None)
    pipe.__dict__.pop("_eekernels_plan", None)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def accelerate_model(model: nn.Module, family: Family, schedule=None, exit_policy: str = "drop",
                     graphs=None, kernels: bool = True, forecast_order: int = 1) -> nn.Module:
    """Attach early exit to ``model`` in place (see the module docstring). Returns ``model``. ``kernels``: also
    replace the forward of the modules an eekernels op matches (:mod:`eekernels.patches`; report: ``.patches``).
    ``forecast_order``: with ``exit_policy="forecast"``, 1 (a line in t through the last two full calls) or 2."""
    if getattr(model, _ATTR, None) is not None:
        raise ValueError(f"accelerate: this {type(model).__name__} is already accelerated; call "
                         "eekernels.disable(model) first to change its schedule or policy")
    if hasattr(schedule, "check_one_policy"):  # a joint plan's per-call policies: eekernels.sample runs them
        schedule.check_one_policy(exit_policy, "accelerate")
    if family.exit is None:
        raise ValueError(f"accelerate: family {family.name!r} cannot run in place: {family.refused or 'no exit rule'}")
    ctl = Controller(model, family, schedule, exit_policy, graphs, forecast_order)
    ctl.patches = patches.patch(model) if kernels else None  # first: the exit hooks must wrap the patched forwards
    try:
        attached = _attach(model, family, ctl)
    except Exception:
        if ctl.patches is not None:
            patches.unpatch(model)
        raise
    ctl.attached = attached
    object.__setattr__(model, _ATTR, ctl)
    return model


def accelerate_pipeline(pipe, family: Family, names: tuple[str, ...], schedule=None, exit_policy="drop",
                        graphs=None, kernels: bool = True, forecast_order: int = 1):
    """Attach early exit to every denoiser ``names`` of ``pipe`` that is present, and the loop that sets each step's
    depth. Returns ``pipe``. A ``schedule`` dict ``{name: ExitSchedule}`` gives each denoiser its own plan. A denoiser
    that is absent (``transformer=None``) or set on the pipeline later is accelerated with the same plan when a run
    starts (one disabled by hand is left alone)."""
    present = [n for n in names if getattr(pipe, n, None) is not None]
    for name in present:
        s = schedule.get(name) if isinstance(schedule, dict) else schedule
        if getattr(getattr(pipe, name), _ATTR, None) is not None:
            raise ValueError(f"accelerate: this pipeline's `{name}` is already accelerated; call "
                             "eekernels.disable(pipe) first to change its schedule or policy")
        accelerate_model(getattr(pipe, name), family, s, exit_policy, graphs, kernels, forecast_order)
    _install_loop(pipe, tuple(names))
    # A denoiser set later (the pipeline was built with `transformer=None`) is accelerated when a run starts.
    seen = weakref.WeakSet(getattr(pipe, n) for n in present)
    options = dict(exit_policy=exit_policy, graphs=graphs, kernels=kernels, forecast_order=forecast_order)
    object.__setattr__(pipe, "_eekernels_plan", (family, schedule, options, seen))
    return pipe


def controller(obj) -> Controller | None:
    """The exit controller of an accelerated model, or of a pipeline's first accelerated denoiser."""
    ctl = getattr(obj, _ATTR, None)
    if ctl is None and hasattr(obj, "_eekernels_denoisers"):
        found = _controllers(obj)
        ctl = found[0] if found else None
    return ctl


def disable(obj) -> None:
    """Remove everything ``accelerate`` attached to a model or a pipeline (in place): the plain model again."""
    names = getattr(obj, "_eekernels_denoisers", None)
    if names is not None:
        for name in names:
            model = getattr(obj, name, None)
            if model is not None and getattr(model, _ATTR, None) is not None:
                disable(model)
        _uninstall_loop(obj, names)
        return
    ctl = getattr(obj, _ATTR, None)
    if ctl is None:
        raise ValueError(f"disable: expected a model or pipeline accelerated in place, got an unaccelerated "
                         f"{type(obj).__name__}")
    for module, name in reversed(ctl.attached):
        _hook_chain.remove(module, name)  # leaves accelerate's offload hooks (and any outer wrapper) in place
    if getattr(ctl, "patches", None) is not None:  # after the exit hooks, which wrap the patched forwards
        patches.unpatch(obj)
    del obj.__dict__[_ATTR]


def set_schedule(obj, schedule) -> None:
    """Another exit schedule (or None: full depth) for a model accelerated in place, or for every accelerated
    denoiser of a pipeline (a dict ``{name: schedule}`` gives each its own), same policy; checked for every
    denoiser before any is changed. The next call runs under it (``eekernels.calibrate`` tries its plans so)."""
    names = getattr(obj, "_eekernels_denoisers", None)
    if names is None:
        if getattr(obj, _ATTR, None) is None:
            raise ValueError(f"set_schedule: expected a model or pipeline accelerated in place, got an "
                             f"unaccelerated {type(obj).__name__}")
        getattr(obj, _ATTR).use(schedule)
        return
    pick = (lambda n: schedule.get(n)) if isinstance(schedule, dict) else (lambda n: schedule)
    ctls = [(n, getattr(getattr(obj, n, None), _ATTR, None)) for n in names]
    ctls = [(n, c) for n, c in ctls if c is not None]
    for n, c in ctls:  # every check first: a refused schedule changes nothing
        c.check(pick(n))
    for n, c in ctls:
        c.use(pick(n))
    plan = vars(obj).get("_eekernels_plan")
    if plan is not None:
        object.__setattr__(obj, "_eekernels_plan", (plan[0], schedule, *plan[2:]))


@dataclass(frozen=True)
class PlannedStep:
    """One step of :func:`plan`: its index, t (the family's ``step_t`` of the scheduler's timestep, as the loop
    tracking reads it), the denoiser the pipeline calls, and that call's depth."""

    step: int
    t: float
    denoiser: str
    depth: int
    num_blocks: int


def plan(pipe, num_inference_steps: int | None = None, **set_timesteps_kwargs) -> list[PlannedStep]:
    """Per step of a run of ``pipe`` (accelerated in place): which denoiser runs and at which depth, as the loop
    sets them. The steps are those of a copy of the pipeline's scheduler after ``set_timesteps(num_inference_steps,
    **set_timesteps_kwargs)`` (None: the scheduler's current timesteps; the pipeline's scheduler is not touched);
    the denoiser is the family's ``route`` (Wan 2.2's boundary between its two experts), else the first present."""
    names = getattr(pipe, "_eekernels_denoisers", None)
    if not names:
        raise ValueError(f"plan: `pipe` expected a pipeline accelerated in place, got {type(pipe).__name__}")
    family = vars(pipe)["_eekernels_plan"][0]
    scheduler = copy.deepcopy(pipe.scheduler)
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps, **set_timesteps_kwargs)
    ts = getattr(scheduler, "timesteps", None)
    if not isinstance(ts, torch.Tensor):
        raise ValueError("plan: the pipeline's scheduler has no timesteps; pass `num_inference_steps`")
    order = int(getattr(scheduler, "order", 1) or 1)
    view = copy.copy(pipe)  # the pipeline with the copied scheduler, for the family's step_t
    vars(view)["scheduler"] = scheduler
    values = _step_t(view, family)
    if values is None:
        values = ts.detach().to("cpu", torch.float64).reshape(-1).tolist()
    out = []
    for i, t in enumerate(values):
        if family.route is not None:
            name = family.route(pipe, t)
        else:
            name = next((n for n in names if getattr(pipe, n, None) is not None), names[0])
        ctl = getattr(getattr(pipe, name, None), _ATTR, None)
        if ctl is None:
            raise ValueError(f"plan: step {i} (t={t:g}) calls the pipeline's `{name}`, which is "
                             f"{'None' if getattr(pipe, name, None) is None else 'not accelerated'}")
        out.append(PlannedStep(i, t, name, ctl.depth_at(t, i // order), ctl.num_blocks))
    return out


@contextlib.contextmanager
def at_depth(model: nn.Module, depth: int | None):
    """Run the calls inside at ``depth`` blocks (None: full depth), whatever the timestep: for your own loop."""
    ctl = getattr(model, _ATTR, None)
    if ctl is None:
        raise ValueError(f"at_depth: `model` expected a model accelerated in place, got {type(model).__name__}")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)
                              or not ctl.min_reuse_depth <= depth <= ctl.num_blocks):
        why = f" ({ctl.no_depth0})" if depth == 0 and ctl.no_depth0 else ""
        raise ValueError(f"at_depth: `depth` expected an int in [{ctl.min_reuse_depth}, {ctl.num_blocks}] or None, "
                         f"got {depth!r}{why}")
    if ctl.uses_cache and depth is not None and depth not in ctl.levels:
        # the exit caches record the schedule's depths only: another has nothing to stand in for the skipped blocks
        raise ValueError(f"at_depth: `depth` expected one of the schedule's depths {list(ctl.levels)} or None under "
                         f"exit_policy={ctl.policy!r} (its cache records those depths only), got {depth}")
    old = ctl.forced_depth
    ctl.forced_depth = ctl.num_blocks if depth is None else depth
    try:
        yield
    finally:
        ctl.forced_depth = old
