"""eekernels.accelerate on flow-matching pipelines: StableDiffusion3Pipeline and FluxPipeline (FLUX.1-dev shape).

In place (the default): each pipeline keeps its own transformer; hooks run ``schedule.depth(t)`` of its blocks per
step (FLUX: the double-stream blocks, then the single-stream ones, in execution order). Flow matching in
eekernels' units: t = sigma * 1000 (what SD3's transformer receives; FluxPipeline passes sigma, and the family
table's ``timestep_scale`` of FLUX multiplies it by 1000), so an ``ExitSchedule`` over t in [0, 1000) reads the
same for both: t near 1000 is noise.

Both pipelines come from tiny random configs with caption embeddings passed in (nothing downloaded).

    python python/examples/06_flow_matching.py --steps 6 --out ex06
"""
import argparse
import os

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline)

import eekernels


def randomized(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = 0.3 / p[0].numel() ** 0.5 if p.dim() >= 2 else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * scale + (0.0 if p.dim() >= 2 else 0.1))
    return module.eval()


def tiny_vae():
    return randomized(AutoencoderKL(block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                                    up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                                    scaling_factor=0.7, shift_factor=0.1), 1)


def sd3_pipeline():
    tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=6, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                               pooled_projection_dim=20, out_channels=4, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(transformer=randomized(tr, 0), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline():
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=3, num_single_layers=3, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20,
                                guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=randomized(tr, 0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check(name, pipe, call, out_png):
    def run(p, **kw):
        return p(generator=torch.Generator().manual_seed(1), **{**call, **kw}).images

    want = run(pipe, output_type="pt")
    eekernels.accelerate(pipe)  # in place, full depth
    got = run(pipe, output_type="pt")
    assert torch.equal(got, want), f"{name}: full depth must give the plain pipeline's images bit for bit"
    eekernels.disable(pipe)

    tr = pipe.transformer
    blocks = list(tr.transformer_blocks) + list(getattr(tr, "single_transformer_blocks", []))
    schedule = eekernels.ExitSchedule.preset("ase-demo", total_depth=len(blocks))
    eekernels.accelerate(pipe, schedule=schedule)
    seen = []  # blocks run per transformer call (a skipped block's own modules do not run)
    tr.register_forward_pre_hook(lambda m, a: seen.append(0))
    for block in blocks:
        block.attn.register_forward_pre_hook(lambda m, a: seen.__setitem__(-1, seen[-1] + 1))
    early = run(pipe, output_type="pt")
    sigmas_x1000 = pipe.scheduler.timesteps  # FlowMatchEuler's timesteps are sigma * 1000
    assert seen == schedule.depth(sigmas_x1000).tolist() and min(seen) < len(blocks), seen
    frac = schedule.block_flop_fraction(sigmas_x1000)
    print(f"{name}: full depth in place bit-identical; ASE blocks per step {seen} ({frac:.2f} of the block FLOPs), "
          f"max diff from full {float((early - got).abs().max()):.1e}")
    seen.clear()
    run(pipe)[0].save(out_png)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default="ex06")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    # SD3: CLIP+T5 caption states (B, L, 24) and pooled CLIP (B, 20), and the negative prompt's; CFG 5.
    sd3 = dict(prompt_embeds=torch.randn(2, 10, 24, generator=g), pooled_prompt_embeds=torch.randn(2, 20, generator=g),
               negative_prompt_embeds=torch.randn(2, 10, 24, generator=g),
               negative_pooled_prompt_embeds=torch.randn(2, 20, generator=g), guidance_scale=5.0,
               num_inference_steps=args.steps)
    check("SD3", sd3_pipeline(), sd3, os.path.join(args.out, "sd3.png"))

    # FLUX.1-dev: T5 states and pooled CLIP; guidance_scale feeds the guidance embedding (no CFG batch).
    flux = dict(prompt_embeds=torch.randn(2, 10, 24, generator=g), pooled_prompt_embeds=torch.randn(2, 20, generator=g),
                guidance_scale=3.5, num_inference_steps=args.steps, height=16, width=24)
    check("FLUX", flux_pipeline(), flux, os.path.join(args.out, "flux.png"))
    print(f"wrote {args.out}/sd3.png and {args.out}/flux.png")


if __name__ == "__main__":
    main()
