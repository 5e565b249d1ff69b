"""Loading ``torch.save`` and ``.safetensors`` files without running code from them.

``.safetensors`` files (what SD3, FLUX and PixArt ship in) are read with the ``safetensors`` package:
:func:`load_safetensors`; :func:`load_any` picks the reader from the file's suffix, and :func:`save_state` writes
either format (``.safetensors`` by suffix), so a fine-tuned model goes back in the format it came in.

Every ``torch.load`` in eekernels goes through :func:`safe_load`: ``weights_only=True`` always, with an explicit
allowlist of the few non-tensor globals that the checkpoints we read legitimately hold:

- ``argparse.Namespace``: the ``args`` of a facebookresearch/DiT ``train.py`` checkpoint;
- ``pathlib`` paths: an ``args`` field such as ``results_dir`` may be a path object.

Optimizer state, RNG state (uint8 tensors) and plain containers need no allowlist. A file that needs any other
global is refused with a ``ValueError`` that names the file and the global; nothing in it executes.
"""
from __future__ import annotations

import argparse
import io
import os
import pathlib
import pickle
import pickletools

import torch

#: The non-tensor globals a checkpoint may hold (see the module docstring for why each is here).
SAFE_GLOBALS: tuple = (argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                       pathlib.PureWindowsPath)


class UnsafeCheckpointError(ValueError):
    """A checkpoint that needs a global outside the allowlist: refused, nothing in it executed."""


def _pickle_globals(path: str) -> list[str]:
    """Every global the pickles in a legacy (non-zip) ``torch.save`` or plain ``pickle`` file name, in order."""
    with open(path, "rb") as f:
        stream = io.BytesIO(f.read())
    found = []
    while stream.tell() < len(stream.getbuffer()):  # legacy torch files are several pickles, then raw storages
        strings, memo, last = [], {}, None
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                last = arg if isinstance(arg, str) and "UNICODE" in op.name else None
                if op.name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif op.name.endswith("PUT"):
                    memo[arg] = strings[-1] if strings else None
                elif op.name.endswith("GET"):
                    last = memo.get(arg)
                if last is not None:
                    strings.append(last)
        except Exception:  # raw storage bytes after the pickles: nothing more to read
            break
    return found


def _offending_globals(path: str) -> list[str]:
    """The globals ``path`` needs that are not on the allowlist (best effort; [] if it cannot tell)."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: read the pickle opcodes, keep what torch's own loader does not allow
        try:
            from torch._weights_only_unpickler import _get_allowed_globals

            allowed |= set(_get_allowed_globals())
            needed = _pickle_globals(path)
        except Exception:
            return []
    return list(dict.fromkeys(g for g in needed if g not in allowed))


def safe_load(path, *, where: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with :data:`SAFE_GLOBALS` allowed.

    Raises ``ValueError`` (:class:`UnsafeCheckpointError` for a refused file) naming ``where`` (the caller,
    e.g. ``"DiT.from_checkpoint"``), the file and, for a
    file that needs a global outside the allowlist, that global. Nothing from the file is executed.
    """
    fspath = os.fspath(path)
    if not os.path.isfile(fspath):
        raise ValueError(f"{where}: checkpoint path {fspath!r} does not exist or is not a file")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(fspath, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        bad = _offending_globals(fspath)
        if bad or "Unsupported global" in str(e):
            what = f"it needs the global(s) {bad}, which are not allowed" if bad else _weights_only_reason(e)
            raise UnsafeCheckpointError(
                f"{where}: refused to load {fspath!r}: {what}. eekernels loads checkpoints with "
                f"torch.load(weights_only=True) and allows only {[g.__qualname__ for g in SAFE_GLOBALS]} "
                "beyond tensors and plain containers; nothing in the file was executed") from None
        error = e
    except Exception as e:  # zip, pickle-protocol and EOF errors all mean: not a usable checkpoint
        error = e
    raise ValueError(f"{where}: {fspath!r} is not a PyTorch checkpoint readable with "
                     f"torch.load(weights_only=True): {type(error).__name__}: {_weights_only_reason(error)}")


def _weights_only_reason(e: Exception) -> str:
    """The line of torch's weights-only error that says what failed (its message is mostly advice)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "WeightsUnpickler error:" in ln and ln.split("WeightsUnpickler error:", 1)[1].strip():
            return ln.split("WeightsUnpickler error:", 1)[1].strip()
    reasons = [ln for ln in lines if ln.startswith(("Unsupported", "invalid load key"))]
    return (reasons or lines or [type(e).__name__])[0]


def load_safetensors(path, *, where: str, device: str = "cpu") -> dict:
    """A flat ``{name: tensor}`` dict from a ``.safetensors`` file, read with the ``safetensors`` package (no
    pickle). ``ValueError`` naming ``where`` and the file for a missing or malformed file."""
    fspath = os.fspath(path)
    if not os.path.isfile(fspath):
        raise ValueError(f"{where}: checkpoint path {fspath!r} does not exist or is not a file")
    try:
        from safetensors.torch import load_file
    except ImportError:  # a declared dependency; said clearly where an environment lacks it
        raise ValueError(f"{where}: reading {fspath!r} needs the `safetensors` package (pip install safetensors)") from None
    try:
        return load_file(fspath, device=device)
    except Exception as e:  # header too large / truncated / not JSON: all mean a malformed file
        raise ValueError(f"{where}: {fspath!r} is not a readable .safetensors file: {type(e).__name__}: {e}") from None


def is_safetensors(path) -> bool:
    return os.fspath(path).endswith(".safetensors")


def load_any(path, *, where: str, map_location="cpu"):
    """:func:`load_safetensors` for a ``.safetensors`` path, else :func:`safe_load`."""
    if is_safetensors(path):
        return load_safetensors(path, where=where, device=str(map_location))
    return safe_load(path, where=where, map_location=map_location)


def save_state(state: dict, path, *, metadata: dict | None = None) -> None:
    """Write a flat ``{name: tensor}`` dict: ``.safetensors`` by suffix (contiguous copies, string metadata),
    else ``torch.save``."""
    fspath = os.fspath(path)
    if is_safetensors(fspath):
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, fspath,
                  metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    else:
        torch.save(state, fspath)
