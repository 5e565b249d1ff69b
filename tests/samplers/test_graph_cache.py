"""The graph cache and the step-graph runner on the CPU, with an eager stand-in for CUDA capture.

The stand-in "graph" re-runs the captured function at replay, so the real runner code (warm-up with state
restore, one graph per depth keyed by session, LRU bounds, failure fallback) is what runs here; the GPU module
checks the same paths with real CUDA graphs.
"""
import warnings

import pytest
import torch

from eekernels.graphs import GraphCache, GraphedModel
from eekernels.samplers import SOLVERS, sample
from tests.samplers._toys import ToyModel, ToySchedule, relerr

SCHEDULE = ToySchedule([4, 4, 3, 3, 2, 2, 1, 1])


class EagerGraph:
    def __init__(self, fn):
        self.fn, self.replays = fn, 0

    def replay(self):
        self.replays += 1
        self.fn()


def eager_capture(nbytes=1000, fail=False):
    def capture(fn, pool, stream):
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return EagerGraph(fn), nbytes

    return capture


def _run(model, cache, name="ddpm", **kw):
    noise, y = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(5)), torch.tensor([1, 2])
    args = dict(sampler=name, steps=6, cfg_scale=2.0, schedule=SCHEDULE, generator=torch.Generator().manual_seed(9))
    args.update(kw)
    return sample(model, noise, y, graphs=cache is not None, graph_cache=cache, **args)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_graph_runner_equals_eager(name):
    """Warm-up runs the step twice per capture; if it advanced the state, samples would differ."""
    model = ToyModel(learn_sigma=True)
    cache = GraphCache(capture=eager_capture())
    want = _run(model, None, name)
    assert relerr(_run(model, cache, name), want) < 1e-6
    assert cache.stats()["graphs"] == 4  # one per depth
    before = cache.stats()
    assert relerr(_run(model, cache, name), want) < 1e-6  # a second run reuses the session and its graphs
    after = cache.stats()
    assert after["captures"] == before["captures"] and after["hits"] > before["hits"]


def test_new_session_per_shape_and_kind():
    model, cache = ToyModel(), GraphCache(capture=eager_capture())
    _run(model, cache, "ddim")
    _run(model, cache, "ddim", cfg_scale=1.0)
    _run(model, cache, "euler")
    assert cache.stats()["owners"] == 3 and cache.stats()["graphs"] == 12


def test_lru_count_bound_evicts_and_stays_correct():
    model = ToyModel()
    cache = GraphCache(max_graphs=2, capture=eager_capture())
    want = _run(model, None, "dpmsolver++")
    assert relerr(_run(model, cache, "dpmsolver++"), want) < 1e-6
    s = cache.stats()
    assert s["graphs"] == 2 and s["evictions"] == 2 and s["captures"] == 4


def test_byte_bound_evicts():
    model = ToyModel()
    cache = GraphCache(max_bytes=2500, capture=eager_capture(nbytes=1000))
    want = _run(model, None, "heun")
    assert relerr(_run(model, cache, "heun"), want) < 1e-6
    assert cache.stats()["graphs"] == 2 and cache.nbytes == 2000
    cache.configure(max_graphs=1)
    assert len(cache) == 1
    cache.clear()
    assert cache.stats()["graphs"] == 0 and cache.stats()["owners"] == 0


def test_capture_failure_falls_back_with_one_warning():
    model = ToyModel(learn_sigma=True)
    cache = GraphCache(capture=eager_capture(fail=True))
    want = _run(model, None)
    with pytest.warns(RuntimeWarning, match="capture of a ddpm step at depth 1 .* failed") as rec:
        got = _run(model, cache)
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert relerr(got, want) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the session is marked failed: eager, silently
        assert relerr(_run(model, cache), want) < 1e-6
    assert cache.stats()["failures"] == 1 and cache.stats()["graphs"] == 0


def test_step_errors_are_not_capture_failures():
    def bad(x, t, y, depth=None):
        return torch.zeros(x.shape[0], 5, *x.shape[2:])

    with pytest.raises(ValueError, match="model output"):
        sample(bad, torch.randn(2, 3, 5, 5), None, steps=2, graphs=True, graph_cache=GraphCache(capture=eager_capture()))


def test_graphed_model_with_stand_in():
    model = ToyModel()
    cache = GraphCache(max_graphs=1, capture=eager_capture())
    g = GraphedModel(model, 2, [4, 2], cache=cache)
    x, t, y = torch.randn(2, 3, 5, 5), torch.tensor([10.0, 500.0]), torch.tensor([1, 3])
    for d in (4, 2, 4):
        out = g(x, t, y, depth=d)
        assert torch.allclose(out, model(x, t, y, depth=d), rtol=1e-6, atol=1e-6)
    assert cache.stats()["evictions"] >= 2  # one graph at a time: depths alternate, recapture on demand
    token = g._token
    del g, out
    import gc

    gc.collect()
    assert all(e.owner_key != token for e in cache._entries.values())  # finalizer evicted its graphs


def test_graphed_model_off_cuda_runs_eagerly():
    model = ToyModel()
    g = GraphedModel(model, 2, [None, 3])
    assert not g.enabled
    x, t, y = torch.randn(2, 3, 5, 5), torch.tensor([10.0, 500.0]), torch.tensor([1, 3])
    assert torch.equal(g(x, t, y, depth=3), model(x, t, y, depth=3))
    assert torch.equal(g(x, t, y), model(x, t, y))


def test_cache_bounds_validated():
    with pytest.raises(ValueError, match="max_graphs"):
        GraphCache(max_graphs=0)
    with pytest.raises(ValueError, match="max_bytes"):
        GraphCache(max_bytes=-1)
    with pytest.raises(ValueError, match="warmup"):
        GraphCache(warmup=-1)
