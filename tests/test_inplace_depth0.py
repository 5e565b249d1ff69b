"""Depth 0 in place: a reuse call (``exit_policy="cache"`` or ``"forecast"``) that runs no block at all; the first
block's hook adds the whole stack's residual h_L - h_0 (h_0: the first block's input) from the cache or the forecast.

- a pipeline run under a step-indexed plan (full depth every third step, depth 0 between) equals a hand-written
  reference made of torch hooks on the plain model: at full calls it records h_L - h_0 on the image stream; at the
  others it replaces the last block's image stream by h_0 plus the last full call's residual (cache) or the line in
  t through the last two (forecast, written out). PixArt (one block list) and FLUX (double- then single-stream
  blocks); the depth-0 calls run no block (torch hooks on every block's submodules);
- direct calls on FLUX.2 (the single blocks' stream is [text; image]: the residual is taken on its image tokens)
  and LTX-2 (two output streams: both residuals are replayed);
- CUDA graphs in place: a depth-0 call is one more graph (the runner's real code path, an eager stand-in capture);
- refused by name before any block runs: depth 0 with ``exit_policy="drop"``, on a U-Net (levels), on a family with
  always-run blocks; ``at_depth(model, 0)`` bounds.

Tiny random models built from configs, every parameter randomized, float32; nothing is downloaded.
"""
import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

import eekernels
from eekernels import ExitSchedule, families, inplace
from tests.families.harness import BlocksRan, _blocks, _image, output, results
from tests.families.test_flux2 import CASE as FLUX2
from tests.families.test_ltx2 import CASE as LTX2
from tests.models._reference_models import RefUViT, randomize_
from tests.test_calibration_inplace import _case
from tests.test_inplace import LISTS, _EagerGraph, _call, _image_stream, _inputs, _model, _pipeline

PERIOD, STEPS = 3, 8  # full depth at steps 0, 3, 6; depth 0 at 1, 2 (one full call kept: reuse), 4, 5 and 7


class _Reference:
    """Hand-written depth 0, as torch hooks on a plain model: call k (counted by a pre-hook on the model) is full when
    ``k % period == 0``, and records r_k = h_L - h_0 on the image stream (the image tokens of a joint stream) and on
    ``case.second``'s stream; any other call replaces the last block's output streams by h_0 + R, R being the last
    full call's r (``"cache"``) or, with two full calls kept, r1 + (r1 - r0) (t - t1) / (t1 - t0) at the call's
    t = ``t_of(k)`` (``"forecast"``). The blocks still run here; only what the model's head reads is replaced."""

    def __init__(self, case, model, policy, t_of, period=PERIOD):
        self.case, self.policy, self.t_of, self.period = case, policy, t_of, period
        self.k, self.kept = -1, []
        blocks = _blocks(model, case.lists)
        self.handles = [model.register_forward_pre_hook(self._begin),
                        blocks[0].register_forward_pre_hook(self._first, with_kwargs=True),
                        blocks[-1].register_forward_hook(self._last)]

    def _begin(self, module, args):
        self.k += 1

    def _first(self, module, args, kwargs):
        self.h0 = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.a0 = kwargs[self.case.second[0]] if self.case.second is not None else None

    def _reuse(self, i):
        if self.policy == "cache" or len(self.kept) == 1:
            return self.kept[-1][1][i]
        (t0, r0), (t1, r1), t = self.kept[0], self.kept[1], self.t_of(self.k)
        return r1[i] + (r1[i] - r0[i]) * ((t - t1) / (t1 - t0))

    def _last(self, module, args, out):
        img, n = _image(self.case, out), self.h0.shape[1]
        part = img if img.shape == self.h0.shape else self.case.image_part(img, n)
        second = self.case.second[1](out) if self.case.second is not None else None
        if self.k % self.period == 0:
            r = (part - self.h0, None if second is None else second - self.a0)
            self.kept = (self.kept + [(self.t_of(self.k), r)])[-2:]
            return None
        new = self.h0 + self._reuse(0)
        if img.shape != new.shape:  # a joint stream: its image tokens replaced, the text tokens left
            joint = img.clone()
            view = self.case.image_part(joint, n)
            assert view.untyped_storage().data_ptr() == joint.untyped_storage().data_ptr()
            view.copy_(new)
            new = joint
        if isinstance(out, torch.Tensor):
            return new
        return tuple(new if o is img else self.a0 + self._reuse(1) if o is second else o for o in out)


