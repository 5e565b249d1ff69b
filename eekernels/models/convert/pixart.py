"""PixArt-α / PixArt-Σ checkpoint converters: the PixArt-alpha / PixArt-sigma repositories' layout
(``PixArt-XL-2-*.pth``: ``diffusion/model/nets/PixArt.py`` / ``PixArtMS.py``, the "original" layout, which
``eekernels.models.PixArt`` uses key for key apart from its stacked per-block ``scale_shift_table``) and
diffusers' ``PixArtTransformer2DModel`` (the "diffusers" layout, as ``scripts/convert_pixart_*_to_diffusers.py``
writes it).

The two layouts hold the same tensors, renamed, except:
- attention projections: the original's self-attention ``attn.qkv`` is diffusers' ``attn1.to_q/to_k/to_v``
  concatenated along the output rows (q, k, v), its cross-attention ``cross_attn.kv_linear`` is
  ``attn2.to_k/to_v`` concatenated (k, v);
- ``pos_embed`` (the fixed sin-cos table of the training grid, a persistent buffer in the original) and
  ``y_embedder.y_embedding`` (the learned null caption, classifier-free guidance's unconditional tokens) have
  no place in today's diffusers model: diffusers' converters drop both. An older diffusers conversion may
  hold ``caption_projection.y_embedding``; it is read as the null caption.

PixArt-Σ's self-attention options (PixArt-sigma's ``qk_norm`` and ``kv_compress_config``) exist only in the
original layout: ``qk_norm`` adds ``blocks.i.attn.q_norm`` / ``k_norm`` LayerNorms, the "conv" KV compression
``blocks.i.attn.sr`` (a depthwise conv) and ``blocks.i.attn.norm`` in its blocks; the other samplings add no
weights, so only a config says they are on. diffusers' ``PixArtTransformer2DModel`` has neither option: the
converters refuse them by name.

Functions: :func:`detect_layout`, :func:`key_table`, :func:`diffusers_to_original`, :func:`original_to_diffusers`
and :func:`pixart_config` (constructor arguments from the tensor shapes) each take a flat ``{name: tensor}``
state dict (not modified) and raise ValueError naming the key for a missing, unexpected or mis-shaped entry;
:func:`read_config` reads the options from a PixArt-sigma config (a dict, or its ``.py`` file, not run).
"""
from __future__ import annotations

import ast
import os
from collections.abc import Mapping
from pathlib import Path

from eekernels.models import _layers as L
from eekernels.models.convert._layouts import check_unexpected, detect, gather, scatter
from eekernels.models.convert._layouts import pairs as _pairs

#: The key the own (eekernels) layout holds instead of ``blocks.i.scale_shift_table``: all blocks' tables stacked.
OWN_MARKER = "adaLN_scale_shift"
_ORIGINAL_MARKER = "blocks.0.attn.qkv.weight"
_DIFFUSERS_MARKER = "transformer_blocks.0.attn1.to_q.weight"


def detect_layout(where: str, state: dict) -> str:
    """"own" (``PixArt.state_dict()``), "original" (``blocks.0.attn.qkv``...) or "diffusers"
    (``transformer_blocks.0.attn1.to_q``...), else ValueError."""
    if OWN_MARKER in state:
        return "own"
    return detect(where, state, "PixArt", (_ORIGINAL_MARKER, "PixArt-alpha"), (_DIFFUSERS_MARKER, "diffusers"))


