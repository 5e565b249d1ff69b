"""ASE fine-tuning (and plain training): AdamW, EMA, clipping, λ(t), condition dropout, self-distillation,
exact resume.

One step: draw the batch for this step, per-sample timesteps (or flow-matching noise levels), noise and
condition dropout from a generator seeded by ``(seed, step)``; exit each sample at ``schedule.depth(t)``
(None: full depth); the loss on the truncated output (DiT's diffusion loss for epsilon models, flow matching
for ``prediction == "flow"`` models, plus the self-distillation term when ``distill_weight`` > 0); backward;
clip; AdamW; EMA. Because every random number of step k depends only on ``(seed, k)``, a run resumed from a
checkpoint takes bit-identical steps (same device and library).

``noise="paired"`` (rectified-flow reflow): each training image holds ``[x0; noise]`` stacked on channels
(2C), a sample and the noise it was made from, and the loss uses that noise instead of a drawn one, so that a
flow model learns the straight line from each noise to its own sample (Liu et al. 2022).

Class-conditioned models drop labels to their null class (``label_dropout``). Text-conditioned models
(``model.condition == "text"``) take ``(image, (tokens, mask, pooled))`` batches (or a ``TextCondition``) and
replace a ``caption_dropout`` fraction of rows by the unconditional condition: ``model.null_condition`` (PixArt's
learned caption embedding), else the ``null_condition=`` given to the Trainer, else the caption-glyph data's
empty caption.

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

from eekernels.data.batches import BatchSource, batch_source
from eekernels.data.captions import CaptionGlyphs
from eekernels.data.glyphs import mix_seed
from eekernels.models.condition import TextCondition
from eekernels.serialization import safe_load
from eekernels.training.loss import SIGMA_SAMPLING, DiffusionTables, diffusion_loss, flow_loss, sample_sigmas

TRAINABLE = ("all", "no-t-embedder", "no-caption", "no-t-embedder-no-caption", "no-embedders")

def role_prefixes(model: torch.nn.Module, role: str) -> tuple[str, ...]:
    """Parameter-name prefixes of ``role`` ("t-embedder": the timestep MLP; "caption": the caption projection, first
    present wins; "embedders": every embedder) for ``model``, from its family in the table
    (``eekernels.families``); for a model of no known family, every family's, in table order."""
    from eekernels import families

    fam = families.family_of(model)
    pool = [fam] if fam is not None and role in fam.param_roles else list(families.families().values())
    out = []
    for f in pool:
        v = f.param_roles.get(role, ())
        out += v(model) if callable(v) else v
    return tuple(dict.fromkeys(out))


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
    label_dropout: float = 0.1  # class models: labels replaced by the null class
    caption_dropout: float = 0.1  # text models: rows replaced by the unconditional condition (CFG)
    trainable: str = "all"  # TRAINABLE: "all" | "no-t-embedder" (the ASE reference) | "no-caption" | ...
    weighting: str | None = None  # λ(t): None | "min-snr" (eps models; or pass a callable/tensor to Trainer)
    loss: str = "auto"  # "auto" (by model.prediction) | "diffusion" (DiT's eps loss) | "flow" (flow matching)
    sigma_sampling: str = "logit-normal"  # flow matching: "logit-normal" (SD3) | "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float = 1.0  # SD3's timestep shift of the sampled sigmas (1: none)
    noise: str = "draw"  # "draw" (fresh noise per step) | "paired" (reflow: images are [x0; noise] on channels)
    distill_weight: float = 0.0  # self-distillation: weight of the match to the full-depth teacher (0: off)
    distill_teacher: str = "frozen"  # "frozen" (a copy of the starting weights) | "ema"
    guidance: float | None = None  # FLUX-dev style models: the guidance value fed as y.extra["guidance"]
    caption_mask: str = "auto"  # "keep" | "drop" (the model attends every token, padding included) | "auto":
    # drop for models that refuse a mask (SD3, or `accepts_mask = False`), keep otherwise
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
        for name in ("label_dropout", "caption_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TrainConfig: `{name}` expected in [0, 1), got {getattr(self, name)}")
        if self.loss not in ("auto", "diffusion", "flow"):
            raise ValueError(f"TrainConfig: `loss` expected 'auto', 'diffusion' or 'flow', got {self.loss!r}")
        if self.sigma_sampling not in SIGMA_SAMPLING:
            raise ValueError(f"TrainConfig: `sigma_sampling` expected one of {SIGMA_SAMPLING}, got {self.sigma_sampling!r}")
        for name, ok in (("logit_mean", math.isfinite(self.logit_mean)),
                         ("logit_std", math.isfinite(self.logit_std) and self.logit_std > 0),
                         ("flow_shift", math.isfinite(self.flow_shift) and self.flow_shift > 0),
                         ("distill_weight", math.isfinite(self.distill_weight) and self.distill_weight >= 0)):
            if not ok:
                raise ValueError(f"TrainConfig: `{name}` expected a finite number{'' if name == 'logit_mean' else ' > 0' if name != 'distill_weight' else ' >= 0'}, "
                                 f"got {getattr(self, name)}")
        if self.noise not in ("draw", "paired"):
            raise ValueError(f"TrainConfig: `noise` expected 'draw' or 'paired', got {self.noise!r}")
        if self.caption_mask not in ("auto", "keep", "drop"):
            raise ValueError(f"TrainConfig: `caption_mask` expected 'auto', 'keep' or 'drop', got {self.caption_mask!r}")
        if self.distill_teacher not in ("frozen", "ema"):
            raise ValueError(f"TrainConfig: `distill_teacher` expected 'frozen' or 'ema', got {self.distill_teacher!r}")
        if self.guidance is not None and not math.isfinite(self.guidance):
            raise ValueError(f"TrainConfig: `guidance` expected None or a finite number, got {self.guidance}")
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
    """What a run trains on, as a string for checkpoints: ``"glyphs"``, ``"caption-glyphs"`` or the Dataset's
    class name."""
    if isinstance(data, CaptionGlyphs):
        return "caption-glyphs"
    return data if isinstance(data, str) else f"<{type(data).__module__}.{type(data).__qualname__}>"


