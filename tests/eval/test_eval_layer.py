"""eekernels.eval: the one plain-torch DiT baseline, the one home of seeded inputs and grids, and the callers
that share them (the naive baseline, the bench, the sample job, the fidelity grid)."""
import argparse

import numpy as np
import pytest
import torch

from eekernels.eval import baselines, fidelity, images
from eekernels.eval.naive import naive_exit_forward
from eekernels.models import DiT
from eekernels.schedules import ExitSchedule


def _tiny_dit(num_classes=10):
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=4, num_heads=3, num_classes=num_classes)
    return baselines.randomized(m)  # DiT zero-inits adaLN and the output layer


@torch.no_grad()
@pytest.mark.parametrize("depth", [None, 2])
def test_plain_torch_baseline_matches_the_dit(depth):
    m = _tiny_dit()
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([5.0, 400.0, 990.0]), torch.tensor([1, 2, 3])
    torch.testing.assert_close(baselines.dit_forward(m, x, t, y, depth), m(x, t, y, depth=depth))
    # y=None is the null class, as in the DiT; the score-network wrapper runs the same function
    torch.testing.assert_close(baselines.TorchDiT(m)(x, t, None, depth), m(x, t, None, depth=depth))


@torch.no_grad()
def test_per_sample_depth_baseline_and_the_schedule_driven_wrapper():
    m = _tiny_dit()
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([5.0, 400.0, 990.0]), torch.tensor([1, 2, 3])
    depth = torch.tensor([4, 1, 3])
    want = torch.cat([m(x[i:i + 1], t[i:i + 1], y[i:i + 1], depth=int(depth[i])) for i in range(3)])
    torch.testing.assert_close(baselines.dit_forward(m, x, t, y, depth), want)
    assert torch.equal(naive_exit_forward(m, x, t, y, depth), baselines.dit_forward(m, x, t, y, depth))
    with pytest.raises(ValueError, match="`depth` expected shape"):
        baselines.dit_forward(m, x, t, y, torch.tensor([1, 2]))
    sched = ExitSchedule.piecewise([2] * 10, total_depth=4)  # depth 2 everywhere, read from t.item()
    torch.testing.assert_close(baselines.TorchDiT(m, sched)(x, t, y), m(x, t, y, depth=2))


def test_seeded_inputs_have_one_home():
    from eekernels.jobs import distributed, sample as job

    assert distributed.seeded_noise is images.seeded_noise and distributed.image_labels is images.image_labels
    assert distributed.save_grid is images.save_grid and distributed.to_uint8 is images.to_uint8
    noise, labels = images.seeded_inputs(4, 7, 3, (3, 2, 2))
    assert labels.tolist() == [0, 1, 2, 0]
    for i in range(4):  # image i: noise from seed + i alone
        assert torch.equal(noise[i], torch.randn((3, 2, 2), generator=torch.Generator().manual_seed(7 + i)))
    m = _tiny_dit(num_classes=3)
    n2, l2 = job.seeded_inputs(m, 4, 7, "cpu")
    assert torch.equal(n2, images.seeded_inputs(4, 7, 3, (3, 8, 8))[0])
    assert torch.equal(l2, labels)
    assert images.seeded_inputs(2, 0, None, (1,))[1] is None


def test_the_fidelity_grid_is_one_row_per_variant(tmp_path):
    from PIL import Image

    rows = {"a": torch.full((3, 3, 4, 4), -1.0), "b": torch.ones(3, 3, 4, 4)}
    fidelity.save_grid(tmp_path / "g.png", rows, labels_per_row=3)
    g = np.asarray(Image.open(tmp_path / "g.png"))
    assert g.shape == (2 * 4 * 2, 3 * 4 * 2, 3)  # 2 rows of 3 tiles, no padding, twice the size
    assert (g[:8] == 0).all() and (g[8:] == 255).all()


def test_block_flop_fraction_has_one_definition():
    from eekernels.jobs import sample as job
    from eekernels.samplers import make_solver

    m = _tiny_dit()
    sched = ExitSchedule.piecewise([4, 4, 3, 3, 2, 2, 1, 1, 1, 1], total_depth=4)
    args = argparse.Namespace(sampler="heun", steps=6, timestep_spacing=None, exit_policy="drop", schedule="x")
    want = sched.block_flop_fraction(make_solver("heun", 6).timesteps)
    assert 0 < want < 1 and job.flop_fraction(m, args, sched) == want
    assert job.flop_fraction(m, args, None) == 1.0