# --------------------------------------------------------------------------------------------------
# The key table: every original key and the diffusers key(s) it is made of
# --------------------------------------------------------------------------------------------------
def key_table(num_layers: int, additional_conditions: bool) -> list:
    """``[(original key, [diffusers keys], op)]``; op "same" (one tensor) or "cat" (the diffusers tensors
    concatenated along dim 0 give the original one). ``pos_embed`` and ``y_embedder.y_embedding`` are not in
    it (see the module docstring)."""
    table = []
    add = table.extend
    add(_pairs("x_embedder.proj", "pos_embed.proj"))
    add(_pairs("y_embedder.y_proj.fc1", "caption_projection.linear_1"))
    add(_pairs("y_embedder.y_proj.fc2", "caption_projection.linear_2"))
    emb = "adaln_single.emb."
    add(_pairs("t_embedder.mlp.0", emb + "timestep_embedder.linear_1"))
    add(_pairs("t_embedder.mlp.2", emb + "timestep_embedder.linear_2"))
    if additional_conditions:
        for o, d in (("csize_embedder", "resolution_embedder"), ("ar_embedder", "aspect_ratio_embedder")):
            add(_pairs(f"{o}.mlp.0", f"{emb}{d}.linear_1") + _pairs(f"{o}.mlp.2", f"{emb}{d}.linear_2"))
    add(_pairs("t_block.1", "adaln_single.linear"))
    for i in range(num_layers):
        o, d = f"blocks.{i}", f"transformer_blocks.{i}"
        table.append((f"{o}.scale_shift_table", [f"{d}.scale_shift_table"], "same"))
        for w in ("weight", "bias"):
            table.append((f"{o}.attn.qkv.{w}", [f"{d}.attn1.to_{n}.{w}" for n in "qkv"], "cat"))
            table.append((f"{o}.cross_attn.kv_linear.{w}", [f"{d}.attn2.to_{n}.{w}" for n in "kv"], "cat"))
        add(_pairs(f"{o}.attn.proj", f"{d}.attn1.to_out.0"))
        add(_pairs(f"{o}.cross_attn.q_linear", f"{d}.attn2.to_q"))
        add(_pairs(f"{o}.cross_attn.proj", f"{d}.attn2.to_out.0"))
        add(_pairs(f"{o}.mlp.fc1", f"{d}.ff.net.0.proj") + _pairs(f"{o}.mlp.fc2", f"{d}.ff.net.2"))
    add(_pairs("final_layer.linear", "proj_out"))
    table.append(("final_layer.scale_shift_table", ["scale_shift_table"], "same"))
    return table


#: Key parts of the options diffusers cannot hold: original layout (PixArt-sigma's) and diffusers-style names
#: (diffusers' convert_pixart_sigma_to_diffusers.py --qk_norm writes ``attn1.q_norm``, which no diffusers model
#: loads; diffusers' Attention calls its own ``norm_q``).
_OPTION_PARTS = {"qk_norm": (".attn.q_norm.", ".attn.k_norm.", ".attn1.q_norm.", ".attn1.k_norm.", ".attn1.norm_q.",
                             ".attn1.norm_k."),
                 "kv_compress_config": (".attn.sr.", ".attn.norm.", ".attn1.sr.", ".attn1.norm.")}


def _refuse_options(where: str, state: dict, what: str) -> None:
    """ValueError naming PixArt-sigma's option (qk_norm / kv_compress_config) whose weights ``state`` holds."""
    for option, parts in _OPTION_PARTS.items():
        keys = [k for k in state if any(p in k for p in parts)]
        if keys:
            raise ValueError(f"{where}: checkpoint keys {keys[:4]} are PixArt-sigma's `{option}` (QK-norm / 'conv' KV "
                             f"compression weights), which diffusers' PixArtTransformer2DModel does not have; {what}")


def diffusers_to_original(where: str, state: dict) -> dict:
    """diffusers' ``PixArtTransformer2DModel`` keys -> the PixArt-alpha layout (a new dict; ``state`` is not
    modified). Strict: a key the table does not read raises ValueError; QK-norm or KV-compression weights
    (which diffusers' model has no option for) are refused by the option's name."""
    _refuse_options(where, state, "load the PixArt-sigma (original layout) checkpoint instead")
    n = L.count_blocks(where, state, "transformer_blocks.{}.attn1.to_q.weight")
    extras = "adaln_single.emb.resolution_embedder.linear_1.weight" in state
    table = key_table(n, extras)
    known = {d for _, ds, _ in table for d in ds} | {"caption_projection.y_embedding", "pos_embed.pos_embed"}
    check_unexpected(where, state, known, "a PixArt transformer in the diffusers layout")
    out = gather(where, state, table)
    if "caption_projection.y_embedding" in state:
        out["y_embedder.y_embedding"] = state["caption_projection.y_embedding"]
    return out


def original_to_diffusers(where: str, state: dict) -> dict:
    """The PixArt-alpha layout -> diffusers' ``PixArtTransformer2DModel`` keys (what its
    ``load_state_dict(strict=True)`` takes): ``pos_embed`` and ``y_embedder.y_embedding`` are left out.
    QK-norm or "conv" KV-compression weights are refused by the option's name (diffusers has neither)."""
    _refuse_options(where, state, "the diffusers layout cannot hold it (use the original layout)")
    n = L.count_blocks(where, state, "blocks.{}.attn.qkv.weight")
    extras = "csize_embedder.mlp.0.weight" in state
    table = key_table(n, extras)
    known = {o for o, _, _ in table} | {"pos_embed", "y_embedder.y_embedding"}
    check_unexpected(where, state, known, "a PixArt transformer in the PixArt-alpha layout")
    return scatter(where, state, table)


