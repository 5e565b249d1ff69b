"""ExitSchedule: t -> depth semantics, fractional t, devices, presets, plans, validation and the schedule file."""
import json

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
    for bad, match in [([-1, 3], r"\[0, total_depth=3\]"), ([4, 2], r"total_depth=3"), ([], "at least one"),
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


def test_depth0_only_for_reuse_on_models_that_can_skip_their_whole_stack():
    """Depth 0 (no block) is a reuse call: the prefix models (``min_reuse_depth`` 0) take it under "cache" or
    "forecast"; under "drop", and on U-ViT (its in_blocks and mid_block always run), it is a named ValueError."""
    with torch.device("meta"):
        dit = DiT(input_size=8, hidden_size=24, depth=12, num_heads=2)
        uvit = UViT(input_size=8, embed_dim=24, depth=12, num_heads=2)
    taylor = ExitSchedule.periodic(3, 0, 12)  # diffusers' TaylorSeer shape: full every 3rd call, no block between
    assert taylor.plan(torch.linspace(999, 0, 7)).tolist() == [12, 0, 0, 12, 0, 0, 12]
    for policy in (None, "cache", "forecast"):
        taylor.validate_for(dit, policy)
    with pytest.raises(ValueError, match=r"goes down to depth 0 but DiT needs at least 1 under exit_policy='drop' "
                                         r"\(depth 0 runs no block"):
        taylor.validate_for(dit, "drop")
    with pytest.raises(ValueError, match="UViT needs at least 7"):
        ExitSchedule.periodic(2, 0, 13).validate_for(uvit, "forecast")
    assert ExitSchedule.piecewise([12, 0, 6]).rescaled(6).table == (6, 0, 3)  # 0 stays 0, others stay >= 1
    with pytest.raises(ValueError, match="'cache' or 'forecast' at every depth-0 bin"):
        ExitSchedule([12, 0], 12, policies=["forecast", "drop"])


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


# ---- flow matching: t = sigma * 1000, schedules by sigma, presets for SD3 / FLUX, files -----------------------------

def _flow_timesteps(steps=28, shift=3.0):
    from eekernels.samplers import make_solver

    return make_solver("flow_euler", steps, shift=shift).timesteps


def test_piecewise_sigma_is_piecewise_over_t():
    s = ExitSchedule.piecewise_sigma([8, 6, 4, 2])
    assert s.table == ExitSchedule.piecewise([8, 6, 4, 2]).table
    sigma = torch.tensor([0.0, 0.2499, 0.25, 0.5, 0.9999, 1.0])
    assert s.depth(sigma * 1000).tolist() == [8, 8, 6, 4, 2, 2]  # sigma 1 (pure noise) in the last bin


def test_from_sigmas_thresholds():
    s = ExitSchedule.from_sigmas({0.7: 12, 0.3: 18, 0.0: 24})
    assert s.total_depth == 24 and s.levels == (24, 18, 12)
    sigma = torch.tensor([0.0, 0.2999, 0.3, 0.55, 0.6999, 0.7, 0.95, 1.0], dtype=torch.float64)
    assert s.depth(sigma * 1000).tolist() == [24, 24, 18, 18, 18, 12, 12, 12]
    same = ExitSchedule.from_sigmas([(0.0, 24), (0.7, 12), (0.3, 18)], total_depth=28)  # pairs, any order
    assert same.table == s.table and same.total_depth == 28
    # on a flow trajectory: the depth of each call is the one of its sigma
    t = _flow_timesteps(10)
    sig = t.double() / 1000
    want = [12 if v >= 0.7 else 18 if v >= 0.3 else 24 for v in sig.tolist()]
    assert s.plan(t).tolist() == want
    for bad, match in [({0.5: 3}, "threshold at sigma 0"), ({}, "with a threshold at 0, got nothing"),
                       ({1.5: 3, 0.0: 4}, r"thresholds expected numbers in \[0, 1\], got 1.5"),
                       ([(0.0,)], r"expected \(sigma, depth\) pairs"), ({0.0: 2.5}, "expected an int"),
                       ({0.30001: 2, 0.3: 3, 0.0: 4}, "expected distinct on the grid of 10000 bins")]:
        with pytest.raises(ValueError, match=match):
            ExitSchedule.from_sigmas(bad)
    with pytest.raises(ValueError, match=r"total_depth=4"):
        ExitSchedule.from_sigmas({0.0: 6}, total_depth=4)


def test_flow_presets_spend_the_dit_reference_block_fraction():
    """ase-sd3 (24 blocks) and ase-flux (19 + 38 = 57 blocks) under SD3's 28-step shift-3 flow schedule spend
    exactly 20/28 (0.714) of the full model's block evaluations: what ase-dit-xl spends over uniform t."""
    ref = ExitSchedule.preset("ase-dit-xl").block_flop_fraction(torch.arange(1000.0))
    assert ref == pytest.approx(20 / 28, abs=1e-12)
    t = _flow_timesteps(28, 3.0)
    for name, L in (("ase-sd3", 24), ("ase-flux", 57)):
        s = ExitSchedule.preset(name)
        assert s.total_depth == L and s.name == name and s.table[0] == L  # full depth at the data end
        assert list(s.table) == sorted(s.table, reverse=True)  # shallower toward noise, as ASE
        assert s.block_flop_fraction(t) == pytest.approx(20 / 28, abs=1e-12)
        assert sum(s.plan(t).tolist()) == 20 * L
        # the DiT shape as is would spend far less under this schedule (most steps sit at high sigma)
        assert ExitSchedule.preset("ase-demo", L).block_flop_fraction(t) < 0.62
        r = ExitSchedule.preset(name, total_depth=12)
        assert r.total_depth == 12 and 0.66 <= r.block_flop_fraction(t) <= 0.76
        assert ExitSchedule.preset(name, total_depth=L).table == s.table
    assert ExitSchedule.preset("ase-sd3").table == (24, 24, 24, 24, 20, 20, 20, 17, 15, 11)
    assert ExitSchedule.preset("ase-flux").table == (57, 57, 57, 57, 57, 46, 46, 41, 33, 26)


class _Model:
    def __init__(self, num_blocks, min_depth=1):
        self.num_blocks, self.min_depth = num_blocks, min_depth


def test_auto_is_the_recorded_schedule_else_full_depth():
    """``auto`` never truncates a model that was not fine-tuned for early exit: without a recorded schedule it is
    full depth (it was ase-demo, which silently cost such models quality); a recorded one is kept."""
    bare = _Model(8)
    assert ExitSchedule.from_spec("auto", bare) is None and ExitSchedule.recorded(bare) is None
    for meta in ({}, {"schedule": None}, {"schedule": {}}, {"sampling": {"steps": 4}}):
        bare.pretrained_meta = meta
        assert ExitSchedule.from_spec("auto", bare) is None and ExitSchedule.recorded(bare) is None, meta
    tuned = _Model(8)
    tuned.pretrained_meta = {"schedule": {"preset": "ase-demo", "total_depth": 8}}
    assert ExitSchedule.from_spec("auto", tuned).table == ExitSchedule.preset("ase-demo", 8).table
    tuned.pretrained_meta = {"schedule": {"preset": "mine", "table": [8, 6, 4, 2]}}  # the table it was tuned with
    assert ExitSchedule.from_spec("auto", tuned).table == (8, 6, 4, 2)
    tuned.pretrained_meta = {"schedule": {"preset": "full", "table": None}}  # a full-depth fine-tune
    assert ExitSchedule.recorded(tuned) is not None and ExitSchedule.from_spec("auto", tuned) is None
    tuned.pretrained_meta = {"schedule": {"preset": "mine"}}
    with pytest.raises(ValueError, match="--schedule auto: the model records schedule 'mine'"):
        ExitSchedule.from_spec("auto", tuned, option="--schedule")


@pytest.mark.parametrize("sched", [ExitSchedule.piecewise(list(REF)), ExitSchedule.periodic(3, 10, 28),
                                   ExitSchedule.periodic(2, 0, 28), ExitSchedule.piecewise([28, 0, 14]),
                                   ExitSchedule.from_sigmas({0.6: 5, 0.0: 9}, total_depth=12),
                                   ExitSchedule.linear(3, 9, num_timesteps=500)])
def test_save_load_round_trip(tmp_path, sched):
    path = sched.save(tmp_path / "sub" / "s.json")
    back = ExitSchedule.load(path)
    assert (back.table, back.total_depth, back.num_timesteps, back.period, back.name) == (
        sched.table, sched.total_depth, sched.num_timesteps, sched.period, sched.name)
    calls = torch.linspace(999, 0, 17)
    assert torch.equal(back.plan(calls), sched.plan(calls))
    doc = json.loads(path.read_text())
    assert doc["format"] == "eekernels.ExitSchedule" and doc["version"] == 1


# A calibrated schedule file in the layout eekernels.calibration.save_schedule wrote before the format had one owner
# (no "period" key; ExitSchedule.save wrote the same keys plus "period"), as a literal: the reader must keep it.
OLD_FILE = {
    "format": "eekernels.ExitSchedule", "version": 1, "table": [4] * 167 + [3] * 333 + [2] * 500, "total_depth": 4,
    "num_timesteps": 1000, "name": "calibrated(drop, ddim 3, budget 0.75)",
    "calibration": {
        "exit_policy": "drop", "sampler": "ddim", "steps": 3, "cfg_scale": 1.0, "budget": 0.75, "num_blocks": 4,
        "candidates": [1, 2, 3, 4], "call_timesteps": [667.0, 334.0, 1.0], "weights": [0.05, 0.2, 0.6],
        "plan": [2, 3, 4], "proxy": 0.11, "block_flop_fraction": 0.75, "measure": "calls", "num_samples": 3,
        "model_calls": 12, "block_evaluations": 7.5, "seconds": 0.01, "trajectory_seconds": 0.002,
        "reference_seconds": None, "max_reuse": None, "data_std": 0.5, "solver_options": {}, "validation": None,
        "errors": [[0.9, 0.6, 0.3, 0.0], [1.2, 0.8, 0.4, 0.0], [1.5, 1.0, 0.5, 0.0]], "depth_costs": None,
        "cost_fraction": 0.75, "select": "proxy", "selection": None},
}


def _write(tmp_path, doc, name="s.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("layout", ["calibration.save_schedule", "ExitSchedule.save", "older report"])
def test_files_of_the_earlier_writers_load_with_their_report(tmp_path, layout):
    """Both earlier writers' layouts (and a report from before the optional fields) load, with the report as
    ``schedule.calibration`` (the one attribute), and save again to the same document."""
    from eekernels.schedules import CalibrationReport

    doc = json.loads(json.dumps(OLD_FILE))
    if layout == "ExitSchedule.save":
        doc["period"] = None
    elif layout == "older report":
        for k in ("depth_costs", "cost_fraction", "select", "selection"):
            del doc["calibration"][k]
    s = ExitSchedule.load(_write(tmp_path, doc))
    assert s.table == tuple(OLD_FILE["table"]) and s.name == OLD_FILE["name"] and s.period is None
    assert isinstance(s.calibration, CalibrationReport) and not hasattr(s, "calibration_data")
    assert s.calibration.plan == [2, 3, 4] and s.calibration.errors == OLD_FILE["calibration"]["errors"]
    again = json.loads(s.save(tmp_path / "again.json").read_text())
    assert {k: v for k, v in again.items() if k not in ("period", "calibration")} == \
        {k: v for k, v in doc.items() if k not in ("period", "calibration")}
    assert {k: v for k, v in again["calibration"].items() if k in doc["calibration"]} == doc["calibration"]
    assert ExitSchedule.load(tmp_path / "again.json").calibration == s.calibration


def test_from_spec_reads_calibrated_files(tmp_path):
    path = _write(tmp_path, OLD_FILE, "cal.json")
    got = ExitSchedule.from_spec(f"calibrated:{path}", _Model(4))
    assert got.table == tuple(OLD_FILE["table"]) and got.calibration.budget == 0.75
    with pytest.raises(ValueError, match=r"goes to depth 4 but _Model has 3 blocks"):
        ExitSchedule.from_spec(f"calibrated:{path}", _Model(3))
    with pytest.raises(ValueError, match=r"--schedule: expected 'calibrated:FILE'"):
        ExitSchedule.from_spec("calibrated:", _Model(4), option="--schedule")
    with pytest.raises(ValueError, match=r"no such file"):
        ExitSchedule.from_spec(f"calibrated:{tmp_path / 'missing.json'}", _Model(4))
    assert ExitSchedule.from_spec("ase-sd3", _Model(24)).table == ExitSchedule.preset("ase-sd3").table


def _edit(path: str, value):
    """OLD_FILE with the field at ``path`` ("calibration.plan", "table") set to ``value`` (DELETE: removed)."""
    doc = json.loads(json.dumps(OLD_FILE))
    *parents, last = path.split(".")
    node = doc
    for k in parents:
        node = node[k]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


DELETE = object()
BAD_FILES = [  # (field, value, message): every field of the file, each refused by name
    ("format", "other", r"`format` expected 'eekernels.ExitSchedule', got 'other'"),
    ("version", 2, r"`version` expected 1"),
    ("version", DELETE, r"`version` expected \(a required key\), got nothing"),
    ("table", DELETE, r"`table` expected \(a required key\)"),
    ("total_depth", DELETE, r"`total_depth` expected \(a required key\)"),
    ("num_timesteps", DELETE, r"`num_timesteps` expected \(a required key\)"),
    ("name", DELETE, r"`name` expected \(a required key\)"),
    ("extra", 1, r"`extra` is not a key of the eekernels.ExitSchedule format"),
    ("table", [4] * 400_000, r"`table` expected a list of 1 to 10000 depths \(10 bins per timestep, num_timesteps "
                             r"1000\), got 400000 entries"),
    ("table", [], r"`table` expected a list of 1 to 10000 depths"),
    ("table", {"0": 4}, r"`table` expected a list"),
    ("table", [4, 2.5], r"`table\[1\]` expected an integer depth, got 2.5"),
    ("table", [4, True], r"`table\[1\]` expected an integer depth, got True"),
    ("table", [4, -1], r"`table\[1\]` expected a depth in \[0, total_depth=4\], got -1"),
    ("table", [5], r"`table\[0\]` expected a depth in \[0, total_depth=4\], got 5"),
    ("total_depth", 0, r"`total_depth` expected a positive integer"),
    ("total_depth", 10**30, r"`total_depth` expected a positive integer <= 100000"),
    ("num_timesteps", -5, r"`num_timesteps` expected a positive integer <= 100000"),
    ("num_timesteps", 1.5, r"`num_timesteps` expected a positive integer"),
    ("period", 2, r"`table` expected \[full, truncated\] for a step-indexed schedule \(period 2\)"),
    ("period", 0, r"`period` expected a positive integer or null"),
    ("name", 7, r"`name` expected a string or null, got 7"),
    ("calibration", [1], r"`calibration` expected a JSON object \(a calibration report\) or null, got list"),
    ("calibration.plan", DELETE, r"`calibration.plan` expected \(a required key\), got nothing"),
    ("calibration.weights", DELETE, r"`calibration.weights` expected \(a required key\)"),
    ("calibration.surprise", 1, r"`calibration.surprise` is not a field of a calibration report"),
    ("calibration.exit_policy", "skip", r"`calibration.exit_policy` expected 'drop' or 'cache', got 'skip'"),
    ("calibration.sampler", "", r"`calibration.sampler` expected a sampler name"),
    ("calibration.steps", 0, r"`calibration.steps` expected an integer >= 1"),
    ("calibration.cfg_scale", float("nan"), r"`calibration.cfg_scale` expected a finite number, got nan"),
    ("calibration.budget", 1.5, r"`calibration.budget` expected a fraction in \(0, 1\]"),
    ("calibration.num_blocks", 5, r"`calibration.num_blocks` expected the schedule's total_depth 4, got 5"),
    ("calibration.candidates", [1, 2, 5], r"`calibration.candidates\[2\]` expected a depth in \[0, 4\], got 5"),
    ("calibration.candidates", [2, 1, 4], r"`calibration.candidates` expected increasing depths ending at num_blocks"),
    ("calibration.candidates", [1, 2], r"`calibration.candidates` expected increasing depths ending at num_blocks 4"),
    ("calibration.call_timesteps", [], r"`calibration.call_timesteps` expected a list of 1 or more entries, got 0"),
    ("calibration.call_timesteps", [667.0, "x", 1.0], r"`calibration.call_timesteps\[1\]` expected a finite timestep"),
    ("calibration.weights", [0.1, 0.2], r"`calibration.weights` expected a list of 3 entries, got 2 entries"),
    ("calibration.weights", [0.1, -0.2, 0.3], r"`calibration.weights\[1\]` expected a finite weight >= 0"),
    ("calibration.plan", [2, 3, 4, 4], r"`calibration.plan` expected a list of 3 entries, got 4 entries"),
    ("calibration.plan", [2, 7, 4], r"`calibration.plan\[1\]` expected a candidate depth \[1, 2, 3, 4\], got 7"),
    ("calibration.proxy", -1, r"`calibration.proxy` expected a number >= 0"),
    ("calibration.block_flop_fraction", 0, r"`calibration.block_flop_fraction` expected a fraction in \(0, 1\]"),
    ("calibration.measure", "auto", r"`calibration.measure` expected 'prefix' or 'calls'"),
    ("calibration.num_samples", 0, r"`calibration.num_samples` expected an integer >= 1"),
    ("calibration.model_calls", -1, r"`calibration.model_calls` expected an integer >= 0"),
    ("calibration.block_evaluations", None, r"`calibration.block_evaluations` expected a finite number >= 0"),
    ("calibration.seconds", float("inf"), r"`calibration.seconds` expected a finite number >= 0"),
    ("calibration.trajectory_seconds", "1", r"`calibration.trajectory_seconds` expected a finite number >= 0"),
    ("calibration.reference_seconds", -1, r"`calibration.reference_seconds` expected a finite number >= 0 or null"),
    ("calibration.max_reuse", 4, r"`calibration.max_reuse` expected an integer >= 1 for exit_policy 'cache', null"),
    ("calibration.data_std", 0, r"`calibration.data_std` expected a finite number > 0 or null"),
    ("calibration.solver_options", [], r"`calibration.solver_options` expected a JSON object of solver options"),
    ("calibration.validation", 3, r"`calibration.validation` expected a JSON object or null"),
    ("calibration.validation", {"plans": []}, r"`calibration.validation.plans` expected a list of 1 or more"),
    ("calibration.cost_fraction", 2.0, r"`calibration.cost_fraction` expected a fraction in \(0, 1\] or null"),
    ("calibration.select", "best", r"`calibration.select` expected 'proxy' or 'closed-loop'"),
    ("calibration.errors", [[0.9, 0.6, 0.3, 0.0]] * 2, r"`calibration.errors` expected a list of 3 entries"),
    ("calibration.errors", [[0.9, 0.6, 0.3]] * 3, r"`calibration.errors\[0\]` expected a list of 4 finite errors"),
    ("calibration.errors", [[0.9, 0.6, -0.3, 0.0]] * 3, r"`calibration.errors\[0\]` expected a list of 4 finite"),
    ("calibration.depth_costs", [1, 2, 3], r"`calibration.depth_costs` expected a list of 4 entries"),
    ("calibration.depth_costs", [1, 2, 0, 4], r"`calibration.depth_costs\[2\]` expected an integer cost >= 1 \(depth 3"),
    ("calibration.depth_costs", [1, 2, -1, 4], r"`calibration.depth_costs\[2\]` expected an integer cost >= 0"),
    ("calibration.selection", [{"plan": [2, 3], "proxy": 0.1, "real": 0.2}], r"`calibration.selection\[0\]` expected"),
]


@pytest.mark.parametrize("field,value,match", BAD_FILES,
                         ids=[f"{f}={'DELETE' if v is DELETE else str(v)[:20]}" for f, v, _ in BAD_FILES])
def test_every_field_of_a_loaded_file_is_checked(tmp_path, field, value, match):
    """Each malformed field: a ValueError naming the file and the field (400,000-entry tables and files missing
    fields were accepted before)."""
    path = _write(tmp_path, _edit(field, value))
    with pytest.raises(ValueError, match=match) as e:
        ExitSchedule.load(path)
    assert str(e.value).startswith(f"ExitSchedule.load({str(path)!r}): ")


def test_cache_reports_are_checked_per_reuse_pair(tmp_path):
    doc = _edit("calibration.exit_policy", "cache")
    doc["calibration"]["max_reuse"] = 2
    row = [0.9, 0.6, 0.3, 0.0]
    doc["calibration"]["errors"] = [[None, row, row], [None, None, row], [None, None, None]]
    assert ExitSchedule.load(_write(tmp_path, doc)).calibration.max_reuse == 2
    doc["calibration"]["errors"][0][1] = [0.9]
    with pytest.raises(ValueError, match=r"`calibration.errors\[0\]` expected a list of 3 entries, each null or 4"):
        ExitSchedule.load(_write(tmp_path, doc))


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from eekernels import schedules

    path = _write(tmp_path, OLD_FILE)
    monkeypatch.setattr(schedules, "MAX_FILE_BYTES", path.stat().st_size - 1)
    monkeypatch.setattr(schedules.json, "loads", lambda *a, **k: pytest.fail("the file was parsed"))
    with pytest.raises(ValueError, match=r"`path` expected a schedule file of at most \d+ bytes, got \d+ bytes "
                                         r"\(not read\)"):
        ExitSchedule.load(path)


@pytest.mark.parametrize("text,match", [
    ("not json {", r"expected a JSON schedule file"),
    ("[1, 2]", r"expected a JSON object with keys format, version, table, .*, got list"),
    ("[" * 100_000 + "]" * 100_000, r"expected a JSON schedule file, got .* \(nested too deeply\)"),
    (b"\xff\xfe{}", r"expected a JSON schedule file"),
])
def test_load_malformed_files(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=match):
        ExitSchedule.load(path)


def test_save_writes_only_what_load_reads(tmp_path):
    big = ExitSchedule.from_sigmas({0.5: 2, 0.0: 4}, resolution=20_000)  # 20 bins per timestep
    with pytest.raises(ValueError, match=r"ExitSchedule.save\(.*\): `table` expected a list of 1 to 10000 depths"):
        big.save(tmp_path / "big.json")
    assert not (tmp_path / "big.json").exists()


def test_load_and_save_bad_paths(tmp_path):
    with pytest.raises(ValueError, match=r"ExitSchedule.load: `path` expected a schedule file, got .* \(no such file\)"):
        ExitSchedule.load(tmp_path / "nope.json")
    with pytest.raises(ValueError, match=r"ExitSchedule.save: `path` expected a file name, got the directory"):
        ExitSchedule.piecewise([2, 1]).save(tmp_path)
