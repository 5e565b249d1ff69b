"""Make the shipped glyph models and their fidelity table, in one run.

    python python/train_glyphs.py --out out/glyphs --device cuda --minutes 5     # the H100 run (~5 min)
    python python/train_glyphs.py --out /tmp/g --quick                           # toy scale, CPU, < 1 min
    python python/train_glyphs.py --out /tmp/f --quick --prediction flow         # the flow-matching variant

Steps: (1) the judge CNN on fresh glyphs; (2) the base DiT from scratch; (3) its ASE fine-tuning under the
``ase-demo`` schedule; (4) the fidelity benchmark over the files as written (float16 weights, loaded back).
Writes to --out: ``glyph-dit.pt``, ``glyph-dit-ase.pt``, ``glyph-judge.pt``, ``PROVENANCE.json`` (command,
seeds, steps, losses, timings, the fidelity rows), ``fidelity.md``, ``samples.png`` (a row per variant, same
noise) and ``log.txt``. ``--install`` also copies the model files and PROVENANCE.json into
``eekernels/pretrained/``.

--minutes budgets the two DiT trainings (60% base, 25% fine-tuning of the total; the judge and the
evaluation take the rest); each stops at its step cap or its time share, whichever comes first, and the
record says how many steps ran, so ``--base-steps N --ft-steps M --minutes 0`` repeats a run.

``--prediction flow`` trains the flow-matching variant ``glyph-dit-flow`` instead: the same data, model shape,
optimizer, EMA and budget logic, a velocity DiT (``DiT(prediction_type="flow", learn_sigma=False)``) trained
with the flow-matching loss (x_t = (1 - σ) x0 + σ ε, target ε - x0; σ drawn by ``--sigma-sampling``,
logit-normal as SD3 by default; no λ(t): min-SNR is for epsilon models), no ASE fine-tuning stage, and the
evaluation of the full-depth model with ``flow_euler``. It writes ``glyph-dit-flow.pt`` and ``glyph-judge.pt``;
``--install`` copies the model and adds its record to ``eekernels/pretrained/PROVENANCE.json`` (key
``glyph-dit-flow``; the whole run's record goes to ``PROVENANCE-flow.json``).

``--checkpoint-every N`` writes the base training's resumable trainer checkpoint to ``OUT/base/checkpoint.pt``
every N steps (and at the end of the stage in any case); ``--resume`` continues from it (same command: every
step's randoms depend only on (seed, step), so the resumed run takes the steps the uninterrupted one would).
``--samples 0`` skips the fidelity stage.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from eekernels import ExitSchedule, backend  # noqa: E402
from eekernels.models import DiT  # noqa: E402
from eekernels.eval.judge import judge_accuracy, train_judge  # noqa: E402
from eekernels.models.pretrained import PRETRAINED, PRETRAINED_DIR, load_model_file, save_model_file  # noqa: E402
from eekernels.training import TrainConfig, Trainer  # noqa: E402
from eekernels.training.loss import SIGMA_SAMPLING  # noqa: E402
from eekernels.eval import fidelity  # noqa: E402

EPSILON_MODELS = ("glyph-dit", "glyph-dit-ase", "glyph-judge")  # what the epsilon run writes and installs
QUICK = dict(hidden=32, depth=4, heads=2, patch=8, batch=8, base_steps=8, ft_steps=4, warmup=1, judge_steps=10,
             judge_batch=16, judge_width=8, samples=16, eval_batch=16)


class RunLog:
    """A run's log (every script here): each message time-stamped, printed and appended to ``OUT/log.txt``."""

    def __init__(self, out: Path):
        self.file = open(Path(out) / "log.txt", "a")

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def step_list(text: str) -> tuple[int, ...]:
    """``--eval-steps``: "20" or "4,8,16" as a tuple of integers >= 1 (argparse type: a named error otherwise)."""
    try:
        steps = tuple(int(v) for v in text.split(","))
    except ValueError:
        steps = ()
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, comma-separated (e.g. 4,8,16), got {text!r}")
    return steps


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--minutes", type=float, default=5.0, help="time budget for the DiT trainings (0: no limit)")
    p.add_argument("--quick", action="store_true", help="toy sizes: an end-to-end check in under a minute on CPU")
    p.add_argument("--install", action="store_true", help="copy the model files into eekernels/pretrained/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-base", default=None,
                   help="start the base DiT from this model file (a previous run's glyph-dit.pt) instead of scratch")
    p.add_argument("--init-judge", default=None, help="reuse this judge file instead of training one")
    # model
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--no-learn-sigma", action="store_true")
    p.add_argument("--prediction", default="epsilon", choices=("epsilon", "flow"),
                   help="epsilon: glyph-dit (+ glyph-dit-ase); flow: glyph-dit-flow (flow matching, no fine-tuning)")
    # base training
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--base-steps", type=int, default=100_000, help="step cap (the time share usually ends it first)")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--weighting", default=None, choices=("none", "min-snr"),
                   help="λ(t) for both trainings (default: min-snr, Hang et al. 2023, see RESULTS.md §6, for "
                        "epsilon; none for flow, which min-snr does not apply to)")
    p.add_argument("--sigma-sampling", default="logit-normal", choices=SIGMA_SAMPLING,
                   help="flow: how training draws σ (logit-normal: SD3)")
    p.add_argument("--logit-mean", type=float, default=0.0, help="flow: logit-normal mean")
    p.add_argument("--logit-std", type=float, default=1.0, help="flow: logit-normal std")
    p.add_argument("--flow-shift", type=float, default=1.0, help="flow: SD3's shift of the training σ (1: none)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="write OUT/base/checkpoint.pt every N base steps (0: only at the end of the stage)")
    p.add_argument("--resume", action="store_true", help="continue the base training from OUT/base/checkpoint.pt")
    p.add_argument("--note", default=None,
                   help="a sentence kept in the record and the model's provenance (e.g. why a run stopped short "
                        "of its planned steps)")
    # fine-tuning
    p.add_argument("--ft-steps", type=int, default=None, help="step cap (default 40000; flow: no fine-tuning)")
    p.add_argument("--ft-lr", type=float, default=1e-4)
    p.add_argument("--ft-ema", type=float, default=0.999)
    p.add_argument("--schedule", default="ase-demo", help="ExitSchedule preset for fine-tuning and evaluation")
    # judge
    p.add_argument("--judge-steps", type=int, default=1500)
    p.add_argument("--judge-batch", type=int, default=256)
    p.add_argument("--judge-width", type=int, default=32)
    # evaluation
    p.add_argument("--samples", type=int, default=2000, help="samples per variant (0: no fidelity stage)")
    p.add_argument("--sampler", default=None, help="default: dpmsolver++ (epsilon), flow_euler (flow)")
    p.add_argument("--eval-steps", type=step_list, default=None,
                   help="solver steps of the evaluation (default 20); flow: a comma-separated sweep (default "
                        "4,8,16,32,50), each at full depth, with the knee (fewest steps within 5%% of the most)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--eval-batch", type=int, default=500)
    p.add_argument("--train-backend", default="torch", help="eekernels op backend for training (torch: the references)")
    args = p.parse_args(argv)
    flow = args.prediction == "flow"
    if flow and args.weighting == "min-snr":
        raise ValueError("--weighting: expected 'none' with --prediction flow (min-SNR weights an epsilon loss), "
                         "got 'min-snr'")
    if flow and args.ft_steps:
        raise ValueError(f"--ft-steps: expected 0 or unset with --prediction flow (the flow model gets no ASE "
                         f"fine-tuning stage), got {args.ft_steps}")
    if flow and args.sampler is not None and not args.sampler.startswith("flow_"):
        raise ValueError(f"--sampler: expected a flow solver (flow_euler, flow_heun, flow_dpmsolver++) with "
                         f"--prediction flow, got {args.sampler!r}")
    for name in ("samples", "checkpoint_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 0, got {getattr(args, name)}")
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
        if args.minutes == p.get_default("minutes"):
            args.minutes = 0.0
    args.weighting = args.weighting or ("none" if flow else "min-snr")
    args.sampler = args.sampler or ("flow_euler" if flow else "dpmsolver++")
    args.ft_steps = 0 if flow else (40_000 if args.ft_steps is None else args.ft_steps)
    if args.eval_steps is None:
        args.eval_steps = ((2, 3) if flow else (3,)) if args.quick else ((4, 8, 16, 32, 50) if flow else (20,))
    if not flow and len(args.eval_steps) > 1:
        raise ValueError(f"--eval-steps: expected one step count for --prediction epsilon (its benchmark compares "
                         f"variants at one setting), got {','.join(map(str, args.eval_steps))}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out)

    command = "python python/train_glyphs.py " + " ".join(sys.argv[1:] if argv is None else argv)
    budget = args.minutes * 60 if args.minutes > 0 else None
    t_start = time.time()
    log(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()}), "
        f"torch {torch.__version__}; {command}")
    record = {"command": command, "seed": args.seed, "device": str(device), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "args": vars(args)}

    # ---- 1. judge ------------------------------------------------------------------------------------------
    if args.init_judge:
        judge = load_model_file(args.init_judge, device)
        jrec = {**(getattr(judge, "pretrained_meta", None) or {}).get("provenance", {}), "reused_from": args.init_judge}
        jrec.pop("accuracy_fresh_5000", None)
    else:
        judge, jrec = train_judge(steps=args.judge_steps, batch_size=args.judge_batch, seed=args.seed + 1,
                                  device=device, width=args.judge_width, log=log)
    jrec["accuracy_fresh_5000"] = judge_accuracy(judge, n=5000 if not args.quick else 500, device=device)
    log(f"judge: accuracy on fresh glyphs {jrec['accuracy_fresh_5000']:.4f}")
    jrec["bytes"] = save_model_file(judge, out / PRETRAINED["glyph-judge"], "judge", judge.config,
                                    meta={"provenance": {**jrec, "command": jrec.get("command", command)}})
    record["glyph-judge"] = jrec

    # ---- 2. base DiT ---------------------------------------------------------------------------------------
    flow = args.prediction == "flow"
    base_name = "glyph-dit-flow" if flow else "glyph-dit"
    kwargs = dict(input_size=32, patch_size=args.patch, in_channels=3, hidden_size=args.hidden, depth=args.depth,
                  num_heads=args.heads, num_classes=10, class_dropout_prob=0.1,
                  learn_sigma=not (args.no_learn_sigma or flow), **({"prediction_type": "flow"} if flow else {}))
    torch.manual_seed(args.seed)
    model = DiT(**kwargs)
    if args.init_base:  # a second leg of base training: the earlier run's (EMA) weights, a fresh optimizer
        init = load_model_file(args.init_base)
        model.load_state_dict(init.state_dict())
        record["base_init"] = {"from": args.init_base, "provenance": (init.pretrained_meta or {}).get("provenance")}
    log(f"base DiT {kwargs}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    cfg = TrainConfig(steps=args.base_steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.warmup,
                      ema_decay=args.ema, ema_warmup=True, label_dropout=0.1, trainable="all", seed=args.seed,
                      weighting=args.weighting, sigma_sampling=args.sigma_sampling, logit_mean=args.logit_mean,
                      logit_std=args.logit_std, flow_shift=args.flow_shift, log_every=25 if args.quick else 250,
                      checkpoint_every=args.checkpoint_every)
    trainer = Trainer(model, cfg, data="glyphs", device=device)
    ckpt = out / "base" / "checkpoint.pt"
    resumed = None
    if args.resume and ckpt.is_file():  # the trainer's own checkpoint: weights, EMA, optimizer, step, history
        trainer.load(ckpt)
        resumed = trainer.step
        log(f"base: resumed from {ckpt} at step {resumed}")
    load_before = os.getloadavg()[0]
    with backend(args.train_backend):
        summary = trainer.train(log=log, out_dir=out / "base",
                                time_budget_s=None if budget is None else 0.60 * budget)
    log(f"base: {summary}")
    legs = record_leg(out / "base" / "legs.json", command, resumed or 0, summary, load_before)
    if math.isnan(summary["final_loss"]) and trainer.history:  # a resume with nothing left to do
        summary["final_loss"] = trainer.history[-1]["loss"]
    base_meta = {"schedule": None, "provenance": {
        "command": command, "seed": args.seed, "config": vars(cfg), **summary, "resumed_from_step": resumed,
        "legs": legs, "seconds_all_legs": round(sum(leg["seconds"] for leg in legs), 1),
        "samples_seen": trainer.step * args.batch, "weights": "EMA", "init": record.get("base_init"),
        **({"note": args.note} if args.note else {})}}
    size = save_model_file(trainer.ema, out / PRETRAINED[base_name], "dit", kwargs, meta=base_meta)
    record[base_name] = {**base_meta["provenance"], "bytes": size, "loss_curve": trainer.history}
    del trainer
    if flow:
        record_name = "PROVENANCE-flow.json"
        (out / record_name).write_text(json.dumps(record, indent=1, default=str))
        models = {"base": load_model_file(out / PRETRAINED[base_name], device)}
        variants = [fidelity.Variant("full", "base", None)]
    else:
        record_name = "PROVENANCE.json"
        schedule = fine_tune(args, out, kwargs, command, device, budget, record, log)
        models = {"base": load_model_file(out / PRETRAINED["glyph-dit"], device),
                  "finetuned": load_model_file(out / PRETRAINED["glyph-dit-ase"], device)}
        variants = fidelity.default_variants(args.depth)
        variants[1].schedule = variants[2].schedule = schedule

    # ---- 4. fidelity over the files as shipped --------------------------------------------------------------
    if args.samples and flow:  # full depth at each --eval-steps (the step sweep), same noise, labels and real set
        judge = load_model_file(out / PRETRAINED["glyph-judge"], device)
        runs = [(base_name, n, args.cfg_scale) for n in args.eval_steps]
        sweep = step_sweep({base_name: models["base"]}, judge, runs,
                           num_samples=args.samples, seed=args.seed + 2024, sampler=args.sampler,
                           batch_size=args.eval_batch, device=device, log=log)
        log("\n" + sweep["table"])
        fidelity.save_grid(out / "samples.png", sweep.pop("samples"))
        record["fidelity"] = sweep
        (out / "fidelity.md").write_text(sweep["table"] + "\n")
    elif args.samples:
        judge = load_model_file(out / PRETRAINED["glyph-judge"], device)
        result = fidelity.evaluate(models, judge, variants=variants, num_samples=args.samples, sampler=args.sampler,
                                   steps=args.eval_steps[0], cfg_scale=args.cfg_scale, seed=args.seed + 2024,
                                   batch_size=args.eval_batch, device=device, log=log, keep_samples=10)
        table = fidelity.markdown_table(result)
        verdict = fidelity.verdict(result)
        log("\n" + table + "\n".join(verdict))
        fidelity.save_grid(out / "samples.png", result["samples"])
        bench = f"python benchmarks/fidelity.py --samples {args.samples} --device {device.type}"
        record["fidelity"] = {"rows": result["rows"], "settings": result["settings"], "verdict": verdict,
                              "command": bench}
        (out / "fidelity.md").write_text(table + "\n" + "\n".join(f"- {v}" for v in verdict) + "\n")
    record["total_seconds"] = round(time.time() - t_start, 1)
    (out / record_name).write_text(json.dumps(record, indent=1, default=str))
    if args.install:
        PRETRAINED_DIR.mkdir(parents=True, exist_ok=True)
        if flow:
            install_record(out / PRETRAINED[base_name], base_name, record, record_name)
        else:
            for f in (*(PRETRAINED[n] for n in EPSILON_MODELS), record_name):
                shutil.copy2(out / f, PRETRAINED_DIR / f)
        log(f"installed into {PRETRAINED_DIR}")
    log(f"done in {record['total_seconds']} s; files in {out}")
    log.close()
    return record


