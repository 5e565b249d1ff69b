"""Fused ops in place: the modules of a user's diffusers model that match an eekernels op get a forward that calls it.

Liger-Kernel's per-model patching, on diffusers' hook machinery: each rule of :data:`RULES` names module classes
(matched by name over the class hierarchy, as :mod:`eekernels.families` does), the conditions under which its
replacement computes the same thing, and the replacement. :func:`patch` attaches a ``new_forward`` hook
(``diffusers.hooks.HookRegistry``, hook name ``"eekernels_kernel"``) to every matching module; the replacement reads
the module's OWN parameters (nothing is copied, the ``state_dict`` is unchanged) and calls its children as modules,
so their own hooks, LoRA layers and patches still run. :func:`unpatch` removes the hooks and restores each
module's forward exactly.

Where the fused path runs: on CUDA tensors of float32/float16/bfloat16, when a kernel for the op exists on this
machine (Triton, ``_C``, or cuBLAS for ``linear_act``). Elsewhere the module's own forward runs: on CPU tensors an
op's ``auto`` backend is the torch reference, which is not faster than diffusers' own code. Inside
:func:`forced` the fused path runs on any device (with the backend in force: the torch reference, or Triton's
interpreter under ``eekernels.backend("triton")`` and ``TRITON_INTERPRET=1``); the tests use it.

At each call a replacement first checks what can change after patching (a LoRA or layerwise-casting hook on a
``Linear`` it reads directly, another attention processor, feed-forward chunking, dtypes that diffusers would
promote) and runs the module's own forward when any of it does not hold, before doing any work.

``eekernels.accelerate(..., kernels=True)`` (the default, in place) calls :func:`patch` before it attaches the exit
hooks, so that the exit hooks wrap these; ``eekernels.disable`` calls :func:`unpatch`. The report:
``eekernels.inplace.controller(pipe).patches`` or :func:`report`; ``print`` it for a summary.
"""
from __future__ import annotations

import contextlib
import functools
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn

from eekernels import ops

__all__ = ["RULES", "Rule", "PatchReport", "patch", "unpatch", "report", "forced"]

HOOK = "eekernels_kernel"
_ATTR = "_eekernels_patches"  # the PatchReport, on the model (a plain attribute: never saved)
_FALLBACK = object()  # a replacement returns it, before any work, to have the module's own forward run
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_forced = 0


@contextlib.contextmanager
def forced() -> Iterator[None]:
    """Run the patched modules' fused path on any device (CPU: the op's backend in force), for tests and checks."""
    global _forced
    _forced += 1
    try:
        yield
    finally:
        _forced -= 1


def _on(x: torch.Tensor) -> bool:
    """Whether a replacement takes the fused path for input ``x``."""
    return _forced > 0 or (x.is_cuda and x.dtype in _KERNEL_DTYPES)


# --------------------------------------------------------------------------------------------------
# What a replacement may read directly (rather than call)
# --------------------------------------------------------------------------------------------------
def _plain(m: nn.Module) -> bool:
    """``m`` runs its class's forward: nothing replaced it (diffusers or accelerate hooks) and no torch hooks."""
    return "forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks


def _plain_linear(m) -> bool:
    """A plain ``nn.Linear`` (not a LoRA layer or a quantized one, no hooks): its weight is the whole story."""
    return type(m) is nn.Linear and _plain(m)


def _gelu_tanh(m) -> bool:
    return type(m) is nn.GELU and m.approximate == "tanh" and _plain(m)


def _layer_norm_types() -> tuple[type, ...]:
    from diffusers.models.normalization import FP32LayerNorm

    return nn.LayerNorm, FP32LayerNorm  # FP32LayerNorm: statistics in float32, as the ops compute them


def _plain_ln(m) -> bool:
    """A LayerNorm over the last dim without affine, run as its class's forward."""
    return (type(m) in _dx.layer_norms and m.weight is None and m.bias is None and len(m.normalized_shape) == 1
            and _plain(m))


def _ln_reason(m, name: str) -> str | None:
    """Why child ``name`` is not a LayerNorm the modulated ops can stand in for (None: it is)."""
    if type(m) not in _layer_norm_types():
        return f"its `{name}` is a {type(m).__name__}, not a LayerNorm (the fused ops normalize with LayerNorm)"
    if m.weight is not None or m.bias is not None:
        return f"its `{name}` LayerNorm has an affine; the modulated ops take none before the modulation"
    if len(m.normalized_shape) != 1:
        return f"its `{name}` LayerNorm normalizes over {len(m.normalized_shape)} dims; the ops take the last one"
    return None


