"""diffusers operations on a pipeline accelerated in place, written once for any family's :class:`~harness.Case`.

Each operation runs on the plain pipeline (its images: ``want``) and on ``eekernels.accelerate(pipe, schedule=...)``
(a schedule that exits early), done after accelerating; then :func:`check`:

- full depth (``inplace.at_depth(model, None)``): the accelerated pipeline gives ``want`` bit for bit;
- early exit still happens: the blocks that run in each model call, seen by torch pre-hooks on every block's
  submodules (not eekernels' bookkeeping), are the first ``schedule.plan(timesteps)`` blocks;
- ``eekernels.disable(pipe)``: ``want`` again, every block in every call.

``case.call(pipe, seed, **extra)`` must take extra pipeline arguments (the dtype check passes its embeddings cast).
A family test calls the operations its pipelines support, e.g. ``operations.save_pretrained_round_trip(CASE,
tmp_path)``; where diffusers itself does not support one, the test says so on the plain pipeline.
"""
from __future__ import annotations

import functools
import json

import torch
import torch.nn as nn

import eekernels
from eekernels import ExitSchedule, inplace

SEED = 3


def _blocks(model, lists):
    out = []
    for name in lists:
        b = getattr(model, name)
        out += list(b) if isinstance(b, nn.ModuleList) else [b]
    return out


class BlocksRun:
    """The blocks that ran in each call of ``model``: torch pre-hooks on every submodule of every block (a block
    skipped by early exit calls none of them)."""

    def __init__(self, model, lists):
        blocks = _blocks(model, lists)
        self.calls, self.total = [], len(blocks)
        self.handles = [model.register_forward_pre_hook(lambda *a: self.calls.append(set()))]
        for i, block in enumerate(blocks):
            for m in list(block.modules())[1:]:
                self.handles.append(m.register_forward_pre_hook(functools.partial(self._ran, i)))

    def _ran(self, i, *_):
        self.calls[-1].add(i)

    def depths(self) -> list[int]:
        for h in self.handles:
            h.remove()
        for s in self.calls:
            assert s == set(range(len(s))), f"not a prefix of the blocks: {sorted(s)}"
        return [len(s) for s in self.calls]


def schedule_for(case, model) -> ExitSchedule:
    """A schedule over ten t bins whose depths vary from 1 to full (every list exits somewhere)."""
    total = len(_blocks(model, case.lists))
    return ExitSchedule.piecewise([total, max(1, total - 1), 1, total, max(1, total - 2), 1, total, 1, total, 1])


