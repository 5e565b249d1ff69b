"""``--model-config FILE`` (``eekernels calibrate`` / ``finetune``) and ``load_model_file(config=)``: a PixArt-Σ
checkpoint trained with a KV compression that adds no weights ("uniform", "ave", "uniform_every") runs compressed
only when its PixArt-sigma training config is given; nothing in the checkpoint says so. End to end through the CLI
(the same calibration as the library's ``PixArt.from_checkpoint(config=)``, another one without it), the config
file as PixArt-sigma's ``train.py`` dumps it (mmcv's ``dict(key=value)``), and every refusal: one line, exit
code 2, before any work, no file written."""
import json
import re

import pytest
import torch

from eekernels import calibration as C
from eekernels import cli
from eekernels.eval.images import seeded_inputs
from eekernels.jobs import finetune
from eekernels.models import TextCondition
from eekernels.models.condition import load_prompt_embeds, save_prompt_embeds
from eekernels.models.convert.pixart import read_config
from eekernels.models.pixart import PixArt
from eekernels.models.pretrained import load_model_file, pretrained_path
from eekernels.schedules import ExitSchedule
from eekernels.serialization import save_state

KV = {"sampling": "uniform", "scale_factor": 2, "kv_compress_layer": [0, 1]}
HEADS = 2
# The config.py PixArt-sigma's train.py writes into its work_dir (mmcv's Config.dump: dicts as dict(...)), cut down
DUMPED = """data_root = 'data'
data = dict(type='InternalDataMSSigma', root='InternData', image_list_json=['data_info.json'], load_vae_feat=False)
image_size = 64
model = 'PixArtMS_XL_2'
optimizer = dict(type='CAMEWrapper', lr=2e-05, weight_decay=0.0, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))
model_max_length = 6
qk_norm = False
kv_compress = True
kv_compress_config = dict(sampling='uniform', scale_factor=2, kv_compress_layer=[0, 1])
"""


def _sigma(**kw) -> PixArt:
    """A tiny PixArt-Σ trained (here: randomized) with "uniform" KV compression of blocks 0 and 1 by 2."""
    torch.manual_seed(0)
    args = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, depth=3, num_heads=HEADS,
                caption_channels=8, model_max_length=6, kv_compress_config=KV)
    m = PixArt(**{**args, **kw})
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.3)
    return m.eval()


@pytest.fixture
def files(tmp_path):
    """(checkpoint .pth as released: {"state_dict": original layout}, dumped config.py, caption embeddings)."""
    m = _sigma()
    ckpt, config, prompts = tmp_path / "sigma.pth", tmp_path / "config.py", tmp_path / "prompts.safetensors"
    torch.save({"state_dict": m.state_dict_in("original")}, ckpt)
    config.write_text(DUMPED)
    g = torch.Generator().manual_seed(3)
    mask = torch.arange(6)[None] < torch.tensor([[6], [4], [2]])  # padded captions, as T5's come
    save_prompt_embeds(prompts, TextCondition(torch.randn(3, 6, 8, generator=g), mask))
    return m, ckpt, config, prompts


def test_dumped_config_is_read_without_running_it(tmp_path):
    assert read_config("t", _write(tmp_path, DUMPED)) == {
        "qk_norm": False, "kv_compress_config": KV}
    for expr in ("dict(**other)", "dict(sampling=os.system('x'), scale_factor=2, kv_compress_layer=[0])",
                 "{**other}", "make(sampling='uniform')"):
        path = _write(tmp_path, DUMPED.replace("dict(sampling='uniform', scale_factor=2, kv_compress_layer=[0, 1])",
                                               expr))
        with pytest.raises(ValueError, match="entry 'kv_compress_config' expected a literal"):
            read_config("t", path)


def _write(tmp_path, text):
    path = tmp_path / "cfg.py"
    path.write_text(text)
    return path