def _present(names, prefixes) -> tuple[str, ...]:
    return tuple(p for p in prefixes if any(n.startswith(p) for n in names))


def frozen_prefixes(model: torch.nn.Module, which: str) -> tuple[str, ...]:
    """The parameter-name prefixes ``which`` (a ``TRAINABLE`` value) freezes in ``model``.

    ``no-t-embedder``: the timestep MLP (the family's "t-embedder" role, ``role_prefixes``); ``no-caption``: the
    caption projection of a text model (the first of its "caption" prefixes present); ``no-t-embedder-no-caption``: both;
    ``no-embedders``: every embedder. ValueError when a group matches no parameter of ``model`` (e.g.
    ``no-caption`` for a class-conditioned DiT), naming the prefixes tried.
    """
    if which not in TRAINABLE:
        raise ValueError(f"trainable_parameters: `which` expected one of {TRAINABLE}, got {which!r}")
    names = [n for n, _ in model.named_parameters()]
    text = getattr(model, "condition", "label") == "text"
    frozen: tuple[str, ...] = ()
    if which in ("no-t-embedder", "no-t-embedder-no-caption"):
        tried = role_prefixes(model, "t-embedder")
        found = _present(names, tried)
        if not found:
            raise ValueError(f"trainable_parameters: `which`={which!r} found no timestep-MLP parameters in "
                             f"{type(model).__name__} (tried prefixes {tried})")
        frozen += found
    if which in ("no-caption", "no-t-embedder-no-caption"):
        tried = role_prefixes(model, "caption")
        found = _present(names, tried) if text else ()
        if not found:
            raise ValueError(f"trainable_parameters: `which`={which!r} expected a text-conditioned model with a "
                             f"caption projection (prefixes {tried}), got {type(model).__name__} "
                             f"(condition {getattr(model, 'condition', 'label')!r})")
        frozen += found[:1]
    if which == "no-embedders":
        frozen = _present(names, role_prefixes(model, "embedders"))
    return frozen


