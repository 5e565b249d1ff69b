"""eekernels.accelerate on diffusers' text-to-image pipelines: PixArt-α/Σ, SD3, FLUX.1, and their transformers.

Tiny random pipelines built from configs (transformer, a one-level VAE, a scheduler); nothing is downloaded.
Prompts go in as embeddings (``prompt_embeds`` and the negative ones), so no text encoder is needed, except in
the PixArt prompt test, which builds a tiny T5 and a word-level tokenizer in memory. Every parameter is
randomized (zero-initialized adaLN / output layers would hide errors).
"""
import copy

import pytest
import torch

import eekernels
from eekernels import ExitSchedule
from tests.models._reference_models import randomize_

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (pip install -e .[test])")

FAMILIES = ("pixart", "sd3", "flux")
TOL = 1e-4  # float32, whole pipeline, against the diffusers original


def err(got, want):
    """Max difference, relative to the output's scale where that exceeds 1 (random-weight latents reach
    hundreds; images are in [0, 1])."""
    return ((got - want).abs().max() / want.abs().max().clamp_min(1.0)).item()
L_TXT = 7  # caption tokens (odd on purpose)


# --------------------------------------------------------------------------------------------------
# Tiny pipelines
# --------------------------------------------------------------------------------------------------
def tiny_vae(latent_channels=4):
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                                  layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                                  sample_size=8, scaling_factor=0.7, shift_factor=0.1)
    return randomize_(vae, seed=1).eval()


def tiny_transformer(family, *, sample_size=8, guidance=True, layers=3, seed=0):
    if family == "pixart":
        # head dim 12 (width 24): PixArt-α 1024's size embedding splits the width in 3 (diffusers needs D % 3 == 0)
        m = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                               out_channels=8, num_layers=layers, cross_attention_dim=24,
                                               caption_channels=12, sample_size=sample_size, patch_size=2,
                                               norm_type="ada_norm_single")
    elif family == "sd3":
        m = diffusers.SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=4, num_layers=layers,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                            caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
                                            pos_embed_max_size=16)
    else:
        m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=layers - 1,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                             pooled_projection_dim=10, guidance_embeds=guidance,
                                             axes_dims_rope=(2, 2, 4))
    return randomize_(m, seed=seed).eval()


SCHEDULERS = {
    "pixart": ("DPMSolverMultistepScheduler", "DDIMScheduler", "EulerDiscreteScheduler"),
    "sd3": ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"),
    "flux": ("FlowMatchEulerDiscreteScheduler",),
}
CASES = [(f, s) for f in FAMILIES for s in SCHEDULERS[f]]


