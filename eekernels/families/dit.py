"""DiT: diffusers' ``DiTTransformer2DModel`` (``DiTPipeline``), and facebookresearch/DiT modules (``models.py``).

Exit rule: ``blocks[:d]``, then the model's own final layer on that hidden state (ASE's rule for DiT).
"""
import torch

from eekernels.families import Family, PrefixExit, register


def _native_from_diffusers(module):
    from eekernels.models.share import native_from_diffusers
    from eekernels.models import convert
    from eekernels.models.dit import DiT

    def source(model, module, state):
        fb = convert.diffusers_dit_to_facebook("accelerate", state)
        pos = module.pos_embed.pos_embed.detach()
        fb["pos_embed"] = pos.reshape(1, -1, pos.shape[-1])
        return fb

    return native_from_diffusers(DiT, module, source)


def _native_from_reference(module):
    from eekernels.models.share import native_from_reference
    from eekernels.models.dit import DiT

    return native_from_reference(DiT, module, module.blocks[0])


#: the timestep MLP (frozen by ``trainable="no-t-embedder"``, the ASE reference) and every embedder
_T_EMBEDDER = ("t_embedder.",)
_EMBEDDERS = ("t_embedder.", "y_embedder.", "x_embedder.", "pos_embed.")


def _with_block_copies(prefixes):
    """``prefixes``, plus ``blocks.i.t_embedder.`` / ``blocks.i.y_embedder.`` of a native DiT that keeps a copy per
    block (``block_embedders``: from a diffusers DiT whose copies differ)."""
    def roles(model):
        own = [f"blocks.{i}.{p}" for i, b in enumerate(getattr(model, "blocks", ())) for p in prefixes
               if isinstance(getattr(b, p.rstrip("."), None), torch.nn.Module)]
        return (*prefixes, *own)
    return roles


def _per_block(suffix):
    """diffusers' DiT keeps a copy of the timestep/label embedder in every block's norm1: one prefix per block."""
    def prefixes(model):
        found = (n.split(".norm1.emb.")[0] for n, _ in model.named_parameters() if ".norm1.emb." in n)
        return tuple(f"{b}.norm1.emb.{suffix}" for b in dict.fromkeys(found) if b.startswith("transformer_blocks."))
    return prefixes

register(Family(
    name="dit",
    classes=("diffusers:DiTTransformer2DModel",),
    pipelines={"diffusers:DiTPipeline": ("transformer",)},
    exit=PrefixExit(blocks=("transformer_blocks",)),
    native="eekernels.models.dit:DiT",
    native_build=_native_from_diffusers,
    native_adapter="eekernels._accelerate:DiffusersTransformer",
    configs="eekernels.models.dit:DIT_CONFIGS",
    param_roles={"t-embedder": _per_block("timestep_embedder."), "embedders": _per_block("")},
))


def _is_facebook_dit(obj) -> bool:
    blocks = getattr(obj, "blocks", None)
    final = getattr(obj, "final_layer", None)
    return (all(hasattr(obj, a) for a in ("x_embedder", "t_embedder")) and blocks is not None and len(blocks) > 0
            and hasattr(blocks[0], "adaLN_modulation") and hasattr(final, "adaLN_modulation")
            and not type(obj).__module__.startswith("eekernels."))


register(Family(
    name="facebook-dit",
    detect=_is_facebook_dit,
    notes="facebookresearch/DiT `DiT` modules",
    # DiTBlock.forward(x, c) -> x
    exit=PrefixExit(blocks=("blocks",), streams={"blocks": (0, None, "x", None)}),
    native="eekernels.models.dit:DiT",
    native_build=_native_from_reference,
    param_roles={"t-embedder": _with_block_copies(_T_EMBEDDER), "embedders": _with_block_copies(_EMBEDDERS)},
))
