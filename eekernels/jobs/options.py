"""Checks shared by the subcommands' options (``eekernels sample | bench | finetune | calibrate``), made before any
work.

Each raises ``ValueError`` naming the option, what it expects and what it got; the CLI prints that as one line
and exits with code 2. None of them creates or changes a file.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

SEED_MIN, SEED_MAX = -2**63, 2**64 - 1  # what torch.Generator.manual_seed takes (a negative seed wraps mod 2**64)


def positive(args, *names: str, minimum: int = 1) -> None:
    """Each integer option ``names`` (attribute names) is >= ``minimum``."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= {minimum}, got {value}")


def seed_range(seed: int, count: int, option: str = "--seed") -> None:
    """Seeds ``seed .. seed + count - 1`` all fit a torch generator (image i is seeded ``seed + i``)."""
    top = SEED_MAX - max(count - 1, 0)
    if not SEED_MIN <= seed <= top:
        raise ValueError(f"{option}: expected an integer in [{SEED_MIN}, {top}] (image i is seeded {option} + i, "
                         f"for {count} image(s)), got {seed}")


def as_option(msg: str, names: dict[str, str], other: str) -> str:
    """A library error with its argument's name as the CLI option (``cfg_channels: ...`` -> ``--cfg-channels: ...``
    for ``names = {"cfg_channels": "--cfg-channels"}``); an argument the command has no option for is put under
    ``other`` (e.g. the model's option)."""
    import re

    m = re.match(r"(\w+): ", msg)
    if m and m.group(1) in names:
        return names[m.group(1)] + msg[len(m.group(1)):]
    return f"{other}: {msg}"


def model_config(spec: str | None, checkpoint: str | None, option: str = "--model-config") -> str | None:
    """``--model-config FILE``: a PixArt-sigma training config (``convert.pixart.read_config``: read, never run),
    only with ``--checkpoint``; read here, before any model is loaded, so that a missing or unreadable file is
    refused first. Whether the checkpoint is a PixArt one is checked when it is loaded (``load_model_file``)."""
    if spec is None:
        return None
    if not checkpoint:
        raise ValueError(f"{option}: only used with --checkpoint (a PixArt-sigma checkpoint's training config), got "
                         f"{option} {spec!r} without it")
    if not Path(spec).is_file():
        raise ValueError(f"{option}: expected a PixArt-sigma config file (.py), got {spec!r} (no such file)")
    from eekernels.models.convert.pixart import read_config

    read_config(option, spec)
    return spec


def parse_device(spec: str, option: str = "--device") -> torch.device:
    """``spec`` as a torch.device that this machine has."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option}: expected cpu, cuda, cuda:N, mps, ..., got {spec!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}: {spec!r} asked for, but CUDA is not available here (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{option}: {spec!r} asked for, but {torch.cuda.device_count()} GPU(s) are visible")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{option}: {spec!r} asked for, but MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{option}: expected cpu, cuda, cuda:N or mps, got {spec!r}")
    return device


def _writable_ancestor(path: Path, option: str) -> None:
    """The first existing ancestor of ``path`` is a folder this process may create entries in."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{option}: cannot create {str(path)!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option}: cannot create {str(path)!r}: no write permission in {str(parent)!r}")


def output_folder(spec: str, option: str = "--out", files: tuple[str, ...] = ()) -> Path:
    """``spec`` as an output folder: an existing folder, or a path that can be created (it is not created here).

    files: names the job writes into it; one that exists as a folder would fail only after the work.
    """
    path = Path(spec)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option}: expected a folder (existing or to create), got the file {spec!r}")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{option}: no write permission in the folder {spec!r}")
        for name in files:
            if (path / name).is_dir():
                raise ValueError(f"{option}: the job writes the file {name} into {spec!r}, where a folder of "
                                 "that name is")
    else:
        _writable_ancestor(path, option)
    return path


def output_file(spec: str, option: str) -> Path:
    """``spec`` as an output file: a path whose folder exists or can be created; a file there is replaced."""
    path = Path(spec)
    if path.is_dir():
        raise ValueError(f"{option}: expected a file path, got the folder {spec!r}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{option}: no write permission on {spec!r}")
    _writable_ancestor(path, option)
    return path


def finite_weights(model: torch.nn.Module, option: str, name: str) -> None:
    """Every floating parameter and buffer of ``model`` is finite: NaN or Inf weights give NaN images."""
    bad = [k for k, v in [*model.named_parameters(), *model.named_buffers()]
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{option}: expected finite weights, got NaN/Inf in {len(bad)} tensor(s) of {name} "
                         f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}); its samples would not be finite")


def load_checked(load, option: str):
    """``load()`` -> (model, name), refused if any weight is NaN or Inf (the loader's warning is then dropped:
    the error says it); the loader's other warnings are passed on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, name = load()
    finite_weights(model, option, repr(name))
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model, name
