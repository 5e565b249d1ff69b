"""PixArt-alpha and PixArt-Sigma: diffusers' ``PixArtTransformer2DModel`` (``PixArtAlphaPipeline``,
``PixArtSigmaPipeline``).

Exit rule: ``transformer_blocks[:d]``, then the model's own final layer (as DiT). Epsilon prediction with learned
sigma; t in [0, 1000).
"""
from eekernels.families import Family, PrefixExit, register


def _native_from_diffusers(module):
    from eekernels.models.share import native_from_diffusers
    from eekernels.models.convert import pixart as conv
    from eekernels.models.pixart import PixArt

    def source(model, module, state):
        return {**state, **conv.diffusers_to_original("accelerate", state)}  # aliases of the original's tensors

    return native_from_diffusers(PixArt, module, source)


register(Family(
    name="pixart",
    classes=("diffusers:PixArtTransformer2DModel",),
    pipelines={"diffusers:PixArtAlphaPipeline": ("transformer",), "diffusers:PixArtSigmaPipeline": ("transformer",)},
    exit=PrefixExit(blocks=("transformer_blocks",)),
    native="eekernels.models.pixart:PixArt",
    native_build=_native_from_diffusers,
    native_adapter="eekernels._accelerate:DiffusersPixArt",
    configs="eekernels.models.pixart:PIXART_CONFIGS",
    checkpoint_keys={"pixart": ("t_block.1.weight",), "diffusers": ("adaln_single.linear.weight",)},
    param_roles={"t-embedder": ("t_embedder.", "t_block.", "adaln_single."),
                 "caption": ("caption_projection.", "y_embedder."),
                 "embedders": ("t_embedder.", "t_block.", "adaln_single.", "y_embedder.", "x_embedder.",
                               "caption_projection.", "pos_embed.")},
))
