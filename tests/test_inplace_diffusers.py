"""What a diffusers user does with a pipeline accelerated in place (issue 21), each against the plain pipeline.

Every operation runs on ``eekernels.accelerate(pipe, schedule=...)`` (in place, the default tier), done after
accelerating, on every supported pipeline where diffusers itself supports it; each test checks three things:

- full depth (``inplace.at_depth(model, None)``, the code path of ``accelerate(pipe)`` without a schedule): the
  images equal the plain pipeline doing the same operation, bit for bit (float32 unless the operation is a cast;
  every operation here is deterministic);
- early exit still happens: the blocks that run in each model call, seen by torch pre-hooks on every block's
  submodules (not eekernels' bookkeeping), are the first ``schedule.plan(timesteps)`` blocks;
- ``eekernels.disable(pipe)``: the plain pipeline's images again, every block in every call.

What diffusers 0.42 does not support on the plain pipeline is in ``UNSUPPORTED``, checked on the plain pipeline.
Uses ``peft`` (LoRA) and ``accelerate`` (``enable_model_cpu_offload``).
"""
import functools
import inspect
import json

import pytest
import torch
import torch.nn as nn

import diffusers
import eekernels
from eekernels import ExitSchedule, families, inplace
from tests.families.operations import counting_processors
from tests.test_accelerate import tiny_vae
from tests.test_accelerate_text import call_kwargs, tiny_t5_and_tokenizer, tiny_transformer
from tests.test_inplace import PIPELINES, _call, _pipeline

TEXT = ("pixart", "pixart-sigma", "sd3", "flux")
STEPS = 4


def _den_name(name):
    return "unet" if name in ("ddpm", "ddim") else "transformer"


def _denoiser(pipe):
    return getattr(pipe, "unet", None) if hasattr(pipe, "unet") else pipe.transformer


def _plain(name):
    pipe = _pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(name, pipe, dtype=None, **extra):
    """The pipeline's images (as a tensor); ``dtype`` casts the text families' caption embeddings."""
    if dtype is not None and name in TEXT:
        kw = call_kwargs("pixart" if name == "pixart-sigma" else name)
        extra = {**{k: v.to(dtype) for k, v in kw.items() if isinstance(v, torch.Tensor) and v.is_floating_point()},
                 **extra}
    out = _call(name, pipe, steps=STEPS, **extra)
    return torch.as_tensor(out)


def _same(a, b):
    return a.shape == b.shape and torch.equal(a, b)


def _blocks(model):
    rule = families.family_of(model).exit
    names = rule.down if isinstance(rule, families.LevelExit) else rule.blocks
    names = (names,) if isinstance(names, str) else names
    out = []
    for n in names:
        b = getattr(model, n)
        out += list(b) if isinstance(b, nn.ModuleList) else [b]
    return out


class _Ran:
    """The blocks that ran in each call of ``model``: torch pre-hooks on every submodule of every block (a block
    skipped by early exit calls none of them)."""

    def __init__(self, model):
        self.calls, self.total = [], len(_blocks(model))
        self.handles = [model.register_forward_pre_hook(lambda *a: self.calls.append(set()))]
        for i, block in enumerate(_blocks(model)):
            for m in list(block.modules())[1:]:
                self.handles.append(m.register_forward_pre_hook(functools.partial(self._ran, i)))

    def _ran(self, i, *_):
        self.calls[-1].add(i)

    def depths(self):
        for h in self.handles:
            h.remove()
        for s in self.calls:
            assert s == set(range(len(s))), f"not a prefix of the blocks: {sorted(s)}"
        return [len(s) for s in self.calls]


