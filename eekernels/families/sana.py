"""Sana: diffusers' ``SanaTransformer2DModel`` (``SanaPipeline``). Latents (B, C, H, W), patch size 1 (32x DC-AE).

Exit rule: ``transformer_blocks[:d]`` (``SanaTransformerBlock``: linear self-attention, cross-attention to the
caption, a Mix-FFN conv; one image stream in and out, not in diffusers' ``TransformerBlockRegistry``, so declared
here), then the model's own ``norm_out`` (modulated by the timestep) and ``proj_out``, and the unpatchify. A ControlNet
residual (``controlnet_block_samples``) is added by the model's loop after block i; with an exit, the residuals after
the cut are not added (the blocks they join do not run).

Timestep: flow matching, the transformer takes t = sigma * 1000 (``SanaPipeline`` multiplies the scheduler's timestep
by the model's ``config.timestep_scale``, 1.0 for every Sana text-to-image checkpoint), as eekernels' t.
"""
from eekernels.families import Family, PrefixExit, register

register(Family(
    name="sana",
    classes=("diffusers:SanaTransformer2DModel",),
    pipelines={"diffusers:SanaPipeline": ("transformer",)},
    exit=PrefixExit(blocks=("transformer_blocks",),
                    streams={"SanaTransformerBlock": (0, None, "hidden_states", None)}),
    prediction="flow",
    param_roles={"t-embedder": ("time_embed.",),
                 "caption": ("caption_projection.", "caption_norm."),
                 "embedders": ("patch_embed.", "time_embed.", "caption_projection.", "caption_norm.")},
    # The ASE reference's shape (DiT-XL/2's table over uniform t) mapped by trajectory position onto Sana's default
    # sampling (DPM-Solver++ on flow sigmas, shift 3, 20 steps), averaged per bin of sigma (data end first), for the
    # 1.6B's 20 blocks (rescaled for the 600M's 28): 0.695 of the block FLOPs at 20 steps, 0.699 at 50
    # (tests/families/test_sana.py).
    presets={"ase-sana": ((20, 20, 20, 20, 19, 17, 16, 14, 11, 9), 20, "sigma")},
))
