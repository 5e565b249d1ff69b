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

Functions: :func:`detect_layout`, :func:`key_table`, :func:`diffusers_to_original`, :func:`original_to_diffusers`
and :func:`pixart_config` (constructor arguments from the tensor shapes). Each takes a flat ``{name: tensor}``
state dict (not modified) and raises ValueError naming the key for a missing, unexpected or mis-shaped entry.
"""
from __future__ import annotations

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


def diffusers_to_original(where: str, state: dict) -> dict:
    """diffusers' ``PixArtTransformer2DModel`` keys -> the PixArt-alpha layout (a new dict; ``state`` is not
    modified). Strict: a key the table does not read raises ValueError (e.g. QK-norm or KV-compression
    layers, which no released PixArt has and eekernels does not implement)."""
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
    ``load_state_dict(strict=True)`` takes): ``pos_embed`` and ``y_embedder.y_embedding`` are left out."""
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
    MLP ratio, caption width, output channels, additional conditions and the null caption's length. The
    heads come from ``num_heads`` or the ``known`` named configs (same depth and width). The sample size and
    position interpolation scale are not here: the model reads them from ``pos_embed`` (or its caller)."""
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
    return dict(
        patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth, num_heads=heads,
        mlp_ratio=fc1.shape[0] / hidden, caption_channels=cap.shape[1], out_channels=out_rows // (patch * patch),
        use_additional_conditions="csize_embedder.mlp.0.weight" in state,
        model_max_length=None if null is None else null.shape[0],
    )
