"""SD3 / SD3.5 (MMDiT) checkpoint converters: Stability AI's layout (``sd3_impls.py`` / ``mmditx.py``, the
"original" layout, which ``eekernels.models.SD3`` uses key for key apart from its stacked adaLN) and diffusers'
``SD3Transformer2DModel`` (the "diffusers" layout).

The two layouts hold the same tensors, renamed, with two kinds of change:
- the attention projections: one ``qkv`` GEMM per stream (original) against ``to_q/to_k/to_v`` (image) and
  ``add_q_proj/add_k_proj/add_v_proj`` (text), concatenated in q, k, v order along the output rows;
- the two ``AdaLayerNormContinuous`` modulations (the final layer's and the last block's text-stream norm, the
  ``context_pre_only`` one): the original splits their output as ``shift, scale``, diffusers as
  ``scale, shift``, so the two row halves are swapped.

A single-file Stability AI checkpoint nests the transformer under ``model.diffusion_model.`` next to the VAE
(``first_stage_model.``) and text encoders (``text_encoders.``): :func:`strip_prefixes` keeps the transformer.

Functions: :func:`detect_layout`, :func:`sd3_config` (constructor arguments from the tensor shapes),
:func:`key_table`, :func:`diffusers_to_original` and :func:`original_to_diffusers`. Each takes a flat
``{name: tensor}`` state dict (not modified) and raises ValueError naming the key for a missing, unexpected or
mis-shaped entry.
"""
from __future__ import annotations

import math

from eekernels.models import _layers as L
from eekernels.models.convert._layouts import check_unexpected, detect, gather, scatter
from eekernels.models.convert._layouts import pairs as _pairs

#: The prefix a single-file Stability AI checkpoint puts before the transformer's keys.
ORIGINAL_PREFIX = "model.diffusion_model."

#: Head dim of every released SD3 / SD3.5 model (their heads are hidden / 64); it is only readable from the
#: weights when QK-norm is on (the ``ln_q`` weight has head-dim entries).
DEFAULT_HEAD_DIM = 64


def strip_prefixes(state: dict) -> dict:
    """The transformer's keys of a single-file checkpoint, without ``model.diffusion_model.`` (the VAE and
    text-encoder entries next to it are left out); ``state`` itself when no key has that prefix."""
    if not any(k.startswith(ORIGINAL_PREFIX) for k in state):
        return state
    return {k[len(ORIGINAL_PREFIX):]: v for k, v in state.items() if k.startswith(ORIGINAL_PREFIX)}


def detect_layout(where: str, state: dict) -> str:
    """"original" (Stability AI: ``joint_blocks.0...``) or "diffusers" (``transformer_blocks.0...``), else ValueError."""
    return detect(where, state, "SD3", ("joint_blocks.0.x_block.attn.qkv.weight", "Stability AI"),
                  ("transformer_blocks.0.norm1.linear.weight", "diffusers"))


