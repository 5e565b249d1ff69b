"""FLUX.1 (dev, schnell): diffusers' ``FluxTransformer2DModel`` (``FluxPipeline``).

Exit rule: d counts the double-stream ``transformer_blocks``, then the single-stream ``single_transformer_blocks``
(execution order); the model's own ``norm_out`` and ``proj_out`` run on the image stream. The transformer takes
sigma in [0, 1] as its timestep (it multiplies by 1000 inside): ``timestep_scale=1000``.
"""
from eekernels.families import Family, PrefixExit, register

register(Family(
    name="flux",
    classes=("diffusers:FluxTransformer2DModel",),
    pipelines={"diffusers:FluxPipeline": ("transformer",)},
    exit=PrefixExit(blocks=("transformer_blocks", "single_transformer_blocks")),
    timestep_scale=1000.0,
    prediction="flow",
    native="eekernels.models.flux:Flux",
    configs="eekernels.models.flux:FLUX_CONFIGS",
    checkpoint_keys={"bfl": ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"),
                     "diffusers": ("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.proj_mlp.weight")},
    param_roles={"t-embedder": ("time_text_embed.timestep_embedder.", "time_in."),
                 "caption": ("context_embedder.", "txt_in."),
                 "embedders": ("time_text_embed.", "time_in.", "vector_in.", "guidance_in.", "x_embedder.", "img_in.",
                               "context_embedder.", "txt_in.")},
    presets={"ase-flux": ((57, 57, 57, 57, 57, 46, 46, 41, 33, 26), 57)},
))
