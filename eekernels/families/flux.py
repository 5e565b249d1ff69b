"""FLUX.1 (dev, schnell): diffusers' ``FluxTransformer2DModel`` (``FluxPipeline``).

Exit rule: d counts the double-stream ``transformer_blocks``, then the single-stream ``single_transformer_blocks``
(execution order); the model's own ``norm_out`` and ``proj_out`` run on the image stream. The transformer takes
sigma in [0, 1] as its timestep (it multiplies by 1000 inside): ``timestep_scale=1000``.
"""
from eekernels.families import Family, PrefixExit, register


def _native_from_diffusers(module):
    from eekernels.models.share import native_from_diffusers
    from eekernels.models.convert import flux as conv
    from eekernels.models.flux import Flux

    def source(model, module, state):
        return {**state, **conv.diffusers_to_original("accelerate", state)}  # aliases of the original's tensors

    return native_from_diffusers(Flux, module, source)


register(Family(
    name="flux",
    classes=("diffusers:FluxTransformer2DModel",),
    pipelines={"diffusers:FluxPipeline": ("transformer",)},
    exit=PrefixExit(blocks=("transformer_blocks", "single_transformer_blocks")),
    timestep_scale=1000.0,
    prediction="flow",
    native="eekernels.models.flux:Flux",
    native_build=_native_from_diffusers,
    native_adapter="eekernels._accelerate:DiffusersFlux",
    configs="eekernels.models.flux:FLUX_CONFIGS",
    checkpoint_keys={"bfl": ("double_blocks.0.img_attn.qkv.weight",),
                     "diffusers": ("single_transformer_blocks.0.proj_mlp.weight",)},
    # native (BFL names) and diffusers names; FLUX-dev's guidance MLP counts as part of the timestep MLP
    param_roles={"t-embedder": ("time_in.", "guidance_in.", "time_text_embed.timestep_embedder.",
                                "time_text_embed.guidance_embedder."),
                 "caption": ("context_embedder.", "txt_in."),
                 "embedders": ("time_in.", "guidance_in.", "time_text_embed.", "vector_in.", "img_in.", "x_embedder.",
                               "txt_in.", "context_embedder.")},
    # 20/28 of the blocks (the ASE reference's fraction) under a 28-step shift-3 flow schedule, over ten equal bins of
    # sigma (FLUX.1: 19 double + 38 single blocks, in execution order); see the sd3 family for how it was chosen.
    presets={"ase-flux": ((57, 57, 57, 57, 57, 46, 46, 41, 33, 26), 57, "sigma")},
))
