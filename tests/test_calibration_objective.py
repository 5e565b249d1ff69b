"""``calibrate(..., objective=...)``: what the closed loop ranks sampled plans by (default: RMS of the final samples to
full depth's), in the joint search and under ``select="closed-loop"``; ``eval.fidelity.frechet_to``, the Fréchet
objective against held-out reference images; and the named errors, raised before any model call."""
import math

import pytest
import torch

from eekernels import calibration as C
from eekernels.eval.fidelity import frechet_to
from eekernels.eval.judge import frechet_distance
from eekernels.samplers import sample
from eekernels.schedules import ExitSchedule

from test_joint_plans import KW, depth_wins, forecast_wins


def rms(x, ref):
    return float((x.double() - ref.double()).square().mean().sqrt())


def far_from_full(samples, reference):
    """An objective that prefers the plan whose samples are FARTHEST from full depth's: it must flip the choice."""
    return -rms(samples, reference)


def test_the_joint_search_ranks_by_the_objective_and_the_plan_is_the_objectives_best(tmp_path):
    m = depth_wins()
    seen = []

    def traced(samples, reference):
        seen.append((samples.shape, reference.shape))
        return far_from_full(samples, reference)

    default = C.calibrate(m, search="steps,policy", **KW)
    sched = C.calibrate(m, search="steps,policy", objective=traced, **KW)
    d, j = default.calibration.joint, sched.calibration.joint
    assert default.calibration.objective == "rms" and sched.calibration.objective == "traced"
    assert seen[0] == (KW["noises"].shape, KW["noises"].shape)  # the check on (noises, noises), before sampling
    assert len(seen) == 1 + len(j["alternatives"])  # then one call per sampled alternative (the baseline included)
    # the same alternatives, each scored by its objective: the opposite of RMS to full depth
    by_name = {r["name"]: r["real"] for r in d["alternatives"]}
    assert {r["name"]: -r["real"] for r in j["alternatives"]} == pytest.approx(by_name, rel=1e-9)
    chosen = next(r for r in j["alternatives"] if r["name"] == j["chosen"])
    assert chosen["real"] == min(r["real"] for r in j["alternatives"]) and j["chosen"] != d["chosen"]
    # the returned plan is the one scored: sampled again, the objective gives the row's value
    full = sample(m, KW["noises"], sampler="dpmsolver++", steps=8)
    assert far_from_full(sample(m, KW["noises"], schedule=sched), full) == pytest.approx(chosen["real"], rel=1e-6)
    # the baseline comparison is the objective's too: fewer steps are nearer full depth, so "far" beats it
    base = next(r for r in j["alternatives"] if r["policy"] == "full")
    assert j["beats_baseline"] is (chosen["real"] < base["real"])
    lines = C.describe_joint(sched.calibration)
    assert "objective traced (lower is better)" in lines[0] and "RMS" not in "".join(lines)
    back = ExitSchedule.load(sched.save(tmp_path / "objective.json"))
    assert back.calibration.objective == "traced" and back.calibration.joint == j


def test_the_forecast_search_passes_the_objective_and_none_is_rms():
    m = forecast_wins()
    kw = {**KW, "steps": 10, "budget": 0.6}
    a = C.calibrate(m, exit_policy="forecast", **kw)
    b = C.calibrate(m, exit_policy="forecast", objective=rms, **kw)  # RMS written by hand: the same choice and values
    assert b.calibration.objective == "rms" and a.calibration.objective == "rms"
    assert [r["real"] for r in a.calibration.joint["alternatives"]] == pytest.approx(
        [r["real"] for r in b.calibration.joint["alternatives"]], rel=1e-12)
    assert a.calibration.joint["chosen"] == b.calibration.joint["chosen"] and a.table == b.table


def test_closed_loop_selection_ranks_by_the_objective():
    m = depth_wins()
    kw = {**KW, "budget": 0.5}
    plain = C.calibrate(m, exit_policy="cache", select="closed-loop", **kw).calibration
    flipped = C.calibrate(m, exit_policy="cache", select="closed-loop", objective=far_from_full, **kw).calibration
    assert plain.objective == "rms" and flipped.objective == "far_from_full"
    assert len(plain.selection) >= 2  # more than one candidate, so the ranking can differ
    want = {tuple(r["plan"]): -r["real"] for r in plain.selection}
    assert {tuple(r["plan"]): r["real"] for r in flipped.selection} == pytest.approx(want, rel=1e-9)
    assert tuple(flipped.plan) == min(want, key=lambda p: (want[p], sum(p)))
    assert tuple(plain.plan) == min(want, key=lambda p: (-want[p], sum(p)))


