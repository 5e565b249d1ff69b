"""eekernels.accelerate on diffusers pipelines: DiTPipeline and DDPMPipeline keep their __call__ and scheduler.

``eekernels.accelerate(pipe, schedule=...)`` works in place (the default tier): ``pipe`` keeps its own transformer
or U-Net object, parameters and state_dict keys; hooks choose, per call, how many of its blocks run. Everything
else is the pipeline's own: its arguments, its scheduler (swap it as usual), its VAE, save_pretrained, LoRA.
``eekernels.disable(pipe)`` gives the plain pipeline back. ``native=True`` is the other tier: a new pipeline
around eekernels' fused copy of the model (sharing the weights), the fastest path for DiT, U-ViT, U-Net, PixArt,
SD3 and FLUX.1.

By default the pipelines are built from tiny random configs so that this runs anywhere in seconds. With
``--dit-model-id facebook/DiT-XL-2-256`` (downloads ~2.7 GB) the same lines run the real DiT-XL/2.

    python python/examples/02_diffusers_pipeline.py --out /tmp/ex02
"""
import argparse
import os
import time

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiTPipeline,
                       DiTTransformer2DModel, DPMSolverMultistepScheduler, UNet2DModel)

import eekernels


# --------------------------------------------------------------------------------------------------
# Tiny random pipelines (from configs; nothing downloaded)
# --------------------------------------------------------------------------------------------------
def tiny_dit_pipeline():
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=6, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    # diffusers keeps one timestep/label embedder per block; converted DiT checkpoints hold identical copies.
    emb = transformer.transformer_blocks[0].norm1.emb.state_dict()
    for block in transformer.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(emb)
    vae = AutoencoderKL(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    return DiTPipeline(transformer.eval(), vae.eval(), DDIMScheduler(), id2label={207: "golden retriever"})


def tiny_ddpm_pipeline():
    unet = UNet2DModel(sample_size=16, block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    return DDPMPipeline(unet.eval(), DDPMScheduler())


def timed(pipe, **kwargs):
    t0 = time.perf_counter()
    images = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    return images, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dit-model-id", help="a DiTPipeline on the Hub, e.g. facebook/DiT-XL-2-256 (downloads)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="ex02")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)

    # ---- DiTPipeline: class-conditional, CFG, a VAE
    if args.dit_model_id:
        pipe = DiTPipeline.from_pretrained(args.dit_model_id, torch_dtype=torch.float16)
    else:
        pipe = tiny_dit_pipeline()
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    labels = pipe.get_label_ids(["golden retriever"]) * 4

    call = dict(class_labels=labels, guidance_scale=4.0, num_inference_steps=args.steps)
    timed(pipe, **call)  # warm-up
    want, t_orig = timed(pipe, **call)
    transformer = pipe.transformer

    assert eekernels.accelerate(pipe) is pipe and pipe.transformer is transformer  # in place, full depth
    got, t_full = timed(pipe, **call)
    assert (got == want).all(), "full depth in place gives the plain pipeline's images bit for bit"
    eekernels.disable(pipe)

    depth = len(transformer.transformer_blocks)
    schedule = eekernels.ExitSchedule.preset("ase-demo", total_depth=depth)
    eekernels.accelerate(pipe, schedule=schedule)  # early exit: depth = schedule.depth(t) per step
    ase, t_ase = timed(pipe, **call)
    frac = schedule.block_flop_fraction(pipe.scheduler.timesteps)
    eekernels.disable(pipe)
    native = eekernels.accelerate(pipe, schedule=schedule, native=True)  # a new pipeline; `pipe` stays plain
    nat, t_nat = timed(native, **call)
    print(f"DiTPipeline  plain {t_orig:.3f}s | in place full {t_full:.3f}s (bit-identical) | in place ASE "
          f"{t_ase:.3f}s, native ASE {t_nat:.3f}s (max diff {abs(nat - ase).max():.1e}) at {frac:.2f} of the block "
          "FLOPs")

    # The pipeline's own scheduler swap keeps working: DPM-Solver++ on the accelerated pipeline.
    eekernels.accelerate(pipe, schedule=schedule)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    images = pipe(generator=torch.Generator().manual_seed(0), **call).images  # PIL images
    images[0].save(os.path.join(args.out, "dit.png"))

    # ---- DDPMPipeline: an unconditional UNet2DModel; depth counts resolution levels from the top
    pipe = tiny_ddpm_pipeline().to(args.device)
    pipe.set_progress_bar_config(disable=True)
    want, t_orig = timed(pipe, batch_size=4, num_inference_steps=args.steps)
    eekernels.accelerate(pipe)
    got, t_full = timed(pipe, batch_size=4, num_inference_steps=args.steps)
    assert (got == want).all(), "full depth in place gives the plain pipeline's images bit for bit"
    eekernels.disable(pipe)
    levels = len(pipe.unet.down_blocks)
    # Full depth near the data end, one level fewer in the noisier 60% of the trajectory.
    schedule = eekernels.ExitSchedule.piecewise([levels] * 4 + [levels - 1] * 6)
    eekernels.accelerate(pipe, schedule=schedule)
    ase, t_ase = timed(pipe, batch_size=4, num_inference_steps=args.steps)
    print(f"DDPMPipeline plain {t_orig:.3f}s | in place full {t_full:.3f}s (bit-identical) | "
          f"{levels - 1} of {levels} levels for t >= 400: {t_ase:.3f}s")
    pipe.numpy_to_pil(ase)[0].save(os.path.join(args.out, "ddpm.png"))
    print(f"wrote {args.out}/dit.png and {args.out}/ddpm.png")


if __name__ == "__main__":
    main()
