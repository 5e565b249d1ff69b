"""CUDA graphs on a GPU: replay equals eager on the same seed, steps replay without Python, the bounded cache
evicts, a failed capture falls back to eager with one warning, and no step syncs with the host."""
import warnings

import pytest
import torch

from eekernels import ExitSchedule
from eekernels.graphs import GraphCache, GraphedModel
from eekernels.samplers import SOLVERS, make_solver, sample
from tests.samplers._toys import ToyModel, ToySchedule, relerr

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible on this machine")

SCHEDULE = ToySchedule([4, 4, 3, 3, 2, 2, 1, 1])


def _inputs(B=2):
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, 3, 5, 5, generator=g).cuda(), torch.arange(B).cuda() % 5


def _gen():
    return torch.Generator("cuda").manual_seed(11)


def _syncs_do_not_grow_with_steps(model, noise, y, cache, kw):
    """The synchronizing CUDA calls of a graphed run (after a run that captures) do not grow with its steps."""
    def syncs(steps):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sample(model, noise, y, graphs=True, graph_cache=cache, steps=steps, **kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return len(rec)

    syncs(6)  # captures for this step count
    assert syncs(6) == syncs(18)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_graphs_equal_eager_and_replay_without_python(name):
    model = ToyModel(learn_sigma=True).cuda()
    noise, y = _inputs()
    kw = dict(sampler=name, steps=8, cfg_scale=2.0, schedule=SCHEDULE)
    eager = sample(model, noise, y, graphs=False, generator=_gen(), **kw)
    cache = GraphCache()
    model.calls.clear()
    graphed = sample(model, noise, y, graphs=True, graph_cache=cache, generator=_gen(), **kw)
    assert relerr(graphed, eager) < 1e-5
    # The model's Python ran only for the warm-ups and captures (4 depths), not once per model call.
    assert len(model.calls) == (cache.warmup + 1) * 4
    again = sample(model, noise, y, graphs=True, graph_cache=cache, generator=_gen(), **kw)
    assert len(model.calls) == (cache.warmup + 1) * 4  # reused: nothing captured, nothing run in Python
    assert torch.equal(again, graphed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_dit_graphs_equal_eager(dtype):
    from eekernels.models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=128, depth=6, num_heads=4, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    model = model.cuda().to(dtype).eval()
    noise = torch.randn(3, 4, 16, 16, device="cuda", dtype=dtype)
    y = torch.tensor([1, 5, 9], device="cuda")
    schedule = ExitSchedule.piecewise([6, 6, 5, 5, 4, 4, 3, 3, 2, 2])
    for name in ("ddim", "ddpm", "dpmsolver++"):
        kw = dict(sampler=name, steps=10, cfg_scale=1.5, schedule=schedule)
        eager = sample(model, noise, y, graphs=False, generator=_gen(), **kw)
        graphed = sample(model, noise, y, graphs=True, graph_cache=GraphCache(), generator=_gen(), **kw)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert relerr(graphed.float(), eager.float()) < tol, name


@pytest.mark.parametrize("order", [1, 2])
def test_per_block_forecast_graphs_equal_eager_and_no_host_sync_per_step(order):
    """``forecast_target="blocks"`` on the real DiT (TaylorSeer's shape, no block between full calls): graphs equal
    eager, and the number of synchronizing calls does not grow with the steps."""
    from eekernels.models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=128, depth=6, num_heads=4, num_classes=10)
    model = model.cuda().eval()
    noise = torch.randn(3, 4, 16, 16, device="cuda")
    y = torch.tensor([1, 5, 9], device="cuda")
    kw = dict(sampler="ddim", cfg_scale=1.5, schedule=ExitSchedule.periodic(2, 0, 6), exit_policy="forecast",
              forecast_order=order, forecast_target="blocks")
    eager = sample(model, noise, y, graphs=False, steps=10, **kw)
    cache = GraphCache()
    graphed = sample(model, noise, y, graphs=True, graph_cache=cache, steps=10, **kw)
    assert relerr(graphed, eager) < 1e-5

    _syncs_do_not_grow_with_steps(model, noise, y, cache, kw)


def test_bounded_cache_evicts_and_stays_correct():
    model = ToyModel().cuda()
    noise, y = _inputs()
    kw = dict(sampler="heun", steps=6, schedule=SCHEDULE)
    eager = sample(model, noise, y, graphs=False, **kw)
    cache = GraphCache(max_graphs=2)
    graphed = sample(model, noise, y, graphs=True, graph_cache=cache, **kw)
    s = cache.stats()
    assert s["graphs"] == 2 and s["evictions"] >= 2, s
    assert relerr(graphed, eager) < 1e-5
    tiny = GraphCache(max_bytes=1)  # every capture is over the byte bound: only the newest graph is kept
    sample(model, noise, y, graphs=True, graph_cache=tiny, **kw)
    assert tiny.stats()["graphs"] == 1


def test_capture_failure_falls_back_once():
    class Syncing(ToyModel):
        def forward(self, x, t, y=None, depth=None, exit_cache=None):
            if float(t[0]) < 0:  # a host sync: not capturable
                raise AssertionError
            return super().forward(x, t, y, depth, exit_cache)

    model = Syncing().cuda()
    noise, y = _inputs()
    kw = dict(sampler="ddim", steps=6, schedule=SCHEDULE)
    eager = sample(model, noise, y, graphs=False, **kw)
    cache = GraphCache()
    with pytest.warns(RuntimeWarning, match="capture .* failed") as rec:
        got = sample(model, noise, y, graphs=True, graph_cache=cache, **kw)
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert relerr(got, eager) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert relerr(sample(model, noise, y, graphs=True, graph_cache=cache, **kw), eager) < 1e-6
    x = torch.randn(64, device="cuda")  # CUDA and its default generator still usable after the failed capture
    assert torch.isfinite((x * 2).sum())
    assert relerr(sample(model, noise, y, graphs=False, sampler="ddpm", steps=3), eager) > 0  # random ops work


def test_graphed_model_equals_eager():
    model = ToyModel(learn_sigma=True).cuda()
    g = GraphedModel(model, 2, [None, 3, 1], cache=GraphCache())
    x, y = _inputs()
    t = torch.tensor([10.0, 700.0], device="cuda")
    n = len(model.calls)
    for d in (None, 3, 1):
        kw = {} if d is None else {"depth": d}
        assert torch.allclose(g(x, t, y, depth=d), model(x, t, y, **kw), rtol=1e-5, atol=1e-6)
    assert len(model.calls) == n + 3  # only the eager references ran Python


def test_no_host_sync_per_step():
    """The number of synchronizing calls does not grow with the number of steps (eager CUDA path)."""
    model = ToyModel().cuda()
    noise, y = _inputs()

    def syncs(steps):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sample(model, noise, y, sampler="ddpm", steps=steps, cfg_scale=2.0, schedule=SCHEDULE, graphs=False,
                       generator=_gen())
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return len(rec)

    syncs(4)  # first use: lazy initialisations may sync once
    assert syncs(4) == syncs(16)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_graphs_dit_options_equal_eager(name):
    """cfg_channels and timestep_spacing="respaced" under graphs; cfg_channels is part of the session key."""
    model = ToyModel(channels=4, learn_sigma=True).cuda()
    g = torch.Generator().manual_seed(3)
    noise, y = torch.randn(2, 4, 5, 5, generator=g).cuda(), torch.tensor([1, 3]).cuda()
    kw = dict(sampler=name, steps=8, cfg_scale=3.0, schedule=SCHEDULE, timestep_spacing="respaced")
    cache = GraphCache()
    for channels in (3, None):
        eager = sample(model, noise, y, graphs=False, generator=_gen(), cfg_channels=channels, **kw)
        graphed = sample(model, noise, y, graphs=True, graph_cache=cache, generator=_gen(), cfg_channels=channels, **kw)
        assert relerr(graphed, eager) < 1e-5, channels
    dit_rule = sample(model, noise, y, graphs=True, graph_cache=cache, generator=_gen(), cfg_channels=3, **kw)
    assert relerr(dit_rule, graphed) > 1e-4  # not the cfg_channels=None session's graphs


def test_labels_checked_before_any_graph():
    model = ToyModel().cuda()
    noise, _ = _inputs()
    with pytest.raises(ValueError, match=r"y: expected labels in \[0, 5\)"):
        sample(model, noise, torch.tensor([0, 7]).cuda(), graphs=True, graph_cache=GraphCache())
    assert model.calls == []


@pytest.mark.parametrize("name", ["flow_euler", "flow_heun", "flow_dpmsolver++", "ddim"])
def test_text_condition_graphs_replay_new_captions(name):
    """Text CFG on real CUDA graphs: each depth captured once; a new caption of the same shapes replays the
    same graphs (no Python per call) from the refilled static buffers and equals an eager run."""
    from tests.samplers._toys import TextToy, text_condition

    model = TextToy(prediction="flow" if name.startswith("flow") else "epsilon").cuda()
    noise = torch.randn(2, 3, 5, 5, device="cuda")
    kw = dict(sampler=name, steps=6, cfg_scale=3.0, schedule=ExitSchedule.piecewise([4, 4, 3, 3, 2, 2, 1, 1]))
    cache = GraphCache()
    for i, seed in enumerate((1, 2)):
        y = text_condition(seed=seed).to("cuda")
        eager = sample(model, noise, y, graphs=False, **kw)
        model.calls.clear()
        graphed = sample(model, noise, y, graphs=True, graph_cache=cache, **kw)
        assert relerr(graphed, eager) < 1e-5
        if i:
            assert model.calls == []  # replayed: the model's Python did not run
    assert cache.stats()["failures"] == 0


@pytest.mark.parametrize("depth", [2, 0])
@pytest.mark.parametrize("policy", ["cache", "forecast"])
def test_reuse_policies_graphs_equal_eager_and_no_host_sync_per_step(policy, depth):
    """The cache and forecast policies under graphs: the same samples as eagerly, and the number of synchronizing
    calls does not grow with the number of steps (the forecast's weights go to the device without a sync). Depth 0:
    no block between full calls (TaylorSeer's shape), one more graph like any depth."""
    model = ToyModel(learn_sigma=True).cuda()
    noise, y = _inputs()
    kw = dict(sampler="ddim", cfg_scale=2.0, schedule=ExitSchedule.periodic(3, depth, 4), exit_policy=policy)
    eager = sample(model, noise, y, graphs=False, steps=9, **kw)
    cache = GraphCache()
    graphed = sample(model, noise, y, graphs=True, graph_cache=cache, steps=9, **kw)
    assert relerr(graphed, eager) < 1e-5

    _syncs_do_not_grow_with_steps(model, noise, y, cache, kw)


def test_a_plan_of_per_call_policies_replays_one_graph_per_depth():
    """A joint plan mixing drop, cache and forecast per call: only the ForecastCache's weights differ between the
    policies (written on the host before each replay), so graphs equal eager with one graph per depth."""
    model = ToyModel().cuda()
    noise, y = _inputs()
    sched = ExitSchedule([4, 2, 3, 2, 4, 3, 2, 4], 4, policies=["cache", "forecast", "drop", "cache", "forecast",
                                                                "drop", "forecast", "cache"], steps=8, sampler="ddim")
    eager = sample(model, noise, y, cfg_scale=2.0, schedule=sched, graphs=False)
    cache = GraphCache()
    model.calls.clear()
    graphed = sample(model, noise, y, cfg_scale=2.0, schedule=sched, graphs=True, graph_cache=cache)
    assert relerr(graphed, eager) < 1e-5
    assert len(model.calls) == (cache.warmup + 1) * len(sched.levels)


@pytest.mark.parametrize("order,half", [(1, "forecast"), (2, "forecast"), (1, "drop")])
def test_uncond_forecast_graphs_equal_eager_and_no_host_sync_per_step(order, half):
    """A plan that runs CFG's conditional half alone at some calls (``ExitSchedule.uncond`` "forecast", or "drop"
    below full depth): one more graph per such depth and mode, replay equal to eager, and no synchronizing call per
    step."""
    from eekernels.calibration import _table_schedule

    model = ToyModel(num_blocks=4).cuda()
    noise, y = _inputs(3)

    def plan(steps):
        ts = make_solver("ddim", steps).timesteps.tolist()
        codes = [1, 1] + [2, 1] * ((steps - 2) // 2) + [2] * (steps % 2)
        depths = [4] * steps if half == "forecast" else [4 if c == 1 else 2 + k % 2 for k, c in enumerate(codes)]
        table = _table_schedule(depths, ts, 4, 1000, "t").table
        modes = _table_schedule(codes, ts, 2, 1000, "u").table
        return ExitSchedule(table, 4, 1000, uncond=[half if m == 2 else "run" for m in modes], forecast_order=order)

    kw = dict(sampler="ddim", cfg_scale=2.0)
    eager = sample(model, noise, y, graphs=False, steps=10, schedule=plan(10), **kw)
    cache = GraphCache()
    graphed = sample(model, noise, y, graphs=True, graph_cache=cache, steps=10, schedule=plan(10), **kw)
    assert relerr(graphed, eager) < 1e-5

    def syncs(steps):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sample(model, noise, y, graphs=True, graph_cache=cache, steps=steps, schedule=plan(steps), **kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return len(rec)

    syncs(6)
    syncs(18)
    assert syncs(6) == syncs(18)
