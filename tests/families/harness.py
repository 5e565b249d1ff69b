"""The checks every family of the table passes in place, written once; a family's test file gives a :class:`Case`.

A family test is then a tiny pipeline builder and a few lines:

    CASE = Case(name="wan", make_pipeline=..., call=..., make_model=..., inputs=..., lists=("blocks",))

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_wan(check):
        check(CASE)

The checks (each against an independent reference, float32, randomized parameters):
- ``full_depth_is_bit_identical``: ``accelerate(pipe)`` keeps the user's denoiser object (same class, same parameter
  storage, same state_dict keys) and gives the plain pipeline's output bit for bit; ``disable`` restores it;
- ``every_depth_equals_sliced``: at every depth the model equals a copy whose block lists are cut by hand (depth counts
  the lists in execution order);
- ``cache_equals_replay``: ``exit_policy="cache"`` equals the sliced model plus the image-stream residual recorded
  by torch forward hooks at a full call;
- ``schedule_depth_per_step``: a pipeline run under a schedule calls the model at each step's scheduled depth, at
  the family's t of the step, and ``inplace.plan`` reports those t and depths;
- ``compile_one_graph_per_depth``: ``torch.compile(fullgraph=True)`` has no graph break and one graph per depth;
- ``calibrates_on_the_pipeline``: ``eekernels.calibrate(pipe, inputs=...)`` under the pipeline's own loop meets the
  budget, leaves the pipeline plain, and ``accelerate(pipe, schedule=...)`` then runs exactly the plan's depths;
  the schedule file round-trips (``Case.calibration`` gives the call kwargs, else ``Case.call`` runs it).

A model with several outputs (LTX-2: video and audio) gives ``Case.outputs``: every output is compared; a model whose
blocks carry two output streams gives ``Case.second`` (the cache replay adds the residual to both). The diffusers
operations on an accelerated pipeline are in :mod:`tests.families.operations`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

import eekernels
from eekernels import ExitSchedule, inplace


@dataclass
class Case:
    """One family's tiny pipeline and denoiser, and how to call them."""

    name: str
    make_pipeline: Callable[[], Any]
    call: Callable[[Any, int], torch.Tensor]  # (pipe, seed) -> the pipeline's output as a tensor
    make_model: Callable[[], nn.Module]
    inputs: Callable[[int], dict]  # seed -> keyword arguments of one direct model call
    lists: tuple[str, ...]  # the block lists, in execution order (for slicing by hand)
    denoiser: str = "transformer"
    image_stream: Callable[[Any], torch.Tensor] = None  # a block's output -> its image stream (default: see below)
    sliced: Callable[[nn.Module, int], nn.Module] | None = None  # a custom hand-cut model, else the lists cut
    # (joint stream, n) -> its n image tokens, for models whose later blocks take the text and image tokens as one
    # stream (the residual of an exit at an image-only block is taken on the image part of the last block's output)
    image_part: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    compile_backend: str = "aot_eager"
    # read by the operation checks (OPS): "lora_targets" (module names a LoRA adapts), "load_with" ({component:
    # object} for from_pretrained, for components diffusers cannot save)
    extra: dict = field(default_factory=dict)
    # seed -> the pipeline's call kwargs of one calibration sample (2-3 steps); None: calibrate on `call(pipe, seed)`
    calibration: Callable[[int], dict] | None = None
    outputs: Callable[[Any], tuple] | None = None  # the model's output -> every output tensor (default: the main one)
    second: tuple[str, Callable[[Any], torch.Tensor]] | None = None  # (argument, fn(block output)) of a second output
    # stream the blocks carry (LTX-2's audio): the cache replay adds its residual too
    # the operation checks (``operations`` function names) that run in the slow tier for this case: those that take
    # minutes on the 2-core CPU where the others take seconds
    slow_checks: tuple[str, ...] = ()


def results(case: Case, o) -> tuple:
    """Every output tensor of a model call that the checks compare."""
    return tuple(case.outputs(o)) if case.outputs is not None else (output(o),)


