"""Checkpoint converters: other code bases' layouts to eekernels' models, as public functions.

- DiT: facebookresearch/DiT (``dit_config``, ``dit_label_classes``) and diffusers' ``DiTTransformer2DModel``
  (both ways: ``diffusers_dit_to_facebook`` gives the facebookresearch layout, ``facebook_dit_to_diffusers``
  the reverse);
- U-ViT: baofff/U-ViT (``uvit_config``; the keys are the same);
- U-Net: diffusers' ``UNet2DModel`` (``unet_config_kwargs``, ``diffusers_unet_to_ours`` and back,
  ``ours_to_diffusers_unet``).

The text-to-image and flow families have one submodule each: ``convert.pixart``, ``convert.sd3``, ``convert.flux``.

Each takes a flat ``{name: tensor}`` state dict and raises ValueError naming the key for a missing,
unexpected or mis-shaped entry. The models' ``from_checkpoint`` / ``from_diffusers`` build on them.
"""
from __future__ import annotations

import re

import torch

from eekernels.models import _layers as L
from eekernels.models.convert._layouts import check_unexpected, equal_rows, gather, scatter
from eekernels.models.convert._layouts import pairs as _pairs


# --------------------------------------------------------------------------------------------------
# DiT: facebookresearch/DiT and diffusers' DiTTransformer2DModel
# --------------------------------------------------------------------------------------------------
def dit_config(where: str, state: dict, num_heads, known: dict) -> dict:
    """DiT constructor arguments from the tensor shapes of a facebookresearch-layout (or eekernels) state dict;
    the heads from ``num_heads`` or the ``known`` named configs."""
    pw = L.require(where, state, "x_embedder.proj.weight")  # (D, C, p, p)
    hidden, in_channels, patch = pw.shape[0], pw.shape[1], pw.shape[-1]
    depth = L.count_blocks(where, state, "blocks.{}.attn.qkv.weight")
    fc1 = L.require(where, state, "blocks.0.mlp.fc1.weight")
    out_rows = L.require(where, state, "final_layer.linear.weight").shape[0]
    out_channels = out_rows // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels) or out_rows % (patch * patch):
        raise ValueError(f"{where}: final_layer.linear.weight has {out_rows} rows; expected patch^2 * C or "
                         f"patch^2 * 2C = {patch * patch * in_channels} or {2 * patch * patch * in_channels}")
    grid = L.square_grid(where, L.require(where, state, "pos_embed").shape[1])
    table = state.get("y_embedder.embedding_table.weight")
    heads = L.known_heads(where, known, depth, hidden, "hidden_size", num_heads)
    return dict(
        input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
        num_heads=heads, mlp_ratio=fc1.shape[0] / hidden, learn_sigma=out_channels == 2 * in_channels,
        num_classes=None if table is None else table.shape[0] - 1, class_dropout_prob=0.1,  # see dit_label_classes
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        block_embedders=_DIT_BLOCK_EMB.format(1) + "t_embedder.mlp.0.weight" in state,
    )


def dit_label_classes(where: str, rows: int, overrides: dict, args: dict) -> dict:
    """``num_classes`` and ``class_dropout_prob`` for a label table of ``rows`` rows (``from_checkpoint``'s rule).

    facebookresearch's ``LabelEmbedder`` holds ``num_classes + use_cfg_embedding`` rows, ``use_cfg_embedding =
    dropout_prob > 0``. ``overrides`` (the caller's) come first, then a ``train.py`` checkpoint's ``args``.
    """
    src = "num_classes=" if "num_classes" in overrides else "the checkpoint's args.num_classes"
    n = overrides.get("num_classes", args.get("num_classes"))
    p = overrides.get("class_dropout_prob", args.get("class_dropout_prob"))
    if isinstance(n, int) and not isinstance(n, bool):
        if rows not in (n, n + 1):
            raise ValueError(f"{where}: {src} {n} does not fit the label table of {rows} rows (expected "
                             f"{n} rows without a CFG null class or {n + 1} with one); pass num_classes=")
        if p is not None and (p > 0) != (rows == n + 1):
            raise ValueError(f"{where}: class_dropout_prob={p} expected {'> 0' if rows == n + 1 else '0'} for "
                             f"{n} classes and a label table of {rows} rows")
        return dict(num_classes=n, class_dropout_prob=(0.1 if rows == n + 1 else 0.0) if p is None else p)
    if p is not None:
        return dict(num_classes=rows - (p > 0), class_dropout_prob=p)
    return dict(num_classes=rows - 1, class_dropout_prob=0.1)  # the default: the last row is the null class


