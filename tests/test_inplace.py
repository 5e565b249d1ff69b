"""Early exit in place (``eekernels.accelerate(pipe)``, the default tier) on every supported diffusers pipeline.

- full depth: bit-identical to the plain pipeline, float32, same seed; the denoiser is the user's object;
- every depth: equal to the model with its block lists sliced by hand (U-Net: a hand-written truncated forward);
- ``exit_policy="cache"``: equal to a hand-written residual replay (torch forward hooks on the sliced model);
- in place at each depth equals the native tier at that depth (a cross-check of both);
- ``torch.compile(fullgraph=True)``: no graph break, one graph per depth.

Tiny random models built from configs, every parameter randomized; nothing is downloaded.
"""
import copy

import pytest
import torch
import torch.nn as nn

import diffusers
import eekernels
from eekernels import ExitSchedule, inplace
from tests.models._reference_models import randomize_
from tests.test_accelerate import dit_pipeline, tiny_dit_transformer, tiny_unet, unet_pipeline
from tests.test_accelerate_text import call_kwargs, make_pipeline, tiny_transformer

TEXT = ("pixart", "sd3", "flux")


def _pipeline(name):
    if name == "dit":
        return dit_pipeline()
    if name in ("ddpm", "ddim"):
        return unet_pipeline(name)
    if name == "pixart-sigma":
        p = make_pipeline("pixart")
        return diffusers.PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=p.vae, transformer=p.transformer,
                                             scheduler=p.scheduler)
    return make_pipeline(name)


def _call(name, pipe, steps=4, seed=3, **extra):
    g = torch.Generator().manual_seed(seed)
    if name == "dit":
        return pipe(class_labels=[0, 1], num_inference_steps=steps, generator=g, output_type="np", **extra).images
    if name in ("ddpm", "ddim"):
        return pipe(batch_size=2, num_inference_steps=steps, generator=g, output_type="np", **extra).images
    fam = "pixart" if name == "pixart-sigma" else name
    kw = call_kwargs(fam, steps=steps)
    kw.update(extra)
    return pipe(generator=g, **kw).images


PIPELINES = ("dit", "ddpm", "ddim", "pixart", "pixart-sigma", "sd3", "flux")


@pytest.mark.parametrize("name", PIPELINES)
def test_full_depth_is_bit_identical_and_keeps_the_users_objects(name):
    pipe = _pipeline(name)
    ref = _call(name, pipe)
    denoiser_name = "unet" if name in ("ddpm", "ddim") else "transformer"
    model = getattr(pipe, denoiser_name)
    keys = list(model.state_dict())
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert eekernels.accelerate(pipe) is pipe
    assert getattr(pipe, denoiser_name) is model and type(model).__module__.startswith("diffusers")
    assert list(model.state_dict()) == keys and [p.data_ptr() for p in model.parameters()] == ptrs
    got = _call(name, pipe)
    assert (got == ref).all(), f"{name}: full depth in place differs from the plain pipeline"
    eekernels.disable(pipe)
    assert not hasattr(model, "_diffusers_hook") or not model._diffusers_hook.hooks
    assert "progress_bar" not in vars(pipe)
    assert (_call(name, pipe) == ref).all()


def test_accelerating_twice_is_refused_and_disable_needs_an_accelerated_object():
    pipe = _pipeline("dit")
    eekernels.accelerate(pipe)
    with pytest.raises(ValueError, match="already accelerated"):
        eekernels.accelerate(pipe)
    with pytest.raises(ValueError, match="already accelerated"):
        eekernels.accelerate(pipe.transformer)
    eekernels.disable(pipe)
    with pytest.raises(ValueError, match="unaccelerated"):
        eekernels.disable(pipe.transformer)


# --------------------------------------------------------------------------------------------------
# Every depth against the block lists sliced by hand
# --------------------------------------------------------------------------------------------------
def _sliced(model, lists, d):
    """A copy of ``model`` whose block lists keep only the first d blocks in execution order."""
    m = copy.deepcopy(model)
    for name in lists:
        blocks = getattr(m, name)
        keep = min(d, len(blocks))
        setattr(m, name, nn.ModuleList(list(blocks)[:keep]))
        d -= keep
    return m


