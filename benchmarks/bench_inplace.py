"""The in-place tier on the CPU (issues 21, 22): throughput and final-latent difference per family, ONE process.

    python benchmarks/bench_inplace.py              # full mode: benchmarks/results/bench_inplace.json, RESULTS.md
    python benchmarks/bench_inplace.py --quick      # CI size (tests/test_bench_inplace.py): tiny models, seconds
    python benchmarks/bench_inplace.py --gpu-shapes # issue 22's three full-size shapes on CUDA (see gpu_shapes)

For each family of ``BENCH`` (DiTPipeline, DDIMPipeline, PixArtAlphaPipeline, StableDiffusion3Pipeline,
FluxPipeline, QwenImagePipeline, QwenImage21Pipeline, ZImagePipeline, CogVideoXPipeline, HunyuanVideo15Pipeline, and
Flux2, Chroma, HiDream, Sana, Lumina 2, Wan, LTX-2, Cosmos, ACE-Step built by their family tests; a family is one
``Bench`` entry: its pipeline and a builder at the shapes), one random pipeline (every parameter randomized as the tests do; one config scale for all families, printed with the table)
and one call (same seed, batch, steps), run by every row below. Each row is its own deep copy of the pipeline.

| row | what runs |
| --- | --- |
| plain | the diffusers pipeline as built |
| in place full | ``eekernels.accelerate(pipe)``: the same model object with exit hooks, schedule None |
| in place ~0.7 | ``accelerate(pipe, schedule)``: the ASE shape (full depth near the data, shallower toward noise) scaled until the blocks counted over the run are nearest ``--target`` |
| native ~0.7 | ``accelerate(pipe, schedule, native=True)``: eekernels' fused model of the family, same schedule |
| FirstBlockCache | diffusers' ``FirstBlockCacheConfig(threshold)`` on the transformer (``enable_cache``; ``apply_first_block_cache`` for classes without CacheMixin), the threshold searched until its counted blocks are nearest the in-place row's |
| TaylorSeer | diffusers' ``TaylorSeerCacheConfig``: on a predicted step every block of the family's lists is skipped (``skip_predict_identifiers``) and the model's last module is predicted by a first-order Taylor series (``cache_identifiers``), the layout of diffusers' lite mode named for the family; ``cache_interval`` and ``disable_cache_before_step`` chosen so that the computed steps are nearest the in-place row's fraction |
| MagCache | diffusers' ``MagCacheConfig``: magnitude ratios calibrated on this pipeline (``calibrate=True``, one run), then the threshold searched as FirstBlockCache's (``max_skip_steps`` 3, ``retention_ratio`` 0.2) |
| DeepCache (U-Net) | diffusers has no cache for ``UNet2DModel`` (no CacheMixin; its caches hook transformer blocks, FirstBlockCache needs ``TransformerBlockRegistry`` classes); the peer is the DeepCache package's ``DeepCacheSDHelper(interval, branch)``, the setting nearest in FLOPs |

A cache diffusers cannot run on a family (its block class not in ``TransformerBlockRegistry``, a model without
CacheMixin whose blocks diffusers' hooks misread) is not a row: the notes give diffusers' own error.

Counting. Transformer blocks run are counted by forward hooks on each block's first attention module (a skipped
block never calls it: eekernels' hooks, FirstBlockCache's, MagCache's and TaylorSeer's skip hooks all bypass the
block's forward); the native tier's
by the depth its model receives per call. U-Net: "blocks" are resolution levels of unequal cost, so its fraction
counts FLOPs (``torch.utils.flop_counter``, the whole run), not levels. Every row also reports the FLOPs of its
whole run over plain's (GEMMs, convolutions and, through a mapping added here, the CPU attention kernel): the
ideal time ratio if time scaled with FLOPs.

Timing: ``--rounds`` rounds after a warm-up; each round runs every row once (the order rotated per round), so load
from other processes falls on all rows alike. Per row: median and min-max of the wall time, and the median of its
per-round ratio to plain's time in the same round (and the process CPU time's median, less sensitive to other
load). ``torch.set_num_threads(--threads)``, float32, ``torch.no_grad()``.

Final latents: the last scheduler step's ``prev_sample`` (the denoised latents before decoding; DiT and DDIM have
no latent output type), relative difference ``||x - x_plain|| / ||x_plain||`` in float64 against plain full depth.
Random weights: the differences say how far each method moves the result, not image quality.

Hook overhead (``hook_overhead``): microseconds per call of the model's hook and of a block's hook at full depth,
timed with the modules' own compute swapped for a no-op (a difference of a few microseconds cannot be read off
seconds-long runs on a shared machine), and their share of a plain run's CPU time.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "bench_inplace.json"
GPU_RESULT = ROOT / "benchmarks" / "results" / "bench_inplace_gpu.json"


@dataclass(frozen=True)
class Shapes:
    """One config scale for every family: width (heads x head_dim), blocks (FLUX: ``double`` of them double-stream),
    latent side (patch 2, or FLUX's 2x2 packing: (latent / 2)^2 image tokens), caption tokens, images per call.
    The U-Net (pixel space) has its own channels per level, at ``unet_sample`` pixels."""

    heads: int
    head_dim: int
    blocks: int
    double: int
    latent: int
    tokens: int
    batch: int
    steps: int
    unet_channels: tuple
    unet_layers: int
    unet_sample: int
    unet_groups: int

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


FULL = Shapes(heads=4, head_dim=64, blocks=8, double=3, latent=16, tokens=16, batch=2, steps=16,
              unet_channels=(64, 128, 256, 256), unet_layers=2, unet_sample=32, unet_groups=32)
QUICK = Shapes(heads=2, head_dim=16, blocks=4, double=2, latent=8, tokens=7, batch=2, steps=4,
               unet_channels=(8, 16, 16), unet_layers=1, unet_sample=16, unet_groups=4)


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    family: str
    pipe: object
    kwargs: dict
    denoiser: str  # the pipeline's attribute


def _rope_axes(head_dim: int) -> tuple:
    """Three even RoPE axes (frame, height, width) summing to ``head_dim``, in the real models' proportions."""
    h = 3 * head_dim // 8 // 2 * 2
    return (head_dim - 2 * h, h, h)


def _captions(s: Shapes, dtype=torch.long):
    """Caption and negative-caption embeddings (batch, tokens, width) and a mask with the last token padded."""
    g = torch.Generator().manual_seed(11)
    emb, neg = torch.randn(2, s.batch, s.tokens, s.width, generator=g)
    mask = torch.ones(s.batch, s.tokens, dtype=dtype)
    mask[:, -1] = 0
    return emb, neg, mask


def _qwenimage(s: Shapes):
    """Qwen-Image: 16 latent channels packed 2x2, true CFG (cond and uncond are two model calls per step), the
    model's own scheduler config."""
    import diffusers
    from bench_text_pipelines import _randomize
    from tests.families.test_qwenimage import SCHEDULER

    tr = _randomize(diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=s.blocks, attention_head_dim=s.head_dim,
        num_attention_heads=s.heads, joint_attention_dim=s.width, axes_dims_rope=_rope_axes(s.head_dim)), 0)
    pipe = diffusers.QwenImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=None,
                                       text_encoder=None, tokenizer=None, transformer=tr)
    emb, neg, mask = _captions(s)
    return pipe, dict(prompt_embeds=emb, prompt_embeds_mask=mask, negative_prompt_embeds=neg,
                      negative_prompt_embeds_mask=mask.clone(), true_cfg_scale=4.0, height=8 * s.latent,
                      width=8 * s.latent, num_inference_steps=s.steps, output_type="latent")


