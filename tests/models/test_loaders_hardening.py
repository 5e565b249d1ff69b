"""Loader hardening: facebookresearch train.py checkpoints, refused globals, NaN/Inf weights, strict
from_diffusers, class-count inference, text-conditioned U-ViT and non-finite timesteps."""
import argparse
import fractions
import math
import pathlib

import pytest
import torch
import torch.nn as nn

import eekernels
from eekernels.cli import main
from eekernels.models import DiT, UNet, UViT
from eekernels.models.convert import facebook_dit_to_diffusers
from eekernels.models.pretrained import load_model_file, save_model_file
from eekernels.training import model_kwargs
from tests.models._reference_models import RefDiT, RefUViT, mae_pos_embed, randomize_, rel_err

CFG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=72, depth=4, num_heads=3, num_classes=10)


def _inputs(B=3, classes=10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 4, 8, 8, generator=g), torch.rand(B, generator=g) * 999, torch.arange(B) % classes


def _train_py_checkpoint(path, model_sd, ema_sd, **args):
    """A facebookresearch/DiT train.py checkpoint: model, EMA, a real AdamW state and the argparse args."""
    params = [nn.Parameter(v.clone()) for v in model_sd.values() if v.is_floating_point()]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0)
    with torch.enable_grad():
        sum(p.square().sum() for p in params).backward()
    opt.step()
    ns = argparse.Namespace(data_path="/data/imagenet/train", results_dir=pathlib.Path("results"), model="DiT-XL/2",
                            image_size=64, num_classes=10, epochs=1400, global_batch_size=256, global_seed=0,
                            vae="ema", num_workers=4, log_every=100, ckpt_every=50_000)
    for k, v in args.items():
        setattr(ns, k, v)
    torch.save({"model": model_sd, "ema": ema_sd, "opt": opt.state_dict(), "args": ns}, path)
    return path


# --------------------------------------------------------------------------------------------------
# facebookresearch train.py checkpoints load through every loader; other globals are refused
# --------------------------------------------------------------------------------------------------
def test_facebook_train_py_checkpoint_loads_everywhere(tmp_path, monkeypatch):
    ema = randomize_(RefDiT(**CFG), seed=0).eval()
    raw = randomize_(RefDiT(**CFG), seed=1).eval()
    path = _train_py_checkpoint(tmp_path / "0050000.pt", raw.state_dict(), ema.state_dict())
    x, t, y = _inputs()
    with torch.no_grad():
        want = ema(x, t, y)
        m = DiT.from_checkpoint(path, 3)
        assert m.num_classes == 10 and m.null_class == 10
        assert rel_err(m(x, t, y), want) <= 1e-5
        assert rel_err(DiT.from_checkpoint(path, 3, which="model")(x, t, y), raw(x, t, y)) <= 1e-5
        assert rel_err(load_model_file(path, num_heads=3)(x, t, y), want) <= 1e-5
    out = tmp_path / "out"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    rc = main(["sample", "--checkpoint", str(path), "--num-heads", "3", "--steps", "2", "--num-images", "2",
               "--schedule", "full", "--no-compare", "--device", "cpu", "--out", str(out)])
    assert rc == 0 and any(out.iterdir())


def test_other_globals_are_refused_naming_file_and_global(tmp_path):
    sd = randomize_(RefDiT(**CFG)).state_dict()
    path = _train_py_checkpoint(tmp_path / "ckpt.pt", sd, sd, lr=fractions.Fraction(1, 10_000))
    for load in (lambda: DiT.from_checkpoint(path, 3), lambda: load_model_file(path, num_heads=3)):
        with pytest.raises(ValueError, match=r"ckpt\.pt.*fractions\.Fraction"):
            load()


