"""Wan 2.1 / 2.2 in place (``WanTransformer3DModel``; ``WanPipeline``, ``WanImageToVideoPipeline``).

Tiny random models built from configs (3 blocks, 2 latent frames of 8x8, 3 steps), nothing downloaded; prompts go in
as embeddings. Checked here:
- the harness's CHECKS on Wan 2.1 text-to-video and on Wan 2.1 image-to-video (image tokens in every block's
  cross-attention, the encoded first frame on the latents' channels); video-to-video with ``strength`` (the loop
  runs the last steps of the scheduler's timesteps: each at its own depth);
- Wan 2.2's two experts: each runs its own schedule, at the steps the pipeline's boundary gives it (blocks counted
  by torch pre-hooks, against a hand computation and ``inplace.plan``); a run with one depth per expert equals the
  plain pipeline with each expert cut by hand; Wan 2.1's single expert (``transformer_2=None``);
- the presets' block fraction under each model's default scheduler;
- diffusers' operations on the accelerated pipeline (tests/families/operations.py, plus both experts): save/load,
  the Wan LoRA loader (one expert, and both with ``load_into_transformer_2``), attention processors (T2V, I2V),
  fused QKV, ``pipe.to(bfloat16)``;
- what ``eekernels.patches`` replaces in a Wan transformer;
- diffusers' context parallelism on two CPU processes (benchmarks/wan_context_parallel.py under torchrun; slow
  tier).
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import diffusers
import eekernels
from eekernels import ExitSchedule, families, inplace
from tests.families import operations
from tests.families.harness import CHECKS, Case, output, patched_equals_plain, sliced
from tests.models._reference_models import randomize_
from tests.test_inplace_diffusers import _Ran

TEXT_DIM, IMAGE_DIM = 16, 12
STEPS = 3  # UniPC (flow, shift 3) at 3 steps: t = 999, 857, 600


# --------------------------------------------------------------------------------------------------
# Tiny pipelines
# --------------------------------------------------------------------------------------------------
def tiny_transformer(layers=3, seed=0, i2v=False):
    """Wan 2.1 T2V-shaped (I2V: 12 input channels = 4 latent + 4 mask + 4 encoded frame, image tokens with their
    own K/V projections), every parameter random."""
    m = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=12 if i2v else 4,
        out_channels=4, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
        rope_max_seq_len=32, image_dim=IMAGE_DIM if i2v else None, added_kv_proj_dim=16 if i2v else None)
    return randomize_(m, seed=seed).eval()


def scheduler(shift=3.0):
    """Wan 2.1's scheduler (UniPC on flow sigmas)."""
    return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                             flow_shift=shift)


def t2v_pipeline(layers=3, experts=1, boundary_ratio=None, layers_2=None):
    """WanPipeline without text encoder or VAE (output_type="latent"); ``experts=2``: Wan 2.2 A14B's pair."""
    tr2 = tiny_transformer(layers_2 or layers, seed=1) if experts == 2 else None
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler(),
                                 transformer=tiny_transformer(layers), transformer_2=tr2,
                                 boundary_ratio=boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def t2v_call(pipe, seed=3, steps=STEPS, dtype=None, **extra):
    g = torch.Generator().manual_seed(0)
    dtype = dtype or pipe.transformer.dtype
    kw = dict(prompt_embeds=torch.randn(1, 5, TEXT_DIM, generator=g).to(dtype),
              negative_prompt_embeds=torch.randn(1, 5, TEXT_DIM, generator=g).to(dtype), height=64, width=64,
              num_frames=5, num_inference_steps=steps, guidance_scale=3.0, output_type="latent")
    kw.update(extra)
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).frames


def tiny_vae():
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.1] * 4,
                                     latents_std=[1.5] * 4)
    return randomize_(vae, seed=2).eval()


def i2v_pipeline():
    """WanImageToVideoPipeline (Wan 2.1 I2V): a tiny CLIP vision tower makes the image tokens, a tiny Wan VAE
    encodes the first frame."""
    import transformers

    with torch.random.fork_rng():  # the same image encoder in every pipeline made
        torch.manual_seed(4)
        enc = _clip(transformers)
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    pipe = diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), scheduler=scheduler(),
                                             image_encoder=enc, image_processor=proc,
                                             transformer=tiny_transformer(i2v=True))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip(transformers):
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=IMAGE_DIM, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=8, projection_dim=8)).eval()


