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
- ``schedule_depth_per_step``: a pipeline run under a schedule calls the model at each step's scheduled depth;
- ``compile_one_graph_per_depth``: ``torch.compile(fullgraph=True)`` has no graph break and one graph per depth.

The diffusers operations (``OPS``, each with a pytest ``tmp_path``), done on the pipeline after ``accelerate``: the
output at full depth is the plain pipeline's given the same operation, bit for bit; under a schedule each model call
runs its step's blocks (torch pre-hooks on the blocks' submodules); ``disable`` restores the plain output:
``save_load_round_trip``, ``load_lora_weights``, ``set_attn_processor``, ``pipe_to_dtype`` (bfloat16).
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
    compile_backend: str = "aot_eager"
    # read by the operation checks (OPS): "lora_targets" (module names a LoRA adapts), "load_with" ({component:
    # object} for from_pretrained, for components diffusers cannot save)
    extra: dict = field(default_factory=dict)


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
            got = output(model(**kw))
        with torch.no_grad():
            want = output(sliced(case, plain, d)(**kw))
        assert torch.equal(got, want), f"{case.name} depth {d}: {(got - want).abs().max()}"


def cache_equals_replay(case: Case, d: int | None = None):
    model = case.make_model()
    plain = copy.deepcopy(model)
    kw1, kw2 = case.inputs(1), case.inputs(2)
    blocks = _blocks(plain, case.lists)
    total = len(blocks)
    d = total - 2 if d is None else d
    seen = {}

    def grab_in(mod, args, kwargs):
        seen["in"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    h1 = blocks[d].register_forward_pre_hook(grab_in, with_kwargs=True)
    h2 = blocks[-1].register_forward_hook(lambda mod, args, out: seen.__setitem__("out", _image(case, out)))
    with torch.no_grad():
        full_ref = output(plain(**kw1))
    h1.remove(), h2.remove()
    residual = seen["out"] - seen["in"]
    cut = sliced(case, plain, d)
    last = _blocks(cut, case.lists)[-1]

    def add(mod, args, out):
        if isinstance(out, torch.Tensor):
            return out + residual
        img = _image(case, out)
        return tuple(o + residual if o is img else o for o in out)

    last.register_forward_hook(add)
    with torch.no_grad():
        want = output(cut(**kw2))
    eekernels.accelerate(model, schedule=ExitSchedule.periodic(2, d, total), exit_policy="cache")
    with torch.no_grad():
        full = output(model(**kw1))
        got = output(model(**kw2))
    assert torch.equal(full, full_ref)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


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
    seen, begin = [], ctl.begin

    def record(*args, **kwargs):
        begin(*args, **kwargs)
        seen.append(ctl.depth or ctl.num_blocks)

    ctl.begin = record
    case.call(pipe, 3)
    expect = [ctl.depth_at(float(t), i) for i, t in enumerate(pipe.scheduler.timesteps)]
    per_step = len(seen) // len(expect)
    assert per_step >= 1 and seen == [d for d in expect for _ in range(per_step)], (seen, expect)
    assert len(set(seen)) > 1, f"{case.name}: the schedule's depths did not vary ({seen})"


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
            eager[d] = output(model(**kw))
    compiled = torch.compile(model, fullgraph=True, backend=case.compile_backend)
    for _ in range(2):
        for d in depths:
            with torch.no_grad(), inplace.at_depth(model, d):
                assert torch.allclose(output(compiled(**kw)), eager[d], atol=1e-5)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == len(depths), dict(counters["stats"])


CHECKS = (full_depth_is_bit_identical, every_depth_equals_sliced, cache_equals_replay, schedule_depth_per_step,
          compile_one_graph_per_depth)


# --------------------------------------------------------------------------------------------------
# Diffusers operations on the accelerated pipeline, each against the plain pipeline doing the same
# --------------------------------------------------------------------------------------------------
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


def op_schedule(case: Case, pipe) -> ExitSchedule:
    """A schedule whose depth changes from step to step (full depth and the least), for the operation checks."""
    model = getattr(pipe, case.denoiser)
    eekernels.accelerate(model)
    total, lo = inplace.controller(model).num_blocks, inplace.controller(model).min_depth
    eekernels.disable(model)
    return ExitSchedule.piecewise([lo, total] * 5)


def accelerated_like(case: Case, pipe, want: torch.Tensor, schedule: ExitSchedule) -> None:
    """``pipe``, accelerated with ``schedule`` and then given an operation: at full depth its output is ``want`` (the
    plain pipeline given the same operation) bit for bit; under the schedule each model call runs the blocks of its
    step's depth; after ``disable`` it gives ``want`` again with every block."""
    model = getattr(pipe, case.denoiser)
    with inplace.at_depth(model, None):
        got = case.call(pipe, 3)
    assert torch.equal(got, want), f"{case.name}: full depth differs from the plain pipeline: {(got - want).abs().max()}"
    ran = BlocksRan(case, model)
    case.call(pipe, 3)
    depths = ran.depths()
    per = schedule.plan(pipe.scheduler.timesteps.detach().to("cpu", torch.float64).reshape(-1)).tolist()
    k = max(1, len(depths) // len(per))
    assert depths == [d for d in per for _ in range(k)], (depths, per)
    assert len(set(depths)) > 1, depths
    eekernels.disable(pipe)
    ran = BlocksRan(case, model)
    assert torch.equal(case.call(pipe, 3), want)
    assert set(ran.depths()) == {len(_blocks(model, case.lists))}


def save_load_round_trip(case: Case, tmp_path):
    """``save_pretrained`` on the accelerated pipeline writes the user's model (no hooks, no eekernels in its config);
    ``from_pretrained`` loads a plain pipeline giving the same images."""
    import json

    pipe = case.make_pipeline()
    schedule = op_schedule(case, pipe)
    eekernels.accelerate(pipe, schedule=schedule)
    model = getattr(pipe, case.denoiser)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index[case.denoiser] == ["diffusers", type(model).__name__]
    assert "eekernels" not in (tmp_path / case.denoiser / "config.json").read_text()
    missing = {k: None for k, v in pipe.components.items() if v is None}  # diffusers needs them named
    missing.update(case.extra.get("load_with", {}))  # components diffusers cannot save (a stand-in)
    loaded = type(pipe).from_pretrained(tmp_path, **missing)
    loaded.set_progress_bar_config(disable=True)
    again = getattr(loaded, case.denoiser)
    assert type(again) is type(model) and again is not model and inplace.controller(again) is None
    sd, sd2 = model.state_dict(), again.state_dict()
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():  # safetensors' tensors sit at addresses BLAS may round differently from (last bit)
        for p in again.parameters():
            p.data = p.data.clone()
    accelerated_like(case, pipe, case.call(loaded, 3), schedule)


def load_lora_weights(case: Case, tmp_path):
    """A random LoRA (peft, B not zero, on ``case.extra["lora_targets"]``) saved with the pipeline class's
    ``save_lora_weights`` and loaded with ``load_lora_weights`` after ``accelerate``: the images of the plain pipeline
    with the same LoRA."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    tr = case.make_model()
    torch.manual_seed(7)
    tr.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=case.extra["lora_targets"]))
    plain = case.make_pipeline()
    type(plain).save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(tr))
    before = case.call(plain, 3)
    plain.load_lora_weights(tmp_path)
    want = case.call(plain, 3)
    assert not torch.equal(want, before), f"{case.name}: the LoRA does not change the images"
    pipe = case.make_pipeline()
    schedule = op_schedule(case, pipe)
    eekernels.accelerate(pipe, schedule=schedule)
    pipe.load_lora_weights(tmp_path)
    assert getattr(pipe, case.denoiser).peft_config  # the adapter is on the user's model
    accelerated_like(case, pipe, want, schedule)


def _counting(procs: dict, count: list) -> dict:
    """A subclass of each processor's class that counts its calls (same signature: diffusers passes the same
    arguments)."""
    out = {}
    for key, proc in procs.items():
        base = type(proc)

        def call(self, *a, _base=base, **k):
            count[0] += 1
            return _base.__call__(self, *a, **k)

        out[key] = type(f"Counting{base.__name__}", (base,), {"__call__": call})()
    return out


def set_attn_processor(case: Case, tmp_path=None):
    """Processors set after ``accelerate`` are the ones that run, in the blocks that run; images as the plain
    pipeline's with the same processors."""
    plain = case.make_pipeline()
    den = getattr(plain, case.denoiser)
    den.set_attn_processor(_counting(den.attn_processors, [0]))
    want = case.call(plain, 3)
    pipe = case.make_pipeline()
    schedule = op_schedule(case, pipe)
    eekernels.accelerate(pipe, schedule=schedule)
    model, count = getattr(pipe, case.denoiser), [0]
    procs = _counting(model.attn_processors, count)
    model.set_attn_processor(dict(procs))  # diffusers empties the dict it is given
    assert model.attn_processors == procs
    counts = []
    for depth in (inplace.controller(model).min_depth, None):
        count[0] = 0
        with inplace.at_depth(model, depth):
            case.call(pipe, 3)
        counts.append(count[0])
    assert 0 < counts[0] < counts[1], counts
    accelerated_like(case, pipe, want, schedule)


def pipe_to_dtype(case: Case, tmp_path=None, dtype=torch.bfloat16):
    """``pipe.to(dtype)`` after ``accelerate`` converts the user's own model; images as the plain pipeline's in that
    dtype (``case.call`` casts its inputs to the denoiser's dtype)."""
    plain = case.make_pipeline().to(dtype)
    want = case.call(plain, 3)
    pipe = case.make_pipeline()
    model = getattr(pipe, case.denoiser)
    schedule = op_schedule(case, pipe)
    eekernels.accelerate(pipe, schedule=schedule)
    assert pipe.to(dtype) is pipe and getattr(pipe, case.denoiser) is model
    assert all(p.dtype == dtype for p in model.parameters())
    accelerated_like(case, pipe, want, schedule)


OPS = (save_load_round_trip, load_lora_weights, set_attn_processor, pipe_to_dtype)