def _qwenimage21(s: Shapes):
    """Qwen-Image 2.1: 16 latent channels, patch 1 over a 16x VAE (the same (latent / 2)^2 image tokens at
    8 * latent pixels), true CFG as two calls, ``use_kv_cache=False`` (every call runs the whole joint sequence);
    its processor is the tests' in-memory chat template (no torchvision here)."""
    import diffusers
    from bench_text_pipelines import _randomize
    from tests.families.test_qwenimage21 import SCHEDULER, ChatTemplate

    tr = _randomize(diffusers.QwenImage21Transformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=s.blocks, attention_head_dim=s.head_dim,
        num_attention_heads=s.heads, context_in_dim=s.width, axes_dims_rope=_rope_axes(s.head_dim)), 0)
    pipe = diffusers.QwenImage21Pipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=None,
                                         text_encoder=None, processor=ChatTemplate(), transformer=tr)
    emb, neg, mask = _captions(s, torch.bool)
    return pipe, dict(prompt_embeds=emb, prompt_embeds_mask=mask, negative_prompt_embeds=neg,
                      negative_prompt_embeds_mask=mask.clone(), true_cfg_scale=4.0, height=8 * s.latent,
                      width=8 * s.latent, num_inference_steps=s.steps, output_type="latent", use_kv_cache=False)


def _zimage(s: Shapes):
    """Z-Image: 16 latent channels, patch 2, two noise and two context refiner layers (always run), CFG in the
    batch, the scheduler's shift 3."""
    import diffusers
    from bench_text_pipelines import _randomize

    tr = _randomize(diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=s.width, n_layers=s.blocks,
        n_refiner_layers=2, n_heads=s.heads, n_kv_heads=s.heads, cap_feat_dim=s.width,
        axes_dims=list(_rope_axes(s.head_dim))), 0)
    pipe = diffusers.ZImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                                    text_encoder=None, tokenizer=None, transformer=tr)
    emb, neg, _ = _captions(s)
    return pipe, dict(prompt_embeds=list(emb), negative_prompt_embeds=list(neg), guidance_scale=4.0,
                      height=8 * s.latent, width=8 * s.latent, num_inference_steps=s.steps, output_type="latent")


def _cogvideox(s: Shapes):
    """CogVideoX: 16 latent channels, patch 2, 9 video frames (3 latent frames of (latent / 2)^2 tokens each),
    RoPE, CFG in the batch, its DDIM scheduler."""
    import diffusers
    from bench_text_pipelines import _randomize

    tr = _randomize(diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=s.heads, attention_head_dim=s.head_dim, in_channels=16, out_channels=16,
        time_embed_dim=s.width, text_embed_dim=s.width, num_layers=s.blocks, sample_width=s.latent,
        sample_height=s.latent, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=s.tokens, use_rotary_positional_embeddings=True), 0)
    pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr,
                                       scheduler=diffusers.CogVideoXDDIMScheduler())
    emb, neg, _ = _captions(s)
    return pipe, dict(prompt_embeds=emb, negative_prompt_embeds=neg, guidance_scale=3.0, num_frames=9,
                      height=8 * s.latent, width=8 * s.latent, num_inference_steps=s.steps, output_type="latent")


def _hunyuanvideo15(s: Shapes):
    """HunyuanVideo 1.5: the family test's tiny model and VAE (width 16; both text encoders' embeddings, 3 frames at
    16 px) with ``s.blocks`` blocks and ``s.steps`` steps; CFG by diffusers' guider, two calls per step."""
    import diffusers
    from diffusers.guiders import ClassifierFreeGuidance

    from tests.families import test_hunyuanvideo15 as t

    pipe = diffusers.HunyuanVideo15Pipeline(
        text_encoder=None, tokenizer=None, transformer=t.make_model(s.blocks), vae=t.make_vae(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), text_encoder_2=None, tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=3.0))
    pipe.vision_num_semantic_tokens = 4  # as the test: 729 image tokens cut to 4 (no image encoder)
    g = torch.Generator().manual_seed(0)
    pos, neg = t._text(g, torch.float32), t._text(g, torch.float32)
    return pipe, dict(**pos, **{f"negative_{k}": v for k, v in neg.items()}, height=16, width=16, num_frames=3,
                      num_inference_steps=s.steps, output_type="latent")


def _call_kwargs(call, pipe, seed: int = 3) -> dict:
    """The keyword arguments a family test's ``call(pipe, seed)`` passes to ``pipe`` (captured, nothing run; its
    generator dropped: every row here gets its own)."""

    class Captured(Exception):
        pass

    class Capture:  # the pipeline as the test sees it: its attributes and class, but a call that records
        __class__ = property(lambda self: type(pipe))

        def __getattr__(self, name):
            return getattr(pipe, name)

        def __setattr__(self, name, value):
            setattr(pipe, name, value)

        def __call__(self, *args, **kwargs):
            raise Captured(kwargs)

    try:
        call(Capture(), seed)
    except Captured as e:
        kw = dict(e.args[0])
    else:
        raise RuntimeError(f"{call.__qualname__} did not call its pipeline")
    kw.pop("generator", None)
    return kw


def _from_test(module: str, pipeline: str, call: str, config, size=None):
    """A family's entry built by its test (tests/families/test_<module>.py): ``pipeline()`` the tiny pipeline and
    ``call(pipe, seed)`` its call, with ``s.steps`` steps; the transformer rebuilt from the test's config updated
    by ``config(s)`` (the shapes' blocks, heads and head width; caption widths stay the test's, as its embeddings)
    and every parameter drawn as every other entry's; ``size(s)``: call arguments that set the shapes' tokens."""

    def make(s: Shapes):
        import importlib

        from bench_text_pipelines import _randomize

        t = importlib.import_module(f"tests.families.test_{module}")
        pipe = getattr(t, pipeline)()
        tr = pipe.transformer
        pipe.transformer = _randomize(type(tr).from_config({**tr.config, **config(s)}), 0)
        kw = _call_kwargs(getattr(t, call), pipe)
        kw.update(num_inference_steps=s.steps, **(size(s) if size is not None else {}))
        return pipe, kw

    return make


def _heads(s: Shapes, heads="num_attention_heads", dim="attention_head_dim") -> dict:
    return {heads: s.heads, dim: s.head_dim}


def _px(scale: int):
    """Height and width in pixels for ``s.latent`` latent pixels a side at VAE scale ``scale``."""
    return lambda s: dict(height=scale * s.latent, width=scale * s.latent)


@dataclass(frozen=True)
class Bench:
    """A family's entry in the table: its pipeline class; ``make(shapes) -> (pipeline, call kwargs)`` (None: the
    five of issue 21, built in :func:`build`); how its call does CFG; ``output_module``: the model's last module
    (``re.fullmatch`` on module names), the one TaylorSeer predicts while the blocks are skipped."""

    pipeline: str
    make: object = None
    cfg: str = "CFG (model batch x2)"
    output_module: str = "proj_out"
    size: str = ""  # the model's size where it is not the shapes' (printed instead of width, tokens, batch;
    # ``str.format``ted with the shapes' fields, ``patched``: (latent / 2)^2, ``half``: latent / 2)
    scaled: bool = False  # the model has the shapes' width (printed before ``size``)


