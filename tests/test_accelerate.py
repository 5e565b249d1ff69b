"""eekernels.accelerate: drop-in for facebookresearch DiT, baofff U-ViT, diffusers models and pipelines.

Tiny random models built from configs (nothing downloaded). Every parameter is randomized (zero-initialized
adaLN/output layers would hide errors), and the diffusers modules are put in eval mode as from_pretrained does.
"""
import pytest
import torch

import eekernels
from eekernels import ExitSchedule
from eekernels._accelerate import DiffusersTransformer, DiffusersUNet, EarlyExitModel
from tests.models._reference_models import RefDiT, RefUViT, randomize_, rel_err

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (pip install -e .[test])")


# --------------------------------------------------------------------------------------------------
# Tiny models and pipelines
# --------------------------------------------------------------------------------------------------
def tiny_dit_transformer(layers=4, seed=0):
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=layers, sample_size=8, patch_size=2,
                                        num_embeds_ada_norm=1000)  # DiTPipeline's CFG null label is 1000
    randomize_(m, seed=seed)
    emb0 = m.transformer_blocks[0].norm1.emb.state_dict()  # converted checkpoints: identical embedder copies
    for blk in m.transformer_blocks[1:]:
        blk.norm1.emb.load_state_dict(emb0)
    return m.eval()


def tiny_vae():
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=8)
    return randomize_(vae, seed=1).eval()


def tiny_unet(seed=0):
    m = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                              down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                              norm_num_groups=4, attention_head_dim=4)
    return randomize_(m, seed=seed).eval()


