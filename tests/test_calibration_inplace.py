"""``eekernels.calibrate(pipe, inputs=...)``: calibration under a diffusers pipeline's own loop, by calls.

On the seven original pipelines (DiT, DDPM, DDIM, PixArt-α/Σ, SD3, FLUX), tiny random models, float32:
- the family harness's check: the schedule meets the budget, ``accelerate(pipe, schedule=...)`` then runs exactly the
  plan's depths, the file round-trips, the pipeline is left plain;
- closed loop: the kept plan's final latents (read here by our own tap on ``scheduler.step``, through
  ``accelerate``) are no farther from full depth's than the constant-depth plan of the same budget;
- the measured errors equal the model with its block lists sliced by hand, on each call's recorded inputs;
- the scheduler weights equal the update coefficients written out for DDIM and flow-matching Euler;
- an accelerated pipeline keeps its schedule, a plain one stays bit-identical, inputs are not modified;
- bad inputs are refused by name before any model call.
"""
import copy
import math

import pytest
import torch

import diffusers
import eekernels
from eekernels import ExitSchedule, inplace
from eekernels.pipeline_calibration import scheduler_weights
from tests.families.harness import Case, calibrates_on_the_pipeline, run_input
from tests.test_accelerate_text import call_kwargs
from tests.test_inplace import LISTS, PIPELINES, _call, _inputs, _model, _pipeline, _sliced

STEPS = 3


def _denoiser(name):
    return "unet" if name in ("ddpm", "ddim") else "transformer"


def _family(name):
    return {"ddpm": "unet", "ddim": "unet", "pixart-sigma": "pixart"}.get(name, name)


def calibration_kwargs(name, seed=0, steps=STEPS, **extra):
    """The pipeline's call kwargs of one calibration sample (a seeded generator of its own)."""
    g = torch.Generator().manual_seed(100 + seed)
    if name == "dit":
        kw = dict(class_labels=[seed % 3, 1], num_inference_steps=steps, generator=g)
    elif name in ("ddpm", "ddim"):
        kw = dict(batch_size=2, num_inference_steps=steps, generator=g)
    else:
        kw = call_kwargs(_family(name), steps=steps, seed=seed, generator=g)
        kw.pop("output_type")
    kw.update(extra)
    return kw


def _case(name):
    fam = _family(name)
    return Case(name=name, make_pipeline=lambda: _pipeline(name), call=None,
                make_model=lambda: _model(fam), inputs=lambda s: _inputs(fam, seed=s), lists=LISTS.get(fam, ()),
                denoiser=_denoiser(name), calibration=lambda s: calibration_kwargs(name, s))


@pytest.mark.parametrize("name", PIPELINES)
def test_calibrates_on_the_pipeline(name):
    calibrates_on_the_pipeline(_case(name))


@pytest.mark.parametrize("name", ("dit", "flux"))
def test_calibrates_on_a_case_that_gives_only_its_call(name):
    # a family Case of tests/families gives `call(pipe, seed)` (a seeded run), not calibration kwargs
    case = _case(name)
    case.calibration, case.call = None, lambda pipe, seed: _call(name, pipe, steps=STEPS, seed=seed)
    calibrates_on_the_pipeline(case)


class _Finals:
    """Our own tap on ``scheduler.step``: the last step's output of a run (the final latents)."""

    def __init__(self, scheduler):
        self.last = None
        step = scheduler.step

        def tapped(*args, **kwargs):
            out = step(*args, **kwargs)
            self.last = (out.prev_sample if hasattr(out, "prev_sample") else out[0]).double().clone()
            return out

        scheduler.step = tapped


def _finals(pipe, inputs, schedule):
    """Final latents of every input through ``accelerate(pipe, schedule=...)`` (None: plain)."""
    if schedule is not None:
        eekernels.accelerate(pipe, schedule=schedule)
    tap = _Finals(pipe.scheduler)
    out = []
    for i, kw in enumerate(inputs):
        run_input(pipe, dict(kw, output_type="latent"), seed=i)
        out.append(tap.last)
    del pipe.scheduler.__dict__["step"]
    if schedule is not None:
        eekernels.disable(pipe)
    return torch.cat([x.reshape(-1) for x in out])


