"""``eekernels finetune``: a run, its outputs, and an exact resume from its checkpoint."""
import argparse
import json

import torch

from eekernels.models import DiT
from eekernels.models.pretrained import load_model_file, save_model_file
from eekernels.jobs import finetune
from eekernels.training import model_kwargs


def parse(argv):
    p = argparse.ArgumentParser()
    finetune.add_arguments(p)
    return p.parse_args(argv)


def test_finetune_runs_and_resumes(tmp_path, capsys):
    torch.manual_seed(0)
    m = DiT(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=4, num_heads=2, num_classes=10)
    src = tmp_path / "base.pt"
    save_model_file(m, src, "dit", model_kwargs(m), dtype=torch.float32)
    common = ["--checkpoint", str(src), "--schedule", "ase-demo", "--data", "glyphs", "--out", str(tmp_path / "ft"),
              "--batch-size", "4", "--log-every", "1", "--checkpoint-every", "2", "--no-progress"]
    assert finetune.run(parse(common + ["--steps", "2"])) == 0
    out = capsys.readouterr().out
    assert "ase-demo(4)" in out and '"step": 2' in out
    ckpt = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2 and "ema" in ckpt and "opt" in ckpt and "rng" in ckpt
    assert finetune.run(parse(common + ["--steps", "3", "--resume"])) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "ft" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all("mean_depth" in r for r in log)
    tuned = load_model_file(tmp_path / "ft" / "model.pt")
    assert tuned.pretrained_meta["schedule"]["table"] == [4, 4, 3, 3, 3, 3, 2, 2, 2, 2]
    # the trainer checkpoint itself is also a loadable model file (its EMA)
    assert isinstance(load_model_file(tmp_path / "ft" / "checkpoint.pt"), DiT)