def make_pipeline(family, scheduler=None, **tkw):
    scheduler = getattr(diffusers, scheduler or SCHEDULERS[family][0])()
    tr = tiny_transformer(family, **tkw)
    if family == "pixart":
        pipe = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=tr,
                                             scheduler=scheduler)
    elif family == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(transformer=tr, scheduler=scheduler, vae=tiny_vae(),
                                                  text_encoder=None, tokenizer=None, text_encoder_2=None,
                                                  tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    else:
        pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=tiny_vae(), text_encoder=None, tokenizer=None,
                                      text_encoder_2=None, tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(family, batch=2, steps=4, cfg=3.0, seed=0, **extra):
    """The pipeline's call with caption embeddings (and the negative ones) instead of prompts."""
    g = torch.Generator().manual_seed(seed)
    if family == "pixart":
        mask = torch.ones(batch, L_TXT, dtype=torch.long)
        mask[0, 5:] = 0  # padding in the first caption
        kw = dict(prompt_embeds=torch.randn(batch, L_TXT, 12, generator=g), prompt_attention_mask=mask,
                  negative_prompt_embeds=torch.randn(batch, L_TXT, 12, generator=g),
                  negative_prompt_attention_mask=torch.ones(batch, L_TXT, dtype=torch.long), negative_prompt=None,
                  guidance_scale=cfg, use_resolution_binning=False, height=8, width=8)
    elif family == "sd3":
        kw = dict(prompt_embeds=torch.randn(batch, L_TXT, 12, generator=g),
                  pooled_prompt_embeds=torch.randn(batch, 10, generator=g),
                  negative_prompt_embeds=torch.randn(batch, L_TXT, 12, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(batch, 10, generator=g), guidance_scale=cfg)
    else:  # FLUX: guidance_scale feeds dev's guidance embedding; true CFG when true_cfg_scale > 1
        kw = dict(prompt_embeds=torch.randn(batch, L_TXT, 12, generator=g),
                  pooled_prompt_embeds=torch.randn(batch, 10, generator=g), guidance_scale=cfg, height=12, width=16)
    kw.update(num_inference_steps=steps, output_type="pt")
    kw.update(extra)
    return kw


def run(pipe, kw, seed=3):
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).images


def ee_model(fast):
    """The eekernels model inside an accelerated pipeline or transformer."""
    return getattr(fast, "transformer", fast).model


def record_calls(model):
    """Every call of the eekernels model: its depth argument and the t it received."""
    seen = []

    def hook(mod, args, kwargs):
        seen.append((kwargs.get("depth"), args[1].detach().clone()))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


# --------------------------------------------------------------------------------------------------
# Full depth: the same images as the original
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, scheduler", CASES)
def test_full_depth_same_images(family, scheduler):
    pipe = make_pipeline(family, scheduler)
    fast = eekernels.accelerate(pipe, native=True)
    for cfg in (1.0, 3.0):
        kw = call_kwargs(family, cfg=cfg)
        want, got = run(pipe, kw), run(fast, kw)
        assert got.shape == want.shape and want.shape[0] == 2
        assert (got - want).abs().max() <= TOL, (cfg, (got - want).abs().max())
        assert want.std() > 0.05  # a real image, not a constant
    latents = run(fast, call_kwargs(family, output_type="latent"))
    assert err(latents, run(pipe, call_kwargs(family, output_type="latent"))) <= TOL


def test_flux_true_cfg_and_guidance_embedding_pass_through():
    pipe = make_pipeline("flux")
    fast = eekernels.accelerate(pipe, native=True)
    seen = []
    ee_model(fast).register_forward_pre_hook(lambda m, a, k: seen.append(a[2].extra.get("guidance")), with_kwargs=True)
    g = torch.Generator().manual_seed(5)
    neg = dict(negative_prompt_embeds=torch.randn(2, L_TXT, 12, generator=g),
               negative_pooled_prompt_embeds=torch.randn(2, 10, generator=g), true_cfg_scale=2.5)
    outs, errs = [], []
    for cfg in (1.5, 6.0):
        kw = call_kwargs("flux", cfg=cfg, steps=3, **neg)
        want, got = run(pipe, kw), run(fast, kw)
        errs.append(float((got - want).abs().max()))
        assert errs[-1] <= TOL
        outs.append(got)
    # The guidance embedding changes the function far beyond the agreement with diffusers.
    assert (outs[0] - outs[1]).abs().max() > 20 * max(errs + [1e-6])
    assert len(seen) == 2 * 3 * 2  # true CFG: two calls per step
    assert all(s is not None and s.shape == (2,) for s in seen)
    assert {round(float(s[0]), 4) for s in seen} == {1.5, 6.0}


def test_flux_schnell_without_guidance_embedding():
    pipe = make_pipeline("flux", guidance=False)
    fast = eekernels.accelerate(pipe, native=True)
    kw = call_kwargs("flux", steps=2)
    assert (run(fast, kw) - run(pipe, kw)).abs().max() <= TOL


def test_pixart_alpha_1024_resolution_and_aspect_ratio_pass_through():
    """sample_size 128 is PixArt-α 1024: the pipeline adds (resolution, aspect_ratio) conditions."""
    pipe = make_pipeline("pixart", sample_size=128)
    assert pipe.transformer.use_additional_conditions
    fast = eekernels.accelerate(pipe, native=True)
    seen = []
    ee_model(fast).register_forward_pre_hook(lambda m, a, k: seen.append(dict(a[2].extra)), with_kwargs=True)
    for h, w in ((8, 8), (8, 16)):
        kw = call_kwargs("pixart", steps=2, height=h, width=w, output_type="latent")
        want, got = run(pipe, kw), run(fast, kw)
        assert got.shape == (2, 4, h, w) and err(got, want) <= TOL
    assert seen[0]["resolution"].tolist() == [[8.0, 8.0]] * 4  # the CFG batch: 2 x 2
    assert seen[-1]["resolution"].tolist() == [[8.0, 16.0]] * 4
    assert torch.allclose(seen[-1]["aspect_ratio"], torch.full((4, 1), 8 / 16))
    # The conditions matter: the transformer alone, two resolutions, each as diffusers computes it.
    tr, ft = pipe.transformer, fast.transformer
    x, tok, t = torch.randn(2, 4, 8, 8), torch.randn(2, L_TXT, 12), torch.tensor([10, 700])
    outs = []
    for res in ((8.0, 8.0), (16.0, 24.0)):
        cond = {"resolution": torch.tensor([res] * 2), "aspect_ratio": torch.tensor([[res[0] / res[1]]] * 2)}
        with torch.no_grad():
            want = tr(x, encoder_hidden_states=tok, timestep=t, added_cond_kwargs=cond).sample
            got = ft(x, encoder_hidden_states=tok, timestep=t, added_cond_kwargs=cond).sample
        assert (got - want).abs().max() <= 1e-5
        outs.append(got)
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_pixart_sigma_pipeline():
    alpha = make_pipeline("pixart")
    pipe = diffusers.PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=alpha.vae,
                                         transformer=alpha.transformer, scheduler=alpha.scheduler)
    pipe.set_progress_bar_config(disable=True)
    fast = eekernels.accelerate(pipe, native=True)
    assert type(fast) is diffusers.PixArtSigmaPipeline
    kw = call_kwargs("pixart", steps=3)
    assert (run(fast, kw) - run(pipe, kw)).abs().max() <= TOL


