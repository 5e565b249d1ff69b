"""HunyuanVideo 1.5: diffusers' ``HunyuanVideo15Transformer3DModel`` (``HunyuanVideo15Pipeline``,
``HunyuanVideo15ImageToVideoPipeline``). Video latents ``(B, C, F, H, W)``.

Exit rule: ``transformer_blocks[:d]`` (``HunyuanVideo15TransformerBlock``: double-stream, video and text; not in
diffusers' ``TransformerBlockRegistry``, so its streams are declared here), then the model's own ``norm_out`` and
``proj_out`` on the video stream; the cut block's text output is not needed. Flow matching, t = sigma * 1000 (the
scheduler's timesteps and the model's ``timestep`` argument).

The model itself does not compile with ``fullgraph=True`` (its forward branches on ``torch.all(image_embeds == 0)``
and indexes the text tokens with boolean masks); accelerating it adds no graph break of its own
(tests/families/test_hunyuanvideo15.py).
"""
from eekernels.families import Family, PrefixExit, register

register(Family(
    name="hunyuanvideo15",
    classes=("diffusers:HunyuanVideo15Transformer3DModel",),
    pipelines={"diffusers:HunyuanVideo15Pipeline": ("transformer",),
               "diffusers:HunyuanVideo15ImageToVideoPipeline": ("transformer",)},
    exit=PrefixExit(blocks=("transformer_blocks",),
                    streams={"HunyuanVideo15TransformerBlock": (0, 1, "hidden_states", "encoder_hidden_states")}),
    prediction="flow",
    param_roles={"t-embedder": ("time_embed.",),
                 "caption": ("context_embedder.", "context_embedder_2.", "image_embedder.", "cond_type_embed."),
                 "embedders": ("x_embedder.", "time_embed.", "context_embedder.", "context_embedder_2.",
                               "image_embedder.", "cond_type_embed.")},
    # HunyuanVideo 1.5's 54 blocks over ten equal bins of sigma (data end first), written for its 50 steps under a
    # shift-7 flow schedule: 0.71 of the block FLOPs over those calls (0.75 under shift 5, 0.68 under shift 9). The
    # ASE reference's shape (DiT-XL/2's table over uniform t) mapped by trajectory position: each call gets the
    # reference depth at the same fraction of the trajectory, averaged per bin (tests/families/test_hunyuanvideo15.py
    # checks the fraction).
    presets={"ase-hunyuanvideo15": ((54, 54, 54, 54, 54, 54, 50, 46, 40, 28), 54, "sigma")},
))