@pytest.mark.parametrize("name", PIPELINES)
def test_closed_loop_is_no_worse_than_the_naive_plan_of_the_budget(name):
    pipe = _pipeline(name)
    inputs = [calibration_kwargs(name, s) for s in (0, 1)]
    states = [kw["generator"].get_state() for kw in inputs]
    sched = eekernels.calibrate(pipe, inputs=inputs, budget=0.7)
    rep = sched.calibration
    L, n = rep.num_blocks, len(rep.plan)
    naive = max(d for d in range(1, L + 1) if d * n <= 0.7 * L * n)
    for kw, st in zip(inputs, states):
        kw["generator"].set_state(st)
    full = _finals(pipe, inputs, None)
    rms = {}
    for label, s in (("calibrated", sched), ("naive", ExitSchedule([naive], L))):
        for kw, st in zip(inputs, states):
            kw["generator"].set_state(st)
        rms[label] = float((_finals(pipe, inputs, s) - full).square().mean().sqrt())
    assert rms["calibrated"] <= rms["naive"] * (1 + 1e-9) + 1e-12, rms
    kept = min(rep.selection, key=lambda r: (r["real"], sum(r["plan"])))
    assert kept["plan"] == rep.plan and math.isclose(kept["real"], rms["calibrated"], rel_tol=1e-6, abs_tol=1e-12)
    assert sum(rep.plan) <= 0.7 * L * n


def _recorded_calls(pipe, denoiser, kw):
    """The kwargs of every call of the plain pipeline's denoiser (positional arguments by name)."""
    import inspect

    model = getattr(pipe, denoiser)
    names = list(inspect.signature(type(model).forward).parameters)[1:]
    seen = []

    def pre(mod, args, kwargs):
        seen.append({**dict(zip(names, args)), **kwargs})

    h = model.register_forward_pre_hook(pre, with_kwargs=True)
    run_input(pipe, dict(kw, output_type="latent"))
    h.remove()
    return seen


@pytest.mark.parametrize("name,extra", [("dit", {}), ("sd3", {}),
                                        ("flux", {"true_cfg_scale": 2.0, "negative_prompt_embeds": "same",
                                                  "negative_pooled_prompt_embeds": "same"})],
                         ids=("dit", "sd3", "flux-true-cfg"))
def test_errors_are_the_model_sliced_by_hand_on_each_calls_inputs(name, extra):
    pipe = _pipeline(name)
    kw = calibration_kwargs(name)
    for key, v in extra.items():  # FLUX true CFG: a negative caption (two model calls per step)
        kw[key] = torch.randn_like(kw[key.replace("negative_", "")]) if v == "same" else v
    state = kw["generator"].get_state()
    sched = eekernels.calibrate(pipe, inputs=[kw], budget=0.7, select="proxy")
    rep = sched.calibration
    kw["generator"].set_state(state)
    plain = getattr(pipe, "transformer")
    calls = _recorded_calls(pipe, "transformer", kw)
    assert len(calls) == len(rep.errors) == len(rep.call_timesteps)
    if name == "flux":
        assert len(calls) == 2 * STEPS and all(rep.plan[2 * j] == rep.plan[2 * j + 1] for j in range(STEPS))
    channels = 4 if name == "dit" else None  # DiT: the scheduler takes the eps half of the learned-sigma output
    for k, call in enumerate(calls):
        call = dict(call, return_dict=False)
        with torch.no_grad():
            full = plain(**call)[0][:, :channels]
            for i, d in enumerate(rep.candidates):
                got = _sliced(plain, LISTS[_family(name)], d)(**call)[0][:, :channels]
                want = float((got.double() - full.double()).square().mean().sqrt())
                assert math.isclose(rep.errors[k][i], want, rel_tol=1e-6, abs_tol=1e-9), (k, d, rep.errors[k][i], want)


def test_model_calls_and_blocks_are_counted():
    pipe = _pipeline("dit")
    sched = eekernels.calibrate(pipe, inputs=[calibration_kwargs("dit", s) for s in (0, 1)], budget=0.7,
                                time_reference=True)
    rep = sched.calibration
    n, L, C, S = len(rep.plan), rep.num_blocks, len(rep.candidates), rep.num_samples
    runs = len(rep.selection)
    assert rep.model_calls == S * n * C + runs * S * n  # one full + one per other candidate; a run per plan
    assert math.isclose(rep.block_evaluations, S * n * (1 + sum(d / L for d in rep.candidates[:-1]))
                        + S * sum(sum(r["plan"]) for r in rep.selection) / L, rel_tol=1e-6)
    assert rep.reference_seconds > 0 and rep.seconds > 0


def _ddim_coefficients(sched):
    ac = sched.alphas_cumprod.double()
    ts = [int(t) for t in sched.timesteps]
    step = sched.config.num_train_timesteps // sched.num_inference_steps
    a, b = [], []
    for t in ts:
        prev = ac[t - step] if t - step >= 0 else sched.final_alpha_cumprod.double()
        a.append(float((prev / ac[t]).sqrt()))
        b.append(float((1 - prev).sqrt() - (prev / ac[t]).sqrt() * (1 - ac[t]).sqrt()))
    return a, b