def _rms_reason(m, name: str, head_dim: int) -> str | None:
    from diffusers.models.normalization import RMSNorm

    if type(m) is nn.RMSNorm:
        if m.eps is None:
            return f"its `{name}` has eps=None (torch picks it per dtype); the op takes a number"
        if tuple(m.normalized_shape) != (head_dim,):
            return f"its `{name}` normalizes over {tuple(m.normalized_shape)}, not the head dim ({head_dim},)"
        return None
    if type(m) is RMSNorm:
        if m.bias is not None:
            return f"its `{name}` RMSNorm has a bias; the op has none"
        return None if tuple(m.dim) == (head_dim,) else f"its `{name}` normalizes over {tuple(m.dim)}"
    return f"its `{name}` is a {type(m).__name__}, not an RMSNorm"


# The diffusers objects the replacements use, loaded once by patch() (diffusers is imported only when patching).
_dx = types.SimpleNamespace(layer_norms=(), flux_processor=None, qkv=None, attention=None)


def _load_diffusers() -> None:
    if _dx.layer_norms:
        return
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

    _dx.flux_processor, _dx.qkv, _dx.attention = FluxAttnProcessor, _get_qkv_projections, dispatch_attention_fn
    _dx.layer_norms = _layer_norm_types()


# --------------------------------------------------------------------------------------------------
# The fused pieces, each with the unfused expression for dtypes that diffusers would promote
# --------------------------------------------------------------------------------------------------
def _per_sample(t, x) -> bool:
    """``t`` is a (B, D) per-sample parameter of x (B, N, D) in x's dtype: what the fused ops take. Otherwise (a
    batch of 1 that diffusers broadcasts, a dtype it promotes) the callers keep diffusers' expression."""
    return t.dtype == x.dtype and t.shape == (x.shape[0], x.shape[-1])


def _modulate(norm, x, *pairs):
    """``[norm(x) * (1 + scale[:, None]) + shift[:, None] for shift, scale in pairs]`` (shift, scale: (B, D))."""
    if all(_per_sample(s, x) for pair in pairs for s in pair):
        return [ops.modulated_layer_norm(x, shift, scale, norm.eps) for shift, scale in pairs]
    h = norm(x)
    return [h * (1 + scale[:, None]) + shift[:, None] for shift, scale in pairs]


def _gated_norm(norm, x, y, gate, shift, scale):
    """``x_out = x + gate[:, None] * y`` (gate None: ``x + y``) and ``norm(x_out) * (1 + scale[:, None]) +
    shift[:, None]``: diffusers' gated residual and the next LayerNorm's modulation, in one pass."""
    if y.dtype == x.dtype and y.shape == x.shape and all(t is None or _per_sample(t, x) for t in (gate, shift, scale)):
        return ops.gated_residual_norm(x, y, gate, shift, scale, norm.eps)
    x = x + (y if gate is None else gate[:, None] * y)
    return x, norm(x) * (1 + scale[:, None]) + shift[:, None]


def _linear_gelu(linear, x):
    """``gelu_tanh(linear(x))`` in one GEMM with its epilogue, or None when ``linear`` is not a plain Linear of x's
    dtype (a LoRA layer, a casting hook): the caller then runs its own code."""
    if _plain_linear(linear) and linear.weight.dtype == x.dtype:
        return ops.linear_act(x, linear.weight, linear.bias, "gelu_tanh")
    return None


# --------------------------------------------------------------------------------------------------
# Replacements: each has the signature of the forward it replaces, and returns _FALLBACK before any work
# when its conditions do not hold for this call
# --------------------------------------------------------------------------------------------------
def _rms_norm(m, hidden_states):
    w = m.weight
    if not _on(hidden_states) or (w is not None and w.dtype != hidden_states.dtype):
        return _FALLBACK  # a float32 weight on half inputs: diffusers returns float32
    return ops.rms_norm(hidden_states, w, m.eps)


def _gelu(m, hidden_states):
    if not _on(hidden_states) or m.approximate != "tanh":
        return _FALLBACK
    out = _linear_gelu(m.proj, hidden_states)
    return _FALLBACK if out is None else out


def _text_projection(m, caption):
    if not _on(caption) or not _gelu_tanh(m.act_1):
        return _FALLBACK
    h = _linear_gelu(m.linear_1, caption)
    return _FALLBACK if h is None else m.linear_2(h)