def _plan(schedule, timesteps, calls):
    """The depth of each model call the schedule asks for (one or more calls per scheduler timestep)."""
    per = schedule.plan(timesteps.detach().to("cpu", torch.float64).reshape(-1)).tolist()
    k = max(1, calls // len(per))
    return [d for d in per for _ in range(k)]


def _schedule(model, policy="drop"):
    total = len(_blocks(model))
    if policy == "cache":
        return ExitSchedule.periodic(2, max(1, total - 1), total)
    return ExitSchedule.piecewise([total, max(1, total - 1), 1, total, max(1, total - 2), 1, total, 1, total, 1])


def _accelerated(name, policy="drop"):
    pipe = _plain(name)
    schedule = _schedule(_denoiser(pipe), policy)
    assert eekernels.accelerate(pipe, schedule=schedule, exit_policy=policy) is pipe
    return pipe, schedule


def _offload_hook_runs(model):
    """If accelerate's offload hook is on ``model``, count its calls (the pipeline makes a new one per call)."""
    hook = getattr(model, "_hf_hook", None)
    if hook is None:
        return None
    calls = []
    pre = hook.pre_forward
    hook.pre_forward = lambda *a, **k: (calls.append(1), pre(*a, **k))[1]
    return calls


def _check(name, pipe, want, schedule, *, runs=1, **kw):
    """Full depth gives ``want``; the schedule's depths run; ``disable`` gives ``want`` with every block, and
    nothing of eekernels runs any more while anyone else's hooks (offloading) still do; ``accelerate(pipe)`` (no
    schedule) then gives ``want`` again."""
    model = _denoiser(pipe)
    ctl = inplace.controller(model)
    for _ in range(runs):
        offload = _offload_hook_runs(model)
        with inplace.at_depth(model, None):
            got = _run(name, pipe, **kw)
        assert _same(got, want), f"{name}: full depth differs from the plain pipeline: {(got - want).abs().max()}"
        assert offload is None or offload, f"{name}: the offload hook did not run"
    for _ in range(runs):
        ran, offload = _Ran(model), _offload_hook_runs(model)
        _run(name, pipe, **kw)
        depths = ran.depths()
        assert depths == _plan(schedule, pipe.scheduler.timesteps, len(depths)), name
        assert min(depths) < ran.total, f"{name}: no call exited early"
        assert offload is None or offload, f"{name}: the offload hook did not run"
    eekernels.disable(pipe)

    def stale(*a):
        raise AssertionError("eekernels' model hook ran after disable")

    ctl.begin = stale
    for _ in range(runs):
        ran, offload = _Ran(model), _offload_hook_runs(model)
        got = _run(name, pipe, **kw)
        assert _same(got, want), f"{name}: after disable: {(got - want).abs().max()}"
        assert set(ran.depths()) == {ran.total}, f"{name}: disable left blocks skipped"
        assert offload is None or offload, f"{name}: disable removed the offload hook"
    eekernels.accelerate(pipe)  # the default tier (no schedule) on the pipeline as the operation left it
    got = _run(name, pipe, **kw)
    eekernels.disable(pipe)
    assert _same(got, want), f"{name}: accelerate(pipe) after the operation: {(got - want).abs().max()}"


# --------------------------------------------------------------------------------------------------
# What diffusers 0.42 itself does not support (checked on the plain pipeline)
# --------------------------------------------------------------------------------------------------
def _lacks_call_argument(arg):
    return lambda pipe: arg not in inspect.signature(type(pipe).__call__).parameters


def _refuses_group_offload(pipe):
    with pytest.raises(ValueError, match="does not support group offloading"):
        pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level",
                                  num_blocks_per_group=1)
    return True


UNSUPPORTED = {
    "load_lora_weights": (("dit", "ddpm", "ddim", "pixart", "pixart-sigma"),
                          lambda pipe: not hasattr(pipe, "load_lora_weights")),
    "set_attn_processor": (("dit", "ddpm", "ddim"),
                           lambda pipe: not hasattr(_denoiser(pipe), "set_attn_processor")
                           and not hasattr(_denoiser(pipe), "attn_processors")),
    "fuse_qkv_projections": (("dit", "ddpm", "ddim"),
                             lambda pipe: not hasattr(_denoiser(pipe), "fuse_qkv_projections")),
    "enable_group_offload": (("dit",), _refuses_group_offload),
    "callback_on_step_end": (("dit", "ddpm", "ddim", "pixart", "pixart-sigma"),
                             _lacks_call_argument("callback_on_step_end")),
    "num_images_per_prompt": (("dit", "ddpm", "ddim"), _lacks_call_argument("num_images_per_prompt")),
}


@pytest.mark.parametrize("op,name", [(op, n) for op, (names, _) in UNSUPPORTED.items() for n in names])
def test_what_diffusers_itself_does_not_support(op, name):
    assert UNSUPPORTED[op][1](_plain(name)), f"diffusers now supports {op} on {name}: add it to its test"


