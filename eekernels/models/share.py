"""The native tier's weight sharing: an eekernels model built from another codebase's module keeps pointing at that
module's tensors wherever its layout keeps them as they are (checked with ``torch.equal``; ``data_ptr`` is the same).
Family files (``eekernels.families``) call :func:`native_from_diffusers` or :func:`native_from_reference` as their
``native_build``."""
from __future__ import annotations

import torch
import torch.nn as nn


def share_weights(model: nn.Module, source: dict) -> int:
    """Point ``model``'s tensors at ``source``'s where the names match and the values are equal.

    ``source`` is the original's state dict in the eekernels naming (tensors that alias the original's
    parameters). Equality is checked so that a tensor the conversion transformed is never aliased. Returns
    the number of tensors now shared.
    """
    own = model.state_dict()
    shared = {}
    for k, v in source.items():
        mine = own.get(k)
        if (mine is not None and v.shape == mine.shape and v.dtype == mine.dtype and v.device == mine.device
                and torch.equal(v, mine)):
            shared[k] = v.detach()
    # assign=True keeps the given tensors (wrapped as Parameters where the model has Parameters).
    model.load_state_dict(shared, strict=False, assign=True)
    return len(shared)


def _like(model: nn.Module, ref: torch.Tensor) -> nn.Module:
    return model.to(device=ref.device, dtype=ref.dtype).eval()


def _first_tensor(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _num_heads(block: nn.Module) -> int | None:
    attn = getattr(block, "attn", None)  # timm's Attention says num_heads; hand-written ones often heads
    return getattr(attn, "num_heads", None) or getattr(attn, "heads", None)


def native_from_reference(cls, module: nn.Module, first_block: nn.Module) -> nn.Module:
    """A reference-code module (facebookresearch DiT, baofff U-ViT) as ``cls`` (its native eekernels model): load
    its state dict, share its weights. Family files call this as their ``native_build``."""
    state = dict(module.state_dict())
    model = _like(cls.from_checkpoint(state, num_heads=_num_heads(first_block)), _first_tensor(module))
    share_weights(model, state)
    return model


def native_from_diffusers(cls, module: nn.Module, source) -> nn.Module:
    """A diffusers module as ``cls.from_diffusers(module)``, sharing every tensor the conversion keeps as is.

    ``source(model, module, state)`` gives the original's tensors in the native naming (aliases, not copies)."""
    model = _like(cls.from_diffusers(module), _first_tensor(module))
    share_weights(model, source(model, module, dict(module.state_dict())))
    return model