def _equal(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def _diff(a: tuple, b: tuple) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def output(o):
    """The model's main output tensor (``.sample`` of a diffusers output, or the first of a tuple; a list of one
    tensor per sample, as Z-Image returns, stacked)."""
    if not isinstance(o, torch.Tensor):
        o = o.sample if hasattr(o, "sample") else o[0]
    return torch.stack(list(o)) if isinstance(o, (list, tuple)) else o


def _blocks(model, lists):
    out = []
    for name in lists:
        b = getattr(model, name)
        out += list(b) if isinstance(b, nn.ModuleList) else [b]
    return out


def sliced(case: Case, model: nn.Module, d: int) -> nn.Module:
    """A deep copy of ``model`` whose block lists keep only the first d blocks in execution order."""
    if case.sliced is not None:
        return case.sliced(copy.deepcopy(model), d)
    m = copy.deepcopy(model)
    for name in case.lists:
        blocks = getattr(m, name)
        keep = min(d, len(blocks))
        setattr(m, name, nn.ModuleList(list(blocks)[:keep]))
        d -= keep
    return m


def _image(case: Case, out):
    if case.image_stream is not None:
        return case.image_stream(out)
    if isinstance(out, torch.Tensor):
        return out
    from diffusers.hooks._helpers import TransformerBlockRegistry  # noqa: F401  (the index is the block's own)

    raise AssertionError(f"{case.name}: give Case.image_stream for blocks returning {type(out).__name__}")


# --------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------
def full_depth_is_bit_identical(case: Case):
    pipe = case.make_pipeline()
    ref = case.call(pipe, 3)
    model = getattr(pipe, case.denoiser)
    keys, ptrs = list(model.state_dict()), [p.data_ptr() for p in model.parameters()]
    assert eekernels.accelerate(pipe) is pipe
    assert getattr(pipe, case.denoiser) is model
    assert list(model.state_dict()) == keys and [p.data_ptr() for p in model.parameters()] == ptrs
    got = case.call(pipe, 3)
    assert torch.equal(got, ref), f"{case.name}: full depth in place differs by {(got - ref).abs().max()}"
    eekernels.disable(pipe)
    assert torch.equal(case.call(pipe, 3), ref)


def every_depth_equals_sliced(case: Case):
    model = case.make_model()
    plain = copy.deepcopy(model)
    kw = case.inputs(0)
    eekernels.accelerate(model)
    total = inplace.controller(model).num_blocks
    assert total == len(_blocks(model, case.lists))
    for d in range(inplace.controller(model).min_depth, total + 1):
        with torch.no_grad(), inplace.at_depth(model, d):
            got = results(case, model(**kw))
        with torch.no_grad():
            want = results(case, sliced(case, plain, d)(**kw))
        assert _equal(got, want), f"{case.name} depth {d}: {_diff(got, want)}"


def cache_equals_replay(case: Case, d: int | None = None):
    model = case.make_model()
    plain = copy.deepcopy(model)
    kw1, kw2 = case.inputs(1), case.inputs(2)
    blocks = _blocks(plain, case.lists)
    total = len(blocks)
    d = max(1, total - 2) if d is None else d
    seen = {}

    def grab_in(mod, args, kwargs):
        seen["in"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if case.second is not None:
            seen["in2"] = kwargs[case.second[0]]

    def grab_out(mod, args, out):
        seen["out"] = _image(case, out)
        if case.second is not None:
            seen["out2"] = case.second[1](out)

    h1 = blocks[d].register_forward_pre_hook(grab_in, with_kwargs=True)
    h2 = blocks[-1].register_forward_hook(grab_out)
    with torch.no_grad():
        full_ref = results(case, plain(**kw1))
    h1.remove(), h2.remove()
    out = seen["out"]
    if out.shape != seen["in"].shape:
        assert case.image_part is not None, f"{case.name}: give Case.image_part (the streams' shapes differ)"
        out = case.image_part(out, seen["in"].shape[1])
    residual = out - seen["in"]
    residual2 = seen["out2"] - seen["in2"] if case.second is not None else None
    cut = sliced(case, plain, d)
    last = _blocks(cut, case.lists)[d - 1]  # the last block that runs (a custom cut may keep stand-ins after it)

    def plus(h):  # the residual on the image stream (its image part where the cut is before a joint list)
        return h + (residual if residual.shape == h.shape else case.image_part(residual, h.shape[1]))

    def add(mod, args, out):
        if isinstance(out, torch.Tensor):
            return plus(out)
        img = _image(case, out)
        other = case.second[1](out) if case.second is not None else None
        return tuple(plus(o) if o is img else o + residual2 if o is other else o for o in out)

    last.register_forward_hook(add)
    with torch.no_grad():
        want = results(case, cut(**kw2))
    eekernels.accelerate(model, schedule=ExitSchedule.periodic(2, d, total), exit_policy="cache")
    with torch.no_grad():
        full = results(case, model(**kw1))
        got = results(case, model(**kw2))
    assert _equal(full, full_ref)
    assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-5) for g, w in zip(got, want)), _diff(got, want)