def i2v_call(pipe, seed=3, steps=STEPS, **extra):
    """Wan 2.1 I2V's attention takes the last 512 text tokens as the caption (diffusers hard-codes it)."""
    import PIL.Image

    g = torch.Generator().manual_seed(0)
    image = PIL.Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    kw = dict(image=image, prompt_embeds=torch.randn(1, 512, TEXT_DIM, generator=g),
              negative_prompt_embeds=torch.randn(1, 512, TEXT_DIM, generator=g), height=64, width=64,
              num_frames=5, num_inference_steps=steps, guidance_scale=3.0, output_type="latent")
    kw.update(extra)
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).frames


def direct_inputs(seed, i2v=False):
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(2, 12 if i2v else 4, 2, 8, 8, generator=g), timestep=torch.full((2,), 700.0),
              encoder_hidden_states=torch.randn(2, 512 if i2v else 5, TEXT_DIM, generator=g))
    if i2v:
        kw["encoder_hidden_states_image"] = torch.randn(2, 5, IMAGE_DIM, generator=g)
    return kw


T2V = Case(name="wan-t2v", make_pipeline=t2v_pipeline, call=t2v_call, make_model=tiny_transformer,
           inputs=direct_inputs, lists=("blocks",))
I2V = Case(name="wan-i2v", make_pipeline=i2v_pipeline, call=i2v_call, make_model=lambda: tiny_transformer(i2v=True),
           inputs=lambda seed: direct_inputs(seed, i2v=True), lists=("blocks",))


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_wan_t2v(check):
    check(T2V)


@pytest.mark.parametrize("check", CHECKS[:4], ids=lambda c: c.__name__)
def test_wan_i2v(check):
    check(I2V)


def test_i2v_blocks_see_the_image_tokens_and_the_exit_keeps_the_conditioning():
    """The I2V condition reaches the blocks only as keyword-free inputs the exit hooks pass through: image tokens
    first in ``encoder_hidden_states`` (5 CLIP tokens, then the 512 caption tokens), and the first frame through
    ``patch_embedding`` (12 channels in). At depth 1 the output still depends on the image."""
    pipe = i2v_pipeline()
    model = pipe.transformer
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append([tuple(x.shape) for x in a[:3]]))
    i2v_call(pipe, steps=1)
    assert seen[0] == [(1, 32, 16), (1, 517, 16), (1, 6, 16)]
    eekernels.accelerate(pipe, schedule=ExitSchedule.piecewise([1] * 10, total_depth=3))
    one = i2v_call(pipe)
    kw = direct_inputs(0, i2v=True)
    with torch.no_grad(), inplace.at_depth(model, 1):
        a = output(model(**kw))
        kw["encoder_hidden_states_image"] = kw["encoder_hidden_states_image"] + 1
        b = output(model(**kw))
    assert not torch.equal(a, b)
    eekernels.disable(pipe)
    assert not torch.equal(one, i2v_call(pipe))


