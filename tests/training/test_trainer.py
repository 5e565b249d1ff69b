"""Trainer: exact resume, EMA, parameter selection, label dropout, exit depths, clipping, any Dataset."""
import json

import pytest
import torch

from eekernels import ExitSchedule
from eekernels.models import DiT
from eekernels.training import TrainConfig, Trainer, trainable_parameters


def _dit(depth=4):
    torch.manual_seed(0)
    m = DiT(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=depth, num_heads=2, num_classes=10)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m


def _cfg(**kw):
    base = dict(steps=6, batch_size=4, lr=1e-3, ema_decay=0.9, log_every=2, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_is_exact(tmp_path):
    sched = ExitSchedule.preset("ase-demo", 4)
    straight = Trainer(_dit(), _cfg(), schedule=sched)
    straight.train(log=None)

    first = Trainer(_dit(), _cfg(), schedule=sched)
    first.train(steps=3, out_dir=tmp_path, log=None)
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint restores it
    resumed = Trainer(_dit(), _cfg(), schedule=sched)
    resumed.load(tmp_path / "checkpoint.pt")
    assert resumed.step == 3
    resumed.train(log=None)

    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    for a, b in zip(straight.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(a, b)
    s1, s2 = straight.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)
    logged = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 3]


def test_ema_update_and_frozen_timestep_embedder():
    m = _dit()
    tr = Trainer(m, _cfg(steps=1, trainable="no-t-embedder", ema_decay=0.75))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    tr.train(log=None)
    for n, p in m.named_parameters():
        if n.startswith("t_embedder."):
            assert torch.equal(p, before[n]) and not p.requires_grad
    ema = dict(tr.ema.named_parameters())
    n = "blocks.0.attn.qkv.weight"
    assert not torch.equal(m.get_parameter(n), before[n])
    torch.testing.assert_close(ema[n], 0.75 * before[n] + 0.25 * m.get_parameter(n), rtol=1e-6, atol=1e-7)
    names = {n for n, _ in trainable_parameters(m, "no-embedders")}
    assert not any(n.startswith(("t_embedder", "y_embedder", "x_embedder")) for n in names)
    assert "adaLN_weight" in names


def test_model_sees_schedule_depths_and_dropped_labels():
    m = _dit()
    sched = ExitSchedule.preset("ase-demo", 4)
    seen = []

    def spy(x, t, y, depth=None):
        seen.append((t.clone(), y.clone(), depth.clone()))
        return m(x, t, y, depth=depth)

    tr = Trainer(m, _cfg(steps=4, batch_size=64, label_dropout=0.3), schedule=sched, forward=spy)
    tr.train(log=None)
    assert len(seen) == 4
    for t, y, depth in seen:
        assert torch.equal(depth, sched.depth(t))
    labels = torch.cat([y for _, y, _ in seen])
    dropped = (labels == m.null_class).float().mean()
    assert 0.15 < dropped < 0.45  # 30% dropout over 256 labels


def test_grad_clip_bounds_the_update():
    m = _dit()
    tr = Trainer(m, _cfg(steps=1, grad_clip=1e-3, lr=1.0))
    metrics = tr.train_step(*next(tr.data.iterate()))
    assert metrics["grad_norm"] > 1e-3  # the raw norm was above the clip
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in tr.params))
    assert total <= 1e-3 * 1.001


def test_trains_from_any_dataset_and_loss_is_finite():
    images = torch.rand(40, 3, 32, 32) * 2 - 1
    ds = torch.utils.data.TensorDataset(images, torch.arange(40) % 10)
    tr = Trainer(_dit(), _cfg(steps=3), data=ds)
    summary = tr.train(log=None)
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["final_loss"]))


def test_paired_noise_trains_on_the_batch_noise():
    """noise="paired" (reflow): the model sees x_t on the line from each image's x0 to its own noise, and the
    target is that noise minus x0; the drawn noise is not used."""
    torch.manual_seed(0)
    m = DiT(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            learn_sigma=False, prediction_type="flow")
    x0, z = torch.rand(3, 32, 32) * 2 - 1, torch.randn(3, 32, 32)
    ds = torch.utils.data.TensorDataset(torch.cat([x0, z])[None].expand(4, -1, -1, -1), torch.arange(4))
    seen = []

    def spy(x_t, t, y, depth=None):
        seen.append((x_t.detach(), t.detach()))
        return m(x_t, t, y, depth=depth) * 0  # velocity 0: the loss is |z - x0|^2, whatever sigma is

    tr = Trainer(m, _cfg(steps=2, label_dropout=0.0, noise="paired"), data=ds, forward=spy)
    summary = tr.train(log=None)
    for x_t, t in seen:
        s = (t / 1000).view(-1, 1, 1, 1)
        torch.testing.assert_close(x_t, (1 - s) * x0 + s * z)
    torch.testing.assert_close(summary["final_loss"], float(((z - x0) ** 2).mean()), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="noise='paired' expected images of 2 x 3 channels"):
        Trainer(m, _cfg(noise="paired", label_dropout=0.0), data=torch.utils.data.TensorDataset(
            torch.zeros(4, 3, 32, 32), torch.arange(4)))
    with pytest.raises(ValueError, match="noise='paired' expected a Dataset"):
        Trainer(m, _cfg(noise="paired", label_dropout=0.0), data="glyphs")
    with pytest.raises(ValueError, match="noise"):
        _cfg(noise="fresh").validate()


def test_bad_config_raises():
    with pytest.raises(ValueError, match="trainable"):
        Trainer(_dit(), _cfg(trainable="heads"))
    with pytest.raises(ValueError, match="ema_decay"):
        Trainer(_dit(), _cfg(ema_decay=1.0))
    with pytest.raises(ValueError, match="schedule"):
        Trainer(_dit(), _cfg(), schedule=[4, 3])
    m = DiT(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null class"):
        Trainer(m, _cfg(label_dropout=0.1))


@pytest.mark.parametrize("field,value", [("lr", float("nan")), ("log_every", 0), ("checkpoint_every", -1),
                                         ("warmup_steps", -1)])
def test_bad_config_numbers_raise(field, value):
    # NaN passed `lr <= 0`; log_every 0 was a ZeroDivisionError mid-run
    with pytest.raises(ValueError, match=field):
        _cfg(**{field: value}).validate()


def test_checkpoint_is_plain_and_records_schedule_and_data(tmp_path):
    sched = ExitSchedule.preset("ase-demo", 4)
    tr = Trainer(_dit(), _cfg(steps=1), schedule=sched)
    tr.train(out_dir=tmp_path, log=None)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # no allowlist needed
    assert isinstance(state["config"], dict) and state["config"]["lr"] == 1e-3
    assert state["schedule"]["table"] == list(sched.table) and state["schedule"]["total_depth"] == 4
    assert state["data"] == "glyphs"
    # an older checkpoint (no schedule/data records) still resumes
    del state["schedule"], state["data"]
    torch.save(state, tmp_path / "old.pt")
    again = Trainer(_dit(), _cfg(steps=1), schedule=sched)
    again.load(tmp_path / "old.pt")
    assert again.step == 1 and again.history == tr.history


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def test_load_refuses_a_file_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": _Evil(marker), "step": 0}, tmp_path / "evil.pt")
    tr = Trainer(_dit(), _cfg(steps=1))
    with pytest.raises(ValueError, match="Trainer.load"):
        tr.load(tmp_path / "evil.pt")
    assert not marker.exists() and tr.step == 0
