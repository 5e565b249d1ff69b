"""The command line (eekernels/cli.py): help for every option, --version, and bad options as one line + exit 2."""
import argparse
import json

import pytest
import torch

from eekernels import __version__, cli
from eekernels.eval import bench
from eekernels.models.pretrained import pretrained_names

SHIPPED = {"glyph-dit", "glyph-dit-ase", "glyph-judge"} <= set(pretrained_names())


def subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_of_every_subcommand_has_help_and_shows_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no wrapping inside the defaults
    parser = cli.build_parser()
    commands = subparsers(parser)
    assert set(commands) == set(cli.COMMANDS)
    missing = [f"{name} {a.option_strings}" for name, p in commands.items() for a in p._actions
               if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, f"options without help: {missing}"
    for name, p in commands.items():
        assert p.formatter_class is argparse.ArgumentDefaultsHelpFormatter, name
        assert "--help" in p.format_help(), name  # every help renders (a stray % in a help string would raise)
    text = commands["sample"].format_help()
    assert "(default: glyph-dit-ase)" in text and "(default: 5)" in text
    assert "default: the model's own" in text and "else 20" in text  # --steps: a few-step model records its own


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"eekernels {__version__}"


BAD = [
    (["sample", "--schedule", "periodic:3"], "--schedule"),
    (["sample", "--schedule", "12,x"], "--schedule"),
    (["sample", "--steps", "0"], "--steps"),
    (["sample", "--num-images", "0"], "--num-images"),
    (["sample", "--repeats", "0"], "--repeats"),
    (["sample", "--cfg-channels", "0"], "--cfg-channels"),
    (["sample", "--sampler", "plms"], "--sampler"),
    (["sample", "--model", "no-such-model"], "--model"),
    (["sample", "--cfg-scale", "nan"], "--cfg-scale"),
    (["sample", "--checkpoint", "no-such-file.pt"], "--checkpoint"),
    (["sample", "--device", "tpu"], "--device"),
    (["sample", "--vae", "/no/such/dir"], "--vae"),
    (["sample", "--out", "FILE"], "--out"),
    (["sample", "--num-images", "5000000"], "--num-images"),
    (["sample", "--seed", str(2**64)], "--seed"),
    (["sample", "--num-heads", "0"], "--num-heads"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--device", "tpu"], "--device"),
    (["bench", "--model", "no-such-model"], "--model"),
    (["bench", "--sampler", "plms"], "--sampler"),
    (["bench", "--cfg", "nan"], "--cfg"),
    (["bench", "--json", "FILE/x.json"], "--json"),
    (["bench", "--model", "DiT-S/2", "--image-size", "100"], "--image-size"),
    (["bench", "--schedule", "full"], "--schedule"),
    (["finetune", "--checkpoint", "glyph-dit", "--steps", "1", "--out", "FILE"], "--out"),
    (["finetune", "--checkpoint", "glyph-dit", "--steps", "1", "--device", "tpu"], "--device"),
]
SHIPPED_BAD = [
    (["sample", "--exit-policy", "cache"], "--exit-policy"),
    (["sample", "--schedule", "periodic:2:0", "--exit-policy", "cache", "--forecast-target", "blocks"],
     "--forecast-target"),
    (["sample", "--schedule", "periodic:2:0", "--exit-policy", "drop"], "--schedule"),
    (["sample", "--model", "glyph-judge"], "--model"),
    (["sample", "--cfg-channels", "4"], "--cfg-channels"),
    (["bench", "--model", "glyph-judge"], "--model"),
    (["finetune", "--checkpoint", "glyph-dit", "--steps", "1", "--log-every", "0"], "--log-every"),
]


def _forbidden(*args, **kwargs):
    raise AssertionError("sampled before the options were checked")


@pytest.mark.parametrize("argv, option", BAD + [pytest.param(*c, marks=pytest.mark.skipif(
    not SHIPPED, reason="needs the shipped glyph models in eekernels/pretrained/")) for c in SHIPPED_BAD])
def test_bad_option_is_one_error_line_and_exit_code_2(argv, option, tmp_path, capsys, monkeypatch):
    import eekernels.samplers

    monkeypatch.setattr(eekernels.samplers, "sample", _forbidden)  # sampling before the refusal fails the test
    (tmp_path / "FILE").write_text("a file, not a folder")
    argv = [str(tmp_path / a) if a.startswith("FILE") else a for a in argv]
    if "--out" not in argv and argv[0] != "bench":
        argv += ["--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"eekernels {argv[0]}: error: {option}"), err


def test_other_errors_keep_their_traceback(monkeypatch):
    """Only the input-error types are turned into one line: a bug (here a RuntimeError) still raises."""
    from eekernels.jobs import sample

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(sample, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["sample"])


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_under_torchrun_only_rank_0_prints_the_error_and_hands_it_to_the_launcher(rank, printed, monkeypatch,
                                                                                  capsys, tmp_path):
    import time

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.setattr(time, "sleep", lambda s: None)  # the quiet rank's wait for torchrun to stop it
    assert cli.main(["sample", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert ("eekernels sample: error: --steps" in err) == printed and (printed or err == ""), err
    if printed:  # torchrun's failure report shows this message as the root cause
        record = json.loads((tmp_path / "error.json").read_text())["message"]
        assert record["message"] == record["extraInfo"]["py_callstack"] == err.strip()
    else:
        assert not (tmp_path / "error.json").exists()


# --------------------------------------------------------------------------------------------------
# eekernels bench: progress bar, JSON path and overwrite notice (the benchmark itself is stubbed: fast)
# --------------------------------------------------------------------------------------------------
def test_bench_progress_bar_goes_to_stderr_and_can_be_turned_off(capsys):
    import torch

    fns = {"a": lambda: torch.zeros(1), "b": lambda: torch.ones(1)}
    out = bench.time_interleaved(fns, 2, torch.device("cpu"), progress=True)
    assert [len(out[k][0]) for k in fns] == [2, 2]
    captured = capsys.readouterr()
    assert "eekernels bench" in captured.err and "6/6" in captured.err and captured.out == ""
    bench.time_interleaved(fns, 2, torch.device("cpu"), progress=False)
    assert capsys.readouterr().err == ""
    args = cli.build_parser().parse_args(["bench", "--no-progress"])
    assert args.no_progress is True


def test_bench_json_goes_where_asked_and_an_overwrite_is_stated(tmp_path, monkeypatch, capsys):
    fake = {"info": {}, "rows": [], "ratios": {"x": 1.0}}
    monkeypatch.setattr(bench, "build", lambda args: None)
    monkeypatch.setattr(bench, "run_bench", lambda args, built: fake)
    monkeypatch.setattr(bench, "format_table", lambda result: "table")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--device", "cpu"]) == 0
    assert list(tmp_path.iterdir()) == []  # no JSON unless asked (no bench_sampling.json in the working folder)
    path = tmp_path / "new" / "b.json"
    argv = ["bench", "--json", str(path), "--device", "cpu"]
    assert cli.main(argv) == 0
    assert json.loads(path.read_text()) == fake
    out = capsys.readouterr().out
    assert f"wrote {path}" in out and "replaced" not in out
    assert cli.main(argv) == 0
    assert "(replaced the file that was there)" in capsys.readouterr().out


@pytest.mark.skipif(not SHIPPED, reason="needs the shipped glyph models in eekernels/pretrained/")
@pytest.mark.parametrize("name", ["glyph-dit-ase", "glyph-dit"])
def test_bench_takes_the_shipped_models_with_their_weights_and_schedule(name):
    from eekernels.models.pretrained import load_pretrained
    from eekernels.schedules import ExitSchedule

    args = cli.build_parser().parse_args(["bench", "--model", name, "--device", "cpu", "--batch", "2", "--steps",
                                          "2", "--repeats", "1", "--no-progress"])
    model, schedule, noise, labels, _, _ = bench.build(args)
    shipped = load_pretrained(name)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), shipped.state_dict().values()))
    # the schedule the model records (glyph-dit-ase); glyph-dit records none, so auto is full depth and bench,
    # which needs an exit schedule, takes the preset for its depth
    recorded = ExitSchedule.from_spec("auto", shipped)
    assert (recorded is None) == (name == "glyph-dit")
    assert schedule.table == (recorded or ExitSchedule.preset("ase-demo", shipped.num_blocks)).table
    if recorded is None:
        auto = cli.build_parser().parse_args(["bench", "--model", name, "--device", "cpu", "--schedule", "auto"])
        with pytest.raises(ValueError, match="'auto' \\(glyph-dit records no exit schedule, so auto is full depth"):
            bench.build(auto)
    assert noise.shape == (2, 3, 32, 32) and labels.max() < 10
    result = bench.run_bench(args, (model, schedule, noise, labels, torch.device("cpu"), torch.float32))
    assert result["info"]["model"]["blocks"] == shipped.num_blocks


def test_nan_weights_are_one_error_line_before_sampling(tmp_path, capsys, monkeypatch):
    import eekernels.samplers
    from eekernels.models import DiT
    from eekernels.models.pretrained import save_model_file
    from eekernels.training import model_kwargs

    m = DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():
        m.final_layer.linear.weight.fill_(float("inf"))
    save_model_file(m, tmp_path / "inf.pt", "dit", model_kwargs(m))
    monkeypatch.setattr(eekernels.samplers, "sample", _forbidden)
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "inf.pt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("eekernels sample: error: --checkpoint: expected finite"), err