#: DiT block weights: (diffusers name, facebookresearch name) under ``transformer_blocks.i.`` / ``blocks.i.``
_DIT_BLOCK_PAIRS = (("attn1.to_out.0", "attn.proj"), ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2"),
                    ("norm1.linear", "adaLN_modulation.1"))
#: The embedders diffusers copies into every block (``norm1.emb.``): facebookresearch key -> diffusers name
_DIT_EMBEDDERS = {"t_embedder.mlp.0.weight": "timestep_embedder.linear_1.weight",
                  "t_embedder.mlp.0.bias": "timestep_embedder.linear_1.bias",
                  "t_embedder.mlp.2.weight": "timestep_embedder.linear_2.weight",
                  "t_embedder.mlp.2.bias": "timestep_embedder.linear_2.bias",
                  "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight"}
_DIT_EMB = "transformer_blocks.{}.norm1.emb."
#: Where eekernels' DiT keeps block i's own embedder copy when the copies differ (``DiT(block_embedders=True)``)
_DIT_BLOCK_EMB = "blocks.{}."


def dit_key_table(depth: int, qkv_bias: bool = True) -> list:
    """``[(facebookresearch key, [diffusers keys], op)]`` of a DiT's weights other than the shared embedders and
    ``pos_embed`` (ops as in ``convert._layouts``: the fused qkv is "cat" of ``attn1.to_q/k/v``)."""
    table = (_pairs("x_embedder.proj", "pos_embed.proj") + _pairs("final_layer.adaLN_modulation.1", "proj_out_1")
             + _pairs("final_layer.linear", "proj_out_2"))
    for i in range(depth):
        s, f = f"transformer_blocks.{i}.", f"blocks.{i}."
        for w in ("weight", "bias") if qkv_bias else ("weight",):
            table.append((f"{f}attn.qkv.{w}", [f"{s}attn1.to_{n}.{w}" for n in "qkv"], "cat"))
        for src, dst in _DIT_BLOCK_PAIRS:
            table += _pairs(f + dst, s + src)
    return table


def diffusers_dit_to_facebook(where: str, state: dict) -> dict:
    """Rename diffusers' DiTTransformer2DModel keys to the facebookresearch layout. The per-block embedder copies
    (``norm1.emb``) become the one shared ``t_embedder`` / ``y_embedder`` when they are all equal (converted
    checkpoints); otherwise block 0's are those and block i >= 1 keeps its own as ``blocks.i.t_embedder`` /
    ``blocks.i.y_embedder`` (``DiT(block_embedders=True)``; not a facebookresearch layout)."""
    depth = L.count_blocks(where, state, "transformer_blocks.{}.norm1.linear.weight")
    emb = _DIT_EMB
    shared = {k[len(emb.format(0)):]: v for k, v in state.items() if k.startswith(emb.format(0))}
    differs = False
    for i in range(1, depth):
        for name, v in shared.items():
            other = L.require(where, state, emb.format(i) + name)
            if other.shape != v.shape:
                raise ValueError(f"{where}: block {i}'s embedder copy {emb.format(i) + name!r} expected block 0's "
                                 f"shape {tuple(v.shape)}, got {tuple(other.shape)}")
            differs = differs or not torch.equal(other, v)
    table = dit_key_table(depth, qkv_bias="transformer_blocks.0.attn1.to_q.bias" in state)
    # Every key must be one the conversion reads (as from_checkpoint is strict): anything else is another
    # architecture (e.g. cross-attention layers) whose weights would otherwise be dropped silently.
    known = {d for _, ds, _ in table for d in ds} | {"pos_embed.pos_embed"}
    known |= {emb.format(i) + name for i in range(depth) for name in shared}
    check_unexpected(where, state, known, "a DiTTransformer2DModel")
    fb = gather(where, state, table)
    for key, name in _DIT_EMBEDDERS.items():
        if name in shared or not key.startswith("y_embedder."):  # the label table only where there is one
            fb[key] = L.require(where, shared, name)
            if differs:
                fb.update({_DIT_BLOCK_EMB.format(i) + key: state[emb.format(i) + name] for i in range(1, depth)})
    return fb


