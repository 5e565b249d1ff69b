"""Triton, or a stand-in where it is not installed (macOS, Windows: pyproject installs it on Linux only).

The op files import ``triton`` and ``tl`` from here and define their kernels at import time either way.
Without Triton the stand-in ``jit``/``autotune`` return kernels that raise if launched, the Triton
backend's reasons say "triton is not installed" (so ``auto`` never picks it), and everything else works.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # ModuleNotFoundError, or a blocked import (sys.modules["triton"] = None)
    HAS_TRITON = False

NOT_INSTALLED = "triton is not installed (pip install triton; Linux only)"


if not HAS_TRITON:
    import types

    class _MissingKernel:
        """What ``@triton.jit`` gives without Triton: defined at import time, raises if launched."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid):
            raise RuntimeError(f"{self.__name__}: {NOT_INSTALLED}")

        def __call__(self, *args, **kwargs):
            raise RuntimeError(f"{self.__name__}: {NOT_INSTALLED}")

    def _jit(fn=None, **_options):
        return _MissingKernel(fn) if fn is not None else _MissingKernel

    def _autotune(*_args, **_kwargs):
        return lambda kernel: kernel

    class _Config:
        def __init__(self, kwargs, **options):
            self.kwargs, self.options = kwargs, options

    def _next_power_of_2(n: int) -> int:
        return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()

    def _cdiv(a: int, b: int) -> int:
        return -(-a // b)

    class _Language(types.SimpleNamespace):
        """``tl``: kernel bodies never run without Triton; annotations such as ``tl.constexpr`` only resolve."""

        def __getattr__(self, name):
            return object()

    triton = types.SimpleNamespace(jit=_jit, autotune=_autotune, Config=_Config, cdiv=_cdiv,
                                   next_power_of_2=_next_power_of_2, __version__=None)
    tl = _Language(constexpr=object())
