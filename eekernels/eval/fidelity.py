"""Fidelity of early exit, measured: class accuracy by a judge and Fréchet distance in its features, each with
a confidence interval, and gaps between variants stated only where they exceed their interval.

Every variant samples the same seeded noise and labels with the same solver, steps and CFG scale:

| variant | model | exit |
| --- | --- | --- |
| ``full`` | base | all blocks |
| ``ase-naive`` | base (not fine-tuned) | the ASE schedule, skipped blocks dropped |
| ``ase-finetuned`` | ASE fine-tuned | the ASE schedule |
| ``cache`` | base (not fine-tuned) | ``exit_policy="cache"`` with a periodic schedule |

Reported per variant: judge accuracy (against the requested labels), Fréchet distance between the
judge's penultimate features of the samples and of fresh real glyphs, block-FLOP fraction
(:meth:`ExitSchedule.block_flop_fraction` over the solver's calls), and sampling wall time. A ``real``
row gives the floor: fresh real glyphs scored the same way (accuracy of the judge; Fréchet distance
between two independent real sets).

Uncertainty (``evaluate(seeds=...)``):
- each seed draws its own noise, its own labels (uniform over the classes, as the real glyphs' are) and its
  own real set, all of ``num_samples`` images: every variant and the real set have the same sample count,
  so their finite-sample biases match;
- a figure is the mean over the seeds of the per-seed figure;
- its interval is a stratified bootstrap: each replicate resamples, within each seed, the generated samples
  and the real samples with replacement (the SAME indices for every variant: the variants share noise and
  labels, so gaps are paired), recomputes every per-seed figure and averages over the seeds. The interval
  is the bias-shifted percentile one (``bootstrap_interval``): a resampled set holds duplicates, which raises
  the Fréchet distance of every replicate, so the replicates' spread is kept and their bias removed;
- ``frechet="debiased"``: the finite-sample Fréchet estimate FD-infinity (Chong & Forsyth 2020): the
  distance at several subset sizes, fitted as ``a + b / n``, extrapolated to n = infinity (``frechet_infinity``);
- gaps: :func:`compare` / :func:`describe_gap` say "within noise" unless the paired interval of the
  difference excludes 0, else "worse by X [lo, hi]" or "better by X [lo, hi]".
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from eekernels.eval.judge import feature_stats, frechet_distance, sqrt_psd


@dataclass
class Variant:
    """One row: ``model`` names an entry of ``evaluate``'s ``models`` (any callable ``sample()`` takes). A model
    that decides its own depth at run time (the adaptive peers in ``eval.baselines``, e.g. diffusers'
    FirstBlockCache) has ``schedule=None`` and counts what it runs: ``block_counts()`` -> (blocks run, blocks of
    a full-depth run) since it was built; the row's block-FLOP fraction is then the counted one.

    ``steps`` / ``sampler``: this row's own solver steps or solver (default: ``evaluate``'s), on the same noise
    and labels (the fewer-steps baseline); its block-FLOP fraction is then relative to ``evaluate``'s full-depth
    run (e.g. 14 steps at full depth against 20: 0.7). ``forecast_order``: for ``exit_policy="forecast"`` (None:
    the schedule's own, else 1); ``forecast_target``: "residual" or "blocks" (``sample()``'s; None: the schedule's own,
    else "residual")."""
    name: str
    model: str  # a key of evaluate()'s `models`: "base", "finetuned", or a peer's
    schedule: object | None  # an ExitSchedule or None
    exit_policy: str = "drop"
    steps: int | None = None
    sampler: str | None = None
    forecast_order: int | None = None
    forecast_target: str | None = None


def default_variants(num_blocks: int, cache_period: int = 2, cache_depth: int | None = None) -> list[Variant]:
    """The four variants of the benchmark for a model of ``num_blocks`` blocks.

    The cache variant re-runs full depth every ``cache_period`` calls and otherwise exits at
    ``cache_depth`` (default: the depth that gives about the ASE schedule's block-FLOP fraction).
    """
    from eekernels.schedules import ExitSchedule

    ase = ExitSchedule.preset("ase-demo", num_blocks)
    if cache_depth is None:  # (L + (k - 1) d) / (k L) ~ 0.71
        cache_depth = max(1, round((0.71 * cache_period * num_blocks - num_blocks) / (cache_period - 1)))
    periodic = ExitSchedule.periodic(cache_period, cache_depth, num_blocks)
    return [
        Variant("full", "base", None),
        Variant("ase-naive", "base", ase),
        Variant("ase-finetuned", "finetuned", ase),
        Variant("cache", "base", periodic, "cache"),
    ]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _block_counts(model) -> tuple[int, int] | None:
    counts = getattr(model, "block_counts", None)
    return tuple(counts()) if callable(counts) else None


def sample_variant(model, variant: Variant, noise, labels, *, sampler: str, steps: int, cfg_scale: float,
                   batch_size: int, device, graphs: bool | None = None) -> tuple[torch.Tensor, float, tuple | None]:
    """All samples of one variant (on the CPU), the sampling wall time in seconds (after an untimed warm-up) and,
    for a model that counts its blocks (``Variant``), (blocks run, blocks of full depth) over the timed run."""
    from eekernels.samplers import sample

    def run(i):
        x = noise[i : i + batch_size].to(device)
        y = labels[i : i + batch_size].to(device)
        return sample(model, x, y, sampler=sampler, steps=steps, cfg_scale=cfg_scale, schedule=variant.schedule,
                      exit_policy=variant.exit_policy, graphs=graphs, forecast_order=variant.forecast_order,
                      forecast_target=variant.forecast_target)

    if torch.device(device).type == "cuda":
        run(0)  # warm-up, untimed: CUDA graph capture and kernel compilation
    else:  # first-call costs (imports, allocator) on two images and two steps
        sample(model, noise[:2].to(device), labels[:2].to(device), sampler=sampler, steps=2, cfg_scale=cfg_scale,
               schedule=variant.schedule if variant.exit_policy == "drop" and getattr(variant.schedule, "steps", None)
               is None else None)  # a plan for its own step count (a joint plan) cannot run at 2 steps
    _sync(device)
    before = _block_counts(model)
    t0 = time.perf_counter()
    outs = [run(i) for i in range(0, noise.shape[0], batch_size)]
    _sync(device)
    wall = time.perf_counter() - t0
    after = _block_counts(model)
    counted = None if before is None else (after[0] - before[0], after[1] - before[1])
    return torch.cat(outs).float().cpu(), wall, counted


@torch.no_grad()
def backend_agrees(model, device, rtol: float = 2e-2) -> tuple[bool, float]:
    """Does the model on the ``auto`` backend (fused kernels on CUDA) match the torch reference ops here?

    One forward on random inputs at full depth and at a truncated depth; returns (agrees, max relative error).
    A kernel that is wrong on this device must not silently decide the fidelity table.
    """
    from eekernels._backend import backend

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, model.in_channels, model.input_size, model.input_size, generator=g).to(device)
    t = torch.tensor([10.0, 300.0, 650.0, 990.0], device=device)
    y = None if model.num_classes is None else torch.arange(4, device=device) % model.num_classes
    worst = 0.0
    for depth in (None, max(1, model.num_blocks // 2)):
        with backend("torch"):
            ref = model(x, t, y, depth=depth).float()
        out = model(x, t, y, depth=depth).float()
        worst = max(worst, float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)))
    return worst <= rtol, worst


# ---- statistics: Fréchet distance (judge.frechet_distance), FD-infinity, bootstrap intervals, gaps --------------

def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """The plain (biased, finite-sample) Fréchet distance between feature sets a (N, F) and b (M, F)
    (``judge.frechet_distance``)."""
    _check_features("frechet", a, b)
    return frechet_distance(a, b)


def frechet_infinity(a: torch.Tensor, b: torch.Tensor, *, points: int = 5, min_fraction: float = 0.25,
                     draws: int = 2, generator: torch.Generator | None = None) -> float:
    """FD-infinity (Chong & Forsyth, "Effectively Unbiased FID", 2020): the Fréchet distance between random
    subsets of ``n`` of a and of b, at ``points`` sizes n from ``min_fraction`` of the smaller set to all of
    it (``draws`` subsets each), fitted by least squares as ``FD(n) = FD_inf + k / n``; returns FD_inf.

    The plain estimate is biased upward by about k / n (the covariance square root of a finite sample);
    FD_inf removes that term, so sets of different sizes become comparable and the real floor goes to ~0."""
    _check_features("frechet_infinity", a, b)
    if not isinstance(points, int) or points < 2:
        raise ValueError(f"frechet_infinity: `points` expected an int >= 2, got {points!r}")
    if not 0 < min_fraction < 1:
        raise ValueError(f"frechet_infinity: `min_fraction` expected in (0, 1), got {min_fraction!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    n_max = min(a.shape[0], b.shape[0])
    sizes = sorted({max(a.shape[1] // 4 + 2, int(round(n_max * (min_fraction + (1 - min_fraction) * i / (points - 1)))))
                    for i in range(points)})
    xs, ys = [], []
    for n in sizes:
        reps = 1 if n >= n_max else draws
        for _ in range(reps):
            ia = torch.randperm(a.shape[0], generator=g)[:n]
            ib = torch.randperm(b.shape[0], generator=g)[:n]
            xs.append(1.0 / n)
            ys.append(frechet(a[ia], b[ib]))
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    if len(set(xs)) < 2:
        return float(y.mean())
    A = torch.stack([torch.ones_like(x), x], 1)
    coef = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
    return float(coef[0])


def frechet_to(features, real: torch.Tensor, *, batch_size: int = 500):
    """An ``objective`` for ``eekernels.calibrate``: the Fréchet distance between the features of a plan's final
    samples and those of ``real`` (reference images: held-out data, never the images a result is scored on).

    ``features``: a callable, images (N, ...) -> (N, F) (a judge's or an image model's penultimate layer); it runs
    under ``torch.no_grad`` in batches of ``batch_size``. ``real``'s features are computed once, here. The
    full-depth samples the closed loop also passes are not used: plans are ranked by how near their samples'
    distribution is to the data's, where the default RMS ranks them by how near each sample stays to full depth's.
    Returns the callable ``frechet(samples, reference) -> float``."""
    if not callable(features):
        raise ValueError(f"frechet_to: `features` expected a callable images -> (N, F) features, got "
                         f"{type(features).__name__}")
    if not isinstance(real, torch.Tensor) or real.ndim < 2 or real.shape[0] < 2:
        got = tuple(real.shape) if isinstance(real, torch.Tensor) else type(real).__name__
        raise ValueError(f"frechet_to: `real` expected a tensor of N >= 2 reference images, got {got}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"frechet_to: `batch_size` expected a positive int, got {batch_size!r}")

    def feats(x):
        with torch.no_grad():
            return torch.cat([features(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]).double()

    real_feats = feats(real)
    _check_features("frechet_to: features(real)", real_feats, real_feats)

    def frechet(samples, reference=None) -> float:  # noqa: ARG001 (the closed loop passes full depth's samples)
        if not isinstance(samples, torch.Tensor):  # e.g. a pipeline's latents of several shapes, as a list
            raise ValueError(f"frechet_to: samples expected a tensor of images (N, ...), got {type(samples).__name__}")
        f = feats(samples.to(real.dtype))
        _check_features("frechet_to: features(samples)", real_feats, f)
        return frechet_distance(f, real_feats)

    return frechet


def _check_features(where: str, a, b) -> None:
    for name, f in (("a", a), ("b", b)):
        if not isinstance(f, torch.Tensor) or f.ndim != 2 or f.shape[0] < 2:
            got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"{where}: `{name}` expected features (N >= 2, F), got {got}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{where}: `b` expected {a.shape[1]} features (as a), got {b.shape[1]}")


def bootstrap_interval(theta: float, replicates, level: float = 0.95) -> tuple[float, float]:
    """The bias-shifted percentile interval of an estimate from its bootstrap replicates:
    ``[q_lo - b, q_hi - b]`` with ``b = mean(replicates) - theta``. The spread is the bootstrap's; the shift
    removes its bias. (A resampled set holds duplicates, which raises the Fréchet distance of every replicate
    by more than the replicates spread at a few hundred samples: the plain percentile interval would sit above
    the estimate, and the "basic" one ``[2 theta - q_hi, 2 theta - q_lo]`` below it.)"""
    r = torch.as_tensor(replicates, dtype=torch.float64).reshape(-1)
    if r.numel() < 2:
        raise ValueError(f"bootstrap_interval: `replicates` expected at least 2 values, got {r.numel()}")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_interval: `level` expected in (0, 1), got {level!r}")
    q = torch.quantile(r, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    b = float(r.mean()) - theta
    return float(q[0]) - b, float(q[1]) - b


def describe_gap(diff: float, lo: float, hi: float, *, higher_is_better: bool = False, unit: str = "",
                 spec: str = ".3g") -> str:
    """A gap ``diff`` (b minus a) with its interval [lo, hi], said plainly: "within noise (+d [lo, hi])" when the
    interval holds 0, else "worse by |d| [..]" or "better by |d| [..]" (lower is better unless ``higher_is_better``)."""
    if not lo <= hi:
        raise ValueError(f"describe_gap: expected lo <= hi, got lo={lo}, hi={hi}")
    f = lambda v: format(v, spec)  # noqa: E731
    if lo <= 0 <= hi:
        return f"within noise ({'+' if diff >= 0 else ''}{f(diff)}{unit} [{f(lo)}, {f(hi)}])"
    worse = (diff < 0) if higher_is_better else (diff > 0)
    sign = -1 if diff < 0 else 1
    a, b = sorted((sign * lo, sign * hi))
    return f"{'worse' if worse else 'better'} by {f(abs(diff))}{unit} [{f(a)}, {f(b)}]"


def compare(result: dict, a: str, b: str, metric: str = "frechet", level: float | None = None) -> dict:
    """The paired gap ``b - a`` of ``metric`` ("frechet" or "accuracy", the seed means) between two variants of
    one ``evaluate`` result, with the bootstrap interval of the difference (same resampled indices for
    both) and its plain statement (``describe_gap``). Returns {"diff", "lo", "hi", "text"}."""
    boot = result.get("bootstrap") or {}
    if metric not in ("frechet", "accuracy"):
        raise ValueError(f"compare: `metric` expected 'frechet' or 'accuracy', got {metric!r}")
    for name in (a, b):
        if name not in boot:
            raise ValueError(f"compare: variant {name!r} has no bootstrap replicates; known: {sorted(boot)}")
    rows = {r["variant"]: r for r in result["rows"] if "error" not in r}
    level = level or result["settings"].get("level", 0.95)
    diff = rows[b][metric] - rows[a][metric]
    rep = torch.as_tensor(boot[b][metric]) - torch.as_tensor(boot[a][metric])
    lo, hi = bootstrap_interval(diff, rep, level)
    higher = metric == "accuracy"
    scale, unit, spec = (100.0, " points", ".2f") if higher else (1.0, "", ".3g")
    text = describe_gap(diff * scale, lo * scale, hi * scale, higher_is_better=higher, unit=unit, spec=spec)
    return {"diff": diff, "lo": lo, "hi": hi, "text": text}


def _seed_inputs(n: int, seed: int, num_classes: int | None, shape):
    """Seed ``seed``'s noise (image i from CPU generator ``seed * 1_000_003 + i``) and labels (uniform draws)."""
    from eekernels.eval.images import seeded_noise

    noise = seeded_noise(range(n), shape, seed * 1_000_003)
    if not num_classes:
        return noise, None
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    return noise, torch.randint(int(num_classes), (n,), generator=g)


def evaluate(models: dict, judge, *, variants: list[Variant], num_samples: int = 1000, sampler: str = "dpmsolver++",
             steps: int = 20, cfg_scale: float = 1.5, seed: int = 0, batch_size: int = 500, device="cpu",
             real_seed: int = 424242, log=print, keep_samples: int = 0, seeds=None, bootstrap: int = 200,
             frechet_mode: str = "plain", level: float = 0.95, bootstrap_seed: int = 0) -> dict:
    """Run every variant and score it, with intervals; returns ``{"rows": [...], "settings": {...}, "samples":
    {name: (k, C, H, W)}, "bootstrap": {name: {"frechet": (R,), "accuracy": (R,)}}}``.

    ``models``: ``{"base": DiT, "finetuned": DiT}`` (a variant whose model is missing is skipped with a note).
    ``seeds``: the independent seeds (default ``(seed,)``); each draws ``num_samples`` noises, labels and real
    glyphs. ``bootstrap``: replicates per interval (0: no intervals). ``frechet_mode``: "plain" or "debiased"
    (FD-infinity). Each row's ``accuracy`` / ``frechet`` is the mean over seeds; ``*_ci`` its interval,
    ``*_per_seed`` the per-seed values; rows other than ``full`` carry ``gap_vs_full`` (see :func:`compare`).
    """
    from eekernels._backend import backend
    from eekernels.data.glyphs import generator_for, glyph_batch
    from eekernels.samplers import make_solver

    seeds = (seed,) if seeds is None else tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("evaluate: `seeds` expected at least one seed, got an empty sequence")
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"evaluate: `num_samples` expected an int >= 2, got {num_samples!r}")
    if not isinstance(bootstrap, int) or bootstrap < 0 or bootstrap == 1:
        raise ValueError(f"evaluate: `bootstrap` expected 0 or an int >= 2 (replicates), got {bootstrap!r}")
    if frechet_mode not in ("plain", "debiased"):
        raise ValueError(f"evaluate: `frechet_mode` expected 'plain' or 'debiased', got {frechet_mode!r}")
    judge = judge.to(device).eval()
    base = models["base"]
    shape = (base.in_channels, base.input_size, base.input_size)
    inputs = [_seed_inputs(num_samples, s, base.num_classes, shape) for s in seeds]
    timesteps = make_solver(sampler, steps).timesteps  # one per model call
    n, S = num_samples, len(seeds)

    # Real data per seed: two independent sets of the sample count (the second gives the floor).
    real = []
    for k, s in enumerate(seeds):
        xa, ya = glyph_batch(n, generator_for(real_seed + s, 0), device)
        xb, _ = glyph_batch(n, generator_for(real_seed + s, 1), device)
        pa, fa = judge.score(xa)
        _, fb = judge.score(xb)
        real.append({"feat": fa.cpu().double(), "feat_b": fb.cpu().double(), "correct": (pa == ya).cpu().double()})

    # Shared resampling indices (paired across variants): per replicate, per seed, generated and real.
    g = torch.Generator().manual_seed(bootstrap_seed)
    idx = [[(torch.randint(n, (n,), generator=g), torch.randint(n, (n,), generator=g),
             torch.randint(n, (n,), generator=g)) for _ in seeds] for _ in range(bootstrap)]

    def fd(feat_gen, feat_real, gen=None):
        if frechet_mode == "plain":
            return frechet(feat_gen, feat_real)
        return frechet_infinity(feat_gen, feat_real, generator=gen)

    # The real set's stats and root per (replicate, seed) are shared by every variant (plain mode).
    real_cache: dict = {}

    def fd_rep(feat_gen, r, k):
        gi, ri, _ = idx[r][k]
        if frechet_mode == "debiased":
            return frechet_infinity(feat_gen[gi], real[k]["feat"][ri], generator=torch.Generator().manual_seed(r))
        if (r, k) not in real_cache:
            sb = feature_stats(real[k]["feat"][ri])
            real_cache[(r, k)] = (sb, sqrt_psd(sb[1]))
        sb, root = real_cache[(r, k)]
        return frechet_distance(feature_stats(feat_gen[gi]), sb, root_b=root)

    def score(name, feats, correct, fd_fn=None, rep_fn=None, fd_inf=None):
        per_fd = [fd_fn(k) for k in range(S)]
        per_acc = [float(c.mean()) for c in correct]
        row = {"variant": name, "accuracy": sum(per_acc) / S, "frechet": sum(per_fd) / S,
               "accuracy_per_seed": per_acc, "frechet_per_seed": per_fd}
        if frechet_mode == "plain" and fd_inf is not None:  # the finite-sample-debiased figure alongside
            row["frechet_infinity"] = sum(fd_inf(k) for k in range(S)) / S
        boot = None
        if bootstrap:
            rf = torch.tensor([sum(rep_fn(r, k) for k in range(S)) / S for r in range(bootstrap)])
            ra = torch.tensor([sum(float(correct[k][idx[r][k][0]].mean()) for k in range(S)) / S
                               for r in range(bootstrap)])
            lo, hi = bootstrap_interval(row["frechet"], rf, level)
            row["frechet_ci"] = [max(0.0, lo) if frechet_mode == "plain" else lo, hi]  # a distance is >= 0
            row["accuracy_ci"] = [max(0.0, v) if i == 0 else min(1.0, v)
                                  for i, v in enumerate(bootstrap_interval(row["accuracy"], ra, level))]
            boot = {"frechet": rf, "accuracy": ra}
        return row, boot

    boots = {}
    real_row, boots["real"] = score(
        "real", None, [r["correct"] for r in real],
        fd_fn=lambda k: fd(real[k]["feat_b"], real[k]["feat"], torch.Generator().manual_seed(k)),
        rep_fn=lambda r, k: fd_rep(real[k]["feat_b"], r, k),
        fd_inf=lambda k: frechet_infinity(real[k]["feat_b"], real[k]["feat"], generator=torch.Generator().manual_seed(k)))
    real_row.update({"block_flop_fraction": None, "wall_s": None, "images_per_s": None,
                     "note": "fresh real glyphs vs another fresh set of the same size"})
    rows = [real_row]
    ops_backend = "auto"
    try:
        ok, err = backend_agrees(base.to(device).eval(), device)
    except Exception as e:  # a kernel that cannot run here: the reference ops run everything
        ok, err = False, float("nan")
        log(f"fidelity: the 'auto' backend failed on {device} ({type(e).__name__}: {str(e)[:200]})")
    if not ok:
        ops_backend = "torch"
        log(f"fidelity: the 'auto' backend disagrees with the torch reference on {device} (max rel error "
            f"{err:.2e}); sampling with the torch reference ops")
    kept = {}
    for v in variants:
        model = models.get(v.model)
        if model is None:
            log(f"fidelity: skipping {v.name}: no {v.model!r} model")
            continue
        model = model.to(device).eval()
        note = "" if ops_backend == "auto" else "torch reference ops"
        v_sampler, v_steps = v.sampler or sampler, v.steps or steps
        opts = dict(sampler=v_sampler, steps=v_steps, cfg_scale=cfg_scale, batch_size=batch_size, device=device)
        feats, correct, wall, first, counted = [], [], 0.0, None, None
        try:
            for noise, labels in inputs:
                try:
                    with backend(ops_backend):
                        x, w, c = sample_variant(model, v, noise, labels, **opts)
                except Exception as e:  # a failing kernel or graph must not lose the other rows
                    note = f"'{ops_backend}' failed ({type(e).__name__}: {str(e)[:200]}); eager torch reference ops"
                    log(f"fidelity: {v.name}: {note}")
                    with backend("torch"):
                        x, w, c = sample_variant(model, v, noise, labels, graphs=False, **opts)
                if c is not None:
                    counted = c if counted is None else (counted[0] + c[0], counted[1] + c[1])
                x = x.clamp(-1, 1)
                first = x if first is None else first
                pred, f = judge.score(x.to(device))
                feats.append(f.cpu().double())
                correct.append((pred.cpu() == labels).double())
                wall += w
        except Exception as e2:
            log(f"fidelity: {v.name}: failed ({type(e2).__name__}: {e2}); row skipped")
            rows.append({"variant": v.name, "error": f"{type(e2).__name__}: {e2}"})
            continue
        row, boots[v.name] = score(
            v.name, feats, correct, fd_fn=lambda k: fd(feats[k], real[k]["feat"], torch.Generator().manual_seed(k)),
            rep_fn=lambda r, k: fd_rep(feats[k], r, k),
            fd_inf=lambda k: frechet_infinity(feats[k], real[k]["feat"], generator=torch.Generator().manual_seed(k)))
        v_ts = timesteps if (v_sampler, v_steps) == (sampler, steps) else make_solver(v_sampler, v_steps).timesteps
        if counted is not None:  # an adaptive model: the blocks it actually ran
            fraction = counted[0] / max(1, counted[1])
        else:
            fraction = 1.0 if v.schedule is None else v.schedule.block_flop_fraction(v_ts)
        fraction *= len(v_ts) / len(timesteps)  # relative to evaluate's run: a row with fewer calls spends less
        row.update({
            "block_flop_fraction": round(fraction, 4),
            "blocks_counted": counted is not None,
            "wall_s": round(wall, 3),
            "images_per_s": round(n * S / wall, 2),
            "schedule": None if v.schedule is None else getattr(v.schedule, "name", repr(v.schedule)),
            "exit_policy": v.exit_policy,
            "sampler": v_sampler,
            "steps": v_steps,
            "note": note,
        })
        rows.append(row)
        if keep_samples:
            kept[v.name] = first[:keep_samples]
        if log is not None:
            ci = (f" [{row['frechet_ci'][0]:.3f}, {row['frechet_ci'][1]:.3f}]" if bootstrap else "")
            log(f"fidelity: {v.name}: accuracy {row['accuracy']:.4f} frechet {row['frechet']:.3f}{ci} "
                f"block FLOPs {row['block_flop_fraction']:.3f} wall {row['wall_s']:.2f}s")
    settings = {"num_samples": num_samples, "seeds": list(seeds), "sampler": sampler, "steps": steps,
                "cfg_scale": cfg_scale, "seed": seeds[0], "real_seed": real_seed, "batch_size": batch_size,
                "bootstrap": bootstrap, "level": level, "frechet_mode": frechet_mode, "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu",
                "torch": torch.__version__, "ops_backend": ops_backend, "backend_check_rel_error": err}
    result = {"rows": rows, "settings": settings, "samples": kept, "bootstrap": boots}
    names = {r["variant"] for r in rows if "error" not in r}
    if bootstrap and "full" in names:
        for r in rows:
            if "error" not in r and r["variant"] not in ("full", "real"):
                r["gap_vs_full"] = {m: compare(result, "full", r["variant"], m) for m in ("frechet", "accuracy")}
    return result


