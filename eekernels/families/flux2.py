"""FLUX.2 (dev, klein): diffusers' ``Flux2Transformer2DModel`` (``Flux2Pipeline``, ``Flux2KleinPipeline``,
``Flux2KleinInpaintPipeline``).

Exit rule: d counts the double-stream ``transformer_blocks``, then the single-stream ``single_transformer_blocks``
(execution order); the model's own ``norm_out`` and ``proj_out`` run on the image tokens. Before the single blocks
the model concatenates the streams, text first (``[text; image]``), and each single block takes and returns that
joint stream; after them it keeps the image tokens. So a skipped block of either list returns its input streams
(diffusers' ``TransformerBlockRegistry`` knows both block classes), and with ``exit_policy="cache"`` an exit at a
double block takes the residual on the image tokens (the last ones) of the last single block's output
(``PrefixExit.joint``).

The transformer takes sigma in [0, 1] as its timestep (the pipelines pass ``t / 1000``; it multiplies by 1000
inside): ``timestep_scale=1000``. Flow matching, t = sigma * 1000.

``Flux2KleinKVPipeline`` is refused by name (the "flux2-kv" entry): see its reason.
"""
from eekernels.families import Family, PrefixExit, register

register(Family(
    name="flux2",
    classes=("diffusers:Flux2Transformer2DModel",),
    pipelines={"diffusers:Flux2Pipeline": ("transformer",), "diffusers:Flux2KleinPipeline": ("transformer",),
               "diffusers:Flux2KleinInpaintPipeline": ("transformer",)},
    exit=PrefixExit(blocks=("transformer_blocks", "single_transformer_blocks"),
                    joint={"single_transformer_blocks": "text-first"}),
    timestep_scale=1000.0,
    prediction="flow",
    # the guidance MLP (FLUX.2 dev) counts as part of the timestep MLP, as for FLUX.1
    param_roles={"t-embedder": ("time_guidance_embed.",),
                 "caption": ("context_embedder.",),
                 "embedders": ("time_guidance_embed.", "x_embedder.", "context_embedder.")},
    # About 0.70 of the block FLOPs (0.696; double and single blocks cost the same: 13 D^2 per token and the same
    # attention) for FLUX.2 dev (8 double + 48 single blocks) at its pipeline's default, 50 steps at 1024 px (the
    # empirical mu of 4096 tokens shifts 23 of the 50 calls above sigma 0.9), over ten equal bins of sigma, data end
    # first. Chosen as the ASE reference shape by trajectory position (call k of N gets the DiT table's fraction at
    # t = 1000 (1 - k / N)), averaged per bin, scaled toward full depth to hit 0.70, at most 5 levels. Rescaled by
    # block count for other sizes (klein 4B: 5 + 20 blocks; at its distilled 4 steps, 0.60 of the FLOPs).
    presets={"ase-flux2": ((56, 56, 56, 56, 56, 56, 53, 48, 41, 28), 56, "sigma")},
))

# The KV variant of klein's pipeline, refused by name: the calls of one run are not independent.
register(Family(
    name="flux2-kv",
    pipelines={"diffusers:Flux2KleinKVPipeline": ("transformer",)},
    refused="its first step fills each block's cache of the reference images' K/V, which the later steps read: a "
            "block skipped at the first step (an exit schedule is shallowest at high noise) breaks every later step "
            "that runs it, and the image stream is longer at the first step than after it (the cache policy's "
            "residuals do not carry over); accelerate its `transformer` alone and set the depths with "
            "eekernels.inplace.at_depth if you know the first step runs every block",
))