def facebook_dit_to_diffusers(state: dict, depth: int) -> dict:
    """The inverse of :func:`diffusers_dit_to_facebook`: facebookresearch DiT keys -> diffusers'
    DiTTransformer2DModel keys, the shared timestep/label embedders copied into every block (as diffusers keeps
    them), or block i's own copy where ``state`` has one (``blocks.i.t_embedder...``). ``pos_embed`` is not among
    them: diffusers holds it as a fixed buffer (the caller copies it)."""
    where = "facebook_dit_to_diffusers"
    out = scatter(where, state, dit_key_table(depth, qkv_bias="blocks.0.attn.qkv.bias" in state))
    for key, name in _DIT_EMBEDDERS.items():
        if key in state:
            own = [_DIT_BLOCK_EMB.format(i) + key for i in range(depth)]
            out.update({_DIT_EMB.format(i) + name: state[own[i] if i and own[i] in state else key]
                        for i in range(depth)})
    return out


# --------------------------------------------------------------------------------------------------
# U-ViT: baofff/U-ViT
# --------------------------------------------------------------------------------------------------
def uvit_config(where: str, state: dict, num_heads, known: dict, null_class_embedding: bool = True) -> dict:
    """UViT constructor arguments from the tensor shapes of a baofff/U-ViT (or eekernels) state dict.

    The heads come from ``num_heads`` or the ``known`` named configs. A label table of R rows is R - 1
    classes plus the CFG null label (R classes with ``null_class_embedding=False``).
    """
    if "context_embed.weight" in state:  # baofff libs/uvit_t2i.py: CLIP tokens instead of a label
        raise ValueError(f"{where}: text-conditioned U-ViT (uvit_t2i: `context_embed`, CLIP-token input) "
                         "checkpoints are not supported; expected the class-conditional or unconditional "
                         "U-ViT (libs/uvit.py)")
    pw = L.require(where, state, "patch_embed.proj.weight")  # (D, C, p, p)
    dim, in_channels, patch = pw.shape[0], pw.shape[1], pw.shape[-1]
    n = L.count_blocks(where, state, "in_blocks.{}.attn.qkv.weight")
    table = state.get("label_emb.weight")
    num_classes = None if table is None else table.shape[0] - int(bool(null_class_embedding))
    extras = 1 if table is None else 2
    grid = L.square_grid(where, L.require(where, state, "pos_embed").shape[1] - extras, extras)
    return dict(
        input_size=grid * patch, patch_size=patch, in_channels=in_channels, embed_dim=dim, depth=2 * n,
        num_heads=L.known_heads(where, known, 2 * n, dim, "embed_dim", num_heads),
        mlp_ratio=L.require(where, state, "in_blocks.0.mlp.fc1.weight").shape[0] / dim,
        qkv_bias="in_blocks.0.attn.qkv.bias" in state, mlp_time_embed="time_embed.0.weight" in state,
        num_classes=num_classes, conv="final_layer.weight" in state,
    )


# --------------------------------------------------------------------------------------------------
# U-Net: diffusers' UNet2DModel
# --------------------------------------------------------------------------------------------------
_CONFIG_KEYS = (
    "sample_size", "in_channels", "out_channels", "center_input_sample", "time_embedding_type",
    "time_embedding_dim", "freq_shift", "flip_sin_to_cos", "down_block_types", "mid_block_type", "up_block_types",
    "block_out_channels", "layers_per_block", "mid_block_scale_factor", "downsample_padding", "downsample_type",
    "upsample_type", "act_fn", "attention_head_dim", "norm_num_groups", "attn_norm_num_groups", "norm_eps",
    "resnet_time_scale_shift", "add_attention", "class_embed_type", "num_class_embeds",
)
# Not computed: dropout (inference, and fine-tuning here runs without it); num_train_timesteps only sizes
# the "learned" time embedding, which the constructor rejects.
_IGNORED_KEYS = ("dropout", "num_train_timesteps")


def unet_config_kwargs(config: dict) -> dict:
    """UNet constructor arguments from a diffusers ``UNet2DModel`` config dict (unknown options are an error)."""
    unknown = [k for k in config if not k.startswith("_") and k not in _CONFIG_KEYS + _IGNORED_KEYS]
    if unknown:
        raise ValueError(f"UNet: `config` expected UNet2DModel options among {_CONFIG_KEYS}, got {unknown!r}")
    if config.get("norm_num_groups", 32) is None:
        raise ValueError("UNet: `config['norm_num_groups']` expected an int, got None")
    return {k: config[k] for k in _CONFIG_KEYS if k in config}