# --------------------------------------------------------------------------------------------------
# The key table: every original key and the diffusers key(s) it is made of
# --------------------------------------------------------------------------------------------------
def key_table(num_layers: int, dual_attention_layers=(), qk_norm: bool = False) -> list:
    """``[(original key, [diffusers keys], op)]`` with op "same" (one tensor), "cat" (the diffusers tensors
    concatenated along dim 0 give the original one) or "swap" (the two row halves exchanged).

    Block ``num_layers - 1`` is the ``context_pre_only`` one: its text stream has no output projection and no
    MLP, and its text adaLN gives only (shift, scale)."""
    table = [("pos_embed", ["pos_embed.pos_embed"], "same")]
    add = table.extend
    add(_pairs("x_embedder.proj", "pos_embed.proj") + _pairs("context_embedder", "context_embedder"))
    for o, d in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        add(_pairs(f"{o}.mlp.0", f"time_text_embed.{d}.linear_1") + _pairs(f"{o}.mlp.2", f"time_text_embed.{d}.linear_2"))
    for i in range(num_layers):
        o, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == num_layers - 1
        for w in ("weight", "bias"):
            table.append((f"{o}.x_block.attn.qkv.{w}", [f"{d}.attn.to_{n}.{w}" for n in "qkv"], "cat"))
            table.append((f"{o}.context_block.attn.qkv.{w}", [f"{d}.attn.add_{n}_proj.{w}" for n in "qkv"], "cat"))
        if qk_norm:
            for s, q, k in (("x_block", "norm_q", "norm_k"), ("context_block", "norm_added_q", "norm_added_k")):
                table.append((f"{o}.{s}.attn.ln_q.weight", [f"{d}.attn.{q}.weight"], "same"))
                table.append((f"{o}.{s}.attn.ln_k.weight", [f"{d}.attn.{k}.weight"], "same"))
        add(_pairs(f"{o}.x_block.attn.proj", f"{d}.attn.to_out.0"))
        if i in dual_attention_layers:
            for w in ("weight", "bias"):
                table.append((f"{o}.x_block.attn2.qkv.{w}", [f"{d}.attn2.to_{n}.{w}" for n in "qkv"], "cat"))
            if qk_norm:
                table.append((f"{o}.x_block.attn2.ln_q.weight", [f"{d}.attn2.norm_q.weight"], "same"))
                table.append((f"{o}.x_block.attn2.ln_k.weight", [f"{d}.attn2.norm_k.weight"], "same"))
            add(_pairs(f"{o}.x_block.attn2.proj", f"{d}.attn2.to_out.0"))
        add(_pairs(f"{o}.x_block.adaLN_modulation.1", f"{d}.norm1.linear"))
        add(_pairs(f"{o}.x_block.mlp.fc1", f"{d}.ff.net.0.proj") + _pairs(f"{o}.x_block.mlp.fc2", f"{d}.ff.net.2"))
        if last:
            for w in ("weight", "bias"):
                table.append((f"{o}.context_block.adaLN_modulation.1.{w}", [f"{d}.norm1_context.linear.{w}"], "swap"))
        else:
            add(_pairs(f"{o}.context_block.attn.proj", f"{d}.attn.to_add_out"))
            add(_pairs(f"{o}.context_block.adaLN_modulation.1", f"{d}.norm1_context.linear"))
            add(_pairs(f"{o}.context_block.mlp.fc1", f"{d}.ff_context.net.0.proj"))
            add(_pairs(f"{o}.context_block.mlp.fc2", f"{d}.ff_context.net.2"))
    add(_pairs("final_layer.linear", "proj_out"))
    for w in ("weight", "bias"):
        table.append((f"final_layer.adaLN_modulation.1.{w}", [f"norm_out.linear.{w}"], "swap"))
    return table


def _structure(state: dict, block_key: str, dual_key: str, ln_key: str, where: str):
    n = L.count_blocks(where, state, block_key)
    dual = tuple(i for i in range(n) if dual_key.format(i) in state)
    return n, dual, ln_key in state


def diffusers_to_original(where: str, state: dict) -> dict:
    """diffusers ``SD3Transformer2DModel`` keys -> the Stability AI layout (new dict; ``state`` untouched)."""
    n, dual, qk = _structure(state, "transformer_blocks.{}.norm1.linear.weight", "transformer_blocks.{}.attn2.to_q.weight",
                             "transformer_blocks.0.attn.norm_q.weight", where)
    table = key_table(n, dual, qk)
    check_unexpected(where, state, {d for _, ds, _ in table for d in ds}, "an SD3 transformer (diffusers layout)")
    for _, ds, op in table:  # q, k and v of one width
        shapes = {tuple(state[d].shape) for d in ds if d in state} if op == "cat" else set()
        if len(shapes) > 1:
            raise ValueError(f"{where}: {ds} expected one shape (q, k and v), got {sorted(shapes)}")
    return gather(where, state, table)


