"""python/distill_exit_glyphs.py: the teacher's pool, the student trained through its plan, the schedule it records,
exact resumption, and refusals before any work."""
import json
import sys
from pathlib import Path

import pytest
import torch

from eekernels.models import DiT
from eekernels.models.pretrained import load_model_file, save_model_file
from eekernels.samplers import make_solver, sample
from eekernels.schedules import ExitSchedule
from eekernels.training import model_kwargs
from eekernels.training.trajectory import rollout

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

TINY = dict(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=3, num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill_exit")
    torch.manual_seed(0)
    teacher = DiT(**TINY)
    for p in teacher.parameters():  # not the zero-initialised output layer: an eps that depends on x, t, y, depth
        torch.nn.init.normal_(p, std=0.05)
    save_model_file(teacher, d / "teacher.pt", "dit", model_kwargs(teacher))
    other = DiT(**{**TINY, "hidden_size": 16})
    save_model_file(other, d / "other.pt", "dit", model_kwargs(other))
    return d


def _run(files, out, *extra, plan="1,2,3,2,3"):
    import distill_exit_glyphs

    return distill_exit_glyphs.main(["--teacher", str(files / "teacher.pt"), "--init", str(files / "teacher.pt"),
                                     "--plan", plan, "--out", str(out), "--quick", "--device", "cpu", *extra])


def test_quick_end_to_end_records_its_plan_and_resumes_exactly(files, tmp_path):
    record = _run(files, tmp_path / "a", "--steps", "6")
    teacher = load_model_file(files / "teacher.pt")
    # the pool: the teacher's full-depth DPM-Solver++ 5-step samples (CFG 1.5) of seeded noise, label i % 10
    chunk = torch.load(tmp_path / "a" / "pool" / "00001.pt")
    assert chunk["labels"].tolist() == [8, 9, 0, 1, 2, 3, 4, 5]
    with torch.no_grad():
        again = sample(teacher, chunk["noise"], chunk["labels"], sampler="dpmsolver++", steps=5, cfg_scale=1.5)
    torch.testing.assert_close(chunk["images"], again)

    student = load_model_file(tmp_path / "a" / "glyph-dit-ase-dpm5.pt")
    meta = student.pretrained_meta
    sched = ExitSchedule.piecewise(meta["schedule"]["table"], total_depth=3)
    assert sched.plan(make_solver("dpmsolver++", 5).timesteps).tolist() == [1, 2, 3, 2, 3]
    assert ExitSchedule.recorded(student)["table"] == meta["schedule"]["table"]
    assert meta["sampling"] == {**meta["sampling"], "sampler": "dpmsolver++", "steps": 5, "cfg_scale": 1.5}
    assert record["steps"] == 6 and len(record["loss_curve"]) == 6
    assert record["block_flop_fraction"] == pytest.approx(11 / 15, abs=1e-4)
    assert not torch.equal(student.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight.half().float())

    # Interrupted at step 3 (a checkpoint every 2 steps at quick size: the last one is written at the stop), then
    # rerun with 6 steps: the same weights as the uninterrupted run, to the bit.
    _run(files, tmp_path / "b", "--steps", "3")
    (tmp_path / "b" / "pool" / "00000.pt").unlink()  # a lost chunk is made again, the same
    more = _run(files, tmp_path / "b", "--steps", "6")
    assert more["steps"] == 6 and more["pool"]["chunks_made"] == 1
    resumed = load_model_file(tmp_path / "b" / "glyph-dit-ase-dpm5.pt")
    for (k, v), w in zip(student.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k
    assert json.loads((tmp_path / "b" / "PROVENANCE-glyph-dit-ase-dpm5.json").read_text())["glyph-dit-ase-dpm5"][
        "loss_curve"] == record["loss_curve"]
    # --weights student at the step reached: no step taken, the file holds the student's own weights, not the EMA's
    own = _run(files, tmp_path / "b", "--steps", "6", "--weights", "student")
    assert own["steps"] == 6 and own["weights"] == "student" and own["loss_curve"] == record["loss_curve"]
    raw = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["student"]
    written = load_model_file(tmp_path / "b" / "glyph-dit-ase-dpm5.pt").state_dict()
    assert all(torch.equal(written[k], v.half().float()) or torch.equal(written[k], v)  # pos_embed: kept in float32
               for k, v in raw.items() if k in written)
    assert not all(torch.equal(written[k], v) for k, v in resumed.state_dict().items())


def test_the_loss_is_the_plans_rollout_against_the_pool(files, tmp_path):
    """One step at lr 0: the logged loss is the MSE of the student's rollout under the plan to the teacher's image."""
    record = _run(files, tmp_path, "--steps", "1", "--lr", "1e-30", "--batch", "16", "--pool", "16")
    import distill_exit_glyphs

    teacher = load_model_file(files / "teacher.pt")
    pool = [torch.load(tmp_path / "pool" / f"0000{k}.pt") for k in (0, 1)]
    noise, labels = torch.cat([c["noise"] for c in pool]), torch.cat([c["labels"] for c in pool])
    images = torch.cat([c["images"] for c in pool])
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 16, (16,), generator=gen)
    sched = distill_exit_glyphs.plan_schedule([1, 2, 3, 2, 3], "dpmsolver++", 5, 3)
    with torch.no_grad():
        x = rollout(teacher, noise[idx], labels[idx], sampler="dpmsolver++", steps=5, cfg_scale=1.5, schedule=sched)
    assert record["loss_curve"][0] == pytest.approx((x - images[idx]).pow(2).mean().item(), rel=1e-4)


def test_uncond_drop_trains_the_guided_output_and_records_the_plan(files, tmp_path):
    """--uncond: the calls it names run the conditional half alone; the file records those modes, --schedule auto
    reads them back, and the logged loss is that plan's rollout (lr 0) against the teacher's CFG samples."""
    import distill_exit_glyphs

    record = _run(files, tmp_path, "--steps", "1", "--lr", "1e-30", "--batch", "16", "--pool", "16",
                  "--uncond", "run,drop,drop,drop,drop", plan="3,3,3,2,3")
    ts = make_solver("dpmsolver++", 5).timesteps
    student = load_model_file(tmp_path / "glyph-dit-ase-dpm5.pt")
    auto = ExitSchedule.from_spec("auto", student)
    assert auto.uncond_modes(ts) == ["run", "drop", "drop", "drop", "drop"]
    assert auto.plan(ts).tolist() == [3, 3, 3, 2, 3]
    assert record["block_flop_fraction"] == pytest.approx((3 + (3 + 3 + 2 + 3) / 2) / 15, abs=1e-4)
    assert record["uncond"] == ["run", "drop", "drop", "drop", "drop"]

    teacher = load_model_file(files / "teacher.pt")
    pool = [torch.load(tmp_path / "pool" / f"0000{k}.pt") for k in (0, 1)]
    noise, labels = torch.cat([c["noise"] for c in pool]), torch.cat([c["labels"] for c in pool])
    images = torch.cat([c["images"] for c in pool])
    idx = torch.randint(0, 16, (16,), generator=torch.Generator().manual_seed(1))
    sched = distill_exit_glyphs.plan_schedule([3, 3, 3, 2, 3], "dpmsolver++", 5, 3,
                                              ["run", "drop", "drop", "drop", "drop"])
    with torch.no_grad():
        x = rollout(teacher, noise[idx], labels[idx], sampler="dpmsolver++", steps=5, cfg_scale=1.5, schedule=sched)
        plain = rollout(teacher, noise[idx], labels[idx], sampler="dpmsolver++", steps=5, cfg_scale=1.5,
                        schedule=distill_exit_glyphs.plan_schedule([3, 3, 3, 2, 3], "dpmsolver++", 5, 3))
    assert record["loss_curve"][0] == pytest.approx((x - images[idx]).pow(2).mean().item(), rel=1e-4)
    assert (x - plain).abs().max() > 1e-4  # the dropped halves changed the run
    for bad, match in (("run,drop", "--uncond: expected 'run' or 'drop' per call, as many as --plan's 5"),
                       ("run,drop,skip,drop,drop", "--uncond: expected 'run' or 'drop' per call")):
        with pytest.raises(ValueError, match=match):
            _run(files, tmp_path / "c", "--uncond", bad)
    with pytest.raises(ValueError, match="--uncond: 'drop' drops CFG's unconditional half; expected --cfg-scale != 1"):
        _run(files, tmp_path / "c", "--uncond", "run,drop,drop,drop,drop", "--cfg-scale", "1")
    assert not (tmp_path / "c").exists()


def test_refusals_before_any_work(files, tmp_path):
    _run(files, tmp_path / "a", "--steps", "1")
    with pytest.raises(ValueError, match="--out: .* other settings .*lr"):
        _run(files, tmp_path / "a", "--lr", "3e-4")
    with pytest.raises(ValueError, match=r"--plan: expected 5 depths \(one per call of dpmsolver\+\+ at 5 steps\)"):
        _run(files, tmp_path / "b", plan="1,2,3")
    with pytest.raises(ValueError, match=r"--plan: expected depths in \[1, 3\]"):
        _run(files, tmp_path / "b", plan="1,2,3,4,3")
    with pytest.raises(ValueError, match="--plan: expected comma-separated block counts"):
        _run(files, tmp_path / "b", plan="1,two")
    with pytest.raises(ValueError, match="--sampler: expected a deterministic solver"):
        _run(files, tmp_path / "b", "--sampler", "ddpm")
    with pytest.raises(ValueError, match="--sampler: expected an epsilon solver"):
        _run(files, tmp_path / "b", "--sampler", "flow_euler")
    with pytest.raises(ValueError, match="--lr: expected a finite number > 0"):
        _run(files, tmp_path / "b", "--lr", "0")
    with pytest.raises(ValueError, match="--minutes: expected a finite number >= 0"):
        _run(files, tmp_path / "b", "--minutes", "nan")
    with pytest.raises(ValueError, match="--ema: expected a decay in"):
        _run(files, tmp_path / "b", "--ema", "1")
    import distill_exit_glyphs

    with pytest.raises(ValueError, match="--init: expected the teacher's architecture"):
        distill_exit_glyphs.main(["--teacher", str(files / "teacher.pt"), "--init", str(files / "other.pt"),
                                  "--plan", "1,2,3,2,3", "--out", str(tmp_path / "b"), "--quick"])
    assert not (tmp_path / "b").exists()