def test_sequential_cpu_offload_fails_on_the_cpu_in_accelerate_itself():
    """``enable_sequential_cpu_offload(device="cpu")`` on the plain pipeline: accelerate 1.16 moving weights to the
    meta device fails under torch 2.13 (``set_module_tensor_to_device``), so it is not tested accelerated."""
    pipe = _plain("ddim")
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(TypeError, match="requires_grad"):
        _run("ddim", pipe)


def test_model_cpu_offload_needs_an_accelerator_in_diffusers_itself():
    """Without a GPU, diffusers refuses ``enable_model_cpu_offload()``; ``device="cpu"`` runs accelerate's offload
    hooks for real (what the offload tests below use)."""
    with pytest.raises(RuntimeError, match="requires accelerator"):
        _plain("dit").enable_model_cpu_offload()


# --------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PIPELINES)
def test_save_pretrained_round_trip(name, tmp_path):
    pipe, schedule = _accelerated(name)
    model = _denoiser(pipe)
    pipe.save_pretrained(tmp_path)  # while accelerated
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index[_den_name(name)] == ["diffusers", type(model).__name__]
    saved = (tmp_path / _den_name(name) / "config.json").read_text()
    assert "eekernels" not in saved
    assert (tmp_path / _den_name(name) / "diffusion_pytorch_model.safetensors").exists()
    missing = {k: None for k, v in pipe.components.items() if v is None}  # diffusers needs them named
    loaded = type(pipe).from_pretrained(tmp_path, **missing)
    loaded.set_progress_bar_config(disable=True)
    again = _denoiser(loaded)
    assert type(again) is type(model) and again is not model
    assert not getattr(again, "_diffusers_hook", None) and inplace.controller(again) is None  # hooks not saved
    assert "progress_bar" not in vars(loaded)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    want = _run(name, loaded)
    _check(name, pipe, want, schedule)


