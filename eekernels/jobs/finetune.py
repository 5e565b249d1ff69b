"""``eekernels finetune``: ASE fine-tuning of a model under an exit schedule.

    eekernels finetune --checkpoint glyph-dit --schedule ase-demo --data glyphs --steps 2000 --out runs/ft

``--checkpoint`` is a shipped model name or any file ``eekernels sample`` accepts. At the end the EMA weights
are also written in the shipped format as ``OUT/model.pt`` (loadable by ``eekernels sample --checkpoint``).

Text-to-image families (PixArt, SD3, FLUX) load from their original or diffusers layout (``.pth``/``.pt`` or
``.safetensors``) and train on ``--data caption-glyphs`` (the default for them: captioned procedural glyphs,
3x32x32, so a tiny glyph model of the family; latent models need your own Dataset via
``eekernels.training.Trainer``). PixArt trains with DiT's eps loss, SD3/FLUX with flow matching (``--loss``);
captions are dropped to the model's null condition (PixArt), else to the empty caption (``--caption-dropout``).
At the end the EMA weights are written back in the layout read, as ``OUT/model.safetensors`` for a
``.safetensors`` input and ``OUT/model.pt`` otherwise (both load with ``eekernels sample --checkpoint``).

An ``--out`` folder that already holds a run is never silently reused: pass ``--resume`` to continue it or
``--overwrite`` to start over. ``--resume`` continues from ``OUT/checkpoint.pt`` exactly (model, EMA,
optimizer, step, RNG) under the config the checkpoint was trained with. Only ``--steps`` (to extend a run),
``--log-every`` and ``--checkpoint-every`` may change on resume, as they do not change the steps taken; any
other change (lr, batch size, schedule, data, seed, weighting, trainable, ...) is refused with the list of
what changed, unless ``--allow-config-change`` is given, which continues and logs the changes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

from eekernels.jobs import options

RUN_FILES = ("checkpoint.pt", "train_log.jsonl", "model.pt", "model.safetensors")  # any: the folder holds a run
# ...and what --overwrite removes (the run's files only, never the folder)
OWN_FILES = RUN_FILES + ("summary.json", ".checkpoint.pt.tmp")
# config fields that may change on --resume: they do not change the steps taken
RESUMABLE = ("steps", "log_every", "checkpoint_every")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a shipped model name (e.g. glyph-dit) or a model file")
    p.add_argument("--num-heads", type=int, default=None,
                   help="heads, for a checkpoint of an unnamed DiT or PixArt size")
    p.add_argument("--model-config", default=None, metavar="FILE",
                   help="a PixArt-Σ --checkpoint only: the PixArt-sigma training config (.py, read without running it) "
                        "it was trained with, for its qk_norm / kv_compress_config (the KV compressions without "
                        "weights leave no trace in the checkpoint: without it they are off); the model written at "
                        "the end needs the same file to load")
    p.add_argument("--schedule", default="ase-demo", help="an ExitSchedule preset, 'full', or depths per t-bin '12,12,10,...'")
    p.add_argument("--data", default="auto", choices=("auto", "glyphs", "caption-glyphs"),
                   help="procedural data, no download: 'glyphs' (digit classes) or 'caption-glyphs' (captioned "
                        "digits for text-to-image models); auto: by the model's conditioning")
    p.add_argument("--steps", type=int, required=True,
                   help="total optimizer steps (with --resume, a larger value extends the run)")
    p.add_argument("--out", required=True, help="output folder (checkpoint.pt, train_log.jsonl, model.pt)")
    p.add_argument("--batch-size", type=int, default=64, help="images per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (after warmup)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warmup steps (0: none)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0: off)")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per step; model.pt holds the EMA weights")
    p.add_argument("--label-dropout", type=float, default=0.1,
                   help="fraction of labels replaced by the null class (trains classifier-free guidance)")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="text models: fraction of captions replaced by the unconditional one (trains CFG)")
    p.add_argument("--trainable", default="no-t-embedder",
                   choices=("all", "no-t-embedder", "no-caption", "no-t-embedder-no-caption", "no-embedders"),
                   help="which parameters train: all; all but the timestep MLP (the ASE reference; PixArt: "
                        "t_embedder and t_block); all but the caption projection (text models); all but both; or "
                        "all but every embedder")
    p.add_argument("--weighting", default="none", choices=("none", "min-snr"),
                   help="λ(t) loss weighting (min-snr: epsilon models only)")
    p.add_argument("--loss", default="auto", choices=("auto", "diffusion", "flow"),
                   help="auto: flow matching for flow models (SD3, FLUX), DiT's diffusion loss otherwise")
    p.add_argument("--sigma-sampling", default="logit-normal", choices=("logit-normal", "uniform"),
                   help="flow matching: how sigma is drawn (logit-normal: SD3's recipe)")
    p.add_argument("--logit-mean", type=float, default=0.0, help="flow matching: logit-normal mean")
    p.add_argument("--logit-std", type=float, default=1.0, help="flow matching: logit-normal std")
    p.add_argument("--flow-shift", type=float, default=1.0, help="flow matching: SD3's sigma shift (1: none)")
    p.add_argument("--distill-weight", type=float, default=0.0,
                   help="self-distillation: weight of matching the full-depth teacher where a sample exits early (0: off)")
    p.add_argument("--distill-teacher", default="frozen", choices=("frozen", "ema"),
                   help="self-distillation teacher: a frozen copy of the starting weights, or the EMA")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance-distilled models (FLUX-dev): the guidance value fed during training")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, timesteps, noise and label dropout")
    p.add_argument("--log-every", type=int, default=50, help="log the mean loss every N steps")
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="write OUT/checkpoint.pt every N steps (and always at the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from OUT/checkpoint.pt (same config; --steps may grow)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an OUT that holds a run: its checkpoint, log and model files are removed first")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue even if the config differs from the checkpoint's (the changes are logged)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def _check_args(args) -> None:
    """Refuse bad option values before any work, naming the option, what it expects and what it got."""
    def need(ok: bool, option: str, expected: str, got) -> None:
        if not ok:
            raise ValueError(f"{option}: expected {expected}, got {got!r}")

    for option, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--log-every", args.log_every),
                          ("--checkpoint-every", args.checkpoint_every)):
        need(value >= 1, option, "an integer >= 1", value)
    need(args.warmup_steps >= 0, "--warmup-steps", "an integer >= 0", args.warmup_steps)
    need(math.isfinite(args.lr) and args.lr > 0, "--lr", "a finite number > 0", args.lr)
    need(math.isfinite(args.weight_decay) and args.weight_decay >= 0, "--weight-decay", "a finite number >= 0",
         args.weight_decay)
    need(math.isfinite(args.grad_clip) and args.grad_clip >= 0, "--grad-clip", "a finite number >= 0 (0: off)",
         args.grad_clip)
    # decay 1 would never move the EMA: model.pt would hold the untrained weights
    need(0.0 <= args.ema_decay < 1.0, "--ema-decay", "a number in [0, 1)", args.ema_decay)
    need(0.0 <= args.label_dropout < 1.0, "--label-dropout", "a number in [0, 1)", args.label_dropout)
    need(0.0 <= args.caption_dropout < 1.0, "--caption-dropout", "a number in [0, 1)", args.caption_dropout)
    need(math.isfinite(args.logit_std) and args.logit_std > 0, "--logit-std", "a finite number > 0", args.logit_std)
    need(math.isfinite(args.logit_mean), "--logit-mean", "a finite number", args.logit_mean)
    need(math.isfinite(args.flow_shift) and args.flow_shift > 0, "--flow-shift", "a finite number > 0", args.flow_shift)
    need(math.isfinite(args.distill_weight) and args.distill_weight >= 0, "--distill-weight", "a finite number >= 0",
         args.distill_weight)
    need(args.guidance is None or math.isfinite(args.guidance), "--guidance", "a finite number", args.guidance)
    if args.resume and args.overwrite:
        raise ValueError("--resume/--overwrite: expected at most one (continue the run, or start it over), got both")
    if args.allow_config_change and not args.resume:
        raise ValueError("--allow-config-change: expected only with --resume, got it without --resume")
    if args.data not in ("auto", "glyphs", "caption-glyphs"):
        raise ValueError(f"--data: the CLI offers 'glyphs' and 'caption-glyphs' (use eekernels.training.Trainer "
                         f"for your own Dataset), got {args.data!r}")
    need(args.num_heads is None or args.num_heads >= 1, "--num-heads", "an integer >= 1", args.num_heads)
    if args.device is not None:
        options.parse_device(args.device, "--device")
    options.output_folder(args.out, "--out", files=OWN_FILES)
    options.model_config(args.model_config, args.checkpoint)


def resolve_data(spec: str, model) -> str:
    """``--data`` for ``model``: auto picks caption-glyphs for a text model, glyphs otherwise; a mismatch, or
    data the model cannot take (channels, size), is a ValueError naming ``--data``."""
    text = getattr(model, "condition", "label") == "text"
    data = ("caption-glyphs" if text else "glyphs") if spec == "auto" else spec
    if text != (data == "caption-glyphs"):
        raise ValueError(f"--data: {data!r} does not fit {type(model).__name__} (a "
                         f"{'text' if text else 'class'}-conditioned model); expected "
                         f"{'caption-glyphs' if text else 'glyphs'}")
    size = getattr(model, "input_size", None)
    multiple = getattr(model, "input_multiple", 1) or 1
    if model.in_channels != 3 or (size is not None and size != 32) or 32 % multiple:
        raise ValueError(f"--data: {data} are 3x32x32 images; {type(model).__name__} takes {model.in_channels} "
                         f"channels at size {size or f'a multiple of {multiple}'} (a latent model needs its own "
                         "latent Dataset: use eekernels.training.Trainer)")
    return data


def config_changes(state: dict, config, schedule: dict | None, data: str, model=None) -> dict:
    """``{field: (old, new)}`` for what differs between a checkpoint's run and this one (RESUMABLE fields aside),
    the model's options its weights cannot show (``model_options``: ``--model-config``'s KV compression) included.

    A field an older checkpoint does not record is not compared.
    """
    old = dict(state.get("config") or {})
    new = dataclasses.asdict(config)
    changes = {k: (old[k], new[k]) for k in new if k in old and k not in RESUMABLE and old[k] != new[k]}

    def shape(rec):  # two spellings of one table are the same schedule: compare all but the name
        return None if rec is None else {k: v for k, v in rec.items() if k != "name"}

    if "schedule" in state and shape(state["schedule"]) != shape(schedule):
        changes["schedule"] = (state["schedule"], schedule)
    if "data" in state and state["data"] != data:
        changes["data"] = (state["data"], data)
    from eekernels.training.trainer import model_options

    if model is not None and "model_options" in state and state["model_options"] != model_options(model):
        changes["model_options"] = (state["model_options"], model_options(model))
    return changes


def _load(spec: str, device, num_heads, config):
    from eekernels.models.pretrained import load_diffusion_model

    model = load_diffusion_model(spec, device, num_heads=num_heads, option="--checkpoint", config=config,
                                 config_option="--model-config")[0]
    if getattr(model, "kv_compress_config", None) is not None and getattr(model, "source_layout", None) == "diffusers":
        # the EMA weights are written back in the layout read, and diffusers' layout has no KV compression
        raise ValueError(f"--model-config: {spec!r} is in diffusers' layout, which cannot hold the KV compression "
                         f"{model.kv_compress_config} (finetune writes the model back in the layout it read); give "
                         "the checkpoint in PixArt-sigma's layout (PixArt.from_checkpoint(...).state_dict_in('original'))")
    return model


def run(args) -> int:
    from eekernels.schedules import ExitSchedule
    from eekernels.models.pretrained import save_model_file
    from eekernels.serialization import safe_load
    from eekernels.training.trainer import TrainConfig, Trainer, data_record, model_kwargs, schedule_record

    _check_args(args)
    out = Path(args.out)
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not (args.resume or args.overwrite):
        raise ValueError(f"--out: {out} already holds a run ({', '.join(held)}); pass --resume to continue it, "
                         "or --overwrite to start over (its files are removed first)")
    state = None
    if args.resume:
        ckpt = out / "checkpoint.pt"
        if not ckpt.is_file():
            raise ValueError(f"--resume: no checkpoint at {ckpt}")
        state = safe_load(ckpt, where="eekernels finetune --resume", map_location="cpu")
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"--resume: {ckpt} is not a Trainer checkpoint (expected a dict with 'step', "
                             f"got {type(state).__name__})")
        if args.steps < int(state["step"]):
            raise ValueError(f"--steps: expected >= the checkpoint's step {int(state['step'])} to resume, got {args.steps}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = options.load_checked(lambda: (_load(args.checkpoint, device, args.num_heads, args.model_config),
                                          args.checkpoint), "--checkpoint")[0]
    data = resolve_data(args.data, model)
    text = data == "caption-glyphs"
    schedule = ExitSchedule.from_spec(args.schedule, model, option="--schedule")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      warmup_steps=args.warmup_steps, grad_clip=args.grad_clip or None, ema_decay=args.ema_decay,
                      label_dropout=args.label_dropout, trainable=args.trainable,
                      weighting=None if args.weighting == "none" else args.weighting, seed=args.seed,
                      log_every=args.log_every, checkpoint_every=args.checkpoint_every)
    if text:
        cfg = dataclasses.replace(cfg, caption_dropout=args.caption_dropout, loss=args.loss,
                                  sigma_sampling=args.sigma_sampling, logit_mean=args.logit_mean,
                                  logit_std=args.logit_std, flow_shift=args.flow_shift,
                                  distill_weight=args.distill_weight, distill_teacher=args.distill_teacher,
                                  guidance=args.guidance)
    elif args.distill_weight > 0 or args.loss != "auto":
        cfg = dataclasses.replace(cfg, loss=args.loss, distill_weight=args.distill_weight,
                                  distill_teacher=args.distill_teacher)
    cfg.validate()
    changes = {}
    if state is not None:
        changes = config_changes(state, cfg, schedule_record(schedule), data_record(data), model)
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        if changes and not args.allow_config_change:
            raise ValueError(f"--resume: {out / 'checkpoint.pt'} was trained with a different config ({listed}); "
                             "rerun with its values, or pass --allow-config-change to continue with the new ones "
                             f"(only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} may change freely)")
    trainer = Trainer(model, cfg, data=data, schedule=schedule, device=device)
    if state is not None:
        trainer.load_state_dict(state)
        print(f"eekernels finetune: resumed at step {trainer.step}", flush=True)
        if changes:
            print(f"eekernels finetune: config changed on resume (--allow-config-change): {listed}", flush=True)
            rec = {"step": trainer.step, "event": "config-change",
                   "changes": {k: {"old": old, "new": new} for k, (old, new) in changes.items()}}
            with open(out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
    if args.overwrite:  # only now, once the new run is set up: a failed start keeps the old run
        removed = [name for name in OWN_FILES if (out / name).is_file()]
        for name in removed:
            (out / name).unlink()
        if removed:
            print(f"eekernels finetune: --overwrite: removed {', '.join(removed)} from {out}", flush=True)
    print(f"eekernels finetune: {args.checkpoint} ({model.num_blocks} blocks) on {device}, schedule "
          f"{getattr(schedule, 'name', 'full depth')}, {cfg.steps} steps of {cfg.batch_size}", flush=True)
    summary = trainer.train(out_dir=out, progress=not args.no_progress, log=lambda msg: print(msg, flush=True))
    kwargs = model_kwargs(trainer.ema)
    # full depth is recorded as such, so that `eekernels sample --schedule auto` runs the model at full depth
    sched_meta = ({"preset": "full", "total_depth": model.num_blocks, "table": None} if schedule is None else
                  {"preset": args.schedule, "total_depth": model.num_blocks, "table": list(schedule.table)})
    provenance = {"command": "eekernels finetune " + " ".join(f"{k}={v}" for k, v in vars(args).items()
                                                             if not k.startswith("_")),
                  "config": vars(cfg), **summary, "weights": "EMA", "from": args.checkpoint}
    if changes:
        provenance["config_changes"] = {k: {"old": old, "new": new} for k, (old, new) in changes.items()}
    meta = {"schedule": sched_meta, "provenance": provenance}
    if kwargs is not None:
        save_model_file(trainer.ema, out / "model.pt", "dit", kwargs, meta=meta, dtype=torch.float32)
    elif hasattr(trainer.ema, "state_dict_in"):  # a text family: the layout (and file type) it was read in
        from eekernels.serialization import is_safetensors, save_state

        layout = getattr(model, "source_layout", None)
        target = out / ("model.safetensors" if is_safetensors(args.checkpoint) else "model.pt")
        save_state(trainer.ema.state_dict_in(layout), target,
                   metadata={"eekernels": json.dumps(meta, default=str)} if is_safetensors(target) else None)
        meta["written"] = {"file": target.name, "layout": layout or "default", "weights": "EMA"}
        kv = getattr(model, "kv_compress_config", None)
        if kv is not None and kv["sampling"] != "conv":  # the samplings without weights: nothing in the file
            meta["written"]["model_config"] = args.model_config
            print(f"eekernels finetune: {target.name} runs with the KV compression {kv} only "
                  f"when loaded with the same config: --model-config {args.model_config}", flush=True)
    (out / "summary.json").write_text(json.dumps(meta, indent=1, default=str))
    print(f"eekernels finetune: {json.dumps(summary)}; wrote {out}", flush=True)
    return 0