def json_rows(result: dict) -> dict:
    """``rows`` and ``settings`` of a result, ready for ``json.dumps`` (the bootstrap replicates left out)."""
    return {"rows": result["rows"], "settings": result["settings"]}


def markdown_table(result: dict) -> str:
    """The rows as a markdown table with intervals (figures rounded for reading; the JSON keeps full precision)."""
    s = result["settings"]
    seeds = s.get("seeds", [s["seed"]])
    lvl = int(round(100 * s.get("level", 0.95)))
    head = (f"{s['num_samples']} samples per variant and seed, seeds {seeds}, {s['sampler']} {s['steps']} steps, "
            f"CFG {s['cfg_scale']}, Fréchet {s.get('frechet_mode', 'plain')}, {s.get('bootstrap', 0)} bootstrap "
            f"replicates ({lvl}% bias-shifted percentile intervals), {s['device_name']}\n\n")
    lines = ["| variant | judge accuracy | Fréchet distance (judge features) | FD-infinity | vs full: Fréchet | "
             "vs full: accuracy | block-FLOP fraction | wall time (s) | images/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | | | | |")
            continue
        acc = f"{r['accuracy'] * 100:.2f}%"
        if "accuracy_ci" in r:
            acc += f" [{r['accuracy_ci'][0] * 100:.2f}, {r['accuracy_ci'][1] * 100:.2f}]"
        fd = f"{r['frechet']:.3f}"
        if "frechet_ci" in r:
            fd += f" [{r['frechet_ci'][0]:.3f}, {r['frechet_ci'][1]:.3f}]"
        gap = r.get("gap_vs_full") or {}
        g_fd = gap["frechet"]["text"] if gap else "—"
        g_acc = gap["accuracy"]["text"] if gap else "—"
        lines.append(f"| {r['variant']} | {acc} | {fd} | {fmt(r.get('frechet_infinity'), '.3f')} | {g_fd} | {g_acc} | {fmt(r['block_flop_fraction'], '.3f')} | "
                     f"{fmt(r['wall_s'], '.2f')} | {fmt(r['images_per_s'], '.1f')} |")
    return head + "\n".join(lines) + "\n"


