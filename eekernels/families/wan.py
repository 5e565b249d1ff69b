"""Wan 2.1 and 2.2: diffusers' ``WanTransformer3DModel`` (``WanPipeline``, ``WanImageToVideoPipeline``,
``WanVideoToVideoPipeline``), latents (B, C, F, H, W).

Exit rule: ``blocks[:d]`` (one stream: a block maps the video tokens to video tokens; the text, and for Wan 2.1 I2V
the image tokens, enter every block as ``encoder_hidden_states`` and are not changed by it), then the model's own
``norm_out`` / ``proj_out`` modulated by the timestep and the unpatchify. I2V's conditioning (the encoded first
frame and its mask, concatenated to the latents on the channels) is read by ``patch_embedding`` before the blocks,
so every depth keeps it. Wan 2.2 TI2V-5B's per-token timestep (``expand_timesteps``) only changes the modulation's
shape; the rule is the same.

Timestep: flow matching, the transformer takes t = sigma * 1000 (the scheduler's timesteps: UniPC with
``use_flow_sigmas`` truncates them to integers, FlowMatchEuler keeps them as floats), as eekernels' t.

Wan 2.2 A14B runs two experts: ``transformer`` at t >= ``boundary_ratio * num_train_timesteps`` (high noise) and
``transformer_2`` below it (:func:`route`, the pipeline's own rule). Each has its own depth plan:
``accelerate(pipe, schedule={"transformer": s1, "transformer_2": s2})``; ``eekernels.inplace.plan(pipe, steps)``
says per step which expert runs and at which depth. With ``exit_policy="cache"`` give each expert a schedule whose
first step in its range runs full depth (its cache is filled by its own full calls).

Context parallelism (diffusers' ``enable_parallelism`` with a ``ContextParallelConfig``) splits the video tokens
at ``blocks.0`` and gathers them at ``proj_out``: the exit hooks sit on the blocks in between, every rank takes
the same depth (the host timestep, the same on every rank) and so runs the same collectives; block 0 always runs
(the smallest depth is 1). benchmarks/wan_context_parallel.py checks it on two processes.
"""
from eekernels.families import Family, PrefixExit, register

EXPERTS = ("transformer", "transformer_2")


def route(pipe, t: float) -> str:
    """The expert a Wan pipeline calls at host timestep ``t``: ``transformer`` when the pipeline has no
    ``boundary_ratio`` (Wan 2.1, Wan 2.2 TI2V-5B) or ``t >= boundary_ratio * num_train_timesteps``, else
    ``transformer_2`` (as ``WanPipeline.__call__`` and ``WanImageToVideoPipeline.__call__`` choose)."""
    ratio = getattr(pipe.config, "boundary_ratio", None)
    if ratio is None:
        return EXPERTS[0]
    return EXPERTS[0] if t >= ratio * pipe.scheduler.config.num_train_timesteps else EXPERTS[1]


register(Family(
    name="wan",
    classes=("diffusers:WanTransformer3DModel",),
    pipelines={"diffusers:WanPipeline": EXPERTS, "diffusers:WanImageToVideoPipeline": EXPERTS,
               "diffusers:WanVideoToVideoPipeline": ("transformer",)},
    exit=PrefixExit(blocks=("blocks",)),
    prediction="flow",
    route=route,
    param_roles={"t-embedder": ("condition_embedder.time_embedder.", "condition_embedder.time_proj."),
                 "caption": ("condition_embedder.text_embedder.",),
                 "embedders": ("patch_embedding.", "condition_embedder.")},
    # The ASE reference's shape (DiT-XL/2: [28, 28, 24, 24, 20, 20, 16, 16, 12, 12] over t, about 0.71 of the
    # blocks) mapped by trajectory position onto each model's default schedule, over ten equal bins of sigma (data
    # end first), kept monotone with at most five levels. Fractions of the block FLOPs (tests/families/test_wan.py):
    # - "ase-wan": Wan 2.1 T2V-1.3B (30 blocks), UniPC flow shift 3, 50 steps: 0.707 (shift 5, 50 steps: 0.66);
    #   rescaled to 40 blocks for 14B;
    # - "ase-wan2.2": Wan 2.2 T2V-A14B, each expert 40 blocks, UniPC flow shift 12, 40 steps, boundary 0.875: 0.70
    #   over both experts (the high-noise expert reads bins 8 and 9, the low-noise one the rest); give it to both.
    presets={"ase-wan": ((30, 30, 30, 30, 26, 26, 22, 22, 18, 14), 30, "sigma"),
             "ase-wan2.2": ((40, 40, 40, 40, 40, 40, 40, 38, 33, 22), 40, "sigma")},
))