@torch.no_grad()
def test_load_model_file_takes_the_config_for_pixart_only(files, tmp_path):
    m, ckpt, config, _ = files
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0])
    y = TextCondition(torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.bool))
    want = PixArt.from_checkpoint(ckpt, num_heads=HEADS, config=config)
    got = load_model_file(ckpt, num_heads=HEADS, config=config)
    assert got.kv_compress_config == KV and torch.equal(got(x, t, y), want(x, t, y))
    assert torch.allclose(got(x, t, y), m(x, t, y), rtol=1e-5, atol=1e-6)
    plain = load_model_file(ckpt, num_heads=HEADS)  # nothing in the file says it was trained compressed
    assert plain.kv_compress_config is None and not torch.allclose(plain(x, t, y), want(x, t, y), rtol=1e-3)
    for other, kind in ((pretrained_path("glyph-dit"), "an eekernels model file"),):
        with pytest.raises(ValueError, match=rf"`config` expected a PixArt checkpoint .* got {kind}"):
            load_model_file(other, config=config)
    from eekernels.models.sd3 import SD3

    sd3 = tmp_path / "sd3.safetensors"
    save_state(SD3(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                   num_attention_heads=1, joint_attention_dim=12, pooled_projection_dim=5, out_channels=4,
                   pos_embed_max_size=8).state_dict(), sd3)
    with pytest.raises(ValueError, match=r"`config` expected a PixArt checkpoint .* got a checkpoint of the 'sd3' family"):
        load_model_file(sd3, config=config)


def _calibrate_argv(ckpt, prompts, out, *extra):
    return ["calibrate", "--checkpoint", str(ckpt), "--num-heads", str(HEADS), "--prompt-embeds", str(prompts),
            "--steps", "3", "--samples", "4", "--budget", "0.7", "--device", "cpu", "--no-progress", "--out",
            str(out), *extra]


def _library_calibration(model, prompts, n=4):
    """What `eekernels calibrate` runs, through the library: noise i seeded i, caption i % N, its defaults."""
    noise, _ = seeded_inputs(n, 0, None, (4, 8, 8))
    y, _ = load_prompt_embeds(prompts)
    return C.calibrate(model, sampler="dpmsolver++", steps=3, cfg_scale=1.5, budget=0.7, noises=noise,
                       conditions=y.index(torch.arange(n) % y.batch)).calibration


def test_cli_calibrate_with_model_config_equals_from_checkpoint_with_config(files, tmp_path, capsys):
    _, ckpt, config, prompts = files
    with_cfg, without = tmp_path / "with.json", tmp_path / "without.json"
    assert cli.main(_calibrate_argv(ckpt, prompts, with_cfg, "--model-config", str(config))) == 0
    assert cli.main(_calibrate_argv(ckpt, prompts, without)) == 0
    capsys.readouterr()
    got, plain = ExitSchedule.load(with_cfg).calibration, ExitSchedule.load(without).calibration
    want = _library_calibration(PixArt.from_checkpoint(ckpt, num_heads=HEADS, config=config), prompts)
    assert got.errors == want.errors and got.plan == want.plan  # the same model, the same measurements
    uncompressed = _library_calibration(PixArt.from_checkpoint(ckpt, num_heads=HEADS), prompts)
    assert plain.errors == uncompressed.errors
    assert got.errors != plain.errors  # the option changes what runs (the guard: the test could not pass blind)