def record_leg(path: Path, command: str, start: int, summary: dict, load_before: float) -> list[dict]:
    """Append this run's leg of a (resumable) training to the JSON list at ``path``; returns every leg so far (a
    run that resumed a finished training, to evaluate or install it, adds none)."""
    legs = json.loads(path.read_text()) if path.is_file() else []
    if summary["steps_this_run"] == 0:
        return legs
    legs = [leg for leg in legs if leg["start_step"] < start] + [{  # a rerun from an earlier step replaces later legs
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "start_step": start, "end_step": summary["steps"],
        "seconds": summary["seconds"], "steps_per_s": summary["steps_per_s"],
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}]
    path.write_text(json.dumps(legs, indent=1))
    return legs


def step_sweep(models: dict, judge, runs, *, num_samples: int, seed: int, sampler: str, batch_size: int, device,
               log=print, seeds=None, bootstrap: int = 200, knee_tolerance: float = 0.05) -> dict:
    """Full-depth fidelity of ``models[name]`` at each run ``(name, steps, cfg_scale)`` of ``runs``, every run on
    the same seeded noise, labels and real glyphs (``fidelity.evaluate`` once per run: its steps and CFG are
    per call). Returns ``{"rows": [real floor, one per run], "knee": {name: steps}, "settings", "table",
    "samples"}``: a row has the judge accuracy and Fréchet distance with their bootstrap intervals, the model
    evaluations per image (steps, twice with CFG) and ``frechet_vs_most_steps`` (its Fréchet distance over that
    of the same model's run with the most steps). The knee of a model is the fewest steps whose Fréchet
    distance is within ``knee_tolerance`` of its most-steps run's (point estimates)."""
    rows, samples, settings = [], {}, None
    for name, steps, cfg_scale in runs:
        result = fidelity.evaluate({"base": models[name]}, judge, variants=[fidelity.Variant("full", "base", None)],
                                   num_samples=num_samples, seeds=seeds or (seed,), sampler=sampler, steps=steps,
                                   cfg_scale=cfg_scale, batch_size=batch_size, device=device, log=log,
                                   keep_samples=10, bootstrap=bootstrap)
        real, row = result["rows"][0], result["rows"][-1]
        if "error" in row:
            raise RuntimeError(f"step_sweep: {name} at {steps} steps failed: {row['error']}")
        if not rows:
            rows.append(real)
            settings = {k: v for k, v in result["settings"].items() if k not in ("steps", "cfg_scale")}
        rows.append({**row, "variant": f"{name} {steps} steps", "model": name, "steps": steps, "cfg_scale": cfg_scale,
                     "evals_per_image": steps * (1 if cfg_scale == 1 else 2)})
        samples[f"{name} {steps}"] = result["samples"]["full"]
    knee = {}
    for name in dict.fromkeys(r[0] for r in runs):
        mine = [r for r in rows[1:] if r["model"] == name]
        ref = max(mine, key=lambda r: r["steps"])
        for r in mine:
            r["frechet_vs_most_steps"] = round(r["frechet"] / ref["frechet"], 4)
        knee[name] = min(r["steps"] for r in mine if r["frechet"] <= (1 + knee_tolerance) * ref["frechet"])
    ci = (lambda r, k, f: f" [{f(r[k + '_ci'][0])}, {f(r[k + '_ci'][1])}]" if r.get(k + "_ci") else "")
    acc = (lambda v: f"{100 * v:.2f}")
    fd = (lambda v: f"{v:.2f}")
    lines = ["| model | Euler steps | CFG | model evaluations per image | judge accuracy (%) | Fréchet distance | "
             "vs most steps | images/s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["variant"] == "real":
            lines.append(f"| real glyphs (floor) | — | — | — | {acc(r['accuracy'])}{ci(r, 'accuracy', acc)} | "
                         f"{fd(r['frechet'])}{ci(r, 'frechet', fd)} | — | — |")
        else:
            lines.append(f"| {r['model']} | {r['steps']} | {r['cfg_scale']:g} | {r['evals_per_image']} | "
                         f"{acc(r['accuracy'])}{ci(r, 'accuracy', acc)} | {fd(r['frechet'])}{ci(r, 'frechet', fd)} | "
                         f"{r['frechet_vs_most_steps']:.3f} | {r['images_per_s']:.1f} |")
    lines.append("")
    lines += [f"- knee of {name} (fewest steps within {100 * knee_tolerance:.0f}% of its Fréchet distance at "
              f"{max(r[1] for r in runs if r[0] == name)} steps): {k} steps" for name, k in knee.items()]
    return {"rows": rows, "knee": knee, "settings": {**settings, "sampler": sampler}, "table": "\n".join(lines),
            "samples": samples}


def install_record(model_file: Path, name: str, record: dict, record_name: str) -> None:
    """Ship ``model_file`` as ``name`` next to the epsilon models: copy it into ``eekernels/pretrained/``, write
    the run's whole ``record`` there as ``record_name`` and add ``record[name]`` (plus its fidelity rows, if any)
    to ``PROVENANCE.json`` under the key ``name``, so that ``provenance()[name]`` finds it."""
    shutil.copy2(model_file, PRETRAINED_DIR / PRETRAINED[name])
    (PRETRAINED_DIR / record_name).write_text(json.dumps(record, indent=1, default=str))
    index = PRETRAINED_DIR / "PROVENANCE.json"
    shipped = json.loads(index.read_text()) if index.is_file() else {}
    fid = record.get("fidelity", record[name].get("fidelity"))
    shipped[name] = {**record[name], "record": record_name, **({"fidelity": fid} if fid else {})}
    index.write_text(json.dumps(shipped, indent=1, default=str))


def fine_tune(args, out: Path, kwargs: dict, command: str, device, budget, record: dict, log):
    """Stage 3, the ASE fine-tuning of the shipped (float16) base weights: writes ``glyph-dit-ase.pt`` and its
    record; returns the exit schedule it tuned for."""
    ft_model = load_model_file(out / PRETRAINED["glyph-dit"], device)
    schedule = ExitSchedule.preset(args.schedule, ft_model.num_blocks)
    ft_cfg = TrainConfig(steps=args.ft_steps, batch_size=args.batch, lr=args.ft_lr, warmup_steps=0,
                         ema_decay=args.ft_ema, label_dropout=0.1, trainable="no-t-embedder", seed=args.seed + 100,
                         weighting=args.weighting, log_every=25 if args.quick else 250)
    ft = Trainer(ft_model, ft_cfg, data="glyphs", schedule=schedule, device=device)
    with backend(args.train_backend):
        ft_summary = ft.train(log=log, time_budget_s=None if budget is None else 0.25 * budget)
    log(f"ASE fine-tuning under {schedule}: {ft_summary}")
    ft_meta = {"schedule": {"preset": args.schedule, "total_depth": ft_model.num_blocks, "table": list(schedule.table)},
               "provenance": {"command": command, "seed": args.seed + 100, "config": vars(ft_cfg), **ft_summary,
                              "weights": "EMA", "from": "glyph-dit"}}
    size = save_model_file(ft.ema, out / PRETRAINED["glyph-dit-ase"], "dit", kwargs, meta=ft_meta)
    record["glyph-dit-ase"] = {**ft_meta["provenance"], "bytes": size, "loss_curve": ft.history}
    (out / "PROVENANCE.json").write_text(json.dumps(record, indent=1, default=str))  # kept if evaluation fails
    return schedule


if __name__ == "__main__":
    main()