# --------------------------------------------------------------------------------------------------
# The original is untouched; weights are shared
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_original_pipeline_untouched(family):
    pipe = make_pipeline(family)
    tr, config = pipe.transformer, dict(pipe.config)
    state = {k: v.clone() for k, v in tr.state_dict().items()}
    kw = call_kwargs(family, steps=2)
    before = run(pipe, kw)
    fast = eekernels.accelerate(pipe, schedule=ExitSchedule.piecewise([3, 2, 1]), native=True)
    run(fast, kw)
    assert pipe.transformer is tr and dict(pipe.config) == config
    assert "progress_bar" not in vars(pipe) and "prepare_latents" not in vars(pipe)
    assert all(torch.equal(v, state[k]) for k, v in tr.state_dict().items()) and set(state) == set(tr.state_dict())
    assert (run(pipe, kw) - before).abs().max() == 0  # the original's function is unchanged
    assert fast.vae is pipe.vae and fast.scheduler is pipe.scheduler
    assert fast.transformer.config is tr.config and fast.transformer.dtype == tr.dtype
    assert type(fast) is type(pipe) and set(fast.components) == set(pipe.components)
    with pytest.raises(TypeError, match="already accelerated"):
        eekernels.accelerate(fast, native=True)


# Tensors the eekernels layout fuses or stacks (so they are copies): everything else must be shared.
FUSED = {
    "pixart": ("qkv", "adaLN", "kv"),
    "sd3": ("qkv", "adaLN_weight", "adaLN_bias"),
    "flux": ("qkv", "linear1", "adaLN", "final_layer.adaLN_modulation"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_shared_with_the_original(family):
    tr = tiny_transformer(family)
    fast = eekernels.accelerate(tr, native=True)
    src = {v.data_ptr() for v in tr.state_dict().values()}
    own = {k: v for k, v in ee_model(fast).named_parameters()}
    shared = {k for k, v in own.items() if v.data_ptr() in src}
    assert len(shared) >= len(own) // 2, sorted(set(own) - shared)
    not_shared = set(own) - shared
    assert all(any(f in k for f in FUSED[family]) for k in not_shared), sorted(not_shared)
    # An in-place update of a shared original tensor is seen by the accelerated model.
    name = next(k for k in sorted(shared) if own[k].dim() == 2)
    with torch.no_grad():
        ptr = own[name].data_ptr()
        target = next(v for v in tr.state_dict().values() if v.data_ptr() == ptr)
        target.mul_(1.5)
        assert torch.equal(own[name], target)


# --------------------------------------------------------------------------------------------------
# With a schedule: schedule.depth(t) blocks per call, chosen on the host; CFG halves share it
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, scheduler", CASES)
def test_schedule_runs_its_depths(family, scheduler):
    pipe = make_pipeline(family, scheduler)
    schedule = ExitSchedule.piecewise([3, 3, 3, 2, 2, 2, 1, 1, 1, 1])
    full = eekernels.accelerate(pipe, native=True)
    fast = eekernels.accelerate(pipe, schedule=schedule, native=True)
    seen = record_calls(ee_model(fast))
    timeline = []
    ee_model(fast).register_forward_pre_hook(
        lambda m, a, k: timeline.append(fast.transformer.exit_plan.timeline.current()), with_kwargs=True)
    kw = call_kwargs(family, steps=5)
    out = run(fast, kw)
    ts = pipe.scheduler.timesteps  # the run's timesteps (Heun: each interior one twice)
    want = schedule.depth(ts).tolist()
    depths = [d for d, _ in seen]
    assert depths == want and all(type(d) is int for d in depths)  # ints: one depth for the whole CFG batch
    assert len(set(want)) == 3
    # Each call's t is the run's timestep (flow families: sigma * 1000), and the host timeline names it.
    got_t = torch.stack([t[0].double() for _, t in seen])
    assert torch.allclose(got_t, ts.double(), atol=1e-3), (got_t, ts)
    assert timeline == pytest.approx(ts.double().tolist())
    for _, t in seen:
        assert t.shape[0] in (2, 4) and bool((t == t[0]).all())  # the CFG batch: both halves, one t
    assert (out - run(full, kw)).abs().max() > 1e-3  # truncation changed the function (random weights)


@pytest.mark.parametrize("family", FAMILIES)
def test_schedule_at_full_depth_equals_no_schedule(family):
    pipe = make_pipeline(family)
    kw = call_kwargs(family, steps=3)
    fast = eekernels.accelerate(pipe, native=True)
    a = run(fast, kw)
    b = run(eekernels.accelerate(pipe, schedule=ExitSchedule.full(ee_model(fast).num_blocks), native=True), kw)
    assert (a - b).abs().max() == 0


def test_exit_cache_policy_restarts_per_pipeline_call():
    pipe = make_pipeline("sd3")
    fast = eekernels.accelerate(pipe, schedule=ExitSchedule.periodic(2, 1, total_depth=3), exit_policy="cache", native=True)
    seen = record_calls(ee_model(fast))
    kw = call_kwargs("sd3", steps=5)
    run(fast, kw)
    run(fast, kw)
    assert [d for d, _ in seen] == [3, 1, 3, 1, 3] * 2


def test_ddim_host_timeline_by_step_count():
    """DDIM keeps no step_index: the timeline counts the progress-bar updates (first-order scheduler)."""
    pipe = make_pipeline("pixart", "DDIMScheduler")
    fast = eekernels.accelerate(pipe, schedule=ExitSchedule.piecewise([3, 2, 1]), native=True)
    timeline = []
    ee_model(fast).register_forward_pre_hook(
        lambda m, a, k: timeline.append(fast.transformer.exit_plan.timeline.current()), with_kwargs=True)
    run(fast, call_kwargs("pixart", steps=4))
    assert fast.transformer.exit_plan.timeline is None  # cleared when the loop ends
    assert timeline == pipe.scheduler.timesteps.double().tolist()


# --------------------------------------------------------------------------------------------------
# The transformers on their own
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_flux_transformer_unpacks_and_repacks_any_grid():
    tr = tiny_transformer("flux")
    fast = eekernels.accelerate(tr, native=True)
    pipe_cls = diffusers.FluxPipeline
    for h, w in ((4, 4), (3, 5)):
        x = torch.randn(2, h * w, 16)
        img_ids = pipe_cls._prepare_latent_image_ids(2, h, w, "cpu", torch.float32)
        kw = dict(encoder_hidden_states=torch.randn(2, L_TXT, 12), pooled_projections=torch.randn(2, 10),
                  timestep=torch.tensor([0.3, 0.9]), img_ids=img_ids, txt_ids=torch.zeros(L_TXT, 3),
                  guidance=torch.tensor([3.5, 3.5]))
        want = tr(x, **kw).sample
        got = fast(x, **kw)
        assert type(got).__name__ == "Transformer2DModelOutput" and got.sample.shape == want.shape
        assert (got.sample - want).abs().max() <= 1e-5
    # FLUX-dev's guidance reaches the model: two scales, each as diffusers computes it.
    a, b = (fast(x, **{**kw, "guidance": torch.tensor([g, g])}).sample for g in (1.0, 8.0))
    assert (a - b).abs().max() > 1e-3
    assert (b - tr(x, **{**kw, "guidance": torch.tensor([8.0, 8.0])}).sample).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="img_ids"):
        fast(x, **{**kw, "img_ids": img_ids[torch.randperm(len(img_ids))]})
    with pytest.raises(ValueError, match="hidden_states"):
        fast(torch.randn(2, 16, 4, 4), **kw)
    with pytest.raises(ValueError, match="joint_attention_kwargs"):
        fast(x, **kw, joint_attention_kwargs={"scale": 0.5})


@torch.no_grad()
def test_sd3_transformer_and_refused_arguments():
    tr = tiny_transformer("sd3")
    fast = eekernels.accelerate(tr, schedule=ExitSchedule.piecewise([3, 2]), native=True)
    x = torch.randn(3, 4, 8, 6)
    kw = dict(encoder_hidden_states=torch.randn(3, L_TXT, 12), pooled_projections=torch.randn(3, 10))
    for t, d in ((100.0, 3), (900.0, 2)):
        want = eekernels.accelerate(tr, native=True)(x, timestep=torch.full((3,), t), **kw).sample
        got = fast(x, timestep=torch.full((3,), t), **kw).sample
        assert (got - ee_model(fast)(x, torch.full((3,), t), _sd3_cond(kw), depth=d)).abs().max() == 0
        if d == 3:
            assert (got - tr(x, timestep=torch.full((3,), t), **kw).sample).abs().max() <= 1e-5
            assert (got - want).abs().max() == 0
    with pytest.raises(ValueError, match="skip_layers"):
        fast(x, timestep=torch.full((3,), 5.0), skip_layers=[1], **kw)
    with pytest.raises(ValueError, match="block_controlnet_hidden_states"):
        fast(x, timestep=torch.full((3,), 5.0), block_controlnet_hidden_states=[x], **kw)
    pipe = make_pipeline("sd3")
    with pytest.raises(ValueError, match="skip_layers"):
        run(eekernels.accelerate(pipe, native=True), call_kwargs("sd3", steps=6, skip_guidance_layers=[1]))


def _sd3_cond(kw):
    return eekernels.models.TextCondition(kw["encoder_hidden_states"], None, kw["pooled_projections"])


@torch.no_grad()
def test_pixart_transformer_mask_and_refused_arguments():
    tr = tiny_transformer("pixart")
    fast = eekernels.accelerate(tr, native=True)
    x, tok, t = torch.randn(2, 4, 8, 8), torch.randn(2, L_TXT, 12), torch.tensor([3, 999])
    mask = torch.tensor([[1] * L_TXT, [1, 1, 1, 0, 0, 0, 0]])
    for m in (mask, mask.float(), None):
        want = tr(x, encoder_hidden_states=tok, timestep=t, encoder_attention_mask=m).sample
        got = fast(x, encoder_hidden_states=tok, timestep=t, encoder_attention_mask=m).sample
        assert (got - want).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        fast(x, encoder_hidden_states=tok, timestep=t, encoder_attention_mask=mask[:, None])
    with pytest.raises(ValueError, match="cross_attention_kwargs"):
        fast(x, encoder_hidden_states=tok, timestep=t, cross_attention_kwargs={"scale": 1.0})
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        fast(x, timestep=t)


# --------------------------------------------------------------------------------------------------
# CUDA graphs: the real capture on a GPU, an eager stand-in here (the runner's own code paths)
# --------------------------------------------------------------------------------------------------
class _EagerGraph:
    def __init__(self, fn):
        self.fn, self.replays = fn, 0

    def replay(self):
        self.replays += 1
        self.fn()


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_runner_matches_eager(family):
    from eekernels.graphs import GraphCache

    pipe = make_pipeline(family)
    schedule = ExitSchedule.piecewise([3, 2, 2, 1])
    kw = call_kwargs(family, steps=4)
    want = run(eekernels.accelerate(pipe, schedule=schedule, graphs=False, native=True), kw)
    fast = eekernels.accelerate(pipe, schedule=schedule, native=True)
    cache = GraphCache(capture=lambda fn, pool, stream: (_EagerGraph(fn), 1000))
    fast.transformer._runner.graph_cache = cache
    got = run(fast, kw)
    assert (got - want).abs().max() == 0
    assert cache.stats()["graphs"] == len(set(schedule.depth(pipe.scheduler.timesteps).tolist()))
    before = cache.stats()["captures"]
    assert (run(fast, kw) - want).abs().max() == 0  # replayed, not captured again
    assert cache.stats()["captures"] == before


def test_graphs_true_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal; on a GPU graphs=True captures")
    fast = eekernels.accelerate(make_pipeline("sd3"), graphs=True, native=True)
    with pytest.raises(ValueError, match="CUDA"):
        run(fast, call_kwargs("sd3", steps=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA-graph capture needs a GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graphs_same_images(family):
    pipe = make_pipeline(family).to("cuda")
    schedule = ExitSchedule.piecewise([3, 2, 1])
    kw = call_kwargs(family, steps=4)
    kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    want = run(eekernels.accelerate(pipe, schedule=schedule, graphs=False, native=True), kw)
    got = run(eekernels.accelerate(pipe, schedule=schedule, graphs=True, native=True), kw)
    assert (got - want).abs().max() <= 1e-4


# --------------------------------------------------------------------------------------------------
# Prompts through a (tiny, in-memory) T5 and tokenizer
# --------------------------------------------------------------------------------------------------
def tiny_t5_and_tokenizer():
    transformers = pytest.importorskip("transformers", reason="the prompt path needs transformers")
    tokenizers = pytest.importorskip("tokenizers", reason="the in-memory tokenizer needs tokenizers")
    words = ["<pad>", "</s>", "<unk>"] + "a photo of cat dog red blue on the mars big small".split()
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>", model_max_length=512)
    config = transformers.T5Config(vocab_size=len(words), d_model=12, d_kv=4, num_heads=3, num_layers=1, d_ff=20,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return transformers.T5EncoderModel(config).eval(), tokenizer


def test_pixart_prompts_through_text_encoder():
    encoder, tokenizer = tiny_t5_and_tokenizer()
    base = make_pipeline("pixart")
    pipe = diffusers.PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=base.vae,
                                         transformer=base.transformer, scheduler=base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    fast = eekernels.accelerate(pipe, native=True)
    assert fast.text_encoder is encoder and fast.tokenizer is tokenizer
    kw = dict(prompt=["a photo of a cat", "a big red dog on the mars"], negative_prompt="small blue",
              num_inference_steps=3, guidance_scale=4.0, clean_caption=False, max_sequence_length=9,
              use_resolution_binning=False, height=8, width=8, output_type="pt")
    want, got = run(pipe, kw), run(fast, kw)
    assert (got - want).abs().max() <= TOL and want.std() > 0.05
    latents = {**kw, "output_type": "latent"}  # the tiny VAE squashes differences: compare before it
    other = run(fast, {**latents, "prompt": ["a dog", "a cat"]})
    assert (other - run(fast, latents)).abs().max() > 1e-3  # the prompt reaches the model


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def test_unsupported_text_pipeline_names_the_supported_ones():
    with pytest.raises(TypeError, match="FluxPipeline"):
        eekernels.accelerate(copy.copy, native=True)  # not a pipeline at all