def planned(schedule, timesteps, calls) -> list[int]:
    """The depth of each model call the schedule asks for (one or more calls per scheduler timestep)."""
    per = schedule.plan(timesteps.detach().to("cpu", torch.float64).reshape(-1)).tolist()
    k = max(1, calls // len(per))
    return [d for d in per for _ in range(k)]


def accelerated(case, pipe=None):
    """``case``'s pipeline accelerated with :func:`schedule_for`: (pipe, schedule)."""
    pipe = case.make_pipeline() if pipe is None else pipe
    schedule = schedule_for(case, getattr(pipe, case.denoiser))
    assert eekernels.accelerate(pipe, schedule=schedule) is pipe
    return pipe, schedule


def same(a, b) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def check(case, pipe, want, schedule, **extra):
    """See the module docstring; ``extra`` goes to every pipeline call."""
    model = getattr(pipe, case.denoiser)
    with inplace.at_depth(model, None):
        got = case.call(pipe, SEED, **extra)
    assert same(got, want), f"{case.name}: full depth differs from the plain pipeline: {(got - want).abs().max()}"
    ran = BlocksRun(model, case.lists)
    case.call(pipe, SEED, **extra)
    depths = ran.depths()
    assert depths == planned(schedule, pipe.scheduler.timesteps, len(depths)), (case.name, depths)
    assert min(depths) < ran.total, f"{case.name}: no call exited early"
    eekernels.disable(pipe)
    ran = BlocksRun(model, case.lists)
    got = case.call(pipe, SEED, **extra)
    assert same(got, want), f"{case.name}: after disable: {(got - want).abs().max()}"
    assert set(ran.depths()) == {ran.total}, f"{case.name}: disable left blocks skipped"


# --------------------------------------------------------------------------------------------------
# The operations
# --------------------------------------------------------------------------------------------------
def save_pretrained_round_trip(case, tmp_path, prepare=lambda pipe: pipe):
    """``save_pretrained`` while accelerated writes the user's denoiser in the diffusers layout, without hooks;
    ``from_pretrained`` (then ``prepare``, for settings a pipeline does not save) gives the same images."""
    pipe, schedule = accelerated(case)
    model = getattr(pipe, case.denoiser)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index[case.denoiser] == ["diffusers", type(model).__name__]
    assert "eekernels" not in (tmp_path / case.denoiser / "config.json").read_text()
    missing = {k: None for k, v in pipe.components.items() if v is None}  # diffusers needs them named
    loaded = prepare(type(pipe).from_pretrained(tmp_path, **missing))
    loaded.set_progress_bar_config(disable=True)
    again = getattr(loaded, case.denoiser)
    assert type(again) is type(model) and again is not model
    assert inplace.controller(again) is None and "progress_bar" not in vars(loaded)  # hooks are not saved
    sd, sd2 = model.state_dict(), again.state_dict()
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    check(case, pipe, case.call(loaded, SEED), schedule)


def load_lora_weights(case, tmp_path, target_modules=("to_q", "to_k", "to_v")):
    """A random LoRA (peft, B not zero), saved with the pipeline's ``save_lora_weights``, loaded after accelerating
    onto the user's denoiser."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    src = case.make_model()
    torch.manual_seed(7)
    src.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=list(target_modules)))
    plain = case.make_pipeline()
    type(plain).save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(src))
    before = case.call(plain, SEED)
    plain.load_lora_weights(tmp_path)
    want = case.call(plain, SEED)
    assert not same(want, before), f"{case.name}: the LoRA does not change the images"
    pipe, schedule = accelerated(case)
    pipe.load_lora_weights(tmp_path)
    assert getattr(pipe, case.denoiser).peft_config  # the adapter is on the user's denoiser
    check(case, pipe, want, schedule)


def _counting(procs, count):
    """A subclass of each processor's class that counts its calls (same signature: diffusers passes the same
    arguments)."""
    out = {}
    for key, proc in procs.items():
        base = type(proc)

        @functools.wraps(base.__call__)
        def call(self, *a, _base=base, **k):
            count[0] += 1
            return _base.__call__(self, *a, **k)

        out[key] = type(f"Counting{base.__name__}", (base,), {"__call__": call})()
    return out


def set_attn_processor(case):
    """Processors set after accelerating are the ones that run, in the blocks that run."""
    plain = case.make_pipeline()
    den = getattr(plain, case.denoiser)
    den.set_attn_processor(_counting(den.attn_processors, [0]))
    want = case.call(plain, SEED)
    pipe, schedule = accelerated(case)
    den = getattr(pipe, case.denoiser)
    count = [0]
    procs = _counting(den.attn_processors, count)
    den.set_attn_processor(dict(procs))  # diffusers empties the dict it is given
    assert den.attn_processors == procs
    counts = []
    for depth in (1, None):
        count[0] = 0
        with inplace.at_depth(den, depth):
            case.call(pipe, SEED)
        counts.append(count[0])
    assert 0 < counts[0] < counts[1], counts
    check(case, pipe, want, schedule)


def pipe_to_dtype(case, cast, dtype=torch.bfloat16):
    """``pipe.to(dtype)`` converts the caller's components in place (the same objects); ``cast(pipe, dtype)`` gives
    the call's arguments in that dtype (the prompt embeddings)."""
    plain = case.make_pipeline()
    plain.to(dtype)
    want = case.call(plain, SEED, **cast(plain, dtype))
    pipe, schedule = accelerated(case)
    before = {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}
    assert pipe.to(dtype) is pipe
    for key, module in before.items():
        assert getattr(pipe, key) is module
        assert all(p.dtype == dtype for p in module.parameters()), key
    assert want.dtype == dtype
    check(case, pipe, want, schedule, **cast(pipe, dtype))


def patched(case, expected: dict):
    """``accelerate`` patches ``expected`` (``{rule: modules}``) in the family's model; with the fused path forced
    (the torch reference on the CPU), every depth equals the unforced model within float32 rounding."""
    from eekernels import patches

    model = case.make_model()
    kw = case.inputs(0)
    eekernels.accelerate(model)
    report = inplace.controller(model).patches
    assert report.counts() == expected, str(report)
    ctl = inplace.controller(model)
    for d in range(ctl.min_depth, ctl.num_blocks + 1):
        with torch.no_grad(), inplace.at_depth(model, d):
            want = _sample(model(**kw))
            with patches.forced():
                got = _sample(model(**kw))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _sample(o):
    return o if isinstance(o, torch.Tensor) else (o.sample if hasattr(o, "sample") else o[0])
