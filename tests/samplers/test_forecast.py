"""exit_policy="forecast": what the skipped blocks add, extrapolated in t from the last full-depth calls
(eekernels.models.cache.ForecastCache), against a hand-written extrapolation, and exact where the skipped part is a
polynomial in t of the forecast's order."""
import numpy as np
import pytest
import torch

from eekernels import ExitSchedule
from eekernels.models.cache import ExitCache, ForecastCache, lagrange_weights
from eekernels.samplers import sample
from tests.samplers._toys import ToyModel


def test_lagrange_weights_reproduce_numpy_polyfit():
    rng = np.random.default_rng(0)
    for n in (2, 3):
        ts = sorted(rng.uniform(0, 1000, n), reverse=True)
        ys = rng.normal(size=n)
        t = float(rng.uniform(0, 1000))
        w = lagrange_weights(list(ts), t)
        assert sum(wi * yi for wi, yi in zip(w, ys)) == pytest.approx(np.polyval(np.polyfit(ts, ys, n - 1), t),
                                                                       rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("d", (2, 0))
@pytest.mark.parametrize("order", (1, 2))
def test_forecast_equals_a_hand_written_extrapolation_of_recorded_residuals(order, d):
    """The model at depth d with the forecast equals the model at depth d with an ExitCache holding the residual
    extrapolated by hand from the residuals plain ExitCaches recorded at the full calls (d = 0: no block runs, the
    whole stack's part is extrapolated, TaylorSeer's skipped step)."""
    torch.manual_seed(0)
    model = ToyModel(num_blocks=4).double()
    times = [950.0, 800.0, 600.0][: order + 1]
    xs = [torch.randn(2, 3, 5, 5, dtype=torch.float64) for _ in range(len(times) + 1)]
    y = torch.tensor([1, 3])
    recorded = []
    for x, t in zip(xs, times):
        c = ExitCache([d])
        model(x, torch.full((2,), t, dtype=torch.float64), y, exit_cache=c)
        recorded.append(c.load(d).clone())
    t_new = 420.0
    if order == 1:
        r = recorded[1] + (t_new - times[1]) * (recorded[1] - recorded[0]) / (times[1] - times[0])
    else:  # Newton's divided differences, written out
        f01 = (recorded[1] - recorded[0]) / (times[1] - times[0])
        f12 = (recorded[2] - recorded[1]) / (times[2] - times[1])
        f012 = (f12 - f01) / (times[2] - times[0])
        r = recorded[0] + (t_new - times[0]) * f01 + (t_new - times[0]) * (t_new - times[1]) * f012
    hand = ExitCache([d])
    hand.store(d, r)
    want = model(xs[-1], torch.full((2,), t_new, dtype=torch.float64), y, depth=d, exit_cache=hand)
    f = ForecastCache([d], order=order)
    for x, t in zip(xs, times):
        f.begin_call(t, True)
        model(x, torch.full((2,), t, dtype=torch.float64), y, exit_cache=f)
    f.begin_call(t_new, False)
    got = model(xs[-1], torch.full((2,), t_new, dtype=torch.float64), y, depth=d, exit_cache=f)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d", (1, 0))
@pytest.mark.parametrize("order", (1, 2))
@pytest.mark.parametrize("sampler", ("ddim", "dpmsolver++", "euler"))
def test_forecast_is_exact_where_the_skipped_part_is_a_polynomial_of_its_order(order, sampler, d):
    model = ToyModel(num_blocks=4, deep_poly_in_t=order, deep_from=d).double()
    noise = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([0, 4])
    kw = dict(sampler=sampler, steps=10, cfg_scale=1.5, graphs=False)
    full = sample(model, noise, y, **kw)
    # Ten bins of t, noise end last: three full calls, one at depth d, three full, one at depth d, two full.
    sched = ExitSchedule.piecewise([4, 4, d, 4, 4, 4, d, 4, 4, 4], total_depth=4)
    got = sample(model, noise, y, schedule=sched, exit_policy="forecast", forecast_order=order, **kw)
    reuse = sample(model, noise, y, schedule=sched, exit_policy="cache", **kw)
    assert torch.allclose(got, full, rtol=1e-9, atol=1e-9), (got - full).abs().max()
    assert (reuse - full).abs().max() > 1e-4  # reuse alone is not exact here: the test can fail


def test_forecast_lowers_its_order_until_enough_full_calls_are_kept():
    f = ForecastCache([1], order=2)
    f.begin_call(900.0, True)
    f.store(1, torch.tensor([3.0]))
    f.begin_call(800.0, False)  # one kept call: reuse
    assert torch.equal(f.load(1), torch.tensor([3.0]))
    f.begin_call(700.0, True)
    f.store(1, torch.tensor([5.0]))
    f.begin_call(600.0, False)  # two: the line through them
    assert torch.allclose(f.load(1), torch.tensor([6.0]))  # 5 + (600 - 700) * (5 - 3) / (700 - 900)
    f.restart()
    with pytest.raises(ValueError, match="no value recorded"):
        f.load(1)


def test_forecast_bad_inputs_are_named():
    model = ToyModel(num_blocks=4)
    noise = torch.randn(1, 3, 5, 5)
    sched = ExitSchedule.periodic(2, 1, 4)
    with pytest.raises(ValueError, match="forecast_order: expected 1 or 2"):
        sample(model, noise, sampler="ddim", steps=4, schedule=sched, exit_policy="forecast", forecast_order=3)
    with pytest.raises(ValueError, match="forecast_order: expected 1 or 2"):
        sample(model, noise, sampler="ddim", steps=4, schedule=sched, exit_policy="forecast", forecast_order=True)
    with pytest.raises(ValueError, match="'forecast' needs an exit schedule"):
        sample(model, noise, sampler="ddim", steps=4, exit_policy="forecast")
    with pytest.raises(ValueError, match="`order` expected 1 or 2"):
        ForecastCache([1], order=0)


def test_depth0_calls_run_no_block_and_drop_refuses_them():
    """``ExitSchedule.periodic(2, 0, L)`` under "forecast" (diffusers' TaylorSeer shape): the model is called at full
    depth and at depth 0 in turn; under "drop" the same schedule is refused before any model call."""
    model = ToyModel(num_blocks=4).double()
    noise = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([1, 2])
    sched = ExitSchedule.periodic(2, 0, 4)
    kw = dict(sampler="dpmsolver++", steps=6, cfg_scale=1.5, graphs=False, schedule=sched)
    got = sample(model, noise, y, exit_policy="forecast", **kw)
    assert [d for d, _ in model.calls] == [4, 0] * 3
    full = sample(model, noise, y, sampler="dpmsolver++", steps=6, cfg_scale=1.5, graphs=False)
    assert torch.isfinite(got).all() and (got - full).abs().max() > 1e-6  # the forecast stands in: not full depth
    model.calls.clear()
    with pytest.raises(ValueError, match=r"depth 0 at call 1 .* outside \[1, 4\].*only with exit_policy 'cache' or "
                                         r"'forecast'.*got exit_policy='drop'"):
        sample(model, noise, y, exit_policy="drop", **kw)
    assert model.calls == []  # refused before any work
