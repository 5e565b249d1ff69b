"""torch.compile(fullgraph=True) traces through every eekernels op (their fake impls), forward and backward.

Backend "aot_eager": AOTAutograd traces the joint forward/backward graph with fake tensors, which is what
checks the fake impls, schemas and autograd registrations; inductor's C++ codegen would add ~30 s on two
CPU cores and test nothing of ours (the ops are opaque to it).
"""
import pytest
import torch

import eekernels
from eekernels.ops import gated_residual_norm, group_norm_act, layer_norm, linear_act, modulated_layer_norm
from tests.utils import backends_here, randn

B, N, D, F = 2, 9, 24, 40  # tokens reshape to (B, D, 3, 3) for the group norm


def _block(x, c, p):
    """A DiT-like block over all five ops, ending in a U-Net-like group norm."""
    shift, scale, gate = c.chunk(3, dim=1)
    h = modulated_layer_norm(x, shift, scale)
    h = linear_act(h, p["w1"], p["b1"], "gelu_tanh")
    h = linear_act(h, p["w2"], None, None)
    x, h = gated_residual_norm(x, h, gate, shift, scale)
    h = layer_norm(h, p["ln_w"], p["ln_b"])
    img = h.transpose(1, 2).reshape(B, D, 3, 3)
    return x, group_norm_act(img, 4, p["gn_w"], p["gn_b"], scale, shift, "silu")


def _params():
    return {
        "w1": randn(F, D, scale=D ** -0.5), "b1": randn(F), "w2": randn(D, F, scale=F ** -0.5),
        "ln_w": randn(D, offset=1.0), "ln_b": randn(D), "gn_w": randn(D, offset=1.0), "gn_b": randn(D),
    }


@pytest.mark.parametrize("backend", backends_here())
def test_fullgraph_compile_matches_eager(backend):
    torch._dynamo.reset()
    x, c, p = randn(B, N, D), randn(B, 3 * D, scale=0.5), _params()
    leaves = [x, c, *p.values()]
    for t in leaves:
        t.requires_grad_()
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
    with eekernels.backend(backend):
        got = compiled(x, c, p)
        want = _block(x, c, p)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    grads = [torch.randn_like(w) for w in want]
    got_grads = torch.autograd.grad(got, leaves, grads)
    want_grads = torch.autograd.grad(want, leaves, grads)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)

    # Inference (no grad): the compiled graph still goes through the registered ops.
    with torch.no_grad(), eekernels.backend(backend):
        got = compiled(x, c, p)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
