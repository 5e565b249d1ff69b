"""What a diffusers user does with a family's pipeline accelerated in place, written once; a family's test file runs
these on its :class:`~tests.families.harness.Case` (issue 21's checklist, for the families of issue 22).

Each check does the operation on ``eekernels.accelerate(pipe, schedule=...)`` and on the plain pipeline, then:
- full depth (``inplace.at_depth(model, None)``) gives the plain pipeline's output with the same operation, bit for
  bit (float32 unless the operation is a cast);
- early exit still happens: in each model call the blocks that run, seen by torch pre-hooks on every submodule of
  every block (not eekernels' bookkeeping), are the first ``depth`` blocks, the depth the controller chose for that
  call, and some call runs fewer than all.

The operations: ``save_load_round_trip``, ``load_lora_weights`` (pipelines with a LoRA loader), ``add_adapter``
(a LoRA on the model, for pipelines without a loader),
``set_attn_processor`` (models with ``AttentionMixin``), ``pipe_to_dtype``; and ``patched`` (the fused ops
``accelerate`` patches in the family's model, exact at every depth). A family whose pipeline or model lacks
one says so in its test, checked on the plain objects.
"""
from __future__ import annotations

import copy
import functools
import json

import torch

import eekernels
from eekernels import ExitSchedule, inplace
from tests.families.harness import Case, _blocks, output


def _schedule(case: Case, model) -> ExitSchedule:
    """Full depth near the data end (t < 100), the smallest depth elsewhere: every pipeline run exits early."""
    eekernels.accelerate(model)
    ctl = inplace.controller(model)
    total, lo = ctl.num_blocks, ctl.min_depth
    eekernels.disable(model)
    return ExitSchedule.piecewise([total] + [lo] * 9, total_depth=total)


def _accelerated(case: Case):
    pipe = case.make_pipeline()
    model = getattr(pipe, case.denoiser)
    eekernels.accelerate(pipe, schedule=_schedule(case, model))
    return pipe, model


class _Ran:
    """The blocks that ran in each call of ``model`` (pre-hooks on every submodule of every block)."""

    def __init__(self, case: Case, model):
        self.calls, self.depths = [], []
        blocks = _blocks(model, case.lists)
        self.total = len(blocks)
        ctl = inplace.controller(model)
        begin = ctl.begin

        def record(t, *args, **kwargs):
            begin(t, *args, **kwargs)
            self.depths.append(ctl.num_blocks if ctl.depth is None else ctl.depth)
            self.calls.append(set())

        ctl.begin = record
        self._undo = lambda: vars(ctl).pop("begin")
        self.handles = []
        for i, block in enumerate(blocks):
            for m in list(block.modules())[1:]:
                self.handles.append(m.register_forward_pre_hook(functools.partial(self._ran, i)))

    def _ran(self, i, *_):
        self.calls[-1].add(i)

    def check(self, what: str):
        for h in self.handles:
            h.remove()
        self._undo()
        ran = [len(s) for s in self.calls]
        assert all(s == set(range(len(s))) for s in self.calls), f"{what}: not a prefix of the blocks"
        assert ran == self.depths, f"{what}: blocks run {ran}, depths chosen {self.depths}"
        assert ran and min(ran) < self.total, f"{what}: no call exited early ({ran})"


def _check(case: Case, pipe, model, want: torch.Tensor, what: str):
    with inplace.at_depth(model, None):
        got = case.call(pipe, 3)
    assert got.shape == want.shape and torch.equal(got, want), \
        f"{case.name} {what}: full depth differs from the plain pipeline by {(got - want).abs().max()}"
    ran = _Ran(case, model)
    case.call(pipe, 3)
    ran.check(f"{case.name} {what}")


# --------------------------------------------------------------------------------------------------
# The operations
# --------------------------------------------------------------------------------------------------
def save_load_round_trip(case: Case, path):
    """``save_pretrained`` while accelerated writes the plain diffusers model (no hooks, no eekernels config);
    ``from_pretrained`` loads it; the loaded pipeline equals the accelerated one at full depth."""
    pipe, model = _accelerated(case)
    pipe.save_pretrained(path)
    index = json.loads((path / "model_index.json").read_text())
    assert index[case.denoiser] == ["diffusers", type(model).__name__]
    assert "eekernels" not in (path / case.denoiser / "config.json").read_text()
    missing = {k: None for k, v in pipe.components.items() if v is None}  # diffusers needs them named
    loaded = type(pipe).from_pretrained(path, **missing, **case.extra.get("load_kwargs", {}))
    loaded.set_progress_bar_config(disable=True)
    again = getattr(loaded, case.denoiser)
    for p in again.parameters():  # out of the safetensors mmap (24-byte aligned: another CPU GEMM path, 1 ulp off)
        p.data = p.data.clone()
    assert type(again) is type(model) and again is not model and inplace.controller(again) is None
    sd, sd2 = model.state_dict(), again.state_dict()
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():  # loaded tensors can sit at addresses (safetensors) that BLAS rounds differently (last bit)
        for p in again.parameters():
            p.data = p.data.clone()
    _check(case, pipe, model, case.call(loaded, 3), "save_pretrained / from_pretrained")


