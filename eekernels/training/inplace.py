"""Fine-tuning a diffusers denoiser for early exit, in place: ``eekernels.finetune_inplace(pipe, inputs=[...], ...)``.

The user's own transformer (or U-Net) object is trained, and what is written is what a diffusers user loads: a LoRA
(``lora_rank=r``: a peft adapter on the model, written with the pipeline's ``save_lora_weights``, loaded with its
``load_lora_weights``) or the full weights in the diffusers layout (``pipe.save_pretrained``, loaded with
``from_pretrained``). Nothing here names a family: the denoiser and its depth come from the family table and the
in-place :class:`~eekernels.inplace.Controller`, as in :mod:`eekernels.pipeline_calibration`.

The objective is ASE's self-distillation with a frozen teacher, on the pipeline's own calls: the calibration-style
``inputs`` (the pipeline's call kwargs, one dict per sample, or reproducible callables) are run once at full depth;
a forward hook records every model call of the pipeline's loop (its exact inputs, its host timestep) and its
full-depth output, the target. Each optimizer step then runs one recorded call (a seeded permutation per epoch) at
the depth ``schedule`` gives that call (``Controller.depth_at``, as the accelerated pipeline will run it; full-depth
calls keep the full model on its target) and minimises the mean squared difference from the target (AdamW, gradient
clipping). No dataset, noise schedule or prediction type is needed: the states are the trajectory's own, whatever
the scheduler, guidance and conditioning of the pipeline.

The pipeline is left as given (accelerated in place with its own schedule, or plain: accelerated for the run with
``kernels=False`` and disabled after); the model's weights are changed (full fine-tuning) or carry the new adapter,
active (LoRA), so the pipeline runs the fine-tuned model afterwards. Its train/eval mode and ``requires_grad`` flags
are restored.
"""
from __future__ import annotations

import inspect
import math
import os
import time

import torch
from torch.utils._pytree import tree_map

#: the default LoRA targets: diffusers' attention projections (every family's ``Attention``)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "eekernels"


def _detach(tree):
    return tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, tree)


class _Recorder:
    """Forward hooks on the denoiser: each call of the pipeline's loop, its inputs, host timestep, loop step and
    full-depth output (the target)."""

    def __init__(self, model, ctl, tap):
        from eekernels.pipeline_calibration import HostTimestep

        self.host_t, self.tap, self.calls = HostTimestep(model, ctl), tap, []
        self.handle = model.register_forward_hook(self._post, with_kwargs=True)

    def _post(self, module, args, kwargs, out):
        from eekernels.pipeline_calibration import _output

        self.calls.append({"args": _detach(args), "kwargs": _detach(kwargs), "t": self.host_t(args, kwargs),
                           "step": self.tap.steps, "target": _output(out).detach().clone()})


def _lora_writer(pipe, dname: str):
    """The pipeline's ``save_lora_weights`` keyword for ``dname`` (``transformer_lora_layers``), or None."""
    save = getattr(type(pipe), "save_lora_weights", None)
    key = f"{dname}_lora_layers"
    if save is None or key not in inspect.signature(save).parameters:
        return None
    return key


def _check(steps, lr, lora_rank, lora_alpha, lora_targets, weight_decay, grad_clip, out, seed, progress):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1 (optimizer steps), got {steps!r}")
    for name, v, low in (("lr", lr, 0.0), ("weight_decay", weight_decay, None)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                (low is not None and v <= low) or v < 0:
            raise ValueError(f"{name}: expected a finite number {'> 0' if low is not None else '>= 0'}, got {v!r}")
    if grad_clip is not None and (isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float))
                                  or not math.isfinite(grad_clip) or grad_clip <= 0):
        raise ValueError(f"grad_clip: expected None or a finite number > 0, got {grad_clip!r}")
    if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise ValueError(f"lora_rank: expected None (full fine-tuning) or an int >= 1, got {lora_rank!r}")
    if lora_alpha is not None and (isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float))
                                   or not math.isfinite(lora_alpha) or lora_alpha <= 0):
        raise ValueError(f"lora_alpha: expected None (the rank) or a finite number > 0, got {lora_alpha!r}")
    if lora_rank is None and lora_alpha is not None:
        raise ValueError(f"lora_alpha: only a LoRA (lora_rank=r) takes lora_alpha, got lora_alpha={lora_alpha!r} "
                         "with lora_rank=None")
    if isinstance(lora_targets, str) or not isinstance(lora_targets, (list, tuple)) or not lora_targets \
            or not all(isinstance(n, str) and n for n in lora_targets):
        raise ValueError(f"lora_targets: expected a non-empty list of module names (e.g. {list(LORA_TARGETS)}), got "
                         f"{lora_targets!r}")
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise ValueError(f"out: expected None or a directory path, got {type(out).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress: expected None or a callable (step, loss), got {type(progress).__name__}")


