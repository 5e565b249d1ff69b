"""``eekernels sample``: the main job, on a small model file until the shipped weights exist, then on them."""
import argparse

import pytest
import torch
from PIL import Image

from eekernels.jobs import sample as job
from eekernels.models import DiT
from eekernels.models.pretrained import PRETRAINED, pretrained_names, save_model_file
from eekernels.training import model_kwargs


def parse(argv):
    p = argparse.ArgumentParser()
    job.add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def glyph_file(tmp_path_factory):
    torch.manual_seed(0)
    m = DiT(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=4, num_heads=2, num_classes=10)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model_file(m, path, "dit", model_kwargs(m), meta={"schedule": {"preset": "ase-demo", "total_depth": 4}})
    return path


def test_main_job_writes_grid_and_compares_speed(glyph_file, tmp_path, capsys):
    assert job.run(parse(["--checkpoint", str(glyph_file), "--out", str(tmp_path), "--steps", "4",
                          "--num-images", "12"])) == 0
    out = capsys.readouterr().out
    assert "early exit: 12 images" in out and "full depth: 12 images" in out and "x the full-depth throughput" in out
    assert "ase-demo(4)" in out
    img = Image.open(tmp_path / "samples.png")
    assert img.size == ((10 * 34 + 2) * 8, (2 * 34 + 2) * 8)  # 10 per row, 2 rows of 32 px + 2 px gaps, x8
    assert (tmp_path / "samples_full_depth.png").is_file()


def test_sampling_is_deterministic_and_schedule_specs(glyph_file):
    model = job.load_model(parse(["--checkpoint", str(glyph_file)]), torch.device("cpu"))[0]
    noise, labels = job.seeded_inputs(model, 3, 7, "cpu")
    assert labels.tolist() == [0, 1, 2]
    sched = job.resolve_schedule("auto", model)
    fn = job.make_sample_fn(model, sampler="ddim", steps=3, cfg_scale=2.0, schedule=sched)
    torch.testing.assert_close(fn(noise, labels), fn(noise.clone(), labels.clone()), rtol=0, atol=0)
    # noise for image i depends on seed + i only: a shard of images gets the same noise
    tail, _ = job.seeded_inputs(model, 3, 8, "cpu")
    torch.testing.assert_close(tail[:2], noise[1:])
    assert job.resolve_schedule("full", model) is None
    assert job.resolve_schedule("4,4,3,2", model).table == (4, 4, 3, 2)
    assert job.resolve_schedule("periodic:2:1", model).period == 2
    with pytest.raises(ValueError, match="--schedule"):
        job.resolve_schedule("fast", model)
    with pytest.raises(ValueError):
        job.resolve_schedule("8,8,4", model)  # deeper than the model


def test_facebookresearch_latent_checkpoint(tmp_path, capsys):
    torch.manual_seed(1)
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    torch.save(m.checkpoint_state_dict(), tmp_path / "fb.pt")
    job.run(parse(["--checkpoint", str(tmp_path / "fb.pt"), "--num-heads", "2", "--out", str(tmp_path),
                   "--steps", "2", "--num-images", "2", "--sampler", "ddim"]))
    assert "latents.pt" in capsys.readouterr().out
    assert torch.load(tmp_path / "latents.pt").shape == (2, 4, 8, 8)


def test_bad_arguments(glyph_file, tmp_path):
    with pytest.raises(ValueError, match="--num-images"):
        job.run(parse(["--checkpoint", str(glyph_file), "--num-images", "0", "--out", str(tmp_path)]))
    with pytest.raises(ValueError, match="sampler"):
        job.run(parse(["--checkpoint", str(glyph_file), "--sampler", "plms", "--out", str(tmp_path)]))


def test_main_job_defaults():
    args = parse([])
    assert (args.model, args.checkpoint, args.sampler, args.steps, args.cfg_scale, args.schedule, args.out) == (
        "glyph-dit-ase", None, "dpmsolver++", 20, 1.5, "auto", ".")


@pytest.mark.skipif(not set(PRETRAINED) <= set(pretrained_names()),
                    reason="the shipped glyph models are not in eekernels/pretrained/ yet (python/train_glyphs.py)")
def test_main_job_on_the_shipped_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the defaults but fewer images and steps: CI shares 2 cores (the full main job is timed in the report)
    assert job.run(parse(["--num-images", "5", "--steps", "10"])) == 0
    out = capsys.readouterr().out
    assert "glyph-dit-ase" in out and "early exit" in out and "full depth" in out
    assert (tmp_path / "samples.png").is_file()
