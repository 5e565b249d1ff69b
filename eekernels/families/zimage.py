"""Z-Image (Turbo and base): diffusers' ``ZImageTransformer2DModel`` (``ZImagePipeline``).

Exit rule: depth d runs the first d of the main ``layers`` (single-stream blocks over the joint image + caption
sequence), then the model's own final layer and unpatchify. The ``noise_refiner`` (image tokens alone) and
``context_refiner`` (caption tokens alone) blocks run before the joint sequence exists and always run; they are not
counted in the depth (d = 30 is Z-Image's 30 layers) and carry no hooks. Diffusers' ``TransformerBlockRegistry``
names the block's image-stream argument ``hidden_states``, but ``ZImageTransformerBlock.forward`` takes ``x``: the
stream is declared here.

Timestep: the pipeline passes ``(1000 - t) / 1000`` = 1 - sigma to the model (t near 1 meaning clean, the reverse
of eekernels' t), so a direct call's t is ``1000 - 1000 * timestep`` (``timestep_offset=1000``,
``timestep_scale=-1000``). In a pipeline the depth comes from the scheduler's own timesteps (t = sigma * 1000), and
the preset is in bins of sigma like every flow family's.
"""
from eekernels.families import Family, PrefixExit, register

register(Family(
    name="zimage",
    classes=("diffusers:ZImageTransformer2DModel",),
    pipelines={"diffusers:ZImagePipeline": ("transformer",)},
    exit=PrefixExit(blocks=("layers",), streams={"layers": (0, None, "x", None)}),
    timestep_scale=-1000.0,
    timestep_offset=1000.0,
    prediction="flow",
    param_roles={"t-embedder": ("t_embedder.",),
                 "caption": ("cap_embedder.", "cap_pad_token"),
                 "embedders": ("t_embedder.", "cap_embedder.", "all_x_embedder.", "x_pad_token", "cap_pad_token")},
    # 0.70 of the main layers' FLOPs (0.72 counting the always-run refiners) under Z-Image-Turbo's 9-step schedule
    # (the pipeline's linspace(1, 1/9, 9) sigmas under the scheduler's static shift 3): calls per sigma bin (data end
    # first) [0, 0, 1, 0, 1, 1, 0, 2, 1, 3]. The ASE DiT shape mapped by trajectory position, over 30 layers.
    presets={"ase-zimage-turbo": ((30, 30, 30, 26, 26, 26, 22, 22, 18, 15), 30, "sigma")},
))