def load_lora_weights(case: Case, path, targets=("to_q", "to_k", "to_v", "to_out.0")):
    """A random LoRA (peft, B not zero), written with the pipeline's ``save_lora_weights``, loaded after
    accelerate with ``load_lora_weights``."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    plain = case.make_pipeline()
    before = case.call(plain, 3)
    donor = copy.deepcopy(getattr(plain, case.denoiser))
    torch.manual_seed(7)
    donor.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=list(targets)))
    type(plain).save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(donor))
    plain.load_lora_weights(path)
    want = case.call(plain, 3)
    assert not torch.equal(want, before), f"{case.name}: the LoRA did not change the output"
    pipe, model = _accelerated(case)
    pipe.load_lora_weights(path)
    assert model.peft_config  # on the user's own model
    _check(case, pipe, model, want, "load_lora_weights")


def add_adapter(case: Case, targets=("to_q", "to_k", "to_v", "to_out.0")):
    """A random LoRA (peft, B not zero) added after accelerate with the model's own ``add_adapter``
    (``PeftAdapterMixin``), for families whose pipelines have no LoRA loader."""
    from peft import LoraConfig

    config = dict(r=2, lora_alpha=2, init_lora_weights=False, target_modules=list(targets))
    plain = case.make_pipeline()
    before = case.call(plain, 3)
    torch.manual_seed(7)
    getattr(plain, case.denoiser).add_adapter(LoraConfig(**config))
    want = case.call(plain, 3)
    assert not torch.equal(want, before), f"{case.name}: the LoRA did not change the output"
    pipe, model = _accelerated(case)
    torch.manual_seed(7)
    model.add_adapter(LoraConfig(**config))
    assert model.peft_config  # on the user's own model
    _check(case, pipe, model, want, "add_adapter")


def counting_processors(procs, count):
    """A subclass of each processor's class that counts its calls in ``count[0]`` (same signature, so diffusers
    passes the same arguments)."""
    out = {}
    for key, proc in procs.items():
        base = type(proc)

        @functools.wraps(base.__call__)
        def call(self, *a, _base=base, **k):
            count[0] += 1
            return _base.__call__(self, *a, **k)

        out[key] = type(f"Counting{base.__name__}", (base,), {"__call__": call})()
    return out


def set_attn_processor(case: Case):
    """Processors set after accelerate are the ones that run, in the blocks that run."""
    plain = case.make_pipeline()
    den = getattr(plain, case.denoiser)
    den.set_attn_processor(counting_processors(den.attn_processors, [0]))
    want = case.call(plain, 3)
    pipe, model = _accelerated(case)
    count = [0]
    procs = counting_processors(model.attn_processors, count)
    model.set_attn_processor(dict(procs))  # diffusers empties the dict it is given
    assert model.attn_processors == procs
    counts = []
    for depth in (inplace.controller(model).min_depth, None):
        count[0] = 0
        with inplace.at_depth(model, depth):
            case.call(pipe, 3)
        counts.append(count[0])
    assert 0 < counts[0] < counts[1], counts
    _check(case, pipe, model, want, "set_attn_processor")


def pipe_to_dtype(case: Case, dtype=torch.bfloat16):
    """``pipe.to(dtype)`` converts the caller's own model, still accelerated (the call casts its embeddings to the
    denoiser's dtype)."""
    plain = case.make_pipeline()
    plain.to(dtype)
    want = case.call(plain, 3)
    pipe, model = _accelerated(case)
    assert pipe.to(dtype) is pipe and getattr(pipe, case.denoiser) is model
    assert all(p.dtype == dtype for p in model.parameters() if p.is_floating_point())
    assert inplace.controller(model) is not None
    _check(case, pipe, model, want, f"pipe.to({dtype})")


def patched(case: Case, expected: dict):
    """``accelerate`` patches ``expected`` (``{rule: modules}``) in the family's model; with the fused path forced
    (the torch reference on the CPU), every depth equals the unforced model within float32 rounding."""
    from eekernels import patches

    model = case.make_model()
    kw = case.inputs(0)
    eekernels.accelerate(model)
    ctl = inplace.controller(model)
    assert ctl.patches.counts() == expected, str(ctl.patches)
    for d in range(ctl.min_depth, ctl.num_blocks + 1):
        with torch.no_grad(), inplace.at_depth(model, d):
            want = output(model(**kw))
            with patches.forced():
                got = output(model(**kw))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def lacks(obj, *names) -> bool:
    """For a family's "diffusers does not support this" test: none of ``names`` is on ``obj``'s class."""
    return not any(hasattr(type(obj), n) for n in names)


__all__ = ["save_load_round_trip", "load_lora_weights", "add_adapter", "set_attn_processor", "pipe_to_dtype", "patched",
           "lacks"]


def model_cpu_offload(case: Case):
    """accelerate's offload hooks on the accelerated pipeline (``device="cpu"``: no accelerator here; diffusers
    refuses ``enable_model_cpu_offload()`` without one): full depth equals the plain offloaded pipeline bit for bit,
    every call runs its scheduled prefix, and the offload hook stays on the model."""
    plain = case.make_pipeline()
    plain.enable_model_cpu_offload(device="cpu")
    want = case.call(plain, 3)
    pipe, model = _accelerated(case)
    pipe.enable_model_cpu_offload(device="cpu")
    _check(case, pipe, model, want, "enable_model_cpu_offload")
    assert hasattr(model, "_hf_hook"), f"{case.name}: the offload hook is gone"
