"""sample() with text conditions: CFG with the model's null condition or a negative prompt, static caption buffers
reused across calls (graphs replay with new captions), the depth plan, FLUX-style guidance, and bad conditions.

The references are plain loops over the solver classes and the model, with the CFG batch built by hand.
"""
import pytest
import torch

from eekernels import TextCondition
from eekernels.graphs import GraphCache, GraphedModel
from eekernels.samplers import make_solver, sample
from eekernels.schedules import ExitSchedule
from tests.samplers._toys import TextToy, relerr, text_condition
from tests.samplers.test_graph_cache import eager_capture

NOISE = (2, 3, 5, 5)


def _noise(seed=0, dtype=torch.float32):
    return torch.randn(*NOISE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _by_hand(model, noise, y, sampler, steps, cfg_scale=1.0, negative=None, schedule=None, **options):
    """The reference: the solver's step-by-step API; CFG as [cond; uncond] with eps_u + s (eps_c - eps_u)."""
    solver = make_solver(sampler, steps, **options)
    x = noise * solver.init_noise_sigma
    B = noise.shape[0]
    if cfg_scale != 1:
        neg = negative if negative is not None else model.null_condition(B, y.length)
        mask = lambda c: c.mask if c.mask is not None else torch.ones(c.tokens.shape[:2], dtype=torch.bool)  # noqa
        cond = TextCondition(torch.cat([y.tokens, neg.tokens]), torch.cat([mask(y), mask(neg)]),
                             None if y.pooled is None else torch.cat([y.pooled, neg.pooled]),
                             {k: torch.cat([v, neg.extra[k]]) for k, v in y.extra.items()})
    for t in solver.timesteps:
        kw = {} if schedule is None else {"depth": int(schedule.depth(t[None])[0])}
        xin = solver.scale_model_input(x)
        if cfg_scale != 1:
            out = model(torch.cat([xin, xin]), t.expand(2 * B), cond, **kw)
            out = out[B:] + cfg_scale * (out[:B] - out[B:])
        else:
            out = model(xin, t.expand(B), y, **kw)
        x = solver.step(out, x)
    return x


@pytest.mark.parametrize("sampler,prediction", [("ddim", "epsilon"), ("dpmsolver++", "epsilon"),
                                                ("flow_euler", "flow"), ("flow_heun", "flow")])
def test_cfg_with_null_condition(sampler, prediction):
    model = TextToy(prediction=prediction, seed=1)
    y, noise = text_condition(seed=2), _noise(3)
    opts = dict(shift=3.0) if prediction == "flow" else {}
    want = _by_hand(model, noise, y, sampler, 5, cfg_scale=4.0, **opts)
    model.calls.clear()
    got = sample(model, noise, y, sampler=sampler, steps=5, cfg_scale=4.0, **opts)
    assert relerr(got, want) <= 1e-6
    # one batch of 2B per call: the conditional captions, then the learned null caption
    depth, t, tokens = model.calls[0]
    assert tokens.shape == (4, 5, 6) and torch.equal(tokens[:2], y.tokens)
    assert torch.equal(tokens[2:], model.y_embedding[:5].detach().expand(2, -1, -1))
    nocfg = sample(model, noise, y, sampler=sampler, steps=5, **opts)
    assert relerr(nocfg, got) > 1e-3  # guidance changed the result


@pytest.mark.parametrize("sampler", ["flow_euler", "flow_dpmsolver++"])
def test_cfg_with_negative_prompt(sampler):
    model = TextToy(prediction="flow", null=False, seed=4)  # SD3-like: no null condition
    y, neg = text_condition(seed=5), text_condition(seed=6, mask=False)
    noise = _noise(7)
    want = _by_hand(model, noise, y, sampler, 6, cfg_scale=3.5, negative=neg, shift=3.0)
    got = sample(model, noise, y, sampler=sampler, steps=6, cfg_scale=3.5, negative=neg, shift=3.0)
    assert relerr(got, want) <= 1e-6
    with pytest.raises(ValueError, match=r"negative: classifier-free guidance \(cfg_scale != 1\) with this model "
                                         r"expected negative=TextCondition\(...\).*no null condition"):
        sample(model, noise, y, sampler=sampler, steps=6, cfg_scale=3.5)
    # negative given to a model that has a null condition: the negative wins
    m2 = TextToy(prediction="flow", seed=4)
    a = sample(m2, noise, y, sampler=sampler, steps=4, cfg_scale=2.0, negative=neg)
    b = sample(m2, noise, y, sampler=sampler, steps=4, cfg_scale=2.0)
    assert relerr(a, _by_hand(m2, noise, y, sampler, 4, cfg_scale=2.0, negative=neg)) <= 1e-6 and relerr(a, b) > 1e-4


@pytest.mark.parametrize("sampler", ["ddim", "flow_heun"])
def test_buffers_reused_across_captions_equal_fresh_runs(sampler):
    """With graphs (an eager stand-in for capture: the real runner code), a second call with new captions of the
    same shapes reuses the session and its graphs, copies the captions into the static buffers, and gives the
    result of a fresh run; another caption length is another session."""
    prediction = "flow" if sampler.startswith("flow") else "epsilon"
    model = TextToy(prediction=prediction, seed=8)
    cache = GraphCache(capture=eager_capture())
    schedule = ExitSchedule.piecewise([4, 4, 3, 3, 2, 2, 1, 1])
    kw = dict(sampler=sampler, steps=5, cfg_scale=2.5, schedule=schedule)
    runs = [(text_condition(seed=s), _noise(10 + s)) for s in (11, 12, 13)]
    for i, (y, noise) in enumerate(runs):
        before = cache.stats()
        got = sample(model, noise, y, graphs=True, graph_cache=cache, **kw)
        fresh = sample(model, noise, y, graphs=False, **kw)
        assert relerr(got, fresh) <= 1e-7
        if i:
            assert cache.stats()["captures"] == before["captures"] and cache.stats()["owners"] == 1
    assert cache.stats()["graphs"] == len(set(schedule.plan(make_solver(sampler, 5).timesteps).tolist()))
    y9 = text_condition(seed=14, length=9)
    got = sample(model, runs[0][1], y9, graphs=True, graph_cache=cache, **kw)
    assert relerr(got, sample(model, runs[0][1], y9, graphs=False, **kw)) <= 1e-7
    assert cache.stats()["owners"] == 2  # graphs per (depth, batch, caption length)
    # No mask on y: the CFG batch still has one (the null caption's), all ones on y's half: the same session.
    nomask = text_condition(seed=15, mask=False)
    got = sample(model, runs[0][1], nomask, graphs=True, graph_cache=cache, **kw)
    assert relerr(got, sample(model, runs[0][1], nomask, graphs=False, **kw)) <= 1e-7
    assert cache.stats()["owners"] == 2
    sample(model, runs[0][1], nomask, graphs=True, graph_cache=cache, **{**kw, "cfg_scale": 1.0})
    assert cache.stats()["owners"] == 3  # without CFG: no mask buffer, another session


def test_depth_plan_from_schedule_shared_by_both_halves():
    model = TextToy(prediction="flow", seed=16, num_blocks=4)
    schedule = ExitSchedule.from_sigmas({0.7: 1, 0.4: 2, 0.15: 3, 0.0: 4})
    y, noise = text_condition(seed=17), _noise(18)
    got = sample(model, noise, y, sampler="flow_euler", steps=7, shift=3.0, cfg_scale=3.0, schedule=schedule)
    solver = make_solver("flow_euler", 7, shift=3.0)
    sig = solver.sigma_schedule[:-1]
    want_depths = [1 if s >= 0.7 else 2 if s >= 0.4 else 3 if s >= 0.15 else 4 for s in sig.tolist()]
    assert [d for d, _, _ in model.calls] == want_depths
    assert all(tok.shape[0] == 4 for _, _, tok in model.calls)  # one 2B batch per call: both halves, one depth
    want = _by_hand(model, noise, y, "flow_euler", 7, cfg_scale=3.0, schedule=schedule, shift=3.0)
    assert relerr(got, want) <= 1e-6
    assert len(set(want_depths)) == 4


def test_flux_guidance_passes_through_without_cfg():
    model = TextToy(prediction="flow", null=False, guidance=True, seed=19)
    noise = _noise(20)
    a = sample(model, noise, text_condition(seed=21, guidance=3.5), sampler="flow_euler", steps=4, shift=3.0)
    b = sample(model, noise, text_condition(seed=21, guidance=1.0), sampler="flow_euler", steps=4, shift=3.0)
    assert relerr(a, b) > 1e-3  # the guidance value reaches the model
    y = text_condition(seed=21, guidance=3.5)
    assert relerr(a, _by_hand(model, noise, y, "flow_euler", 4, shift=3.0)) <= 1e-6
    assert torch.equal(model.calls[-1][2], y.tokens)
    with pytest.raises(ValueError, match=r"`y.extra` has \['resolution'\], which this model does not take"):
        sample(model, noise, TextCondition(y.tokens, y.mask, y.pooled, {**y.extra, "resolution": torch.ones(2, 2)}),
               sampler="flow_euler", steps=2)


def test_inputs_not_modified_and_float64():
    model = TextToy(prediction="epsilon", seed=22).double()
    y, neg = text_condition(seed=23, dtype=torch.float64), text_condition(seed=24, dtype=torch.float64)
    noise = _noise(25, torch.float64)
    copies = [v.clone() for v in (*y.tensors().values(), *neg.tensors().values(), noise)]
    got = sample(model, noise, y, sampler="dpmsolver++", steps=5, cfg_scale=2.0, negative=neg)
    assert got.dtype == torch.float64
    assert relerr(got, _by_hand(model, noise, y, "dpmsolver++", 5, cfg_scale=2.0, negative=neg)) <= 1e-12
    for a, b in zip(copies, (*y.tensors().values(), *neg.tensors().values(), noise)):
        assert torch.equal(a, b)


def _bad(match, y=None, negative=None, model=None, cfg_scale=2.0, noise=None, **kw):
    model = model or TextToy(seed=26, null=False)
    y = text_condition() if y is None else y
    with pytest.raises(ValueError, match=match):
        sample(model, _noise() if noise is None else noise, y, steps=3, cfg_scale=cfg_scale, negative=negative, **kw)
    assert model.calls == []  # before any model call


def test_bad_conditions_named_before_any_call():
    y = text_condition()
    _bad(r"`y.tokens` expected shape \(2, L >= 1, 6\).*got \(2, 5, 7\)", y=text_condition(token_dim=7))
    _bad(r"`y.tokens` expected shape \(2, L >= 1, 6\).*got \(3, 5, 6\)", y=text_condition(batch=3))
    _bad(r"`y.mask` expected shape \(2, 5\)", y=TextCondition(y.tokens, torch.ones(2, 4, dtype=torch.bool), y.pooled))
    _bad(r"`y.mask` expected a bool, integer or floating 0/1 tensor, got torch.complex64",
         y=TextCondition(y.tokens, torch.ones(2, 5, dtype=torch.complex64), y.pooled))
    _bad(r"`y.tokens` expected a floating tensor, got torch.int64",
         y=TextCondition(y.tokens.long(), y.mask, y.pooled))
    _bad(r"`y.tokens` expected device cpu \(as x\), got meta",
         y=TextCondition(y.tokens.to("meta"), None, y.pooled))
    _bad(r"`y.pooled` expected a floating \(2, 4\) tensor, got \(2, 3\)",
         y=TextCondition(y.tokens, y.mask, torch.randn(2, 3)))
    _bad(r"`y.pooled` expected a floating \(2, 4\) tensor, got NoneType", y=TextCondition(y.tokens, y.mask))
    _bad(r"negative.tokens: expected the caption length of y \(5 tokens; pad both to one length\), got 7",
         negative=text_condition(length=7))
    _bad(r"`negative.tokens` expected shape \(2, L >= 1, 6\)", negative=text_condition(token_dim=5))
    _bad(r"`negative.pooled` expected a floating \(2, 4\)", negative=TextCondition(y.tokens, y.mask))
    _bad(r"negative.tokens: expected dtype torch.float32 \(as y.tokens\), got torch.float64",
         negative=text_condition(dtype=torch.float64))
    _bad(r"`negative.mask` expected shape \(2, 5\)",
         negative=TextCondition(y.tokens, torch.ones(2, 3, dtype=torch.bool), y.pooled))
    _bad(r"`negative.tokens` expected shape .* got \(2, 5, 7\)", negative=text_condition(token_dim=7), cfg_scale=1.0)


def test_condition_kind_mismatches():
    from tests.samplers._toys import ToyModel

    text_model, label_model = TextToy(seed=27), ToyModel()
    noise = _noise()
    with pytest.raises(ValueError, match=r"y: expected an eekernels.TextCondition .* got None"):
        sample(text_model, noise, None, steps=2)
    with pytest.raises(ValueError, match=r"y: expected an eekernels.TextCondition .*, got Tensor"):
        sample(text_model, noise, torch.tensor([0, 1]), steps=2)
    assert text_model.calls == []
    label_model.condition = "label"
    with pytest.raises(ValueError, match=r"y: expected class labels \(B,\) or None for this label-conditioned model"):
        sample(label_model, noise, text_condition(), steps=2)
    with pytest.raises(ValueError, match=r"negative: expected None for class labels"):
        sample(label_model, noise, torch.tensor([0, 1]), steps=2, cfg_scale=2.0, negative=text_condition())
    assert label_model.calls == []


def test_any_callable_takes_a_text_condition():
    """A plain callable (no token_dim declared) gets the condition as given, checked against its own widths."""
    seen = []

    def model(x, t, y, depth=None):
        seen.append(y)
        return x * 0.1 + y.tokens.mean((1, 2))[:, None, None, None]

    y = text_condition(pooled_dim=None, mask=False)
    out = sample(model, torch.randn(*NOISE), y, sampler="flow_euler", steps=3, cfg_scale=2.0,
                 negative=text_condition(seed=3, pooled_dim=None, mask=False))
    assert torch.isfinite(out).all() and seen[0].tokens.shape == (4, 5, 6) and seen[0].mask is None
    with pytest.raises(ValueError, match=r"negative: classifier-free guidance .* has no null_condition\(\)"):
        sample(model, torch.randn(*NOISE), y, sampler="flow_euler", steps=3, cfg_scale=2.0)


def test_graphed_model_with_text_condition():
    model = TextToy(seed=28)
    y = text_condition(seed=29)
    cache = GraphCache(capture=eager_capture())
    g = GraphedModel(model, 2, depths=[None, 2], condition=y, cache=cache, enabled=True)
    x, t = torch.randn(*NOISE), torch.tensor([100.0, 900.0])
    for seed in (30, 31):  # new captions copied into the static buffers
        y2 = text_condition(seed=seed)
        for d in (None, 2):
            assert torch.equal(g(x, t, y2, depth=d), model(x, t, y2, depth=d))
    assert cache.stats()["captures"] == 2
    with pytest.raises(ValueError, match=r"y: expected a TextCondition with the captured fields, shapes"):
        g(x, t, text_condition(length=7))
    with pytest.raises(ValueError, match=r"condition: expected an example eekernels.TextCondition"):
        GraphedModel(model, 2, cache=cache)
    with pytest.raises(ValueError, match=r"condition: expected 2 rows \(batch_size\), got 3"):
        GraphedModel(model, 2, condition=text_condition(batch=3), cache=cache)
    # a None mask is all ones when the buffers hold a mask
    nomask = text_condition(seed=32, mask=False)
    want = model(x, t, TextCondition(nomask.tokens, torch.ones(2, 5, dtype=torch.bool), nomask.pooled))
    assert torch.equal(g(x, t, nomask), want)