class Counting(torch.nn.Module):
    """Counts its forwards: a bad objective must be refused before the first."""

    def __init__(self):
        super().__init__()
        self.num_blocks, self.min_depth, self.in_channels, self.out_channels = 4, 1, 1, 1
        self.num_classes = self.null_class = None
        self.learn_sigma = False

    def forward(self, *a, **k):
        raise AssertionError("a model call before the objective was checked")


@pytest.mark.parametrize("objective, match", [
    ("rms", r"objective: expected None \(RMS to full depth\) or a callable \(samples, reference\) -> float, got str"),
    (lambda x, r: float("nan"),
     r"objective: expected <lambda>\(samples, reference\) to return a finite number, got nan"),
    (lambda x, r: "far", r"objective: expected <lambda>\(samples, reference\) to return a finite number, got 'far'"),
    (lambda x, r: torch.ones(2), r"to return a finite number, got tensor\(\[1., 1.\]\)"),
    (lambda x, r: True, r"to return a finite number, got True"),
    (lambda x, r: math.inf, r"to return a finite number, got inf"),
])
def test_a_bad_objective_is_named_before_any_model_call(objective, match):
    with pytest.raises(ValueError, match=match):
        C.calibrate(Counting(), search="steps,policy", objective=objective, **KW)


def test_an_objective_without_a_closed_loop_is_refused_by_name():
    with pytest.raises(ValueError, match=r"objective: ranks the plans a closed loop samples; expected "
                       r"select='closed-loop', a search, or exit_policy='forecast' with it, got select='proxy'"):
        C.calibrate(Counting(), exit_policy="cache", objective=rms, **KW)


def test_a_tensor_objective_of_one_element_is_taken():
    m = depth_wins()
    sched = C.calibrate(m, search="steps,policy", objective=lambda x, r: (x - r).abs().mean(), **KW)
    assert all(isinstance(r["real"], float) for r in sched.calibration.joint["alternatives"])


def test_frechet_to_is_the_frechet_distance_of_the_features_to_the_reference_images():
    g = torch.Generator().manual_seed(3)
    real = torch.randn(7, 2, 3, 3, generator=g, dtype=torch.float64)
    proj = torch.randn(18, 5, generator=g, dtype=torch.float64)
    calls = []

    def features(x):
        calls.append(x.shape[0])
        return torch.tanh(x.reshape(x.shape[0], -1) @ proj.to(x.dtype))

    obj = frechet_to(features, real, batch_size=3)
    assert calls == [3, 3, 1]  # the reference features, once, in batches
    x = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    want = frechet_distance(features(x).double(), features(real).double())
    calls.clear()
    assert obj(x, torch.zeros_like(x)) == pytest.approx(want, rel=1e-9)  # full depth's samples are not used
    assert obj(x, x) == pytest.approx(want, rel=1e-9)
    assert obj.__name__ == "frechet" and obj(real, None) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(features=None), r"frechet_to: `features` expected a callable images -> \(N, F\) features, got NoneType"),
    (dict(real=torch.zeros(1, 2, 3, 3)), r"frechet_to: `real` expected a tensor of N >= 2 reference images, got "
                                         r"\(1, 2, 3, 3\)"),
    (dict(real=[1, 2]), r"frechet_to: `real` expected a tensor of N >= 2 reference images, got list"),
    (dict(batch_size=0), r"frechet_to: `batch_size` expected a positive int, got 0"),
    (dict(features=lambda x: x.reshape(-1)), r"frechet_to: features\(real\): `a` expected features \(N >= 2, F\)"),
])
def test_frechet_to_names_its_bad_inputs(kwargs, match):
    args = dict(features=lambda x: x.reshape(x.shape[0], -1), real=torch.randn(4, 2, 3, 3), batch_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        frechet_to(args.pop("features"), args.pop("real"), **args)


def test_frechet_to_names_samples_of_another_feature_size():
    obj = frechet_to(lambda x: x.reshape(x.shape[0], -1), torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"frechet_to: features\(samples\): `b` expected 18 features \(as a\), got 8"):
        obj(torch.randn(4, 2, 2, 2), None)
    # a pipeline whose runs' latents differ in shape passes them as a list: named, not an AttributeError
    with pytest.raises(ValueError, match=r"frechet_to: samples expected a tensor of images \(N, ...\), got list"):
        obj([torch.randn(2, 2, 3, 3), torch.randn(2, 2, 4, 4)], None)


def test_a_schedule_file_names_a_bad_objective(tmp_path):
    m = depth_wins()
    doc = C.calibrate(m, search="steps,policy", **KW).to_dict()
    for bad in (3, "", "x" * 201):
        doc["calibration"]["objective"] = bad
        with pytest.raises(ValueError, match=r"`calibration.objective` expected a name \(1 to 200 characters\)"):
            ExitSchedule.from_dict(doc)
    del doc["calibration"]["objective"]  # files written before it: "rms"
    assert ExitSchedule.from_dict(doc).calibration.objective == "rms"
