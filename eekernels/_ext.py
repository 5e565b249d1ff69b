"""Guarded access to the compiled, torch-free CUDA module ``eekernels._C``.

``import eekernels`` never fails because ``_C`` is missing; only a call that needs it does, with a
message that says how to get it.
"""
from __future__ import annotations

import functools
import importlib

BUILD_HINT = (
    "eekernels._C is not built: reinstall with nvcc on PATH and a GPU visible, or with EEKERNELS_CUDA_ARCHS "
    "set to the GPU archs to build for (pip install --no-build-isolation .)"
)


@functools.lru_cache(maxsize=1)
def _try_import():
    try:
        return importlib.import_module("eekernels._C"), None
    except ImportError as exc:  # not built, or built for another CUDA/python
        return None, f"{BUILD_HINT}; import error: {exc}"


def available() -> bool:
    """Whether ``eekernels._C`` imports."""
    return _try_import()[0] is not None


def unavailable_reason() -> str | None:
    """Why ``_C`` does not import, or None when it does."""
    return _try_import()[1]


def load():
    """Return the ``_C`` module or raise ``RuntimeError`` with the reinstall hint."""
    module, reason = _try_import()
    if module is None:
        raise RuntimeError(reason)
    return module
