"""Score networks with early exit: DiT, U-ViT and U-Net, their named configs and checkpoint loaders.

Every model is called as ``model(x, t, y=None, depth=None, exit_cache=None)`` and exposes ``num_blocks``
(what ``depth`` counts), ``min_depth``, ``num_classes``, ``null_class``, ``in_channels``, ``out_channels``,
``learn_sigma`` and ``input_size``.
"""
from __future__ import annotations

import importlib

from eekernels.models.cache import ExitCache
from eekernels.models.condition import TextCondition
from eekernels.models.dit import DIT_CONFIGS, DiT
from eekernels.models.uvit import UVIT_CONFIGS, UViT

# Loaded on first use: unet.py (its own engineer) and pretrained.py (named downloadable weights).
_LAZY = {
    "UNet": ("eekernels.models.unet", "UNet"),
    "UNET_CONFIGS": ("eekernels.models.unet", "UNET_CONFIGS"),
    "PixArt": ("eekernels.models.pixart", "PixArt"),
    "SD3": ("eekernels.models.sd3", "SD3"),
    "Flux": ("eekernels.models.flux", "Flux"),
    "load_pretrained": ("eekernels.models.pretrained", "load_pretrained"),
    "pretrained_names": ("eekernels.models.pretrained", "pretrained_names"),
}


def __getattr__(name: str):
    if name == "CONFIGS":
        return configs()
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'eekernels.models' has no attribute {name!r}")


def configs() -> dict:
    """Every named config: ``{name: (model class, constructor kwargs)}`` (the CLI offers the names as choices)."""
    out = {name: (DiT, cfg) for name, cfg in DIT_CONFIGS.items()}
    out.update({name: (UViT, cfg) for name, cfg in UVIT_CONFIGS.items()})
    # Loaded here, not at import: each family module names its class and its configs.
    for module, cls, table in (("unet", "UNet", "UNET_CONFIGS"), ("pixart", "PixArt", "PIXART_CONFIGS"),
                               ("sd3", "SD3", "SD3_CONFIGS"), ("flux", "Flux", "FLUX_CONFIGS")):
        mod = importlib.import_module(f"eekernels.models.{module}")
        out.update({name: (getattr(mod, cls), cfg) for name, cfg in getattr(mod, table, {}).items()})
    return out


def create(name: str, **overrides):
    """A randomly initialized model of a named config, e.g. ``create("DiT-XL/2")``; ``overrides`` go to its class."""
    table = configs()
    if name not in table:
        raise ValueError(f"create: unknown config {name!r}; known: {sorted(table)}")
    cls, cfg = table[name]
    return cls(**{**cfg, **overrides})


# load_pretrained / pretrained_names resolve lazily above once pretrained.py exists; not star-exported.
__all__ = ["DiT", "UViT", "UNet", "ExitCache", "TextCondition", "DIT_CONFIGS", "UVIT_CONFIGS", "UNET_CONFIGS", "CONFIGS",
           "configs", "create"]
