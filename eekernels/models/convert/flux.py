"""FLUX.1 checkpoint converters: black-forest-labs/flux (the "original" layout, which ``eekernels.models.Flux``
uses key for key) and diffusers' ``FluxTransformer2DModel`` (the "diffusers" layout).

The two layouts hold the same tensors, renamed, with three kinds of change:
- the image and text attention projections: one ``qkv`` GEMM (original) against ``to_q/to_k/to_v`` and
  ``add_q_proj/add_k_proj/add_v_proj`` (diffusers), concatenated in q, k, v order along the output rows;
- the single-stream ``linear1`` (original) is ``to_q, to_k, to_v, proj_mlp`` (diffusers) concatenated;
- the final adaLN: the original splits its output as ``shift, scale``, diffusers' ``AdaLayerNormContinuous``
  as ``scale, shift``, so the two row halves of ``final_layer.adaLN_modulation.1`` are swapped.

Functions: :func:`detect_layout`, :func:`flux_config` (constructor arguments from the tensor shapes),
:func:`diffusers_to_original` and :func:`original_to_diffusers`. Each takes a flat ``{name: tensor}`` state dict
(not modified) and raises ValueError naming the key for a missing, unexpected or mis-shaped entry.
"""
from __future__ import annotations

from eekernels.models import _layers as L
from eekernels.models.convert._layouts import check_unexpected, detect, gather, scatter
from eekernels.models.convert._layouts import pairs as _pairs

#: Prefixes that wrap the original layout's keys in other tools' files (ComfyUI / ldm-style checkpoints).
ORIGINAL_PREFIXES = ("model.diffusion_model.",)

#: RoPE axes of the released FLUX.1 models (head dim 128); other head dims need ``axes_dims_rope=``.
DEFAULT_AXES = {128: (16, 56, 56)}


def strip_prefixes(state: dict) -> dict:
    """``state`` with the ``ORIGINAL_PREFIXES`` taken off its keys (only when every key has that prefix)."""
    for prefix in ORIGINAL_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def detect_layout(where: str, state: dict) -> str:
    """"original" (black-forest-labs: ``img_in.weight``) or "diffusers" (``x_embedder.weight``), else ValueError."""
    return detect(where, state, "FLUX.1", ("img_in.weight", "black-forest-labs"), ("x_embedder.weight", "diffusers"))


# --------------------------------------------------------------------------------------------------
# The key table: every original key and the diffusers key(s) it is made of
# --------------------------------------------------------------------------------------------------
def key_table(num_double: int, num_single: int, guidance: bool) -> list:
    """``[(original key, [diffusers keys], op)]`` with op "same" (one tensor), "cat" (the diffusers tensors
    concatenated along dim 0 give the original one) or "swap" (the two row halves exchanged)."""
    table = []
    add = table.extend
    add(_pairs("img_in", "x_embedder") + _pairs("txt_in", "context_embedder"))
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if guidance:
        embedders.append(("guidance_in", "guidance_embedder"))
    for o, d in embedders:
        add(_pairs(f"{o}.in_layer", f"time_text_embed.{d}.linear_1"))
        add(_pairs(f"{o}.out_layer", f"time_text_embed.{d}.linear_2"))
    for i in range(num_double):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        add(_pairs(f"{o}.img_mod.lin", f"{d}.norm1.linear") + _pairs(f"{o}.txt_mod.lin", f"{d}.norm1_context.linear"))
        for w in ("weight", "bias"):
            table.append((f"{o}.img_attn.qkv.{w}", [f"{d}.attn.to_{n}.{w}" for n in "qkv"], "cat"))
            table.append((f"{o}.txt_attn.qkv.{w}", [f"{d}.attn.add_{n}_proj.{w}" for n in "qkv"], "cat"))
        for stream, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            table.append((f"{o}.{stream}_attn.norm.query_norm.scale", [f"{d}.attn.{q}.weight"], "same"))
            table.append((f"{o}.{stream}_attn.norm.key_norm.scale", [f"{d}.attn.{k}.weight"], "same"))
        add(_pairs(f"{o}.img_attn.proj", f"{d}.attn.to_out.0") + _pairs(f"{o}.txt_attn.proj", f"{d}.attn.to_add_out"))
        add(_pairs(f"{o}.img_mlp.0", f"{d}.ff.net.0.proj") + _pairs(f"{o}.img_mlp.2", f"{d}.ff.net.2"))
        add(_pairs(f"{o}.txt_mlp.0", f"{d}.ff_context.net.0.proj") + _pairs(f"{o}.txt_mlp.2", f"{d}.ff_context.net.2"))
    for i in range(num_single):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for w in ("weight", "bias"):
            table.append((f"{o}.linear1.{w}", [f"{d}.attn.to_{n}.{w}" for n in "qkv"] + [f"{d}.proj_mlp.{w}"], "cat"))
        table.append((f"{o}.norm.query_norm.scale", [f"{d}.attn.norm_q.weight"], "same"))
        table.append((f"{o}.norm.key_norm.scale", [f"{d}.attn.norm_k.weight"], "same"))
        add(_pairs(f"{o}.linear2", f"{d}.proj_out") + _pairs(f"{o}.modulation.lin", f"{d}.norm.linear"))
    add(_pairs("final_layer.linear", "proj_out"))
    for w in ("weight", "bias"):
        table.append((f"final_layer.adaLN_modulation.1.{w}", [f"norm_out.linear.{w}"], "swap"))
    return table


