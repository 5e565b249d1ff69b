"""HiDream-I1: diffusers' ``HiDreamImageTransformer2DModel`` (``HiDreamImagePipeline``).

Exit rule: d counts the double-stream ``double_stream_blocks``, then the single-stream ``single_stream_blocks``
(execution order); the model's own ``final_layer`` runs on the image tokens. Every block is a ``HiDreamBlock``
wrapper (one class for both lists, unknown to diffusers' ``TransformerBlockRegistry``): the double blocks return
``(image, text)``, the single blocks one joint stream, so the streams are declared per list. Before the single blocks
the model concatenates the streams image first (``[image; text]``) and appends one more Llama layer's tokens before
each single block, cutting them off after it: a skipped block returns its input, which the model cuts back the same
way. With ``exit_policy="cache"`` an exit at a double block takes the residual on the image tokens (the first ones)
of the last block's output (``PrefixExit.joint``).

The feed-forward is a mixture of experts (``MOEFeedForwardSwiGLU``): a skipped block routes no tokens. diffusers'
inference routing (``moe_infer``) reads the expert counts on the host (``.cpu().numpy()``), so the model itself
(plain, without eekernels) has graph breaks under ``torch.compile`` and a host sync per block on a GPU: the
in-place model has the same, only in the blocks that run.

The transformer takes the scheduler's t in [0, 1000) (``timesteps``), flow matching: t = sigma * 1000.
"""
from eekernels.families import Family, PrefixExit, register

register(Family(
    name="hidream",
    classes=("diffusers:HiDreamImageTransformer2DModel",),
    pipelines={"diffusers:HiDreamImagePipeline": ("transformer",)},
    exit=PrefixExit(blocks=("double_stream_blocks", "single_stream_blocks"),
                    streams={"double_stream_blocks": (0, 1, "hidden_states", "encoder_hidden_states"),
                             "single_stream_blocks": (0, None, "hidden_states", None)},
                    joint={"single_stream_blocks": "image-first"}),
    prediction="flow",
    param_roles={"t-embedder": ("t_embedder.",),
                 "caption": ("caption_projection.",),
                 "embedders": ("t_embedder.", "p_embedder.", "x_embedder.", "caption_projection.")},
    # About 0.70 of the block FLOPs (0.701, weighting each block by its FLOPs: a single block costs 1.04 of a double
    # one, its text tokens going through the experts too) for HiDream-I1 Full (16 double + 32 single blocks) at 1024
    # px, 50 UniPC steps with flow shift 3 (its published setting), over ten equal bins of sigma, data end first;
    # chosen as for "ase-flux2" (eekernels/families/flux2.py). Dev (28 Euler steps, shift 6): 0.62; Fast (16, shift
    # 3): 0.70.
    presets={"ase-hidream": ((48, 48, 48, 48, 43, 43, 38, 38, 27, 20), 48, "sigma")},
))