# --------------------------------------------------------------------------------------------------
# load_lora_weights
# --------------------------------------------------------------------------------------------------
def _write_lora(name, path):
    """A random LoRA (peft, B not zero) for the tiny transformer, saved with the pipeline's save_lora_weights."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    tr = tiny_transformer(name)
    torch.manual_seed(7)
    tr.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    type(_plain(name)).save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(tr))
    return path


@pytest.mark.parametrize("name", ("sd3", "flux"))
def test_load_lora_weights(name, tmp_path):
    lora = _write_lora(name, tmp_path)
    plain = _plain(name)
    before = _run(name, plain)
    plain.load_lora_weights(lora)
    want = _run(name, plain)
    assert not _same(want, before)  # the LoRA changes the images
    pipe, schedule = _accelerated(name)
    pipe.load_lora_weights(lora)
    assert pipe.transformer.peft_config  # the adapter is on the user's transformer
    _check(name, pipe, want, schedule)


# --------------------------------------------------------------------------------------------------
# Attention processors, fused QKV
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEXT)
def test_set_attn_processor(name):
    count = [0]
    plain = _plain(name)
    plain.transformer.set_attn_processor(counting_processors(plain.transformer.attn_processors, [0]))
    want = _run(name, plain)
    pipe, schedule = _accelerated(name)
    procs = counting_processors(pipe.transformer.attn_processors, count)
    pipe.transformer.set_attn_processor(dict(procs))  # diffusers empties the dict it is given
    assert pipe.transformer.attn_processors == procs
    for depth in (1, None):  # the processors set after accelerate are the ones that run, in the blocks that run
        count[0] = 0
        with inplace.at_depth(pipe.transformer, depth):
            _run(name, pipe)
        counts = counts + [count[0]] if depth is None else [count[0]]
    assert 0 < counts[0] < counts[1]
    _check(name, pipe, want, schedule)


@pytest.mark.parametrize("name", TEXT)
def test_fuse_and_unfuse_qkv_projections(name):
    plain = _plain(name)
    unfused = _run(name, plain)
    plain.transformer.fuse_qkv_projections()
    want = _run(name, plain)
    pipe, schedule = _accelerated(name)
    pipe.transformer.fuse_qkv_projections()
    assert any(hasattr(m, "to_qkv") for m in pipe.transformer.modules())
    with inplace.at_depth(pipe.transformer, None):
        assert _same(_run(name, pipe), want)
    pipe.transformer.unfuse_qkv_projections()
    with inplace.at_depth(pipe.transformer, None):
        assert _same(_run(name, pipe), unfused)
    pipe.transformer.fuse_qkv_projections()
    _check(name, pipe, want, schedule)


# --------------------------------------------------------------------------------------------------
# Layerwise casting, offloading, pipe.to(dtype)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PIPELINES)
def test_enable_layerwise_casting(name):
    """Storage float8_e4m3fn, compute float32 (diffusers casts per layer on CPU too)."""
    kw = dict(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    plain = _plain(name)
    _denoiser(plain).enable_layerwise_casting(**kw)
    want = _run(name, plain)
    pipe, schedule = _accelerated(name)
    _denoiser(pipe).enable_layerwise_casting(**kw)
    assert any(p.dtype == torch.float8_e4m3fn for p in _denoiser(pipe).parameters())
    _check(name, pipe, want, schedule)


@pytest.mark.parametrize("order", ("accelerate-then-offload", "offload-then-accelerate"))
@pytest.mark.parametrize("name", PIPELINES)
def test_enable_model_cpu_offload(name, order):
    """accelerate's offload hooks (``device="cpu"``: no accelerator here). The pipeline removes and re-adds them at
    the end of every call, so each check runs two calls; ``disable`` must leave the offload hooks working."""
    plain = _plain(name)
    plain.enable_model_cpu_offload(device="cpu")
    want = _run(name, plain)
    if order == "accelerate-then-offload":
        pipe, schedule = _accelerated(name)
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        pipe = _plain(name)
        pipe.enable_model_cpu_offload(device="cpu")
        schedule = _schedule(_denoiser(pipe))
        eekernels.accelerate(pipe, schedule=schedule)
    model = _denoiser(pipe)
    assert hasattr(model, "_hf_hook")
    _check(name, pipe, want, schedule, runs=2)
    assert hasattr(model, "_hf_hook")  # the offload hooks are still there
    pipe.remove_all_hooks()
    ran = _Ran(model)
    assert _same(_run(name, pipe), want)
    assert set(ran.depths()) == {ran.total}


@pytest.mark.parametrize("name", [n for n in PIPELINES if n != "dit"])
def test_group_offloading(name, monkeypatch):
    """diffusers' group offloading, block level (onload to the CPU: no accelerator here); DiT is refused by
    diffusers itself (UNSUPPORTED). After disable, every group still loads as often as on the plain pipeline."""
    from diffusers.hooks import group_offloading

    onloads = []
    onload = group_offloading.ModuleGroup.onload_
    monkeypatch.setattr(group_offloading.ModuleGroup, "onload_", lambda self: (onloads.append(1), onload(self))[1])
    kw = dict(onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    plain = _plain(name)
    plain.enable_group_offload(**kw)
    want = _run(name, plain)
    plain_onloads, onloads[:] = len(onloads), []
    pipe, schedule = _accelerated(name)
    pipe.enable_group_offload(**kw)
    _check(name, pipe, want, schedule, runs=2)
    onloads[:] = []
    _run(name, pipe)
    assert len(onloads) == plain_onloads > 0


@pytest.mark.parametrize("name", PIPELINES)
def test_pipe_to_dtype_converts_the_callers_components(name):
    """bfloat16 (float64 for DDPM / DDIM, whose numpy output diffusers cannot make from bfloat16)."""
    dtype = torch.float64 if name in ("ddpm", "ddim") else torch.bfloat16
    plain = _plain(name)
    plain.to(dtype)
    want = _run(name, plain, dtype)
    pipe, schedule = _accelerated(name)
    before = {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}
    assert pipe.to(dtype) is pipe
    for key, module in before.items():
        assert getattr(pipe, key) is module
        assert all(p.dtype == dtype for p in module.parameters()), key
    _check(name, pipe, want, schedule, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# A pipeline built without its denoiser; scheduler swaps
# --------------------------------------------------------------------------------------------------
def _without_denoiser(name):
    src = _plain(name)
    parts = {**src.components, _den_name(name): None}
    extra = {"id2label": {0: "zero", 1: "one, uno"}} if name == "dit" else {}
    pipe = type(src)(**parts, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe, _denoiser(src)


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_built_without_its_denoiser(name):
    """As diffusers' encode_prompt tests build them: accelerate works; a denoiser set later runs accelerated with
    the pipeline's schedule, and disable restores it. (SD3 takes its default size from the transformer it was built
    with, 128 latent pixels without one: the size is given.)"""
    size = dict(height=8, width=8) if name == "sd3" else {}
    want = _run(name, _plain(name), **size)
    pipe, model = _without_denoiser(name)
    schedule = _schedule(model)
    assert eekernels.accelerate(pipe, schedule=schedule) is pipe
    assert inplace.controller(pipe) is None
    setattr(pipe, _den_name(name), model)
    ran = _Ran(model)
    _run(name, pipe, **size)  # its first run is accelerated already
    depths = ran.depths()
    assert depths == _plan(schedule, pipe.scheduler.timesteps, len(depths)) and min(depths) < ran.total
    _check(name, pipe, want, schedule, **size)
    assert inplace.controller(model) is None


@pytest.mark.parametrize("name", ("sd3", "flux"))
def test_encode_prompt_on_a_pipeline_without_transformer_and_vae(name):
    """diffusers' encode_prompt tests build the pipeline with only its text encoders."""
    src, kw = _prompted(name)
    parts = {**src.components, "transformer": None, "vae": None}
    plain, pipe = type(src)(**parts), type(src)(**parts)
    assert eekernels.accelerate(pipe) is pipe
    extra = {"prompt_3": None} if name == "sd3" else {}
    want = plain.encode_prompt(prompt=kw["prompt"], prompt_2=None, **extra)
    got = pipe.encode_prompt(prompt=kw["prompt"], prompt_2=None, **extra)
    assert len(got) == len(want) and all(
        (a is None and b is None) or torch.equal(a, b) for a, b in zip(got, want))
    eekernels.disable(pipe)


