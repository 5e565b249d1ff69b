"""``eekernels finetune``: an existing run is never silently reused, resume keeps its config, bad options, --help."""
import argparse
import json

import pytest
import torch

from eekernels.models import DiT
from eekernels.models.pretrained import load_model_file, save_model_file
from eekernels.jobs import finetune
from eekernels.training import model_kwargs


def parse(argv):
    p = argparse.ArgumentParser()
    finetune.add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture
def base(tmp_path):
    torch.manual_seed(0)
    m = DiT(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=4, num_heads=2, num_classes=10)
    path = tmp_path / "base.pt"
    save_model_file(m, path, "dit", model_kwargs(m), dtype=torch.float32)
    return path


def _args(base, out, *extra):
    return parse(["--checkpoint", str(base), "--out", str(out), "--batch-size", "2", "--log-every", "1",
                  "--no-progress", "--steps", "1", *extra])


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_out_with_a_run_needs_resume_or_overwrite(base, tmp_path):
    out = tmp_path / "ft"
    assert finetune.run(_args(base, out)) == 0
    with pytest.raises(ValueError) as e:
        finetune.run(_args(base, out))
    msg = str(e.value)
    assert str(out) in msg and "--resume" in msg and "--overwrite" in msg
    assert len(_log(out)) == 1
    # a failed --overwrite start (bad --checkpoint) keeps the old run
    with pytest.raises(ValueError, match="--checkpoint"):
        finetune.run(_args(tmp_path / "missing.pt", out, "--overwrite"))
    assert (out / "checkpoint.pt").is_file() and len(_log(out)) == 1
    assert finetune.run(_args(base, out, "--overwrite")) == 0
    assert [r["step"] for r in _log(out)] == [1]  # the old run's lines are gone, not mixed in
    with pytest.raises(ValueError, match="--resume/--overwrite"):
        finetune.run(_args(base, out, "--overwrite", "--resume"))


def test_resume_refuses_a_changed_config_unless_allowed(base, tmp_path, capsys):
    out = tmp_path / "ft"
    assert finetune.run(_args(base, out)) == 0
    with pytest.raises(ValueError) as e:
        finetune.run(_args(base, out, "--resume", "--steps", "2", "--lr", "1e-3", "--schedule", "full"))
    msg = str(e.value)
    assert "lr: 0.0001 -> 0.001" in msg and "schedule:" in msg and "--allow-config-change" in msg
    assert "seed" not in msg and len(_log(out)) == 1
    # --steps (extend), --log-every and --checkpoint-every may change on resume
    assert finetune.run(_args(base, out, "--resume", "--steps", "2", "--log-every", "2")) == 0
    assert [r["step"] for r in _log(out)] == [1, 2]
    capsys.readouterr()
    assert finetune.run(_args(base, out, "--resume", "--steps", "3", "--seed", "5", "--allow-config-change")) == 0
    assert "seed: 0 -> 5" in capsys.readouterr().out
    event = _log(out)[2]
    assert event["event"] == "config-change" and event["changes"] == {"seed": {"old": 0, "new": 5}}
    meta = load_model_file(out / "model.pt").pretrained_meta
    assert meta["provenance"]["config_changes"] == {"seed": {"old": 0, "new": 5}}
    with pytest.raises(ValueError, match="--steps"):  # going back is not a resume
        finetune.run(_args(base, out, "--resume", "--steps", "2", "--seed", "5"))


def test_full_schedule_is_recorded_in_model_meta(base, tmp_path):
    out = tmp_path / "ft"
    assert finetune.run(_args(base, out, "--schedule", "full")) == 0
    meta = load_model_file(out / "model.pt").pretrained_meta
    assert meta["schedule"] == {"preset": "full", "total_depth": 4, "table": None}


def test_sample_auto_runs_a_full_finetune_at_full_depth(base, tmp_path):
    from eekernels.jobs.sample import resolve_schedule

    out = tmp_path / "ft"
    assert finetune.run(_args(base, out, "--schedule", "full")) == 0
    assert resolve_schedule("auto", load_model_file(out / "model.pt")) is None


@pytest.mark.parametrize("option,value", [("--log-every", "0"), ("--log-every", "-1"), ("--steps", "0"),
                                          ("--batch-size", "0"), ("--checkpoint-every", "0"), ("--lr", "0"),
                                          ("--lr", "-1e-4"), ("--lr", "nan"), ("--ema-decay", "-0.1"),
                                          ("--ema-decay", "1.5"), ("--label-dropout", "-0.1"),
                                          ("--label-dropout", "1")])
def test_bad_option_is_refused_before_any_work(tmp_path, option, value):
    out = tmp_path / "ft"
    # a missing --checkpoint: the option must be refused before the model is even looked for
    args = _args(tmp_path / "missing.pt", out, f"{option}={value}")
    with pytest.raises(ValueError) as e:
        finetune.run(args)
    msg = str(e.value)
    assert msg.startswith(option) and "expected" in msg and repr(getattr(args, option[2:].replace("-", "_"))) in msg
    assert not out.exists()


def test_every_option_has_help():
    p = argparse.ArgumentParser()
    finetune.add_arguments(p)
    missing = [a.option_strings[0] for a in p._actions if a.option_strings and not a.help]
    assert missing == []


def test_sample_auto_takes_the_schedule_a_trainer_checkpoint_was_trained_under(base, tmp_path):
    """`eekernels sample --checkpoint OUT/checkpoint.pt --schedule auto` runs the trained schedule (or full depth)."""
    from eekernels.schedules import ExitSchedule

    for spec, expected in (("4,4,3,2", (4, 4, 3, 2)), ("full", None)):
        out = tmp_path / spec.replace(",", "")
        assert finetune.run(_args(base, out, "--schedule", spec)) == 0
        sched = ExitSchedule.from_spec("auto", load_model_file(out / "checkpoint.pt"))
        assert (None if sched is None else sched.table) == expected


def test_the_judge_is_not_a_model_to_finetune(tmp_path):
    with pytest.raises(ValueError, match="--checkpoint: expected a diffusion model"):
        finetune.run(parse(["--checkpoint", "glyph-judge", "--steps", "1", "--out", str(tmp_path / "ft")]))
