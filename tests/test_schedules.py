"""ExitSchedule: t -> depth semantics, fractional t, devices, presets, plans and validation."""
import pytest
import torch

import eekernels
from eekernels import ExitSchedule
from eekernels.models import DiT, UViT
from eekernels.schedules import ASE_DIT_XL

REF = ASE_DIT_XL  # (28, 28, 24, 24, 20, 20, 16, 16, 12, 12)


def test_ase_reference_bins():
    s = ExitSchedule.piecewise(list(REF))
    assert eekernels.ExitSchedule is ExitSchedule
    t = torch.tensor([0, 99, 100, 199, 200, 550, 999])
    # Bin i covers [100 i, 100 (i + 1)) (docs/design.md): 100 is still in bin 1, whose depth is 28.
    assert s.depth(t).tolist() == [28, 28, 28, 28, 24, 20, 12]
    assert s.depth(t).dtype == torch.long
    assert s.total_depth == 28 and s.levels == (28, 24, 20, 16, 12)
    assert s.mean_depth(torch.arange(1000)) == 20.0
    assert s.block_flop_fraction(torch.arange(1000)) == pytest.approx(20 / 28)


def test_fractional_and_out_of_range_t():
    s = ExitSchedule.piecewise([5, 4, 3, 2], num_timesteps=8)  # bins of width 2
    t = torch.tensor([0.0, 1.999, 2.0, 3.5, 5.9999, 6.0, 7.99, -0.5, 8.0, 1e6])
    assert s.depth(t).tolist() == [5, 5, 4, 4, 3, 2, 2, 5, 2, 2]
    assert s.depth(t[:-1].half().float()).shape == t[:-1].shape  # (1e6 would overflow half to inf)
    assert s.depth(torch.tensor([[1, 7], [3, 5]])).tolist() == [[5, 2], [4, 3]]  # any shape; integer t too
    uneven = ExitSchedule.piecewise([3, 2, 1], num_timesteps=1000)  # bin edges at 333.33 and 666.67
    assert uneven.depth(torch.tensor([333.0, 333.4, 666.6, 666.7])).tolist() == [3, 2, 2, 1]


def test_depth_stays_on_device_without_sync():
    s = ExitSchedule.preset("ase-dit-xl")
    t = torch.tensor([10.5, 990.0], device="meta")  # a meta tensor cannot be read: any host sync would raise
    out = s.depth(t)
    assert out.device.type == "meta" and out.dtype == torch.long and out.shape == (2,)
    if torch.cuda.is_available():
        tc = torch.tensor([10.5, 990.0], device="cuda")
        assert s.depth(tc).device == tc.device and s.depth(tc).tolist() == [28, 12]


def test_linear_from_fn_and_rescaled():
    lin = ExitSchedule.linear(10, 28)
    assert lin.depth(torch.tensor([0.0, 999.0, 500.0, 999.5])).tolist() == [28, 10, 19, 10]
    f = ExitSchedule.from_fn(lambda t: 4 if t < 300 else 2, num_timesteps=1000, total_depth=6)
    assert f.total_depth == 6 and f.depth(torch.tensor([299.9, 300.0])).tolist() == [4, 2]
    r = ExitSchedule.piecewise(list(REF)).rescaled(12)
    assert r.table == (12, 12, 10, 10, 9, 9, 7, 7, 5, 5) and r.total_depth == 12
    assert ExitSchedule.piecewise([2, 1]).rescaled(1).table == (1, 1)  # never below 1


def test_presets():
    assert ExitSchedule.preset("ase-dit-xl").table == REF
    demo = ExitSchedule.preset("ase-demo", total_depth=12)
    assert demo.total_depth == 12
    assert 0.68 <= demo.block_flop_fraction(torch.arange(1000.0)) <= 0.74
    assert ExitSchedule.preset("ase-demo").table == REF
    assert ExitSchedule.preset("full", total_depth=7).depth(torch.tensor([0, 999])).tolist() == [7, 7]
    with pytest.raises(ValueError, match="unknown name 'ase'"):
        ExitSchedule.preset("ase")
    with pytest.raises(ValueError, match="ase-demo"):
        ExitSchedule.preset("ase-dit-xl", total_depth=12)


def test_periodic_is_step_indexed():
    p = ExitSchedule.periodic(3, depth=10, total_depth=28)
    call_t = torch.linspace(999, 0, 7)
    assert p.step_indexed and p.levels == (28, 10)
    assert p.plan(call_t).tolist() == [28, 10, 10, 28, 10, 10, 28]
    assert p.mean_depth(call_t) == pytest.approx((3 * 28 + 4 * 10) / 7)
    with pytest.raises(ValueError, match="step-indexed"):
        p.depth(call_t)


def test_plan_of_t_schedule_is_depth():
    s = ExitSchedule.preset("ase-dit-xl")
    call_t = torch.linspace(999, 0, 50)
    assert torch.equal(s.plan(call_t), s.depth(call_t))
    with pytest.raises(ValueError, match="1-D tensor"):
        s.plan(call_t[None])


def test_non_monotone_accepted_and_bad_depths_rejected():
    assert ExitSchedule.piecewise([4, 8, 2, 6]).depth(torch.tensor([300.0, 600.0])).tolist() == [8, 2]
    for bad, match in [([0, 3], r"\[1, total_depth=3\]"), ([4, 2], r"total_depth=3"), ([], "at least one"),
                       ([2.5, 1], "expected an int"), ([True], "expected an int")]:
        with pytest.raises(ValueError, match=match):
            ExitSchedule.piecewise(bad, total_depth=3 if bad != [] else None)
    with pytest.raises(ValueError, match="min_depth <= max_depth"):
        ExitSchedule.linear(5, 3)
    with pytest.raises(ValueError, match="`k` expected >= 1"):
        ExitSchedule.periodic(0, 3, 6)
    with pytest.raises(ValueError, match=r"`t` expected a torch.Tensor"):
        ExitSchedule.piecewise([1]).depth([1.0])


def test_validate_for_models():
    with torch.device("meta"):
        dit = DiT(input_size=8, hidden_size=24, depth=12, num_heads=2)
        uvit = UViT(input_size=8, embed_dim=24, depth=12, num_heads=2)  # 13 blocks, min depth 7
    ref = ExitSchedule.preset("ase-dit-xl")
    with pytest.raises(ValueError, match=r"12 blocks; use schedule.rescaled\(12\)"):
        ref.validate_for(dit)
    ref.rescaled(12).validate_for(dit)
    with pytest.raises(ValueError, match="needs at least 7"):
        ref.rescaled(13).validate_for(uvit)
    ExitSchedule.linear(7, 13).validate_for(uvit)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_timesteps_rejected(bad):
    s = ExitSchedule.piecewise([3, 2, 1])
    t = torch.tensor([10.0, bad, 500.0])
    with pytest.raises(ValueError, match=rf"ExitSchedule.depth: `t` expected finite timesteps, got {bad} \(at 1 of 3"):
        s.depth(t)
    with pytest.raises(ValueError, match="ExitSchedule.plan: `timesteps` expected finite timesteps"):
        s.plan(t)
    with pytest.raises(ValueError, match="ExitSchedule.plan: `timesteps` expected finite timesteps"):
        ExitSchedule.periodic(2, 1, 3).plan(t)  # step-indexed: t unused, still a bug upstream
    assert s.depth(torch.tensor([10, 999])).tolist() == [3, 1]  # integer t: nothing to check
    assert s.plan(torch.zeros(2, device="meta")).device.type == "meta"  # meta: no values, no check
