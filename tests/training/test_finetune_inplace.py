"""``eekernels.finetune_inplace(pipe, inputs=...)``: fine-tuning the user's own diffusers denoiser for early exit,
written as what a diffusers user loads. Tiny random pipelines (tests/test_inplace.py), float32, CPU.

- LoRA (SD3, FLUX): a few steps train only the adapter (the base weights are bit-identical, the adapter's B leaves zero),
  the distillation loss at the schedule's depths drops, the written LoRA loads with ``load_lora_weights`` into a
  fresh plain pipeline, which then gives the fine-tuned pipeline's images, at full depth and accelerated at the
  trained schedule; the rank/alpha scale travels with the file;
- full weights (DiT, DDIM's U-Net, PixArt, on a calibrated schedule): the trained depths are the calibrated plan's, the weights change,
  ``save_pretrained`` writes the diffusers layout and ``from_pretrained`` gives the fine-tuned weights and images;
- the pipeline is left as given (an accelerated one keeps its schedule; flags and mode restored);
- bad inputs are refused by name before any model call.
"""
import json

import pytest
import torch

import eekernels
from eekernels import ExitSchedule, inplace
from tests.test_calibration_inplace import calibration_kwargs
from tests.test_inplace import _pipeline


def _images(pipe, name, seed=7):
    kw = calibration_kwargs(name, seed=seed)
    kw["generator"] = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return torch.as_tensor(pipe(**kw, output_type="latent").images)


@pytest.mark.parametrize("name", ("sd3", "flux"))
def test_lora_is_written_and_a_fresh_plain_pipeline_loads_it(name, tmp_path):
    pipe = _pipeline(name)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    schedule = ExitSchedule.piecewise([3] * 4 + [1] * 6)  # 3 blocks at high noise, 1 at low
    inputs = [calibration_kwargs(name, s) for s in (0, 1)]
    rep = eekernels.finetune_inplace(pipe, inputs=inputs, schedule=schedule, steps=6, lr=1e-2, lora_rank=2,
                                     lora_alpha=4, out=tmp_path)
    model = pipe.transformer
    assert rep["written"] == "lora" and rep["calls"] == 6 and set(rep["depths"]) == {1, 3}
    assert rep["loss_after"] < rep["loss_before"], rep
    sd = model.state_dict()
    lora = {k: v for k, v in sd.items() if ".eekernels." in k}
    assert lora and rep["trainable"] == sum(v.numel() for v in lora.values())
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # trained (B starts at zero)
    for k, v in base.items():  # the base weights are untouched (peft names them base_layer)
        key = k if k in sd else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(sd[key], v), k
    assert inplace.controller(model) is None
    assert all(p.requires_grad == (".eekernels." not in n) for n, p in model.named_parameters())  # as built, adapter off

    fresh = _pipeline(name)
    assert all(torch.equal(fresh.transformer.state_dict()[k], v) for k, v in base.items())  # same base
    plain = _images(fresh, name)
    fresh.load_lora_weights(tmp_path)
    want = _images(pipe, name)
    got = _images(fresh, name)
    assert not torch.equal(got, plain)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for p in (pipe, fresh):  # and at the trained depths, in place
        eekernels.accelerate(p, schedule=schedule)
    torch.testing.assert_close(_images(fresh, name), _images(pipe, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ("dit", "ddim", "pixart"))
def test_full_weights_on_a_calibrated_schedule_reload_with_from_pretrained(name, tmp_path):
    pipe = _pipeline(name)
    dname = "unet" if name == "ddim" else "transformer"
    inputs = [calibration_kwargs(name, s) for s in (0, 1)]
    sched = eekernels.calibrate(pipe, inputs=inputs, budget=0.7, select="proxy")
    model = getattr(pipe, dname)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = eekernels.finetune_inplace(pipe, inputs=inputs, schedule=sched, steps=4, lr=1e-3, out=tmp_path)
    assert rep["written"] == "pretrained" and rep["depths"] == sched.calibration.plan * 2
    assert rep["trainable"] == sum(p.numel() for p in model.parameters())
    after = model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index[dname] == ["diffusers", type(model).__name__]
    missing = {k: None for k, v in pipe.components.items() if v is None}
    loaded = type(pipe).from_pretrained(tmp_path, **missing)
    loaded.set_progress_bar_config(disable=True)
    sd = getattr(loaded, dname).state_dict()
    assert list(sd) == list(after) and all(torch.equal(sd[k], after[k]) for k in sd)
    assert torch.equal(_images(loaded, name), _images(pipe, name))


def test_an_accelerated_pipeline_keeps_its_schedule_and_trains_for_it():
    pipe = _pipeline("sd3")
    mine = ExitSchedule.piecewise([3] * 5 + [2] * 5)
    eekernels.accelerate(pipe, schedule=mine)
    model = pipe.transformer
    model.train(False)
    model.pos_embed.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    rep = eekernels.finetune_inplace(pipe, inputs=[calibration_kwargs("sd3")], steps=2, lr=1e-3)
    assert rep["written"] is None and set(rep["depths"]) == {2, 3}
    assert inplace.controller(model).schedule is mine and model.training is False
    assert [p.requires_grad for p in model.parameters()] == flags and not all(flags)


def _sd3_bad(**changes):
    kw = dict(inputs=[calibration_kwargs("sd3")], schedule=ExitSchedule([2], 3), steps=2)
    kw.update(changes)
    return kw


BAD = [
    ("inputs", dict(inputs=[])),
    ("steps", dict(steps=0)),
    ("lr", dict(lr=float("nan"))),
    ("grad_clip", dict(grad_clip=-1.0)),
    ("lora_rank", dict(lora_rank=0)),
    ("lora_alpha", dict(lora_alpha=4.0)),  # without lora_rank
    ("lora_targets", dict(lora_rank=2, lora_targets=["no_such_module"])),
    ("lora_targets", dict(lora_rank=2, lora_targets="to_q")),
    ("schedule", dict(schedule="fast")),
    ("schedule", dict(schedule=None)),  # a plain pipeline has no schedule of its own
    ("schedule", dict(schedule=ExitSchedule([9], 9))),  # deeper than the model
    ("denoiser", dict(denoiser="unet")),
    ("out", dict(out=3)),
    ("progress", dict(progress="yes")),
]


@pytest.mark.parametrize("name,changes", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_inputs_are_refused_by_name_before_any_model_call(name, changes):
    pipe = _pipeline("sd3")
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^{name}: "):
        eekernels.finetune_inplace(pipe, **_sd3_bad(**changes))
    assert not calls, "the model ran before the refusal"
    assert inplace.controller(pipe.transformer) is None and not getattr(pipe.transformer, "peft_config", None)
    sd = pipe.transformer.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in before.items())


def test_a_lora_where_diffusers_loads_none_is_refused_by_name(tmp_path):
    # DiT's (and PixArt's) transformer takes no peft adapter: refused before any work
    with pytest.raises(ValueError, match="lora_rank: DiTTransformer2DModel takes no peft adapter"):
        eekernels.finetune_inplace(_pipeline("dit"), inputs=[calibration_kwargs("dit")], schedule=ExitSchedule([2], 4),
                                   lora_rank=2)
    with pytest.raises(ValueError, match="pipe: expected a diffusers pipeline of a registered family"):
        eekernels.finetune_inplace(_pipeline("dit").transformer, inputs=[{}])