def _ada_norm_zero(m, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    if not _on(x) or x.dim() != 3 or not _plain_ln(m.norm):
        return _FALLBACK
    if m.emb is not None:
        emb = m.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = m.linear(m.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    (x,) = _modulate(m.norm, x, (shift_msa, scale_msa))
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _ada_norm_zero_single(m, x, emb=None):
    if not _on(x) or x.dim() != 3 or not _plain_ln(m.norm):
        return _FALLBACK
    shift_msa, scale_msa, gate_msa = m.linear(m.silu(emb)).chunk(3, dim=1)
    (x,) = _modulate(m.norm, x, (shift_msa, scale_msa))
    return x, gate_msa


def _ada_norm_zero_x(m, hidden_states, emb=None):
    if not _on(hidden_states) or hidden_states.dim() != 3 or not _plain_ln(m.norm):
        return _FALLBACK
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2,
     gate_msa2) = m.linear(m.silu(emb)).chunk(9, dim=1)
    h, h2 = _modulate(m.norm, hidden_states, (shift_msa, scale_msa), (shift_msa2, scale_msa2))
    return h, gate_msa, shift_mlp, scale_mlp, gate_mlp, h2, gate_msa2


def _ada_norm_continuous(m, x, conditioning_embedding):
    if not _on(x) or x.dim() != 3 or not _plain_ln(m.norm):
        return _FALLBACK
    emb = m.linear(m.silu(conditioning_embedding).to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    (x,) = _modulate(m.norm, x, (shift, scale))
    return x


def _basic_block(m, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                 timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
    """BasicTransformerBlock with ``ada_norm_zero`` (DiT) or ``ada_norm_single`` (PixArt)."""
    kw = cross_attention_kwargs or {}
    zero = m.norm_type == "ada_norm_zero"
    norms = (m.norm3,) if zero else (m.norm1, m.norm2)
    if (not _on(hidden_states) or hidden_states.dim() != 3 or m._chunk_size is not None or "gligen" in kw
            or kw.get("scale") is not None or not all(_plain_ln(n) for n in norms)):
        return _FALLBACK  # GLIGEN, a deprecated `scale` (diffusers warns), chunked feed-forward: its own forward
    kw = dict(kw)
    self_kv = encoder_hidden_states if m.only_cross_attention else None
    if zero:
        norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = m.norm1(hidden_states, timestep, class_labels,
                                                                  hidden_dtype=hidden_states.dtype)
        attn = m.attn1(norm_h, encoder_hidden_states=self_kv, attention_mask=attention_mask, **kw)
        hidden_states, norm_h = _gated_norm(m.norm3, hidden_states, attn, gate_msa, shift_mlp, scale_mlp)
        return gate_mlp.unsqueeze(1) * m.ff(norm_h) + hidden_states
    B = hidden_states.shape[0]
    mods = (m.scale_shift_table[None] + timestep.reshape(B, 6, -1)).chunk(6, dim=1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (t[:, 0] for t in mods)  # (B, D) each
    (norm_h,) = _modulate(m.norm1, hidden_states, (shift_msa, scale_msa))
    attn = m.attn1(norm_h, encoder_hidden_states=self_kv, attention_mask=attention_mask, **kw)
    if m.attn2 is None:
        hidden_states, norm_h = _gated_norm(m.norm2, hidden_states, attn, gate_msa, shift_mlp, scale_mlp)
    else:  # PixArt: no norm before the cross-attention; its residual is ungated
        hidden_states = gate_msa[:, None] * attn + hidden_states
        attn = m.attn2(hidden_states, encoder_hidden_states=encoder_hidden_states,
                       attention_mask=encoder_attention_mask, **kw)
        hidden_states, norm_h = _gated_norm(m.norm2, hidden_states, attn, None, shift_mlp, scale_mlp)
    return gate_mlp[:, None] * m.ff(norm_h) + hidden_states


def _joint_block(m, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
    """SD3's JointTransformerBlock (SD3.5's dual attention included)."""
    norms = (m.norm2,) if m.context_pre_only else (m.norm2, m.norm2_context)
    if not _on(hidden_states) or m._chunk_size is not None or not all(_plain_ln(n) for n in norms):
        return _FALLBACK
    kw = joint_attention_kwargs or {}
    if m.use_dual_attention:
        norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_h2, gate_msa2 = m.norm1(hidden_states, emb=temb)
    else:
        norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = m.norm1(hidden_states, emb=temb)
    if m.context_pre_only:
        norm_e = m.norm1_context(encoder_hidden_states, temb)
    else:
        norm_e, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = m.norm1_context(encoder_hidden_states, emb=temb)
    attn, context_attn = m.attn(hidden_states=norm_h, encoder_hidden_states=norm_e, **kw)
    if m.use_dual_attention:  # the second attention's gated residual is the one the next norm follows
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn
        attn, gate_msa = m.attn2(hidden_states=norm_h2, **kw), gate_msa2
    hidden_states, norm_h = _gated_norm(m.norm2, hidden_states, attn, gate_msa, shift_mlp, scale_mlp)
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * m.ff(norm_h)
    if m.context_pre_only:
        return None, hidden_states
    encoder_hidden_states, norm_e = _gated_norm(m.norm2_context, encoder_hidden_states, context_attn, c_gate_msa,
                                                c_shift_mlp, c_scale_mlp)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * m.ff_context(norm_e)
    return encoder_hidden_states, hidden_states


def _flux_block(m, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
    """FLUX's double-stream FluxTransformerBlock."""
    if not _on(hidden_states) or not (_plain_ln(m.norm2) and _plain_ln(m.norm2_context)):
        return _FALLBACK
    norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = m.norm1(hidden_states, emb=temb)
    norm_e, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = m.norm1_context(encoder_hidden_states, emb=temb)
    outs = m.attn(hidden_states=norm_h, encoder_hidden_states=norm_e, image_rotary_emb=image_rotary_emb,
                  **(joint_attention_kwargs or {}))
    hidden_states, norm_h = _gated_norm(m.norm2, hidden_states, outs[0], gate_msa, shift_mlp, scale_mlp)
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * m.ff(norm_h)
    if len(outs) == 3:  # an IP-Adapter processor's image-prompt output
        hidden_states = hidden_states + outs[2]
    encoder_hidden_states, norm_e = _gated_norm(m.norm2_context, encoder_hidden_states, outs[1], c_gate_msa,
                                                c_shift_mlp, c_scale_mlp)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * m.ff_context(norm_e)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _flux_single_block(m, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                       joint_attention_kwargs=None):
    """FLUX's single-stream block: its MLP's Linear and GELU(tanh) in one GEMM."""
    if not _on(hidden_states) or not _gelu_tanh(m.act_mlp):
        return _FALLBACK
    text_len = encoder_hidden_states.shape[1]
    residual = hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    norm_h, gate = m.norm(hidden_states, emb=temb)
    mlp = _linear_gelu(m.proj_mlp, norm_h)
    if mlp is None:
        mlp = m.act_mlp(m.proj_mlp(norm_h))
    attn = m.attn(hidden_states=norm_h, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    hidden_states = residual + gate.unsqueeze(1) * m.proj_out(torch.cat([attn, mlp], dim=2))
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_len], hidden_states[:, text_len:]


def _flux_norms(m):
    return (m.norm_q, m.norm_k) + ((m.norm_added_q, m.norm_added_k) if m.added_kv_proj_dim is not None else ())


def _flux_attention(m, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                    **kwargs):
    """FluxAttention with diffusers' FluxAttnProcessor: its per-head RMSNorm of q and k and the RoPE in one pass per
    stream, written in the layout SDPA takes."""
    proc = m.processor
    if (kwargs or not _on(hidden_states) or type(proc) is not _dx.flux_processor or proc._parallel_config is not None
            or not all(_plain(n) and (n.weight is None or n.weight.dtype == hidden_states.dtype)
                       for n in _flux_norms(m))):
        return _FALLBACK
    added = m.added_kv_proj_dim is not None
    text = encoder_hidden_states.shape[1] if added and encoder_hidden_states is not None else 0
    if image_rotary_emb is not None:
        cos, sin = image_rotary_emb
        if cos.shape != (text + hidden_states.shape[1], m.head_dim) or sin.shape != cos.shape:
            return _FALLBACK  # not FluxPosEmbed's (N, head_dim) tables: diffusers' own RoPE broadcasts them
    else:
        cos = sin = None
    q, k, v, eq, ek, ev = _dx.qkv(m, hidden_states, encoder_hidden_states)
    q, k, v = (t.unflatten(-1, (-1, m.head_dim)) for t in (q, k, v))
    eps = m.norm_q.eps
    rows = (lambda a, b: (cos[a:b], sin[a:b])) if cos is not None else (lambda a, b: (None, None))
    q, k = ops.qk_norm_rope(q, k, m.norm_q.weight, m.norm_k.weight, *rows(text, None), eps)  # (B, H, N, Dh)
    if added:
        eq, ek, ev = (t.unflatten(-1, (-1, m.head_dim)) for t in (eq, ek, ev))
        eq, ek = ops.qk_norm_rope(eq, ek, m.norm_added_q.weight, m.norm_added_k.weight, *rows(0, text), eps)
        q, k, v = torch.cat([eq, q], dim=2), torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=1)
    out = _dx.attention(q.transpose(1, 2), k.transpose(1, 2), v, attn_mask=attention_mask,
                        backend=proc._attention_backend, parallel_config=None)
    out = out.flatten(2, 3).to(q.dtype)
    if encoder_hidden_states is None:
        return out
    enc, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]],
                                    dim=1)
    out = m.to_out[1](m.to_out[0](out.contiguous()))
    return out, m.to_add_out(enc.contiguous())


# --------------------------------------------------------------------------------------------------
# Conditions checked once, when patching: why a rule does not apply to a module (None: it does)
# --------------------------------------------------------------------------------------------------
def _check_rms_norm(m):
    if m.bias is not None:
        return "RMSNorm with a bias: the op has no bias term"
    if len(m.dim) != 1:
        return f"RMSNorm with a {len(m.dim)}-dim weight: the op scales by a (D,) weight"
    return None


def _check_gelu(m):
    if m.approximate != "tanh":
        return (f"GELU approximate={m.approximate!r}: the op's CUDA path fuses the tanh approximation only "
                "(cuBLASLt's GELU epilogue); an erf GELU would run unfused, as it does now")
    return None


def _check_text_projection(m):
    if not _gelu_tanh(m.act_1):
        return (f"activation {type(m.act_1).__name__}: the op's CUDA path runs it unfused after the GEMM, as "
                "diffusers does; only GELU(tanh) is fused (cuBLASLt's epilogue)")
    return None


def _check_norm(m):
    return _ln_reason(m.norm, "norm")


def _check_basic_block(m):
    if m.norm_type not in ("ada_norm_zero", "ada_norm_single"):
        return f"norm_type={m.norm_type!r}: no modulated norm to fuse (rules cover ada_norm_zero, ada_norm_single)"
    if m.norm_type == "ada_norm_zero" and m.attn2 is not None:
        return "ada_norm_zero with a cross-attention: no rule (DiT blocks have none)"
    if m.pos_embed is not None:
        return "a positional embedding inside the block: no rule"
    if hasattr(m, "fuser"):
        return "a GLIGEN fuser: no rule"
    names = ("norm3",) if m.norm_type == "ada_norm_zero" else ("norm1", "norm2")
    return next((r for r in (_ln_reason(getattr(m, n), n) for n in names) if r), None)


def _check_joint_block(m):
    names = ("norm2",) if m.context_pre_only else ("norm2", "norm2_context")
    return next((r for r in (_ln_reason(getattr(m, n), n) for n in names) if r), None)


def _check_flux_block(m):
    return _ln_reason(m.norm2, "norm2") or _ln_reason(m.norm2_context, "norm2_context")


def _check_flux_single_block(m):
    if not _gelu_tanh(m.act_mlp):
        return f"its `act_mlp` is {m.act_mlp!r}, not GELU(approximate='tanh')"
    return None


def _check_flux_attention(m):
    names = ("norm_q", "norm_k") + (("norm_added_q", "norm_added_k") if m.added_kv_proj_dim is not None else ())
    for name in names:
        why = _rms_reason(getattr(m, name), name, m.head_dim)
        if why:
            return why
    if len({getattr(m, n).eps for n in names}) != 1:
        return "its QK norms have different eps; the op takes one"
    return None


# --------------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One patch rule.

    classes: ``"module:ClassName"`` of the diffusers classes it applies to (matched by name over the module's class
    hierarchy; a subclass that overrides ``forward`` does not match). ops: the eekernels ops it calls. fuses: what
    runs in one pass. check: why it does not apply to a module (None: it does), decided once when patching.
    forward: the replacement, with the replaced forward's signature (module first); it returns ``_FALLBACK``
    before any work where the module's own forward must run. consumes: the names of the children it reads instead
    of calling (they are not patched on their own; the report lists them as fused into this module).
    """

    name: str
    classes: tuple[str, ...]
    ops: tuple[str, ...]
    fuses: str
    check: Callable[[nn.Module], str | None]
    forward: Callable
    consumes: Callable[[nn.Module], tuple[str, ...]] = lambda m: ()


def _names(*names: str) -> Callable[[nn.Module], tuple[str, ...]]:
    return lambda m: names


def _basic_block_reads(m) -> tuple[str, ...]:
    return ("norm3",) if m.norm_type == "ada_norm_zero" else ("norm1", "norm2")  # norm1: AdaLayerNormZero's own rule


_NORM = "diffusers.models.normalization"
_FLUX = "diffusers.models.transformers.transformer_flux"
RULES: tuple[Rule, ...] = (
    Rule("rms_norm", (f"{_NORM}:RMSNorm",), ("rms_norm",),
         "RMSNorm (five torch ops in diffusers) in one pass", _check_rms_norm, _rms_norm),
    Rule("linear_gelu_tanh", ("diffusers.models.activations:GELU",), ("linear_act",),
         "the feed-forward's Linear and GELU(tanh): one GEMM with the activation in its epilogue",
         _check_gelu, _gelu),
    Rule("text_projection_gelu_tanh", ("diffusers.models.embeddings:PixArtAlphaTextProjection",), ("linear_act",),
         "linear_1 and GELU(tanh) of the caption projection in one GEMM", _check_text_projection, _text_projection,
         consumes=_names("act_1")),
    Rule("ada_layer_norm_zero", (f"{_NORM}:AdaLayerNormZero",), ("modulated_layer_norm",),
         "LayerNorm (no affine) and the shift/scale modulation in one pass", _check_norm, _ada_norm_zero,
         consumes=_names("norm")),
    Rule("ada_layer_norm_zero_single", (f"{_NORM}:AdaLayerNormZeroSingle",), ("modulated_layer_norm",),
         "LayerNorm (no affine) and the shift/scale modulation in one pass", _check_norm, _ada_norm_zero_single,
         consumes=_names("norm")),
    Rule("sd35_ada_layer_norm_zero_x", (f"{_NORM}:SD35AdaLayerNormZeroX",), ("modulated_layer_norm",),
         "each of its two modulations of one LayerNorm in one pass", _check_norm, _ada_norm_zero_x,
         consumes=_names("norm")),
    Rule("ada_layer_norm_continuous", (f"{_NORM}:AdaLayerNormContinuous",), ("modulated_layer_norm",),
         "LayerNorm (no affine) and the scale/shift modulation in one pass", _check_norm, _ada_norm_continuous,
         consumes=_names("norm")),
    Rule("basic_block_gated_residual", ("diffusers.models.attention:BasicTransformerBlock",),
         ("gated_residual_norm", "modulated_layer_norm"),
         "the gated residual after attention with the next LayerNorm and its modulation in one pass (and PixArt's "
         "first modulated LayerNorm)", _check_basic_block, _basic_block, consumes=_basic_block_reads),
    Rule("joint_block_gated_residual", ("diffusers.models.attention:JointTransformerBlock",),
         ("gated_residual_norm",), "each stream's gated attention residual with the next LayerNorm and its "
         "modulation in one pass", _check_joint_block, _joint_block, consumes=_names("norm2", "norm2_context")),
    Rule("flux_block_gated_residual", (f"{_FLUX}:FluxTransformerBlock",), ("gated_residual_norm",),
         "each stream's gated attention residual with the next LayerNorm and its modulation in one pass",
         _check_flux_block, _flux_block, consumes=_names("norm2", "norm2_context")),
    Rule("flux_single_block_linear_gelu_tanh", (f"{_FLUX}:FluxSingleTransformerBlock",), ("linear_act",),
         "the MLP's Linear and GELU(tanh) in one GEMM", _check_flux_single_block, _flux_single_block,
         consumes=_names("act_mlp")),
    Rule("flux_attention_qk_norm_rope", (f"{_FLUX}:FluxAttention",), ("qk_norm_rope",),
         "the per-head RMSNorm of q and k and the RoPE in one pass per stream, in SDPA's layout (FluxAttnProcessor)",
         _check_flux_attention, _flux_attention,
         consumes=_names("norm_q", "norm_k", "norm_added_q", "norm_added_k")),
)

# Classes that look like candidates and have no rule, with the reason (for the report).
NO_RULE: dict[str, str] = {
    "torch.nn.modules.normalization:LayerNorm": (
        "a LayerNorm alone: torch runs it as one kernel already; eekernels fuses LayerNorm with the modulation or "
        "gated residual around it, where a rule sees both"),
    "torch.nn.modules.normalization:RMSNorm": (
        "torch.nn.RMSNorm alone: torch runs it as one kernel already (F.rms_norm); eekernels fuses it with RoPE "
        "inside FluxAttention"),
    "torch.nn.modules.activation:GELU": (
        "an activation alone: eekernels fuses GELU(tanh) into the Linear before it, where a rule sees both"),
    "torch.nn.modules.normalization:GroupNorm": (
        "no in-place rule yet: group_norm_act needs the activation after the GroupNorm, in the U-Net block's forward"),
    "diffusers.models.attention_processor:Attention": (
        "no rule: eekernels fuses QK-norm with RoPE (FluxAttention); this attention has no RoPE (diffusers RMSNorm "
        "QK norms, as in SD3.5, take the rms_norm rule)"),
    "diffusers.models.activations:GEGLU": "a gated activation: no eekernels op",
    "diffusers.models.activations:SwiGLU": "a gated activation: no eekernels op",
    "diffusers.models.activations:ApproximateGELU": "GELU's sigmoid approximation: no eekernels op",
    "diffusers.models.activations:LinearActivation": (
        "a Linear with SiLU (or another activation): the op's CUDA path runs it unfused after cuBLAS, as diffusers "
        "does"),
}


def _matched(module: nn.Module, spec: str) -> type | None:
    """The class of ``module``'s hierarchy that ``spec`` (``"module:ClassName"``) names, or None."""
    where, _, name = spec.partition(":")
    return next((c for c in type(module).__mro__ if c.__name__ == name and c.__module__ == where), None)


def _rule_for(module: nn.Module) -> tuple[Rule, type] | None:
    for rule in RULES:
        for spec in rule.classes:
            cls = _matched(module, spec)
            if cls is not None:
                return rule, cls
    return None


def _why_not(module: nn.Module, rule: Rule, cls: type) -> str | None:
    """Why ``rule`` (matched through ``cls``) does not patch ``module`` (None: it does)."""
    if type(module).forward is not cls.forward:
        return f"{type(module).__name__} overrides {cls.__name__}.forward: the rule replaces the latter"
    if "forward" in module.__dict__:
        return ("its forward is already wrapped (hooks registered before eekernels'); a replacement attached now "
                "would skip them")
    return rule.check(module)


def _kernel_exists(op: str) -> bool:
    """Whether a kernel for ``op`` can run on CUDA here (the torch reference does not count)."""
    import importlib

    from eekernels import _ext
    from eekernels.ops._triton import HAS_TRITON

    have = {"triton": HAS_TRITON, "cuda": _ext.available(), "cublas": True}
    return any(have.get(impl.name, False) for impl in importlib.import_module(f"eekernels.ops.{op}").DISPATCH.auto)


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
@dataclass
class PatchReport:
    """What :func:`patch` replaced (``patched``: (module path, rule name)) and what it did not and why
    (``skipped``: (module path, class name, reason)). ``print(report)`` gives a summary."""

    model: str
    patched: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    kernels: dict[str, bool] = field(default_factory=dict)  # op -> a CUDA kernel for it exists here

    def counts(self) -> dict[str, int]:
        """Modules replaced, by rule."""
        return dict(Counter(rule for _, rule in self.patched))

    def reasons(self) -> dict[tuple[str, str], int]:
        """Modules not replaced, by (class name, reason)."""
        return dict(Counter((cls, why) for _, cls, why in self.skipped))

    def summary(self) -> str:
        lines = [f"eekernels patches on {self.model}: {len(self.patched)} modules replaced"]
        by_rule = {r.name: r for r in RULES}
        for name, n in self.counts().items():
            lines.append(f"  {name} x{n} -> eekernels.ops.{' + '.join(by_rule[name].ops)}")
        if self.skipped:
            lines.append(f"not replaced: {len(self.skipped)}")
            for (cls, why), n in self.reasons().items():
                example = next(p for p, c, w in self.skipped if c == cls and w == why)
                lines.append(f"  {cls} x{n} (e.g. {example or '<model>'}): {why}")
        missing = sorted(op for op, ok in self.kernels.items() if not ok)
        where = "on CUDA tensors (float32/16, bfloat16)"
        if missing:
            where += f"; no CUDA kernel here for {', '.join(missing)}, whose modules keep their own forward"
        lines.append(f"The replacements run {where}; elsewhere each module's own forward runs "
                     "(eekernels.patches.forced() runs them anywhere).")
        return "\n".join(lines)

    __str__ = summary


@functools.lru_cache(maxsize=None)
def _hook_class():
    from diffusers.hooks import ModelHook

    class KernelHook(ModelHook):
        """Runs ``rule.forward`` (the fused path) where it applies, else the module's own forward."""

        def __init__(self, rule: Rule, ready: bool, made_registry: bool):
            super().__init__()
            self.rule, self.ready, self.made_registry = rule, ready, made_registry

        def new_forward(self, module, *args, **kwargs):
            if self.ready or _forced:
                out = self.rule.forward(module, *args, **kwargs)
                if out is not _FALLBACK:
                    return out
            return self.fn_ref.original_forward(*args, **kwargs)

    return KernelHook


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def patch(model: nn.Module, report: bool = True) -> PatchReport:
    """Replace the forward of every module of ``model`` that a rule of :data:`RULES` matches (in place; parameters,
    ``state_dict`` and module tree unchanged). Returns the :class:`PatchReport` (also kept on the model: see
    :func:`report`); ``report=False`` leaves out the reasons for the modules not replaced.

    A module whose forward is already wrapped (by hooks registered before this call) is left alone: a
    replacement attached now would run outside those hooks and skip them.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"patch: `model` expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(report, bool):
        raise ValueError(f"patch: `report` expected a bool, got {report!r}")
    if getattr(model, _ATTR, None) is not None:
        raise ValueError(f"patch: this {type(model).__name__} is already patched; call "
                         "eekernels.patches.unpatch(model) first")
    from diffusers.hooks import HookRegistry

    _load_diffusers()
    KernelHook = _hook_class()
    out = PatchReport(type(model).__name__)
    ready: dict[str, bool] = {}
    consumed: dict[int, str] = {}  # id(child) -> the rule of the parent that reads it
    todo = []
    for path, module in model.named_modules():
        if id(module) in consumed:  # read directly by its parent's replacement: not patched on its own
            why = f"fused into its parent's replacement ({consumed[id(module)]})"
        elif (found := _rule_for(module)) is None:
            spec = next((s for s in NO_RULE if _matched(module, s)), None)
            why = NO_RULE[spec] if spec is not None else None
        else:
            rule, cls = found
            why = _why_not(module, rule, cls)
            if why is None:
                todo.append((module, rule))
                out.patched.append((path, rule.name))
                for name in rule.consumes(module):
                    child = getattr(module, name, None)
                    if isinstance(child, nn.Module):
                        consumed[id(child)] = rule.name
        if why is not None and report:
            out.skipped.append((path, type(module).__name__, why))
    for module, rule in todo:
        for op in rule.ops:
            if op not in ready:
                ready[op] = _kernel_exists(op)
        made = not hasattr(module, "_diffusers_hook")
        hook = KernelHook(rule, all(ready[op] for op in rule.ops), made)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK)
    out.kernels = ready
    object.__setattr__(model, _ATTR, out)
    return out


def report(model: nn.Module) -> PatchReport | None:
    """The :class:`PatchReport` of a patched model, or None."""
    return getattr(model, _ATTR, None)


def _patched_modules(model: nn.Module):
    for m in model.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None and HOOK in registry.hooks:
            yield m, registry


def unpatch(model: nn.Module) -> None:
    """Remove every replacement :func:`patch` attached to ``model``: each module runs its class's forward again."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"unpatch: `model` expected a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _ATTR, None) is None:
        raise ValueError(f"unpatch: expected a model patched by eekernels.patches.patch, got an unpatched "
                         f"{type(model).__name__}")
    modules = list(_patched_modules(model))
    # diffusers' remove_hook re-links a hook registered after ours by its `forward`, which drops that hook's own
    # new_forward: refuse rather than break it (eekernels.disable removes its exit hooks first).
    for m, registry in modules:
        after = registry._hook_order[registry._hook_order.index(HOOK) + 1:]
        wrapping = [n for n in after if hasattr(registry.hooks[n], "new_forward")]
        if wrapping:
            raise ValueError(f"unpatch: {type(m).__name__} has hooks registered after eekernels' that replace its "
                             f"forward ({', '.join(wrapping)}); remove them first (eekernels.disable(model) removes "
                             "the exit hooks and the patches together)")
    for m, registry in modules:
        made = registry.hooks[HOOK].made_registry
        registry.remove_hook(HOOK, recurse=False)
        if made and not registry.hooks:  # as before patch(): no registry, the class's forward
            del m._diffusers_hook
            m.__dict__.pop("forward", None)
    top = getattr(model, "_diffusers_hook", None)
    if top is not None and hasattr(top, "invalidate_child_registries_cache"):  # its cached list of child registries
        top.invalidate_child_registries_cache()
    del model.__dict__[_ATTR]
