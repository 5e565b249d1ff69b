"""ACE-Step 1.5 (music): diffusers' ``AceStepTransformer1DModel`` (``AceStepPipeline``). Latents (B, T, C): a 1-D
sequence of audio frames.

Exit rule: ``layers[:d]`` (``AceStepTransformerBlock``: self-attention, sliding-window or full by layer, then
cross-attention to the packed text / lyric / timbre condition; one stream, not in diffusers'
``TransformerBlockRegistry``, so declared here), then the model's own ``norm_out`` (modulated by the timestep), the
transposed-conv de-patchify and the crop to the input length: every depth keeps the output's (B, T, C).

Timestep: flow matching, but in [0, 1]: the pipeline's scheduler is built with ``num_train_timesteps=1`` and its
timesteps are sigma itself, and the model takes sigma (``timestep`` and ``timestep_r``): t = 1000 * sigma, both for
the loop (``step_t=scaled_step_t(1000.0)``) and for direct calls (``timestep_scale``).
"""
from eekernels.families import Family, PrefixExit, register, scaled_step_t

register(Family(
    name="ace_step",
    classes=("diffusers:AceStepTransformer1DModel",),
    pipelines={"diffusers:AceStepPipeline": ("transformer",)},
    exit=PrefixExit(blocks=("layers",), streams={"AceStepTransformerBlock": (0, None, "hidden_states", None)}),
    prediction="flow",
    timestep_scale=1000.0,
    step_t=scaled_step_t(1000.0),
    param_roles={"t-embedder": ("time_embed.", "time_embed_r."),
                 "caption": ("condition_embedder.",),
                 "embedders": ("proj_in_conv.", "time_embed.", "time_embed_r.", "condition_embedder.")},
    # The ASE reference's shape (DiT-XL/2's table over uniform t) mapped by trajectory position onto the pipeline's
    # default sampling (8 Euler steps, sigmas linear from 1 with shift 3: the turbo checkpoints' table), averaged per
    # bin of sigma (data end first) and nudged up to about 0.7 at those 8 calls, for the 2B's 24 blocks: 0.70 of the
    # block FLOPs at 8 steps, 0.74 at 50 (tests/families/test_ace_step.py).
    presets={"ase-ace-step": ((24, 24, 24, 24, 22, 21, 20, 18, 15, 12), 24, "sigma")},
))
