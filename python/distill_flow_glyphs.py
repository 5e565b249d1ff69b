"""Distil the flow glyph DiT into a few-step model by rectified-flow reflow (Liu et al. 2022, "Flow Straight and
Fast"), in one resumable run.

    python python/distill_flow_glyphs.py --teacher glyph-dit-flow --out RUN --pairs 20000 --steps 4000
    python python/distill_flow_glyphs.py --teacher T.pt --out /tmp/d --quick        # toy scale, CPU, < 1 min

Stages (rerun the same command after an interruption: each picks up where it stopped):

1. pairs: the teacher maps noise to images with ``--teacher-sampler`` at ``--teacher-steps`` and CFG
   ``--cfg-scale``. Image i starts from ``seeded_noise`` with seed ``--seed * 1_000_003 + i`` and has label
   i % 10; images are made in chunks of ``--chunk`` written to ``OUT/pairs/NNNNN.pt`` (noise, label, image),
   so a rerun makes only the missing chunks. ``OUT/pairs/manifest.json`` records the teacher and the settings;
   a rerun with other ones is refused.
2. student: initialised from the teacher and trained with flow matching on the straight line from each pair's
   noise to its image (``TrainConfig(noise="paired")``: x_σ = (1 - σ) x0 + σ z, target z - x0), σ drawn by
   ``--sigma-sampling`` (uniform, as reflow). The guidance is distilled in: the pairs were made with CFG, and
   the student trains without label dropout on the conditional label only, so it samples with
   ``cfg_scale=1``: one model evaluation per step instead of two, as the few-step models people run
   (FLUX.1-schnell, the Lightning and Turbo models). One student serves 4 and 8 Euler steps. The trainer
   checkpoint ``OUT/student/checkpoint.pt`` (every ``--checkpoint-every`` steps) resumes it. ``--minutes``
   bounds the pairs and the student together: the student stops at ``--steps`` or when the time is spent.
3. ``OUT/glyph-dit-flow-distilled.pt`` (float16, the shipped format) with its provenance and its sampling
   defaults in ``meta["sampling"]`` (flow_euler, 4 steps, CFG 1; ``eekernels sample`` takes them), and
   ``--samples N``: the judge's accuracy and Fréchet distance of the student at ``--eval-steps`` (CFG 1) and
   of the teacher at the same steps and at ``--teacher-steps`` (CFG ``--cfg-scale``), same noise and labels
   (``train_glyphs.step_sweep``; ``--no-teacher-eval``: the student's rows only). ``--install`` copies the model into ``eekernels/pretrained/`` and adds its
   record to ``PROVENANCE.json`` (whole run: ``PROVENANCE-distilled.json``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "python"))

import torch  # noqa: E402

from eekernels.eval.images import seeded_noise  # noqa: E402
from eekernels.models.pretrained import PRETRAINED, load_diffusion_model, load_model_file, save_model_file  # noqa: E402
from eekernels.samplers import sample  # noqa: E402
from eekernels.samplers.solvers import SOLVERS  # noqa: E402
from eekernels.training import TrainConfig, Trainer, model_kwargs  # noqa: E402
from eekernels.training.loss import SIGMA_SAMPLING  # noqa: E402

NAME = "glyph-dit-flow-distilled"
QUICK = dict(pairs=24, chunk=8, teacher_steps=3, steps=6, batch=8, warmup=1, samples=16, eval_batch=16)
#: what a resumed student must share with the run that started it (the pairs' settings are checked too)
STUDENT_SETTINGS = ("pairs", "batch", "lr", "warmup", "ema", "sigma_sampling", "seed")


def step_list(text: str) -> tuple[int, ...]:
    from train_glyphs import step_list as parse

    return parse(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="glyph-dit-flow", help="the flow model: a shipped name or a model file")
    p.add_argument("--out", required=True, help="output folder (a rerun resumes)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes: an end-to-end check in under a minute on CPU")
    p.add_argument("--install", action="store_true", help="copy the model into eekernels/pretrained/")
    p.add_argument("--seed", type=int, default=0)
    # pairs
    p.add_argument("--pairs", type=int, default=20_000, help="(noise, label, image) triples made by the teacher")
    p.add_argument("--chunk", type=int, default=500, help="pairs per file (the unit of resumption)")
    p.add_argument("--teacher-sampler", default="flow_euler", help="the teacher's solver for the pairs")
    p.add_argument("--teacher-steps", type=int, default=32, help="the teacher's steps for the pairs")
    p.add_argument("--cfg-scale", type=float, default=1.5,
                   help="the teacher's CFG for the pairs (distilled into the student, which samples at CFG 1)")
    # student
    p.add_argument("--steps", type=int, default=4000, help="student optimizer steps")
    p.add_argument("--batch", type=int, default=46)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--sigma-sampling", default="uniform", choices=SIGMA_SAMPLING,
                   help="how the student's training draws σ (uniform: reflow)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--minutes", type=float, default=0.0,
                   help="time budget of the pairs and the student together, from the start of this run (0: none): "
                        "the student stops at --steps or when the budget is spent, whichever comes first (the "
                        "record says how many steps ran)")
    # evaluation
    p.add_argument("--samples", type=int, default=500, help="samples per evaluated setting (0: no evaluation)")
    p.add_argument("--eval-steps", type=step_list, default=(4, 8), help="the student's Euler steps to evaluate")
    p.add_argument("--eval-batch", type=int, default=250)
    p.add_argument("--judge", default="glyph-judge", help="the fidelity judge: a shipped name or a file")
    p.add_argument("--no-teacher-eval", action="store_true",
                   help="evaluate the student only (the teacher's rows at the same seed, samples and judge are its "
                        "own step sweep's, python/train_glyphs.py: the same numbers)")
    args = p.parse_args(argv)
    for name in ("pairs", "chunk", "teacher_steps", "steps", "batch", "eval_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    for name in ("warmup", "samples", "checkpoint_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 0, got {getattr(args, name)}")
    if args.teacher_sampler not in SOLVERS or SOLVERS[args.teacher_sampler].prediction != "flow":
        flow = sorted(k for k, c in SOLVERS.items() if c.prediction == "flow")
        raise ValueError(f"--teacher-sampler: expected a flow solver {flow}, got {args.teacher_sampler!r}")
    check_training_numbers(args)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    return args


def check_training_numbers(args) -> None:
    """The options both distillation scripts share, checked before any work: ``--cfg-scale`` finite, ``--lr`` > 0,
    ``--minutes`` >= 0 (0: no time budget), ``--ema`` in [0, 1)."""
    if not math.isfinite(args.cfg_scale):
        raise ValueError(f"--cfg-scale: expected a finite number, got {args.cfg_scale}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr: expected a finite number > 0, got {args.lr}")
    if not (math.isfinite(args.minutes) and args.minutes >= 0):
        raise ValueError(f"--minutes: expected a finite number >= 0 (0: no time budget), got {args.minutes}")
    if not 0 <= args.ema < 1:
        raise ValueError(f"--ema: expected a decay in [0, 1), got {args.ema}")


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def teacher_file(spec: str) -> Path:
    """The teacher's file: a shipped name's file, or the path given."""
    from eekernels.models.pretrained import pretrained_path

    return pretrained_path(spec) if spec in PRETRAINED else Path(spec)


# ---- 1. pairs --------------------------------------------------------------------------------------------------
def check_resume(path: Path, settings: dict, what: str) -> None:
    """Refuse (before any work) to continue a stage of ``--out`` that was started with other ``settings``;
    else record them in the JSON file ``path``."""
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"--out: {path.parent} holds {what} made with other settings {diff} (was, now); use "
                             "another --out or the same settings")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def make_pairs(teacher, args, pair_dir: Path, device, log) -> dict:
    """Write the missing chunks of (noise, label, image) triples; returns {"seconds", "made", "kept"}."""
    shape = (teacher.in_channels, teacher.input_size, teacher.input_size)
    made = kept = 0
    t0 = time.perf_counter()
    chunks = math.ceil(args.pairs / args.chunk)
    for k in range(chunks):
        path = pair_dir / f"{k:05d}.pt"
        if path.is_file():
            kept += 1
            continue
        idx = range(k * args.chunk, (k + 1) * args.chunk)
        noise = seeded_noise(idx, shape, args.seed * 1_000_003)
        labels = torch.tensor([i % teacher.num_classes for i in idx])
        with torch.no_grad():
            images = sample(teacher, noise.to(device), labels.to(device), sampler=args.teacher_sampler,
                            steps=args.teacher_steps, cfg_scale=args.cfg_scale).float().cpu()
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"index": torch.tensor(list(idx)), "noise": noise, "labels": labels, "images": images}, tmp)
        os.replace(tmp, path)  # a chunk is there whole or not at all
        made += 1
        log(f"pairs: chunk {k + 1}/{chunks} ({(k + 1) * args.chunk} pairs), {time.perf_counter() - t0:.0f} s")
    return {"seconds": round(time.perf_counter() - t0, 1), "chunks_made": made, "chunks_kept": kept}


class Pairs(torch.utils.data.Dataset):
    """The first ``n`` pairs of ``pair_dir`` as ``([image; noise] (2C, H, W), label)`` items (for the Trainer's
    ``noise="paired"``)."""

    def __init__(self, pair_dir: Path, n: int, chunk: int):
        parts = [torch.load(pair_dir / f"{k:05d}.pt", weights_only=True) for k in range(math.ceil(n / chunk))]
        self.x = torch.cat([torch.cat([c["images"], c["noise"]], dim=1) for c in parts])[:n]
        self.y = torch.cat([c["labels"] for c in parts])[:n]

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], self.y[i]


# ---- 2. student --------------------------------------------------------------------------------------------------
def train_student(teacher, data: Pairs, args, out: Path, device, log,
                  time_budget_s: float | None = None) -> tuple[Trainer, dict]:
    student = load_model_file(teacher_file(args.teacher), device)  # a fresh copy of the teacher's weights
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.warmup,
                      ema_decay=args.ema, label_dropout=0.0, trainable="all", seed=args.seed + 1, noise="paired",
                      sigma_sampling=args.sigma_sampling, log_every=2 if args.quick else 100,
                      checkpoint_every=args.checkpoint_every)
    trainer = Trainer(student, cfg, data=data, device=device)
    ckpt = out / "student" / "checkpoint.pt"
    resumed = None
    if ckpt.is_file():
        trainer.load(ckpt)
        resumed = trainer.step
        log(f"student: resumed from {ckpt} at step {resumed}")
    summary = trainer.train(log=log, out_dir=out / "student", time_budget_s=time_budget_s)
    log(f"student: {summary}")
    return trainer, {"config": vars(cfg), **summary, "resumed_from_step": resumed}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher, teacher_name = load_diffusion_model(args.teacher, device, option="--teacher")
    if getattr(teacher, "prediction", "epsilon") != "flow" or teacher.num_classes is None:
        raise ValueError(f"--teacher: expected a class-conditional flow model (prediction 'flow'), got "
                         f"{teacher_name!r} (prediction {getattr(teacher, 'prediction', 'epsilon')!r})")
    if args.cfg_scale != 1 and teacher.null_class is None:
        raise ValueError(f"--cfg-scale: {args.cfg_scale} needs a teacher trained with class dropout (a null class); "
                         f"{teacher_name!r} has none: use --cfg-scale 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from train_glyphs import RunLog

    log = RunLog(out)

    command = "python python/distill_flow_glyphs.py " + " ".join(sys.argv[1:] if argv is None else argv)
    log(f"device {device}, torch {torch.__version__}; {command}")
    t_start = time.time()
    settings = {"teacher_sha256": sha256(teacher_file(args.teacher)), "teacher_sampler": args.teacher_sampler,
                "teacher_steps": args.teacher_steps, "cfg_scale": args.cfg_scale, "seed": args.seed,
                "chunk": args.chunk}
    check_resume(out / "pairs" / "manifest.json", settings, "pairs")
    check_resume(out / "student" / "settings.json", {k: getattr(args, k) for k in STUDENT_SETTINGS}, "a student")
    settings["teacher"] = teacher_name
    pairs = make_pairs(teacher, args, out / "pairs", device, log)
    data = Pairs(out / "pairs", args.pairs, args.chunk)
    budget = max(0.0, args.minutes * 60 - (time.time() - t_start)) if args.minutes else None  # what the pairs left
    trainer, student_rec = train_student(teacher, data, args, out, device, log, time_budget_s=budget)

    sampling = {"sampler": "flow_euler", "steps": min(args.eval_steps), "cfg_scale": 1.0,
                "note": f"guidance-distilled (teacher CFG {args.cfg_scale:g}): sample with cfg_scale=1; "
                        f"measured at {', '.join(map(str, args.eval_steps))} Euler steps"}
    # "distilled_from", not "from": `eekernels sample` shows a fine-tune's "from" model beside it at the same
    # settings, which for a few-step student (4 steps, CFG 1) would misrepresent the teacher
    record = {"command": command, "seed": args.seed, "device": str(device), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "args": vars(args), "method": "rectified-flow reflow (1 round)",
              "distilled_from": teacher_name, "pairs": {**settings, "count": args.pairs, **pairs}, **student_rec,
              "weights": "EMA", "sampling": sampling, "loss_curve": trainer.history}
    record = json.loads(json.dumps(record, default=str))  # plain types only: the file loads with weights_only=True
    meta = {"schedule": None, "sampling": sampling,
            "provenance": {k: v for k, v in record.items() if k not in ("loss_curve", "args")}}
    record["bytes"] = save_model_file(trainer.ema, out / PRETRAINED[NAME], "dit", model_kwargs(trainer.ema), meta=meta)
    del trainer, data
    record_name = "PROVENANCE-distilled.json"
    (out / record_name).write_text(json.dumps({NAME: record}, indent=1, default=str))

    if args.samples:  # the files as shipped (float16), the student at CFG 1 and the teacher at its CFG
        from train_glyphs import step_sweep
        from eekernels.eval import fidelity

        student = load_model_file(out / PRETRAINED[NAME], device)
        judge = load_model_file(teacher_file(args.judge), device)
        teacher_steps = dict.fromkeys((*args.eval_steps, args.teacher_steps))
        runs = [(NAME, n, 1.0) for n in args.eval_steps]
        if not args.no_teacher_eval:
            runs += [(teacher_name, n, args.cfg_scale) for n in teacher_steps]
        sweep = step_sweep({NAME: student, teacher_name: teacher}, judge, runs, num_samples=args.samples,
                           seed=args.seed + 2024, sampler="flow_euler", batch_size=args.eval_batch, device=device,
                           log=log)
        log("\n" + sweep["table"])
        fidelity.save_grid(out / "samples.png", sweep.pop("samples"))
        record["fidelity"] = sweep
        (out / "fidelity.md").write_text(sweep["table"] + "\n")
    record["total_seconds"] = round(time.time() - t_start, 1)
    (out / record_name).write_text(json.dumps({NAME: record}, indent=1, default=str))
    if args.install:
        from train_glyphs import install_record

        install_record(out / PRETRAINED[NAME], NAME, {NAME: record}, record_name)
        log("installed into eekernels/pretrained/")
    log(f"done in {record['total_seconds']} s; files in {out}")
    log.close()
    return record


if __name__ == "__main__":
    main()