def _block_counts(where: str, state: dict, double_key: str, single_key: str) -> tuple[int, int]:
    return L.count_blocks(where, state, double_key), L.count_blocks(where, state, single_key)


def diffusers_to_original(where: str, state: dict) -> dict:
    """diffusers ``FluxTransformer2DModel`` keys -> the black-forest-labs layout (new dict; ``state`` untouched)."""
    nd, ns = _block_counts(where, state, "transformer_blocks.{}.norm1.linear.weight",
                           "single_transformer_blocks.{}.norm.linear.weight")
    guidance = any(k.startswith("time_text_embed.guidance_embedder.") for k in state)
    table = key_table(nd, ns, guidance)
    check_unexpected(where, state, {d for _, ds, _ in table for d in ds}, "a FLUX.1 transformer (diffusers layout)")
    return gather(where, state, table)


def original_to_diffusers(where: str, state: dict) -> dict:
    """The black-forest-labs layout -> diffusers ``FluxTransformer2DModel`` keys (new dict; ``state`` untouched).

    The fused rows are split by the hidden size (``img_in.weight``'s rows): q, k, v of ``hidden`` rows each, and
    the single blocks' MLP part the rest of ``linear1``.
    """
    state = strip_prefixes(state)
    nd, ns = _block_counts(where, state, "double_blocks.{}.img_attn.qkv.weight", "single_blocks.{}.linear1.weight")
    guidance = any(k.startswith("guidance_in.") for k in state)
    table = key_table(nd, ns, guidance)
    check_unexpected(where, state, {o for o, _, _ in table}, "a FLUX.1 transformer (original layout)")
    hidden = L.require(where, state, "img_in.weight").shape[0]

    def split(orig, v, ds):
        rest = v.shape[0] - hidden * (len(ds) - 1)
        sizes = [hidden] * (len(ds) - 1) + [rest] if len(ds) == 4 else [hidden] * 3
        if v.shape[0] != sum(sizes) or rest <= 0:
            want = f"3 * {hidden}" + (" + the MLP width" if len(ds) == 4 else "")
            raise ValueError(f"{where}: checkpoint key {orig!r} expected {want} rows, got shape {tuple(v.shape)}")
        return sizes

    return scatter(where, state, table, split)


# --------------------------------------------------------------------------------------------------
# Configuration from the tensor shapes (original layout)
# --------------------------------------------------------------------------------------------------
def flux_config(where: str, state: dict, axes_dims_rope=None) -> dict:
    """``Flux`` constructor arguments from an original-layout state dict's shapes.

    The RoPE axes are not stored in the weights: ``axes_dims_rope`` if given, else the released models'
    (16, 56, 56) for head dim 128, else a ValueError asking for ``axes_dims_rope=``.
    """
    w_in = L.require(where, state, "img_in.weight")  # (D, 4 * C)
    hidden, packed_in = w_in.shape
    if packed_in % 4:
        raise ValueError(f"{where}: img_in.weight expected 4 * C input features (2x2-packed latents), got "
                         f"shape {tuple(w_in.shape)}")
    head_dim = L.require(where, state, "double_blocks.0.img_attn.norm.query_norm.scale").shape[0]
    if head_dim < 1 or hidden % head_dim:
        raise ValueError(f"{where}: the QK-norm scale has {head_dim} entries, expected a head dim dividing the "
                         f"hidden size {hidden}")
    nd = L.count_blocks(where, state, "double_blocks.{}.img_attn.qkv.weight")
    ns = L.count_blocks(where, state, "single_blocks.{}.linear1.weight")
    mlp_hidden = L.require(where, state, "double_blocks.0.img_mlp.0.weight").shape[0]
    packed_out = L.require(where, state, "final_layer.linear.weight").shape[0]
    if packed_out % 4:
        raise ValueError(f"{where}: final_layer.linear.weight expected 4 * C output rows (2x2-packed latents), "
                         f"got {packed_out}")
    if axes_dims_rope is None:
        if head_dim not in DEFAULT_AXES:
            raise ValueError(f"{where}: cannot infer the RoPE axes for head dim {head_dim} (known: "
                             f"{DEFAULT_AXES}); pass axes_dims_rope=")
        axes_dims_rope = DEFAULT_AXES[head_dim]
    return dict(
        latent_channels=packed_in // 4, out_channels=packed_out // 4, num_layers=nd, num_single_layers=ns,
        attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
        joint_attention_dim=L.require(where, state, "txt_in.weight").shape[1],
        pooled_projection_dim=L.require(where, state, "vector_in.in_layer.weight").shape[1],
        guidance_embeds="guidance_in.in_layer.weight" in state, axes_dims_rope=tuple(axes_dims_rope),
        mlp_ratio=mlp_hidden / hidden,
    )
