"""ASE fine-tuning (and plain training): AdamW, EMA, clipping, λ(t), label dropout, exact resume.

One step: draw the batch for this step, per-sample timesteps, noise and label dropout from a generator
seeded by ``(seed, step)``; exit each sample at ``schedule.depth(t)`` (None: full depth); DiT's loss on the
truncated output; backward; clip; AdamW; EMA. Because every random number of step k depends only on
``(seed, k)``, a run resumed from a checkpoint takes bit-identical steps (same device and library).

The model runs in eval mode: a DiT's own label dropout (train mode) draws unseeded randoms, so the trainer
drops labels itself, seeded.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch

from eekernels.data.batches import batch_source
from eekernels.data.glyphs import mix_seed
from eekernels.serialization import safe_load
from eekernels.training.loss import DiffusionTables, diffusion_loss

TRAINABLE = ("all", "no-t-embedder", "no-embedders")


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of a run (stored in checkpoints and provenance records)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1 + step) / (10 + step)): for short runs from scratch
    label_dropout: float = 0.1
    trainable: str = "all"  # "all" | "no-t-embedder" (the ASE reference) | "no-embedders"
    weighting: str | None = None  # λ(t): None | "min-snr" (or pass a callable/tensor to Trainer)
    seed: int = 0
    amp: str | None = None  # None | "bf16" autocast (the eekernels DiT and U-ViT are autocast-safe)
    log_every: int = 100
    checkpoint_every: int = 0  # 0: only at the end (when an out dir is given)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: `{name}` expected >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig: `{name}` expected >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig: `ema_decay` expected in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"TrainConfig: `label_dropout` expected in [0, 1), got {self.label_dropout}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"TrainConfig: `trainable` expected one of {TRAINABLE}, got {self.trainable!r}")
        if self.amp not in (None, "bf16"):
            raise ValueError(f"TrainConfig: `amp` expected None or 'bf16', got {self.amp!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):  # `lr <= 0` alone lets NaN through
            raise ValueError(f"TrainConfig: `lr` expected a finite number > 0, got {self.lr}")


def schedule_record(schedule) -> dict | None:
    """A plain-dict record of an exit schedule, for checkpoints (None: full depth)."""
    if schedule is None:
        return None
    table = getattr(schedule, "table", None)
    return {"name": getattr(schedule, "name", None) or type(schedule).__name__,
            "table": None if table is None else [int(d) for d in table],
            "total_depth": getattr(schedule, "total_depth", None), "num_timesteps": getattr(schedule, "num_timesteps", None),
            "period": getattr(schedule, "period", None)}


def data_record(data) -> str:
    """What a run trains on, as a string for checkpoints: ``"glyphs"`` or the Dataset's class name."""
    return data if isinstance(data, str) else f"<{type(data).__module__}.{type(data).__qualname__}>"