def schedule_depth_per_step(case: Case):
    pipe = case.make_pipeline()
    model = getattr(pipe, case.denoiser)
    eekernels.accelerate(pipe)
    total = inplace.controller(model).num_blocks
    lo = inplace.controller(model).min_depth
    eekernels.disable(pipe)
    table = [total, total, max(lo, total - 1), lo, max(lo, total - 2), lo, total, lo, lo, lo]
    schedule = ExitSchedule.piecewise(table)
    eekernels.accelerate(pipe, schedule=schedule)
    ctl = inplace.controller(model)
    seen = record_depths(model, with_t=True)
    case.call(pipe, 3)
    values = inplace._step_t(pipe)  # the family's t of each scheduler timestep (Cosmos, ACE-Step), else None
    ts = [float(t) for t in pipe.scheduler.timesteps] if values is None else values
    expect = [(t, ctl.depth_at(t, i)) for i, t in enumerate(ts)]
    per_step = len(seen) // len(expect)
    assert per_step >= 1 and seen == [e for e in expect for _ in range(per_step)], (seen, expect)
    assert len({d for _, d in seen}) > 1, f"{case.name}: the schedule's depths did not vary ({seen})"
    planned = [(s.t, s.depth) for s in inplace.plan(pipe)]  # the run's steps, as plan() reports them
    assert planned == expect, (planned, expect)


def compile_one_graph_per_depth(case: Case):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = case.make_model()
    kw = case.inputs(0)
    eekernels.accelerate(model)
    ctl = inplace.controller(model)
    depths = range(ctl.min_depth, ctl.num_blocks + 1)
    eager = {}
    for d in depths:
        with torch.no_grad(), inplace.at_depth(model, d):
            eager[d] = results(case, model(**kw))
    compiled = torch.compile(model, fullgraph=True, backend=case.compile_backend)
    for _ in range(2):
        for d in depths:
            with torch.no_grad(), inplace.at_depth(model, d):
                got = results(case, compiled(**kw))
            assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(got, eager[d])), _diff(got, eager[d])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == len(depths), dict(counters["stats"])


def calibration_inputs(case: Case, seeds=(0,)) -> list:
    """The calibration set of ``case``: its call kwargs per seed, or callables running ``case.call``."""
    if case.calibration is not None:
        return [case.calibration(s) for s in seeds]
    return [lambda pipe, s=s: case.call(pipe, s) for s in seeds]