BENCH = {
    "dit": Bench("DiTPipeline", output_module="proj_out_2"),
    "ddim": Bench("DDIMPipeline", output_module=""),
    "pixart": Bench("PixArtAlphaPipeline"),
    "sd3": Bench("StableDiffusion3Pipeline"),
    "flux": Bench("FluxPipeline", cfg="guidance embedding, no CFG batch"),
    "qwenimage": Bench("QwenImagePipeline", _qwenimage, cfg="true CFG (2 model calls per step)"),
    "qwenimage21": Bench("QwenImage21Pipeline", _qwenimage21, cfg="true CFG (2 model calls per step), no KV cache"),
    "zimage": Bench("ZImagePipeline", _zimage, output_module=r"all_final_layer\..*"),
    "cogvideox": Bench("CogVideoXPipeline", _cogvideox, cfg="CFG (model batch x2), 9 frames (3 latent frames)"),
    "hunyuanvideo15": Bench("HunyuanVideo15Pipeline", _hunyuanvideo15, cfg="CFG by the guider (2 calls per step)",
                            size="the family test's model (width 16 = 2 heads x 8), 3 frames at 16 px (2 latent "
                                 "frames of 4x4), 4 semantic image tokens, batch 1"),
    # issue 22's other families, built by their tests (tests/families/test_<family>.py) at the shapes' blocks and
    # width (caption widths and the audio streams stay the tests')
    "flux2": Bench("Flux2Pipeline", _from_test(
        "flux2", "make_pipeline", "run", lambda s: dict(
            _heads(s), num_layers=s.double, num_single_layers=s.blocks - s.double,
            axes_dims_rope=(s.head_dim // 4,) * 4), _px(1)), cfg="guidance embedding, no CFG", scaled=True,
        size="latents {latent}x{latent} packed 2x2 ({patched} image tokens), the test's 5 caption tokens, batch 2"),
    "chroma": Bench("ChromaPipeline", _from_test(
        "chroma", "make_pipeline", "run", lambda s: dict(
            _heads(s), num_layers=s.double, num_single_layers=s.blocks - s.double,
            axes_dims_rope=_rope_axes(s.head_dim)), _px(1)), cfg="true CFG (2 model calls per step)", scaled=True,
        size="latents {latent}x{latent} packed 2x2 ({patched} image tokens), the test's 5 caption tokens, batch 2"),
    "hidream": Bench("HiDreamImagePipeline", _from_test(
        "hidream", "make_pipeline", "run", lambda s: dict(
            _heads(s), num_layers=s.double, num_single_layers=s.blocks - s.double,
            axes_dims_rope=_rope_axes(s.head_dim), llama_layers=[i % 5 for i in range(s.blocks)])),
        output_module="final_layer", scaled=True, size="the family test's 8x8 latent pixels (16 image tokens; its "
                                                        "pipeline resizes every request to that area), 4 experts, "
                                                        "batch 2"),
    "sana": Bench("SanaPipeline", _from_test(
        "sana", "make_pipeline", "call", lambda s: dict(
            _heads(s), num_cross_attention_heads=s.heads, cross_attention_head_dim=s.head_dim,
            cross_attention_dim=s.width, num_layers=s.blocks), _px(16)), scaled=True, size="latents {half}x{half} (patch 1, 32x VAE: {patched} image tokens), batch 1"),
    "lumina2": Bench("Lumina2Pipeline", _from_test(
        "lumina2", "make_pipeline", "call", lambda s: dict(
            hidden_size=s.width, num_attention_heads=s.heads, num_kv_heads=s.heads, num_layers=s.blocks,
            axes_dim_rope=list(_rope_axes(s.head_dim))), _px(8)), output_module="norm_out", scaled=True,
        size="latents {latent}x{latent} ({patched} image tokens), batch 1"),
    "wan": Bench("WanPipeline", _from_test(
        "wan", "t2v_pipeline", "t2v_call", lambda s: dict(_heads(s), ffn_dim=4 * s.width, num_layers=s.blocks),
        _px(8)), cfg="CFG (model batch x2), 5 frames (2 latent frames)", scaled=True,
        size="Wan 2.1 T2V, latents 2 frames of {latent}x{latent} (2 x {patched} tokens), batch 1"),
    "ltx2": Bench("LTX2Pipeline", _from_test(
        "ltx2", "make_pipeline", "call_t2v", lambda s: dict(_heads(s), cross_attention_dim=s.width,
                                                            num_layers=s.blocks)),
        cfg="CFG batched + STG + modality isolation (3 calls per step)",
        scaled=True, size="the family test's latents: 2 latent frames of 8x8 (128 video tokens) and 5 audio frames "
                          "(audio stream width 8), batch 1"),
    "cosmos": Bench("CosmosTextToWorldPipeline", _from_test(
        "cosmos", "make_pipeline", "call", lambda s: dict(_heads(s), num_layers=s.blocks), _px(8)),
        cfg="CFG (2 model calls per step), 9 frames (2 latent frames)", scaled=True,
        size="Cosmos 1.0, latents 2 frames of {latent}x{latent} (2 x {patched} tokens), batch 1"),
    "ace_step": Bench("AceStepPipeline", _from_test(
        "ace_step", "make_pipeline", "call", lambda s: dict(num_hidden_layers=s.blocks)),
        size="the family test's audio model (width 32, its condition encoder's), 0.32 s of audio, batch 1"),
}
FAMILIES = tuple(BENCH)
PIPELINES = {name: b.pipeline for name, b in BENCH.items()}


def build(family: str, s: Shapes) -> Case:
    """The family's random pipeline and its call (everything but the generator)."""
    import diffusers
    from bench_text_pipelines import _randomize
    from bench_text_pipelines import build as build_text

    if BENCH[family].make is not None:
        pipe, kw = BENCH[family].make(s)
        pipe.set_progress_bar_config(disable=True)
        return Case(family, pipe, kw, "transformer")
    if family in ("pixart", "sd3", "flux"):
        ns = SimpleNamespace(heads=s.heads, head_dim=s.head_dim, caption_dim=s.width, pooled_dim=s.width,
                             blocks=s.blocks, double=s.double, size=s.latent, qk_norm=False, dual_layers=0,
                             dtype="float32", device="cpu", batch=s.batch, tokens=s.tokens, steps=s.steps)
        pipe, kw = build_text(family, ns)
        kw["output_type"] = "latent"
        return Case(family, pipe, kw, "transformer")
    if family == "dit":
        tr = _randomize(diffusers.DiTTransformer2DModel(
            num_attention_heads=s.heads, attention_head_dim=s.head_dim, in_channels=4, out_channels=8,
            num_layers=s.blocks, sample_size=s.latent, patch_size=2, num_embeds_ada_norm=1000), 0)
        emb = tr.transformer_blocks[0].norm1.emb.state_dict()
        for blk in tr.transformer_blocks[1:]:  # one embedder in every block, as converted DiT checkpoints have
            blk.norm1.emb.load_state_dict(emb)
        vae = _randomize(diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1, latent_channels=4,
            norm_num_groups=4, sample_size=s.latent), 1)
        pipe = diffusers.DiTPipeline(tr, vae, diffusers.DDIMScheduler(), id2label={i: str(i) for i in range(8)})
        kw = dict(class_labels=list(range(s.batch)), num_inference_steps=s.steps, output_type="pt")
        denoiser = "transformer"
    else:
        L = len(s.unet_channels)
        down = ["DownBlock2D"] * L
        down[1] = "AttnDownBlock2D"  # attention at half resolution, as DDPM's CIFAR U-Net
        up = [b.replace("Down", "Up") for b in reversed(down)]
        unet = _randomize(diffusers.UNet2DModel(
            sample_size=s.unet_sample, in_channels=3, out_channels=3, block_out_channels=s.unet_channels,
            layers_per_block=s.unet_layers, down_block_types=tuple(down), up_block_types=tuple(up),
            norm_num_groups=s.unet_groups, attention_head_dim=s.unet_channels[1] // 2), 0)
        pipe = diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler())
        kw = dict(batch_size=s.batch, num_inference_steps=s.steps, output_type="pt")
        denoiser = "unet"
    pipe.set_progress_bar_config(disable=True)
    return Case(family, pipe, kw, denoiser)


def describe(family: str, case: Case, s: Shapes) -> str:
    model = getattr(case.pipe, case.denoiser)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    if family == "ddim":
        return (f"UNet2DModel {s.unet_sample}x{s.unet_sample}x3, channels {list(s.unet_channels)}, "
                f"{s.unet_layers} resnets per level, attention at level 1; batch {s.batch}, {s.steps} DDIM steps; "
                f"{params:.1f}M parameters")
    tokens = (s.latent // 2) ** 2
    blocks = f"{s.double} double + {s.blocks - s.double} single" if family == "flux" else f"{s.blocks}"
    cfg = BENCH[family].cfg
    if BENCH[family].size:
        from eekernels import families

        blocks = len(block_modules(model, families.family_of_pipeline(case.pipe)[0]))
        size = BENCH[family].size.format(**asdict(s), patched=(s.latent // 2) ** 2, half=s.latent // 2)
        width = f"width {s.width} ({s.heads} heads x {s.head_dim}), " if BENCH[family].scaled else ""
        return (f"{width}{size}, {blocks} blocks; {cfg}, {s.steps} steps "
                f"({type(case.pipe.scheduler).__name__}); {params:.1f}M parameters")
    text = "" if family == "dit" else f", {s.tokens} caption tokens of {s.width}"
    return (f"width {s.width} ({s.heads} heads x {s.head_dim}), {blocks} blocks, latents {s.latent}x{s.latent} "
            f"({tokens} image tokens){text}; batch {s.batch}, {cfg}, {s.steps} steps "
            f"({type(case.pipe.scheduler).__name__}); {params:.1f}M parameters")


def diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def call(pipe, case: Case, seed: int = 0):
    with torch.no_grad():
        return pipe(generator=torch.Generator().manual_seed(seed), **case.kwargs)


# --------------------------------------------------------------------------------------------------
# What a run did: final latents, blocks run, model calls, FLOPs
# --------------------------------------------------------------------------------------------------
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter():
    """torch's FlopCounterMode, counting the CPU attention kernel too (torch counts only the CUDA ones)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})


def block_modules(model, family):
    """The model's blocks in execution order (the family table's block lists), or [] (U-Net: levels)."""
    from eekernels.families import PrefixExit

    rule = family.exit
    if not isinstance(rule, PrefixExit):
        return []
    return [b for name in rule.blocks for b in getattr(model, name)]


@contextlib.contextmanager
def observe(pipe, case: Case, family):
    """Record a run of ``pipe``: ``seen["latents"]`` (the last scheduler step's prev_sample), ``seen["calls"]``
    (denoiser calls), ``seen["blocks"]`` (blocks run; for the native tier the depth each call received) and
    ``seen["flops"]``."""
    from eekernels._accelerate import _Accelerated

    seen = {"calls": 0, "blocks": 0, "native_depths": []}
    denoiser = getattr(pipe, case.denoiser)
    handles = []
    if isinstance(denoiser, _Accelerated):  # the native tier: count the depth its model runs per call
        full = int(denoiser.model.num_blocks)

        def depth_in(mod, args, kwargs):
            d = kwargs.get("depth")
            seen["native_depths"].append(full if d is None else int(d))
            seen["blocks"] += full if d is None else int(d)

        handles.append(denoiser.model.register_forward_pre_hook(depth_in, with_kwargs=True))
    else:
        from bench_text_pipelines import first_attention

        for blk in block_modules(denoiser, family):
            handles.append(first_attention(blk).register_forward_hook(
                lambda *a: seen.__setitem__("blocks", seen["blocks"] + 1)))
    handles.append(denoiser.register_forward_pre_hook(lambda *a: seen.__setitem__("calls", seen["calls"] + 1)))
    sched = pipe.scheduler
    cls = type(sched)

    def step(self, *args, **kwargs):
        out = cls.step(self, *args, **kwargs)
        if self is sched:  # not a copy the pipeline made of it (LTX-2's audio scheduler)
            seen["latents"] = (out.prev_sample if hasattr(out, "prev_sample") else out[0]).detach().clone()
        return out

    sched.__class__ = type(cls.__name__, (cls,), {"step": step})  # a class attribute: copies step on their own
    counter = flop_counter()
    try:
        with counter:
            yield seen
    finally:
        sched.__class__ = cls
        for h in handles:
            h.remove()
    seen["flops"] = counter.get_total_flops()


def inspect_run(pipe, case: Case, family) -> dict:
    with observe(pipe, case, family) as seen:
        call(pipe, case)
    return seen


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------
# The ~0.7 schedule, FirstBlockCache's threshold, DeepCache's setting
# --------------------------------------------------------------------------------------------------
def near_schedule(total: int, min_depth: int, cost: dict, timesteps: torch.Tensor, target: float):
    """The ExitSchedule of the ASE shape (``ASE_DIT_XL``: full depth at small t, shallower toward noise) scaled by a
    factor a (each bin moves a times as far from full depth), a chosen so that the run's mean cost (``cost[d]``:
    a call at depth d over a full call) is nearest ``target``. Returns (schedule, fraction)."""
    from eekernels.schedules import ASE_DIT_XL, ExitSchedule

    shape = [d / max(ASE_DIT_XL) for d in ASE_DIT_XL]
    best = None
    for i in range(0, 401):
        a = i / 100
        table = [min(total, max(min_depth, round(total * (1 - a * (1 - v))))) for v in shape]
        sched = ExitSchedule.piecewise(table, total_depth=total)
        plan = sched.plan(timesteps).tolist()
        frac = sum(cost[d] for d in plan) / len(plan)
        if best is None or abs(frac - target) < abs(best[1] - target) - 1e-12:
            best = (sched, frac)
    return best


def fbc_pipe(pipe, threshold: float):
    """A shallow copy of ``pipe`` whose transformer is a deep copy under diffusers' FirstBlockCache."""
    from bench_text_pipelines import enable_first_block_cache

    new = copy.copy(pipe)
    new.transformer = _one_context(pipe, enable_first_block_cache(copy.deepcopy(pipe.transformer), threshold))
    return new


def _one_context(pipe, tr):
    """``tr`` (a CacheMixin model under a diffusers cache) in one cache context, reset after each call as
    ``enable_first_block_cache`` does for models without CacheMixin, where ``pipe``'s call opens none itself
    (Flux2Pipeline, ChromaPipeline, HiDreamImagePipeline in diffusers 0.42: diffusers' hooks raise "No cache context
    is set"); pipelines that open their own are left as they are."""
    import inspect

    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    if not hasattr(tr, "cache_context") or "cache_context" in inspect.getsource(type(pipe).__call__):
        return tr

    def reset():
        HookRegistry.check_if_exists_or_initialize(tr).reset_stateful_hooks(recurse=True)
        _set_cache_context(tr, CacheContext("cond"))

    _set_cache_context(tr, CacheContext("cond"))
    tr._reset_stateful_cache = reset
    return tr


def cache_pipe(pipe, config):
    """A shallow copy of ``pipe`` whose transformer is a deep copy under a diffusers cache ``config``
    (``TaylorSeerCacheConfig``, ``MagCacheConfig``): ``enable_cache`` where the class has it (CacheMixin), else the
    config's ``apply_*`` function with one cache context that the pipeline's ``maybe_free_model_hooks`` resets after
    each call (as ``enable_first_block_cache`` does)."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache, apply_taylorseer_cache
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    new = copy.copy(pipe)
    tr = copy.deepcopy(pipe.transformer)
    if hasattr(tr, "enable_cache"):
        tr.enable_cache(config)
        _one_context(pipe, tr)
    else:
        (apply_mag_cache if isinstance(config, MagCacheConfig) else apply_taylorseer_cache)(tr, config)
        _set_cache_context(tr, CacheContext("cond"))

        def reset():
            HookRegistry.check_if_exists_or_initialize(tr).reset_stateful_hooks(recurse=True)
            _set_cache_context(tr, CacheContext("cond"))

        tr._reset_stateful_cache = reset
    new.transformer = tr
    return new


class Unsupported(Exception):
    """Diffusers cannot run this cache on this family (the reason is diffusers' own error)."""


def _runs(make, case: Case, family) -> dict:
    """One run of ``make()``'s pipeline; a diffusers error in enabling or running the cache is :class:`Unsupported`
    (reported in the table's notes, not a row)."""
    try:
        return inspect_run(make(), case, family)
    except (ValueError, KeyError, AttributeError, TypeError, RuntimeError, IndexError) as e:
        raise Unsupported(f"{type(e).__name__}: {e}".splitlines()[0]) from e


def search_threshold(case: Case, family, target: float, calls: int, evaluations: int, log, make, label: str):
    """The threshold of ``make(threshold)`` (a pipeline under a threshold cache: FirstBlockCache, MagCache) whose
    blocks run over the run are nearest ``target`` (a fraction of ``calls`` full calls): ``evaluations`` steps of
    bisection in log space over [1e-6, 10] (fewer blocks at a higher threshold). Returns (threshold, fraction,
    tried)."""
    total = len(block_modules(case.pipe.transformer, family))
    tried = {}

    def fraction(th):
        if th not in tried:
            tried[th] = _runs(lambda: make(th), case, family)["blocks"] / (calls * total)
        return tried[th]

    lo, hi = 1e-6, 10.0  # MagCache's calibrated ratios skip at thresholds far below FirstBlockCache's
    for _ in range(evaluations):
        mid = math.sqrt(lo * hi)
        if fraction(mid) >= target:
            lo = mid
        else:
            hi = mid
    th = min(tried, key=lambda t: (abs(tried[t] - target), t))
    log(f"bench_inplace: {case.family}: {label} threshold {th:.4g} runs {tried[th]:.3f} of the blocks "
        f"({len(tried)} thresholds tried)")
    return th, tried[th], {f"{k:.4g}": round(v, 4) for k, v in sorted(tried.items())}


def search_fbc(case: Case, family, target: float, calls: int, evaluations: int, log):
    """diffusers' FirstBlockCache at the threshold nearest ``target``. Returns (pipeline, peer info)."""
    th, _, tried = search_threshold(case, family, target, calls, evaluations, log,
                                    lambda t: fbc_pipe(case.pipe, t), "FirstBlockCache")
    return fbc_pipe(case.pipe, th), {"name": f"FirstBlockCache (threshold {th:.4g})", "threshold": th,
                                     "tried": tried}


def search_magcache(case: Case, family, target: float, calls: int, evaluations: int, log):
    """diffusers' MagCache: its magnitude ratios calibrated on this pipeline (``MagCacheConfig(calibrate=True)``, one
    run; diffusers prints them, the first cache context's are used), then the threshold nearest ``target``
    (``max_skip_steps`` 3 and ``retention_ratio`` 0.2, diffusers' defaults). Returns (pipeline, peer info)."""
    import io
    import re

    from diffusers.hooks import MagCacheConfig

    steps = case.kwargs["num_inference_steps"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _runs(lambda: cache_pipe(case.pipe, MagCacheConfig(calibrate=True, num_inference_steps=steps)), case, family)
    found = re.findall(r"^\[([-+0-9.eE, ]+)\]$", printed.getvalue(), re.M)
    if not found:
        raise Unsupported("no error, but MagCacheConfig(calibrate=True) printed no magnitude ratios to calibrate "
                          "with (diffusers logs: MagCache: No transformer blocks found to apply hooks.)")
    ratios = [float(x) for x in found[0].split(",")]

    def make(th):
        return cache_pipe(case.pipe, MagCacheConfig(threshold=th, num_inference_steps=steps, mag_ratios=ratios))

    th, _, tried = search_threshold(case, family, target, calls, evaluations, log, make, "MagCache")
    return make(th), {"name": f"MagCache (threshold {th:.4g})", "threshold": th, "mag_ratios": ratios,
                      "tried": tried}


def taylorseer_steps(steps: int, interval: int, before: int) -> list[bool]:
    """The steps diffusers' TaylorSeer hook computes (its ``_measure_should_compute``): the first ``before``, then
    every ``interval``-th from ``before + 1``."""
    return [i < before or (i - before - 1) % interval == 0 for i in range(steps)]


def search_taylorseer(case: Case, family, target: float, calls: int, evaluations: int, log):
    """diffusers' TaylorSeer with the family's blocks skipped on its predicted steps and the model's last module
    (``Bench.output_module``) predicted by its first-order Taylor series (the layout of diffusers' lite mode, named
    for the family's block lists: a predicted step runs no block), ``cache_interval`` and
    ``disable_cache_before_step`` (>= 2: two computed steps before the first prediction) chosen so that the computed
    steps are nearest ``target``. Returns (pipeline, peer info)."""
    from diffusers.hooks import TaylorSeerCacheConfig

    steps = case.kwargs["num_inference_steps"]
    options = [(abs(sum(taylorseer_steps(steps, k, b)) / steps - target), k, b)
               for k in range(2, 9) for b in range(2, steps)]
    if not options:
        raise Unsupported(f"{steps} steps leave no step to predict")
    _, interval, before = min(options)
    config = TaylorSeerCacheConfig(
        cache_interval=interval, disable_cache_before_step=before, max_order=1, taylor_factors_dtype=torch.float32,
        skip_predict_identifiers=[rf"{name}\.\d+" for name in family.exit.blocks],
        cache_identifiers=[BENCH[case.family].output_module])
    seen = _runs(lambda: cache_pipe(case.pipe, config), case, family)
    frac = seen["blocks"] / (calls * len(block_modules(case.pipe.transformer, family)))
    log(f"bench_inplace: {case.family}: TaylorSeer interval {interval}, first {before} steps computed: "
        f"{frac:.3f} of the blocks")
    return cache_pipe(case.pipe, config), {"name": f"TaylorSeer (interval {interval}, first {before})",
                                           "interval": interval, "before": before}


PEERS = {"FirstBlockCache": search_fbc, "TaylorSeer": search_taylorseer, "MagCache": search_magcache}


def deepcache_pipe(pipe, interval: int, branch: int):
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    return pipe


def search_deepcache(case: Case, family, target: float, full_flops: int, log):
    """The DeepCache (interval, branch) whose FLOPs over the run are nearest ``target`` of plain's. One run per
    branch with an interval longer than the run (step 0 full, every later step that branch only) gives the branch's
    cost; an interval i runs steps 0, i, 2i, ... in full. Returns ((interval, branch), predicted fraction)."""
    steps = case.kwargs["num_inference_steps"]
    levels = len(case.pipe.unet.down_blocks)
    per_call_full = full_flops / steps
    options = []
    for branch in range(3 * levels):
        flops = inspect_run(deepcache_pipe(copy.deepcopy(case.pipe), steps + 1, branch), case, family)["flops"]
        per_call = (flops - per_call_full) / (steps - 1)
        for interval in range(2, 9):
            n_full = len(range(0, steps, interval))
            frac = (n_full * per_call_full + (steps - n_full) * per_call) / full_flops
            options.append((abs(frac - target), interval, branch, frac))
    _, interval, branch, frac = min(options)
    log(f"bench_inplace: {case.family}: DeepCache interval {interval}, branch {branch}: {frac:.3f} of the FLOPs")
    return (interval, branch), frac


# --------------------------------------------------------------------------------------------------
# Hook overhead: model calls, plain vs in place at full depth
# --------------------------------------------------------------------------------------------------
def hook_overhead(case: Case, reps: int) -> dict:
    """Microseconds the in-place hooks add per call at full depth, without the modules' own compute: in an
    accelerated copy of the model, the forward that a hook calls to run its module (diffusers' hook chain keeps it as
    ``fn_ref.original_forward``) is swapped for a no-op, and the module's call is timed against a plain module with
    the same no-op forward and the same arguments (captured from a real call); best of 5 repeats of ``reps``
    calls, process CPU time. Measured for the model's hook (the depth of the call, the CUDA-graph runner's check)
    and for the first block's (U-Net: the first down block's); ``per_run_us`` is a pipeline run's share:
    calls x (model hook + block hooks x block hook)."""
    import timeit

    import eekernels
    from eekernels import inplace

    pipe = eekernels.accelerate(copy.deepcopy(case.pipe))
    model = getattr(pipe, case.denoiser)
    ctl = inplace.controller(model)
    block = ctl.attached[0][0]  # hooks are attached blocks first, in execution order, then the model
    seen = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, k, key=key: seen.setdefault(key, (a, k)), with_kwargs=True)
               for key, m in (("model", model), ("block", block))]
    call(pipe, case)
    for h in handles:
        h.remove()

    class Noop(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return None

    noop = Noop()
    out = {"hooks_per_call": len(ctl.attached), "calls_per_repeat": reps}
    for key, module in (("model", model), ("block", block)):
        for hook in module._diffusers_hook.hooks.values():
            hook.fn_ref.original_forward = noop.forward
        args, kwargs = seen[key]
        best = {}
        with torch.no_grad():
            for name, fn in (("hooked", lambda: module(*args, **kwargs)), ("plain", lambda: noop(*args, **kwargs))):
                best[name] = min(timeit.repeat(fn, number=reps, repeat=5, timer=time.process_time)) / reps * 1e6
        out[f"{key}_hook_us"] = round(best["hooked"] - best["plain"], 2)
    blocks = len(ctl.attached) - 1
    out["per_call_us"] = round(out["model_hook_us"] + blocks * out["block_hook_us"], 1)
    return out


def timed_interleaved(fns: dict, rounds: int, warmup: int = 0):
    """Wall and process CPU seconds of each callable, ``rounds`` times, interleaved: round r runs every callable
    once, starting at callable r (mod n), after ``warmup`` untimed rounds. Returns ({name: [wall]}, {name: [cpu]})."""
    names = list(fns)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    with torch.no_grad():
        for r in range(-warmup, rounds):
            k = r % len(names)
            for n in (names[k:] + names[:k] if r >= 0 else names):
                t0, c0 = time.perf_counter(), time.process_time()
                fns[n]()
                t1, c1 = time.perf_counter(), time.process_time()
                if r >= 0:
                    wall[n].append(t1 - t0)
                    cpu[n].append(c1 - c0)
    return wall, cpu


# --------------------------------------------------------------------------------------------------
# One family
# --------------------------------------------------------------------------------------------------
def bench_family(family: str, s: Shapes, args, log) -> dict:
    import eekernels
    from eekernels import families, inplace

    case = build(family, s)
    fam, _ = families.family_of_pipeline(case.pipe)
    plain = case.pipe
    log(f"bench_inplace: {family}: {describe(family, case, s)}")
    ref = inspect_run(plain, case, fam)
    steps = case.kwargs["num_inference_steps"]
    values = inplace._step_t(plain, fam)  # its t: the family's step_t (Cosmos, ACE-Step), else the timesteps
    timesteps = (torch.tensor(values, dtype=torch.float64) if values is not None
                 else plain.scheduler.timesteps.detach().to("cpu", torch.float64))
    calls = ref["calls"]
    per_step = calls // len(timesteps)

    full_pipe = eekernels.accelerate(copy.deepcopy(plain))
    ctl = inplace.controller(full_pipe)
    L, min_depth = ctl.num_blocks, ctl.min_depth
    unit = "blocks" if fam.exit.kind == "prefix" else "FLOPs"
    if unit == "blocks":
        cost = {d: d / L for d in range(1, L + 1)}
        depth_flops = None
    else:  # U-Net: the FLOPs of one call at each depth (levels 0..d-1), on the run's own first-call input
        captured = {}
        model = getattr(full_pipe, case.denoiser)
        h = model.register_forward_pre_hook(lambda m, a, k: captured.setdefault("in", (a, k)), with_kwargs=True)
        call(full_pipe, case)
        h.remove()
        depth_flops = {}
        for d in range(1, L + 1):
            counter = flop_counter()
            with torch.no_grad(), inplace.at_depth(model, d), counter:
                model(*captured["in"][0], **captured["in"][1])
            depth_flops[d] = counter.get_total_flops()
        cost = {d: depth_flops[d] / depth_flops[L] for d in depth_flops}
    schedule, fraction = near_schedule(L, min_depth, cost, timesteps, args.target)
    plan = schedule.plan(timesteps).tolist()
    declared = (sum(plan) * per_step if unit == "blocks"
                else sum(depth_flops[d] for d in plan) * per_step)
    log(f"bench_inplace: {family}: schedule {list(schedule.table)} runs {fraction:.3f} of the {unit}")

    pipes = {"plain": plain, "in place full": full_pipe,
             "in place ~0.7": eekernels.accelerate(copy.deepcopy(plain), schedule)}
    if fam.native is not None:
        pipes["native ~0.7"] = eekernels.accelerate(copy.deepcopy(plain), schedule, native=True)
    peers, unsupported = {}, {}
    if family == "ddim":
        (interval, branch), predicted = search_deepcache(case, fam, fraction, ref["flops"], log)
        pipes["DeepCache"] = deepcache_pipe(copy.deepcopy(plain), interval, branch)
        peers["DeepCache"] = {
            "name": f"DeepCache (interval {interval}, branch {branch})", "interval": interval, "branch": branch,
            "predicted_fraction": round(predicted, 4),
            "why": "diffusers has no cache for UNet2DModel (no CacheMixin; FirstBlockCache, TaylorSeer's block "
                   "layout and MagCache need transformer blocks): DeepCache package, the setting nearest in FLOPs"}
    else:
        for key, search in PEERS.items():
            try:
                pipes[key], peers[key] = search(case, fam, fraction, calls, args.fbc_evaluations, log)
            except Unsupported as e:
                unsupported[key] = str(e)
                log(f"bench_inplace: {family}: {key} not run: diffusers {diffusers_version()} raises {e}")

    rows = {}
    for name, pipe in pipes.items():
        seen = ref if name == "plain" else inspect_run(pipe, case, fam)
        counted = seen["blocks"] if unit == "blocks" else seen["flops"]
        rows[name] = {"row": peers[name]["name"] if name in peers else name, "calls": seen["calls"],
                      "counted": counted,
                      "fraction": round(counted / (calls * L if unit == "blocks" else ref["flops"]), 4),
                      "run_flop_fraction": round(seen["flops"] / ref["flops"], 4),
                      "rel_diff": rel_diff(seen["latents"], ref["latents"]),
                      "latents": seen["latents"]}
        if name == "native ~0.7":
            rows[name]["native_depths"] = seen["native_depths"]
    checks = {
        "in_place_full_bit_identical": bool(torch.equal(rows["in place full"]["latents"], ref["latents"])),
        "in_place_07_counted": rows["in place ~0.7"]["counted"], "declared": declared,
        "in_place_full_counted": rows["in place full"]["counted"],
        "full_counted": calls * L if unit == "blocks" else ref["flops"],
    }
    native = rows.get("native ~0.7")
    if native is not None:
        checks["in_place_07_vs_native_07"] = rel_diff(rows["in place ~0.7"]["latents"], native["latents"])
        checks["native_depths_match_plan"] = native.pop("native_depths") == [d for d in plan for _ in range(per_step)]
    for r in rows.values():
        del r["latents"]

    names = list(pipes)
    wall, cpu = timed_interleaved({n: (lambda p=pipes[n]: call(p, case)) for n in names}, args.rounds, args.warmup)
    for n in names:
        ratios = [w / p for w, p in zip(wall[n], wall["plain"])]
        cpu_ratios = [c / p for c, p in zip(cpu[n], cpu["plain"])]
        rows[n].update(seconds=round(statistics.median(wall[n]), 4), seconds_min=round(min(wall[n]), 4),
                       seconds_max=round(max(wall[n]), 4), ratio=round(statistics.median(ratios), 4),
                       ratio_min=round(min(ratios), 4), ratio_max=round(max(ratios), 4),
                       cpu_seconds=round(statistics.median(cpu[n]), 4),
                       cpu_ratio=round(statistics.median(cpu_ratios), 4),
                       cpu_ratio_min=round(min(cpu_ratios), 4), cpu_ratio_max=round(max(cpu_ratios), 4))
    overhead = hook_overhead(case, args.overhead_reps)
    overhead["per_run_us"] = round(overhead["per_call_us"] * calls, 1)
    overhead["per_run_fraction_of_plain_cpu"] = round(overhead["per_run_us"] * 1e-6 / rows["plain"]["cpu_seconds"], 6)
    blocks_per_run = checks["in_place_full_counted"] if unit == "blocks" else None
    return {"family": family, "family_table": fam.name, "pipeline": PIPELINES[family], "shapes": describe(family, case, s), "unit": unit,
            "total_depth": L, "steps": steps, "calls": calls, "timesteps": [round(t, 3) for t in timesteps.tolist()],
            "schedule": {"table": list(schedule.table), "fraction": round(fraction, 4), "plan": plan},
            "depth_flops": depth_flops, "peers": peers, "unsupported": unsupported, "rows": [rows[n] for n in names],
            "checks": checks,
            "hook_overhead": overhead, "block_calls_per_run": blocks_per_run}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    """The markdown table: CPU time first (this process's own, the robust figure on a shared machine), then wall."""
    lines = ["| pipeline | row | blocks run | FLOPs of the run | CPU s | CPU / plain [min-max] | wall s [min-max] | "
             "wall / plain | final latents vs plain |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for fam in result["families"]:
        for r in fam["rows"]:
            frac = f"{r['fraction']:.3f}" + (" (FLOPs)" if fam["unit"] == "FLOPs" else "")
            diff = "0 (bit-identical)" if r["rel_diff"] == 0 else f"{r['rel_diff']:.2e}"
            lines.append(f"| {fam['pipeline']} | {r['row']} | {frac} | {r['run_flop_fraction']:.3f} | "
                         f"{r['cpu_seconds']:.3f} | {r['cpu_ratio']:.3f} [{r['cpu_ratio_min']:.3f}-"
                         f"{r['cpu_ratio_max']:.3f}] | {r['seconds']:.2f} [{r['seconds_min']:.2f}-"
                         f"{r['seconds_max']:.2f}] | {r['ratio']:.3f} | {diff} |")
    return "\n".join(lines)


def format_notes(result: dict) -> list[str]:
    out = []
    for f in result["families"]:
        o = f["hook_overhead"]
        out.append(f"{f['pipeline']}: {f['shapes']}. ~0.7: ExitSchedule.piecewise({f['schedule']['table']}), "
                   f"{f['schedule']['fraction']:.3f} of the {f['unit']}. Hooks at full depth (CPU time): model "
                   f"{o['model_hook_us']} us, block {o['block_hook_us']} us, {o['per_call_us']} us per call "
                   f"({o['hooks_per_call']} hooks), {o['per_run_us'] / 1e3:.2f} ms per run = "
                   f"{100 * o['per_run_fraction_of_plain_cpu']:.3f}% of plain's CPU time."
                   + "".join(f" {k}: not run, diffusers raises {why.rstrip('.')}." for k, why in f.get("unsupported", {}).items()))
    return out


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------------
# --gpu-shapes: three full-size shapes with random weights (issue 22), one process, on CUDA
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuShape:
    """A full-size shape: the model class and config (random weights), the pipeline, its call, the caption
    embeddings it gets (tokens, the config key of their width), what one run makes (images or frames), and a
    ``tiny`` config and call of the same code for the CPU wiring check (``--gpu-shapes --tiny``)."""

    name: str
    pipeline: str
    model: str
    config: dict
    call: dict
    text: tuple
    outputs: tuple  # (count per run, "images" / "frames")
    tiny: dict
    tiny_call: dict


GPU_SHAPES = (
    GpuShape("Wan 2.1-1.3B, 480p, 33 frames", "WanPipeline", "WanTransformer3DModel",
             dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
             dict(height=480, width=832, num_frames=33, num_inference_steps=50, guidance_scale=5.0),
             (512, "text_dim"), (33, "frames"),
             dict(num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2),
             dict(height=64, width=64, num_frames=5, num_inference_steps=3)),
    GpuShape("FLUX.2-shaped (dev: 8 double + 48 single blocks, 32B), 1024 px", "Flux2Pipeline",
             "Flux2Transformer2DModel", {}, dict(height=1024, width=1024, num_inference_steps=50, guidance_scale=4.0),
             (512, "joint_attention_dim"), (1, "images"),
             dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, axes_dims_rope=(4, 4, 4, 4), timestep_guidance_channels=32),
             dict(height=64, width=64, num_inference_steps=3)),
    GpuShape("Qwen-Image-shaped (60 blocks, 20B), 1024 px", "QwenImagePipeline", "QwenImageTransformer2DModel", {},
             dict(height=1024, width=1024, num_inference_steps=50, true_cfg_scale=4.0),
             (256, "joint_attention_dim"), (1, "images"),
             dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                  axes_dims_rope=(4, 6, 6)),
             dict(height=64, width=64, num_inference_steps=3)),
)


def _gpu_scheduler(shape: GpuShape):
    import diffusers

    if shape.pipeline == "WanPipeline":  # Wan 2.1's: UniPC over flow sigmas, shift 3 at 480p
        return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 num_train_timesteps=1000, flow_shift=3.0)
    if shape.pipeline == "QwenImagePipeline":
        from tests.families.test_qwenimage import SCHEDULER

        return diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    return diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                                     max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)


def gpu_shape_model(shape: GpuShape, tiny: bool, device="meta", dtype=torch.float32):
    """The shape's transformer with random weights (on ``meta``: the config and parameter count only)."""
    import diffusers

    config = {**shape.config, **(shape.tiny if tiny else {})}
    with torch.device(device):
        model = getattr(diffusers, shape.model)(**config)
    if dtype != torch.float32:
        model = model.to(dtype)
    if device != "meta":
        g = torch.Generator(device).manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():  # as the CPU table's: weights ~ 0.3 / sqrt(fan in), vectors ~ 0.1 + 0.3 N
                fan_in = p[0].numel() if p.dim() >= 2 else 1
                noise = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
                p.copy_(noise * (0.3 / fan_in ** 0.5) if p.dim() >= 2 else 0.1 + 0.3 * noise)
    return model.eval()


def gpu_shape_pipeline(shape: GpuShape, tiny: bool, device: str, dtype):
    """The pipeline (no text encoder, no VAE: latents out) and its call kwargs (caption embeddings, seeded)."""
    import diffusers

    model = gpu_shape_model(shape, tiny, device, dtype)
    parts = dict(text_encoder=None, tokenizer=None, vae=None, scheduler=_gpu_scheduler(shape), transformer=model)
    pipe = getattr(diffusers, shape.pipeline)(**parts)
    pipe.set_progress_bar_config(disable=True)
    tokens, key = shape.text
    tokens = 8 if tiny else tokens
    g = torch.Generator(device).manual_seed(11)
    emb, neg = torch.randn(2, 1, tokens, model.config[key], generator=g, device=device).to(dtype)
    kw = {**(shape.tiny_call if tiny else shape.call), "output_type": "latent", "prompt_embeds": emb}
    if shape.pipeline == "QwenImagePipeline":
        mask = torch.ones(1, tokens, dtype=torch.long, device=device)
        kw.update(prompt_embeds_mask=mask, negative_prompt_embeds=neg, negative_prompt_embeds_mask=mask)
    elif shape.pipeline == "WanPipeline":
        kw.update(negative_prompt_embeds=neg)
    return pipe, kw


def bench_gpu_shape(shape: GpuShape, args, log, device: str, dtype) -> dict:
    """plain, in place full, in place ~0.7, FirstBlockCache at the threshold nearest in counted blocks: one
    pipeline, each row applied to it and removed in turn (no copies of a 20-32B model), ``--rounds`` timed runs
    after one warm-up run each; images (frames) per second, blocks run, final latents against plain."""
    import eekernels
    from diffusers import FirstBlockCacheConfig
    from eekernels import families, inplace

    pipe, kw = gpu_shape_pipeline(shape, args.tiny, device, dtype)
    model = pipe.transformer
    found = families.family_of_pipeline(pipe)
    case = Case("gpu", pipe, kw, "transformer")
    count, what = shape.outputs
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    blocks = [b for name in ("transformer_blocks", "single_transformer_blocks", "blocks")
              for b in getattr(model, name, [])]
    ran = {"blocks": 0, "calls": 0}
    from bench_text_pipelines import first_attention

    for b in blocks:
        first_attention(b).register_forward_hook(lambda *a: ran.__setitem__("blocks", ran["blocks"] + 1))
    model.register_forward_pre_hook(lambda *a: ran.__setitem__("calls", ran["calls"] + 1))

    cached = [False]  # FirstBlockCache on: a cache context around the call (Flux2Pipeline opens none itself; a
    # pipeline that does, Wan's and Qwen-Image's, sets its own inside)

    def run():
        ran.update(blocks=0, calls=0)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad(), (model.cache_context("cond") if cached[0] else contextlib.nullcontext()):
            out = pipe(generator=torch.Generator(device).manual_seed(0), **kw)
        sync()
        return time.perf_counter() - t0, (out.frames if hasattr(out, "frames") else out.images), dict(ran)

    def measure(name):
        secs = []
        for _ in range(1 + args.rounds):
            sec, latents, seen = run()
            secs.append(sec)
        sec = statistics.median(secs[1:])
        row = {"row": name, "seconds": round(sec, 3), f"{what}_per_second": round(count / sec, 4),
               "blocks_fraction": round(seen["blocks"] / max(1, seen["calls"] * len(blocks)), 4), "latents": latents}
        log(f"bench_inplace --gpu-shapes: {shape.name}: {name}: {sec:.3f} s, {count / sec:.3f} {what}/s, "
            f"{row['blocks_fraction']:.3f} of the blocks")
        return row

    rows = [measure("plain")]
    ref = rows[0]["latents"]
    timesteps = pipe.scheduler.timesteps.detach().to("cpu", torch.float64).clone()
    not_run = {}
    if found is None:
        not_run["in place"] = f"no eekernels family for {shape.model} on this branch"
        log(f"bench_inplace --gpu-shapes: {shape.name}: in place not run: {not_run['in place']}")
        fraction = args.target
    else:
        eekernels.accelerate(pipe)
        ctl = inplace.controller(model)
        L, lo = ctl.num_blocks, ctl.min_depth
        rows.append(measure("in place full"))
        eekernels.disable(pipe)
        schedule, fraction = near_schedule(L, lo, {d: d / L for d in range(1, L + 1)}, timesteps, args.target)
        eekernels.accelerate(pipe, schedule=schedule)
        rows.append(measure("in place ~0.7") | {"schedule": list(schedule.table)})
        eekernels.disable(pipe)
    tried = {}

    def fbc_fraction(th):
        if th not in tried:
            model.enable_cache(FirstBlockCacheConfig(threshold=th))
            cached[0] = True
            seen = run()[2]
            tried[th] = seen["blocks"] / max(1, seen["calls"] * len(blocks))
            model.disable_cache()
            cached[0] = False
        return tried[th]

    lo_th, hi_th = 0.01, 1.0
    try:
        for _ in range(args.fbc_evaluations):  # bisection in log space on the counted fraction
            mid = math.sqrt(lo_th * hi_th)
            lo_th, hi_th = (mid, hi_th) if fbc_fraction(mid) >= fraction else (lo_th, mid)
    except (ValueError, KeyError, AttributeError, TypeError, RuntimeError) as e:  # diffusers' own error
        not_run["FirstBlockCache"] = f"{type(e).__name__}: {e}".splitlines()[0]
        log(f"bench_inplace --gpu-shapes: {shape.name}: FirstBlockCache not run: diffusers "
            f"{diffusers_version()} raises {not_run['FirstBlockCache']}")
        model.disable_cache()
        cached[0] = False
    if "FirstBlockCache" not in not_run:
        th = min(tried, key=lambda t: abs(tried[t] - fraction))
        model.enable_cache(FirstBlockCacheConfig(threshold=th))
        cached[0] = True
        rows.append(measure(f"FirstBlockCache (threshold {th:.4g})"))
        model.disable_cache()
        cached[0] = False
    for r in rows:
        r["rel_diff"] = rel_diff(r.pop("latents").float().cpu(), ref.float().cpu())
    params = sum(p.numel() for p in model.parameters())
    return {"shape": shape.name, "pipeline": shape.pipeline, "params": params, "unit": what, "per_run": count,
            "call": {k: v for k, v in kw.items() if not torch.is_tensor(v)}, "rows": rows, "not_run": not_run,
            "fbc_tried": {f"{k:.4g}": round(v, 4) for k, v in sorted(tried.items())}}


def gpu_shapes(args, log) -> dict:
    """``--gpu-shapes``: the configs first (built on ``meta``: class, parameter count), then the runs, which need
    CUDA (``--tiny``: the same code at tiny sizes on the CPU, float32, a wiring check and not a measurement)."""
    import diffusers

    for shape in GPU_SHAPES:
        m = gpu_shape_model(shape, args.tiny)
        log(f"bench_inplace --gpu-shapes: {shape.name}: {shape.model} "
            f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M parameters, {shape.pipeline}, "
            f"{shape.tiny_call if args.tiny else shape.call}")
    if args.tiny:
        device, dtype = "cpu", torch.float32
    elif not torch.cuda.is_available():
        raise SystemExit("bench_inplace --gpu-shapes: needs a GPU (torch.cuda.is_available() is False): the three "
                         "shapes above are full size (bfloat16 weights up to 64 GB); run it on a CUDA machine, or "
                         "pass --tiny for the CPU wiring check")
    else:
        device, dtype = "cuda", torch.bfloat16
    shapes = [bench_gpu_shape(shape, args, log, device, dtype) for shape in GPU_SHAPES]
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(), "dtype": str(dtype),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "commit": _commit(),
            "date": datetime.datetime.now().isoformat(timespec="minutes"), "tiny": args.tiny,
            "rounds": args.rounds}
    result = {"info": info, "shapes": shapes}
    for sh in shapes:
        for r in sh["rows"]:
            log(f"| {sh['shape']} | {r['row']} | {r[sh['unit'] + '_per_second']:.4f} {sh['unit']}/s | "
                f"{r['blocks_fraction']:.3f} | {r['rel_diff']:.2e} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI size: tiny models, 2 rounds, 4 steps")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1; --quick 0)")
    p.add_argument("--target", type=float, default=0.7, help="fraction of the blocks for the early-exit rows")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--fbc-evaluations", type=int, default=None,
                   help="FirstBlockCache runs in the threshold search (default 14; --quick 10)")
    p.add_argument("--overhead-reps", type=int, default=None, help="calls per repeat in the hook-overhead "
                   "timing (default 5000; --quick 200)")
    p.add_argument("--table", default=None, help="print the tables of a saved result (JSON) and exit")
    p.add_argument("--gpu-shapes", action="store_true", help="the three full-size random-weight shapes of issue 22 "
                   "(Wan 2.1-1.3B 480p 33 frames, FLUX.2-shaped and Qwen-Image-shaped 1024 px) on CUDA: plain, in "
                   "place full, in place ~0.7, FirstBlockCache; needs a GPU")
    p.add_argument("--tiny", action="store_true", help="with --gpu-shapes: the same code at tiny sizes on the CPU "
                   "(a wiring check, not a measurement)")
    p.add_argument("--json", default=None, help=f"write the result here (default, full mode: {RESULT})")
    args = p.parse_args(argv)
    fams = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in fams if f not in FAMILIES]
    if bad or not fams:
        p.error(f"--families: expected some of {', '.join(FAMILIES)}, got {args.families!r}")
    args.families = fams
    if args.tiny and not args.gpu_shapes:
        p.error("--tiny: expected with --gpu-shapes, got it alone")
    # --gpu-shapes: one timed run per row (after one warm-up), 5 FirstBlockCache runs in the threshold search
    args.rounds = args.rounds if args.rounds is not None else (2 if args.quick else 1 if args.gpu_shapes else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    args.fbc_evaluations = args.fbc_evaluations or (5 if args.gpu_shapes else 10 if args.quick else 14)
    args.overhead_reps = args.overhead_reps or (200 if args.quick else 5000)
    for name in ("rounds", "threads", "fbc_evaluations", "overhead_reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup: expected an integer >= 0, got {args.warmup}")
    if not 0 < args.target < 1:
        p.error(f"--target: expected a fraction in (0, 1), got {args.target}")
    if args.json is None and not args.quick and not args.table and not args.tiny:
        args.json = str(GPU_RESULT if args.gpu_shapes else RESULT)
    return args


def main(argv=None, log=print) -> dict:
    args = parse_args(argv)
    if args.gpu_shapes:
        return gpu_shapes(args, log)
    if args.table:
        result = json.loads(Path(args.table).read_text())
        log(format_table(result))
        log("")
        for line in format_notes(result):
            log(line)
        return result
    import diffusers

    torch.set_num_threads(args.threads)
    shapes = QUICK if args.quick else FULL
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    fams = [bench_family(f, shapes, args, log) for f in args.families]
    info = {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "dtype": "float32",
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "date": datetime.datetime.now().isoformat(timespec="minutes"), "commit": _commit(),
            "command": "python benchmarks/bench_inplace.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "mode": "quick" if args.quick else "full", "rounds": args.rounds, "warmup": args.warmup,
            "target": args.target, "shapes": asdict(shapes), "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "seconds": round(time.perf_counter() - t0, 1)}
    result = {"info": info, "families": fams}
    log(format_table(result))
    log("")
    for line in format_notes(result):
        log(line)
    log(f"load average {load_before[0]:.1f} before, {info['load_average_after'][0]:.1f} after; "
        f"{info['threads']} torch thread(s); {info['seconds']} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
