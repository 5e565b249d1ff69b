"""eekernels.accelerate on a text-to-image pipeline: PixArt-α keeps its __call__, prompts and scheduler.

``eekernels.accelerate(pipe)`` works in place: the pipeline keeps its own ``PixArtTransformer2DModel``; at full
depth it gives the same images bit for bit; with an ``ExitSchedule`` each step runs ``schedule.depth(t)`` of the
transformer's blocks (both CFG halves at the same depth), chosen on the host from the pipeline's own timesteps.
``native=True`` gives a new pipeline around eekernels' fused PixArt instead (sharing the weights).

The pipeline is built from a tiny random config (a T5-sized caption width of 32, 6 blocks, a one-level VAE), and
the prompts go in as caption embeddings, so nothing is downloaded. With a real checkpoint the same two lines
apply: ``pipe = PixArtAlphaPipeline.from_pretrained("PixArt-alpha/PixArt-XL-2-512x512")`` then
``eekernels.accelerate(pipe, schedule=...)`` and ``pipe(prompt="...")``.

    python python/examples/05_text_to_image.py --steps 6 --out ex05.png
"""
import argparse
import time

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PixArtAlphaPipeline
from diffusers import PixArtTransformer2DModel

import eekernels


def randomized(module, seed):
    """Every parameter random (a fresh config zero-initializes adaLN and output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = 0.3 / p[0].numel() ** 0.5 if p.dim() >= 2 else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * scale + (0.0 if p.dim() >= 2 else 0.1))
    return module.eval()


def tiny_pixart_pipeline():
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                           out_channels=8, num_layers=6, cross_attention_dim=32, caption_channels=32,
                                           sample_size=16, patch_size=2, norm_type="ada_norm_single")
    vae = AutoencoderKL(block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=randomized(vae, 1),
                               transformer=randomized(transformer, 0), scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--num-images", type=int, default=2)
    p.add_argument("--out", default="ex05.png")
    args = p.parse_args()

    pipe = tiny_pixart_pipeline()
    n, g = args.num_images, torch.Generator().manual_seed(0)
    # What a T5 encoder would give for the prompts (n, tokens, 32) and their padding masks, and for "".
    mask = torch.ones(n, 12, dtype=torch.long)
    mask[:, 9:] = 0
    call = dict(prompt_embeds=torch.randn(n, 12, 32, generator=g), prompt_attention_mask=mask,
                negative_prompt_embeds=torch.randn(n, 12, 32, generator=g),
                negative_prompt_attention_mask=torch.ones(n, 12, dtype=torch.long),
                negative_prompt=None,  # diffusers defaults it to "", which it refuses beside negative_prompt_embeds
                guidance_scale=4.5, num_inference_steps=args.steps, use_resolution_binning=False)

    def images(pipeline, **kw):
        t0 = time.perf_counter()
        out = pipeline(generator=torch.Generator().manual_seed(1), output_type="pt", **{**call, **kw}).images
        return out, time.perf_counter() - t0

    # 1. Full depth, in place: the same images as the plain pipeline, bit for bit.
    want, t_orig = images(pipe)
    eekernels.accelerate(pipe)
    got, t_full = images(pipe)
    print(f"PixArt-α plain {t_orig:.3f}s | in place, full depth {t_full:.3f}s, bit-identical: {torch.equal(got, want)}")
    assert torch.equal(got, want), "full depth must give the plain pipeline's images"
    eekernels.disable(pipe)

    # 2. Early exit: the ASE reference schedule rescaled to 6 blocks (about 0.7 of the block FLOPs).
    blocks = pipe.transformer.transformer_blocks
    schedule = eekernels.ExitSchedule.preset("ase-demo", total_depth=len(blocks))
    eekernels.accelerate(pipe, schedule=schedule)
    seen = []  # blocks run per transformer call
    pipe.transformer.register_forward_pre_hook(lambda m, a: seen.append(0))
    for block in blocks:  # a skipped block's own modules do not run
        block.ff.register_forward_pre_hook(lambda m, a: seen.__setitem__(-1, seen[-1] + 1))
    early, t_ase = images(pipe)
    want_depths = schedule.depth(pipe.scheduler.timesteps).tolist()
    assert seen == want_depths, (seen, want_depths)  # one depth per step, shared by both CFG halves
    frac = schedule.block_flop_fraction(pipe.scheduler.timesteps)
    print(f"ASE schedule {t_ase:.3f}s: blocks run per step {seen} ({frac:.2f} of the block FLOPs), "
          f"max diff from full depth {float((early - got).abs().max()):.1e}")
    assert min(seen) < len(blocks)

    # 3. Any scheduler the pipeline takes: swap it as usual.
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pil = pipe(generator=torch.Generator().manual_seed(1), **call).images
    pil[0].save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
