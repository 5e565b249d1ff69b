"""The in-place tier on a GPU: one captured CUDA graph per (depth, input shapes), replay equal to eager, and no host
sync in the steady state of a pipeline run (``torch.cuda.set_sync_debug_mode("error")``)."""
import pytest
import torch

import eekernels
from eekernels import ExitSchedule, inplace
from eekernels.graphs import GraphCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible on this machine")

PIPELINES = ("dit", "ddim", "pixart", "sd3", "flux")


def _pipe(name):
    from tests.test_inplace import _pipeline

    return _pipeline(name).to("cuda")


def _run(name, pipe, seed=3):
    from tests.test_inplace import _call

    return _call(name, pipe, seed=seed)


def _schedule(total, policy):
    if policy == "drop":
        return ExitSchedule.piecewise([total, total, max(1, total - 1), 1, 1, 1, 1, 1, 1, 1])
    return ExitSchedule.periodic(2, max(1, total - 1), total)  # full depth first: cache and forecast record


@pytest.mark.parametrize("policy", ("drop", "cache", "forecast"))
@pytest.mark.parametrize("name", PIPELINES)
def test_graphs_equal_eager_one_graph_per_depth(name, policy):
    pipe = _pipe(name)
    model = pipe.unet if name == "ddim" else pipe.transformer
    total = inplace._count_depth(model, eekernels.families.family_of(model))
    schedule = _schedule(total, policy)
    eekernels.accelerate(pipe, schedule=schedule, exit_policy=policy, graphs=False)
    want = _run(name, pipe)
    eekernels.disable(pipe)
    eekernels.accelerate(pipe, schedule=schedule, exit_policy=policy, graphs=True)
    runner = inplace.controller(pipe).graphs
    runner.cache = cache = GraphCache()
    got = _run(name, pipe)
    assert abs(got - want).max() < 1e-4
    depths = {inplace.controller(pipe).depth_at(float(t), i) for i, t in enumerate(pipe.scheduler.timesteps)}
    assert cache.stats()["graphs"] == len(depths)
    captures = cache.stats()["captures"]
    assert abs(_run(name, pipe) - got).max() == 0  # replayed, nothing captured again
    assert cache.stats()["captures"] == captures


@pytest.mark.parametrize("name", ("dit", "pixart", "sd3", "flux"))
def test_depth0_forecast_graphs_equal_eager(name):
    """Depth 0 in place (no block between full calls, the whole stack's residual forecast): one more graph, replayed
    equal to eager."""
    pipe = _pipe(name)
    total = inplace._count_depth(pipe.transformer, eekernels.families.family_of(pipe.transformer))
    schedule = ExitSchedule.periodic(2, 0, total)
    eekernels.accelerate(pipe, schedule=schedule, exit_policy="forecast", graphs=False)
    want = _run(name, pipe)
    eekernels.disable(pipe)
    eekernels.accelerate(pipe, schedule=schedule, exit_policy="forecast", graphs=True)
    runner = inplace.controller(pipe).graphs
    runner.cache = cache = GraphCache()
    got = _run(name, pipe)
    assert abs(got - want).max() < 1e-4
    assert cache.stats()["graphs"] == 2 and cache.stats()["failures"] == 0  # full depth and depth 0


@pytest.mark.parametrize("policy", ("drop", "forecast"))
@pytest.mark.parametrize("name", ("dit", "flux"))
def test_no_host_sync_per_step_in_the_steady_state(name, policy):
    """After a warm run (graphs captured), the denoiser's calls make no synchronizing CUDA call: the depth comes from
    the host timeline and each call is a graph replay."""
    pipe = _pipe(name)
    model = pipe.transformer
    total = inplace._count_depth(model, eekernels.families.family_of(model))
    schedule = (ExitSchedule.piecewise([total, 1, total, 1, 1, 1, 1, 1, 1, 1]) if policy == "drop"
                else _schedule(total, policy))
    eekernels.accelerate(pipe, schedule=schedule, exit_policy=policy, graphs=True)
    _run(name, pipe)  # warm: captures
    ctl = inplace.controller(pipe)
    begin, synced = ctl.begin, []

    def checked(t):
        torch.cuda.set_sync_debug_mode("error")
        try:
            begin(t)
        except RuntimeError as e:  # a synchronizing call while choosing the depth
            synced.append(str(e))
            raise

    ctl.begin = checked
    hook = model.register_forward_hook(lambda *a: torch.cuda.set_sync_debug_mode("default"))
    try:
        with torch.no_grad():
            torch.cuda.set_sync_debug_mode("default")
            _run(name, pipe)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        hook.remove()
    assert not synced