_RENAMES = (
    (r"\.downsamplers\.0\.conv\.", ".downsample."),
    (r"\.upsamplers\.0\.conv\.", ".upsample."),
    (r"\.to_out\.0\.", ".to_out."),
    # pre-0.14 attention names (diffusers converts them on load; so do we)
    (r"\.query\.", ".to_q."), (r"\.key\.", ".to_k."), (r"\.value\.", ".to_v."), (r"\.proj_attn\.", ".to_out."),
)


def diffusers_unet_to_ours(model, state: dict) -> dict:
    """diffusers ``UNet2DModel`` keys -> ``model``'s (a UNet built from the same config): renames, QKV
    concatenated, every resnet's time_emb_proj stacked in ``model``'s row order (its ``temb_offset``s)."""
    out = {}
    for k, v in state.items():
        for pat, rep in _RENAMES:
            k = re.sub(pat, rep, k)
        out[k] = v
    # Fused QKV: to_q/to_k/to_v -> to_qkv.
    for k in [k for k in out if ".to_q." in k]:
        names = [k.replace(".to_q.", f".{n}.") for n in ("to_q", "to_k", "to_v")]
        missing = [n for n in names if n not in out]
        if missing:
            raise ValueError(f"UNet.from_diffusers: checkpoint has `{k}` but is missing {missing}")
        out[k.replace(".to_q.", ".to_qkv.")] = torch.cat([out.pop(n) for n in names], dim=0)
    # Stacked time projections, in the model's row order.
    prefix = {id(m): name for name, m in model.named_modules()}
    rows = sorted((r.temb_offset, prefix[id(r)]) for r in model.modules() if hasattr(r, "temb_offset"))
    for suffix in ("weight", "bias"):
        parts = []
        for _, name in rows:
            key = f"{name}.time_emb_proj.{suffix}"
            if key not in out:
                raise ValueError(f"UNet.from_diffusers: missing `{key}` (every resnet needs a time projection)")
            parts.append(out.pop(key))
        out[f"time_emb_proj.{suffix}"] = torch.cat(parts, dim=0)
    return out


#: ``model``'s names -> diffusers' current ones (the inverse of ``_RENAMES``' first three)
_INVERSE_RENAMES = ((r"\.downsample\.", ".downsamplers.0.conv."), (r"\.upsample\.", ".upsamplers.0.conv."),
                    (r"\.to_out\.", ".to_out.0."))


def ours_to_diffusers_unet(model, state: dict) -> dict:
    """The inverse of :func:`diffusers_unet_to_ours`: ``model``'s keys (a UNet; ``state`` its state dict) ->
    diffusers ``UNet2DModel`` keys (``load_state_dict(strict=True)`` of one built from the same config takes them):
    every fused QKV split into ``to_q/to_k/to_v``, the stacked ``time_emb_proj`` split per resnet by its
    ``temb_offset``, modules renamed. A new dict; split parts are copies, the rest the given tensors."""
    where = "ours_to_diffusers_unet"
    out = dict(state)
    prefix = {id(m): name for name, m in model.named_modules()}
    rows = sorted((r.temb_offset, r.temb_width, prefix[id(r)]) for r in model.modules() if hasattr(r, "temb_offset"))
    for suffix in ("weight", "bias"):
        stacked = L.require(where, out, f"time_emb_proj.{suffix}")
        if stacked.shape[0] != sum(w for _, w, _ in rows):
            raise ValueError(f"{where}: `time_emb_proj.{suffix}` expected {sum(w for _, w, _ in rows)} rows (every "
                             f"resnet's time projection), got shape {tuple(stacked.shape)}")
        del out[f"time_emb_proj.{suffix}"]
        for offset, width, name in rows:
            out[f"{name}.time_emb_proj.{suffix}"] = stacked[offset: offset + width].clone()
    for key in [k for k in out if ".to_qkv." in k]:
        v = out.pop(key)
        parts = torch.split(v, equal_rows(where, key, v, 3), dim=0)
        out.update({key.replace(".to_qkv.", f".{n}."): p.clone() for n, p in zip(("to_q", "to_k", "to_v"), parts)})
    renamed = {}
    for k, v in out.items():
        for pat, rep in _INVERSE_RENAMES:
            k = re.sub(pat, rep, k)
        renamed[k] = v
    return renamed
