"""Text-to-image pipelines on the CPU: plain diffusers vs ``eekernels.accelerate`` (full depth, ASE schedule) vs
diffusers' own First Block Cache, for small PixArt-α, SD3 and FLUX-shaped pipelines, in ONE process.

For each family one random pipeline (transformer from a config, a one-level VAE, the family's scheduler) runs
the same call (caption embeddings and negative ones passed in, CFG, fixed seed) as:

- ``diffusers``: the pipeline as built;
- ``eekernels full``: ``eekernels.accelerate(pipe)``, full depth (the same images);
- ``eekernels ASE``: ``accelerate(pipe, schedule=ExitSchedule.preset("ase-demo", total_depth=L))``, the ASE
  reference schedule of DiT-XL/2 rescaled to L blocks (about 0.7 of the block FLOPs);
- ``diffusers FBCache`` (SD3, FLUX): a copy of the pipeline whose transformer runs
  ``FirstBlockCacheConfig(threshold)`` (``transformer.enable_cache``; ``apply_first_block_cache`` where the class
  has no ``enable_cache``), with the fraction of transformer blocks it actually ran.

Reported per row: images/s, speed over the plain pipeline, the block FLOPs spent (fraction of full depth) and the
ideal speed-up 1 / fraction, and the max abs difference of the final images (``output_type="pt"``, in [0, 1])
from the plain pipeline's. Random weights: the differences measure how far each method moves the output, not
image quality.

    python benchmarks/bench_text_pipelines.py --size 16 --steps 8 --json /tmp/text.json

Full-size shapes for a GPU (random weights; the one-level VAE stays small, so the transformer dominates):

    # PixArt-XL/2-512: 28 blocks, 16 heads of 72, T5-XXL width 4096, 120 tokens, 64x64 latents; 20 DPM-Solver steps, CFG 4.5
    python benchmarks/bench_text_pipelines.py --families pixart --device cuda --dtype bfloat16 --size 64 --blocks 28 \
        --heads 16 --head-dim 72 --caption-dim 4096 --tokens 120 --steps 20 --batch 8 --json pixart512.json
    # FLUX.1-shaped at 512 px, 4 images, 20 steps: 19 double + 38 single blocks, 24 heads of 128, 512 T5 tokens
    python benchmarks/bench_text_pipelines.py --families flux --device cuda --dtype bfloat16 --size 64 --blocks 57 \
        --double 19 --heads 24 --head-dim 128 --caption-dim 4096 --pooled-dim 768 --tokens 512 --steps 20 --batch 4 --json flux.json
    # SD3.5-medium-shaped at 512 px: 24 blocks (the first 13 with dual attention), 24 heads of 64, QK RMSNorm
    python benchmarks/bench_text_pipelines.py --families sd3 --device cuda --dtype bfloat16 --size 64 --blocks 24 \
        --dual-layers 13 --qk-norm --heads 24 --head-dim 64 --caption-dim 4096 --pooled-dim 2048 --tokens 333 \
        --steps 20 --batch 4 --json sd35.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import time

import torch


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() >= 2 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 / fan_in ** 0.5 if p.dim() >= 2 else 0.3) +
                    (0.0 if p.dim() >= 2 else 0.1))
    return module.eval()


def build(family: str, args):
    import diffusers

    heads, head_dim, txt, pooled, L = args.heads, args.head_dim, args.caption_dim, args.pooled_dim, args.blocks
    D = heads * head_dim
    lc = 4 if family != "flux" else 4
    vae = _randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(16,), layers_per_block=1, latent_channels=lc, norm_num_groups=8,
        sample_size=args.size, scaling_factor=0.7, shift_factor=0.1), 1)
    if family == "pixart":
        tr = diffusers.PixArtTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=lc,
                                                out_channels=2 * lc, num_layers=L, cross_attention_dim=D,
                                                caption_channels=txt, sample_size=args.size, patch_size=2,
                                                norm_type="ada_norm_single")
        pipe = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=_randomize(tr, 0),
                                             scheduler=diffusers.DPMSolverMultistepScheduler())
    elif family == "sd3":
        tr = diffusers.SD3Transformer2DModel(sample_size=args.size, patch_size=2, in_channels=lc, num_layers=L,
                                             attention_head_dim=head_dim, num_attention_heads=heads,
                                             joint_attention_dim=txt, caption_projection_dim=D,
                                             pooled_projection_dim=pooled, out_channels=lc,
                                             pos_embed_max_size=max(32, args.size),
                                             qk_norm="rms_norm" if args.qk_norm else None,
                                             dual_attention_layers=tuple(range(args.dual_layers)))
        pipe = diffusers.StableDiffusion3Pipeline(transformer=_randomize(tr, 0),
                                                  scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                                  vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                                  tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    else:
        double = args.double if args.double is not None else L // 2
        if not 0 <= double <= L:
            raise SystemExit(f"--double: expected 0 .. --blocks ({L}) double-stream blocks, got {double}")
        tr = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4 * lc, num_layers=double,
                                              num_single_layers=L - double, attention_head_dim=head_dim,
                                              num_attention_heads=heads, joint_attention_dim=txt,
                                              pooled_projection_dim=pooled, guidance_embeds=True,
                                              axes_dims_rope=(head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8))
        pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
                                      text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                      transformer=_randomize(tr, 0))
    pipe.set_progress_bar_config(disable=True)
    dtype = getattr(torch, args.dtype)
    pipe.to(args.device, dtype)
    g = torch.Generator().manual_seed(7)
    B, T = args.batch, args.tokens
    kw = dict(num_inference_steps=args.steps, output_type="pt", height=args.size, width=args.size)
    if family == "pixart":
        kw.update(prompt_embeds=torch.randn(B, T, txt, generator=g), prompt_attention_mask=torch.ones(B, T, dtype=torch.long),
                  negative_prompt_embeds=torch.randn(B, T, txt, generator=g),
                  negative_prompt_attention_mask=torch.ones(B, T, dtype=torch.long), negative_prompt=None,
                  guidance_scale=4.5,
                  use_resolution_binning=False)
    elif family == "sd3":
        kw.update(prompt_embeds=torch.randn(B, T, txt, generator=g), pooled_prompt_embeds=torch.randn(B, pooled, generator=g),
                  negative_prompt_embeds=torch.randn(B, T, txt, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(B, pooled, generator=g), guidance_scale=5.0)
    else:  # FLUX-dev: guidance embedding, no CFG batch
        kw.update(prompt_embeds=torch.randn(B, T, txt, generator=g), pooled_prompt_embeds=torch.randn(B, pooled, generator=g),
                  guidance_scale=3.5)
    for k, v in kw.items():  # caption embeddings in the pipeline's dtype, masks as they are, all on its device
        if isinstance(v, torch.Tensor):
            kw[k] = v.to(args.device, dtype if v.is_floating_point() else v.dtype)
    return pipe, kw


def _blocks(transformer):
    return list(getattr(transformer, "transformer_blocks", [])) + list(getattr(transformer, "single_transformer_blocks", []))


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(pipe, kw, repeats):
    pipe(generator=torch.Generator().manual_seed(0), **kw)  # warm-up (CUDA graphs captured here)
    times, images = [], None
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        images = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        _sync()
        times.append(time.perf_counter() - t0)
    return images, min(times)  # best of the repeats: the least disturbed by other load on the machine


def first_attention(block):
    """The block's first attention module: it runs only when the block is computed (a skipped block, under
    eekernels' exit hooks or FirstBlockCache, never calls it), so a forward hook on it counts blocks run."""
    return next(m for m in block.modules() if m is not block and hasattr(m, "set_processor"))