def finetune_inplace(pipe, *, inputs, schedule=None, steps: int = 100, lr: float = 1e-4,
                     lora_rank: int | None = None, lora_alpha: float | None = None, lora_targets=LORA_TARGETS,
                     denoiser: str | None = None, out: str | os.PathLike | None = None, weight_decay: float = 0.0,
                     grad_clip: float | None = 1.0, seed: int = 0, progress=None) -> dict:
    """Fine-tune ``pipe``'s own denoiser for early exit under ``schedule`` (module docstring); returns a report.

    Args:
        pipe: a diffusers pipeline of a registered family, accelerated in place (``exit_policy="drop"``) or plain.
        inputs: the pipeline's call kwargs per sample (as ``eekernels.calibrate(pipe, inputs=...)`` takes them).
        schedule: the ``ExitSchedule`` to train for (e.g. a calibrated one); None: the pipeline's own (accelerated
            with a schedule).
        lora_rank: None: every parameter is trained (``out`` gets ``pipe.save_pretrained``); r: a LoRA of rank r
            (``lora_alpha``, default r) on the modules named ``lora_targets`` is trained, the rest frozen (``out``
            gets ``save_lora_weights``: load it with ``load_lora_weights``). Needs peft.
        out: where to write the result (None: nothing written).
        progress: callable(step, loss) after each optimizer step.
    Returns: ``{"steps", "calls", "depths", "loss_before", "loss_after", "trainable", "seconds", "written"}``: the
        mean squared distance from the full-depth targets over every recorded call at its depth, before and after.
    """
    from eekernels import families, inplace
    from eekernels.pipeline_calibration import _check_inputs, _Inputs, _output, _pick_denoiser, _StepTap, is_pipeline
    from eekernels.schedules import ExitSchedule

    if not is_pipeline(pipe):
        raise ValueError(f"pipe: expected a diffusers pipeline of a registered family ({families.supported()}), got "
                         f"{type(pipe).__name__}")
    _check_inputs(inputs)
    _check(steps, lr, lora_rank, lora_alpha, lora_targets, weight_decay, grad_clip, out, seed, progress)
    if schedule is not None and not isinstance(schedule, ExitSchedule):
        raise ValueError(f"schedule: expected an eekernels.ExitSchedule or None, got {type(schedule).__name__}")
    family, names = families.family_of_pipeline(pipe)
    dname = _pick_denoiser(pipe, names, denoiser)
    model = getattr(pipe, dname)
    if lora_rank is not None:
        if not hasattr(model, "add_adapter"):
            raise ValueError(f"lora_rank: {type(model).__name__} takes no peft adapter (diffusers' PeftAdapterMixin); "
                             f"expected lora_rank=None (full fine-tuning, written with save_pretrained), got {lora_rank}")
        if out is not None and _lora_writer(pipe, dname) is None:
            raise ValueError(f"lora_rank: {type(pipe).__name__} has no save_lora_weights for its `{dname}` (its "
                             f"load_lora_weights cannot load one); expected lora_rank=None to write full weights, "
                             f"got {lora_rank}")
        if ADAPTER in (getattr(model, "peft_config", None) or {}):
            raise ValueError(f"lora_rank: {type(model).__name__} already has an adapter named {ADAPTER!r} (from an "
                             f"earlier fine-tuning); delete it (model.delete_adapters({ADAPTER!r})) first")
        names_in = [n for n, _ in model.named_modules()]
        missing = [t for t in lora_targets if not any(n == t or n.endswith("." + t) for n in names_in)]
        if missing:
            raise ValueError(f"lora_targets: expected module names of {type(model).__name__}, got {missing} that "
                             "match none")

    ours = inplace.controller(model) is None
    if ours:
        if getattr(pipe, "_eekernels_denoisers", None):
            raise ValueError(f"pipe: its `{dname}` is not accelerated while the pipeline is; call "
                             "eekernels.disable(pipe) or run it once first")
        from eekernels._accelerate import accelerate

        accelerate(pipe, kernels=False)  # fused forwards are for inference; training runs the model's own code
    ctl = inplace.controller(model)
    saved = ctl.schedule
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    tap = rec = None
    try:
        if ctl.policy != "drop":
            raise ValueError(f"pipe: its `{dname}` is accelerated with exit_policy={ctl.policy!r}; fine-tuning "
                             "trains the 'drop' depths (call eekernels.disable(pipe) first)")
        target = schedule if schedule is not None else saved
        if target is None:
            raise ValueError("schedule: expected an ExitSchedule (the depths to fine-tune for; the pipeline runs "
                             "none of its own), got None")
        try:
            ctl.check(target, "finetune_inplace")
        except ValueError as e:
            raise ValueError(f"schedule: {e}") from None

        # 1. record the pipeline's calls at full depth: their inputs and the targets
        runs = _Inputs(pipe, inputs)
        ctl.use(None)
        tap = _StepTap(pipe.scheduler)
        rec = _Recorder(model, ctl, tap)
        start = time.perf_counter()
        for i in range(len(runs)):
            tap.steps = 0
            runs.run(i)
        rec.handle.remove()
        calls = rec.calls
        if not calls:
            raise ValueError("inputs: the pipeline made no call of its denoiser; expected a denoising loop")
        ctl.use(target)
        depths = [ctl.depth_at(c["t"], c["step"]) for c in calls]
        ctl.use(saved)

        # 2. the trainable parameters
        model.eval()
        if lora_rank is not None:
            from peft import LoraConfig

            model.requires_grad_(False)
            model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank,
                                         target_modules=list(lora_targets), init_lora_weights=True),
                              adapter_name=ADAPTER)
            model.set_adapter(ADAPTER)
            params = [p for n, p in model.named_parameters() if f".{ADAPTER}." in n]
            model.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
        else:
            params = list(model.parameters())
            model.requires_grad_(True)

        def loss_of(k):
            c = calls[k]
            with inplace.at_depth(model, depths[k]):
                got = _output(model(*c["args"], **c["kwargs"]))
            return (got.float() - c["target"].float()).square().mean()

        def mean_loss():
            with torch.no_grad():
                return sum(float(loss_of(k)) for k in range(len(calls))) / len(calls)

        before = mean_loss()
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        g = torch.Generator().manual_seed(seed)
        order: list[int] = []
        for step in range(steps):
            if not order:
                order = torch.randperm(len(calls), generator=g).tolist()
            with torch.enable_grad():
                loss = loss_of(order.pop())
                opt.zero_grad(set_to_none=True)
                loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            if progress is not None:
                progress(step + 1, float(loss))
        after = mean_loss()
        seconds = time.perf_counter() - start
    finally:
        if rec is not None:
            rec.handle.remove()
        if tap is not None:
            tap.remove()
        ctl.use(saved)
        for p, flag in flags:
            p.requires_grad_(flag)
        if lora_rank is not None:
            for n, p in model.named_parameters():
                if f".{ADAPTER}." in n:
                    p.requires_grad_(False)
        model.train(was_training)
        if ours:
            inplace.disable(pipe)
        if "runs" in locals():
            runs.restore()

    written = None
    if out is not None:
        os.makedirs(out, exist_ok=True)
        if lora_rank is not None:
            from peft.utils import get_peft_model_state_dict

            key = _lora_writer(pipe, dname)
            kw = {key: get_peft_model_state_dict(model, adapter_name=ADAPTER)}
            meta = key.replace("_lora_layers", "_lora_adapter_metadata")
            if meta in inspect.signature(type(pipe).save_lora_weights).parameters:
                kw[meta] = model.peft_config[ADAPTER].to_dict()  # rank and alpha: the loader scales by them
            type(pipe).save_lora_weights(out, **kw)
            written = "lora"
        else:
            pipe.save_pretrained(out)
            written = "pretrained"
    return {"steps": steps, "calls": len(calls), "depths": depths, "loss_before": before, "loss_after": after,
            "trainable": sum(p.numel() for p in params), "seconds": round(seconds, 4), "written": written}


__all__ = ["finetune_inplace", "LORA_TARGETS"]
