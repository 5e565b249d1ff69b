"""``eekernels finetune``: ASE fine-tuning of a model under an exit schedule.

    eekernels finetune --checkpoint glyph-dit --schedule ase-demo --data glyphs --steps 2000 --out runs/ft

``--checkpoint`` is a shipped model name or any file ``eekernels sample`` accepts. ``--resume`` continues
from ``OUT/checkpoint.pt`` exactly (model, EMA, optimizer, step, RNG). At the end the EMA weights are also
written in the shipped format as ``OUT/model.pt`` (loadable by ``eekernels sample --checkpoint``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a shipped model name (e.g. glyph-dit) or a model file")
    p.add_argument("--num-heads", type=int, default=None, help="heads, for a checkpoint of an unnamed DiT size")
    p.add_argument("--schedule", default="ase-demo", help="an ExitSchedule preset, 'full', or depths per t-bin '12,12,10,...'")
    p.add_argument("--data", default="glyphs", help="'glyphs' (procedural, no download)")
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    p.add_argument("--out", required=True, help="output folder (checkpoint.pt, train_log.jsonl, model.pt)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0: off)")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--trainable", default="no-t-embedder", choices=("all", "no-t-embedder", "no-embedders"))
    p.add_argument("--weighting", default="none", choices=("none", "min-snr"), help="λ(t) loss weighting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true")


def _load(spec: str, device, num_heads):
    from eekernels.models.pretrained import PRETRAINED, load_model_file, load_pretrained

    if spec in PRETRAINED:
        return load_pretrained(spec, device)
    if not Path(spec).exists():
        raise ValueError(f"--checkpoint: expected a shipped model {sorted(PRETRAINED)} or a file, got {spec!r}")
    return load_model_file(spec, device, num_heads=num_heads)


def run(args) -> int:
    from eekernels.jobs.sample import resolve_schedule
    from eekernels.models.pretrained import save_model_file
    from eekernels.training.trainer import TrainConfig, Trainer, model_kwargs

    if args.data != "glyphs":
        raise ValueError(f"--data: the CLI offers 'glyphs' (use eekernels.training.Trainer for your own "
                         f"Dataset), got {args.data!r}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _load(args.checkpoint, device, args.num_heads)
    schedule = resolve_schedule(args.schedule, model)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      warmup_steps=args.warmup_steps, grad_clip=args.grad_clip or None, ema_decay=args.ema_decay,
                      label_dropout=args.label_dropout, trainable=args.trainable,
                      weighting=None if args.weighting == "none" else args.weighting, seed=args.seed,
                      log_every=args.log_every, checkpoint_every=args.checkpoint_every)
    trainer = Trainer(model, cfg, data=args.data, schedule=schedule, device=device)
    out = Path(args.out)
    if args.resume:
        ckpt = out / "checkpoint.pt"
        if not ckpt.is_file():
            raise ValueError(f"--resume: no checkpoint at {ckpt}")
        trainer.load(ckpt)
        print(f"eekernels finetune: resumed at step {trainer.step}")
    print(f"eekernels finetune: {args.checkpoint} ({model.num_blocks} blocks) on {device}, schedule "
          f"{getattr(schedule, 'name', 'full depth')}, {cfg.steps} steps of {cfg.batch_size}", flush=True)
    summary = trainer.train(out_dir=out, progress=not args.no_progress, log=lambda msg: print(msg, flush=True))
    kwargs = model_kwargs(trainer.ema)
    meta = {"schedule": None if schedule is None else {"preset": args.schedule, "total_depth": model.num_blocks,
                                                       "table": list(schedule.table)},
            "provenance": {"command": "eekernels finetune " + " ".join(f"{k}={v}" for k, v in vars(args).items()
                                                                      if not k.startswith("_")),
                           "config": vars(cfg), **summary, "weights": "EMA", "from": args.checkpoint}}
    if kwargs is not None:
        save_model_file(trainer.ema, out / "model.pt", "dit", kwargs, meta=meta, dtype=torch.float32)
    (out / "summary.json").write_text(json.dumps(meta, indent=1, default=str))
    print(f"eekernels finetune: {json.dumps(summary)}; wrote {out}")
    return 0
