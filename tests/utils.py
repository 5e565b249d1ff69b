"""Shared test helpers: the per-dtype tolerance table and comparison against float64 references."""
from __future__ import annotations

import os

import pytest
import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# One table: absolute and relative tolerance per dtype against the float64 reference. fp16/bf16 outputs
# are rounded to their 10/7-bit mantissas, so their rounding alone gives ~5e-4 / ~4e-3 relative error.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU; none is visible on this machine")
from eekernels.ops._triton import HAS_TRITON  # noqa: E402

triton_usable = HAS_TRITON and (CUDA or INTERPRET)


def _interpreter_rounds_bf16_to_nearest() -> None:
    """Make Triton's CPU interpreter round float32 -> bfloat16 to nearest even, as GPUs do (cvt.rn.bf16.f32).

    triton 3.9's interpreter truncates instead: that alone doubles a kernel's bf16 error (RMS ulp/sqrt(3)
    against ulp/sqrt(12)), so the flash-attention 2x rule would pass or fail by chance. We fix the
    simulator, not the kernels; float16 already goes through numpy's round-to-nearest cast.
    """
    if not INTERPRET or not HAS_TRITON:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.cast_impl
    if getattr(original, "_eekernels_rtne", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.asarray(src.data, dtype=np.float32)
            bits = torch.from_numpy(data.reshape(-1).copy()).to(torch.bfloat16).view(torch.int16).numpy()
            return interpreter.TensorHandle(bits.view(np.uint16).reshape(data.shape), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl._eekernels_rtne = True
    interpreter.InterpreterBuilder.cast_impl = cast_impl


_interpreter_rounds_bf16_to_nearest()


def backends_here() -> list[str]:
    """Backends that can run on this machine's default device for tests."""
    out = ["torch"]
    if triton_usable:
        out.append("triton")
    if CUDA:
        from eekernels import _ext

        if _ext.available():
            out.append("cuda")
    return out


def device() -> str:
    return "cuda" if CUDA else "cpu"


def randn(*shape, dtype=torch.float32, dev=None, scale=1.0, offset=0.0):
    """Fresh random inputs (never zeros), made in float64 and rounded once to ``dtype``."""
    t = torch.randn(*shape, dtype=torch.float64) * scale + offset
    return t.to(device=dev or device(), dtype=dtype)


def assert_close(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, *, baseline: torch.Tensor | None = None,
                 what: str = "output", ill_conditioned: bool = False) -> None:
    """``out`` within the dtype's tolerance of the float64 reference.

    With ``baseline`` (the torch implementation run in the same low precision), also apply
    flash-attention's rule: our relative error (2-norm) is at most twice the baseline's; ``ill_conditioned``: each
    element may also be off by twice the baseline's error there.
    On a mismatch, name the worst elements and by how much they differ.
    """
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    o = out.detach().double().cpu()
    r = ref64.detach().double().cpu()
    assert torch.isfinite(o).all(), f"{what}: {(~torch.isfinite(o)).sum().item()} non-finite elements"
    tol = TOLERANCES[dtype]
    err = (o - r).abs()
    bound = tol["atol"] + tol["rtol"] * r.abs()
    if ill_conditioned and baseline is not None:
        # Elements whose value the dtype cannot pin down (a LayerNorm over a row of nearly equal values: its
        # deviations cancel to a few ulps) may be off by twice what the torch implementation is off there.
        bound = bound + 2 * (baseline.detach().double().cpu() - r).abs()
    bad = err > bound
    if bad.any():
        idx = torch.nonzero(bad)[:5].tolist()
        detail = ", ".join(f"{tuple(i)}: got {o[tuple(i)].item():.6g} want {r[tuple(i)].item():.6g}" for i in idx)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements outside atol={tol['atol']} rtol={tol['rtol']} "
            f"({dtype}); max abs err {err.max().item():.3g}; first: {detail}"
        )
    if baseline is not None:
        # Norm-wise, so that a single element rounding the other way at a bf16 ulp boundary is no failure.
        norm = r.norm().clamp_min(1e-30)
        ours = (o - r).norm().item() / norm.item()
        base = (baseline.detach().double().cpu() - r).norm().item() / norm.item()
        assert ours <= 2 * base + 1e-6, (
            f"{what}: relative error {ours:.3g} exceeds 2x the torch {dtype} implementation's {base:.3g}"
        )


def tiny_text_model(name: str, seed: int = 0):
    """A tiny eekernels PixArt ("pixart"), SD3 ("sd3", SD3-medium style) or FLUX ("flux", guidance-distilled)
    with every parameter drawn from N(0, 0.05^2): their zero-initialized adaLN and output layers would
    otherwise make every depth give the same output. Token width 12, pooled width 5 (SD3, FLUX)."""
    from torch import nn

    from eekernels.models import Flux, PixArt, SD3

    torch.manual_seed(seed)
    if name == "sd3":
        m = SD3(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=12, pooled_projection_dim=5, out_channels=4, pos_embed_max_size=8, qk_norm=None)
    elif name == "pixart":
        m = PixArt(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                   caption_channels=12, model_max_length=6)
    elif name == "flux":
        m = Flux(latent_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=12, pooled_projection_dim=5, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    else:
        raise ValueError(f"name: expected 'pixart', 'sd3' or 'flux', got {name!r}")
    for p in m.parameters():
        nn.init.normal_(p, std=0.05)
    return m.eval()
