"""Qwen-Image and Qwen-Image-Edit: diffusers' ``QwenImageTransformer2DModel`` (``QwenImagePipeline``,
``QwenImageEditPipeline``).

Exit rule: ``transformer_blocks[:d]`` (double-stream blocks: image and text streams, diffusers'
``TransformerBlockRegistry`` says which output is which), then the model's own ``norm_out`` and ``proj_out`` on the
image stream; the cut block's text stream is not needed. The Edit pipeline's condition-image tokens ride in the image
stream after the target's, and the pipeline keeps the target's part of the output, as at full depth.

Timestep: the pipelines pass sigma in [0, 1] (``timestep / 1000``; the model's ``Timesteps`` scales by 1000 inside):
``timestep_scale=1000``, flow matching, the preset in bins of sigma.
"""
from eekernels.families import Family, PrefixExit, register

register(Family(
    name="qwenimage",
    classes=("diffusers:QwenImageTransformer2DModel",),
    pipelines={"diffusers:QwenImagePipeline": ("transformer",),
               "diffusers:QwenImageEditPipeline": ("transformer",)},
    exit=PrefixExit(blocks=("transformer_blocks",)),
    timestep_scale=1000.0,
    prediction="flow",
    param_roles={"t-embedder": ("time_text_embed.timestep_embedder.",),
                 "caption": ("txt_norm.", "txt_in."),
                 "embedders": ("time_text_embed.", "img_in.", "txt_norm.", "txt_in.")},
    # About 0.71 of the block FLOPs (every block costs the same): the pipelines' default 50 steps at 1024 px (4096
    # image tokens) under Qwen-Image's scheduler (dynamic exponential shift, base/max shift 0.5/0.9 over 256..8192
    # tokens, shift_terminal 0.02), whose calls per sigma bin (data end first) are [3, 3, 3, 3, 5, 4, 6, 6, 8, 9].
    # The table is the monotone 5-level table nearest (call-weighted) to the ASE DiT shape mapped by trajectory
    # position, over 60 blocks: fewer blocks toward the noise end.
    presets={"ase-qwenimage": ((60, 60, 60, 51, 51, 51, 41, 41, 33, 26), 60, "sigma")},
))
