"""Cosmos (1.0 and Predict2): diffusers' ``CosmosTransformer3DModel`` (``CosmosTextToWorldPipeline``,
``CosmosVideoToWorldPipeline``, ``Cosmos2TextToImagePipeline``, ``Cosmos2VideoToWorldPipeline``). Video latents
``(B, C, F, H, W)``.

Exit rule: ``transformer_blocks[:d]`` (``CosmosTransformerBlock``: one stream, the text enters by cross-attention;
not in diffusers' ``TransformerBlockRegistry``, so its stream is declared here), then the model's own ``norm_out``
and ``proj_out``.

Timestep convention (differs from the flow models' scheduler timesteps): these pipelines sample EDM noise levels
sigma in [0.002, 80] (Cosmos 1.0: ``EDMEulerScheduler``, whose timesteps are 0.25 * log(sigma); Predict2:
``FlowMatchEulerDiscreteScheduler`` with Karras sigmas, whose timesteps are sigma * 1000, up to 80000). eekernels'
t of a step is t = 1000 * sigma / (1 + sigma), the flow-matching noise level of the same point (``step_t``). A
Predict2 model's own ``timestep`` argument is that sigma / (1 + sigma) (``timestep_scale=1000``); a Cosmos 1.0
model's is 0.25 * log(sigma), so a Cosmos 1.0 model called outside its pipeline needs its depth given
(``eekernels.inplace.at_depth``), not read from its timestep. Cosmos 2.5 (``Cosmos2_5_*Pipeline``, flow sigmas in
[0, 1], control residuals) is not in this table: ``accelerate`` refuses those pipelines as unsupported.
"""
from eekernels.families import Family, PrefixExit, register


def _flow_t(pipe):
    """eekernels' t of each step of a Cosmos pipeline's loop: 1000 * sigma / (1 + sigma) of its EDM sigma."""
    sched = pipe.scheduler
    sigma = sched.sigmas[:len(sched.timesteps)].detach().to("cpu").double()
    return (1000.0 * sigma / (1.0 + sigma)).tolist()


register(Family(
    name="cosmos",
    classes=("diffusers:CosmosTransformer3DModel",),
    pipelines={"diffusers:CosmosTextToWorldPipeline": ("transformer",),
               "diffusers:CosmosVideoToWorldPipeline": ("transformer",),
               "diffusers:Cosmos2TextToImagePipeline": ("transformer",),
               "diffusers:Cosmos2VideoToWorldPipeline": ("transformer",)},
    exit=PrefixExit(blocks=("transformer_blocks",),
                    streams={"CosmosTransformerBlock": (0, None, "hidden_states", None)}),
    timestep_scale=1000.0,
    step_t=_flow_t,
    param_roles={"t-embedder": ("time_embed.",),
                 "caption": ("crossattn_proj.", "img_context_proj."),
                 "embedders": ("patch_embed.", "time_embed.", "learnable_pos_embed.", "crossattn_proj.",
                               "img_context_proj.")},
    # The 28 blocks of Cosmos 1.0-7B and Predict2-2B over ten equal bins of t (data end first; rescaled for
    # Predict2-14B's 36 by ExitSchedule.preset(..., total_depth=36)). Their Karras sigmas (rho 7, 0.002 to 80) put
    # 8 of 36 steps in the first bin and 13 in the last: 0.70 of the block FLOPs over Cosmos 1.0's 36 steps and
    # Predict2's 35 (tests/families/test_cosmos.py checks both).
    presets={"ase-cosmos": ((28, 28, 28, 26, 24, 22, 20, 18, 15, 12), 28, "t")},
))