# --------------------------------------------------------------------------------------------------
# NaN/Inf weights: a warning naming the tensor, for every family and file format
# --------------------------------------------------------------------------------------------------
def test_nonfinite_weights_warn_naming_the_key(tmp_path):
    sd = randomize_(RefDiT(**CFG)).state_dict()
    sd["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"blocks\.1\.mlp\.fc1\.weight.*NaN/Inf"):
        DiT.from_checkpoint(sd, 3)
    torch.save(sd, tmp_path / "fb.pt")
    with pytest.warns(UserWarning, match=r"blocks\.1\.mlp\.fc1\.weight"):
        load_model_file(tmp_path / "fb.pt", num_heads=3)

    usd = randomize_(RefUViT(img_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=11)).state_dict()
    usd["out_blocks.0.skip_linear.bias"][3] = float("inf")
    with pytest.warns(UserWarning, match=r"out_blocks\.0\.skip_linear\.bias"):
        UViT.from_checkpoint(usd, 4)

    m = DiT(**CFG)
    with torch.no_grad():
        m.final_layer.linear.bias[0] = float("-inf")
    save_model_file(m, tmp_path / "shipped.pt", "dit", model_kwargs(m), dtype=torch.float32)
    with pytest.warns(UserWarning, match=r"final_layer\.linear\.bias"):
        load_model_file(tmp_path / "shipped.pt")
    trainer_ckpt = {"model": m.state_dict(), "ema": m.state_dict(), "opt": {}, "step": 3, "config": {},
                    "history": [], "rng": {}, "model_kwargs": model_kwargs(m)}
    torch.save(trainer_ckpt, tmp_path / "checkpoint.pt")
    with pytest.warns(UserWarning, match=r"final_layer\.linear\.bias"):
        load_model_file(tmp_path / "checkpoint.pt")


def test_finite_weights_do_not_warn(recwarn):
    DiT.from_checkpoint(randomize_(RefDiT(**CFG)).state_dict(), 3)
    assert not [w for w in recwarn if "NaN/Inf" in str(w.message)]


# --------------------------------------------------------------------------------------------------
# DiT.from_diffusers is strict about unexpected keys (a hand-written diffusers layout: no diffusers needed)
# --------------------------------------------------------------------------------------------------
def test_dit_from_diffusers_rejects_unexpected_keys():
    ref = randomize_(RefDiT(**CFG)).eval()
    ref.pos_embed.data = torch.from_numpy(mae_pos_embed(72, 4)).float()[None]  # diffusers' is the fixed sin-cos
    sd = facebook_dit_to_diffusers(ref.state_dict(), CFG["depth"])
    x, t, y = _inputs()
    m = DiT.from_diffusers(sd, num_heads=3, input_size=8, freq_shift=0.0, mlp_norm_eps=1e-6)
    with torch.no_grad():
        assert rel_err(m(x, t, y), ref(x, t, y)) <= 1e-5  # the conversion itself is right
    extra = dict(sd, **{"transformer_blocks.0.attn2.to_k.weight": torch.zeros(72, 72)})
    with pytest.raises(ValueError, match=r"unexpected key.*transformer_blocks\.0\.attn2\.to_k\.weight"):
        DiT.from_diffusers(extra, num_heads=3, input_size=8)


# --------------------------------------------------------------------------------------------------
# Class count: facebookresearch's table holds num_classes + (class_dropout_prob > 0) rows
# --------------------------------------------------------------------------------------------------
def _no_null_dit():
    torch.manual_seed(0)
    m = DiT(**CFG, class_dropout_prob=0.0)  # 10 classes, 10 rows: no null class
    for p in m.parameters():
        nn.init.normal_(p, std=0.05)
    return m.eval()


def test_checkpoint_without_null_row_loads_all_classes(tmp_path):
    src = _no_null_dit()
    sd = src.checkpoint_state_dict()
    assert sd["y_embedder.embedding_table.weight"].shape[0] == 10
    x, t, y = _inputs()
    y = torch.tensor([0, 9, 9])  # 9: the last real class, which the old loader took as the null class
    with torch.no_grad():
        want = src(x, t, y)
        for kw in (dict(class_dropout_prob=0.0), dict(num_classes=10)):
            m = DiT.from_checkpoint(sd, 3, **kw)
            assert (m.num_classes, m.null_class) == (10, None)
            assert torch.equal(m(x, t, y), want)
        # a train.py checkpoint says it in args: num_classes (always there) or class_dropout_prob
        for args in (dict(num_classes=10), dict(num_classes=None, class_dropout_prob=0.0)):
            path = _train_py_checkpoint(tmp_path / "c.pt", sd, sd, **args)
            m = DiT.from_checkpoint(path, 3)
            assert (m.num_classes, m.null_class) == (10, None)
            assert torch.equal(m(x, t, y), want)
            assert torch.equal(load_model_file(path, num_heads=3)(x, t, y), want)


def test_class_count_default_and_conflicts(tmp_path):
    sd = randomize_(RefDiT(**CFG)).state_dict()  # 11 rows: 10 classes + null
    assert (DiT.from_checkpoint(sd, 3).num_classes, DiT.from_checkpoint(sd, 3).null_class) == (10, 10)
    assert DiT.from_checkpoint(sd, 3, num_classes=10).null_class == 10
    assert DiT.from_checkpoint(sd, 3, class_dropout_prob=0.0).num_classes == 11  # 11 classes, no null
    bare = _no_null_dit().checkpoint_state_dict()  # 10 rows, nothing says how many classes: the default
    assert DiT.from_checkpoint(bare, 3).num_classes == 9
    with pytest.raises(ValueError, match="num_classes= 5 does not fit the label table of 11 rows"):
        DiT.from_checkpoint(sd, 3, num_classes=5)
    with pytest.raises(ValueError, match="class_dropout_prob=0.0 expected > 0"):
        DiT.from_checkpoint(sd, 3, num_classes=10, class_dropout_prob=0.0)
    path = _train_py_checkpoint(tmp_path / "c.pt", sd, sd, num_classes=1000)
    with pytest.raises(ValueError, match="args.num_classes 1000 does not fit the label table of 11 rows"):
        DiT.from_checkpoint(path, 3)
    assert DiT.from_checkpoint(path, 3, num_classes=10).num_classes == 10  # the caller's word wins


# --------------------------------------------------------------------------------------------------
# Text-conditioned U-ViT (baofff libs/uvit_t2i.py) is refused clearly
# --------------------------------------------------------------------------------------------------
class _UViTT2I(nn.Module):
    """The attributes of baofff/U-ViT libs/uvit_t2i.py: context_embed (CLIP tokens), no label_emb."""

    def __init__(self, img_size=8, patch_size=2, in_chans=4, embed_dim=64, depth=4, clip_dim=32, num_clip_token=5):
        super().__init__()
        ref = RefUViT(img_size, patch_size, in_chans, embed_dim, depth, num_heads=4)
        for name in ("patch_embed", "time_embed", "in_blocks", "mid_block", "out_blocks", "norm", "decoder_pred",
                     "final_layer"):
            setattr(self, name, getattr(ref, name))
        self.context_embed = nn.Linear(clip_dim, embed_dim)
        self.extras = 1 + num_clip_token
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + (img_size // patch_size) ** 2, embed_dim))


def test_accelerate_refuses_text_conditioned_uvit():
    t2i = _UViTT2I()
    for native in (False, True):  # both tiers refuse it by name
        with pytest.raises(TypeError, match=r"text-conditioned U-ViT \(uvit_t2i"):
            eekernels.accelerate(t2i, native=native)
    with pytest.raises(ValueError, match=r"text-conditioned U-ViT \(uvit_t2i"):
        UViT.from_checkpoint(t2i.state_dict(), 4)
    plain = randomize_(RefUViT(img_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=11)).eval()
    assert isinstance(eekernels.accelerate(plain, native=True).model, UViT)  # the class-conditional U-ViT still works


# --------------------------------------------------------------------------------------------------
# Non-finite timesteps: ValueError from the shared input check (CPU: no sync needed)
# --------------------------------------------------------------------------------------------------
def _unet():
    return UNet(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4, attention_head_dim=None).eval()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -math.inf])
@pytest.mark.parametrize("family", ["dit", "uvit", "unet"])
def test_nonfinite_timesteps_raise(family, bad):
    if family == "dit":
        model, x, y = DiT(**CFG).eval(), torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    elif family == "uvit":
        model = UViT(input_size=8, in_channels=3, embed_dim=64, depth=4, num_heads=4, num_classes=10).eval()
        x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    else:
        model, x, y = _unet(), torch.randn(2, 3, 8, 8), None
    good = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        ok = model(x, good, y)
        assert torch.isfinite(ok).all()
        for t in (torch.tensor([10.0, bad]), torch.tensor(bad), bad):
            with pytest.raises(ValueError, match="`t` expected (a )?finite"):
                model(x, t, y)
        assert torch.equal(model(x, good, y), ok)