def test_video_to_video_runs_the_schedule_at_the_steps_strength_keeps():
    """``WanVideoToVideoPipeline`` (a tiny Wan VAE encodes the input video; strength 0.7 of 5 steps leaves the last
    3): full depth equals the plain pipeline bit for bit, and each call runs the schedule's depth at the timestep the
    pipeline passes (seen by the step-end callback), cond and uncond."""
    import PIL.Image

    def make():
        pipe = diffusers.WanVideoToVideoPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(),
                                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0),
                                                 transformer=tiny_transformer())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    frames = [PIL.Image.fromarray((np.random.RandomState(i).rand(64, 64, 3) * 255).astype("uint8")) for i in range(5)]
    seen_t = []

    def run(pipe):
        def step_end(p, i, t, kw):
            seen_t.append(float(t))
            return {}

        g = torch.Generator().manual_seed(0)
        emb, neg = (torch.randn(1, 5, TEXT_DIM, generator=g) for _ in range(2))
        return pipe(video=frames, prompt_embeds=emb, negative_prompt_embeds=neg, height=64, width=64, strength=0.7,
                    num_inference_steps=5, guidance_scale=3.0, output_type="latent", callback_on_step_end=step_end,
                    generator=torch.Generator().manual_seed(3)).frames

    want = run(make())
    pipe = make()
    schedule = ExitSchedule.piecewise([3, 3, 3, 3, 3, 2, 2, 1, 1, 1])
    eekernels.accelerate(pipe, schedule=schedule)
    with inplace.at_depth(pipe.transformer, None):
        assert torch.equal(run(pipe), want)
    seen_t.clear()
    ran = _Ran(pipe.transformer)
    run(pipe)
    assert len(seen_t) == 3
    depths = [schedule.table[min(9, int(t // 100))] for t in seen_t]
    assert ran.depths() == [d for d in depths for _ in range(2)] and len(set(depths)) > 1


# --------------------------------------------------------------------------------------------------
# Wan 2.2's two experts
# --------------------------------------------------------------------------------------------------
BOUNDARY = 0.8  # at 3 steps (t = 999, 857, 600): transformer, transformer, transformer_2


def _expert_counts(pipe):
    """Per model call: (expert, blocks that ran), seen by torch pre-hooks on the blocks' submodules."""
    calls = []
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name)
        ran = _Ran(model)
        model.register_forward_pre_hook(lambda *a, n=name, r=ran: calls.append((n, r)))
    return calls


def _depths(calls):
    """(expert, depth) per model call, in call order."""
    per_expert = {}
    for name, ran in calls:
        per_expert.setdefault(name, iter(ran.depths()))
    return [(name, next(per_expert[name])) for name, _ in calls]


def test_two_experts_full_depth_is_bit_identical_and_both_are_kept():
    pipe = t2v_pipeline(experts=2, boundary_ratio=BOUNDARY, layers_2=2)
    want = t2v_call(pipe)
    models = pipe.transformer, pipe.transformer_2
    assert eekernels.accelerate(pipe) is pipe
    assert (pipe.transformer, pipe.transformer_2) == models
    assert [inplace.controller(m).num_blocks for m in models] == [3, 2]
    assert torch.equal(t2v_call(pipe), want)
    eekernels.disable(pipe)
    assert all(inplace.controller(m) is None for m in models)
    assert torch.equal(t2v_call(pipe), want)


def test_each_expert_runs_its_own_depth_at_the_steps_the_boundary_gives_it():
    """Counted per model call (cond and uncond) by pre-hooks on the blocks, against a hand computation of the
    pipeline's rule (t >= boundary_ratio * 1000: transformer) and each expert's table, and against
    ``inplace.plan``."""
    pipe = t2v_pipeline(experts=2, boundary_ratio=BOUNDARY, layers_2=2)
    s1 = ExitSchedule.piecewise([3, 3, 3, 3, 3, 3, 3, 3, 2, 1])  # t in [800, 900): 2 blocks, [900, 1000): 1
    s2 = ExitSchedule.piecewise([2, 2, 2, 2, 2, 2, 1, 2, 2, 2], total_depth=2)  # t in [600, 700): 1 block
    eekernels.accelerate(pipe, schedule={"transformer": s1, "transformer_2": s2})
    calls = _expert_counts(pipe)
    t2v_call(pipe)
    got = _depths(calls)
    ts = pipe.scheduler.timesteps.tolist()
    assert ts == [999, 857, 600]
    hand = []
    for t in ts:
        name, table = ("transformer", s1.table) if t >= BOUNDARY * 1000 else ("transformer_2", s2.table)
        hand += [(name, table[int(t) // 100])] * 2  # cond and uncond
    assert got == hand == [("transformer", 1)] * 2 + [("transformer", 2)] * 2 + [("transformer_2", 1)] * 2
    planned = inplace.plan(pipe, STEPS)
    assert [(s.denoiser, s.depth) for s in planned for _ in range(2)] == got
    assert [s.num_blocks for s in planned] == [3, 3, 2] and [s.t for s in planned] == ts
    # another step count: the plan follows the scheduler's timesteps; the pipeline's scheduler is left alone
    six = inplace.plan(pipe, 6)
    assert pipe.scheduler.timesteps.tolist() == ts
    assert [s.denoiser for s in six] == ["transformer" if s.t >= 800 else "transformer_2" for s in six]
    calls = _expert_counts(pipe)
    t2v_call(pipe, steps=6)
    assert _depths(calls) == [(s.denoiser, s.depth) for s in six for _ in range(2)]


def test_one_depth_per_expert_equals_the_experts_cut_by_hand():
    pipe = t2v_pipeline(experts=2, boundary_ratio=BOUNDARY, layers_2=3)
    ref = copy.deepcopy(pipe)
    ref.transformer = sliced(T2V, ref.transformer, 1)
    ref.transformer_2 = sliced(T2V, ref.transformer_2, 2)
    want = t2v_call(ref)
    eekernels.accelerate(pipe, schedule={"transformer": ExitSchedule.piecewise([1] * 10, total_depth=3),
                                         "transformer_2": ExitSchedule.piecewise([2] * 10, total_depth=3)})
    assert torch.equal(t2v_call(pipe), want)


def test_wan21_has_one_expert_and_plan_refuses_what_it_cannot_say():
    pipe = t2v_pipeline()  # Wan 2.1: transformer_2=None, boundary_ratio=None
    with pytest.raises(ValueError, match="`pipe` expected a pipeline accelerated in place"):
        inplace.plan(pipe, 3)
    eekernels.accelerate(pipe, schedule=ExitSchedule.piecewise([3, 3, 3, 3, 3, 3, 2, 2, 1, 1]))
    assert pipe.transformer_2 is None
    calls = _Ran(pipe.transformer)
    t2v_call(pipe)
    planned = inplace.plan(pipe, STEPS)
    assert [(s.denoiser, s.depth) for s in planned] == [("transformer", 1), ("transformer", 1), ("transformer", 2)]
    assert calls.depths() == [s.depth for s in planned for _ in range(2)]
    # a Wan 2.2 pipeline whose low-noise expert is missing: the step that needs it is named
    two = t2v_pipeline(experts=2, boundary_ratio=BOUNDARY)
    two.transformer_2 = None
    eekernels.accelerate(two)
    with pytest.raises(ValueError, match=r"step 2 \(t=600\) calls the pipeline's `transformer_2`, which is None"):
        inplace.plan(two, STEPS)


def test_the_wan_route_is_the_pipelines_rule():
    pipe = t2v_pipeline(experts=2, boundary_ratio=0.875)
    route = families.get("wan").route
    assert [route(pipe, t) for t in (999.0, 875.0, 874.9, 0.0)] == ["transformer", "transformer", "transformer_2",
                                                                     "transformer_2"]
    assert route(t2v_pipeline(), 0.0) == "transformer"  # no boundary: Wan 2.1


# --------------------------------------------------------------------------------------------------
# Presets: about 0.7 of the block FLOPs under each model's default scheduler
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,shift,steps,blocks,want", [
    ("ase-wan", 3.0, 50, 30, 0.707),  # Wan 2.1 T2V-1.3B, 480p
    ("ase-wan", 3.0, 50, 40, 0.707),  # Wan 2.1 14B: rescaled
    ("ase-wan2.2", 12.0, 40, 40, 0.70),  # Wan 2.2 T2V-A14B, both experts
])
def test_preset_block_fraction(preset, shift, steps, blocks, want):
    sched = scheduler(shift)
    sched.set_timesteps(steps)
    s = ExitSchedule.preset(preset, total_depth=blocks)
    depths = s.plan(sched.timesteps.to(torch.float64))
    frac = depths.double().mean().item() / blocks
    assert abs(frac - want) < 0.01, frac


# --------------------------------------------------------------------------------------------------
# diffusers' operations on the accelerated pipeline
# --------------------------------------------------------------------------------------------------
SCHEDULE = ExitSchedule.piecewise([3, 3, 3, 3, 3, 3, 2, 2, 1, 1])  # depths 1, 1, 2 at the 3 steps


def _accelerated(**kw):
    pipe = t2v_pipeline(**kw)
    eekernels.accelerate(pipe, schedule=SCHEDULE)
    return pipe


def _check(pipe, want, **kw):
    """Full depth gives ``want`` (the plain pipeline after the same operation); the schedule's depths run; after
    ``disable`` the plain pipeline's output again."""
    with inplace.at_depth(pipe.transformer, None):
        got = t2v_call(pipe, **kw)
    assert torch.equal(got, want), (got - want).abs().max()
    ran = _Ran(pipe.transformer)
    t2v_call(pipe, **kw)
    assert ran.depths() == [1, 1, 1, 1, 2, 2]
    eekernels.disable(pipe)
    assert torch.equal(t2v_call(pipe, **kw), want)


def test_save_pretrained_round_trip(tmp_path):
    pipe = t2v_pipeline(experts=2, boundary_ratio=BOUNDARY)
    eekernels.accelerate(pipe, schedule={"transformer": SCHEDULE, "transformer_2": SCHEDULE})
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.WanPipeline.from_pretrained(tmp_path, tokenizer=None, text_encoder=None, vae=None)
    loaded.set_progress_bar_config(disable=True)
    for name in ("transformer", "transformer_2"):
        a, b = getattr(pipe, name), getattr(loaded, name)
        assert type(b) is type(a) and inplace.controller(b) is None and not getattr(b, "_diffusers_hook", None)
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.config.boundary_ratio == BOUNDARY
    want = t2v_call(loaded)
    with inplace.at_depth(pipe.transformer, None), inplace.at_depth(pipe.transformer_2, None):
        assert torch.equal(t2v_call(pipe), want)


def _write_lora(path, seed):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    tr = tiny_transformer()
    torch.manual_seed(seed)
    tr.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                              target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.2"]))
    diffusers.WanPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(tr))
    return path


def test_load_lora_weights_into_both_experts(tmp_path):
    """The Wan LoRA loader: into ``transformer``, and with ``load_into_transformer_2=True`` into the low-noise
    expert."""
    lora = _write_lora(tmp_path, 7)
    plain = t2v_pipeline(experts=2, boundary_ratio=BOUNDARY)
    before = t2v_call(plain)
    plain.load_lora_weights(lora)
    plain.load_lora_weights(lora, load_into_transformer_2=True)
    want = t2v_call(plain)
    assert not torch.equal(want, before)
    pipe = t2v_pipeline(experts=2, boundary_ratio=BOUNDARY)
    eekernels.accelerate(pipe, schedule={"transformer": SCHEDULE, "transformer_2": SCHEDULE})
    pipe.load_lora_weights(lora)
    pipe.load_lora_weights(lora, load_into_transformer_2=True)
    assert pipe.transformer.peft_config and pipe.transformer_2.peft_config
    with inplace.at_depth(pipe.transformer, None), inplace.at_depth(pipe.transformer_2, None):
        assert torch.equal(t2v_call(pipe), want)
    calls = _expert_counts(pipe)
    t2v_call(pipe)
    assert _depths(calls) == [(s.denoiser, s.depth) for s in inplace.plan(pipe, STEPS) for _ in range(2)]
    eekernels.disable(pipe)
    assert torch.equal(t2v_call(pipe), want)


def test_set_attn_processor():
    operations.set_attn_processor(T2V)


def test_i2v_set_attn_processor():
    """I2V's processors also read the image tokens' own K/V projections."""
    operations.set_attn_processor(I2V)


def test_save_load_round_trip_one_expert(tmp_path):
    operations.save_load_round_trip(T2V, tmp_path)


def test_load_lora_weights_one_expert(tmp_path):
    operations.load_lora_weights(T2V, tmp_path, targets=("to_q", "to_k", "to_v", "to_out.0", "ffn.net.2"))


def test_fuse_qkv_projections():
    plain = t2v_pipeline()
    plain.transformer.fuse_qkv_projections()
    want = t2v_call(plain)
    pipe = _accelerated()
    pipe.transformer.fuse_qkv_projections()
    assert any(hasattr(m, "to_qkv") for m in pipe.transformer.modules())
    _check(pipe, want)


def test_pipe_to_bfloat16():
    operations.pipe_to_dtype(T2V, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Fused ops in place
# --------------------------------------------------------------------------------------------------
def test_what_the_patches_replace_in_a_wan_transformer():
    """The feed-forward's Linear + GELU(tanh) in every block and the caption projection are replaced; the block's
    LayerNorms (modulated inside ``WanTransformerBlock.forward``, which no rule sees), the all-heads QK RMSNorms and
    the image embedder's erf GELU are not (I2V's model: every module kind)."""
    patched_equals_plain(I2V, {"linear_gelu_tanh": 3, "text_projection_gelu_tanh": 1},
                         {"FP32LayerNorm", "RMSNorm", "GELU"})


# --------------------------------------------------------------------------------------------------
# diffusers' context parallelism: two processes on the CPU (gloo)
# --------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


def test_context_parallel_two_processes(tmp_path):
    """``torchrun --nproc_per_node=2 benchmarks/wan_context_parallel.py`` (see its docstring for each check):
    Ulysses context parallelism with Wan in place equals plain CP at full depth bit for bit and the single process
    at every depth and with the cache policy; both ranks run the schedule's depth at every pipeline call. What
    diffusers 0.42 refuses on the CPU is pinned here: ``enable_parallelism`` divides by
    ``torch.accelerator.device_count()`` (0 on a CPU-only torch), and ring attention needs the log-sum-exp that
    the only CPU backend does not return; if either changes, the script's docstring and RESULTS.md must too."""
    out = tmp_path / "cp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "benchmarks" / "wan_context_parallel.py"), "--device", "cpu", "--attention", "ulysses,ring",
           "--allow-refused", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and res["device"] == "cpu"
    assert res["cpu_enable_parallelism"] == "ZeroDivisionError: integer modulo by zero"
    checks = res["modes"]["ulysses"]["checks"]
    assert set(checks) == {"plain", "full", "depth_1", "depth_2", "depth_3", "graphs", "cache", "pipeline_depths",
                           "pipeline"}
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["full"]["exact"] and checks["full"]["max_abs_diff"] == 0
    depths = checks["pipeline_depths"]
    assert depths["per_rank"] == [depths["schedule"]] * 2 and len(set(depths["schedule"])) > 1
    assert "parallelism" in checks["graphs"]["reason"]
    assert "return_lse" in res["modes"]["ring"]["refused"]
