"""Fine-tune a glyph DiT for one early-exit plan at a solver's knee, through the whole sampling run, in one
resumable run.

    python python/distill_exit_glyphs.py --out RUN                       # DPM-Solver++ 5 steps, CFG 1.5, 0.5
    python python/distill_exit_glyphs.py --out /tmp/d --quick            # toy scale, CPU, < 1 min
    python python/distill_exit_glyphs.py --out RUN2 --init glyph-dit --plan 8,8,8,8,8 --lr 1e-4 \
        --uncond drop,drop,drop,drop,drop --name glyph-dit-guided-dpm5      # 0.5: CFG's unconditional half dropped

The per-timestep ASE loss (``eekernels finetune``) trains each truncated call alone, at x_t drawn from the data.
At a solver's knee a plan has few calls far apart, and an error at an early call moves every later input; here
the loss is on the final sample: ``eekernels.training.trajectory.trajectory_loss`` runs the student under the
plan exactly as ``sample()`` does, with gradients through every call, against the teacher's full-depth sample
from the same noise and label. ``--uncond`` drops CFG's unconditional half at the calls it names (only the
conditional half runs there, and its output is taken as the guided one): the same loss then teaches the student
the guided output in one pass (guidance distillation), which halves those calls' block FLOPs at any depth.

Stages (rerun the same command after an interruption: each picks up where it stopped):

1. pool: the teacher (``--teacher``, full depth) samples ``--pool`` images with ``--sampler`` at ``--sampler-steps``
   and CFG ``--cfg-scale``; image i starts from ``seeded_noise`` with seed ``(--seed + 10) * 1_000_003 + i``
   (far from the evaluation seeds 2024-2026 + i and the calibration seed 9000) and has label i % 10. Written in
   chunks to ``OUT/pool/NNNNN.pt`` (``distill_flow_glyphs.make_pairs``).
2. student: initialised from ``--init`` (default ``glyph-dit-ase``, already fine-tuned for early exit), trained
   on batches drawn from the pool with AdamW, every weight but the timestep MLP (the ASE recipe), gradient clip
   1, EMA ``--ema``. ``OUT/checkpoint.pt`` (every ``--checkpoint-every`` steps: student, EMA, optimizer, step,
   RNG) resumes it exactly.
3. ``OUT/NAME.pt`` (float16, the shipped format): the EMA weights (``--weights student``: the student's own) with
   the plan as their schedule (``meta["schedule"]``: the t-table that puts each call of the run at its planned
   depth) and the run as their sampling defaults (``meta["sampling"]``), so ``eekernels sample --checkpoint
   OUT/NAME.pt`` runs the plan it was trained for. ``--install`` ships it as ``--name`` (``eekernels/pretrained/``,
   ``PROVENANCE.json``).

``benchmarks/knee.py budgets --finetuned OUT/NAME.pt --rows fewer-steps,ase-finetuned,untuned-plan`` measures it
(RESULTS §34 for the block plan, §35 for the unconditional half dropped).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "python"))

import torch  # noqa: E402

from distill_flow_glyphs import (Pairs, check_resume, check_training_numbers, make_pairs, sha256,  # noqa: E402
                                 teacher_file)
from eekernels.calibration import nearest_call_table  # noqa: E402
from eekernels.models.pretrained import load_diffusion_model, save_model_file  # noqa: E402
from eekernels.samplers import make_solver  # noqa: E402
from eekernels.samplers.solvers import SOLVERS  # noqa: E402
from eekernels.schedules import ExitSchedule  # noqa: E402
from eekernels.training import model_kwargs, trainable_parameters  # noqa: E402
from eekernels.training.trajectory import trajectory_loss  # noqa: E402

QUICK = dict(pool=16, chunk=8, steps=4, batch=4, checkpoint_every=2)
#: what a resumed run must share with the run that started it
SETTINGS = ("init", "plan", "uncond", "sampler", "sampler_steps", "cfg_scale", "pool", "chunk", "batch", "lr", "ema",
            "seed")
POOL_SEED = 10  # the pool noise: seeded_noise base (--seed + 10) * 1_000_003, far from 2024-2026 and 9000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="glyph-dit", help="the full-depth model: a shipped name or a model file")
    p.add_argument("--init", default="glyph-dit-ase", help="the student's starting weights (same architecture)")
    p.add_argument("--plan", default="2,3,4,5,6",
                   help="blocks per model call, the noise end first, one per call of the run (default: 0.5 of the "
                        "block FLOPs of DPM-Solver++'s 5 calls on the 8-block glyph DiT, ASE's shape)")
    p.add_argument("--uncond", default=None,
                   help="per call, 'run' or 'drop' CFG's unconditional half (comma-separated, one per call; default: "
                        "run at every call). 'drop' runs the conditional half alone, its output taken as the guided "
                        "one (the student learns it: guidance distillation); half the call's block FLOPs")
    p.add_argument("--sampler", default="dpmsolver++")
    p.add_argument("--sampler-steps", type=int, default=5)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--out", required=True, help="output folder (a rerun resumes)")
    p.add_argument("--name", default="glyph-dit-ase-dpm5", help="the model's name (file OUT/NAME.pt, --install)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes: an end-to-end check in under a minute on CPU")
    p.add_argument("--install", action="store_true", help="copy the model into eekernels/pretrained/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=16384, help="teacher samples (noise, label, image) trained over")
    p.add_argument("--chunk", type=int, default=512, help="pool samples per file (the unit of resumption)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ema", type=float, default=0.998,
                   help="EMA decay per step, warmed up as min(ema, (1 + n) / (10 + n)) at step n (the start weights "
                        "fade out quickly)")
    p.add_argument("--weights", default="ema", choices=("ema", "student"),
                   help="which weights NAME.pt holds: the EMA or the student's own (rerun with --steps at the step "
                        "reached to write the other)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--minutes", type=float, default=0.0,
                   help="time budget of the whole run (0: none): training stops at --steps or when it is spent")
    args = p.parse_args(argv)
    for name in ("pool", "chunk", "steps", "batch", "sampler_steps", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    if args.sampler not in SOLVERS or SOLVERS[args.sampler].prediction != "epsilon":
        eps = sorted(k for k, c in SOLVERS.items() if c.prediction == "epsilon")
        raise ValueError(f"--sampler: expected an epsilon solver {eps}, got {args.sampler!r}")
    if make_solver(args.sampler, args.sampler_steps).stochastic:
        raise ValueError(f"--sampler: expected a deterministic solver (the teacher's sample is the target), got "
                         f"{args.sampler!r}")
    check_training_numbers(args)
    try:
        args.plan = [int(v) for v in args.plan.split(",")]
    except ValueError:
        raise ValueError(f"--plan: expected comma-separated block counts, e.g. 2,3,4,5,6, got {args.plan!r}") from None
    if args.uncond is not None:
        args.uncond = [v.strip() for v in args.uncond.split(",")]
        bad = [v for v in args.uncond if v not in ("run", "drop")]
        if bad or len(args.uncond) != len(args.plan):
            raise ValueError(f"--uncond: expected 'run' or 'drop' per call, as many as --plan's {len(args.plan)}, "
                             f"got {','.join(args.uncond)!r}")
        if "drop" in args.uncond and args.cfg_scale == 1:
            raise ValueError("--uncond: 'drop' drops CFG's unconditional half; expected --cfg-scale != 1, got 1")
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    return args


def plan_schedule(plan: list[int], sampler: str, steps: int, num_blocks: int,
                  uncond: list[str] | None = None) -> ExitSchedule:
    """The t-indexed schedule whose plan over the run's calls is ``plan`` (and ``uncond``, CFG's unconditional half
    per call): the coarsest of a few bin counts that puts every call in its own bin, the bins between calls as the
    nearest call (named errors for a wrong length or depth)."""
    ts = make_solver(sampler, steps).timesteps.tolist()
    if len(plan) != len(ts):
        raise ValueError(f"--plan: expected {len(ts)} depths (one per call of {sampler} at {steps} steps), got "
                         f"{len(plan)}: {plan}")
    if any(not 1 <= d <= num_blocks for d in plan):
        raise ValueError(f"--plan: expected depths in [1, {num_blocks}] (the model's blocks), got {plan}")
    for res in (5, 10, 20, 25, 50, 100, 200, 250, 500, 1000):
        bins = [min(res - 1, int(t * res / 1000)) for t in ts]
        if len(set(bins)) == len(bins):
            break
    table = nearest_call_table(plan, ts, 1000, res)
    sched = ExitSchedule(table, num_blocks, name=f"piecewise{table}",
                         uncond=None if uncond is None else nearest_call_table(uncond, ts, 1000, res))
    if sched.plan(torch.tensor(ts)).tolist() != plan:  # two calls in one bin even at one bin per t
        raise ValueError(f"--plan: {sampler} at {steps} steps calls the model twice at one timestep; a t-indexed "
                         f"schedule cannot give those calls different depths: {plan}")
    return sched


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher, teacher_name = load_diffusion_model(args.teacher, device, option="--teacher")
    student, init_name = load_diffusion_model(args.init, device, option="--init")
    teacher.eval().requires_grad_(False)
    if getattr(teacher, "prediction", "epsilon") != "epsilon" or teacher.num_classes is None:
        raise ValueError(f"--teacher: expected a class-conditional epsilon model, got {teacher_name!r}")
    if model_kwargs(student) != model_kwargs(teacher):
        raise ValueError(f"--init: expected the teacher's architecture {model_kwargs(teacher)}, got {init_name!r} "
                         f"with {model_kwargs(student)}")
    if args.cfg_scale != 1 and teacher.null_class is None:
        raise ValueError(f"--cfg-scale: {args.cfg_scale} needs a model with a null class; {teacher_name!r} has none")
    L = teacher.num_blocks
    schedule = plan_schedule(args.plan, args.sampler, args.sampler_steps, L, args.uncond)
    ts = make_solver(args.sampler, args.sampler_steps).timesteps
    fraction = schedule.block_flop_fraction(ts)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from train_glyphs import RunLog

    log = RunLog(out)

    command = "python python/distill_exit_glyphs.py " + " ".join(sys.argv[1:] if argv is None else argv)
    log(f"device {device}, torch {torch.__version__}; {command}")
    halves = "" if args.uncond is None else f", unconditional half {args.uncond}"
    log(f"plan {args.plan}{halves} ({args.sampler}, {args.sampler_steps} steps, CFG {args.cfg_scale:g}): "
        f"{fraction:.3f} of the block FLOPs; schedule table {list(schedule.table)}")
    t_start = time.time()
    settings = {k: getattr(args, k) for k in SETTINGS}
    settings["teacher_sha256"] = sha256(teacher_file(args.teacher))
    check_resume(out / "settings.json", settings, "a run")

    # 1. the teacher's samples (make_pairs' names: the teacher's solver, steps, CFG and seed)
    pool_args = SimpleNamespace(pairs=args.pool, chunk=args.chunk, teacher_sampler=args.sampler,
                                teacher_steps=args.sampler_steps, cfg_scale=args.cfg_scale,
                                seed=args.seed + POOL_SEED)
    (out / "pool").mkdir(exist_ok=True)
    pool_rec = make_pairs(teacher, pool_args, out / "pool", device, log)
    data = Pairs(out / "pool", args.pool, args.chunk)
    C = teacher.in_channels
    images, noise_all, labels_all = data.x[:, :C], data.x[:, C:], data.y

    # 2. the student, through the plan
    # eval mode: no label dropout (DiT drops labels at random in training mode); the pool's label is the target's
    student.eval()
    params = [p for _, p in trainable_parameters(student, "no-t-embedder")]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    ema = {k: v.detach().clone() for k, v in student.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    step, history = 0, []
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        student.load_state_dict(state["student"])
        ema = {k: v.to(device) for k, v in state["ema"].items()}
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, history = int(state["step"]), list(state["history"])
        log(f"resumed from {ckpt} at step {step}")

    def save_checkpoint():
        tmp = ckpt.with_name(".checkpoint.pt.tmp")
        torch.save({"student": student.state_dict(), "ema": ema, "optimizer": opt.state_dict(),
                    "generator": gen.get_state(), "step": step, "history": history}, tmp)
        tmp.replace(ckpt)

    sample_args = dict(sampler=args.sampler, steps=args.sampler_steps, cfg_scale=args.cfg_scale, schedule=schedule)
    t_train, ran = time.time(), 0
    while step < args.steps:
        if args.minutes and time.time() - t_start > args.minutes * 60:
            log(f"time budget of {args.minutes:g} min spent at step {step}")
            break
        idx = torch.randint(0, len(data), (args.batch,), generator=gen)
        loss = trajectory_loss(student, images[idx].to(device), noise_all[idx].to(device), labels_all[idx].to(device),
                               **sample_args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for k, v in student.state_dict().items():
                if v.is_floating_point():
                    ema[k].lerp_(v, 1 - min(args.ema, (1 + step) / (10 + step)))
        step, ran = step + 1, ran + 1
        history.append(round(loss.item(), 6))
        if step % max(1, args.checkpoint_every // 4) == 0 or step == 1:
            log(f"step {step}/{args.steps}: loss {loss.item():.5f} ({(time.time() - t_train) / ran:.2f} s/step)")
        if step % args.checkpoint_every == 0:
            save_checkpoint()
    save_checkpoint()

    # 3. the weights (EMA by default), shipped format, with their plan and sampling defaults
    if args.weights == "ema":
        student.load_state_dict(ema)
    sampling = {"sampler": args.sampler, "steps": args.sampler_steps, "cfg_scale": args.cfg_scale,
                "note": f"fine-tuned through {args.sampler} at {args.sampler_steps} steps, CFG {args.cfg_scale:g}, "
                        f"under its schedule ({fraction:.3f} of the block FLOPs): sample it there"}
    record = {"command": command, "seed": args.seed, "device": str(device), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "method": "trajectory distillation through the exit plan",
              # "from": what `eekernels sample` shows it beside (the teacher at full depth, the same settings)
              "teacher": teacher_name, "from": teacher_name, "init_weights": init_name, "plan": args.plan,
              "uncond": args.uncond,
              "block_flop_fraction": round(fraction, 4), "pool": {"count": args.pool, **pool_rec}, "steps": step,
              "weights": args.weights, "ema": args.ema, "sampling": sampling,
              "train_seconds": round(time.time() - t_train, 1), "loss_curve": history[:: max(1, len(history) // 200)]}
    record = json.loads(json.dumps(record, default=str))  # plain types only: the file loads with weights_only=True
    meta = {"schedule": {"preset": args.name, "total_depth": L, "table": [int(d) for d in schedule.table],
                         **({} if schedule.uncond is None else {"uncond": list(schedule.uncond)})},
            "sampling": sampling, "provenance": {k: v for k, v in record.items() if k != "loss_curve"}}
    name_file = out / f"{args.name}.pt"
    record["bytes"] = save_model_file(student, name_file, "dit", model_kwargs(student), meta=meta)
    record["total_seconds"] = round(time.time() - t_start, 1)
    record_name = f"PROVENANCE-{args.name}.json"
    (out / record_name).write_text(json.dumps({args.name: record}, indent=1, default=str))
    if args.install:
        from eekernels.models.pretrained import PRETRAINED
        from train_glyphs import install_record

        if args.name not in PRETRAINED:
            raise ValueError(f"--install: {args.name!r} is not a shipped name (eekernels.models.pretrained.PRETRAINED)")
        install_record(name_file, args.name, {args.name: record}, record_name)
        log("installed into eekernels/pretrained/")
    log(f"done in {record['total_seconds']} s; {name_file}")
    log.close()
    return record


if __name__ == "__main__":
    main()
