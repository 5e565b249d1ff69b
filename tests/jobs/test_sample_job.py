"""``eekernels sample``: the main job, on a small model file and on the shipped weights; its checks come before any
sampling (a spy on ``eekernels.samplers.sample`` proves it), its noise is drawn per batch, and its clock."""
import argparse

import pytest
import torch
from PIL import Image

from eekernels.jobs import sample as job
from eekernels.models import DiT
from eekernels.models.pretrained import save_model_file
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


def test_main_job_defaults(glyph_file):
    args = parse([])
    assert (args.model, args.checkpoint, args.sampler, args.steps, args.cfg_scale, args.schedule, args.out) == (
        "glyph-dit-ase", None, None, None, None, "auto", ".")
    model = job.load_model(parse(["--checkpoint", str(glyph_file)]), torch.device("cpu"))[0]
    job.plan_args(args, None, model, "tiny")  # an epsilon model without a sampling record
    assert (args.sampler, args.steps, args.cfg_scale) == ("dpmsolver++", 20, 1.5)


def _flow_file(path, sampling=None):
    torch.manual_seed(0)
    m = DiT(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            learn_sigma=False, prediction_type="flow")
    save_model_file(m, path, "dit", model_kwargs(m), meta={"sampling": sampling} if sampling else {})
    return path


def test_flow_models_sample_with_a_flow_solver_and_their_recorded_settings(tmp_path, capsys):
    """A flow model samples with flow Euler by default (dpmsolver++ refused it, after the job had started); a
    few-step guidance-distilled file's own solver, steps and CFG 1 are the defaults; options still win."""
    teacher = _flow_file(tmp_path / "flow.pt")
    assert job.run(parse(["--checkpoint", str(teacher), "--out", str(tmp_path / "a"), "--num-images", "2",
                          "--repeats", "1", "--steps", "2", "--no-progress"])) == 0
    assert "flow_euler 2 steps, CFG 1.5" in capsys.readouterr().out
    fast = _flow_file(tmp_path / "fast.pt", {"sampler": "flow_euler", "steps": 4, "cfg_scale": 1.0})
    assert job.run(parse(["--checkpoint", str(fast), "--out", str(tmp_path / "b"), "--num-images", "2",
                          "--no-compare", "--schedule", "full", "--no-progress"])) == 0
    assert "flow_euler 4 steps, CFG 1.0" in capsys.readouterr().out
    args = parse(["--checkpoint", str(fast), "--steps", "8", "--cfg-scale", "2", "--sampler", "flow_heun"])
    job.plan_args(args, None, job.load_model(args, torch.device("cpu"))[0], "fast")
    assert (args.sampler, args.steps, args.cfg_scale) == ("flow_heun", 8, 2.0)
    with pytest.raises(ValueError, match="--sampler: .* predicts 'flow'.*got 'dpmsolver\\+\\+'"):
        job.run(parse(["--checkpoint", str(teacher), "--sampler", "dpmsolver++", "--out", str(tmp_path / "c")]))
    assert not (tmp_path / "c").exists()


def test_main_job_on_the_shipped_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the defaults but fewer images, steps and repeats: CI shares 2 cores (the full main job is timed in the report)
    assert job.run(parse(["--num-images", "5", "--steps", "10", "--repeats", "2"])) == 0
    out = capsys.readouterr().out
    assert "glyph-dit-ase" in out and "early exit" in out and "full depth" in out
    assert "ase-demo(8)" in out and "schedule auto:" not in out  # auto: the schedule it records, said in line one
    assert (tmp_path / "samples.png").is_file()
    # the quality reference is the base model at full depth, not the ASE model run at full depth
    assert (tmp_path / "samples_base_full_depth.png").is_file() and not (tmp_path / "samples_full_depth.png").exists()
    assert "the base model glyph-dit" in out


def test_auto_is_full_depth_for_a_model_that_records_no_schedule_and_the_job_says_so(tmp_path, capsys):
    """`--schedule auto` (the default) samples a model not fine-tuned for early exit at full depth (it used to take
    ase-demo, silently truncating it) and prints why; the shipped ASE model keeps its recorded schedule."""
    from eekernels.models.pretrained import load_pretrained

    for name in ("glyph-dit", "glyph-dit-flow", "glyph-dit-flow-distilled"):
        assert job.resolve_schedule("auto", load_pretrained(name)) is None, name
    ase = load_pretrained("glyph-dit-ase")
    assert job.resolve_schedule("auto", ase).table == tuple(ase.pretrained_meta["schedule"]["table"])
    assert job.auto_note("auto", ase, job.resolve_schedule("auto", ase)) is None
    torch.manual_seed(0)
    m = DiT(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=4, num_heads=2, num_classes=10)
    save_model_file(m, tmp_path / "plain.pt", "dit", model_kwargs(m))  # no schedule recorded
    assert job.run(parse(["--checkpoint", str(tmp_path / "plain.pt"), "--out", str(tmp_path), "--steps", "2",
                          "--num-images", "2", "--repeats", "1", "--no-progress"])) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("schedule full depth (block-FLOP fraction 1.000)")
    assert out[1] == ("  schedule auto: full depth (the model records no early-exit schedule; pass --schedule "
                      "ase-demo or calibrated:FILE to exit early)")
    assert not any("early exit" in line for line in out) and not (tmp_path / "samples_full_depth.png").exists()


