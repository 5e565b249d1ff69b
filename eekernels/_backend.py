"""Backend selection: ``EEKERNELS_BACKEND`` and the ``eekernels.backend(name)`` context manager.

``auto`` picks, per op and per call, the fastest measured implementation that supports the inputs on
CUDA, and the torch reference everywhere else. ``torch``, ``triton`` and ``cuda`` force one
implementation; if it cannot run the inputs the call raises with every implementation's reasons.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

BACKENDS = ("auto", "torch", "triton", "cuda")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("eekernels_backend", default=None)


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name


# The last EEKERNELS_BACKEND value seen, raw, and the backend it names. Every op call asks for the backend,
# so the parsed name is reused while the raw string is unchanged; comparing the raw string (not reading the
# variable once) keeps ``os.environ`` changes, such as tests' monkeypatch.setenv, effective at the next call.
_env_seen: tuple[str | None, str] = (None, "auto")


def current_backend() -> str:
    """The backend in force: the innermost ``backend(...)`` context, else ``EEKERNELS_BACKEND``, else ``auto``."""
    global _env_seen
    name = _override.get()
    if name is not None:
        return name
    raw = os.environ.get("EEKERNELS_BACKEND")
    seen_raw, seen_name = _env_seen
    if raw == seen_raw:
        return seen_name
    name = _check((raw or "auto").strip().lower() or "auto", "EEKERNELS_BACKEND")  # a bad name is never cached
    _env_seen = (raw, name)
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Run the ops inside the ``with`` block on backend ``name`` (``auto``, ``torch``, ``triton``, ``cuda``)."""
    token = _override.set(_check(name, "backend(name)"))
    try:
        yield name
    finally:
        _override.reset(token)


def triton_interpret() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
