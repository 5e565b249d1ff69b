"""What the PixArt, SD3 and FLUX converters share: a key table ``[(original key, [diffusers keys], op)]`` and the
two directions of applying it, with the same checks and messages for every family.

ops: "same" (one tensor under another name), "cat" (the diffusers tensors concatenated along dim 0 give the
original one: a fused QKV) or "swap" (the two row halves exchanged: an adaLN that splits as shift, scale in one
layout and scale, shift in the other).
"""
from __future__ import annotations

import torch

from eekernels.models import _layers as L


def pairs(o: str, d: str) -> list:
    """The weight and bias rows of one renamed linear/conv: ``o.weight <- d.weight``, ``o.bias <- d.bias``."""
    return [(f"{o}.{w}", [f"{d}.{w}"], "same") for w in ("weight", "bias")]


def detect(where: str, state: dict, family: str, original: tuple, diffusers: tuple) -> str:
    """"original" or "diffusers" by the marker key each layout has; ``original`` / ``diffusers`` are
    ``(marker key, description)``. Neither or both: ValueError naming the family, both markers and the first keys."""
    orig, diff = original[0] in state, diffusers[0] in state
    if orig and not diff:
        return "original"
    if diff and not orig:
        return "diffusers"
    raise ValueError(f"{where}: expected a {family} transformer state dict in the {original[1]} layout "
                     f"(`{original[0]}`, ...) or the diffusers layout (`{diffusers[0]}`, ...), got "
                     f"{'both markers' if orig else 'neither'} (first keys: {list(state)[:5]})")


def check_unexpected(where: str, state: dict, known: set, what: str) -> None:
    """ValueError listing the keys of ``state`` that the conversion does not read (strict, as from_checkpoint)."""
    extra = [k for k in state if k not in known]
    if extra:
        raise ValueError(f"{where}: checkpoint has {len(extra)} unexpected key(s) for {what}: {extra[:6]}")


def swap_halves(where: str, key: str, v: torch.Tensor) -> torch.Tensor:
    if v.dim() < 1 or v.shape[0] % 2:
        raise ValueError(f"{where}: checkpoint key {key!r} expected an even number of rows (shift and scale "
                         f"halves), got shape {tuple(v.shape)}")
    a, b = v.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def gather(where: str, state: dict, table: list) -> dict:
    """diffusers keys -> original keys by ``table`` (a new dict; ``state`` is not modified)."""
    out = {}
    for orig, ds, op in table:
        parts = [L.require(where, state, d) for d in ds]
        if op == "cat":
            rows = {tuple(p.shape[1:]) for p in parts}
            if len(rows) != 1:
                raise ValueError(f"{where}: checkpoint keys {ds} expected the same trailing shape (they are "
                                 f"concatenated into {orig!r}), got {[tuple(p.shape) for p in parts]}")
            out[orig] = torch.cat(parts, dim=0)
        elif op == "swap":
            out[orig] = swap_halves(where, ds[0], parts[0])
        else:
            out[orig] = parts[0]
    return out


def equal_rows(where: str, key: str, v: torch.Tensor, n: int) -> list[int]:
    """The row sizes that split a fused tensor into ``n`` equal parts, else ValueError."""
    if v.dim() < 1 or v.shape[0] % n:
        raise ValueError(f"{where}: checkpoint key {key!r} expected a multiple of {n} rows (it splits into {n} "
                         f"equal parts), got shape {tuple(v.shape)}")
    return [v.shape[0] // n] * n


def scatter(where: str, state: dict, table: list, split=None) -> dict:
    """original keys -> diffusers keys by ``table`` (a new dict; ``state`` is not modified). A "cat" entry is
    split by ``split(key, tensor, diffusers_keys) -> row sizes`` (default: equal parts); the parts are copies."""
    split = split or (lambda key, v, ds: equal_rows(where, key, v, len(ds)))
    out = {}
    for orig, ds, op in table:
        v = L.require(where, state, orig)
        if op == "cat":
            out.update(zip(ds, (p.clone() for p in torch.split(v, split(orig, v, ds), dim=0))))
        elif op == "swap":
            out[ds[0]] = swap_halves(where, orig, v)
        else:
            out[ds[0]] = v
    return out