def trainable_parameters(model: torch.nn.Module, which: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) pairs to optimize: every parameter but those under ``frozen_prefixes(model, which)``."""
    frozen = frozen_prefixes(model, which)
    return [(n, p) for n, p in model.named_parameters() if not n.startswith(frozen)]


def _null_rows(null, batch: int, length: int, device, dtype):
    """``null`` (a TextCondition, or a callable ``(batch, length, device, dtype) -> TextCondition``) as ``batch``
    rows of ``length`` tokens."""
    cond = null(batch, length, device, dtype) if callable(null) else null
    if not isinstance(cond, TextCondition):
        raise ValueError(f"Trainer: `null_condition` expected a TextCondition (or a callable returning one), got "
                         f"{type(cond).__name__}")
    if cond.length != length:
        raise ValueError(f"Trainer: `null_condition` expected {length} tokens (the captions' length), got {cond.length}")
    if cond.batch == 1 and batch > 1:
        cond = cond.map(lambda v: v.expand(batch, *v.shape[1:]))
    if cond.batch != batch:
        raise ValueError(f"Trainer: `null_condition` expected {batch} rows (or 1), got {cond.batch}")
    return cond.to(device)


class Trainer:
    """Trains ``model`` on ``data`` under ``schedule`` (an ``ExitSchedule`` or anything with ``depth(t)``; None: full depth)."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, data="glyphs", schedule=None,
                 device=None, weighting=None, forward: Callable | None = None, num_workers: int = 0,
                 null_condition=None):
        """``data``: ``"glyphs"`` (class models), ``"caption-glyphs"`` (text models: a ``CaptionGlyphs`` sized to
        the model's ``token_dim`` / ``pooled_dim``), a ``CaptionGlyphs``, a ``BatchSource`` or a Dataset.
        ``forward``: what the loss calls instead of the model (e.g. a naive baseline with the same parameters).
        ``null_condition``: a text model's unconditional condition for caption dropout (a ``TextCondition`` of
        1 or B rows, or a callable ``(batch, length, device, dtype)``), when the model has none of its own."""
        config.validate()
        if schedule is not None and not hasattr(schedule, "depth"):
            raise ValueError(f"Trainer: `schedule` expected an ExitSchedule (with .depth(t)) or None, got {type(schedule).__name__}")
        self.text = getattr(model, "condition", "label") == "text"
        if not self.text and config.label_dropout > 0 and getattr(model, "null_class", None) is None:
            raise ValueError("Trainer: `label_dropout` > 0 needs a model with a CFG null class "
                             f"(model.null_class is None); got label_dropout={config.label_dropout}")
        prediction = getattr(model, "prediction", "epsilon")
        self.loss_kind = config.loss if config.loss != "auto" else ("flow" if prediction == "flow" else "diffusion")
        if self.text and isinstance(data, str) and data == "glyphs":
            raise ValueError("Trainer: `data` 'glyphs' has class labels; a text-conditioned model expected "
                             "'caption-glyphs', a CaptionGlyphs or a Dataset of (image, tokens, mask[, pooled])")
        if self.text and isinstance(data, str) and data == "caption-glyphs":
            length = getattr(model, "model_max_length", None)  # PixArt: its learned null caption's rows
            data = CaptionGlyphs(token_dim=int(model.token_dim), pooled_dim=getattr(model, "pooled_dim", None),
                                 **({"length": int(length)} if isinstance(length, int) and length >= 2 else {}))
        if not self.text and isinstance(data, (CaptionGlyphs, str)) and data_record(data) == "caption-glyphs":
            raise ValueError(f"Trainer: `data` caption-glyphs expected a text-conditioned model, got "
                             f"{type(model).__name__} (condition {getattr(model, 'condition', 'label')!r})")
        if config.noise == "paired":
            self._check_paired(model, data)
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
        mode = config.caption_mask
        if mode == "auto":
            refuses = getattr(model, "accepts_mask", True) is False
            mode = "drop" if refuses else "keep"
        self.keep_mask = mode == "keep"
        self._null = null_condition
        #: where dropped captions come from: "given", "model" (its null_condition) or "empty-caption"
        self.null_source = "given" if null_condition is not None else None

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
        self.teacher = None
        if config.distill_weight > 0:
            self.teacher = (self.ema if config.distill_teacher == "ema"
                            else copy.deepcopy(model).eval().requires_grad_(False))
        self.step = 0
        self.history: list[dict] = []

    @staticmethod
    def _check_paired(model, data) -> None:
        """noise='paired' needs a Dataset of ``([x0; noise] (2C, H, W), label)`` items (checked on item 0)."""
        C = getattr(model, "in_channels", None)
        if not isinstance(data, torch.utils.data.Dataset) or isinstance(data, CaptionGlyphs):
            raise ValueError(f"Trainer: noise='paired' expected a Dataset of ([x0; noise], label) items (images of "
                             f"2 x {C} channels), got data={data_record(data)!r}")
        if isinstance(data, torch.utils.data.IterableDataset) or C is None:
            return  # checked on each batch (train_step)
        item = data[0]
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != 2 * C:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Trainer: noise='paired' expected images of 2 x {C} channels ([x0; noise]), got "
                             f"item 0 of shape {got}")

    @staticmethod
    def _empty_caption(source: CaptionGlyphs):
        def null(batch, length, device=None, dtype=None):
            tokens, mask, pooled = source.null(batch, device or "cpu")
            return TextCondition(tokens if dtype is None else tokens.to(dtype), mask, pooled)
        return null

    def _condition(self, y, batch: int):
        """A text batch's ``y`` as a TextCondition on the device (with the config's guidance extra)."""
        if isinstance(y, TextCondition):
            cond = y.to(self.device)
        elif isinstance(y, tuple) and len(y) in (2, 3):
            cond = TextCondition(y[0], y[1], y[2] if len(y) == 3 else None).to(self.device)
        else:
            raise ValueError(f"Trainer: a text-conditioned model expected batches of (image, (tokens, mask, pooled)) "
                             f"or (image, TextCondition), got y of type {type(y).__name__}")
        if self.config.guidance is not None and "guidance" in getattr(self.model, "condition_extras", {}) \
                and "guidance" not in cond.extra:
            cond = TextCondition(cond.tokens, cond.mask, cond.pooled,
                                 {**cond.extra, "guidance": torch.full((batch,), float(self.config.guidance),
                                                                       device=self.device)})
        return cond

    def _resolve_null(self, batch: int, length: int) -> None:
        """Pick the unconditional condition on first use: the model's own (``null_condition``), else, for
        caption-glyph data, its empty caption; else a ValueError asking for ``null_condition=``."""
        try:
            self.model.null_condition(batch, length, self.device, None)
            self._null, self.null_source = self.model.null_condition, "model"
        except ValueError as e:  # SD3 / FLUX: no learned null condition
            source = self.data.data if isinstance(self.data, BatchSource) else None
            if not isinstance(source, CaptionGlyphs):
                raise ValueError(f"Trainer: `caption_dropout` > 0 needs an unconditional condition; "
                                 f"{type(self.model).__name__}.null_condition({batch}, {length}) said: {e}. Pass "
                                 f"null_condition= (e.g. the empty-prompt embeddings), or set caption_dropout=0") from None
            self._null, self.null_source = self._empty_caption(source), "empty-caption"

    def _drop_captions(self, cond: TextCondition, drop: torch.Tensor) -> TextCondition:
        """``cond`` with the rows where ``drop`` is True replaced by the unconditional condition (a new object)."""
        if self._null is None:
            self._resolve_null(cond.batch, cond.length)
        null = _null_rows(self._null, cond.batch, cond.length, self.device, cond.tokens.dtype)
        tokens = torch.where(drop[:, None, None], null.tokens.to(cond.tokens.dtype), cond.tokens)
        mask = None
        if cond.mask is not None or null.mask is not None:
            ones = torch.ones(cond.tokens.shape[:2], dtype=torch.bool, device=self.device)
            a = cond.mask.bool() if cond.mask is not None else ones
            b = null.mask.bool() if null.mask is not None else ones
            mask = torch.where(drop[:, None], b, a)
        pooled = cond.pooled
        if pooled is not None and null.pooled is not None:
            pooled = torch.where(drop[:, None], null.pooled.to(pooled.dtype), pooled)
        return TextCondition(tokens, mask, pooled, dict(cond.extra))

    def _final_mask(self, cond: TextCondition) -> TextCondition:
        return cond if self.keep_mask or cond.mask is None else TextCondition(cond.tokens, None, cond.pooled,
                                                                               dict(cond.extra))

    # ---------------------------------------------------------------- one step
    def _lr(self, step: int) -> float:
        w = self.config.warmup_steps
        return self.config.lr * min(1.0, (step + 1) / w) if w > 0 else self.config.lr

    def _randoms(self, x: torch.Tensor, y):
        """This step's timesteps (long t, or float σ for flow matching), noise and condition dropout."""
        cfg = self.config
        g = torch.Generator(self.device).manual_seed(mix_seed(cfg.seed + 7919, self.step))
        B = x.shape[0]
        if self.loss_kind == "flow":
            t = sample_sigmas(B, g, self.device, cfg.sigma_sampling, cfg.logit_mean, cfg.logit_std, cfg.flow_shift)
        else:
            t = torch.randint(0, self.tables.num_timesteps, (B,), generator=g, device=self.device)
        noise = torch.randn(x.shape, generator=g, device=self.device, dtype=x.dtype)
        if self.text:
            y = self._condition(y, B)
            if cfg.caption_dropout > 0:
                drop = torch.rand(B, generator=g, device=self.device) < cfg.caption_dropout
                y = self._drop_captions(y, drop)
            y = self._final_mask(y)
        elif cfg.label_dropout > 0 and y is not None:
            drop = torch.rand(B, generator=g, device=self.device) < cfg.label_dropout
            y = torch.where(drop, torch.full_like(y, self.model.null_class), y)
        return t, noise, y

    def train_step(self, x: torch.Tensor, y) -> dict:
        """One optimizer step on the batch ``(x, y)``; returns detached metrics (device tensors, no sync).

        ``y``: labels (class models), or ``(tokens, mask, pooled)`` / a ``TextCondition`` (text models)."""
        cfg = self.config
        paired = None
        if cfg.noise == "paired":  # reflow: the batch carries the noise each image was made from
            C = getattr(self.model, "in_channels", x.shape[1] // 2)
            if x.dim() < 2 or x.shape[1] != 2 * C:
                raise ValueError(f"Trainer: noise='paired' expected images of 2 x {C} channels ([x0; noise]), got "
                                 f"shape {tuple(x.shape)}")
            x, paired = x[:, :C], x[:, C:]
        t, noise, y = self._randoms(x, y)
        noise = noise if paired is None else paired.to(noise.dtype)
        t_model = t * self.tables.num_timesteps if self.loss_kind == "flow" else t  # the depth follows t = σ·1000
        depth = None if self.schedule is None else self.schedule.depth(t_model)
        for group in self.opt.param_groups:
            group["lr"] = self._lr(self.step)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
        distill = dict(teacher=self.teacher, distill_weight=cfg.distill_weight,
                       full_depth=getattr(self.model, "num_blocks", None))
        with autocast:
            if self.loss_kind == "flow":
                terms = flow_loss(self.forward, x, t, noise, y=y, depth=depth, weighting=self.weighting,
                                  num_timesteps=self.tables.num_timesteps, **distill)
            else:
                terms = diffusion_loss(self.forward, x, t, noise, self.tables, y=y, depth=depth,
                                       weighting=self.weighting, **distill)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grad_norm = None
        if cfg.grad_clip is not None and cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self._update_ema()
        self.step += 1
        return {"loss": terms["loss"].detach(), "mse": terms["mse"].mean(),
                "distill": None if terms.get("distill") is None else terms["distill"].mean(),
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
            "model_options": model_options(self.model),
            **({"teacher": self.teacher.state_dict()}
               if self.teacher is not None and self.teacher is not self.ema else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"Trainer.load_state_dict: expected a checkpoint dict, got {type(state).__name__}")
        for key in ("model", "ema", "opt", "step"):
            if key not in state:
                raise ValueError(f"Trainer.load_state_dict: checkpoint lacks {key!r}; has {sorted(state)}")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        if self.teacher is not None and self.teacher is not self.ema:
            if "teacher" not in state:
                raise ValueError("Trainer.load_state_dict: this run distills from a frozen teacher, but the "
                                 "checkpoint holds none (it was not trained with distill_teacher='frozen')")
            self.teacher.load_state_dict(state["teacher"])
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


def model_options(model) -> dict:
    """The model's options that its weights cannot show (PixArt-Σ's KV compression: "uniform", "ave" and
    "uniform_every" add no weights), for checkpoints: a resumed run must rebuild the same model."""
    return {k: getattr(model, k) for k in ("kv_compress_config",) if hasattr(model, k)}


def model_kwargs(model) -> dict | None:
    """Constructor kwargs that rebuild an eekernels ``DiT`` of this shape (None for other models)."""
    needed = ("input_size", "patch_size", "in_channels", "hidden_size", "num_blocks", "num_heads", "learn_sigma")
    if getattr(model, "family", "DiT") != "DiT" or getattr(model, "condition", "label") != "label":
        return None
    if not all(hasattr(model, k) for k in needed) or not hasattr(model, "blocks"):
        return None
    fc1 = model.blocks[0].mlp.fc1
    return {
        "input_size": model.input_size, "patch_size": model.patch_size, "in_channels": model.in_channels,
        "hidden_size": model.hidden_size, "depth": model.num_blocks, "num_heads": model.num_heads,
        "mlp_ratio": fc1.out_features / fc1.in_features, "num_classes": model.num_classes,
        "class_dropout_prob": 0.1 if model.null_class is not None else 0.0, "learn_sigma": model.learn_sigma,
        **({"prediction_type": model.prediction} if getattr(model, "prediction", "epsilon") != "epsilon" else {}),
    }