# --------------------------------------------------------------------------------------------------
# A pipeline run: full depth every third step, depth 0 between
# --------------------------------------------------------------------------------------------------
def _run(fam, pipe):
    """The run's final latents, and every model call's output (a torch forward hook on the denoiser)."""
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda mod, args, out: calls.append(output(out).clone()))
    latents = _call(fam, pipe, steps=STEPS, output_type="latent")
    hook.remove()
    return latents, calls


@pytest.mark.parametrize("policy", ("forecast", "cache"))
@pytest.mark.parametrize("fam", ("pixart", "flux"))
def test_depth_0_pipeline_run_equals_a_hand_written_whole_stack_reuse(fam, policy):
    case = dataclasses.replace(_case(fam), image_stream=_image_stream)
    pipe = _pipeline(fam)
    plain = copy.deepcopy(pipe)
    full, _ = _run(fam, plain)
    refs = {}
    for p in ("forecast", "cache"):  # both references: the test also shows that the policies differ
        ref = _Reference(case, plain.transformer, p, lambda k: float(plain.scheduler.timesteps[k]))
        refs[p] = _run(fam, plain)
        assert ref.k == STEPS - 1, "one model call per step expected"
        for h in ref.handles:
            h.remove()
    L = sum(len(getattr(pipe.transformer, n)) for n in case.lists)
    eekernels.accelerate(pipe, schedule=ExitSchedule.periodic(PERIOD, 0, L), exit_policy=policy)
    ctl = inplace.controller(pipe)
    assert (ctl.min_depth, ctl.min_reuse_depth) == (1, 0)
    ran = BlocksRan(case, pipe.transformer)
    got, got_calls = _run(fam, pipe)
    assert ran.depths() == [L if k % PERIOD == 0 else 0 for k in range(STEPS)]
    (want, want_calls), (_, other_calls) = refs[policy], refs["cache" if policy == "forecast" else "forecast"]
    err = max(float((g - w).abs().max()) for g, w in zip(got_calls, want_calls))
    assert len(got_calls) == STEPS and err < 1e-5, f"{fam} {policy}: a call differs from the reference by {err}"
    final_err = float((got - want).abs().max())
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), final_err
    # not by accident: where the policies part (depth 0 after two full calls) the other one's call is far from this
    # one, and depth 0 changed the run
    for k in (4, 5, 7):
        assert float((got_calls[k] - other_calls[k]).abs().max()) > 100 * max(err, 1e-7), k
    assert float((got - full).abs().max()) > 100 * max(final_err, 1e-6)


# --------------------------------------------------------------------------------------------------
# Direct calls: a joint stream (FLUX.2) and two output streams (LTX-2)
# --------------------------------------------------------------------------------------------------
TIMES = (950.0, 800.0, 700.0, 600.0, 350.0)  # calls 0 and 3 full; 1, 2 and 4 at depth 0 (4: forecast by the line)


def _at_t(family, kw, t):
    """``kw`` with its timestep at eekernels' t (the family's unit: FLUX.2 takes sigma = t / 1000)."""
    x = (t - family.timestep_offset) / family.timestep_scale
    return {**kw, "timestep": torch.full_like(kw["timestep"], x, dtype=torch.float32)}


