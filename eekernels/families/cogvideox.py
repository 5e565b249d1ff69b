"""CogVideoX (2B, 5B, 1.5): diffusers' ``CogVideoXTransformer3DModel`` (``CogVideoXPipeline`` and its image-to-video
and video-to-video variants). Video latents ``(B, F, C, H, W)``.

Exit rule: ``transformer_blocks[:d]`` (``CogVideoXBlock``: video and text streams, in diffusers'
``TransformerBlockRegistry``), then the model's own ``norm_final``, ``norm_out`` and ``proj_out`` on the video stream;
the cut block's text output is not needed. Timesteps: the scheduler's integer t in [0, 1000) (CogVideoX's DDIM and
DPM schedulers, v-prediction; ``prediction`` below only distinguishes flow matching).
"""
from eekernels.families import Family, PrefixExit, register

register(Family(
    name="cogvideox",
    classes=("diffusers:CogVideoXTransformer3DModel",),
    pipelines={"diffusers:CogVideoXPipeline": ("transformer",),
               "diffusers:CogVideoXImageToVideoPipeline": ("transformer",),
               "diffusers:CogVideoXVideoToVideoPipeline": ("transformer",)},
    exit=PrefixExit(blocks=("transformer_blocks",)),
    param_roles={"t-embedder": ("time_proj.", "time_embedding.", "ofs_proj.", "ofs_embedding."),
                 "caption": ("patch_embed.text_proj.",),
                 "embedders": ("patch_embed.", "time_proj.", "time_embedding.", "ofs_proj.", "ofs_embedding.")},
    # The ASE reference's shape (DiT-XL/2's table over ten equal bins of t, data end first) for CogVideoX-5B's 42
    # blocks (rescaled for the 2B's 30 by ExitSchedule.preset(..., total_depth=30)). CogVideoX samples 50 DDIM
    # steps spaced evenly in t ("trailing"), so the calls fall evenly over the bins: 300 / 420 = 0.71 of the blocks.
    presets={"ase-cogvideox": ((42, 42, 36, 36, 30, 30, 24, 24, 18, 18), 42, "t")},
))