def verdict(result: dict) -> list[str]:
    """The issue's expectations checked against the rows, stated plainly (holds / does not hold); with intervals,
    a gap counts only where it exceeds its interval."""
    rows = {r["variant"]: r for r in result["rows"] if "error" not in r}
    out = []
    full, ft, naive = rows.get("full"), rows.get("ase-finetuned"), rows.get("ase-naive")
    has_ci = bool(result.get("bootstrap")) and full is not None and "frechet_ci" in (full or {})
    if full and ft:
        d_acc = (full["accuracy"] - ft["accuracy"]) * 100
        d_fd = (ft["frechet"] - full["frechet"]) / max(abs(full["frechet"]), 1e-12) * 100
        saved = (1 - ft["block_flop_fraction"]) * 100
        if has_ci:
            g = ft["gap_vs_full"]
            # within target when the interval's worse end stays inside it
            tol = 0.10 * abs(full["frechet"])
            ok = -g["accuracy"]["lo"] * 100 <= 1.0 and g["frechet"]["hi"] <= tol
            bad = -g["accuracy"]["hi"] * 100 > 1.0 or g["frechet"]["lo"] > tol
            word = "holds" if ok else "does NOT hold" if bad else "not resolved at this sample count"
            out.append(f"fine-tuned ASE vs full: accuracy {g['accuracy']['text']}, Fréchet {g['frechet']['text']} "
                       f"({d_fd:+.1f}%), {saved:.0f}% fewer block FLOPs -> {word} (target: within 1 point and "
                       "10%; holds: the whole interval inside, does NOT hold: the whole interval outside)")
        else:
            ok = d_acc <= 1.0 and d_fd <= 10.0
            out.append(f"fine-tuned ASE vs full: accuracy {-d_acc:+.2f} points, Fréchet {d_fd:+.1f}%, "
                       f"{saved:.0f}% fewer block FLOPs -> {'holds' if ok else 'does NOT hold'} "
                       "(target: within 1 point and 10%)")
    if naive and ft:
        if has_ci:
            gf, ga = compare(result, "ase-finetuned", "ase-naive"), compare(result, "ase-finetuned", "ase-naive", "accuracy")
            worse = gf["lo"] > 0 or ga["hi"] < 0
            out.append(f"naive truncation vs fine-tuned: Fréchet {gf['text']}, accuracy {ga['text']} -> "
                       f"{'clearly worse than fine-tuned' if worse else 'NOT clearly worse than fine-tuned'}")
        else:
            worse = naive["frechet"] > 1.1 * ft["frechet"] or naive["accuracy"] < ft["accuracy"] - 0.01
            out.append(f"naive truncation: accuracy {naive['accuracy'] * 100:.2f}%, Fréchet {naive['frechet']:.3f} -> "
                       f"{'clearly worse than fine-tuned' if worse else 'NOT clearly worse than fine-tuned'}")
    return out


def save_grid(path, samples: dict, labels_per_row: int = 10) -> None:
    """One PNG: a row of ``labels_per_row`` samples per variant (same noise and labels in every row), 2x size."""
    from eekernels.eval.images import save_grid as grid, to_uint8

    x = torch.cat([x[:labels_per_row] for x in samples.values()])
    grid(path, to_uint8(x.clamp(-1, 1)), nrow=labels_per_row, pad=0, min_size=2 * max(x.shape[-2:]))