def test_a_denoiser_set_later_of_another_family_is_refused_by_name():
    pipe, _ = _without_denoiser("ddim")
    eekernels.accelerate(pipe)
    pipe.unet = _denoiser(_plain("dit"))
    with pytest.raises(ValueError, match="`unet` was set after accelerate to a DiTTransformer2DModel"):
        pipe(num_inference_steps=1, output_type="np")


def test_a_denoiser_disabled_by_hand_is_not_accelerated_again():
    pipe, _ = _accelerated("dit")
    model = pipe.transformer
    eekernels.disable(model)
    ran = _Ran(model)
    _run("dit", pipe)
    assert set(ran.depths()) == {ran.total} and inplace.controller(model) is None


SWAPS = {"dit": ("DPMSolverMultistepScheduler", {}), "ddpm": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
         # DDIMPipeline passes `eta`: only DDIM-like schedulers take it
         "ddim": ("DDIMParallelScheduler", {"timestep_spacing": "trailing"}),
         "pixart": ("EulerDiscreteScheduler", {}), "pixart-sigma": ("DDIMScheduler", {}),
         "sd3": ("FlowMatchHeunDiscreteScheduler", {}),  # two model calls per step
         "flux": ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True})}  # FluxPipeline passes sigmas


def _swap(pipe, name):
    cls, cfg = SWAPS[name]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **cfg)


@pytest.mark.parametrize("name", PIPELINES)
def test_scheduler_swap_after_accelerate(name):
    plain = _plain(name)
    _run(name, plain)
    old = plain.scheduler.timesteps.clone()
    _swap(plain, name)
    want = _run(name, plain)
    pipe, schedule = _accelerated(name)
    _run(name, pipe)
    _swap(pipe, name)
    _check(name, pipe, want, schedule)
    # the depths checked followed the new scheduler's timesteps, which ask for other depths than the old ones
    assert schedule.plan(old.double()).tolist() != schedule.plan(pipe.scheduler.timesteps.double()).tolist()


# --------------------------------------------------------------------------------------------------
# Callbacks, several images per prompt, calling twice
# --------------------------------------------------------------------------------------------------
def _step_end(seen):
    def callback(pipe, i, t, kwargs):
        seen.append((i, float(t), sorted(kwargs), kwargs["prompt_embeds"].shape))
        return {"latents": kwargs["latents"] * 0.9} if i == 1 else {}

    return dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])