def test_scheduler_weights_are_the_update_coefficients():
    # flow matching Euler: x_{j+1} = x_j + (sigma_{j+1} - sigma_j) v_j, so step = final = |sigma_{j+1} - sigma_j|
    fm = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    fm.set_timesteps(5)
    rec = [{"model_output": ((4, 2, 2), torch.float32, torch.device("cpu")),
            "sample": ((4, 2, 2), torch.float32, torch.device("cpu")), "timestep": t, "return_dict": False}
           for t in fm.timesteps]
    w = scheduler_weights(copy.deepcopy(fm), rec)
    want = [abs(float(fm.sigmas[j + 1] - fm.sigmas[j])) for j in range(5)]
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(w["step"], want)), (w, want)
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(w["final"], want))
    # DDIM (eta 0): x_{j+1} = a_j x_j + b_j eps_j; step = |b_j|, final = |b_j| * prod_{i > j} a_i
    dd = diffusers.DDIMScheduler()
    dd.set_timesteps(4)
    rec = [dict(r, timestep=t) for r, t in zip(rec, dd.timesteps)]
    w = scheduler_weights(copy.deepcopy(dd), rec, delta=1e-5)
    a, b = _ddim_coefficients(dd)
    for j in range(4):
        assert math.isclose(w["step"][j], abs(b[j]), rel_tol=1e-3), (j, w["step"][j], b[j])
        assert math.isclose(w["final"][j], abs(b[j]) * math.prod(a[j + 1:]), rel_tol=1e-3)


@pytest.mark.parametrize("name", ("ddim", "sd3"))
def test_the_pipeline_is_left_as_given(name):
    # plain: still plain and bit-identical; the inputs (and their generators) are not modified
    pipe = _pipeline(name)
    kw = calibration_kwargs(name)
    before = {k: (v.get_state() if isinstance(v, torch.Generator) else v.clone() if isinstance(v, torch.Tensor)
                  else v) for k, v in kw.items()}
    ref = run_input(pipe, dict(kw, generator=torch.Generator().manual_seed(5), output_type="np")).images
    eekernels.calibrate(pipe, inputs=[kw], budget=0.7)
    for k, v in kw.items():
        b = before[k]
        same = (torch.equal(v.get_state(), b) if isinstance(v, torch.Generator)
                else torch.equal(v, b) if isinstance(v, torch.Tensor) else v == b)
        assert same, f"input {k} was modified"
    model = getattr(pipe, _denoiser(name))
    assert inplace.controller(model) is None and not getattr(model, "_forward_hooks", None)
    got = run_input(pipe, dict(kw, generator=torch.Generator().manual_seed(5), output_type="np")).images
    assert (got == ref).all()
    # accelerated: keeps its schedule object afterwards
    L = 2 if name == "ddim" else 3
    mine = ExitSchedule.piecewise([L] * 5 + [1] * 5)
    eekernels.accelerate(pipe, schedule=mine)
    eekernels.calibrate(pipe, inputs=[kw], budget=0.7, select="proxy")
    assert inplace.controller(model).schedule is mine
    assert "progress_bar" in vars(pipe)


def test_flop_costs_on_the_unet_levels():
    pipe = _pipeline("ddim")
    sched = eekernels.calibrate(pipe, inputs=[calibration_kwargs("ddim")], budget=0.7, depth_costs="flops")
    rep = sched.calibration
    assert rep.depth_costs[-1] == 256 and 0 < rep.depth_costs[0] < 256  # COST_UNITS per full call
    costs = dict(zip(rep.candidates, rep.depth_costs))
    assert sum(costs[d] for d in rep.plan) <= 0.7 * 256 * len(rep.plan)
    assert math.isclose(rep.cost_fraction, sum(costs[d] for d in rep.plan) / (256 * len(rep.plan)))


def _bad(label, **changes):
    pipe = _pipeline("dit")
    kw = dict(inputs=[calibration_kwargs("dit")], budget=0.7)
    kw.update(changes)
    return pipe, kw


BAD = [
    ("inputs", dict(inputs=[])),
    ("inputs", dict(inputs={"class_labels": [0]})),
    ("inputs[0]", dict(inputs=[3])),
    ("inputs", dict(inputs=[calibration_kwargs("dit", steps=2), calibration_kwargs("dit", steps=3)])),
    ("budget", dict(budget=1.5)),
    ("exit_policy", dict(exit_policy="cache")),
    ("select", dict(select="best")),
    ("denoiser", dict(denoiser="unet")),
    ("candidates", dict(candidates=[0, 2])),
    ("steps", dict(steps=4)),
    ("noises", dict(noises=torch.randn(1, 4, 8, 8))),
    ("measure", dict(measure="prefix")),
    ("depth_costs", dict(depth_costs="time")),
    ("depth_costs", dict(depth_costs={1: 1.0})),
    ("progress", dict(progress=True)),
    ("name", dict(name=3)),
    ("objective", dict(objective="rms")),
    ("objective", dict(objective=lambda x, r: 0.0, select="proxy")),
]