# --------------------------------------------------------------------------------------------------
# Constructor arguments from the tensor shapes
# --------------------------------------------------------------------------------------------------
def pixart_config(where: str, state: dict, num_heads, known: dict) -> dict:
    """PixArt constructor arguments from an original-layout (or own) state dict: patch, channels, width, depth,
    MLP ratio, caption width, output channels, additional conditions, the null caption's length, and the
    self-attention options the weights show: ``qk_norm`` (``blocks.i.attn.q_norm`` present) and a "conv"
    ``kv_compress_config`` (the blocks holding ``attn.sr``, the scale its kernel size); the weightless KV
    samplings leave no trace (None here: the caller's config says). The heads come from ``num_heads`` or the
    ``known`` named configs (same depth and width). The sample size and position interpolation scale are not
    here: the model reads them from ``pos_embed`` (or its caller)."""
    pw = L.require(where, state, "x_embedder.proj.weight")
    if pw.dim() != 4 or pw.shape[-1] != pw.shape[-2]:
        raise ValueError(f"{where}: checkpoint key 'x_embedder.proj.weight' expected a (D, C, p, p) conv weight, "
                         f"got shape {tuple(pw.shape)}")
    hidden, in_channels, patch = pw.shape[0], pw.shape[1], pw.shape[-1]
    depth = L.count_blocks(where, state, "blocks.{}.attn.qkv.weight")
    fc1 = L.require(where, state, "blocks.0.mlp.fc1.weight")
    cap = L.require(where, state, "y_embedder.y_proj.fc1.weight")
    out_rows = L.require(where, state, "final_layer.linear.weight").shape[0]
    if out_rows % (patch * patch):
        raise ValueError(f"{where}: checkpoint key 'final_layer.linear.weight' has {out_rows} rows; expected a "
                         f"multiple of patch^2 = {patch * patch}")
    null = state.get("y_embedder.y_embedding")
    if null is not None and (null.dim() != 2 or null.shape[1] != cap.shape[1]):
        raise ValueError(f"{where}: checkpoint key 'y_embedder.y_embedding' expected shape (tokens, "
                         f"{cap.shape[1]}) (the caption width), got {tuple(null.shape)}")
    heads = L.known_heads(where, known, depth, hidden, "hidden_size", num_heads)
    sr = {i: state[f"blocks.{i}.attn.sr.weight"] for i in range(depth) if f"blocks.{i}.attn.sr.weight" in state}
    kv = None
    if sr:
        shapes = sorted({tuple(w.shape) for w in sr.values()})
        shape = shapes[0]
        if len(shapes) != 1 or len(shape) != 4 or shape[:2] != (hidden, 1) or shape[2] != shape[3] or shape[2] < 2:
            raise ValueError(f"{where}: checkpoint keys 'blocks.i.attn.sr.weight' (PixArt-sigma's 'conv' KV "
                             f"compression) expected one shape ({hidden}, 1, s, s) with s >= 2, got {shapes}")
        kv = {"sampling": "conv", "scale_factor": shape[2], "kv_compress_layer": sorted(sr)}
    return dict(
        patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth, num_heads=heads,
        mlp_ratio=fc1.shape[0] / hidden, caption_channels=cap.shape[1], out_channels=out_rows // (patch * patch),
        use_additional_conditions="csize_embedder.mlp.0.weight" in state,
        model_max_length=None if null is None else null.shape[0],
        qk_norm=any(f"blocks.{i}.attn.q_norm.weight" in state for i in range(depth)),  # partial: copy_into names
        kv_compress_config=kv,
    )


# --------------------------------------------------------------------------------------------------
# PixArt-sigma's training configs: the self-attention options
# --------------------------------------------------------------------------------------------------
_CONFIG_BYTES = 1 << 20
_NOT_LITERAL = object()