@pytest.mark.parametrize("name", ("sd3", "flux"))
def test_callback_on_step_end(name):
    seen_plain, seen = [], []
    plain = _plain(name)
    want = _run(name, plain, **_step_end(seen_plain))
    assert not _same(want, _run(name, plain))  # the callback's latents are used
    pipe, schedule = _accelerated(name)
    _check(name, pipe, want, schedule, **_step_end(seen))
    assert seen == seen_plain * 4


@pytest.mark.parametrize("name", ("pixart", "pixart-sigma"))
def test_pixart_legacy_callback(name):
    """PixArt has diffusers' older ``callback(step, t, latents)`` instead of callback_on_step_end."""
    def kw(seen):
        return dict(callback=lambda i, t, latents: seen.append((i, float(t), latents.clone())), callback_steps=1)

    seen_plain, seen = [], []
    want = _run(name, _plain(name), **kw(seen_plain))
    pipe, schedule = _accelerated(name)
    _check(name, pipe, want, schedule, **kw(seen))
    assert len(seen) == 4 * len(seen_plain)
    for (i, t, a), (j, s, b) in zip(seen[:len(seen_plain)], seen_plain):
        assert (i, t) == (j, s) and torch.equal(a, b)


def _clip(cls, hidden, projection=None):
    import transformers

    config = transformers.CLIPTextConfig(vocab_size=15, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=8,
                                         projection_dim=projection or hidden, eos_token_id=1, pad_token_id=0,
                                         bos_token_id=0)
    return cls(config).eval()


def _prompted(name):
    """SD3 and FLUX repeat caption embeddings for ``num_images_per_prompt`` only when they encode the prompt
    themselves (given embeddings pass through as they are): those get tiny in-memory CLIP (and T5) encoders, and
    the call takes prompts. Returns the pipeline and the call's arguments."""
    import transformers

    pipe = _plain(name)
    if name not in ("sd3", "flux"):
        return pipe, {}
    t5, tokenizer = tiny_t5_and_tokenizer()
    _, clip_tokenizer = tiny_t5_and_tokenizer()
    clip_tokenizer.model_max_length = 8
    torch.manual_seed(1)
    if name == "sd3":
        parts = dict(text_encoder=_clip(transformers.CLIPTextModelWithProjection, 6, 5), tokenizer=clip_tokenizer,
                     text_encoder_2=_clip(transformers.CLIPTextModelWithProjection, 6, 5),
                     tokenizer_2=clip_tokenizer, text_encoder_3=t5, tokenizer_3=tokenizer)
    else:
        parts = dict(text_encoder=_clip(transformers.CLIPTextModel, 10), tokenizer=clip_tokenizer,
                     text_encoder_2=t5, tokenizer_2=tokenizer)
    pipe = type(pipe)(**{**pipe.components, **parts})
    pipe.set_progress_bar_config(disable=True)
    kw = {k: None for k in call_kwargs(name) if "embeds" in k}
    kw.update(prompt=["a photo of a cat", "a big red dog"], max_sequence_length=7)
    if name == "sd3":
        kw["negative_prompt"] = "small blue"
    return pipe, kw


@pytest.mark.parametrize("policy", ("drop", "cache"))
@pytest.mark.parametrize("name", TEXT)
def test_num_images_per_prompt(name, policy):
    plain, kw = _prompted(name)
    want = _run(name, plain, num_images_per_prompt=2, **kw)
    assert want.shape[0] == 4
    pipe, kw = _prompted(name)
    schedule = _schedule(pipe.transformer, policy)
    eekernels.accelerate(pipe, schedule=schedule, exit_policy=policy)
    _run(name, pipe, **kw)  # a batch of 2 first: the cache of the next run is its own
    _check(name, pipe, want, schedule, num_images_per_prompt=2, **kw)


@pytest.mark.parametrize("policy", ("drop", "cache"))
@pytest.mark.parametrize("name", PIPELINES)
def test_calling_twice_gives_the_same_images_and_restarts_the_cache(name, policy):
    pipe, schedule = _accelerated(name, policy)
    model = _denoiser(pipe)
    first = _run(name, pipe)
    assert _same(_run(name, pipe), first)
    if policy == "cache":  # a run that starts truncated has no cache of its own, whatever the last run left
        depth = schedule.table[1]
        with pytest.raises(ValueError, match="no value recorded"), inplace.at_depth(model, depth):
            _run(name, pipe)
    want = _run(name, _plain(name))
    _check(name, pipe, want, schedule, runs=2)