def test_shipped_base_and_the_judge_is_not_a_diffusion_model():
    assert job.shipped_base("glyph-dit-ase") == "glyph-dit"
    assert job.shipped_base("glyph-dit-ase-dpm5") == "glyph-dit"  # shown beside its teacher at full depth
    assert job.shipped_base("glyph-dit") is None
    with pytest.raises(ValueError, match="--model: expected a diffusion model"):
        job.load_model(parse(["--model", "glyph-judge"]), torch.device("cpu"))


def _shipped(name, argv, settings, how):
    """A shipped model's case (``how``: the command that makes its file)."""
    return pytest.param(name, argv, settings, id=name)


@pytest.mark.parametrize("name, argv, settings", [
    _shipped("glyph-dit-flow", ["--steps", "8"], "flow_euler 8 steps, CFG 1.5",
             "python/train_glyphs.py --prediction flow"),
    _shipped("glyph-dit-flow-distilled", [], "flow_euler 4 steps, CFG 1.0",  # its own recorded settings
             "python/distill_flow_glyphs.py")])
def test_shipped_flow_models_sample_and_the_judge_reads_their_digits(name, argv, settings, tmp_path, capsys):
    from eekernels.models.pretrained import load_pretrained
    from eekernels.samplers import sample

    assert job.run(parse(["--model", name, "--out", str(tmp_path), "--num-images", "2", "--repeats", "1",
                          "--no-compare", "--schedule", "full", "--no-progress", *argv])) == 0
    assert settings in capsys.readouterr().out and (tmp_path / "samples.png").is_file()
    model, judge = load_pretrained(name), load_pretrained("glyph-judge")
    assert model.prediction == "flow" and model.num_classes == 10
    steps, cfg = (8, 1.5) if name == "glyph-dit-flow" else (4, 1.0)
    labels = torch.arange(20) % 10
    with torch.no_grad():
        images = sample(model, torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(0)), labels,
                        sampler="flow_euler", steps=steps, cfg_scale=cfg)
        accuracy = (judge(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.8, f"{name}: the judge reads {accuracy:.0%} of 20 sampled digits as their class"


# --------------------------------------------------------------------------------------------------
# Timing, outputs, options (tiny model)
# --------------------------------------------------------------------------------------------------
def test_timing_is_interleaved_on_one_cpu_thread_and_reports_ratio_and_range(glyph_file, tmp_path, capsys,
                                                                              monkeypatch):
    calls = []
    real = job.sample_images

    def spy(model, noise, labels, **kw):
        calls.append((kw["schedule"] is None, kw["steps"], torch.get_num_threads()))
        return real(model, noise, labels, **kw)

    monkeypatch.setattr(job, "sample_images", spy)
    before = torch.get_num_threads()
    assert job.run(parse(["--checkpoint", str(glyph_file), "--out", str(tmp_path), "--steps", "4",
                          "--num-images", "3", "--repeats", "3", "--no-progress"])) == 0
    assert torch.get_num_threads() == before
    warm, timed = calls[:2], calls[2:]
    assert [(full, steps) for full, steps, _ in warm] == [(False, 3), (True, 3)]  # untimed warm-up of each mode
    assert [full for full, _, _ in timed] == [False, True] * 3  # early, full, early, full, ...
    assert {threads for _, _, threads in calls} == {1}
    out = capsys.readouterr().out
    assert "ratio of the median times of 3 interleaved runs each, pairs " in out and ", median of 3 runs" in out
    assert "of CPU time (" in out
    assert f"sampled on 1 CPU thread (torch.set_num_threads(1), then back to {before})" in out


def test_speed_ratio_is_the_ratio_of_medians_with_the_pairs_range():
    early, full = [1.0, 1.0, 3.0, 1.0, 1.0], [1.4, 1.4, 1.4, 1.4, 2.8]  # one slow early run, one slow full run
    ratio, low, high = job.speed_ratio(early, full)
    assert ratio == pytest.approx(1.4) and low == pytest.approx(1.4 / 3) and high == pytest.approx(2.8)


def test_the_cpu_clock_sees_all_of_torchs_work(glyph_file):
    """On one torch thread every op runs on the calling thread: its CPU time is the process's (the clock is valid)."""
    import time

    model = job.load_model(parse(["--checkpoint", str(glyph_file)]), torch.device("cpu"))[0]
    noise, labels = job.seeded_inputs(model, 8, 0, "cpu")
    fn = job.make_sample_fn(model, sampler="dpmsolver++", steps=10, cfg_scale=1.5, schedule=None)
    with job.one_thread(torch.device("cpu")):
        assert job.clock(torch.device("cpu")) is time.thread_time
        p0, t0 = time.process_time(), time.thread_time()
        fn(noise, labels)
        p1, t1 = time.process_time(), time.thread_time()
    assert (t1 - t0) > 0.9 * (p1 - p0), (t1 - t0, p1 - p0)


# --------------------------------------------------------------------------------------------------
# Noise drawn per batch; image i's noise is what it always was (a CPU generator seeded --seed + i)
# --------------------------------------------------------------------------------------------------
def test_main_job_draws_noise_per_batch_and_image_i_keeps_its_noise(glyph_file, tmp_path, monkeypatch):
    import eekernels.samplers
    from eekernels.eval.images import seeded_noise

    seen = []

    def fake_sample(model, noise, y, **kw):
        seen.append((noise.clone(), kw["steps"]))
        return noise.clone()

    monkeypatch.setattr(eekernels.samplers, "sample", fake_sample)
    job.run(parse(["--checkpoint", str(glyph_file), "--out", str(tmp_path), "--steps", "5", "--num-images", "7",
                   "--per-proc-batch-size", "3", "--seed", "11", "--repeats", "1", "--no-progress"]))
    timed = [noise for noise, steps in seen if steps == 5]  # the warm-up runs 3 steps
    assert [len(n) for n in timed] == [3, 3, 1] * 2  # early exit, then full depth: batches of 3
    # image i: the CPU generator seeded 11 + i, as before batches (a folder made then stays valid)
    torch.testing.assert_close(torch.cat(timed[:3]), seeded_noise(range(7), (3, 32, 32), 11), rtol=0, atol=0)
    g = torch.Generator().manual_seed(11 + 5)
    torch.testing.assert_close(timed[1][2], torch.randn(3, 32, 32, generator=g), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Every option is checked before any sampling: no late failures
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def no_sampling(monkeypatch):
    """Any call of eekernels.sample fails the test: the check must come first."""
    import eekernels.samplers

    def forbidden(*a, **kw):
        raise AssertionError("sampled before the options were checked")

    monkeypatch.setattr(eekernels.samplers, "sample", forbidden)


def _nan_checkpoint(glyph_file, tmp_path):
    from eekernels.models.pretrained import load_model_file
    from eekernels.training import model_kwargs

    m = load_model_file(glyph_file)
    with torch.no_grad():
        m.blocks[1].attn.qkv.weight[0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    save_model_file(m, path, "dit", model_kwargs(m))
    return path


def _tiny_vae(path, latent_channels=4):
    from diffusers.models import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=4, layers_per_block=1).save_pretrained(path)
    return path


@pytest.mark.parametrize("extra, option", [
    (["--vae", "/no/such/dir"], "--vae"),
    (["--out", "FILE"], "--out"),
    (["--out", "FILE/sub"], "--out"),
    (["--num-images", "5000000"], "--num-images"),
    (["--seed", str(2**64)], "--seed"),
    (["--num-heads", "0"], "--num-heads"),
    (["--cfg-channels", "9"], "--cfg-channels"),
    (["--sampler", "ddim", "--timestep-spacing", "respaced", "--sampler", "heun"], "--timestep-spacing"),
])
def test_bad_options_fail_before_any_sampling(extra, option, glyph_file, tmp_path, no_sampling):
    (tmp_path / "FILE").write_text("not a folder")
    extra = [str(tmp_path / a) if a.startswith("FILE") else a for a in extra]
    with pytest.raises(ValueError, match=f"^{option}"):
        job.run(parse(["--checkpoint", str(glyph_file), "--out", str(tmp_path / "o"), *extra]))
    assert not (tmp_path / "o").exists()  # nothing written either


def test_nan_weights_are_refused_before_sampling_without_the_load_warning(glyph_file, tmp_path, no_sampling):
    import warnings

    path = _nan_checkpoint(glyph_file, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loader's NaN warning would raise here: the error says it instead
        with pytest.raises(ValueError, match=r"^--checkpoint: expected finite weights, got NaN/Inf in 1 tensor"):
            job.run(parse(["--checkpoint", str(path), "--out", str(tmp_path / "o")]))


def test_vae_is_loaded_and_checked_before_sampling(glyph_file, tmp_path, no_sampling):
    vae = _tiny_vae(tmp_path / "vae")
    with pytest.raises(ValueError, match="^--vae: .* samples images \\(3 channels\\), not latents"):
        job.run(parse(["--checkpoint", str(glyph_file), "--vae", str(vae), "--out", str(tmp_path / "o")]))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    torch.manual_seed(1)
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    torch.save(m.checkpoint_state_dict(), tmp_path / "fb.pt")
    with pytest.raises(ValueError, match="^--vae: cannot load a diffusers AutoencoderKL"):
        job.run(parse(["--checkpoint", str(tmp_path / "fb.pt"), "--num-heads", "2", "--vae", str(tmp_path / "broken"),
                       "--out", str(tmp_path / "o")]))
    with pytest.raises(ValueError, match="^--vae: .* decodes 16-channel latents"):
        job.run(parse(["--checkpoint", str(tmp_path / "fb.pt"), "--num-heads", "2",
                       "--vae", str(_tiny_vae(tmp_path / "vae16", 16)), "--out", str(tmp_path / "o")]))


def test_latent_model_decoded_by_the_vae_once(tmp_path, capsys):
    torch.manual_seed(1)
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    torch.save(m.checkpoint_state_dict(), tmp_path / "fb.pt")
    job.run(parse(["--checkpoint", str(tmp_path / "fb.pt"), "--num-heads", "2", "--vae", str(_tiny_vae(tmp_path / "v")),
                   "--out", str(tmp_path / "o"), "--steps", "2", "--num-images", "2", "--repeats", "1",
                   "--no-progress"]))
    assert (tmp_path / "o" / "samples.png").is_file() and not (tmp_path / "o" / "latents.pt").exists()


def test_outputs_say_what_they_are_and_when_they_replace_a_file(glyph_file, tmp_path, capsys):
    argv = ["--checkpoint", str(glyph_file), "--out", str(tmp_path / "o"), "--steps", "2", "--num-images", "2",
            "--repeats", "1", "--no-progress"]
    job.run(parse(argv))
    out = capsys.readouterr().out
    assert "replaced" not in out and "samples_full_depth.png: the same model" in out
    job.run(parse(argv))
    out = capsys.readouterr().out
    assert out.count("(replaced the file that was there)") == 2, out  # samples.png and samples_full_depth.png


def test_progress_bar_on_stderr_unless_no_progress(glyph_file, tmp_path, capsys, monkeypatch):
    import tqdm

    seen = []
    real = tqdm.tqdm

    def spy(*a, **kw):
        seen.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(tqdm, "tqdm", spy)
    argv = ["--checkpoint", str(glyph_file), "--out", str(tmp_path), "--steps", "2", "--num-images", "2",
            "--repeats", "1"]
    job.run(parse(argv))
    job.run(parse(argv + ["--no-progress"]))
    import sys

    assert [kw["disable"] for kw in seen] == [False, True] and all(kw["file"] is sys.stderr for kw in seen)


def test_timestep_spacing_and_cfg_channels_reach_sample_only_when_given(glyph_file, tmp_path, monkeypatch):
    import eekernels.samplers

    seen = []

    def fake_sample(model, noise, y, **kw):
        seen.append(kw)
        return noise.clone()

    monkeypatch.setattr(eekernels.samplers, "sample", fake_sample)
    base = ["--checkpoint", str(glyph_file), "--out", str(tmp_path), "--steps", "2", "--num-images", "2",
            "--sampler", "ddim", "--repeats", "1", "--no-progress"]
    job.run(parse(base))
    assert seen and all("timestep_spacing" not in kw and "cfg_channels" not in kw for kw in seen)
    seen.clear()
    job.run(parse(base + ["--timestep-spacing", "trailing", "--cfg-channels", "3"]))
    assert seen and all(kw["timestep_spacing"] == "trailing" and kw["cfg_channels"] == 3 for kw in seen)
    assert parse(["--timestep-spacing", "respaced"]).timestep_spacing == "respaced"
    with pytest.raises(SystemExit):
        parse(["--timestep-spacing", "uniform"])


def test_auto_schedule_of_a_full_depth_finetune_is_full_depth(glyph_file):
    model = job.load_model(parse(["--checkpoint", str(glyph_file)]), torch.device("cpu"))[0]
    model.pretrained_meta = {"schedule": {"preset": "full", "total_depth": 4, "table": [4] * 10}}
    assert job.resolve_schedule("auto", model) is None
    assert job.auto_note("auto", model, None) == "schedule auto: full depth (the model records a full-depth fine-tune)"
    with pytest.raises(ValueError, match="--schedule: expected 'periodic:K:DEPTH'"):
        job.resolve_schedule("periodic:3", model)
    args, schedule = parse(["--exit-policy", "cache"]), job.resolve_schedule("4,4,3,2", model)
    job.plan_args(args, schedule, model)  # --sampler / --steps from the model (prepare's order)
    with pytest.raises(ValueError, match="--exit-policy cache: needs a --schedule"):
        job.flop_fraction(model, args, schedule)
