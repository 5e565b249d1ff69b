"""Per-sample depth: sorted contiguous prefixes, caller order restored, each sample equal to its solo run."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from eekernels.models import DiT, UViT
from eekernels.models import _layers as L
from eekernels.models.scaffold import plan_depth, restore_order
from tests.models._reference_models import RefDiT, randomize_, rel_err


def _dit():
    ref = randomize_(RefDiT(input_size=8, hidden_size=48, depth=4, num_heads=2), seed=3)
    return DiT.from_checkpoint(ref.state_dict(), num_heads=2).eval()


@pytest.fixture(scope="module")
def dit():
    return _dit()


def test_plan_counts_and_order():
    depth = torch.tensor([2, 4, 1, 4, 3])
    plan = plan_depth("m", depth, 5, 4)
    assert plan.depth == 4 and plan.per_sample
    assert plan.order.tolist() == [1, 3, 4, 0, 2]  # descending, stable
    assert plan.counts == [5, 4, 3, 2]  # block i works on the first counts[i] sorted samples
    same = plan_depth("m", torch.tensor([3, 3, 3]), 3, 4)
    assert same.order is None and same.counts == [3, 3, 3]  # equal depths: one int depth, caller order
    assert plan_depth("m", 2, 7, 4).counts == [7, 7] and plan_depth("m", None, 2, 3).counts == [2, 2, 2]
    rows = torch.arange(5.0)[:, None]
    assert restore_order(rows[plan.order], plan.order).flatten().tolist() == [0, 1, 2, 3, 4]


@torch.no_grad()
def test_blocks_run_on_prefixes_only(dit, monkeypatch):
    # No wasted FLOPs: block i's attention sees exactly the samples deeper than i.
    seen = []
    attention = L.attention
    monkeypatch.setattr(L, "attention", lambda h, *a: (seen.append(h.shape[0]), attention(h, *a))[1])
    depth = torch.tensor([1, 3, 4, 1, 2, 3])
    dit(torch.randn(6, 4, 8, 8), torch.rand(6) * 999, torch.randint(0, 10, (6,)), depth=depth)
    assert seen == [6, 4, 3, 1]


@torch.no_grad()
@settings(max_examples=8, deadline=None)
@given(depths=st.lists(st.integers(1, 4), min_size=2, max_size=6))
def test_dit_per_sample_equals_solo(dit, depths):
    model = dit
    B = len(depths)
    x, t, y = torch.randn(B, 4, 8, 8), torch.rand(B) * 999, torch.randint(0, 11, (B,))  # 10 = null class
    depth = torch.tensor(depths)
    before = [v.clone() for v in (x, t, y, depth)]
    out = model(x, t, y, depth=depth)
    for v, b in zip((x, t, y, depth), before):
        assert torch.equal(v, b), "an input was modified"
    for i, d in enumerate(depths):
        solo = model(x[i : i + 1], t[i : i + 1], y[i : i + 1], depth=d)
        assert rel_err(out[i : i + 1], solo) <= 1e-5, (i, d)


def test_per_sample_gradients_equal_solo_gradients(dit):
    # ASE fine-tuning: one backward over a mixed-depth batch = the sum of the solo backwards.
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3) * 999, torch.tensor([1, 2, 3])
    depth = torch.tensor([4, 1, 2])
    dit.zero_grad()
    dit(x, t, y, depth=depth).square().sum().backward()
    mixed = dit.blocks[1].mlp.fc1.weight.grad.clone()
    dit.zero_grad()
    for i in range(3):
        dit(x[i : i + 1], t[i : i + 1], y[i : i + 1], depth=int(depth[i])).square().sum().backward()
    assert rel_err(mixed, dit.blocks[1].mlp.fc1.weight.grad) <= 1e-5


@torch.no_grad()
def test_uvit_per_sample_on_prefixes():
    model = UViT(input_size=8, patch_size=2, in_channels=3, embed_dim=32, depth=6, num_heads=2, num_classes=None)
    seen = []
    hooks = [b.attn.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0])) for b in model.out_blocks]
    x, t = torch.randn(4, 3, 8, 8), torch.rand(4) * 999
    depth = torch.tensor([4, 7, 5, 6])  # 3 in_blocks + mid = 4 always; out blocks run for depth > 4, 5, 6
    out = model(x, t, depth=depth)
    for h in hooks:
        h.remove()
    assert seen == [3, 2, 1]
    for i in range(4):
        assert rel_err(out[i : i + 1], model(x[i : i + 1], t[i : i + 1], depth=int(depth[i]))) <= 1e-5
