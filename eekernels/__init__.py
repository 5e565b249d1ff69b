"""eekernels: early-exit diffusion sampling with fused Triton / CUDA C++ kernels and CUDA graphs."""
from __future__ import annotations

import importlib

from eekernels._backend import BACKENDS, backend, current_backend
from eekernels._version import __version__
from eekernels import ops

# Heavier subpackages load on first use, so `import eekernels` stays cheap for kernel-only users.
_LAZY = {
    "ExitSchedule": ("eekernels.schedules", "ExitSchedule"),
    "models": ("eekernels.models", None),
    "samplers": ("eekernels.samplers", None),
    "graphs": ("eekernels.graphs", None),
    "training": ("eekernels.training", None),
    "data": ("eekernels.data", None),
    "sample": ("eekernels.samplers", "sample"),
    "accelerate": ("eekernels._accelerate", "accelerate"),
    "disable": ("eekernels.inplace", "disable"),
    "inplace": ("eekernels.inplace", None),
    "patches": ("eekernels.patches", None),
    "families": ("eekernels.families", None),
    "TextCondition": ("eekernels.models.condition", "TextCondition"),
    "calibrate": ("eekernels.pipeline_calibration", "calibrate"),
    "finetune_inplace": ("eekernels.training.inplace", "finetune_inplace"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'eekernels' has no attribute {name!r}")


__all__ = ["BACKENDS", "backend", "current_backend", "ops", "__version__", *_LAZY]
