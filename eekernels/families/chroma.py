"""Chroma: diffusers' ``ChromaTransformer2DModel`` (``ChromaPipeline``, ``ChromaImg2ImgPipeline``).

Exit rule: as FLUX.1, d counts the double-stream ``transformer_blocks``, then the single-stream
``single_transformer_blocks``; the model's own ``norm_out`` and ``proj_out`` run on the image tokens. Before the
single blocks the model concatenates the streams, text first, and each single block takes and returns that joint
stream (``PrefixExit.joint``: with ``exit_policy="cache"`` an exit at a double block takes the residual on the image
tokens of the last block's output). diffusers' ``TransformerBlockRegistry`` does not know Chroma's blocks: their
streams are declared here (the double block returns ``(text, image)``, the single block the joint stream).

The transformer takes sigma in [0, 1] as its timestep (the pipelines pass ``t / 1000``): ``timestep_scale=1000``.
Flow matching, t = sigma * 1000. The pipelines run classifier-free guidance as two calls per step without naming
them (no ``cache_context``): the cache policy keeps one exit cache per call position within a step.

``ChromaInpaintPipeline`` is not listed: in diffusers 0.42 it reads ``transformer.config.guidance_embeds``, which
``ChromaTransformer2DModel``'s config has not, and fails before its first step without eekernels.
"""
from eekernels.families import Family, PrefixExit, register

register(Family(
    name="chroma",
    classes=("diffusers:ChromaTransformer2DModel",),
    pipelines={"diffusers:ChromaPipeline": ("transformer",), "diffusers:ChromaImg2ImgPipeline": ("transformer",)},
    exit=PrefixExit(blocks=("transformer_blocks", "single_transformer_blocks"),
                    streams={"ChromaTransformerBlock": (1, 0, "hidden_states", "encoder_hidden_states"),
                             "ChromaSingleTransformerBlock": (0, None, "hidden_states", None)},
                    joint={"single_transformer_blocks": "text-first"}),
    timestep_scale=1000.0,
    prediction="flow",
    # Chroma's timestep MLP is the "distilled guidance layer" (the approximator), fed by a parameter-free projection
    param_roles={"t-embedder": ("distilled_guidance_layer.",),
                 "caption": ("context_embedder.",),
                 "embedders": ("time_text_embed.", "distilled_guidance_layer.", "x_embedder.", "context_embedder.")},
    # About 0.70 of the block FLOPs (0.701; double and single blocks cost the same, as in FLUX.1: 12 D^2 per token
    # and the same attention) for Chroma1-HD (19 double + 38 single blocks) at its pipeline's default, 35 steps at
    # 1024 px (dynamic shift, mu 1.15), over ten equal bins of sigma, data end first; chosen as for "ase-flux2"
    # (eekernels/families/flux2.py). 0.71 at 26 steps.
    presets={"ase-chroma": ((57, 57, 57, 57, 57, 49, 49, 40, 33, 25), 57, "sigma")},
))
