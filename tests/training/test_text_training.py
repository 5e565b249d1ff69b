"""Text-conditioned ASE fine-tuning: flow matching and the eps loss under per-sample exits (gradients equal the
naive all-blocks-then-pick version), self-distillation, caption dropout, frozen groups, EMA and exact resume."""
import math

import pytest
import torch
import torch.nn as nn

from eekernels import ExitSchedule
from eekernels.models.condition import TextCondition
from eekernels.training import (TrainConfig, Trainer, DiffusionTables, diffusion_loss, flow_loss, frozen_prefixes,
                                sample_sigmas, shift_sigmas, trainable_parameters)
from tests.training._toys import NaiveText, caption_condition, toy_text
from tests.utils import tiny_text_model

DEPTH = torch.tensor([3, 1, 2, 3, 1, 2, 2])  # deepest not first; repeated depths


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _assert_same_grads(fast, naive, tol=2e-5):
    for name in fast:
        scale = naive[name].abs().max().clamp_min(1e-12)
        err = (fast[name] - naive[name]).abs().max() / scale
        assert err < tol, f"{name}: max rel error {err:.2e}"


def _inputs(B=7, C=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, size, size, generator=g) * 2 - 1, torch.randn(B, C, size, size, generator=g)


@pytest.mark.parametrize("pooled", [None, 5])
def test_flow_loss_gradients_equal_the_naive_version(pooled):
    m = toy_text("flow", pooled_dim=pooled)
    x0, noise = _inputs()
    sigma = torch.tensor([0.03, 0.97, 0.41, 0.62, 0.88, 0.15, 0.5])
    y = caption_condition(7, pooled_dim=pooled)
    w = torch.rand(1000) + 0.5

    def loss(fwd):
        return lambda: flow_loss(fwd, x0, sigma, noise, y=y, depth=DEPTH, weighting=w)["loss"]

    fast, naive = _grads(m, loss(m)), _grads(m, loss(NaiveText(m)))
    _assert_same_grads(fast, naive)
    assert fast["blocks.2.fc1.weight"].abs().max() > 0  # only the depth-3 samples reach block 2


