"""U-ViT in place under ``exit_policy="cache"`` and ``"forecast"``: the native U-ViT's semantics.

A skipped U-ViT out block keeps its ``skip_linear`` (``PrefixExit.skip``). The native model
(``eekernels.models.uvit.UViT.forward_sorted``) records, at a full call, ``x_L - skip_only(x_d)`` per exit depth d
(``skip_only``: only the skipped out blocks' skip_linears, from block d's input) and a truncated call adds it after
its last skip_linear. The in-place hooks must give the same result (they used to return the stand-in's output and
never add the cached value: "cache" and "forecast" ran as "drop").

baofff's U-ViT module (``RefUViT``) with every parameter randomized, odd sizes (3x3 patches, width 18, 3 heads,
9 blocks: 4 in, mid, 4 out; in place the fewest blocks are 6, ``Controller.min_depth``); its native model shares
its weights (``native_build``).
"""
import copy

import pytest
import torch

import eekernels
from eekernels import ExitSchedule, families, inplace
from eekernels.graphs import GraphCache
from tests.models._reference_models import RefUViT, randomize_, rel_err
from tests.test_inplace import _EagerGraph

L = 9  # blocks: 4 in_blocks, mid_block, 4 out_blocks
STEPS = 9
SCHEDULES = {
    **{f"periodic(2, {d})": ExitSchedule.periodic(2, d, L) for d in (6, 7, 8)},
    # t-indexed, bins of 100 (DDIM's 9 steps at t = 888, 777, ..., 0): full at 888, 666, 444, 0; every exit depth
    "t-indexed": ExitSchedule.piecewise([9, 6, 8, 7, 9, 6, 9, 8, 9, 9], total_depth=L),
}
POLICIES = [("cache", None), ("forecast", 1), ("forecast", 2)]


def _uvit():
    return randomize_(RefUViT(img_size=6, patch_size=2, in_chans=3, embed_dim=18, depth=8, num_heads=3,
                              num_classes=7), seed=11).eval()


def _inputs():
    g = torch.Generator().manual_seed(4)
    return torch.randn(3, 3, 6, 6, generator=g), torch.tensor([0, 5, 2])  # label 6: the native model's null label


def _in_place(schedule, policy, order=None, graphs=False):
    """The U-ViT accelerated in place and sampled by ``eekernels.sample`` (each call's depth from its timestep)."""
    model = _uvit()
    eekernels.accelerate(model, schedule=schedule, exit_policy=policy,
                         **({} if order is None else dict(forecast_order=order)))
    if graphs:  # the CUDA graph runner's own code path, through an eager stand-in for the capture
        cache = inplace.controller(model).graphs.cache = GraphCache(capture=lambda fn, pool, stream: (_EagerGraph(fn),
                                                                                                      1000))
    noise, y = _inputs()
    out = eekernels.sample(model, noise, y, sampler="ddim", steps=STEPS)
    return (out, cache) if graphs else out


def _native(schedule, policy, order=None):
    model = families.get("uvit").native_build(_uvit()).eval()
    noise, y = _inputs()
    return eekernels.sample(model, noise, y, sampler="ddim", steps=STEPS, schedule=schedule, exit_policy=policy,
                            forecast_order=order)


@pytest.mark.parametrize("policy,order", POLICIES)
@pytest.mark.parametrize("name", SCHEDULES)
def test_sampling_in_place_equals_the_native_uvit(name, policy, order):
    schedule = SCHEDULES[name]
    want = _native(schedule, policy, order)
    got = _in_place(schedule, policy, order)
    err = rel_err(got, want)
    assert err <= 1e-5, f"{name}, {policy} (order {order}): in place differs from the native U-ViT by {err:.2e}"
    drop = _in_place(schedule, "drop")
    assert rel_err(got, drop) > 1e-3, f"{name}, {policy}: no different from 'drop' ({rel_err(got, drop):.2e})"
    assert rel_err(_native(schedule, "drop"), drop) <= 1e-5  # the two tiers agree on what "drop" is, too


@pytest.mark.parametrize("policy,order", [("cache", None), ("forecast", 2)])
def test_graph_runner_in_place_equals_the_native_uvit(policy, order):
    """The side streams and the replay run inside the graph runner's captured forward (warm-ups restore the caches)."""
    schedule = SCHEDULES["periodic(2, 7)"]
    got, cache = _in_place(schedule, policy, order, graphs=True)
    assert cache.stats()["graphs"] == 2  # one per depth: 9 and 7
    assert rel_err(got, _native(schedule, policy, order)) <= 1e-5


@pytest.mark.parametrize("policy", ["cache", "forecast"])
@torch.no_grad()
def test_replay_at_the_recorded_input_gives_the_full_output(policy):
    """Record at one input, replay at the same input at each exit depth d: the cached value is x_L minus x_d carried
    through the skipped blocks' skip_linears, so x_L comes back (float32 rounding), where the stand-ins alone don't."""
    model = _uvit()
    plain = copy.deepcopy(model)
    eekernels.accelerate(model, schedule=ExitSchedule.piecewise([6, 7, 8, 9], total_depth=L), exit_policy=policy)
    x, y = _inputs()
    t = torch.full((3,), 321.0)
    with inplace.at_depth(model, None):
        full = model(x, t, y)
    assert rel_err(full, plain(x, t, y)) <= 1e-6
    for d in (6, 7, 8):
        with inplace.at_depth(model, d):
            again = model(x, t, y)
        assert rel_err(again, full) <= 1e-6, f"depth {d}: {rel_err(again, full):.2e}"
        assert rel_err(plain(x, t, y, depth=d), full) > 1e-3  # the stand-ins alone (drop) are far from it