@pytest.mark.parametrize("names,changes", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_inputs_are_refused_by_name_before_any_model_call(names, changes):
    pipe, kw = _bad(names, **changes)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=names.replace("[", r"\[").replace("]", r"\]")):
        eekernels.calibrate(pipe, **kw)
    assert not calls, "the model ran before the refusal"
    assert inplace.controller(pipe.transformer) is None


def test_an_unreproducible_input_and_a_cache_pipeline_are_refused():
    pipe = _pipeline("dit")
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"inputs\[0\]: .*not reproducible"):
        eekernels.calibrate(pipe, inputs=[lambda p: p(class_labels=[0, 1], num_inference_steps=2, generator=gen)])
    assert inplace.controller(pipe.transformer) is None
    eekernels.accelerate(pipe, schedule=ExitSchedule.periodic(2, 2, 4), exit_policy="cache")
    with pytest.raises(ValueError, match="pipe: .*exit_policy='cache'"):
        eekernels.calibrate(pipe, inputs=[calibration_kwargs("dit")])
    assert inplace.controller(pipe.transformer).schedule.period == 2
    with pytest.raises(ValueError, match="inputs: only a diffusers pipeline"):
        eekernels.calibrate(pipe.transformer, inputs=[{}], noises=torch.randn(1, 4, 8, 8))


def test_set_schedule_changes_the_plan_and_a_refused_one_changes_nothing():
    pipe = _pipeline("dit")
    eekernels.accelerate(pipe)
    ctl = inplace.controller(pipe)
    with pytest.raises(ValueError, match="set_schedule: expected a model or pipeline accelerated"):
        inplace.set_schedule(_model("dit"), None)
    with pytest.raises(ValueError, match="rescaled"):  # deeper than the model: refused, nothing changed
        inplace.set_schedule(pipe, ExitSchedule.full(9))
    assert ctl.schedule is None
    inplace.set_schedule(pipe, ExitSchedule([2], 4))
    seen, begin = [], ctl.begin
    ctl.begin = lambda t: (begin(t), seen.append(ctl.depth))
    run_input(pipe, calibration_kwargs("dit"))
    assert seen == [2] * STEPS
    inplace.set_schedule(pipe.transformer, None)
    seen.clear()
    run_input(pipe, calibration_kwargs("dit"))
    assert seen == [None] * STEPS


def test_a_pipeline_of_no_registered_family_and_model_only_arguments_are_refused_by_name():
    class Mine(diffusers.DiffusionPipeline):
        def __init__(self, net, scheduler):
            super().__init__()
            self.register_modules(net=net, scheduler=scheduler)

    pipe = Mine(torch.nn.Linear(2, 2), diffusers.DDIMScheduler())
    with pytest.raises(ValueError, match="model: expected an eekernels model or a diffusers pipeline of a registered"):
        eekernels.calibrate(pipe, inputs=[{}])
    with pytest.raises(ValueError, match="denoiser: only a diffusers pipeline"):
        eekernels.calibrate(_model("dit"), denoiser="transformer", noises=torch.randn(1, 4, 8, 8))


def test_the_closed_loop_ranks_by_the_objective():
    """An objective preferring the plan FARTHEST from full depth flips the kept plan; it gets every run's final latents
    as one batch and full depth's beside them; one returning NaN is refused by name after the measurement run, the
    pipeline left as given."""
    pipe = _pipeline("dit")
    inputs = lambda: [calibration_kwargs("dit", s) for s in (0, 1)]  # noqa: E731
    plain = eekernels.calibrate(pipe, inputs=inputs(), budget=0.6).calibration
    shapes = []

    def far(latents, reference):
        shapes.append((tuple(latents.shape), tuple(reference.shape)))
        return -float((latents - reference).square().mean().sqrt())

    flipped = eekernels.calibrate(pipe, inputs=inputs(), budget=0.6, objective=far).calibration
    assert plain.objective == "rms" and flipped.objective == "far" and len(plain.selection) >= 2
    assert len(shapes) == 1 + len(flipped.selection) and len(set(shapes)) == 1 and shapes[0][0][0] % 2 == 0  # 2 runs
    want = {tuple(r["plan"]): -r["real"] for r in plain.selection}
    assert {tuple(r["plan"]): r["real"] for r in flipped.selection} == pytest.approx(want, rel=1e-6)
    assert tuple(flipped.plan) == min(want, key=lambda p: (want[p], sum(p))) and flipped.plan != plain.plan
    with pytest.raises(ValueError, match=r"objective: expected <lambda>\(samples, reference\) to return a finite "
                                         r"number, got nan"):
        eekernels.calibrate(pipe, inputs=inputs(), budget=0.6, objective=lambda x, r: float("nan"))
    assert inplace.controller(pipe.transformer) is None
