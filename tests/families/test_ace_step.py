"""ACE-Step 1.5 in place (issue 22): the harness checks and the diffusers operations on a tiny ``AceStepPipeline``,
early exit on a 1-D latent (B, T, C).

Tiny and random: 2 blocks of width 32, 8 latent frames of 4 channels (0.32 s at the pipeline's 25 frames per second;
no VAE, ``output_type="latent"``), 3 steps, CFG batched; a word-level tokenizer and a one-layer Qwen3 text encoder
built here, a one-layer condition encoder. Every parameter of the transformer is randomized.
"""
import pytest
import torch

import diffusers
import eekernels
from eekernels import ExitSchedule, inplace
from tests.families import operations
from tests.families.harness import CHECKS, Case, block_fraction, patched_equals_plain, record_depths
from tests.models._reference_models import randomize_

H, A, D_TXT = 32, 4, 16


def make_model(layers=2):
    m = diffusers.AceStepTransformer1DModel(
        hidden_size=H, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, in_channels=3 * A, audio_acoustic_hidden_dim=A, patch_size=2, sliding_window=4)
    return randomize_(m).eval()


def _tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "a b c d e f g h en the music lyrics caption instrumental".split()
    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def make_pipeline():
    import transformers
    from diffusers.pipelines.ace_step.modeling_ace_step import AceStepConditionEncoder

    with torch.random.fork_rng():  # the same encoders in every pipeline made
        torch.manual_seed(5)
        text = transformers.Qwen3Model(transformers.Qwen3Config(
            vocab_size=16, hidden_size=D_TXT, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8)).eval()
        cond = AceStepConditionEncoder(
            hidden_size=H, intermediate_size=64, text_hidden_dim=D_TXT, timbre_hidden_dim=A,
            num_lyric_encoder_hidden_layers=1, num_timbre_encoder_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, sliding_window=4).eval()
    # the pipeline's own scheduler setting: timesteps are sigma in [0, 1]
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    pipe = diffusers.AceStepPipeline(vae=None, text_encoder=text, tokenizer=_tokenizer(), transformer=make_model(),
                                     condition_encoder=cond, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, seed):
    """Shift 1: 3 steps at sigma 1, 2/3, 1/3 (t = 1000, 667, 333), in different bins of the harness's schedule."""
    return pipe(prompt="a b c music", lyrics="d e f", audio_duration=0.32, num_inference_steps=3, shift=1.0,
                guidance_scale=3.0, output_type="latent", generator=torch.Generator().manual_seed(seed)).audios


def inputs(seed, sigma=0.5):
    g = torch.Generator().manual_seed(seed)
    t = torch.full((2,), sigma)
    return dict(hidden_states=torch.randn(2, 8, A, generator=g), timestep=t, timestep_r=t,
                encoder_hidden_states=torch.randn(2, 5, H, generator=g),
                context_latents=torch.randn(2, 8, 2 * A, generator=g))


CASE = Case(name="ace_step", make_pipeline=make_pipeline, call=call, make_model=make_model, inputs=inputs,
            lists=("layers",))


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_ace_step(check):
    check(CASE)


def test_ace_step_output_keeps_the_1d_latent_shape_at_every_depth():
    """An odd length (7 frames: padded to the patch size inside) comes back as 7 frames at every depth."""
    model = make_model()
    eekernels.accelerate(model)
    kw = inputs(0)
    kw["hidden_states"], kw["context_latents"] = kw["hidden_states"][:, :7], kw["context_latents"][:, :7]
    for d in (1, 2):
        with torch.no_grad(), inplace.at_depth(model, d):
            assert model(**kw).sample.shape == (2, 7, A)


def test_ace_step_direct_call_depth_reads_sigma():
    """The model's ``timestep`` is sigma in [0, 1]: a direct call at sigma runs the schedule's depth at
    t = 1000 sigma."""
    from tests.test_inplace_diffusers import _Ran

    model = make_model()
    eekernels.accelerate(model, schedule=ExitSchedule.piecewise([2] * 5 + [1] * 5))
    ran = _Ran(model)
    with torch.no_grad():
        for sigma in (0.95, 0.05, 0.55, 0.45):
            model(**inputs(0, sigma))
    assert ran.depths() == [1, 2, 1, 2]


def test_ace_step_steps_are_1000_sigma_in_the_loop_and_in_plan():
    """The scheduler counts sigma in [0, 1] (``step_t=scaled_step_t(1000.0)``): the loop reads the 3 steps' depths
    at t = 1000, 666.7, 333.3 (one batched-CFG call per step), and ``inplace.plan`` reports the same."""
    pipe = make_pipeline()
    eekernels.accelerate(pipe, schedule=ExitSchedule.piecewise([1] * 5 + [2] * 5))
    seen = record_depths(pipe.transformer, with_t=True)
    call(pipe, 3)
    assert [t for t, _ in seen] == pytest.approx([1000.0, 2000 / 3, 1000 / 3]) and [d for _, d in seen] == [2, 2, 1]
    assert [(p.t, p.depth) for p in inplace.plan(pipe)] == seen


def test_ace_step_save_load(tmp_path):
    operations.save_load_round_trip(CASE, tmp_path)


def test_ace_step_lora(tmp_path):
    operations.load_lora_weights(CASE, tmp_path)


def test_ace_step_set_attn_processor():
    operations.set_attn_processor(CASE)


def test_ace_step_to_dtype():
    operations.pipe_to_dtype(CASE)


@pytest.mark.parametrize("steps,want", [(8, 0.698), (50, 0.736)])
def test_ace_step_preset_block_fraction(steps, want):
    """"ase-ace-step" under the pipeline's own schedule (shift 3; 8 steps, its default) in eekernels' t."""
    pipe = make_pipeline()
    sigmas = pipe._get_timestep_schedule(num_inference_steps=steps, shift=3.0, dtype=torch.float64)
    assert abs(block_fraction("ase-ace-step", sigmas * 1000) - want) < 0.005


def test_what_the_patches_replace_in_an_ace_step_transformer():
    """Every diffusers ``RMSNorm`` (the blocks' three, the QK norms, ``norm_out``: 15 in this model) is replaced; the
    modulations around them are written inline in ``AceStepTransformerBlock.forward`` (no rule sees them)."""
    patched_equals_plain(CASE, {"rms_norm": 15}, set())
