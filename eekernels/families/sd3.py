"""SD3 / SD3.5 (MMDiT): diffusers' ``SD3Transformer2DModel`` (``StableDiffusion3Pipeline``).

Exit rule: ``transformer_blocks[:d]`` (joint blocks, two streams), then ``norm_out`` and ``proj_out`` on the image
stream; the cut block's text output is not needed. Flow matching, t = sigma * 1000 (the scheduler's timesteps).
"""
from eekernels.families import Family, PrefixExit, register


def _native_from_diffusers(module):
    from eekernels.models.share import native_from_diffusers
    from eekernels.models.convert import sd3 as conv
    from eekernels.models.sd3 import SD3

    def source(model, module, state):
        return {**state, **conv.diffusers_to_original("accelerate", state)}  # aliases of the original's tensors

    return native_from_diffusers(SD3, module, source)


register(Family(
    name="sd3",
    classes=("diffusers:SD3Transformer2DModel",),
    pipelines={"diffusers:StableDiffusion3Pipeline": ("transformer",)},
    exit=PrefixExit(blocks=("transformer_blocks",)),
    prediction="flow",
    # The ASE reference's block fraction (20/28) under a 28-step shift-3 flow schedule (FlowMatchEulerDiscreteScheduler
    # (shift=3), SD3's default), over ten equal bins of sigma: the calls per bin there are [1, 2, 1, 1, 2, 2, 3, 4, 5,
    # 7] (data end first), so the table keeps more depth toward the noise end than the DiT reference does. Chosen as
    # the monotone table of at most 5 levels nearest (call-weighted) to the DiT shape mapped by trajectory position.
    presets={"ase-sd3": ((24, 24, 24, 24, 20, 20, 20, 17, 15, 11), 24, "sigma")},
    native="eekernels.models.sd3:SD3",
    native_build=_native_from_diffusers,
    native_adapter="eekernels._accelerate:DiffusersSD3",
    configs="eekernels.models.sd3:SD3_CONFIGS",
    checkpoint_keys={"stability": ("joint_blocks.0.x_block.attn.qkv.weight",),
                     "single file": ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",),
                     "diffusers": ("transformer_blocks.0.norm1_context.linear.weight", "pos_embed.proj.weight")},
    param_roles={"t-embedder": ("t_embedder.", "time_text_embed.timestep_embedder."),
                 "caption": ("context_embedder.",),
                 "embedders": ("t_embedder.", "y_embedder.", "x_embedder.", "context_embedder.", "time_text_embed.",
                               "pos_embed.")},
))