def test_flow_loss_terms_in_closed_form():
    m = toy_text("flow")
    x0, noise = _inputs(B=4)
    sigma = torch.tensor([0.1, 0.4, 0.7, 0.95])
    y = caption_condition(4)
    seen = {}

    def spy(x, t, y, depth=None):
        seen["x"], seen["t"] = x, t
        return m(x, t, y, depth=depth)

    terms = flow_loss(spy, x0, sigma, noise, y=y, weighting=lambda t: t / 1000)
    s = sigma.double().view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x"].double(), (1 - s) * x0.double() + s * noise.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen["t"], sigma * 1000)
    v = m(seen["x"], seen["t"], y).double()
    mse = ((noise.double() - x0.double() - v) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(terms["mse"].double(), mse, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["loss"].double(), (mse * sigma.double()).mean(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="sigma"):
        flow_loss(m, x0, sigma * 2, noise, y=y)
    with pytest.raises(ValueError, match="min-snr"):
        flow_loss(m, x0, sigma, noise, y=y, weighting="min-snr")
    with pytest.raises(ValueError, match="velocity"):
        flow_loss(toy_text("epsilon"), x0, sigma, noise, y=y)


def test_sigma_sampling_and_shift():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(20000, g, "cpu", "logit-normal", 0.0, 1.0)
    logit = torch.log(s / (1 - s))
    assert abs(float(logit.mean())) < 0.03 and abs(float(logit.std()) - 1.0) < 0.03
    u = sample_sigmas(20000, g, "cpu", "uniform")
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    torch.testing.assert_close(shift_sigmas(torch.tensor([0.25, 0.5]), 3.0), torch.tensor([0.5, 0.75]))
    with pytest.raises(ValueError, match="mode"):
        sample_sigmas(4, g, "cpu", "cosine")


def test_eps_loss_with_captions_gradients_equal_the_naive_version():
    m = toy_text("epsilon")
    x0, noise = _inputs()
    t = torch.tensor([0, 950, 120, 640, 333, 999, 480])
    y = caption_condition(7)
    tab = DiffusionTables()

    def loss(fwd):
        return lambda: diffusion_loss(fwd, x0, t, noise, tab, y=y, depth=DEPTH, weighting="min-snr")["loss"]

    _assert_same_grads(_grads(m, loss(m)), _grads(m, loss(NaiveText(m))))


@pytest.mark.parametrize("kind", ["flow", "epsilon"])
def test_self_distillation_term(kind):
    m = toy_text(kind)
    teacher = toy_text(kind, seed=5).requires_grad_(False)
    x0, noise = _inputs()
    y = caption_condition(7)
    tab = DiffusionTables()
    sigma = torch.tensor([0.03, 0.97, 0.41, 0.62, 0.88, 0.15, 0.5])
    t = (sigma * 999).long()

    def run(fwd, weight, depth=DEPTH):
        if kind == "flow":
            return flow_loss(fwd, x0, sigma, noise, y=y, depth=depth, teacher=teacher, distill_weight=weight, full_depth=3)
        return diffusion_loss(fwd, x0, t, noise, tab, y=y, depth=depth, teacher=teacher, distill_weight=weight,
                              full_depth=3)

    terms = run(m, 0.7)
    full = DEPTH == 3
    assert torch.all(terms["distill"][full] == 0) and torch.all(terms["distill"][~full] > 0)
    # the term itself: the truncated prediction vs the teacher's full-depth one at the same x_t
    with torch.no_grad():
        if kind == "flow":
            s = sigma.view(-1, 1, 1, 1)
            x_t, tt = (1 - s) * x0 + s * noise, sigma * 1000
        else:
            x_t, tt = tab("sqrt_ac", t) * x0 + tab("sqrt_1m_ac", t) * noise, t
        C = 3
        ref = ((m(x_t, tt, y, depth=DEPTH)[:, :C] - teacher(x_t, tt, y)[:, :C]) ** 2).flatten(1).mean(1) * (~full)
    torch.testing.assert_close(terms["distill"], ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["per_sample"], run(m, 0.0)["per_sample"] + 0.7 * ref, rtol=1e-5, atol=1e-7)
    assert torch.all(run(m, 0.7, depth=3)["distill"] == 0)  # full depth: no distillation term
    fast = _grads(m, lambda: run(m, 0.7)["loss"])
    naive = _grads(m, lambda: run(NaiveText(m), 0.7)["loss"])
    _assert_same_grads(fast, naive)
    assert all(p.grad is None for p in teacher.parameters())


def _cfg(**kw):
    base = dict(steps=4, batch_size=4, lr=1e-3, ema_decay=0.9, log_every=2, seed=3, caption_dropout=0.0)
    base.update(kw)
    return TrainConfig(**base)


class _Captions(torch.utils.data.Dataset):
    """(image, tokens, mask) items with ragged masks."""

    def __init__(self, n=16, size=8, token_dim=12, length=6, pooled_dim=None):
        self.x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.c = caption_condition(n, token_dim, length, pooled_dim, seed=2)

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        c = self.c
        return (self.x[i], c.tokens[i], c.mask[i]) + (() if c.pooled is None else (c.pooled[i],))


def test_caption_dropout_replaces_rows_with_the_null_condition():
    m = toy_text("epsilon")
    seen = []

    def spy(x, t, y, depth=None):
        seen.append((y, m.null_condition(1, 6).tokens.detach().clone()))  # y_embedding trains: this step's
        return m(x, t, y, depth=depth)

    tr = Trainer(m, _cfg(steps=3, batch_size=16, caption_dropout=0.4), data=_Captions(32), forward=spy)
    tr.train(log=None)
    dropped = 0
    for y, null_tokens in seen:
        is_null = (y.tokens == null_tokens).flatten(1).all(1)
        dropped += int(is_null.sum())
        assert torch.all(y.mask[is_null]) and not torch.all(y.mask[~is_null])  # null mask is all ones
    assert 0.15 < dropped / 48 < 0.65 and tr.null_source == "model"


def test_caption_dropout_without_a_null_condition():
    m = toy_text("flow")
    m.has_null = False
    with pytest.raises(ValueError, match="null_condition"):
        Trainer(m, _cfg(caption_dropout=0.1), data=_Captions()).train(log=None)
    null = TextCondition(torch.zeros(1, 6, 12), torch.ones(1, 6, dtype=torch.bool))
    tr = Trainer(m, _cfg(caption_dropout=0.5, steps=2), data=_Captions(), null_condition=null)
    assert tr.train(log=None)["steps"] == 2


def test_flow_trainer_depths_follow_sigma_times_1000():
    m = toy_text("flow")
    sched = ExitSchedule.piecewise([3, 3, 2, 2, 1], total_depth=3)
    seen = []

    def spy(x, t, y, depth=None):
        seen.append((t.clone(), depth.clone()))
        return m(x, t, y, depth=depth)

    tr = Trainer(m, _cfg(steps=3, batch_size=8, flow_shift=3.0), data=_Captions(), schedule=sched, forward=spy)
    assert tr.loss_kind == "flow"
    tr.train(log=None)
    for t, depth in seen:
        assert t.dtype == torch.float32 and 0 < float(t.min()) and float(t.max()) < 1000
        assert torch.equal(depth, sched.depth(t))


def test_frozen_groups_match_by_prefix_across_layouts():
    m = toy_text("epsilon")
    assert frozen_prefixes(m, "no-t-embedder") == ("t_embedder.", "t_block.")
    assert frozen_prefixes(m, "no-caption") == ("y_embedder.",)
    names = {n for n, _ in trainable_parameters(m, "no-t-embedder-no-caption")}
    assert not any(n.startswith(("t_embedder.", "t_block.", "y_embedder.")) for n in names)
    assert "blocks.0.qkv.weight" in names and "y_embedding" in names

    def module(*names):  # a module whose parameters have these dotted names
        root = nn.Module()
        for name in names:
            mod = root
            for part in name.split(".")[:-1]:
                if not hasattr(mod, part):
                    mod.add_module(part, nn.Module())
                mod = getattr(mod, part)
            mod.register_parameter(name.split(".")[-1], nn.Parameter(torch.zeros(1)))
        root.condition = "text"
        return root

    sd3_diffusers = module("context_embedder.weight", "time_text_embed.timestep_embedder.linear_1.weight",
                           "time_text_embed.text_embedder.linear_1.weight", "transformer_blocks.0.ff.net.0.weight")
    assert frozen_prefixes(sd3_diffusers, "no-caption") == ("context_embedder.",)
    assert frozen_prefixes(sd3_diffusers, "no-t-embedder") == ("time_text_embed.timestep_embedder.",)
    sd3_ours = module("context_embedder.weight", "t_embedder.mlp.0.weight", "y_embedder.mlp.0.weight", "adaLN_weight")
    assert frozen_prefixes(sd3_ours, "no-caption") == ("context_embedder.",)  # y_embedder is SD3's pooled MLP
    flux_bfl = module("txt_in.weight", "time_in.in_layer.weight", "guidance_in.in_layer.weight", "vector_in.in_layer.weight")
    assert frozen_prefixes(flux_bfl, "no-t-embedder-no-caption") == ("time_in.", "guidance_in.", "txt_in.")
    pixart_diffusers = module("caption_projection.linear_1.weight", "adaln_single.linear.weight")
    assert frozen_prefixes(pixart_diffusers, "no-t-embedder-no-caption") == ("adaln_single.", "caption_projection.")
    with pytest.raises(ValueError, match="caption projection"):
        from eekernels.models import DiT

        frozen_prefixes(DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                            num_classes=10), "no-caption")


def test_frozen_caption_and_t_embedder_do_not_move_and_ema_tracks():
    m = toy_text("flow")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    tr = Trainer(m, _cfg(steps=1, trainable="no-t-embedder-no-caption", ema_decay=0.75, caption_dropout=0.2),
                 data=_Captions())
    tr.train(log=None)
    for n, p in m.named_parameters():
        if n.startswith(("t_embedder.", "t_block.", "y_embedder.")):
            assert torch.equal(p, before[n]) and not p.requires_grad, n
    n = "blocks.1.qkv.weight"
    assert not torch.equal(m.get_parameter(n), before[n])
    ema = dict(tr.ema.named_parameters())
    torch.testing.assert_close(ema[n], 0.75 * before[n] + 0.25 * m.get_parameter(n), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("teacher", ["frozen", "ema"])
def test_text_resume_is_exact_with_distillation(tmp_path, teacher):
    sched = ExitSchedule.piecewise([3, 2, 1], total_depth=3)
    cfg = _cfg(steps=4, caption_dropout=0.3, distill_weight=0.5, distill_teacher=teacher,
               sigma_sampling="uniform", flow_shift=2.0)
    straight = Trainer(toy_text("flow"), cfg, data=_Captions(), schedule=sched)
    straight.train(log=None)
    first = Trainer(toy_text("flow"), cfg, data=_Captions(), schedule=sched)
    first.train(steps=2, out_dir=tmp_path, log=None)
    resumed = Trainer(toy_text("flow", seed=9), cfg, data=_Captions(), schedule=sched)  # other init: restored
    resumed.load(tmp_path / "checkpoint.pt")
    resumed.train(log=None)
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    for a, b in zip(straight.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(a, b)
    if teacher == "frozen":
        for a, b in zip(straight.teacher.parameters(), resumed.teacher.parameters()):
            assert torch.equal(a, b)
        init = toy_text("flow")  # the frozen teacher is the starting weights
        assert all(torch.equal(a, b) for a, b in zip(straight.teacher.parameters(), init.parameters()))
    else:
        assert straight.teacher is straight.ema


def test_trains_on_caption_glyphs():
    m = toy_text("epsilon", input_size=32, patch=8, token_dim=16, length=10)
    tr = Trainer(m, _cfg(steps=2, caption_dropout=0.5), data="caption-glyphs")
    assert tr.data_spec == "caption-glyphs"
    summary = tr.train(log=None)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    with pytest.raises(ValueError, match="caption-glyphs"):
        Trainer(m, _cfg(), data="glyphs")


def test_bad_text_config_raises():
    for field, value in (("loss", "l1"), ("sigma_sampling", "cosine"), ("flow_shift", 0.0), ("logit_std", -1.0),
                         ("distill_weight", -0.1), ("distill_teacher", "student"), ("caption_dropout", 1.0)):
        with pytest.raises(ValueError, match=field):
            _cfg(**{field: value}).validate()


# ---------------------------------------------------------------- the real text families, tiny configs
_tiny = tiny_text_model


def test_pixart_caption_glyph_finetune_drops_to_its_learned_null_caption():
    m = _tiny("pixart")
    m = type(m)(sample_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=3, num_heads=2,
                caption_channels=12, model_max_length=10)
    for p in m.parameters():  # zero-initialized layers would get no gradient upstream of them
        nn.init.normal_(p, std=0.05)
    sched = ExitSchedule.piecewise([3, 2, 1], total_depth=3)
    tr = Trainer(m, _cfg(steps=2, caption_dropout=0.5, trainable="no-t-embedder-no-caption", weighting="min-snr",
                         distill_weight=0.3), data="caption-glyphs", schedule=sched)
    assert tr.loss_kind == "diffusion" and tr.data.data.length == 10
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    summary = tr.train(log=None)
    assert tr.null_source == "model" and math.isfinite(summary["final_loss"])
    frozen = frozen_prefixes(m, "no-t-embedder-no-caption")
    assert "y_embedder." in frozen and "t_block." in frozen
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) == n.startswith(frozen), n


@pytest.mark.parametrize("name", ["sd3", "pixart", "flux"])
def test_real_family_gradients_equal_the_naive_version(name):
    m = _tiny(name)
    B, C = 5, m.in_channels
    size = m.input_size or 8
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(B, C, size, size, generator=g), torch.randn(B, C, size, size, generator=g)
    y = caption_condition(B, m.token_dim, 6, m.pooled_dim)
    if name == "sd3":
        y = TextCondition(y.tokens, None, y.pooled)  # SD3 attends every token
    if "guidance" in m.condition_extras:
        y = TextCondition(y.tokens, y.mask, y.pooled, {"guidance": torch.full((B,), 3.5)})
    depth = torch.tensor([m.num_blocks, 1, 2, m.num_blocks, 1])
    if getattr(m, "prediction", "epsilon") == "flow":
        sigma = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7])
        fn = lambda fwd: lambda: flow_loss(fwd, x0, sigma, noise, y=y, depth=depth)["loss"]  # noqa: E731
    else:
        t = torch.tensor([3, 900, 500, 250, 750])
        tab = DiffusionTables()
        fn = lambda fwd: lambda: diffusion_loss(fwd, x0, t, noise, tab, y=y, depth=depth)["loss"]  # noqa: E731
    _assert_same_grads(_grads(m, fn(m)), _grads(m, fn(NaiveText(m))), tol=5e-5)
