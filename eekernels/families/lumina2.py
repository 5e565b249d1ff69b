"""Lumina Image 2.0: diffusers' ``Lumina2Transformer2DModel`` (``Lumina2Pipeline``). Latents (B, C, H, W).

Exit rule: ``layers[:d]``, the joint (caption + image tokens) blocks, then the model's own ``norm_out`` (modulated by
the timestep) and the unpatchify of the image tokens. The two refiners before them (``context_refiner`` on the
caption, ``noise_refiner`` on the image tokens: 2 + 2 blocks in Lumina 2.0, on half the sequence each) build the joint
sequence and always run; they are not counted by the depth. ``Lumina2TransformerBlock`` returns one stream (not in
diffusers' ``TransformerBlockRegistry``; declared here).

Timestep: flow matching, the scheduler's timesteps are t = sigma * 1000 (the pipeline loop reads those); the model's
own ``timestep`` argument runs the other way, 1 - sigma (0 = noise, 1 = data): ``timestep_map`` turns it into
t = 1000 * (1 - x) for direct calls.
"""
from eekernels.families import Family, PrefixExit, register


def t_of_timestep(x: float) -> float:
    """Lumina 2's model timestep (1 - sigma) as eekernels' t (sigma * 1000)."""
    return 1000.0 * (1.0 - x)


register(Family(
    name="lumina2",
    classes=("diffusers:Lumina2Transformer2DModel",),
    pipelines={"diffusers:Lumina2Pipeline": ("transformer",)},
    exit=PrefixExit(blocks=("layers",), streams={"Lumina2TransformerBlock": (0, None, "hidden_states", None)}),
    prediction="flow",
    timestep_map=t_of_timestep,
    param_roles={"t-embedder": ("time_caption_embed.timestep_embedder.",),
                 "caption": ("time_caption_embed.caption_embedder.", "context_refiner."),
                 "embedders": ("x_embedder.", "time_caption_embed.", "context_refiner.", "noise_refiner.")},
    # The ASE reference's shape (DiT-XL/2's table over uniform t) mapped by trajectory position onto Lumina 2.0's
    # sampling (flow-matching Euler, shift 6, sigmas linear from 1 to 1/N as the pipeline sets them, 30 steps: its
    # default), averaged per bin of sigma (data end first), for its 26 joint blocks: 0.706 of the joint blocks'
    # FLOPs at 30 steps, 0.71 at 50, 0.79 under shift 3 (tests/families/test_lumina2.py).
    presets={"ase-lumina2": ((26, 26, 26, 26, 26, 26, 24, 22, 19, 13), 26, "sigma")},
))
