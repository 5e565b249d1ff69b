"""U-Net: diffusers' ``UNet2DModel`` (``DDPMPipeline``, ``DDIMPipeline``).

Exit rule: resolution levels from the top. ``depth = d`` runs levels 0..d-1; the deeper levels, the mid block and
their up blocks are skipped, and the up block of level d-1 receives zeros (``drop``) or the value cached at the
last full-depth call (``cache``, as DeepCache) in place of the skipped part's output.
"""
from eekernels.families import Family, LevelExit, register


def _native_from_diffusers(module):
    from eekernels.models.share import native_from_diffusers
    from eekernels.models import convert
    from eekernels.models.unet import UNet

    return native_from_diffusers(UNet, module, lambda model, module, state: convert.diffusers_unet_to_ours(model, state))


register(Family(
    name="unet",
    classes=("diffusers:UNet2DModel",),
    pipelines={"diffusers:DDPMPipeline": ("unet",), "diffusers:DDIMPipeline": ("unet",)},
    exit=LevelExit(),
    native="eekernels.models.unet:UNet",
    native_build=_native_from_diffusers,
    native_adapter="eekernels._accelerate:DiffusersUNet",
    configs="eekernels.models.unet:UNET_CONFIGS",
    param_roles={"t-embedder": ("time_embedding.",), "embedders": ("time_embedding.", "class_embedding.")},
))
