"""Train small text-to-image glyph models (a PixArt-family eps model and an SD3-family flow-matching MMDiT) on
captioned procedural glyphs, then their ASE fine-tunes, and measure what the fine-tuning buys.

    python python/train_text_glyphs.py --out out/text-glyphs --device cuda --minutes 20          # the GPU run
    python python/train_text_glyphs.py --out /tmp/tg --quick                                      # CPU, < 1 min
    python python/train_text_glyphs.py --out /tmp/tg --minutes 2 --families mmdit --patch 4       # CPU check

Data: ``eekernels.data.captions`` ("a small red seven on the left", rendered with those attributes; a fixed
token-embedding table, no download). Per family: (1) the base model from scratch at full depth (PixArt: DiT's
eps + vb loss, caption dropout to its learned null caption; MMDiT: flow matching, logit-normal sigma, caption
dropout to the empty caption); (2) its ASE fine-tuning under ``--schedule`` (all but the timestep MLP train,
optional self-distillation from the frozen base, ``--distill-weight``); (3) the held-out loss on a fixed batch
(fixed captions, timesteps and noise) for base at full depth, base under the schedule and the fine-tune
under the schedule: the fine-tune should close most of the gap the truncation opens.

Writes to --out: ``glyph-<family>.safetensors`` and ``glyph-<family>-ase.safetensors`` (the EMA weights; MMDiT in
the diffusers layout, PixArt in the original one, which keeps its learned null caption; loadable by ``eekernels.models.pretrained.load_model_file`` / ``eekernels sample
--checkpoint``), ``PROVENANCE-text.json`` (command, seeds, configs, loss curves, the held-out table) and
``log.txt``. --minutes budgets all trainings together (per family: 70% base, 30% fine-tuning).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "python"))

import torch  # noqa: E402

from eekernels import ExitSchedule, backend  # noqa: E402
from eekernels.data.captions import DEFAULT_LENGTH, CaptionGlyphs  # noqa: E402
from eekernels.data.glyphs import generator_for  # noqa: E402
from eekernels.models.condition import TextCondition  # noqa: E402
from eekernels.models.pretrained import load_model_file  # noqa: E402
from eekernels.serialization import save_state  # noqa: E402
from eekernels.training import DiffusionTables, TrainConfig, Trainer, diffusion_loss, flow_loss  # noqa: E402

QUICK = dict(hidden=64, depth=4, patch=8, batch=8, base_steps=6, ft_steps=4, warmup=1, eval_batch=16, log_every=2)
FAMILIES = ("pixart", "mmdit")
TOKEN_DIM, POOLED_DIM = 32, 32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--minutes", type=float, default=20.0, help="time budget for all trainings (0: no limit)")
    p.add_argument("--quick", action="store_true", help="toy sizes: an end-to-end check in under a minute on CPU")
    p.add_argument("--families", default="pixart,mmdit", help="comma-separated subset of pixart, mmdit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=256, help="hidden size (MMDiT: heads of 64)")
    p.add_argument("--depth", type=int, default=12, help="blocks")
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--base-steps", type=int, default=100_000, help="step cap (the time share usually ends it first)")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--ft-steps", type=int, default=40_000)
    p.add_argument("--ft-lr", type=float, default=1e-4)
    p.add_argument("--schedule", default="ase-demo", help="ExitSchedule preset for fine-tuning and evaluation")
    p.add_argument("--distill-weight", type=float, default=0.5, help="self-distillation weight in fine-tuning (0: off)")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--eval-batch", type=int, default=512, help="held-out batch for the loss table")
    p.add_argument("--log-every", type=int, default=100, help="log the mean training loss every N steps")
    p.add_argument("--train-backend", default="torch", help="eekernels op backend for training")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
        if args.minutes == p.get_default("minutes"):
            args.minutes = 0.0
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in args.families if f not in FAMILIES]
    if bad:
        p.error(f"--families: expected a subset of {FAMILIES}, got {bad}")
    return args


def build(family: str, args):
    """A fresh glyph model of ``family`` (3x32x32 images, captions of width TOKEN_DIM)."""
    if family == "mmdit":
        from eekernels.models.sd3 import SD3

        if args.hidden % 64:
            raise ValueError(f"--hidden: the MMDiT uses heads of 64 (what its loader assumes without QK-norm), "
                             f"expected a multiple of 64, got {args.hidden}")
        return SD3(sample_size=32, patch_size=args.patch, in_channels=3, out_channels=3, num_layers=args.depth,
                   attention_head_dim=64, num_attention_heads=args.hidden // 64, joint_attention_dim=TOKEN_DIM,
                   pooled_projection_dim=POOLED_DIM, pos_embed_max_size=32 // args.patch)
    from eekernels.models.pixart import PixArt

    return PixArt(sample_size=32, patch_size=args.patch, in_channels=3, hidden_size=args.hidden, depth=args.depth,
                  num_heads=max(1, args.hidden // 64), caption_channels=TOKEN_DIM, learn_sigma=True,
                  model_max_length=DEFAULT_LENGTH)


def reload(path, like, device):
    """The model written at ``path`` (a PixArt of an unnamed size needs its head count: it is not in the weights)."""
    if type(like).__name__ == "PixArt":
        return type(like).from_checkpoint(path, num_heads=like.num_heads).to(device)
    return load_model_file(path, device)


@torch.no_grad()
def held_out_loss(model, schedule, n: int, seed: int, device) -> float:
    """The model's loss (no caption dropout, no distillation) on a fixed batch: fixed glyphs, captions, t, noise."""
    flow = getattr(model, "prediction", "epsilon") == "flow"
    data = CaptionGlyphs(token_dim=model.token_dim, pooled_dim=model.pooled_dim)
    total, done, k = 0.0, 0, 0
    while done < n:
        b = min(256, n - done)
        x, (tok, mask, pooled) = data.batch(b, generator_for(seed, k), device)
        y = TextCondition(tok, None if getattr(model, "family", "") == "SD3" else mask, pooled)
        g = torch.Generator(device).manual_seed(seed * 31 + k)
        noise = torch.randn(x.shape, generator=g, device=device)
        if flow:
            sigma = torch.sigmoid(torch.randn(b, generator=g, device=device)).clamp(1e-5, 1 - 1e-5)
            depth = None if schedule is None else schedule.depth(sigma * 1000)
            loss = flow_loss(model, x, sigma, noise, y=y, depth=depth)["mse"]
        else:
            t = torch.randint(0, 1000, (b,), generator=g, device=device)
            depth = None if schedule is None else schedule.depth(t)
            loss = diffusion_loss(model, x, t, noise, DiffusionTables(device=device), y=y, depth=depth)["mse"]
        total += float(loss.sum())
        done += b
        k += 1
    return total / n


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from train_glyphs import RunLog

    log = RunLog(out)

    command = "python python/train_text_glyphs.py " + " ".join(sys.argv[1:] if argv is None else argv)
    budget = args.minutes * 60 / len(args.families) if args.minutes > 0 else None
    log(f"device {device}, torch {torch.__version__}; {command}")
    record = {"command": command, "seed": args.seed, "device": str(device), "date": time.strftime("%Y-%m-%d"),
              "args": vars(args)}
    for family in args.families:
        torch.manual_seed(args.seed)
        model = build(family, args)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"{family}: {type(model).__name__}, {n_params / 1e6:.2f} M parameters, {model.num_blocks} blocks")
        # ---- base, full depth
        cfg = TrainConfig(steps=args.base_steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.warmup,
                          ema_decay=args.ema, ema_warmup=True, caption_dropout=args.caption_dropout,
                          trainable="all", seed=args.seed, log_every=args.log_every)
        trainer = Trainer(model, cfg, data="caption-glyphs", device=device)
        with backend(args.train_backend):
            summary = trainer.train(log=log, time_budget_s=None if budget is None else 0.7 * budget)
        log(f"{family} base ({trainer.loss_kind} loss, null: {trainer.null_source}): {summary}")
        base_file = out / f"glyph-{family}.safetensors"
        layout = "original" if family == "pixart" else "diffusers"  # diffusers' PixArt layout has no null caption
        save_state(trainer.ema.state_dict_in(layout), base_file)
        base = reload(base_file, model, device)  # round trip through the written file
        # ---- ASE fine-tuning of the written weights
        schedule = ExitSchedule.preset(args.schedule, base.num_blocks)
        ft_model = reload(base_file, model, device)
        ft_cfg = TrainConfig(steps=args.ft_steps, batch_size=args.batch, lr=args.ft_lr, ema_decay=args.ema,
                             caption_dropout=args.caption_dropout, trainable="no-t-embedder", seed=args.seed + 100,
                             distill_weight=args.distill_weight, distill_teacher="frozen",
                             log_every=args.log_every)
        ft = Trainer(ft_model, ft_cfg, data="caption-glyphs", schedule=schedule, device=device)
        with backend(args.train_backend):
            ft_summary = ft.train(log=log, time_budget_s=None if budget is None else 0.3 * budget)
        log(f"{family} ASE fine-tuning under {schedule.name} {list(schedule.table)}: {ft_summary}")
        ft_file = out / f"glyph-{family}-ase.safetensors"
        save_state(ft.ema.state_dict_in(layout), ft_file)
        tuned = reload(ft_file, model, device)
        # ---- held-out loss
        seed = args.seed + 2024
        table = {"base, full depth": held_out_loss(base, None, args.eval_batch, seed, device),
                 "base, schedule": held_out_loss(base, schedule, args.eval_batch, seed, device),
                 "fine-tuned, schedule": held_out_loss(tuned, schedule, args.eval_batch, seed, device)}
        log(f"{family} held-out loss ({args.eval_batch} samples): " + ", ".join(f"{k} {v:.4f}" for k, v in table.items()))
        record[family] = {"class": type(model).__name__, "parameters": n_params, "base": {**summary, "config": vars(cfg),
                          "loss_curve": trainer.history}, "finetune": {**ft_summary, "config": vars(ft_cfg),
                          "schedule": list(schedule.table), "loss_curve": ft.history}, "held_out_loss": table,
                          "files": [base_file.name, ft_file.name]}
        del trainer, ft
        (out / "PROVENANCE-text.json").write_text(json.dumps(record, indent=1, default=str))
    log(f"done; files in {out}")
    log.close()
    return record


if __name__ == "__main__":
    main()