@pytest.mark.parametrize("policy", ("forecast", "cache"))
@pytest.mark.parametrize("case", (FLUX2, LTX2), ids=lambda c: c.name)
def test_depth_0_direct_calls_on_joint_and_two_stream_blocks(case, policy):
    model = case.make_model()
    plain = copy.deepcopy(model)
    family = families.family_of(model)
    calls = [_at_t(family, case.inputs(seed), t) for seed, t in zip(range(1, 6), TIMES)]
    ref = _Reference(case, plain, policy, lambda k: TIMES[k])
    with torch.no_grad():
        want = [results(case, plain(**kw)) for kw in calls]
    L = len(_blocks(model, case.lists))
    eekernels.accelerate(model, schedule=ExitSchedule.periodic(PERIOD, 0, L), exit_policy=policy)
    ran = BlocksRan(case, model)
    with torch.no_grad():
        got = [results(case, model(**kw)) for kw in calls]
    assert ran.depths() == [L, 0, 0, L, 0] and ref.k == 4
    for k, (g, w) in enumerate(zip(got, want)):
        for a, b in zip(g, w):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"{case.name} call {k}: {(a - b).abs().max()}"
    eekernels.disable(model)
    with torch.no_grad():  # not by accident: at the depth-0 calls, every output differs from full depth's
        for k in (1, 2, 4):
            assert all(float((a - b).abs().max()) > 1e-3 for a, b in zip(got[k], results(case, model(**calls[k]))))


# --------------------------------------------------------------------------------------------------
# CUDA graphs: one graph per depth, depth 0 included
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ("forecast", "cache"))
def test_graph_runner_captures_depth_0_as_one_more_graph(policy):
    from eekernels.graphs import GraphCache

    pipe = _pipeline("flux")
    L = sum(len(getattr(pipe.transformer, n)) for n in LISTS["flux"])
    schedule = ExitSchedule.periodic(PERIOD, 0, L)
    eekernels.accelerate(pipe, schedule=schedule, exit_policy=policy, graphs=False)
    want, _ = _run("flux", pipe)
    eekernels.disable(pipe)
    eekernels.accelerate(pipe, schedule=schedule, exit_policy=policy)
    whats = []
    cache = GraphCache(capture=lambda fn, pool, stream: (_EagerGraph(fn), 1000))
    capture = cache.capture

    def named(*args, what=None, **kwargs):
        whats.append(what)
        return capture(*args, what=what, **kwargs)

    cache.capture = named
    inplace.controller(pipe).graphs.cache = cache
    assert torch.equal(_run("flux", pipe)[0], want)
    assert cache.stats()["graphs"] == 2, cache.stats()  # full depth and depth 0
    assert sorted(whats) == sorted([f"FluxTransformer2DModel at depth {L}", "FluxTransformer2DModel at depth 0"])
    captures = cache.stats()["captures"]
    assert torch.equal(_run("flux", pipe)[0], want) and cache.stats()["captures"] == captures  # replayed


# --------------------------------------------------------------------------------------------------
# Refused by name, before any block runs
# --------------------------------------------------------------------------------------------------
def test_depth_0_with_the_drop_policy_is_refused_before_any_block_runs():
    model = _model("pixart")
    before = copy.deepcopy(model.state_dict())
    L = len(model.transformer_blocks)
    zero = ExitSchedule.periodic(2, 0, L)
    with pytest.raises(ValueError, match=r"`schedule` .* expected depths in \[1, 4\], got depth 0: depth 0 runs no "
                                         r"block: only with exit_policy 'cache' or 'forecast', got exit_policy='drop'"):
        eekernels.accelerate(model, schedule=zero, exit_policy="drop")
    assert inplace.controller(model) is None  # nothing attached
    pipe = _pipeline("flux")
    with pytest.raises(ValueError, match="depth 0 runs no block"):
        eekernels.accelerate(pipe, schedule=ExitSchedule.piecewise([5, 0], total_depth=5))
    # set_schedule on a model running drop: refused, and the next calls run the old schedule (full, then depth 1)
    one = ExitSchedule.periodic(2, 1, L)
    eekernels.accelerate(model, schedule=one, exit_policy="drop")
    with pytest.raises(ValueError, match="set_schedule: `schedule` .*depth 0 runs no block"):
        inplace.set_schedule(model, zero)
    assert inplace.controller(model).schedule is one
    ran = BlocksRan(SimpleNamespace(lists=LISTS["pixart"]), model)
    with torch.no_grad():
        model(**_inputs("pixart")), model(**_inputs("pixart"))
    assert ran.depths() == [L, 1]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_depth_0_on_u_net_levels_and_on_always_run_blocks_is_refused_by_name():
    unet = _model("unet")
    L = len(unet.down_blocks)
    for policy in ("cache", "forecast"):
        with pytest.raises(ValueError, match=rf"expected depths in \[1, {L}\], got depth 0: family 'unet' exits by "
                                             "U-Net levels"):
            eekernels.accelerate(unet, schedule=ExitSchedule.periodic(2, 0, L), exit_policy=policy)
    eekernels.accelerate(unet, schedule=ExitSchedule.periodic(2, 1, L), exit_policy="cache")
    assert inplace.controller(unet).min_reuse_depth == 1
    with pytest.raises(ValueError, match=rf"`depth` expected an int in \[1, {L}\] or None, got 0 \(family 'unet'"):
        with inplace.at_depth(unet, 0):
            pass
    # U-ViT (baofff's module): its in blocks and mid block always run, so its fewest blocks stay min_depth
    uvit = randomize_(RefUViT(img_size=8, embed_dim=16, depth=4, num_heads=2, num_classes=11)).eval()
    with pytest.raises(ValueError, match=r"expected depths in \[4, 5\], got depth 0: family 'uvit' always runs its "
                                         "in_blocks, mid_block"):
        eekernels.accelerate(uvit, schedule=ExitSchedule.periodic(2, 0, 5), exit_policy="forecast")
    assert inplace.controller(uvit) is None