# ---- the training-free adaptive peer: diffusers' FirstBlockCache on the same weights ---------------------------
@torch.no_grad()
def test_first_block_cache_peer_counts_blocks_and_is_exact_at_threshold_zero():
    from eekernels.samplers import sample

    m = _tiny_dit()
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    full = sample(m, x, y, sampler="dpmsolver++", steps=6, cfg_scale=1.5)
    plain = baselines.FirstBlockCacheDiT(m, None)  # diffusers without the hook
    assert torch.allclose(sample(plain, x, y, sampler="dpmsolver++", steps=6, cfg_scale=1.5), full, rtol=1e-5, atol=1e-5)
    assert plain.block_counts() == (6 * 4, 6 * 4)
    exact = baselines.FirstBlockCacheDiT(m, 0.0)  # any change recomputes: every block runs
    for _ in range(2):  # the second trajectory starts from a reset cache
        assert torch.allclose(sample(exact, x, y, sampler="dpmsolver++", steps=6, cfg_scale=1.5), full,
                              rtol=1e-5, atol=1e-5)
    assert exact.block_counts() == (2 * 6 * 4, 2 * 6 * 4)
    lazy = baselines.FirstBlockCacheDiT(m, 1e9)  # never recomputes after the first call of a trajectory
    out = sample(lazy, x, y, sampler="dpmsolver++", steps=6, cfg_scale=1.5)
    assert lazy.block_counts() == (4 + 5 * 1, 6 * 4)  # call 1 at full depth, then the first block only
    assert not torch.allclose(out, full, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="threshold"):
        baselines.FirstBlockCacheDiT(m, -1.0)
    with pytest.raises(ValueError, match="depth"):
        lazy(x, torch.full((6,), 10.0), y, depth=2)



@torch.no_grad()
def test_diffusers_step_caches_count_what_they_skip():
    """TaylorSeer (the DiT's attention and MLP modules named, since diffusers' defaults match no DiT module) and
    MagCache on the same weights: blocks counted where the attention really ran; a second trajectory repeats the
    first (state reset); a config of another kind is refused by name."""
    from diffusers.hooks import MagCacheConfig, PyramidAttentionBroadcastConfig
    from diffusers.hooks.mag_cache import MagCacheHeadHook

    from eekernels.samplers import sample

    m = _tiny_dit()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    opts = dict(sampler="dpmsolver++", steps=6, cfg_scale=1.5)
    full = sample(m, x, y, **opts)
    ts = baselines.DiffusersCacheDiT(m, baselines.taylorseer_config(cache_interval=2, warmup=1))
    a, b = sample(ts, x, y, **opts), sample(ts, x, y, **opts)
    assert ts.block_counts() == (2 * 3 * 4, 2 * 6 * 4)  # full at steps 0, 2, 4; forecast at 1, 3, 5
    assert torch.equal(a, b) and not torch.allclose(a, full, rtol=1e-3, atol=1e-3)
    cal = baselines.DiffusersCacheDiT(m, MagCacheConfig(calibrate=True, num_inference_steps=7))
    assert torch.allclose(sample(cal, x, y, **opts), full, rtol=1e-5, atol=1e-5)  # calibration skips nothing
    ratios = cal.states(MagCacheHeadHook)[0].calibration_ratios
    assert len(ratios) == 6 and ratios[0] == 1.0
    mag = baselines.DiffusersCacheDiT(m, MagCacheConfig(threshold=10.0, mag_ratios=ratios, num_inference_steps=6,
                                                        max_skip_steps=2, retention_ratio=0.2))
    sample(mag, x, y, **opts)
    run, possible = mag.block_counts()
    # step 0 retained (int(0.2 * 6 + 0.5) = 1 step), then at most 2 skipped in a row: full at steps 0 and 3 only
    assert possible == 6 * 4 and run == 2 * 4
    with pytest.raises(ValueError, match="config"):
        baselines.DiffusersCacheDiT(m, PyramidAttentionBroadcastConfig())