def _fails_before_any_work(argv, match, out, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the job ran")

    monkeypatch.setattr(C, "calibrate", no_work)
    monkeypatch.setattr("eekernels.training.trainer.Trainer.train", no_work)
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, (argv, err)
    assert re.search(match, err), (argv, err)
    assert not out.exists() or (out.is_dir() and not any(out.iterdir())), argv


def test_cli_model_config_refusals(files, tmp_path, capsys, monkeypatch):
    _, ckpt, config, prompts = files
    out = tmp_path / "never.json"
    dit = str(pretrained_path("glyph-dit"))
    (tmp_path / "bad.py").write_text("kv_compress = True\nkv_compress_config = make()\n")
    (tmp_path / "conv.py").write_text(DUMPED.replace("'uniform'", "'conv'"))
    base = ["calibrate", "--steps", "2", "--samples", "2", "--device", "cpu", "--no-progress", "--out", str(out)]
    cases = [
        (["--model-config", str(config)], r"--model-config: only used with --checkpoint"),
        (["--checkpoint", dit, "--model-config", str(tmp_path / "none.py")],
         r"--model-config: expected a PixArt-sigma config file \(\.py\), got .*none\.py' \(no such file\)"),
        (["--checkpoint", dit, "--model-config", str(tmp_path / "bad.py")],
         r"--model-config: `config` entry 'kv_compress_config' expected a literal"),
        (["--checkpoint", dit, "--model-config", str(config)],
         r"--model-config: expected a PixArt checkpoint .* got .*glyph-dit\.pt', an eekernels model file \(dit\)"),
        (["--checkpoint", str(ckpt), "--num-heads", "2", "--prompt-embeds", str(prompts), "--model-config",
          str(tmp_path / "conv.py")], r"`kv_compress_config` .*'conv'.* does not fit the checkpoint"),
        (["--checkpoint", str(ckpt), "--num-heads", "2", "--prompt-embeds", str(prompts), "--model-config",
          str(config), "--size", "6"], r"--size: .*multiples of 2"),
    ]
    for extra, match in cases:
        _fails_before_any_work(base + extra, match, out, capsys, monkeypatch)
    ft = tmp_path / "ft"
    for extra, match in [
        (["--checkpoint", "glyph-dit", "--model-config", str(config)],
         r"--model-config: expected a PixArt checkpoint file, got the shipped model 'glyph-dit'"),
        (["--checkpoint", dit, "--model-config", str(config)], r"--model-config: expected a PixArt checkpoint"),
    ]:
        _fails_before_any_work(["finetune", "--steps", "1", "--out", str(ft), "--no-progress", *extra], match, ft,
                               capsys, monkeypatch)


def _ft_sigma():
    """A PixArt-Σ that trains on the caption glyphs (3 x 32 x 32), "uniform" compression of block 1 by 2."""
    return _sigma(sample_size=32, patch_size=4, in_channels=3, caption_channels=16, model_max_length=10,
                  kv_compress_config={**KV, "kv_compress_layer": [1]})


def test_finetune_trains_the_compressed_model_and_resume_keeps_it(tmp_path, capsys):
    import argparse

    p = argparse.ArgumentParser()
    finetune.add_arguments(p)
    m = _ft_sigma()
    src, config, out = tmp_path / "sigma.pth", tmp_path / "config.py", tmp_path / "ft"
    torch.save({"state_dict": m.state_dict_in("original")}, src)
    config.write_text(DUMPED.replace("kv_compress_layer=[0, 1]", "kv_compress_layer=[1]"))
    common = ["--checkpoint", str(src), "--num-heads", str(HEADS), "--out", str(out), "--batch-size", "2",
              "--no-progress", "--schedule", "full", "--checkpoint-every", "1"]
    assert finetune.run(p.parse_args(common + ["--steps", "1", "--model-config", str(config)])) == 0
    text = capsys.readouterr().out
    assert f"runs with the KV compression {m.kv_compress_config} only when loaded with the same config" in text
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["model_options"] == {"kv_compress_config": m.kv_compress_config}
    meta = json.loads((out / "summary.json").read_text())
    assert meta["written"]["model_config"] == str(config)
    tuned = load_model_file(out / "model.pt", num_heads=HEADS, config=config)
    assert tuned.kv_compress_config == m.kv_compress_config
    # a resume without the config would train the uncompressed model on: refused, the change named
    with pytest.raises(ValueError, match=r"--resume: .* different config \(model_options: .*'uniform'.* -> "
                                         r"\{'kv_compress_config': None\}"):
        finetune.run(p.parse_args(common + ["--steps", "2", "--resume"]))
    assert finetune.run(p.parse_args(common + ["--steps", "2", "--resume", "--model-config", str(config)])) == 0
    assert "resumed at step 1" in capsys.readouterr().out
    # diffusers' layout cannot hold the compression, and finetune writes back the layout it read: refused first
    dsrc, dout = tmp_path / "sigma_diffusers.safetensors", tmp_path / "ft_d"
    save_state(PixArt.from_checkpoint(src, num_heads=HEADS).state_dict_in("diffusers"), dsrc)
    with pytest.raises(ValueError, match=r"--model-config: .* is in diffusers' layout, which cannot hold"):
        finetune.run(p.parse_args(["--checkpoint", str(dsrc), "--num-heads", str(HEADS), "--out", str(dout),
                                   "--steps", "1", "--no-progress", "--model-config", str(config)]))
    assert not dout.exists()