def read_config(where: str, config) -> dict:
    """The self-attention options a PixArt-sigma config sets, as its scripts read them: ``{"qk_norm": qk_norm,
    "kv_compress_config": kv_compress_config if kv_compress else None}`` (only the entries the config has).

    ``config``: a dict of the config's variables, or the path of a PixArt-sigma config file
    (``configs/pixart_sigma_config/*.py``, or the ``config.py`` its ``train.py`` dumps into the work_dir), read
    without running it: its top-level assignments of literals (``dict(key=literal, ...)`` included, as mmcv writes
    dicts), after those of its ``_base_`` files (paths relative to it; dicts merged key by key, as mmcv does). Only
    ``qk_norm``, ``kv_compress`` and ``kv_compress_config`` are read; a ``kv_compress_config`` without
    ``kv_compress`` is refused (PixArt-sigma ignores it unless ``kv_compress`` is True)."""
    if isinstance(config, (str, os.PathLike)):
        values = _config_file(where, Path(config), 0)
    elif isinstance(config, Mapping):
        values = dict(config)
    else:
        raise ValueError(f"{where}: `config` expected a PixArt-sigma config (a dict of its variables, or the path "
                         f"of its .py file), got {type(config).__name__}")
    for key in ("qk_norm", "kv_compress", "kv_compress_config"):
        if values.get(key) is _NOT_LITERAL:
            raise ValueError(f"{where}: `config` entry {key!r} expected a literal (True/False, a dict), got an "
                             "expression (config files are read, never run)")
    out = {k: values[k] for k in ("qk_norm",) if k in values}
    if "kv_compress" in values:
        on = values["kv_compress"]
        if not isinstance(on, bool):
            raise ValueError(f"{where}: `config['kv_compress']` expected a bool, got {on!r}")
        if on and "kv_compress_config" not in values:
            raise ValueError(f"{where}: `config` has kv_compress = True but no kv_compress_config")
        out["kv_compress_config"] = values["kv_compress_config"] if on else None
    elif values.get("kv_compress_config") is not None:
        raise ValueError(f"{where}: `config` has kv_compress_config but no kv_compress flag (PixArt-sigma uses "
                         "kv_compress_config only when kv_compress = True); set kv_compress")
    return out


def _config_file(where: str, path: Path, depth: int) -> dict:
    """A config file's top-level variables (non-literal values as ``_NOT_LITERAL``), its ``_base_`` files first."""
    if depth > 8:
        raise ValueError(f"{where}: `config` file {str(path)!r}: `_base_` files nest deeper than 8 (a cycle?)")
    if not path.is_file():
        raise ValueError(f"{where}: `config` file {str(path)!r} not found")
    if path.stat().st_size > _CONFIG_BYTES:
        raise ValueError(f"{where}: `config` file {str(path)!r} expected a PixArt-sigma config (at most "
                         f"{_CONFIG_BYTES} bytes), got {path.stat().st_size} bytes")
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError) as e:
        raise ValueError(f"{where}: `config` file {str(path)!r} is not a Python config file ({type(e).__name__}: "
                         f"{e})") from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = _literal(node.value)
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
                values[node.targets[0].id] = _NOT_LITERAL
    base = values.pop("_base_", [])
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, (list, tuple)) or not all(isinstance(b, str) for b in bases):
        raise ValueError(f"{where}: `config` file {str(path)!r}: `_base_` expected a path or a list of paths")
    merged: dict = {}
    for b in bases:
        merged = _merge(merged, _config_file(where, path.parent / b, depth + 1))
    return _merge(merged, values)


def _literal(node: ast.expr):
    """``ast.literal_eval`` of ``node``, with mmcv's ``dict(key=literal, ...)`` read as a dict too: how the configs
    write some dicts, and how mmcv's ``Config.dump`` writes every dict whose keys are names (the ``config.py``
    that PixArt-sigma's ``train.py`` saves in its work_dir next to the checkpoints). Nothing is run."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        if any(k.arg is None for k in node.keywords):
            raise ValueError("dict(**...) is not a literal")
        return {k.arg: _literal(k.value) for k in node.keywords}
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("{**...} is not a literal")
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    return ast.literal_eval(node)


def _merge(base: dict, child: dict) -> dict:
    """mmcv's rule: the child's values win; dicts merge key by key unless the child's has ``_delete_=True``."""
    out = dict(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not v.get("_delete_", False):
            out[k] = _merge(out[k], v)
        else:
            out[k] = {a: b for a, b in v.items() if a != "_delete_"} if isinstance(v, dict) else v
    return out
