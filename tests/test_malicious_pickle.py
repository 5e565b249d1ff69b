"""No loader runs code from a checkpoint: a pickle whose ``__reduce__`` would create a marker file, in every
file format each loader or CLI path accepts, is refused (ValueError, or a nonzero exit code naming the file and
the global) and the marker never appears."""
import argparse
import os
import pathlib
import pickle

import pytest
import torch

from eekernels.cli import main
from eekernels.models import DiT, UViT
from eekernels.models.pretrained import FORMAT, load_model_file, save_model_file
from eekernels.training import TrainConfig, Trainer, model_kwargs


class Touch:
    """Unpickling this creates ``marker`` (``pathlib.Path.touch(marker)``)."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class System:
    """Unpickling this runs a shell command that creates ``marker`` (``os.system``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _dit():
    torch.manual_seed(0)
    return DiT(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def _write(fmt: str, path: pathlib.Path, evil) -> pathlib.Path:
    """``evil`` inside a file of format ``fmt``."""
    m = _dit()
    sd = m.state_dict()
    if fmt == "state_dict":
        torch.save({**sd, "blocks.0.attn.qkv.weight": evil}, path)
    elif fmt == "trainer":
        torch.save({"model": sd, "ema": sd, "opt": {"state": {}, "param_groups": []}, "step": 1,
                    "config": {"steps": 1}, "history": [], "rng": {"cpu": evil}, "model_kwargs": model_kwargs(m)},
                   path)
    elif fmt == "train_py":
        torch.save({"model": sd, "ema": sd, "opt": {"state": {}, "param_groups": []}, "args": evil}, path)
    elif fmt == "shipped":
        torch.save({"format": FORMAT, "kind": "dit", "model_kwargs": model_kwargs(m), "state_dict": sd,
                    "meta": {"provenance": evil}}, path)
    elif fmt == "legacy":
        torch.save({"model": sd, "ema": sd, "args": evil}, path, _use_new_zipfile_serialization=False)
    elif fmt == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"ema": sd, "args": evil}, f)
    else:
        raise AssertionError(fmt)
    return path


def _trainer():
    return Trainer(_dit(), TrainConfig(steps=1, batch_size=2), device="cpu")


def _good_model_file(d: pathlib.Path) -> pathlib.Path:
    m = _dit()
    save_model_file(m, d / "base.pt", "dit", model_kwargs(m), dtype=torch.float32)
    return d / "base.pt"


def _finetune_resume(evil_path, tmp):
    out = tmp / "run"
    out.mkdir()
    os.replace(evil_path, out / "checkpoint.pt")
    return main(["finetune", "--checkpoint", str(_good_model_file(tmp)), "--steps", "1", "--batch-size", "2",
                 "--out", str(out), "--resume", "--no-progress", "--device", "cpu"])


LOADERS = {
    "load_model_file": lambda p, tmp: load_model_file(p),
    "DiT.from_checkpoint": lambda p, tmp: DiT.from_checkpoint(p, 2),
    "UViT.from_checkpoint": lambda p, tmp: UViT.from_checkpoint(p, 2),
    "Trainer.load": lambda p, tmp: _trainer().load(p),
    "cli sample --checkpoint": lambda p, tmp: main(["sample", "--checkpoint", str(p), "--steps", "1",
                                                    "--num-images", "1", "--device", "cpu", "--out", str(tmp)]),
    "cli finetune --checkpoint": lambda p, tmp: main(["finetune", "--checkpoint", str(p), "--steps", "1",
                                                      "--out", str(tmp / "ft"), "--device", "cpu"]),
    "cli finetune --resume": _finetune_resume,
}
FORMATS = ("state_dict", "trainer", "train_py", "shipped", "legacy", "pickle")


def _refuses(load, path, tmp, capsys):
    """Run ``load``; return the refusal message: a ValueError's, or the CLI's stderr for a nonzero exit code
    (returned, or raised as SystemExit)."""
    try:
        rc = load(path, tmp)
    except ValueError as e:
        return str(e)
    except SystemExit as e:
        rc = e.code
        assert rc not in (0, None), f"exited with code {rc!r}"
    if isinstance(rc, int) and rc != 0:
        return capsys.readouterr().err
    raise AssertionError(f"loaded the malicious file (returned {rc!r})")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("loader", list(LOADERS))
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys, loader, fmt):
    marker = tmp_path / "PWNED"
    path = _write(fmt, tmp_path / "evil.pt", Touch(marker))
    msg = _refuses(LOADERS[loader], path, tmp_path, capsys)
    assert not marker.exists(), f"{loader} executed code from a {fmt} file"
    assert "evil.pt" in msg or "checkpoint.pt" in msg, msg  # names the file
    assert "pathlib.Path" in msg, msg  # and the offending global


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", FORMATS)
def test_os_system_payload_is_refused(tmp_path, capsys, fmt):
    marker = tmp_path / "PWNED"
    path = _write(fmt, tmp_path / "evil.pt", System(marker))
    for load in (LOADERS["load_model_file"], LOADERS["DiT.from_checkpoint"]):
        msg = _refuses(load, path, tmp_path, capsys)
        assert "posix.system" in msg or "os.system" in msg, msg
    assert not marker.exists()


def test_the_benign_versions_load(tmp_path):
    """The same files without the payload load (so the refusals above are about the payload)."""
    ns = argparse.Namespace(results_dir=pathlib.Path("results"), num_classes=10)
    for fmt in FORMATS[:-1]:  # a plain pickle of tensors is never a torch.load(weights_only=True) file
        path = _write(fmt, tmp_path / f"{fmt}.pt", ns if fmt != "state_dict" else torch.zeros(96, 32))
        assert isinstance(load_model_file(path, num_heads=2), DiT), fmt