def _text_input_for_none_hook():
    from diffusers.hooks import ModelHook

    class TextInputForNone(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            text, image = self.fn_ref.original_forward(*args, **kwargs)
            return (kwargs["encoder_hidden_states"] if text is None else text), image

    return TextInputForNone()


def enable_first_block_cache(tr, threshold):
    """diffusers' First Block Cache on transformer ``tr`` (in place): ``enable_cache`` where the class has it, else
    ``apply_first_block_cache`` with one cache context that the pipeline resets after each call."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    if hasattr(tr, "enable_cache"):
        tr.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        return tr
    # SD3Transformer2DModel (and DiT's, PixArt's) has no CacheMixin and its pipeline opens no cache context: apply
    # the hook, give it one context (one batched call per step), and let the pipeline's maybe_free_model_hooks()
    # reset it after each call as it does for CacheMixin models; the reset clears the context, so set it again.
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    def reset():
        HookRegistry.check_if_exists_or_initialize(tr).reset_stateful_hooks(recurse=True)
        _set_cache_context(tr, CacheContext("cond"))

    last = tr.transformer_blocks[-1]
    if getattr(last, "context_pre_only", False):
        # SD3's last block returns None for the text stream, which FirstBlockCache's tail hook subtracts from
        # (TypeError in diffusers 0.42): under that hook, return the block's text input instead (unused after it).
        HookRegistry.check_if_exists_or_initialize(last).register_hook(_text_input_for_none_hook(),
                                                                       "text_input_for_none")
    apply_first_block_cache(tr, FirstBlockCacheConfig(threshold=threshold))
    _set_cache_context(tr, CacheContext("cond"))
    tr._reset_stateful_cache = reset
    return tr


def fbc_pipeline(pipe, threshold):
    """A copy of ``pipe`` with a deep-copied transformer under diffusers' First Block Cache (the original keeps
    its transformer), and a counter of the transformer blocks run; (None, reason) when unavailable."""
    try:
        from diffusers.hooks import FirstBlockCacheConfig  # noqa: F401
    except ImportError as e:
        return None, None, f"diffusers has no FirstBlockCacheConfig ({e})"
    tr = copy.deepcopy(pipe.transformer)
    counter = [0]
    for blk in _blocks(tr):
        first_attention(blk).register_forward_hook(lambda *a: counter.__setitem__(0, counter[0] + 1))
    try:
        enable_first_block_cache(tr, threshold)
    except Exception as e:  # noqa: BLE001 - reported in the table, not fatal for the other rows
        return None, None, f"{type(e).__name__}: {e}"
    new = copy.copy(pipe)
    new.transformer = tr
    return new, counter, None


def bench_family(family, args):
    import eekernels

    pipe, kw = build(family, args)
    fast = eekernels.accelerate(pipe, native=True)
    L = fast.transformer.model.num_blocks
    schedule = eekernels.ExitSchedule.preset("ase-demo", total_depth=L)
    ase = eekernels.accelerate(pipe, schedule=schedule, native=True)
    rows = []
    ref, t_ref = timed(pipe, kw, args.repeats)
    timesteps = pipe.scheduler.timesteps.clone()
    calls = len(timesteps)

    def row(system, images, seconds, fraction, note=""):
        rows.append(dict(family=family, system=system, images_per_s=args.batch / seconds, seconds=seconds,
                         speedup=t_ref / seconds, block_flop_fraction=fraction,
                         ideal_speedup=None if not fraction else 1 / fraction,
                         max_abs_diff=None if images is None else float((images.float() - ref.float()).abs().max()),
                         note=note))

    row("diffusers", ref, t_ref, 1.0)
    img, t = timed(fast, kw, args.repeats)
    row("eekernels full", img, t, 1.0)
    img, t = timed(ase, kw, args.repeats)
    row("eekernels ASE", img, t, schedule.block_flop_fraction(timesteps), f"schedule {list(schedule.table)}")
    if family in ("sd3", "flux"):
        fbc, counter, why = fbc_pipeline(pipe, args.fbc_threshold)
        if fbc is None:
            rows.append(dict(family=family, system="diffusers FBCache", note=f"not run: {why}"))
        else:
            try:
                img, t = timed(fbc, kw, args.repeats)
            except Exception as e:  # noqa: BLE001 - diffusers' hook may not handle this transformer
                rows.append(dict(family=family, system="diffusers FBCache",
                                 note=f"failed: {type(e).__name__}: {str(e)[:80]}"))
            else:
                ran = counter[0] / (args.repeats + 1)  # blocks per run (warm-up included in the count)
                row("diffusers FBCache", img, t, ran / (calls * len(_blocks(pipe.transformer))),
                    f"threshold {args.fbc_threshold}")
    return rows


def format_table(result) -> str:
    lines = ["| family | system | images/s | speed-up | block FLOPs | ideal | max abs diff | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if "images_per_s" not in r:
            lines.append(f"| {r['family']} | {r['system']} | - | - | - | - | - | {r['note']} |")
            continue
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        lines.append(f"| {r['family']} | {r['system']} | {r['images_per_s']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['block_flop_fraction']:.2f} | {r['ideal_speedup']:.2f}x | {diff} | {r['note']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="pixart,sd3,flux")
    p.add_argument("--size", type=int, default=16, help="latent side (the one-level VAE keeps it as the image side)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=1, help="images per call (CFG doubles the model batch)")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--caption-dim", type=int, default=64, help="caption token width (T5-XXL: 4096)")
    p.add_argument("--pooled-dim", type=int, default=48, help="pooled text width (SD3, FLUX)")
    p.add_argument("--double", type=int, default=None, help="FLUX: double-stream blocks of --blocks (default half)")
    p.add_argument("--qk-norm", action="store_true", help="SD3: SD3.5's QK RMSNorm")
    p.add_argument("--dual-layers", type=int, default=0, help="SD3: the first N blocks with SD3.5's dual attention")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--tokens", type=int, default=16, help="caption tokens")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--fbc-threshold", type=float, default=0.2)
    p.add_argument("--json", help="write the result as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        if family not in ("pixart", "sd3", "flux"):
            raise SystemExit(f"--families: expected pixart, sd3 and/or flux, got {family!r}")
        rows += bench_family(family, args)
    gpu = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else None
    result = dict(rows=rows, info=dict(device=args.device, gpu=gpu, dtype=args.dtype,
                                       cpu=platform.processor() or platform.machine(),
                                       threads=torch.get_num_threads(), torch=torch.__version__,
                                       date=datetime.date.today().isoformat(), args=vars(args)))
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