def original_to_diffusers(where: str, state: dict) -> dict:
    """The Stability AI layout -> diffusers ``SD3Transformer2DModel`` keys (new dict; ``state`` untouched).

    The fused ``qkv`` rows are split in three equal parts (q, k, v)."""
    state = strip_prefixes(state)
    n, dual, qk = _structure(state, "joint_blocks.{}.x_block.attn.qkv.weight", "joint_blocks.{}.x_block.attn2.qkv.weight",
                             "joint_blocks.0.x_block.attn.ln_q.weight", where)
    table = key_table(n, dual, qk)
    check_unexpected(where, state, {o for o, _, _ in table}, "an SD3 transformer (original layout)")
    def split(key, v, ds):
        if v.dim() < 1 or v.shape[0] % 3:
            raise ValueError(f"{where}: checkpoint key {key!r} expected 3 * hidden rows (q, k, v), got shape "
                             f"{tuple(v.shape)}")
        return [v.shape[0] // 3] * 3

    return scatter(where, state, table, split)


# --------------------------------------------------------------------------------------------------
# Configuration from the tensor shapes (original layout)
# --------------------------------------------------------------------------------------------------
def sd3_config(where: str, state: dict, attention_head_dim: int | None = None) -> dict:
    """``SD3`` constructor arguments from an original-layout state dict's shapes.

    The head dim is the ``ln_q`` weight's length when QK-norm is on, else ``attention_head_dim`` (default 64, as
    in every released model). ``sample_size`` is not stored in the weights (it only sets the grid of a freshly
    initialized position table; a loaded one comes from the checkpoint): diffusers' default 128 is used.
    """
    pw = L.require(where, state, "x_embedder.proj.weight")  # (D, C, p, p)
    if pw.dim() != 4 or pw.shape[-1] != pw.shape[-2]:
        raise ValueError(f"{where}: x_embedder.proj.weight expected a (hidden, C, p, p) conv weight, got shape "
                         f"{tuple(pw.shape)}")
    hidden, in_channels, patch = pw.shape[0], pw.shape[1], pw.shape[-1]
    n = L.count_blocks(where, state, "joint_blocks.{}.x_block.attn.qkv.weight")
    dual = tuple(i for i in range(n) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in state)
    ln_q = state.get("joint_blocks.0.x_block.attn.ln_q.weight")
    if ln_q is not None:
        head_dim = ln_q.shape[0]
        if attention_head_dim is not None and attention_head_dim != head_dim:
            raise ValueError(f"{where}: `attention_head_dim` {attention_head_dim} does not fit the QK-norm weight "
                             f"joint_blocks.0.x_block.attn.ln_q.weight of {head_dim} entries")
    else:
        head_dim = attention_head_dim or DEFAULT_HEAD_DIM
    if head_dim < 1 or hidden % head_dim:
        raise ValueError(f"{where}: head dim {head_dim} expected to divide the hidden size {hidden}; pass "
                         "attention_head_dim=")
    positions = L.require(where, state, "pos_embed").shape
    if len(positions) != 3 or positions[0] != 1 or positions[2] != hidden:
        raise ValueError(f"{where}: pos_embed expected shape (1, M*M, {hidden}), got {tuple(positions)}")
    side = math.isqrt(positions[1])
    if side * side != positions[1] or side < 1:
        raise ValueError(f"{where}: pos_embed has {positions[1]} positions; expected a square M*M table")
    out_rows = L.require(where, state, "final_layer.linear.weight").shape[0]
    if out_rows % (patch * patch):
        raise ValueError(f"{where}: final_layer.linear.weight has {out_rows} rows; expected patch^2 * C")
    fc1 = L.require(where, state, "joint_blocks.0.x_block.mlp.fc1.weight").shape[0]
    return dict(
        patch_size=patch, in_channels=in_channels, num_layers=n, attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=L.require(where, state, "context_embedder.weight").shape[1],
        pooled_projection_dim=L.require(where, state, "y_embedder.mlp.0.weight").shape[1],
        out_channels=out_rows // (patch * patch), pos_embed_max_size=side, dual_attention_layers=dual,
        qk_norm="rms_norm" if ln_q is not None else None, mlp_ratio=fc1 / hidden,
    )
