"""``eekernels finetune`` for text-to-image families: either layout in (.pt or .safetensors), the same layout
out, caption-glyph data, flow matching, self-distillation, and an exact resume."""
import argparse
import json

import pytest
import torch

from eekernels.jobs import finetune
from eekernels.models.pixart import PixArt
from eekernels.models.pretrained import load_model_file
from eekernels.models.sd3 import SD3
from eekernels.serialization import load_any, save_state


def parse(argv):
    p = argparse.ArgumentParser()
    finetune.add_arguments(p)
    return p.parse_args(argv)


def _sd3():
    torch.manual_seed(0)
    m = SD3(sample_size=32, patch_size=4, in_channels=3, num_layers=3, attention_head_dim=64, num_attention_heads=1,
            joint_attention_dim=16, pooled_projection_dim=8, out_channels=3, pos_embed_max_size=8)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m.eval()


@pytest.mark.parametrize("layout,suffix", [("diffusers", ".safetensors"), ("original", ".pt")])
def test_sd3_finetune_writes_back_the_layout_it_read(tmp_path, capsys, layout, suffix):
    m = _sd3()
    src = tmp_path / f"sd3{suffix}"
    save_state(m.state_dict_in(layout), src)
    out = tmp_path / "ft"
    common = ["--checkpoint", str(src), "--out", str(out), "--schedule", "3,3,2,2,1", "--batch-size", "3",
              "--log-every", "1", "--checkpoint-every", "1", "--no-progress", "--lr", "1e-3", "--ema-decay", "0.5",
              "--distill-weight", "0.5", "--flow-shift", "3"]
    assert finetune.run(parse(common + ["--steps", "2"])) == 0
    text = capsys.readouterr().out
    assert '"step": 2' in text and "(3 blocks)" in text
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["data"] == "caption-glyphs" and ckpt["config"]["loss"] == "auto" and "teacher" in ckpt
    assert finetune.run(parse(common + ["--steps", "3", "--resume"])) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(0 < r["mean_depth"] <= 3 for r in log)

    written = out / f"model{'.safetensors' if suffix == '.safetensors' else '.pt'}"
    state = load_any(written, where="test")
    assert set(state) == set(m.state_dict_in(layout))  # the same keys: the layout it read
    tuned = load_model_file(written)
    assert tuned.source_layout == layout
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for k, v in tuned.state_dict().items():  # the EMA weights
        torch.testing.assert_close(v, ckpt["ema"][k], rtol=0, atol=0)
    assert any(not torch.equal(v, m.state_dict()[k]) for k, v in tuned.state_dict().items() if k.startswith("joint"))
    meta = json.loads((out / "summary.json").read_text())
    assert meta["written"] == {"file": written.name, "layout": layout, "weights": "EMA"}

    # the same run straight through takes the same steps (exact resume)
    straight = tmp_path / "straight"
    args = [str(straight) if a == str(out) else a for a in common]
    assert finetune.run(parse(args + ["--steps", "3"])) == 0
    again = torch.load(straight / "checkpoint.pt", weights_only=True)
    for k, v in again["model"].items():
        assert torch.equal(v, ckpt["model"][k]), k


def test_text_model_data_checks(tmp_path):
    m = _sd3()
    src = tmp_path / "sd3.safetensors"
    save_state(m.state_dict_in("original"), src)
    with pytest.raises(ValueError, match="--data: 'glyphs' does not fit SD3"):
        finetune.run(parse(["--checkpoint", str(src), "--out", str(tmp_path / "a"), "--steps", "1", "--data", "glyphs"]))
    big = _sd3()
    big = type(big)(sample_size=32, patch_size=4, in_channels=4, num_layers=2, attention_head_dim=64,
                    num_attention_heads=1, joint_attention_dim=16, pooled_projection_dim=8, out_channels=4,
                    pos_embed_max_size=8)
    save_state(big.state_dict_in("original"), tmp_path / "latent.safetensors")
    with pytest.raises(ValueError, match="3x32x32 images; SD3 takes 4 channels"):
        finetune.run(parse(["--checkpoint", str(tmp_path / "latent.safetensors"), "--out", str(tmp_path / "b"),
                            "--steps", "1"]))
    with pytest.raises(ValueError, match="--caption-dropout"):
        finetune.run(parse(["--checkpoint", str(src), "--out", str(tmp_path / "c"), "--steps", "1",
                            "--caption-dropout", "1.5"]))


def test_pixart_finetune_from_an_original_pth(tmp_path):
    torch.manual_seed(0)
    m = PixArt(sample_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=3, num_heads=2,
               caption_channels=16, model_max_length=10)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    src = tmp_path / "pixart.pth"
    save_state(m.state_dict_in("original"), src)
    out = tmp_path / "ft"
    assert finetune.run(parse(["--checkpoint", str(src), "--out", str(out), "--steps", "2", "--batch-size", "3",
                               "--no-progress", "--log-every", "1", "--weighting", "min-snr",
                               "--trainable", "no-t-embedder-no-caption", "--num-heads", "2"])) == 0
    written = load_any(out / "model.pt", where="test")
    assert set(written) == set(m.state_dict_in("original")) and "y_embedder.y_embedding" in written
    tuned = PixArt.from_checkpoint(out / "model.pt", num_heads=2)
    assert tuned.source_layout == "original"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["trainable"] == "no-t-embedder-no-caption" and ckpt["data"] == "caption-glyphs"
    for k, v in m.state_dict().items():  # the frozen groups did not move
        if k.startswith(("t_embedder.", "t_block.", "y_embedder.")):
            assert torch.equal(tuned.state_dict()[k], v), k