def dit_pipeline():
    pipe = diffusers.DiTPipeline(tiny_dit_transformer(), tiny_vae(), diffusers.DDIMScheduler(),
                                 id2label={0: "zero", 1: "one, uno"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_pipeline(kind):
    if kind == "ddpm":
        pipe = diffusers.DDPMPipeline(tiny_unet(), diffusers.DDPMScheduler())
    else:
        pipe = diffusers.DDIMPipeline(tiny_unet(), diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record_depths(model):
    """Every call's `depth` argument, as the eekernels model received it."""
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs.get("depth")), with_kwargs=True)
    return seen


def record_flops(model):
    """FLOPs of every call of `model` (torch's FlopCounterMode: GEMMs, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = []

    def pre(mod, args, kwargs):
        mod._counter = FlopCounterMode(display=False)
        mod._counter.__enter__()

    def post(mod, args, kwargs, out):
        mod._counter.__exit__(None, None, None)
        flops.append(mod._counter.get_total_flops())

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)
    return flops


def shared_names(ee_model, source_tensors):
    ptrs = {t.data_ptr() for t in source_tensors}
    return {k for k, v in ee_model.state_dict().items() if v.data_ptr() in ptrs}


# --------------------------------------------------------------------------------------------------
# Pipelines at full depth: same images as the original on the same seed
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_dit_pipeline_full_depth_matches_original(guidance_scale):
    pipe = dit_pipeline()
    fast = eekernels.accelerate(pipe, native=True)
    kw = dict(guidance_scale=guidance_scale, num_inference_steps=4, output_type="np")
    want = pipe(class_labels=[1, 7, 0], generator=torch.Generator().manual_seed(3), **kw).images
    got = fast(class_labels=[1, 7, 0], generator=torch.Generator().manual_seed(3), **kw).images
    assert got.shape == want.shape == (3, 8, 8, 3)
    assert abs(got - want).max() < 1e-4, abs(got - want).max()
    assert want.std() > 0.05  # a real image, not a constant
    # The pipeline's own helpers still work on the copy.
    assert fast.get_label_ids(["uno"]) == [1]


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_unet_pipelines_full_depth_match_original(kind):
    pipe = unet_pipeline(kind)
    fast = eekernels.accelerate(pipe, native=True)
    want = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=5, output_type="np")
    got = fast(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=5, output_type="np")
    assert abs(got.images - want.images).max() < 1e-4
    assert want.images.std() > 0.05


def test_pipeline_copy_leaves_the_original_untouched():
    pipe = dit_pipeline()
    original, config = pipe.transformer, dict(pipe.config)
    fast = eekernels.accelerate(pipe, native=True)
    assert pipe.transformer is original and dict(pipe.config) == config
    assert "progress_bar" not in vars(pipe)
    assert isinstance(fast.transformer, DiffusersTransformer)
    assert fast.vae is pipe.vae and fast.scheduler is pipe.scheduler  # shallow copy: shared components
    assert tuple(fast.config.transformer) == ("diffusers", "DiTTransformer2DModel")  # what save_pretrained writes
    assert set(fast.components) == set(pipe.components)
    # What the pipelines read from their denoiser.
    assert fast.transformer.config is original.config
    assert fast.transformer.dtype == original.dtype and fast.transformer.device == original.device
    with pytest.raises(TypeError, match="already accelerated"):
        eekernels.accelerate(fast, native=True)


# --------------------------------------------------------------------------------------------------
# With a schedule: the model runs schedule.depth(t), picked on the host, and fewer blocks
# --------------------------------------------------------------------------------------------------
def test_dit_pipeline_schedule_runs_expected_depths_and_fewer_block_flops():
    pipe = dit_pipeline()
    schedule = ExitSchedule.piecewise([4, 4, 3, 3, 2, 2, 1, 1, 1, 1])
    call = dict(class_labels=[3, 5], guidance_scale=4.0, num_inference_steps=6, output_type="np")
    full = eekernels.accelerate(pipe, native=True)
    full_flops = record_flops(full.transformer.model)
    want_images = full(generator=torch.Generator().manual_seed(0), **call).images
    fast = eekernels.accelerate(pipe, schedule=schedule, native=True)
    depths, flops = record_depths(fast.transformer.model), record_flops(fast.transformer.model)
    out = fast(generator=torch.Generator().manual_seed(0), **call).images
    want = schedule.depth(pipe.scheduler.timesteps).tolist()  # the timesteps the run just used
    # Python ints: chosen on the host from the loop's timestep, never a per-sample tensor (no device read).
    assert depths == want and all(type(d) is int for d in depths)
    # Each call costs the full call minus exactly the skipped blocks: flops = full - (4 - depth) * per_block.
    assert len(set(full_flops)) == 1 and len(flops) == len(want)
    per_block = (flops[want.index(4)] - flops[want.index(1)]) / 3
    assert per_block > 0
    assert flops == [full_flops[0] - (4 - d) * per_block for d in want]
    assert abs(out - want_images).max() > 1e-3  # truncation changed the function (random weights)


def test_ddim_pipeline_schedule_runs_expected_levels():
    pipe = unet_pipeline("ddim")
    schedule = ExitSchedule.piecewise([2, 2, 2, 2, 1, 1, 1, 1, 1, 1])
    fast = eekernels.accelerate(pipe, schedule=schedule, native=True)
    depths = record_depths(fast.unet.model)
    fast(batch_size=2, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0))
    assert depths == schedule.depth(pipe.scheduler.timesteps).tolist() == [1, 1, 1, 2, 2]


def test_exit_cache_policy_with_periodic_schedule():
    pipe = unet_pipeline("ddim")
    schedule = ExitSchedule.periodic(2, 1, total_depth=2)
    fast = eekernels.accelerate(pipe, schedule=schedule, exit_policy="cache", native=True)
    depths = record_depths(fast.unet.model)
    kw = dict(batch_size=2, num_inference_steps=5, output_type="np")
    cached = fast(generator=torch.Generator().manual_seed(0), **kw).images
    assert depths == [2, 1, 2, 1, 2]
    fast(generator=torch.Generator().manual_seed(0), **kw)  # a second run restarts the call count
    assert depths[5:] == [2, 1, 2, 1, 2]
    dropped = eekernels.accelerate(pipe, schedule=schedule, exit_policy="drop", native=True)
    # `drop` with a step-indexed schedule: same depths, zeros instead of the cached deep features.
    assert abs(dropped(generator=torch.Generator().manual_seed(0), **kw).images - cached).max() > 1e-4


# --------------------------------------------------------------------------------------------------
# Models: facebookresearch DiT, baofff U-ViT, diffusers modules; shared weights
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_facebook_dit_full_and_scheduled_match_reference():
    ref = randomize_(RefDiT(input_size=8, hidden_size=72, depth=4, num_heads=3, num_classes=10)).eval()
    fast = eekernels.accelerate(ref, native=True)
    assert isinstance(fast, EarlyExitModel) and fast.learn_sigma and fast.num_classes == 10
    x, y = torch.randn(4, 4, 8, 8), torch.tensor([1, 2, 10, 10])
    t = torch.tensor([999, 999, 999, 999])  # a DiT loop's device tensor; here on the CPU
    assert rel_err(fast(x, t, y), ref(x, t, y)) <= 1e-5
    # forward_with_cfg as the original: guidance on the first 3 channels of a [cond; uncond] batch.
    out = fast.forward_with_cfg(x, t, y, 1.5)
    r = ref(torch.cat([x[:2], x[:2]]), t, y)
    g = r[2:, :3] + 1.5 * (r[:2, :3] - r[2:, :3])
    assert rel_err(out, torch.cat([torch.cat([g, g]), r[:, 3:]], dim=1)) <= 1e-5

    schedule = ExitSchedule.piecewise([4, 3, 2, 1])
    fast = eekernels.accelerate(ref, schedule=schedule, native=True)
    for step, d in ((0, 4), (300, 3), (600, 2), (999, 1)):
        t = torch.full((4,), step)
        assert rel_err(fast(x, t, y), ref(x, t, y, depth=d)) <= 1e-5
    # Per-sample timesteps become per-sample depths.
    t = torch.tensor([0, 300, 600, 999])
    want = torch.cat([ref(x[i:i + 1], t[i:i + 1], y[i:i + 1], depth=d) for i, d in enumerate([4, 3, 2, 1])])
    assert rel_err(fast(x, t, y), want) <= 1e-5


def test_facebook_dit_weights_are_shared_except_stacked_adaLN():
    ref = randomize_(RefDiT(input_size=8, hidden_size=72, depth=3, num_heads=3)).eval()
    fast = eekernels.accelerate(ref, native=True)
    src = dict(ref.state_dict())
    shared = shared_names(fast.model, src.values())
    own = set(fast.model.state_dict())
    assert own - shared == {"adaLN_weight", "adaLN_bias"}  # one stacked (2 + 6L)D x D matrix, a copy
    for k in shared:
        assert fast.model.state_dict()[k].data_ptr() == src[k].data_ptr(), k
    # Shared storage: an in-place update of the original is seen by the accelerated model.
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 500]), torch.tensor([0, 1])
    with torch.no_grad():
        before = fast(x, t, y)
        ref.blocks[1].mlp.fc2.weight.mul_(2)
        assert rel_err(fast(x, t, y), ref(x, t, y)) <= 1e-5 and rel_err(fast(x, t, y), before) > 1e-3


@torch.no_grad()
def test_baofff_uvit_matches_reference_and_shares_weights():
    ref = randomize_(RefUViT(img_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=11)).eval()
    fast = eekernels.accelerate(ref, schedule=ExitSchedule.piecewise([5, 4, 3], total_depth=5), native=True)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    for step, d in ((0, 5), (500, 4), (999, 3)):
        t = torch.full((2,), float(step))
        assert rel_err(fast(x, t, y), ref(x, t, y, depth=d)) <= 1e-5
    assert shared_names(fast.model, ref.state_dict().values()) == set(fast.model.state_dict())


@torch.no_grad()
def test_diffusers_modules_share_all_but_fused_weights():
    tr = tiny_dit_transformer(layers=2)
    fast = eekernels.accelerate(tr, native=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 1000])
    want = tr(x, timestep=t, class_labels=y).sample
    got = fast(x, timestep=t, class_labels=y)
    assert type(got).__name__ == type(tr(x, timestep=t, class_labels=y)).__name__
    assert rel_err(got.sample, want) <= 1e-5 and rel_err(fast(x, t, y, return_dict=False)[0], want) <= 1e-5
    tensors = list(tr.state_dict().values()) + [tr.pos_embed.pos_embed]
    not_shared = set(fast.model.state_dict()) - shared_names(fast.model, tensors)
    assert not_shared == {"adaLN_weight", "adaLN_bias", *(f"blocks.{i}.attn.qkv.{w}" for i in range(2)
                                                          for w in ("weight", "bias"))}

    unet = tiny_unet()
    fast = eekernels.accelerate(unet, native=True)
    assert isinstance(fast, DiffusersUNet)
    x = torch.randn(2, 3, 16, 16)
    assert rel_err(fast(x, 17).sample, unet(x, 17).sample) <= 1e-5  # Python timestep, as pipelines may pass
    not_shared = set(fast.model.state_dict()) - shared_names(fast.model, unet.state_dict().values())
    assert not_shared == {"time_emb_proj.weight", "time_emb_proj.bias"} | {
        k for k in fast.model.state_dict() if ".to_qkv." in k}


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("obj", [torch.nn.Linear(3, 3), "DiT-XL/2", None])
def test_unsupported_objects_raise_type_error(obj):
    with pytest.raises(TypeError, match="supported: .*DiTTransformer2DModel.*DDPMPipeline"):
        eekernels.accelerate(obj, native=True)


def test_unsupported_pipeline_raises_type_error():
    pipe = diffusers.PNDMPipeline(tiny_unet(), diffusers.PNDMScheduler())
    for native in (False, True):  # both tiers name what they take
        with pytest.raises(TypeError, match="PNDMPipeline; supported: .*DiTPipeline.*DDPMPipeline, DDIMPipeline"):
            eekernels.accelerate(pipe, native=native)


def test_bad_arguments_raise_value_error():
    ref = randomize_(RefDiT(input_size=8, hidden_size=72, depth=3, num_heads=3)).eval()
    with pytest.raises(ValueError, match="exit_policy"):
        eekernels.accelerate(ref, exit_policy="skip", native=True)
    with pytest.raises(ValueError, match="expected a schedule"):
        eekernels.accelerate(ref, exit_policy="cache", native=True)
    with pytest.raises(ValueError, match="rescaled"):
        eekernels.accelerate(ref, schedule=ExitSchedule.piecewise([28, 12]), native=True)
    with pytest.raises(ValueError, match="ExitSchedule"):
        eekernels.accelerate(ref, schedule=[3, 2, 1], native=True)
    with pytest.raises(ValueError, match="graphs"):
        eekernels.accelerate(ref, graphs="yes", native=True)
    if not torch.cuda.is_available():
        fast = eekernels.accelerate(ref, graphs=True, native=True)
        with pytest.raises(ValueError, match="CUDA"):
            fast(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([0]))
