"""Quality at a budget, measured where fewer steps cost quality (issue 23; results in benchmarks/RESULTS.md §26).

    python benchmarks/knee.py sweep --json knee_sweep.json           # Fréchet of full depth vs step count, per solver
    python benchmarks/knee.py budgets --sampler dpmsolver++ --steps 5 --json knee_dpm.json
    python benchmarks/knee.py budgets --quick                        # CI-sized: 1 seed x 16 samples

``sweep``: per solver (DPM-Solver++ and DDIM, CFG 1.5), full depth at each step count on the same noise and
labels as the reference count (default 50), paired intervals against it (``eekernels.eval.fidelity``: a
``Variant`` with its own ``steps``); the knee is the fewest steps whose Fréchet distance is within ``--tol``
(5%) of the reference's.

``budgets``: at one solver and step count (the knee) and each block-FLOP budget, every method on the same
noise, labels and real sets, paired against full depth and against the fewer-steps row:

| row | what runs |
| --- | --- |
| ``fewer-steps`` | full depth at ``round(budget * steps)`` steps (the same solver): the same FLOPs, no method |
| ``calibrated-drop``, ``closed-loop-cache`` | ``eekernels.calibrate`` (proxy / ``select="closed-loop"``), as ``training_free.py`` |
| ``calibrated-forecast`` | ``eekernels.calibrate(exit_policy="forecast")``: the library's joint search (its plan and forecast order, or the fewer-steps plan where nothing beats it), on the calibration noises; ``--calib-objective frechet`` (``pixel-frechet``) ranks the closed loop's plans (this row's and ``closed-loop-cache``'s) by the Fréchet distance to held-out real glyphs in the judge's features (in pooled pixels) instead of RMS to full depth |
| ``calibrated-forecast-order*`` | (with ``calibrated-forecast``) the same plan at the forecast order the search did not pick |
| ``forecast1-*``, ``forecast2-*`` | ``exit_policy="forecast"`` (order 1 / 2) on its searched plan (``forecast_plans``) and, with the ``closed-loop-cache`` row, on that row's plan |
| ``forecastblocks1-*``, ``forecastblocks2-*`` | the same plan with ``forecast_target="blocks"``: each skipped block's attention and MLP outputs extrapolated, its gates and residual adds computed (TaylorSeer's predictor) |
| ``ase-finetuned`` | the fine-tuned ``--finetuned`` (default the shipped ``glyph-dit-ase``): its own recorded plan where its fraction is within 0.03 of the budget, else ``calibrate(drop)`` on it |
| ``untuned-plan`` | the same recorded plan on the base weights (no fine-tuning): what the fine-tuning bought; for a plan that drops CFG's unconditional half at every call, sampling without guidance |
| ``fbc``, ``taylorseer``, ``magcache`` | diffusers' caches on the same weights (``eval.baselines.DiffusersCacheDiT``), tuned on the calibration noises to the budget; block fraction counted |
| ``fastercache`` | diffusers' FasterCache (its CFG-cache skips the unconditional half; its attention reuse) on the same weights, set by ``fastercache_for``; block FLOPs counted by rows and attention / MLP share (with CFG only) |
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

SOLVERS = ("dpmsolver++", "ddim")
SWEEP_STEPS = (50, 25, 20, 15, 10, 8, 6, 5, 4, 3)


def _common(p):
    p.add_argument("--samples", type=int, default=None, help="samples per seed and row (default 200)")
    p.add_argument("--seeds", type=int, default=None, help="independent seeds (default 3)")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap replicates (default 200)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default=None)
    p.add_argument("--base", default="glyph-dit")
    p.add_argument("--judge", default="glyph-judge")
    p.add_argument("--quick", action="store_true", help="CI-sized: 1 seed x 16 samples, 20 replicates")
    p.add_argument("--json", default=None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="stage", required=True)
    s = sub.add_parser("sweep", help="Fréchet of full depth vs step count, per solver; the knee")
    _common(s)
    s.add_argument("--samplers", nargs="+", default=list(SOLVERS))
    s.add_argument("--steps", type=int, nargs="+", default=list(SWEEP_STEPS), help="the first is the reference")
    s.add_argument("--tol", type=float, default=0.05)
    s.add_argument("--ase", default=None, help="also this fine-tuned model (e.g. glyph-dit-ase) under the schedule it "
                   "was trained with and at full depth (its weights alone), at the reference steps, and under its "
                   "schedule at the knee candidates given by --ase-steps")
    s.add_argument("--ase-steps", type=int, nargs="*", default=[])
    b = sub.add_parser("budgets", help="every method at one solver and step count, per budget")
    _common(b)
    b.add_argument("--sampler", default="dpmsolver++")
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.35])
    b.add_argument("--finetuned", default="glyph-dit-ase")
    b.add_argument("--calib-samples", type=int, default=32)
    b.add_argument("--rows", default=None, help="comma-separated row kinds (default all)")
    b.add_argument("--calib-search", default=None,
                   help="the calibrated rows' `search` (e.g. 'steps': also plans at fewer solver steps; "
                   "calibrate's docstring)")
    b.add_argument("--calib-objective", choices=("rms", "frechet", "pixel-frechet"), default="rms",
                   help="how the calibrated rows' closed loop ranks plans: RMS to full depth (default), or the "
                   "Fréchet distance to --calib-samples real glyphs drawn with the calibration seed (never the "
                   "evaluation's real sets; eval.fidelity.frechet_to) in the judge's features ('frechet') or in "
                   "pixels average-pooled 4x ('pixel-frechet': no judge in the selection)")
    a = sub.add_parser("ase-why", help="where the fine-tuned ASE model's error comes from, per solver and t band")
    _common(a)
    a.add_argument("--finetuned", default="glyph-dit-ase")
    a.add_argument("--runs", nargs="+", type=lambda v: v.split(":"), default=[["ddim", "50"], ["dpmsolver++", "20"]],
                   help="SOLVER:STEPS pairs (default ddim:50 dpmsolver++:20)")
    args = p.parse_args(argv)
    for name in ("samples", "seeds", "bootstrap"):
        v = getattr(args, name)
        if v is not None and v < 2 - (name != "samples"):
            p.error(f"--{name}: expected a positive integer, got {v}")
    return args


def _sizes(args):
    return (args.samples or (16 if args.quick else 200), args.seeds or (1 if args.quick else 3),
            args.bootstrap if args.bootstrap is not None else (20 if args.quick else 200))


def _run(models, judge, variants, args, sampler, steps, device):
    from eekernels.eval import fidelity

    n, S, boot = _sizes(args)
    return fidelity.evaluate(models, judge, variants=variants, num_samples=n, sampler=sampler, steps=steps,
                             cfg_scale=args.cfg_scale, seeds=[args.seed + i for i in range(S)], bootstrap=boot,
                             batch_size=min(args.batch_size, n), device=device, log=print)


def _gap(result, a, b):
    """Paired Fréchet gap b - a (``fidelity.compare``) as a plain dict, or None without intervals."""
    from eekernels.eval.fidelity import compare

    if not result.get("bootstrap") or a not in result["bootstrap"] or b not in result["bootstrap"]:
        return None
    g = compare(result, a, b)
    return {k: g[k] for k in ("diff", "lo", "hi", "text")}


def sweep(args, device):
    from eekernels.eval import fidelity
    from training_free import _load

    from fidelity import _trained_schedule

    base, judge = _load(args.base, device).eval(), _load(args.judge, device)
    models = {"base": base}
    ref, out = args.steps[0], {"stage": "sweep", "solvers": {}}
    for sampler in args.samplers:
        variants = [fidelity.Variant("full", "base", None)]
        variants += [fidelity.Variant(f"steps-{k}", "base", None, steps=k) for k in args.steps[1:]]
        if args.ase:
            models["finetuned"] = _load(args.ase, device).eval()
            sched = _trained_schedule(models["finetuned"], base.num_blocks)
            variants.append(fidelity.Variant("ase-finetuned", "finetuned", sched))
            variants.append(fidelity.Variant("ase-weights", "finetuned", None))  # its weights at full depth
            variants += [fidelity.Variant(f"ase-finetuned-{k}", "finetuned", sched, steps=k) for k in args.ase_steps]
            variants += [fidelity.Variant(f"steps-{k}", "base", None, steps=k) for k in args.ase_steps
                         if k not in args.steps]
        t0 = time.perf_counter()
        res = _run(models, judge, variants, args, sampler, ref, device)
        rows = {r["variant"]: r for r in res["rows"] if "error" not in r}
        f_ref = rows["full"]["frechet"]
        table = []
        for k in args.steps:
            r = rows["full" if k == ref else f"steps-{k}"]
            table.append({"steps": k, "frechet": r["frechet"], "frechet_ci": r.get("frechet_ci"),
                          "accuracy": r["accuracy"], "ratio": r["frechet"] / f_ref,
                          "vs_ref": None if k == ref else _gap(res, "full", f"steps-{k}"), "wall_s": r["wall_s"]})
        within = [t["steps"] for t in table if t["ratio"] <= 1 + args.tol]
        knee = min(within)
        ase = {}
        for name in [n for n in rows if n.startswith("ase-")]:
            k = int(name.rsplit("-", 1)[1]) if name.startswith("ase-finetuned-") else ref
            full = "full" if k == ref else f"steps-{k}"
            ase[name] = {"steps": k, "frechet": rows[name]["frechet"], "frechet_ci": rows[name].get("frechet_ci"),
                         "block_flop_fraction": rows[name]["block_flop_fraction"],
                         "vs_full_same_steps": _gap(res, full, name)}
        if "ase-weights" in ase and "ase-finetuned" in ase:  # weights against exit, at the reference steps
            ase["ase-finetuned"]["vs_weights_at_full_depth"] = _gap(res, "ase-weights", "ase-finetuned")
        out["solvers"][sampler] = {"reference_steps": ref, "knee": knee, "table": table, "ase": ase,
                                   "settings": res["settings"], "seconds": round(time.perf_counter() - t0, 1)}
        print(f"knee: {sampler}: reference {ref} steps Fréchet {f_ref:.2f}; knee {knee} steps (fewest within "
              f"{args.tol:.0%}); " + ", ".join(f"{t['steps']}: {t['frechet']:.1f}" for t in table))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    return out


#: diffusers' caches: the rows that are not eekernels' methods
PEERS = ("fbc@", "taylorseer@", "magcache@", "fastercache@")
ROWS = ("fewer-steps", "calibrated-drop", "closed-loop-cache", "calibrated-forecast", "calibrated-forecast-orders",
        "forecast", "forecast-blocks", "ase-finetuned", "untuned-plan",
        "fbc", "taylorseer",
        "magcache", "fastercache")


def at_other_order(schedule):
    """A copy of a forecast plan at the forecast order it was not calibrated for (1 <-> 2), or None for a schedule
    without one (the fewer-steps baseline); the schedule itself is left as it is."""
    if schedule.forecast_order not in (1, 2):
        return None
    other = copy.copy(schedule)
    other.forecast_order = 3 - schedule.forecast_order
    return other


def taylorseer_for(model, budget, noise, labels, *, sampler, steps, cfg_scale, log):
    """diffusers' TaylorSeer settings (warm-up W full steps, then a full step every N) whose counted block
    fraction is nearest ``budget`` without passing it by more than 0.02 (the shortest interval among equals);
    else the cheapest it has. Returns (config, fraction)."""
    from eekernels.eval.baselines import DiffusersCacheDiT, taylorseer_config
    from eekernels.samplers import sample

    tried = []
    for w in range(1, min(5, max(2, steps))):
        for n in range(1, steps + 1):
            peer = DiffusersCacheDiT(model, taylorseer_config(n, w))
            with torch.no_grad():
                sample(peer, noise[:1], labels[:1], sampler=sampler, steps=steps, cfg_scale=cfg_scale)
            run, possible = peer.block_counts()
            tried.append((run / possible, n, w))
    ok = [t for t in tried if t[0] <= budget + 0.02]
    f, n, w = max(ok, key=lambda t: (t[0], -t[1])) if ok else min(tried)
    log(f"knee: TaylorSeer warm-up {w}, interval {n}: {f:.3f} of the blocks (target {budget})")
    return taylorseer_config(n, w), f, (w, n)


def fastercache_for(model, budget, noise, labels, *, sampler, steps, cfg_scale, log, max_candidates=12):
    """diffusers' FasterCache settings for ``budget`` (``eval.baselines.fastercache_config``): a small grid over
    the unconditional half's period (2, 3, 5, or every call) and the call it may first be skipped at, and the
    self-attention's reuse (off, at every other call, or at every call) from a call at or after that one. Its
    decisions depend only on the call index and t, so each setting's counted block fraction (and which calls it
    skips what at) is measured on one calibration noise; settings with the same per-call pattern compute the
    same thing and are tried once. Among the patterns spending between ``budget - 0.06`` and ``budget +
    PEER_TOLERANCE`` (the window ``forecast_plans`` gives eekernels' forecast; the ``max_candidates`` spending
    most), the one whose samples on the calibration noises are nearest the full-depth ones (RMS), as
    closed-loop selection decides; none in the window: the one spending most up to ``budget + PEER_TOLERANCE``,
    else the cheapest. FasterCache forecasts the unconditional branch, so it needs CFG (``cfg_scale != 1``).
    Returns (config, fraction, info): info holds the chosen settings (the t bounds too), its RMS, and each scored
    pattern's settings ([unconditional period, its first call, attention period or None, its first call]),
    fraction and RMS."""
    from eekernels.eval.baselines import DiffusersCacheDiT, fastercache_config
    from eekernels.samplers import make_solver, sample

    if cfg_scale == 1:
        raise ValueError("fastercache_for: `cfg_scale` expected != 1 (FasterCache skips the unconditional half of "
                         "a CFG batch), got 1")
    ts = make_solver(sampler, steps).timesteps.tolist()
    calls = len(ts)

    def below(k):  # a t bound that puts calls k, k+1, ... in a FasterCache range (t < bound)
        return float(ts[0] + 1 if k == 0 else (ts[k - 1] + ts[k]) / 2)

    def config(knobs):  # (unconditional period, its first call, attention period or None, its first call)
        every, k, a_every, ka = knobs
        return fastercache_config(every, below(k), a_every, below(ka) if a_every else -1.0)

    starts = list(range(1, calls)) if calls <= 8 else sorted({round(1 + i * (calls - 2) / 5) for i in range(6)})
    grid = []
    for every in sorted({2, 3, 5, calls}):
        for k in starts:
            grid.append((every, k, None, None))
            for a_every in sorted({2, calls}):
                grid += [(every, k, a_every, ka) for ka in starts if ka >= k]
    opts = dict(sampler=sampler, steps=steps, cfg_scale=cfg_scale)
    patterns = {}  # per-call counted blocks -> (fraction, first setting giving it)
    for knobs in grid:
        peer, per_call = DiffusersCacheDiT(model, config(knobs)), []
        peer.register_forward_hook(lambda *_: per_call.append(round(peer.block_counts()[0], 9)))
        with torch.no_grad():
            sample(peer, noise[:1], labels[:1], **opts)
        run, possible = peer.block_counts()
        patterns.setdefault(tuple(per_call), (run / possible, knobs))
    tried = sorted(patterns.values(), key=lambda p: -p[0])
    window = [p for p in tried if budget - 0.06 <= p[0] <= budget + PEER_TOLERANCE][:max_candidates]
    rms = {}
    if window:
        with torch.no_grad():
            ref = sample(model, noise, labels, **opts)
            for f, knobs in window:
                out = sample(DiffusersCacheDiT(model, config(knobs)), noise, labels, **opts)
                rms[knobs] = float((out - ref).pow(2).mean().sqrt())
        f, knobs = min(window, key=lambda p: rms[p[1]])
        rule = "nearest full depth (RMS) in the window"
    else:
        ok = [p for p in tried if p[0] <= budget + PEER_TOLERANCE]
        f, knobs = ok[0] if ok else tried[-1]
        rule = "spending most within the budget" if ok else "the cheapest (none within the budget)"
    every, k, a_every, ka = knobs
    info = {"uncond_every": every, "uncond_from_call": k, "uncond_below_t": below(k),
            "attention_every": a_every, "attention_from_call": ka,
            "attention_below_t": below(ka) if a_every else None, "calibration_fraction": f,
            "rms": rms.get(knobs), "settings_tried": len(grid), "patterns": len(patterns),
            "scored": [{"settings": list(k_), "fraction": f_, "rms": rms[k_]} for f_, k_ in window], "rule": rule}
    log(f"knee: FasterCache at {budget}: unconditional half every {every} calls from call {k}, attention "
        + (f"every {a_every} calls from call {ka}" if a_every else "always") + f": {f:.3f} of the blocks ({rule}; "
        f"{len(patterns)} patterns of {len(grid)} settings, {len(window)} scored)")
    return config(knobs), f, info


def magcache_ratios(model, noise, labels, *, sampler, steps, cfg_scale):
    """MagCache's magnitude ratios for this model and solver, from diffusers' own calibration mode on the
    calibration noises (one run; the hook keeps its ratios while the step count is not yet reached)."""
    from diffusers.hooks import MagCacheConfig
    from diffusers.hooks.mag_cache import MagCacheHeadHook

    from eekernels.eval.baselines import DiffusersCacheDiT
    from eekernels.samplers import sample

    peer = DiffusersCacheDiT(model, MagCacheConfig(calibrate=True, num_inference_steps=steps + 1))
    with torch.no_grad():
        sample(peer, noise, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale)
    return [float(r) for r in peer.states(MagCacheHeadHook)[0].calibration_ratios]


#: how far above a budget a forecast plan may spend: the tolerance ``taylorseer_for`` gives the peer
PEER_TOLERANCE = 0.02


def forecast_plans(model, budgets_, noise, labels, *, sampler, steps, cfg_scale, log, order=1, max_candidates=12):
    """A forecast needs two full-depth calls before it extrapolates (after one it reuses, as ``cache``). Candidates
    (``eekernels.calibration.regular_forecast_plans`` with ``over=PEER_TOLERANCE``): full depth at the first w (1 to 4) calls and every k-th call after, depth d elsewhere (w = 1, k = 2 is
    diffusers' TaylorSeer's shape: full every other call); per budget, among those spending between budget - 0.06
    and budget + 0.02 of the blocks (the tolerance ``taylorseer_for`` gives the peer; the ``max_candidates``
    spending most), the one whose final samples on the calibration noises are nearest the full-depth ones (RMS),
    as closed-loop selection decides. Returns {budget: (schedule, info)}; a budget no candidate reaches is left
    out."""
    from eekernels.calibration import _table_schedule, regular_forecast_plans
    from eekernels.samplers import make_solver, sample
    from eekernels.models.scaffold import min_depth_of

    L, ts = model.num_blocks, make_solver(sampler, steps).timesteps
    lo = min_depth_of(model, reuse=True)  # 0 on DiT: no block between full calls, as TaylorSeer's skipped steps
    with torch.no_grad():
        ref = sample(model, noise, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale)
    out, scored = {}, {}
    for b in budgets_:
        cands = regular_forecast_plans(L, steps, b, max_candidates, over=PEER_TOLERANCE, depths=range(lo, L))
        for p in cands:
            if p not in scored:
                s = _table_schedule(list(p), ts.tolist(), L, 1000, "forecast(" + " ".join(map(str, p)) + ")")
                with torch.no_grad():
                    x = sample(model, noise, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, schedule=s,
                               exit_policy="forecast", forecast_order=order)
                scored[p] = (float((x - ref).pow(2).mean().sqrt()), s)
        if not cands:
            log(f"knee: forecast: no plan with two full calls reaches {b} of the blocks at {steps} steps")
            continue
        best = min(cands, key=lambda p: scored[p][0])
        out[b] = (scored[best][1], {"plan": list(best), "rms": scored[best][0], "candidates": len(cands),
                                    "fraction": sum(best) / (L * steps)})
        log(f"knee: forecast at {b}: plan {best} (RMS {scored[best][0]:.4f} to full depth, {len(cands)} candidates)")
    return out


def budgets(args, device):
    from diffusers.hooks import MagCacheConfig

    from eekernels.calibration import calibrate
    from eekernels.eval import fidelity
    from eekernels.eval.baselines import DiffusersCacheDiT
    from eekernels.data.glyphs import generator_for, glyph_batch
    from eekernels.eval.images import seeded_noise
    from eekernels.samplers import make_solver
    from training_free import CALIB_SEED, _load, tune_fbc
    from fidelity import _trained_schedule

    rows = [r for r in (args.rows or ",".join(ROWS)).split(",") if r]
    bad = sorted(set(rows) - set(ROWS))
    if bad:
        raise SystemExit(f"--rows: expected kinds among {','.join(ROWS)}, got {bad}")
    K, sampler = args.steps, args.sampler
    base, judge = _load(args.base, device).eval(), _load(args.judge, device)
    ft = _load(args.finetuned, device).eval()
    L = base.num_blocks
    ts = make_solver(sampler, K).timesteps
    n_cal = 8 if args.quick else args.calib_samples
    shape = (base.in_channels, base.input_size, base.input_size)
    cal_noise = seeded_noise(range(n_cal), shape, CALIB_SEED).to(device)
    cal_labels = (torch.arange(n_cal) % base.num_classes).to(device)
    opts = dict(sampler=sampler, steps=K, cfg_scale=args.cfg_scale)
    objective = None
    if args.calib_objective != "rms":  # held-out real glyphs: the calibration seed, not evaluate()'s real_seed
        cal_real, _ = glyph_batch(n_cal, generator_for(CALIB_SEED, 0), device)
        features = ((lambda x: judge.score(x)[1]) if args.calib_objective == "frechet" else
                    (lambda x: torch.nn.functional.avg_pool2d(x.float(), 4).flatten(1)))
        objective = fidelity.frechet_to(features, cal_real)
    models, setup = {"base": base, "finetuned": ft}, {}
    variants = [fidelity.Variant("full", "base", None)]
    fewer = {}  # budget -> step count: full depth at the fewest steps spending no more than the budget
    for b in args.budgets:
        k = max(1, int(b * K + 1e-9))
        fewer[b] = k
    if "fewer-steps" in rows:
        near = set(range(max(1, K - 2), K)) if K <= 8 else set()  # the curve below a few-step knee
        for k in sorted(set(fewer.values()) | near, reverse=True):
            variants.append(fidelity.Variant(f"steps-{k}", "base", None, steps=k))
    magr = None
    for b in args.budgets:
        t0 = time.perf_counter()

        def cal(model, policy, select):
            t1 = time.perf_counter()
            ranked = select == "closed-loop" or policy == "forecast"  # a closed loop that the objective ranks
            s = calibrate(model, exit_policy=policy, budget=b, noises=cal_noise, conditions=cal_labels,
                          validate_plans=0, select=select, objective=objective if ranked else None,
                          search=args.calib_search if policy == "forecast" else None, **opts)
            return s, {"seconds": round(time.perf_counter() - t1, 2), "plan": [int(d) for d in s.plan(ts).tolist()]}

        if "calibrated-drop" in rows:
            s, setup[f"calibrated-drop@{b}"] = cal(base, "drop", "proxy")
            variants.append(fidelity.Variant(f"calibrated-drop@{b}", "base", s, "drop"))
        cl = None
        if "closed-loop-cache" in rows:
            cl, setup[f"closed-loop-cache@{b}"] = cal(base, "cache", "closed-loop")
            variants.append(fidelity.Variant(f"closed-loop-cache@{b}", "base", cl, "cache"))
        if "calibrated-forecast" in rows:  # what a user gets: the joint search's plan, or fewer steps
            s, info = cal(base, "forecast", "proxy")
            kinds = sorted(set(s.policies or ("drop",)))
            info.update(chose=s.calibration.joint["chosen"], forecast_order=s.forecast_order, steps=s.steps,
                        objective=s.calibration.objective, forecast_target=s.forecast_target,
                        plan=[int(d) for d in s.plan(make_solver(sampler, s.steps or K).timesteps).tolist()])
            setup[f"calibrated-forecast@{b}"] = info
            print(f"knee: calibrate(forecast) at {b}: {info['chose']}")
            variants.append(fidelity.Variant(f"calibrated-forecast@{b}", "base", s,
                                             kinds[0] if len(kinds) == 1 else None, steps=s.steps))
            other = at_other_order(s) if "calibrated-forecast-orders" in rows else None
            if other is not None:
                variants.append(fidelity.Variant(f"calibrated-forecast-order{other.forecast_order}@{b}", "base",
                                                 other, kinds[0] if len(kinds) == 1 else None, steps=s.steps))
        fp = None
        if "forecast" in rows or "forecast-blocks" in rows:
            fp = forecast_plans(base, [b], cal_noise[:16], cal_labels[:16], log=print, **opts).get(b)
            if fp is not None:
                setup[f"forecast@{b}"] = fp[1]
        if "forecast-blocks" in rows and fp is not None:
            for o in (1, 2):
                variants.append(fidelity.Variant(f"forecastblocks{o}@{b}", "base", fp[0], "forecast", forecast_order=o,
                                                 forecast_target="blocks"))
        if "forecast" in rows:  # on its own searched plan, and (with the closed-loop-cache row) on that row's plan
            # with one full call a forecast is the cache itself
            two_full = cl is not None and int((cl.plan(ts) == L).sum()) >= 2
            for o in (1, 2):
                if two_full:
                    variants.append(fidelity.Variant(f"forecast{o}-closed-loop@{b}", "base", cl, "forecast",
                                                     forecast_order=o))
                if fp is not None:
                    variants.append(fidelity.Variant(f"forecast{o}@{b}", "base", fp[0], "forecast", forecast_order=o))
        own = _trained_schedule(ft, L)  # the plan the fine-tuned model records, where it spends about this budget
        if own is not None and abs(own.block_flop_fraction(ts) - b) > 0.03:
            own = None
        for kind, model_key in (("ase-finetuned", "finetuned"), ("untuned-plan", "base")):
            if kind in rows and own is not None:
                variants.append(fidelity.Variant(f"{kind}@{b}", model_key, own))
                setup[f"{kind}@{b}"] = {"schedule": own.name, "plan": [int(d) for d in own.plan(ts).tolist()],
                                        "uncond": own.uncond_modes(ts)}
        if "ase-finetuned" in rows and own is None:  # the fine-tuned weights under a drop plan calibrated on them
            s, setup[f"ase-finetuned@{b}"] = cal(ft, "drop", "proxy")
            variants.append(fidelity.Variant(f"ase-finetuned@{b}", "finetuned", s))
        if "fbc" in rows:
            th, tried = tune_fbc(base, b, cal_noise, cal_labels, log=print, **opts)
            models[f"fbc@{b}"] = DiffusersCacheDiT(base, __import__("diffusers").hooks.FirstBlockCacheConfig(
                threshold=float(th)))
            variants.append(fidelity.Variant(f"fbc@{b}", f"fbc@{b}", None))
            setup[f"fbc@{b}"] = {"threshold": th, "tried": tried}
        if "taylorseer" in rows:
            cfg, f, wn = taylorseer_for(base, b, cal_noise, cal_labels, log=print, **opts)
            models[f"taylorseer@{b}"] = DiffusersCacheDiT(base, cfg)
            variants.append(fidelity.Variant(f"taylorseer@{b}", f"taylorseer@{b}", None))
            setup[f"taylorseer@{b}"] = {"warmup": wn[0], "interval": wn[1], "calibration_fraction": f}
        if "magcache" in rows:
            magr = magr or magcache_ratios(base, cal_noise, cal_labels, **opts)

            def make(model, th):
                return DiffusersCacheDiT(model, MagCacheConfig(threshold=th, mag_ratios=magr, num_inference_steps=K))

            th, tried = tune_fbc(base, b, cal_noise, cal_labels, log=print, make=make, name="MagCache", **opts)
            models[f"magcache@{b}"] = make(base, th)
            variants.append(fidelity.Variant(f"magcache@{b}", f"magcache@{b}", None))
            setup[f"magcache@{b}"] = {"threshold": th, "tried": tried, "mag_ratios": magr}
        if "fastercache" in rows:
            if args.cfg_scale == 1:
                print("knee: FasterCache skips the unconditional half of a CFG batch: no row without CFG")
            else:
                cfg, f, info = fastercache_for(base, b, cal_noise, cal_labels, log=print, **opts)
                models[f"fastercache@{b}"] = DiffusersCacheDiT(base, cfg)
                variants.append(fidelity.Variant(f"fastercache@{b}", f"fastercache@{b}", None))
                setup[f"fastercache@{b}"] = info
        print(f"knee: budget {b}: rows set up in {time.perf_counter() - t0:.1f}s")

    res = _run(models, judge, variants, args, sampler, K, device)
    names = {r["variant"] for r in res["rows"] if "error" not in r}
    for r in res["rows"]:  # every row against the fewer-steps row of its budget (paired)
        if "@" in r["variant"] and "error" not in r:
            b = float(r["variant"].split("@")[1])
            ref = f"steps-{fewer[b]}"
            if ref in names:
                r["gap_vs_fewer_steps"] = {"steps": fewer[b], **_gap(res, ref, r["variant"])}
    by_name = {r["variant"]: r for r in res["rows"] if "error" not in r}
    for b in args.budgets:  # each peer against eekernels' best row of the same budget (paired; b - a > 0: peer worse)
        ours = [n for n in by_name if n.endswith(f"@{b}") and not n.startswith(PEERS)]
        if not ours:
            continue
        best = min(ours, key=lambda n: by_name[n]["frechet"])
        for n in by_name:
            if n.endswith(f"@{b}") and n.startswith(PEERS):
                by_name[n]["gap_vs_best_eekernels"] = {"row": best, **_gap(res, best, n)}
    print()
    print(fidelity.markdown_table(res))
    doc = fidelity.json_rows(res)
    doc["stage"], doc["setup"], doc["fewer_steps"] = "budgets", setup, {str(b): k for b, k in fewer.items()}
    doc["settings"].update({"budgets": args.budgets, "calibration_samples": n_cal, "calibration_seed": CALIB_SEED,
                            "calibration_objective": args.calib_objective, "calibration_search": args.calib_search,
                            "base": args.base, "finetuned": args.finetuned})
    for r in doc["rows"]:
        g = r.get("gap_vs_fewer_steps")
        if g:
            print(f"- {r['variant']} vs {g['steps']} steps at full depth: Fréchet {g['text']}")
        g = r.get("gap_vs_best_eekernels")
        if g:
            print(f"- {r['variant']} vs eekernels' best row at its budget ({g['row']}): Fréchet {g['text']}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return doc


class _Hybrid(torch.nn.Module):
    """Full-depth ``base`` at every call, except calls with ``lo <= t < hi``: the fine-tuned ``ft`` at the depth its
    schedule gives (both in plain torch, ``eval.baselines.dit_forward``): which t's carry the exit's error."""

    def __init__(self, base, ft, schedule, lo, hi):
        super().__init__()
        self.base, self.ft, self.schedule, self.lo, self.hi = base, ft, schedule, lo, hi
        for a in ("num_classes", "null_class", "in_channels", "num_blocks", "learn_sigma", "input_size"):
            setattr(self, a, getattr(base, a))

    def forward(self, x, t, y=None, depth=None):
        from eekernels.eval.baselines import dit_forward

        t0 = float(t.reshape(-1)[0])
        if self.lo <= t0 < self.hi:
            return dit_forward(self.ft, x, t, y, int(self.schedule.depth(t[:1].float()).item()))
        return dit_forward(self.base, x, t, y)


@torch.no_grad()
def ase_why(args, device):
    """Why the fine-tuned ASE model holds under one solver and not another: on the same noise, the final samples'
    RMS distance to the base model at full depth (a) for the fine-tuned model at full depth (its weights alone),
    (b) under its schedule (weights and exit), and (c) with the exit applied only in one band of t at a time
    (full-depth base elsewhere); and the per-call relative error of its truncated output along the base model's
    own trajectory, grouped by the same bands."""
    from eekernels.eval.baselines import dit_forward
    from eekernels.eval.images import seeded_noise
    from eekernels.samplers import make_solver, sample
    from fidelity import _trained_schedule
    from training_free import _load

    base, ft = _load(args.base, device).eval(), _load(args.finetuned, device).eval()
    sched = _trained_schedule(ft, base.num_blocks)
    n = args.samples or 16
    shape = (base.in_channels, base.input_size, base.input_size)
    noise = seeded_noise(range(n), shape, 31337).to(device)
    labels = (torch.arange(n) % base.num_classes).to(device)
    bands = [(lo, lo + 200) for lo in range(0, 1000, 200)]
    out = {"samples": n, "schedule": sched.name, "bands": bands, "solvers": {}}
    for sampler, steps in args.runs:
        steps = int(steps)
        opts = dict(sampler=sampler, steps=steps, cfg_scale=args.cfg_scale)
        ts = make_solver(sampler, steps).timesteps
        ref = sample(_Hybrid(base, ft, sched, 0, -1), noise, labels, **opts)

        def rms(model):
            return float((sample(model, noise, labels, **opts) - ref).pow(2).mean().sqrt())

        row = {"calls": len(ts), "block_flop_fraction": sched.block_flop_fraction(ts),
               "calls_per_band": [int(((ts >= lo) & (ts < hi)).sum()) for lo, hi in bands],
               "depth_per_band": [sorted({int(d) for d, t in zip(sched.plan(ts).tolist(), ts.tolist()) if lo <= t < hi})
                                  for lo, hi in bands],
               "weights_only": rms(_Hybrid(ft, ft, sched, 0, -1)),
               "ase": rms(_Hybrid(base, ft, sched, -1, 2000)),
               "exit_in_band_only": [rms(_Hybrid(base, ft, sched, lo, hi)) for lo, hi in bands]}
        # per-call error of the truncated fine-tuned output along the base model's full-depth trajectory
        probe = _Hybrid(base, ft, sched, 0, -1)
        errs = []

        def record(x, t, y=None, depth=None):
            e_full = dit_forward(base, x, t, y)
            d = int(sched.depth(t[:1].float()).item())
            e_ase = dit_forward(ft, x, t, y, d)[:, :base.in_channels]
            e = e_full[:, :base.in_channels]
            errs.append((float(t.reshape(-1)[0]), d, float((e_ase - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt())))
            return e_full

        probe.forward = record
        sample(probe, noise, labels, **opts)
        row["per_call"] = errs
        row["per_call_rel_error_by_band"] = [
            (sum(e for t, _, e in errs if lo <= t < hi) / max(1, sum(1 for t, _, _ in errs if lo <= t < hi)))
            for lo, hi in bands]
        out["solvers"][f"{sampler}-{steps}"] = row
        print(f"knee: ase-why: {sampler} {steps}: {json.dumps(row)}")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return {"sweep": sweep, "budgets": budgets, "ase-why": ase_why}[args.stage](args, device)


if __name__ == "__main__":
    main()