def run_input(pipe, item, seed: int = 0):
    """Run one calibration input as ``calibrate`` does (a dict without a generator gets one seeded by ``seed``)."""
    if callable(item):
        return item(pipe)
    kw = dict(item)
    kw.setdefault("generator", torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return pipe(**kw)


def calibrates_on_the_pipeline(case: Case, budget: float = 0.7):
    import tempfile
    from pathlib import Path

    pipe = case.make_pipeline()
    model = getattr(pipe, case.denoiser)
    inputs = calibration_inputs(case)
    sched = eekernels.calibrate(pipe, inputs=inputs, budget=budget)
    rep = sched.calibration
    L, n = rep.num_blocks, len(rep.plan)
    assert rep.measure == "calls" and n == len(rep.call_timesteps) >= 1
    assert sum(rep.plan) <= budget * L * n + 1e-9, (rep.plan, budget)
    assert inplace.controller(model) is None and "progress_bar" not in vars(pipe), "calibrate left hooks on the pipe"
    with tempfile.TemporaryDirectory() as tmp:  # the file round-trips, and the loaded schedule is what runs
        back = ExitSchedule.load(sched.save(Path(tmp) / "schedule.json"))
    assert back.table == sched.table and back.total_depth == L and back.calibration == rep
    eekernels.accelerate(pipe, schedule=back)
    ctl = inplace.controller(model)
    assert ctl.num_blocks == L
    seen, begin = [], ctl.begin

    def record(t, *args, **kwargs):
        begin(t, *args, **kwargs)
        seen.append(ctl.num_blocks if ctl.depth is None else ctl.depth)

    ctl.begin = record
    run_input(pipe, inputs[0])
    assert seen == rep.plan, f"{case.name}: ran {seen}, the plan is {rep.plan}"
    eekernels.disable(pipe)


CHECKS = (full_depth_is_bit_identical, every_depth_equals_sliced, cache_equals_replay, schedule_depth_per_step,
          compile_one_graph_per_depth, calibrates_on_the_pipeline)


def record_depths(model, with_t: bool = False) -> list:
    """A list that gets the depth of each later call of the accelerated ``model`` (wraps its controller's
    ``begin``); ``with_t``: ``(t, depth)``, t being the one the pipeline loop set for the call's step."""
    ctl, seen = inplace.controller(model), []
    begin = ctl.begin

    def record(t, *args, **kwargs):
        begin(t, *args, **kwargs)
        depth = ctl.num_blocks if ctl.depth is None else ctl.depth
        seen.append((ctl.loop_t, depth) if with_t else depth)

    ctl.begin = record
    return seen


class BlocksRan:
    """The blocks that ran in each call of ``model``: torch pre-hooks on every submodule of every block of the
    case's lists (a block skipped by early exit calls none of them), not eekernels' bookkeeping."""

    def __init__(self, case: Case, model: nn.Module):
        self.calls: list[set] = []
        self.handles = [model.register_forward_pre_hook(lambda *a: self.calls.append(set()))]
        for i, block in enumerate(_blocks(model, case.lists)):
            for m in list(block.modules())[1:]:
                self.handles.append(m.register_forward_pre_hook(lambda *a, i=i: self.calls[-1].add(i)))

    def depths(self) -> list[int]:
        for h in self.handles:
            h.remove()
        for s in self.calls:
            assert s == set(range(len(s))), f"not a prefix of the blocks: {sorted(s)}"
        return [len(s) for s in self.calls]


def block_fraction(preset: str, timesteps) -> float:
    """The fraction of the blocks a family's preset runs over the calls at ``timesteps`` (eekernels' t, one per
    call): its mean depth over its full depth. A family's blocks all cost the same, so this is the fraction of the
    block FLOPs."""
    schedule = ExitSchedule.preset(preset)
    t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
    return schedule.mean_depth(t) / schedule.total_depth


def patched_equals_plain(case: Case, counts: dict, unpatched: set):
    """``eekernels.patches.report`` on the case's model accelerated in place: ``counts`` (rule: modules replaced),
    and the classes left as they are (each with its reason) are ``unpatched``; with the fused path forced on the CPU
    the patched model equals the unpatched one (float32, 1e-5) at full depth and at the smallest depth."""
    from eekernels import patches

    model = case.make_model()
    plain = copy.deepcopy(model)
    eekernels.accelerate(model)
    rep = patches.report(model)
    assert rep.counts() == counts, rep.counts()
    assert {cls for cls, _ in rep.reasons()} == set(unpatched), rep.reasons()
    kw = case.inputs(0)
    for d in (None, inplace.controller(model).min_depth):
        with torch.no_grad(), patches.forced(), inplace.at_depth(model, d):
            got = results(case, model(**kw))
        with torch.no_grad():
            want = results(case, (plain if d is None else sliced(case, plain, d))(**kw))
        assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-5) for g, w in zip(got, want)), _diff(got, want)
    eekernels.disable(model)
    assert patches.report(model) is None
