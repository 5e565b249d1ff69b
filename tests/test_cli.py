"""The command line (eekernels/cli.py): help for every option, --version, and bad options as one line + exit 2."""
import argparse
import json

import pytest

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
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--device", "tpu"], "--device"),
]
SHIPPED_BAD = [
    (["sample", "--exit-policy", "cache"], "--exit-policy"),
    (["sample", "--model", "glyph-judge"], "--model"),
    (["finetune", "--checkpoint", "glyph-dit", "--steps", "1", "--log-every", "0"], "--log-every"),
]


@pytest.mark.parametrize("argv, option", BAD + [pytest.param(*c, marks=pytest.mark.skipif(
    not SHIPPED, reason="needs the shipped glyph models in eekernels/pretrained/")) for c in SHIPPED_BAD])
def test_bad_option_is_one_error_line_and_exit_code_2(argv, option, tmp_path, capsys):
    assert cli.main(argv + ["--out" if argv[0] != "bench" else "--json", str(tmp_path / "o")]) == 2
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
def test_under_torchrun_only_rank_0_prints_the_error(rank, printed, monkeypatch, capsys):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["sample", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert ("eekernels sample: error: --steps" in err) == printed and (printed or err == ""), err


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
    monkeypatch.setattr(bench, "run_bench", lambda args: fake)
    monkeypatch.setattr(bench, "format_table", lambda result: "table")
    path = tmp_path / "new" / "b.json"
    argv = ["bench", "--json", str(path), "--device", "cpu"]
    assert cli.main(argv) == 0
    assert json.loads(path.read_text()) == fake
    out = capsys.readouterr().out
    assert f"wrote {path}" in out and "replaced" not in out
    assert cli.main(argv) == 0
    assert "(replaced the file that was there)" in capsys.readouterr().out