@torch.no_grad()
def test_fastercache_peer_swaps_the_cfg_halves_and_counts_the_work_it_runs():
    """diffusers' FasterCache on the same weights: with nothing skipped, plain diffusers' samples; when it skips the
    unconditional half, the conditional half it keeps is sample()'s first half (diffusers keeps its second: the
    wrapper swaps), and blocks count by rows run over the CFG batch's rows and by attention / MLP FLOP share; a
    second trajectory repeats the first; a batch that is not [cond; uncond] is refused; the config is not
    modified."""
    from fractions import Fraction

    from eekernels.samplers import sample

    m = _tiny_dit()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    opts = dict(sampler="dpmsolver++", steps=6, cfg_scale=1.5)
    plain = baselines.DiffusersCacheDiT(m, None)
    ref = sample(plain, x, y, **opts)
    # D 48, 16 tokens: attention 4 D^2 + 2 N D = 10752, MLP 8 D^2 = 18432 multiply-adds per token
    assert plain.part_shares == (Fraction(7, 19), Fraction(12, 19)) and plain.block_counts() == (24, 24)
    never = baselines.fastercache_config(1, 2000.0, 1, 2000.0)  # every call computes both halves and attention
    off = baselines.DiffusersCacheDiT(m, never)
    assert torch.allclose(sample(off, x, y, **opts), ref, rtol=1e-6, atol=1e-6) and off.block_counts() == (24, 24)
    assert never.current_timestep_callback is None and never.tensor_format == "BCFHW"  # set on a copy only

    xx, yy = torch.cat([x, x]), torch.cat([y, torch.full_like(y, m.null_class)])
    x2 = torch.randn(4, 3, 8, 8)
    xx2, t = torch.cat([x2, x2]), [torch.full((8,), v) for v in (900.0, 100.0)]
    strong = _tiny_dit()  # labels that matter (random ones barely move the output): a forecast that shows
    strong.y_embedder.embedding_table.weight.mul_(50)
    fc, exact = (baselines.DiffusersCacheDiT(strong, c) for c in (baselines.fastercache_config(2, 2000.0), None))
    assert torch.allclose(fc(xx, t[0], yy), exact(xx, t[0], yy), rtol=1e-5, atol=1e-5)  # call 0: both halves run
    got, want = fc(xx2, t[1], yy), exact(xx2, t[1], yy)  # call 1: the unconditional half forecast
    assert torch.allclose(got[:4], want[:4], rtol=1e-5, atol=1e-5)  # the conditional half, computed
    assert (got[4:] - want[4:]).abs().max() > 5e-3  # the unconditional half, forecast from call 0's difference
    assert fc.block_counts() == (4 + 4 * 0.5, 8)
    attn = baselines.DiffusersCacheDiT(m, baselines.fastercache_config(5, 2000.0, 2, 2000.0))
    attn(xx, t[0], yy), attn(xx, t[1], yy)  # call 1: half the rows, the attention reused: the MLP runs only
    assert attn.block_counts()[0] == pytest.approx(4 + 4 * 0.5 * 12 / 19, rel=1e-12)

    skip = baselines.DiffusersCacheDiT(m, baselines.fastercache_config(3, 2000.0, 2, 2000.0))
    a, b = sample(skip, x, y, **opts), sample(skip, x, y, **opts)
    run, possible = skip.block_counts()
    # per trajectory: calls 0 and 3 whole; 1, 2, 4, 5 on the conditional half, attention reused at 1 and 5
    assert possible == 2 * 24 and run == pytest.approx(2 * (8 + 16 * 0.5 - 8 * 0.5 * 7 / 19), rel=1e-12)
    assert torch.equal(a, b) and not torch.allclose(a, ref, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="y"):  # not a CFG batch: no unconditional half to skip
        skip(xx, t[0], torch.cat([y, y]))
    with pytest.raises(ValueError, match="y"):
        sample(skip, x, y, sampler="dpmsolver++", steps=6, cfg_scale=1.0)
    with pytest.raises(ValueError, match="uncond_every"):
        baselines.fastercache_config(0, 500.0)
    with pytest.raises(ValueError, match="attention_every"):
        baselines.fastercache_config(2, 500.0, True, 500.0)


@torch.no_grad()
def test_a_variant_with_its_own_steps_is_the_fewer_steps_row():
    """``Variant(steps=k)``: the same noise and labels sampled with k steps, its block-FLOP fraction relative to
    evaluate's run (k / steps at full depth), paired with the other rows."""
    from eekernels.models.judge import GlyphJudge
    from eekernels.samplers import sample

    torch.manual_seed(0)
    m = baselines.randomized(DiT(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                                 num_classes=10, learn_sigma=False))
    judge = GlyphJudge(width=4, feature_dim=8).eval()
    variants = [fidelity.Variant("full", "base", None), fidelity.Variant("steps-3", "base", None, steps=3),
                fidelity.Variant("ddim-3", "base", None, steps=3, sampler="ddim")]
    res = fidelity.evaluate({"base": m}, judge, variants=variants, num_samples=4, steps=6, bootstrap=4,
                            keep_samples=4, log=lambda *_: None)
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows["full"]["block_flop_fraction"] == 1.0 and rows["steps-3"]["block_flop_fraction"] == 0.5
    assert (rows["steps-3"]["steps"], rows["ddim-3"]["sampler"]) == (3, "ddim")
    noise, labels = fidelity._seed_inputs(4, 0, 10, (3, 32, 32))
    want = sample(m, noise, labels, sampler="dpmsolver++", steps=3, cfg_scale=1.5).clamp(-1, 1)
    assert torch.allclose(res["samples"]["steps-3"], want, atol=1e-5)
    assert not torch.allclose(res["samples"]["full"], want, atol=1e-3)
    assert "text" in fidelity.compare(res, "full", "steps-3")