def trainable_parameters(model: torch.nn.Module, which: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) pairs to optimize: ``all``, ``no-t-embedder`` (ASE reference) or ``no-embedders``."""
    if which not in TRAINABLE:
        raise ValueError(f"trainable_parameters: `which` expected one of {TRAINABLE}, got {which!r}")
    frozen = {"all": (), "no-t-embedder": ("t_embedder.",), "no-embedders": ("t_embedder.", "y_embedder.", "x_embedder.")}[which]
    return [(n, p) for n, p in model.named_parameters() if not n.startswith(frozen)]


class Trainer:
    """Trains ``model`` on ``data`` under ``schedule`` (an ``ExitSchedule`` or anything with ``depth(t)``; None: full depth)."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, data="glyphs", schedule=None,
                 device=None, weighting=None, forward: Callable | None = None, num_workers: int = 0):
        config.validate()
        if schedule is not None and not hasattr(schedule, "depth"):
            raise ValueError(f"Trainer: `schedule` expected an ExitSchedule (with .depth(t)) or None, got {type(schedule).__name__}")
        if config.label_dropout > 0 and getattr(model, "null_class", None) is None:
            raise ValueError("Trainer: `label_dropout` > 0 needs a model with a CFG null class "
                             f"(model.null_class is None); got label_dropout={config.label_dropout}")
        self.config = config
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.schedule = schedule
        self.data_spec = data_record(data)
        self.weighting = weighting if weighting is not None else config.weighting
        self.forward = forward or self.model  # e.g. NaiveExitModel(model) for the baseline
        self.tables = DiffusionTables(device=self.device)
        self.data = batch_source(data, batch_size=config.batch_size, seed=config.seed, device=self.device,
                                 num_workers=num_workers)

        named = trainable_parameters(model, config.trainable)
        names = {n for n, _ in named}
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        self.params = [p for _, p in named]
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay,
                                     betas=(0.9, 0.999), fused=fused or None)
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema_pairs = [(e, p) for e, p in zip(self.ema.parameters(), model.parameters())]
        self.step = 0
        self.history: list[dict] = []

    # ---------------------------------------------------------------- one step
    def _lr(self, step: int) -> float:
        w = self.config.warmup_steps
        return self.config.lr * min(1.0, (step + 1) / w) if w > 0 else self.config.lr

    def _randoms(self, x: torch.Tensor, y: torch.Tensor):
        g = torch.Generator(self.device).manual_seed(mix_seed(self.config.seed + 7919, self.step))
        B = x.shape[0]
        t = torch.randint(0, self.tables.num_timesteps, (B,), generator=g, device=self.device)
        noise = torch.randn(x.shape, generator=g, device=self.device, dtype=x.dtype)
        if self.config.label_dropout > 0 and y is not None:
            drop = torch.rand(B, generator=g, device=self.device) < self.config.label_dropout
            y = torch.where(drop, torch.full_like(y, self.model.null_class), y)
        return t, noise, y

    def train_step(self, x: torch.Tensor, y: torch.Tensor | None) -> dict:
        """One optimizer step on the batch ``(x, y)``; returns detached metrics (device tensors, no sync)."""
        cfg = self.config
        t, noise, y = self._randoms(x, y)
        depth = None if self.schedule is None else self.schedule.depth(t)
        for group in self.opt.param_groups:
            group["lr"] = self._lr(self.step)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
        with autocast:
            terms = diffusion_loss(self.forward, x, t, noise, self.tables, y=y, depth=depth, weighting=self.weighting)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grad_norm = None
        if cfg.grad_clip is not None and cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self._update_ema()
        self.step += 1
        return {"loss": terms["loss"].detach(), "mse": terms["mse"].mean(),
                "grad_norm": grad_norm, "mean_depth": None if depth is None else depth.float().mean()}

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.config.ema_decay
        if self.config.ema_warmup:
            decay = min(decay, (1 + self.step) / (10 + self.step))
        ema, live = zip(*self._ema_pairs)
        torch._foreach_lerp_(list(ema), list(live), 1.0 - decay)

    # ---------------------------------------------------------------- the loop
    def train(self, steps: int | None = None, out_dir: str | os.PathLike | None = None, progress: bool = False,
              log: Callable[[str], None] | None = print, time_budget_s: float | None = None) -> dict:
        """Run until ``steps`` (default ``config.steps``) total steps, or until ``time_budget_s`` seconds pass.

        Logs the mean loss every ``log_every`` steps; with ``out_dir``, writes ``checkpoint.pt`` every
        ``checkpoint_every`` steps and at the end, plus ``train_log.jsonl``. Returns a summary dict.
        """
        cfg = self.config
        total = cfg.steps if steps is None else int(steps)
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        batches = self.data.iterate(start=self.step)  # batch k belongs to step k: resumes exactly
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, desc="finetune" if self.schedule is not None else "train",
                       unit="step", dynamic_ncols=True)
        t0 = time.perf_counter()
        start_step = self.step
        window = []
        last_loss = float("nan")
        while self.step < total:
            x, y = next(batches)
            metrics = self.train_step(x, y)
            window.append(metrics["loss"])
            if bar is not None:
                bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == total:
                last_loss = float(torch.stack(window).mean())  # one host sync per log interval
                window.clear()
                rec = {"step": self.step, "loss": round(last_loss, 5), "lr": self._lr(self.step - 1),
                       "seconds": round(time.perf_counter() - t0, 2)}
                if metrics["mean_depth"] is not None:
                    rec["mean_depth"] = round(float(metrics["mean_depth"]), 3)
                self.history.append(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}")
                if log is not None:
                    (bar.write if bar is not None else log)(json.dumps(rec))
                if out is not None:
                    with open(out / "train_log.jsonl", "a") as f:
                        f.write(json.dumps(rec) + "\n")
            if out is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save(out / "checkpoint.pt")
            if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                break
        if window:
            last_loss = float(torch.stack(window).mean())
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        if out is not None:
            self.save(out / "checkpoint.pt")
        return {"steps": self.step, "steps_this_run": self.step - start_step, "final_loss": last_loss,
                "seconds": round(seconds, 2),
                "steps_per_s": round((self.step - start_step) / max(seconds, 1e-9), 3)}

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything a resume needs, as tensors and plain containers only (loads with ``weights_only=True``)."""
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "step": self.step,
            "config": dataclasses.asdict(self.config),  # a dict, not the dataclass: needs no allowlist to load
            "schedule": schedule_record(self.schedule),
            "data": self.data_spec,
            "history": list(self.history),
            "rng": rng,
            "model_kwargs": model_kwargs(self.model),
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"Trainer.load_state_dict: expected a checkpoint dict, got {type(state).__name__}")
        for key in ("model", "ema", "opt", "step"):
            if key not in state:
                raise ValueError(f"Trainer.load_state_dict: checkpoint lacks {key!r}; has {sorted(state)}")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        rng = state.get("rng", {})
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"].cpu())  # map_location may have moved it; RNG states live on the host
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([r.cpu() for r in rng["cuda"]])

    def save(self, path) -> None:
        """Write the checkpoint atomically (a temp file, then rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path) -> None:
        """Resume from a checkpoint written by :meth:`save` (``weights_only=True``: nothing in it is executed)."""
        self.load_state_dict(safe_load(path, where="Trainer.load", map_location=self.device))


def model_kwargs(model) -> dict | None:
    """Constructor kwargs that rebuild an eekernels ``DiT`` of this shape (None for other models)."""
    needed = ("input_size", "patch_size", "in_channels", "hidden_size", "num_blocks", "num_heads", "learn_sigma")
    if not all(hasattr(model, k) for k in needed) or not hasattr(model, "blocks"):
        return None
    fc1 = model.blocks[0].mlp.fc1
    return {
        "input_size": model.input_size, "patch_size": model.patch_size, "in_channels": model.in_channels,
        "hidden_size": model.hidden_size, "depth": model.num_blocks, "num_heads": model.num_heads,
        "mlp_ratio": fc1.out_features / fc1.in_features, "num_classes": model.num_classes,
        "class_dropout_prob": 0.1 if model.null_class is not None else 0.0, "learn_sigma": model.learn_sigma,
    }