def _inputs(fam, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    if fam == "flux":
        return dict(hidden_states=torch.randn(B, 12, 16, generator=g), encoder_hidden_states=torch.randn(B, 7, 12, generator=g),
                    pooled_projections=torch.randn(B, 10, generator=g), timestep=torch.full((B,), 0.55),
                    img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.), torch.arange(4.), indexing="ij"), -1).reshape(12, 3),
                    txt_ids=torch.zeros(7, 3), guidance=torch.full((B,), 3.0))
    if fam == "sd3":
        return dict(hidden_states=torch.randn(B, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(B, 7, 12, generator=g),
                    pooled_projections=torch.randn(B, 10, generator=g), timestep=torch.full((B,), 550.0))
    if fam == "pixart":
        return dict(hidden_states=torch.randn(B, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(B, 7, 12, generator=g),
                    timestep=torch.full((B,), 550), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if fam == "dit":
        return dict(hidden_states=torch.randn(B, 4, 8, 8, generator=g), timestep=torch.full((B,), 550),
                    class_labels=torch.tensor([3, 7])[:B])
    return dict(sample=torch.randn(B, 3, 16, 16, generator=g), timestep=torch.full((B,), 550))


def _model(fam, seed=0):
    if fam == "dit":
        m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                            num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
        return randomize_(m, seed=seed).eval()  # per-block embedders differ: in place takes any DiT
    if fam == "unet":
        return tiny_unet(seed)
    return tiny_transformer(fam, seed=seed, layers=4)


LISTS = {"dit": ("transformer_blocks",), "pixart": ("transformer_blocks",), "sd3": ("transformer_blocks",),
         "flux": ("transformer_blocks", "single_transformer_blocks")}


def _out(o):
    return o.sample if hasattr(o, "sample") else o[0]


@pytest.mark.parametrize("fam", ("dit", "pixart", "sd3", "flux"))
def test_every_depth_equals_the_block_lists_sliced_by_hand(fam):
    model = _model(fam)
    plain = copy.deepcopy(model)
    kw = _inputs(fam)
    eekernels.accelerate(model)
    depth = inplace.controller(model).num_blocks
    assert depth == sum(len(getattr(model, n)) for n in LISTS[fam])
    for d in range(1, depth + 1):
        with torch.no_grad(), inplace.at_depth(model, d):
            got = _out(model(**kw))
        with torch.no_grad():
            want = _out(_sliced(plain, LISTS[fam], d)(**kw))
        assert torch.equal(got, want), f"{fam} depth {d}: {(got - want).abs().max()}"


def _unet_truncated(m, sample, timestep, d, deep=None):
    """UNet2DModel's forward written out with levels d.. skipped: the up block of level d-1 gets zeros (or
    ``deep``) in place of the skipped part's output. Down block d-1 keeps its downsampler's output out of use."""
    L = len(m.down_blocks)
    emb = m.time_embedding(m.time_proj(timestep).to(sample.dtype))
    h = m.conv_in(sample)
    skips = [h]
    for lvl in range(d):
        blk = m.down_blocks[lvl]
        for i, resnet in enumerate(blk.resnets):
            h = resnet(h, emb)
            if getattr(blk, "attentions", None):
                h = blk.attentions[i](h)
            skips.append(h)
        if blk.downsamplers is not None and lvl < d - 1:
            h = blk.downsamplers[0](h)
            skips.append(h)
    for j in range(L - d, L):
        blk = m.up_blocks[j]
        res = skips[-len(blk.resnets):]
        skips = skips[:-len(blk.resnets)]
        if j == L - d:
            ch = blk.resnets[0].in_channels - res[-1].shape[1]
            h = deep if deep is not None else res[-1].new_zeros(res[-1].shape[0], ch, *res[-1].shape[2:])
        h = blk(h, tuple(res), emb)
    h = m.conv_out(m.conv_act(m.conv_norm_out(h)))
    return h


def test_unet_every_level_equals_a_hand_written_truncation():
    model = _model("unet")
    plain = copy.deepcopy(model)
    kw = _inputs("unet")
    eekernels.accelerate(model)
    L = inplace.controller(model).num_blocks
    assert L == len(model.down_blocks)
    for d in range(1, L + 1):
        with torch.no_grad(), inplace.at_depth(model, d):
            got = _out(model(**kw))
        with torch.no_grad():
            want = _out(plain(**kw)) if d == L else _unet_truncated(plain, kw["sample"], kw["timestep"], d)
        assert torch.equal(got, want), f"unet depth {d}: {(got - want).abs().max()}"


# --------------------------------------------------------------------------------------------------
# exit_policy="cache": a hand-written residual replay
# --------------------------------------------------------------------------------------------------
def _image_stream(out):
    return out if isinstance(out, torch.Tensor) else out[1]  # joint/FLUX blocks return (text, image)


def _residual(plain, blocks, d, kw):
    """Hand-written: what blocks d.. add to the image stream at a full call of ``plain`` on ``kw`` (torch hooks)."""
    seen = {}
    h1 = blocks[d].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.__setitem__("in", kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True)
    h2 = blocks[-1].register_forward_hook(lambda mod, args, out: seen.__setitem__("out", _image_stream(out)))
    with torch.no_grad():
        plain(**kw)
    h1.remove(), h2.remove()
    return seen["out"] - seen["in"]


@pytest.mark.parametrize("fam", ("dit", "pixart", "sd3", "flux"))
def test_cache_policy_equals_a_hand_written_residual_replay(fam):
    model = _model(fam)
    plain = copy.deepcopy(model)
    kw1, kw2 = _inputs(fam, seed=1), _inputs(fam, seed=2)
    total = sum(len(getattr(model, n)) for n in LISTS[fam])
    d = total - 2
    residual = _residual(plain, [b for n in LISTS[fam] for b in getattr(plain, n)], d, kw1)
    sliced = _sliced(plain, LISTS[fam], d)
    last = [b for n in LISTS[fam] for b in getattr(sliced, n)][-1]

    def add(mod, args, out):
        if isinstance(out, torch.Tensor):
            return out + residual
        return (out[0], out[1] + residual)

    last.register_forward_hook(add)
    with torch.no_grad():
        want = _out(sliced(**kw2))
    # In place: a periodic plan (full, then truncated) over the two calls.
    eekernels.accelerate(model, schedule=ExitSchedule.periodic(2, d, total), exit_policy="cache")
    with torch.no_grad():
        full = _out(model(**kw1))
        got = _out(model(**kw2))
    assert torch.equal(full, _out(plain(**kw1)))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


def _with_t(fam, kw, t):
    """``kw`` with its timestep set to eekernels' t (FLUX's transformer takes sigma = t / 1000)."""
    value = t / 1000 if fam == "flux" else t
    return {**kw, "timestep": torch.full_like(kw["timestep"], value, dtype=torch.float32)}


@pytest.mark.parametrize("order", (1, 2))
@pytest.mark.parametrize("fam", ("dit", "pixart", "sd3", "flux"))
def test_forecast_policy_equals_a_hand_written_extrapolation(fam, order):
    model = _model(fam)
    plain = copy.deepcopy(model)
    times = [900.0, 700.0, 500.0][-(order + 1):] + [350.0]  # order + 1 full calls, then a truncated one
    calls = [_with_t(fam, _inputs(fam, seed=s), t) for s, t in zip(range(1, 5), times)]
    total = sum(len(getattr(model, n)) for n in LISTS[fam])
    d = total - 2
    blocks = [b for n in LISTS[fam] for b in getattr(plain, n)]
    residuals = [_residual(plain, blocks, d, kw) for kw in calls[:-1]]  # what blocks d.. added at each full call
    # The polynomial through (t_k, residual_k), evaluated at the truncated call's t, written out by hand.
    t, ts = times[-1], times[:-1]
    if order == 1:
        (t0, t1), (r0, r1) = ts, residuals
        forecast = r1 + (r1 - r0) / (t1 - t0) * (t - t1)
    else:
        (t0, t1, t2), (r0, r1, r2) = ts, residuals
        d1 = (r1 - r0) / (t1 - t0)
        d2 = ((r2 - r1) / (t2 - t1) - d1) / (t2 - t0)
        forecast = r0 + d1 * (t - t0) + d2 * (t - t0) * (t - t1)  # Newton's form
    sliced = _sliced(plain, LISTS[fam], d)
    last = [b for n in LISTS[fam] for b in getattr(sliced, n)][-1]
    last.register_forward_hook(lambda mod, args, out: out + forecast if isinstance(out, torch.Tensor)
                               else (out[0], out[1] + forecast))
    with torch.no_grad():
        want = _out(sliced(**calls[-1]))
    eekernels.accelerate(model, schedule=ExitSchedule.periodic(2, d, total), exit_policy="forecast",
                         forecast_order=order)
    with torch.no_grad():
        for kw in calls[:-1]:
            with inplace.at_depth(model, None):
                model(**kw)
        with inplace.at_depth(model, d):
            got = _out(model(**calls[-1]))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()


def test_unet_cache_policy_equals_a_hand_written_replay():
    model = _model("unet")
    plain = copy.deepcopy(model)
    kw1, kw2 = _inputs("unet", seed=1), _inputs("unet", seed=2)
    L = len(model.down_blocks)
    d = L - 1
    seen = {}
    up = plain.up_blocks[L - d]  # the up block of level d-1: its input is what the skipped part produced
    hook = up.register_forward_pre_hook(lambda mod, args, kwargs: seen.__setitem__("deep", args[0] if args else
                                                                                     kwargs["hidden_states"]),
                                        with_kwargs=True)
    with torch.no_grad():
        plain(**kw1)
    hook.remove()
    with torch.no_grad():
        want = _unet_truncated(plain, kw2["sample"], kw2["timestep"], d, deep=seen["deep"])
    eekernels.accelerate(model, schedule=ExitSchedule.periodic(2, d, L), exit_policy="cache")
    with torch.no_grad():
        _out(model(**kw1))
        got = _out(model(**kw2))
    assert torch.equal(got, want), (got - want).abs().max()


def test_cache_is_kept_per_cache_context_and_cleared_per_run():
    """FLUX's true CFG runs cond and uncond as two calls inside ``cache_context``: each gets its own cache."""
    model = _model("flux")
    kw_c, kw_u = _inputs("flux", seed=1), _inputs("flux", seed=2)
    total = inplace.controller(eekernels.accelerate(model, schedule=ExitSchedule.periodic(2, 2, 5),
                                                    exit_policy="cache")).num_blocks
    assert total == 5
    ctl = inplace.controller(model)
    with torch.no_grad():
        for name, kw in (("cond", kw_c), ("uncond", kw_u)):
            with model.cache_context(name), inplace.at_depth(model, None):
                model(**kw)
        with model.cache_context("cond"), inplace.at_depth(model, 2):
            got_c = _out(model(**kw_c))
        with model.cache_context("uncond"), inplace.at_depth(model, 2):
            got_u = _out(model(**kw_u))
    # Replaying one's own full call at the same inputs gives the full-depth output back.
    eekernels.disable(model)
    with torch.no_grad():
        assert torch.allclose(got_c, _out(model(**kw_c)), atol=1e-5)
        assert torch.allclose(got_u, _out(model(**kw_u)), atol=1e-5)
    (c,), (u,) = ctl._caches["cond"], ctl._caches["uncond"]  # one stream each: FLUX's blocks return one image stream
    buffers = {"cond": c.buffers(), "uncond": u.buffers()}
    ctl.start_run()  # a new trajectory: nothing counts as recorded, and the buffers stay (graphs captured on them)
    assert set(ctl._caches) == {"cond", "uncond"}
    for name, (cache,) in ctl._caches.items():
        assert not cache.has(2) and all(a is b for a, b in zip(cache.buffers(), buffers[name]))


# --------------------------------------------------------------------------------------------------
# Pipelines: the schedule's depth per step, and the cross-check with the native tier
# --------------------------------------------------------------------------------------------------
def _depths_seen(model):
    seen = []
    ctl = inplace.controller(model)
    model.register_forward_hook(lambda *a: None)
    orig = ctl.begin

    def begin(t):
        orig(t)
        seen.append(ctl.num_blocks if ctl.depth is None else ctl.depth)

    ctl.begin = begin
    return seen


@pytest.mark.parametrize("name", PIPELINES)
def test_schedule_runs_the_depth_of_each_step_and_matches_the_native_tier(name):
    pipe = _pipeline(name)
    denoiser_name = "unet" if name in ("ddpm", "ddim") else "transformer"
    model = getattr(pipe, denoiser_name)
    family = eekernels.families.family_of(model)
    total = inplace._count_depth(model, family)
    table = [total, total, max(1, total - 1), 1, max(1, total - 2), 1, total, 1, 2 if total > 1 else 1, 1]
    schedule = ExitSchedule.piecewise(table)
    native = eekernels.accelerate(copy.deepcopy(pipe), schedule=schedule, native=True)
    want = _call(name, native)
    eekernels.accelerate(pipe, schedule=schedule)
    seen = _depths_seen(model)
    got = _call(name, pipe)
    ts = pipe.scheduler.timesteps.to(torch.float64)
    expect = [int(schedule.depth(t.reshape(1))[0]) for t in ts]
    calls_per_step = len(seen) // len(expect)
    assert seen == [d for d in expect for _ in range(calls_per_step)], (seen, expect)
    assert abs(got - want).max() < 1e-4, f"{name}: in place vs native {abs(got - want).max()}"


# --------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no break, one graph per depth
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", ("dit", "flux", "unet"))
def test_compile_fullgraph_one_graph_per_depth(fam):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _model(fam)
    kw = _inputs(fam)
    eekernels.accelerate(model)
    L = inplace.controller(model).num_blocks
    eager = {}
    for d in range(1, L + 1):
        with torch.no_grad(), inplace.at_depth(model, d):
            eager[d] = _out(model(**kw))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        for d in range(1, L + 1):
            with torch.no_grad(), inplace.at_depth(model, d):
                assert torch.allclose(_out(compiled(**kw)), eager[d], atol=1e-5)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == L, dict(counters["stats"])


# --------------------------------------------------------------------------------------------------
# CUDA graphs: the runner's real code path on the CPU through an eager stand-in for the capture
# --------------------------------------------------------------------------------------------------
class _EagerGraph:
    def __init__(self, fn):
        self.fn, self.replays = fn, 0

    def replay(self):
        self.replays += 1
        self.fn()


@pytest.mark.parametrize("name", ("dit", "ddim", "sd3", "flux"))
@pytest.mark.parametrize("policy", ("drop", "cache", "forecast"))
def test_graph_runner_one_graph_per_depth_and_same_images(name, policy):
    from eekernels.graphs import GraphCache

    pipe = _pipeline(name)
    denoiser = "unet" if name == "ddim" else "transformer"
    model = getattr(pipe, denoiser)
    total = inplace._count_depth(model, eekernels.families.family_of(model))
    schedule = (ExitSchedule.periodic(2, max(1, total - 1), total) if policy != "drop"
                else ExitSchedule.piecewise([total, max(1, total - 1), 1, 1]))
    eekernels.accelerate(pipe, schedule=schedule, exit_policy=policy, graphs=False)
    want = _call(name, pipe)
    eekernels.disable(pipe)
    eekernels.accelerate(pipe, schedule=schedule, exit_policy=policy)
    cache = GraphCache(capture=lambda fn, pool, stream: (_EagerGraph(fn), 1000))
    inplace.controller(pipe).graphs.cache = cache
    got = _call(name, pipe)
    assert (got == want).all(), abs(got - want).max()
    depths = {d for d in (inplace.controller(pipe).depth_at(float(t), i)
                          for i, t in enumerate(pipe.scheduler.timesteps))}
    assert cache.stats()["graphs"] == len(depths)
    captures = cache.stats()["captures"]
    assert (_call(name, pipe) == want).all()  # replayed, not captured again
    assert cache.stats()["captures"] == captures


def test_graph_runner_recaptures_when_the_model_changes_and_runs_eagerly_when_offloaded():
    from diffusers.models.attention_processor import AttnProcessor

    from eekernels.graphs import GraphCache

    pipe = _pipeline("dit")
    eekernels.accelerate(pipe)
    runner = inplace.controller(pipe).graphs
    runner.cache = cache = GraphCache(capture=lambda fn, pool, stream: (_EagerGraph(fn), 1000))
    want = _call("dit", pipe, steps=2)
    assert cache.stats()["captures"] == 1
    for m in pipe.transformer.modules():  # a new processor: the old graph is stale
        if hasattr(m, "set_processor"):
            m.set_processor(AttnProcessor())
    assert abs(_call("dit", pipe, steps=2) - want).max() < 1e-5  # AttnProcessor: another summation order
    assert cache.stats()["captures"] == 2
    pipe.transformer._hf_hook = object()  # what accelerate's cpu offload attaches
    _call("dit", pipe, steps=2)
    assert "offload" in runner.reason and cache.stats()["captures"] == 2
    del pipe.transformer._hf_hook


def test_graphs_true_refuses_what_it_cannot_capture():
    pipe = _pipeline("dit")
    eekernels.accelerate(pipe, graphs=True)
    with pytest.raises(ValueError, match="graphs=True.*CUDA"):
        _call("dit", pipe, steps=1)
    eekernels.disable(pipe)
    with pytest.raises(ValueError, match="`graphs` expected"):
        eekernels.accelerate(pipe, graphs="yes")
