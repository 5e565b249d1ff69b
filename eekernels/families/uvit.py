"""U-ViT (baofff/U-ViT ``libs/uvit.py``): class-conditional and unconditional modules.

Exit rule: ``in_blocks`` and ``mid_block`` always run; each out block past the exit keeps only its
``skip_linear`` (the linear that merges the encoder skip); its attention and MLP are skipped (ASE's rule).
The text-conditioned ``libs/uvit_t2i.py`` (CLIP tokens through ``context_embed``) is refused by name.
"""
import torch

from eekernels.families import Family, PrefixExit, register


def _is_baofff_uvit(obj) -> bool:
    return (all(hasattr(obj, a) for a in ("patch_embed", "in_blocks", "mid_block", "out_blocks", "decoder_pred"))
            and not type(obj).__module__.startswith("eekernels."))


def _native_from_reference(module):
    from eekernels.models.share import native_from_reference
    from eekernels.models.uvit import UViT

    return native_from_reference(UViT, module, module.in_blocks[0])


def _skip_out_block(block, args, kwargs):
    """A skipped out block keeps its skip_linear: x <- skip_linear([x, skip])."""
    x = kwargs["x"] if "x" in kwargs else args[0]
    skip = kwargs["skip"] if "skip" in kwargs else args[1]
    return block.skip_linear(torch.cat([x, skip], dim=-1))


register(Family(
    name="uvit",
    detect=lambda obj: _is_baofff_uvit(obj) and not hasattr(obj, "context_embed"),
    notes="baofff/U-ViT `UViT` modules (libs/uvit.py)",
    exit=PrefixExit(blocks=("in_blocks", "mid_block", "out_blocks"), always=("in_blocks", "mid_block"),
                    streams={name: (0, None, "x", None) for name in ("in_blocks", "mid_block", "out_blocks")},
                    skip={"out_blocks": _skip_out_block}),
    native="eekernels.models.uvit:UViT",
    native_build=_native_from_reference,
    configs="eekernels.models.uvit:UVIT_CONFIGS",
    param_roles={"t-embedder": ("time_embed.",), "embedders": ("time_embed.", "label_emb.", "patch_embed.",
                                                                "pos_embed.")},
))

register(Family(
    name="uvit-t2i",
    detect=lambda obj: _is_baofff_uvit(obj) and hasattr(obj, "context_embed"),
    refused="text-conditioned U-ViT (uvit_t2i, with `context_embed` taking CLIP tokens) is not supported; supported "
            "U-ViTs are baofff libs/uvit.py's class-conditional and unconditional models",
))