@pytest.mark.parametrize("policy", ("drop", "cache", "forecast"))
def test_at_depth_0_bounds(policy):
    model = _model("flux")
    L = 5
    schedule = ExitSchedule.periodic(2, 0 if policy != "drop" else 1, L)
    eekernels.accelerate(model, schedule=schedule, exit_policy=policy)
    lo = 1 if policy == "drop" else 0
    assert inplace.controller(model).min_reuse_depth == lo
    for bad in (-1, L + 1, True, 0.0):
        with pytest.raises(ValueError, match=rf"at_depth: `depth` expected an int in \[{lo}, {L}\] or None"):
            with inplace.at_depth(model, bad):
                pass
    if policy == "drop":
        with pytest.raises(ValueError, match=r"\[1, 5\] or None, got 0 \(depth 0 runs no block: only with "
                                             "exit_policy 'cache' or 'forecast'"):
            with inplace.at_depth(model, 0):
                pass
        return
    kw = _inputs("flux", seed=1)
    ran = BlocksRan(SimpleNamespace(lists=LISTS["flux"]), model)
    with torch.no_grad():
        full = model(**kw).sample  # call 0 of the plan: full depth, recorded
        with inplace.at_depth(model, 0):
            again = model(**kw).sample
    # the same input at depth 0, no block run: h_0 + (h_L - h_0) of this very input gives the full output back
    assert ran.depths() == [L, 0]
    assert torch.allclose(again, full, atol=1e-5), (again - full).abs().max()


@pytest.mark.parametrize("policy", ("drop", "cache", "forecast"))
def test_at_depth_under_a_reuse_policy_takes_the_schedules_depths_only(policy):
    """The exit caches record the schedule's depths only: under cache or forecast another depth has nothing to stand
    in for the skipped blocks, which at_depth says on entry (it said "no value recorded" after the prefix had run);
    drop runs any depth."""
    model = _model("flux")
    eekernels.accelerate(model, schedule=ExitSchedule.periodic(2, 2, 5), exit_policy=policy)
    kw = _inputs("flux", seed=1)
    with torch.no_grad():
        model(**kw)  # full depth, recorded
        if policy == "drop":
            with inplace.at_depth(model, 3):
                model(**kw)
            return
        with pytest.raises(ValueError, match=rf"at_depth: `depth` expected one of the schedule's depths \[2, 5\] or "
                                             rf"None under exit_policy='{policy}' \(its cache records those depths "
                                             r"only\), got 3"):
            with inplace.at_depth(model, 3):
                pass
        with inplace.at_depth(model, 2):
            model(**kw)
