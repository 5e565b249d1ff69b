"""Calibrated exit schedules: measure what each exit depth costs in error at each step, then choose the depths.

``calibrate(model, sampler=..., steps=..., budget=0.7, noises=..., conditions=...)`` returns an ordinary
``ExitSchedule`` (t-indexed, one bin per integer timestep, so every solver timestep has its own bin): the same
deterministic depth for every sample of a step, like the hand-made ASE schedules, but chosen from data.

1. **Measure.** Run the solver at full depth on a small calibration set (the sampler's own ``Session``, so the
   trajectory is exactly ``sample()``'s). At every model call k and every candidate depth d, measure
   ``e[k, d] = RMS(eps_d - eps_full)`` of the CFG-guided eps (what the solver consumes), over the set.
   - ``exit_policy="drop"``: eps_d is the depth-d output (skipped blocks contribute nothing).
   - ``exit_policy="cache"``: eps_d depends also on the last full-depth call j (what the skipped blocks
     added there is replayed): ``e[j, k, d]`` for every reuse distance ``k - j <= max_reuse``.
   Two ways to measure, same numbers up to float rounding:
   - *prefix* (families on the scaffold's generic by-depth loop, e.g. DiT): one full forward gives every
     prefix's output by applying the head to each intermediate hidden state; a cached call's output is the
     head applied to ``x_d(k) + (x_L(j) - x_d(j))``. Cost: one full forward per call, plus heads.
   - *calls* (any ``ScoreModel``: U-ViT, U-Net levels, ...): call the model at each candidate depth (with an
     ``ExitCache`` recorded at call j for "cache").
2. **Proxy of the final-sample error.** Every solver update is linear in (x, eps, history) for fixed
   coefficients, so the final sample's sensitivity to a unit error in eps at call k is a number ``w[k]``
   computed by running the solver's coefficient table on a scalar state (``solver_weights``), the other calls
   answered by the exact denoiser of Gaussian data of std ``data_std`` (linear; it stands in for the network's
   feedback, which damps errors made at high noise; ``data_std=None`` holds the other eps fixed instead, for
   DDIM giving ``|sigma_bar(k+1) - sigma_bar(k)|``, ``sigma_bar = sqrt((1 - abar) / abar)``). The proxy of a
   plan is ``sum_k w[k] e[k, d_k]``: the triangle-inequality bound of the first-order final error.
   ``validate_proxy`` checks how well it ranks plans (the Spearman rank correlation against the real
   final-sample RMS error on held-out noises).
3. **Choose.** A dynamic program over steps minimizes the proxy under the block-FLOP budget
   (``sum_k d_k <= budget * num_blocks * num_calls``: the same fraction ``ExitSchedule.block_flop_fraction``
   reports). Calls that share a timestep bin (Heun's repeated t) share one depth. For "cache" the DP's state
   also holds the last full-depth step, and the first step is full depth (the cache needs a recording).
4. **Select** (``select="closed-loop"``, optional): the DP's optima under several error weightings (and reuse
   limits) are each sampled on the calibration set and the plan whose final samples are nearest the full-depth
   ones is kept; this sees the compounding along a truncated trajectory that the first-order proxy does not.
   "Nearest" is the RMS distance unless ``objective`` gives another measure (e.g. a Fréchet distance to held-out
   images, ``eval.fidelity.frechet_to``).

Calibration runs one full-depth trajectory of the calibration set, plus the measurements. Cost is reported
in ``schedule.calibration`` (:class:`CalibrationReport`): model calls, block evaluations in full-forward
units, seconds, and, with ``time_reference=True``, the seconds of one plain full-depth ``sample()`` run of
the same set.

Every family calibrates: class-conditional (labels), text-conditioned (``conditions`` a ``TextCondition`` of
caption embeddings, ``negative`` for CFG as ``sample()`` takes it) and flow matching (the flow solvers; the
error is measured on the guided velocity, which is what they consume, and ``solver_weights`` uses the flow
ODE's exact Gaussian velocity).
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from eekernels.models.cache import FORECAST_TARGETS, ExitCache, ForecastCache
from eekernels.models.condition import TextCondition
from eekernels.models.scaffold import ScoreModel, add_and_norm, min_depth_of
from eekernels.samplers import EXIT_POLICIES, SOLVERS, Session, guide
from eekernels.samplers.sampling import solver_for
from eekernels.schedules import POLICIES, CalibrationReport, ExitSchedule

MEASURES = ("auto", "prefix", "calls")
SELECTS = ("proxy", "closed-loop")
#: closed-loop selection: the reference data scales whose error weights give the candidate plans
CLOSED_LOOP_DATA_STDS = (0.25, 0.5, 1.0, 2.0, None)


# ---- the solver's weights ------------------------------------------------------------------------------------------

@torch.no_grad()
def solver_weights(solver, data_std: float | None = 0.5) -> list[float]:
    """``w[k] = |d x_final / d eps_k|``: how much a unit error in the eps of model call k moves the final sample.

    Computed by running the solver's own update (its coefficient table) on a (num_calls, 1) float64 state, row
    k perturbed at call k only; every update is linear in x, eps and history (noise is set to zero). The other
    calls' eps come from a reference denoiser: the exact one for data ~ N(0, data_std^2) per pixel, which is
    linear, ``eps(x_t) = sqrt(1 - abar) / (abar data_std^2 + 1 - abar) * x_t``; for the flow solvers (model
    output = velocity, ``x = (1 - s) x0 + s noise`` at ``s = t / num_train_timesteps``) the exact velocity
    ``v(x) = (s - (1 - s) data_std^2) / ((1 - s)^2 data_std^2 + s^2) * x``. It stands for the network's
    feedback: an error made at high noise is largely corrected by the later calls, which the eps-held-fixed
    sensitivity (``data_std=None``) misses, overweighting the noisy end by up to ``sqrt((1 - abar) / abar)``."""
    import numpy as np

    n = solver.num_calls
    st = solver.new_state(torch.zeros(n, 1, dtype=torch.float64))
    if st.noise is not None:
        st.noise.zero_()
    if data_std is not None and not (isinstance(data_std, (int, float)) and data_std > 0):
        raise ValueError(f"data_std: expected a positive number or None, got {data_std!r}")
    flow = solver.prediction == "flow"
    if flow:
        T = float(solver.options["num_train_timesteps"])
    else:
        ac = np.asarray(solver.alphas_cumprod, dtype=np.float64)
    delta = 1e-6  # small: clip_sample stays inactive around 0
    for k in range(n):
        row = st.row()
        eps = torch.zeros(n, 1, dtype=torch.float64)
        if data_std is not None:
            t = float(solver.c(row, "t"))
            x_in = st.x * float(solver.c(row, "c_in")) if solver.scales_input else st.x
            if flow:  # x = (1 - s) x0 + s noise: E[v | x] = E[noise - x0 | x], linear in x
                sg = min(max(t / T, 0.0), 1.0)
                eps = (sg - (1 - sg) * data_std**2) / ((1 - sg) ** 2 * data_std**2 + sg**2) * x_in
            else:
                ab = float(np.interp(t, np.arange(len(ac)), ac))
                eps = math.sqrt(1 - ab) / (ab * data_std**2 + 1 - ab) * x_in
        eps[k] += delta
        solver.update(st, row, eps, torch.zeros_like(eps))
        st.counter.add_(1)
    return [abs(float(v)) / delta for v in st.x[:, 0]]


# ---- measurement ---------------------------------------------------------------------------------------------------

def _uses_generic_loop(model) -> bool:
    need = ("embed", "block_inputs", "entry_norm", "head_norm", "head", "unembed", "blocks")
    return (isinstance(model, ScoreModel) and type(model).forward_sorted is ScoreModel.forward_sorted
            and all(hasattr(model, n) for n in need))


def prefix_forward(model, x, t, y):
    """The scaffold's generic loop at full depth, keeping every block's residual stream: returns
    ``(out (B, C_out, H, W), states {d: x after block d}, cond)``; ``prefix_output(model, states[d], cond)`` is
    the depth-d output (and ``out`` equals ``model(x, t, y)``)."""
    L, B = model.num_blocks, x.shape[0]
    carry, cond = model.embed(x, t, y, L)
    states = {}
    for i, block in enumerate(model.blocks):
        nxt = model.entry_norm(cond, i + 1).rows(B) if i + 1 < L else model.head_norm(cond).rows(B)
        carry = block(carry, model.block_inputs(cond, i, B), nxt)
        states[i + 1] = carry.x
    return model.unembed(model.head(carry.h, cond), cond), states, cond


def prefix_output(model, x_d, cond, delta=None):
    """The output of exiting with residual stream ``x_d``: the head norm of ``x_d`` (plus ``delta``, the cached
    contribution of the skipped blocks, for exit_policy="cache"), the head and unembed, as the scaffold does."""
    add = torch.zeros_like(x_d) if delta is None else delta.to(x_d.dtype)
    _, h = add_and_norm(x_d, add, None, model.head_norm(cond))
    return model.unembed(model.head(h, cond), cond)


class _Probe:
    """Stands in for the model inside a ``Session``: runs the full-depth call (the trajectory goes on at full
    depth) and measures every candidate depth's error at that call."""

    def __init__(self, model, session_ref, candidates, policy, max_reuse, measure, channels, cfg_channels, progress,
                 total):
        self.model, self.ref, self.cands, self.policy = model, session_ref, candidates, policy
        self.R, self.measure, self.C, self.cfg_channels = max_reuse, measure, channels, cfg_channels
        self.L = model.num_blocks
        self.k = 0
        self.drop_err: list[list[float]] = []
        self.cache_err: dict = {}  # (j, k) -> [per candidate]
        self.window: list = []     # recent (j, recording) for cache
        self.calls, self.blocks = 0, 0.0
        self.progress, self.total = progress, total
        self.traj_seconds = 0.0

    def __getattr__(self, name):  # num_classes, null_class, ... come from the model
        return getattr(self.model, name)

    def _eps(self, out):
        s = self.ref[0]
        return guide(out, self.C, s.cfg, s.state.x.dtype, self.cfg_channels)[0]

    @staticmethod
    def _rms(a, b) -> float:
        return float((a.double() - b.double()).square().mean().sqrt())

    def __call__(self, x, t, y, **kw):
        k, L = self.k, self.L
        trunc = [d for d in self.cands if d < L]
        t0 = time.perf_counter()
        if self.measure == "prefix":
            full, states, cond = prefix_forward(self.model, x, t, y)
            self.calls += 1
            self.blocks += 1.0
        else:
            rec = ExitCache(trunc) if self.policy == "cache" and trunc else None
            full = self.model(x, t, y, exit_cache=rec) if rec is not None else self.model(x, t, y)
            self.calls += 1
            self.blocks += 1.0
        self.traj_seconds += time.perf_counter() - t0
        e_full = self._eps(full)
        if self.policy == "drop":
            row = []
            for d in self.cands:
                if d == L:
                    row.append(0.0)
                    continue
                if self.measure == "prefix":
                    out = prefix_output(self.model, states[d], cond)
                else:
                    out = self.model(x, t, y, depth=d)
                    self.calls += 1
                    self.blocks += d / L
                row.append(self._rms(self._eps(out), e_full))
            self.drop_err.append(row)
        else:
            for j, recj in self.window:
                row = []
                for d in self.cands:
                    if d == L:
                        row.append(0.0)
                        continue
                    if self.measure == "prefix":
                        out = prefix_output(self.model, states[d], cond, recj[L] - recj[d])
                    else:
                        out = self.model(x, t, y, depth=d, exit_cache=recj)
                        self.calls += 1
                        self.blocks += d / L
                    row.append(self._rms(self._eps(out), e_full))
                self.cache_err[(j, k)] = row
            rec_k = states if self.measure == "prefix" else rec
            self.window = (self.window + [(k, rec_k)])[-self.R:]
        self.k += 1
        if self.progress is not None:
            self.progress(self.k, self.total)
        return full


def run_probe(probe, ref: list, model, solver, noises, conditions, cfg_scale, negative, cfg_channels) -> None:
    """Run ``solver``'s whole trajectory of the set with ``probe`` standing in for the model (a ``Session``, so the
    trajectory is ``sample()``'s; ``ref[0]`` is set to it: the probe guides its outputs with the session's CFG)."""
    from eekernels.samplers.sampling import _input_dtype
    from eekernels.samplers.solvers import draw_noise

    cfg = cfg_scale != 1
    session = Session(probe, solver, noises, conditions, cfg, None, cfg_channels=cfg_channels if cfg else None,
                      in_dtype=_input_dtype(model, noises))
    ref[0] = session
    session.reset(noises, conditions, cfg_scale, negative)
    gen = torch.Generator(device=noises.device).manual_seed(0) if solver.stochastic else None
    for k in range(solver.num_calls):
        if solver.noise_at[k]:
            draw_noise(session.state.noise, gen)
        session.step(None)


# ---- the dynamic program ------------------------------------------------------------------------------------------

def _groups(timesteps: list[float], num_timesteps: int) -> list[list[int]]:
    """Consecutive model calls whose t falls in the same integer bin share one depth (Heun's repeated t)."""
    groups, last = [], None
    for k, t in enumerate(timesteps):
        b = min(max(int(math.floor(t)), 0), num_timesteps - 1)
        if groups and b == last:
            groups[-1].append(k)
        else:
            groups.append([k])
        last = b
    return groups


def _unit_costs(candidates, costs) -> dict:
    """Integer cost per candidate depth: ``costs[d]``, or the depth itself (block units) when ``costs`` is None."""
    return {d: int(d if costs is None else costs[d]) for d in candidates}


def choose_drop(errors, weights, groups, candidates, units: int, costs=None) -> tuple[list[int], float]:
    """Depth per group minimizing ``sum_k w[k] e[k, d_k]`` with ``sum_k cost(d_k) <= units`` (exact DP over
    groups); cost(d) = d (block units) or ``costs[d]`` (integer units, e.g. measured FLOPs, ``calibrate``).

    errors: [call][candidate index]; returns (depth per call, proxy). Ties go to the deeper depth."""
    unit = _unit_costs(candidates, costs)
    INF = float("inf")
    dp = torch.full((units + 1,), INF, dtype=torch.float64)
    dp[0] = 0.0
    choice = []
    order = sorted(range(len(candidates)), key=lambda i: -candidates[i])  # deepest first: ties stay deep
    for g in groups:
        new = torch.full_like(dp, INF)
        arg = torch.full((units + 1,), -1, dtype=torch.long)
        for i in order:
            d = candidates[i]
            cost = unit[d] * len(g)
            if cost > units:
                continue
            e = sum(weights[k] * errors[k][i] for k in g)
            cand = torch.full_like(dp, INF)
            cand[cost:] = dp[: units + 1 - cost] + e
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.full_like(arg, i), arg)
        dp = new
        choice.append(arg)
    if not torch.isfinite(dp).any():
        raise ValueError(f"budget: no plan fits {units} block units with candidates {candidates}")
    best = float(dp.min())
    b = int(torch.nonzero(dp <= best).min())  # least compute among the best
    picks = []
    for gi in range(len(groups) - 1, -1, -1):
        i = int(choice[gi][b])
        picks.append(i)
        b -= unit[candidates[i]] * len(groups[gi])
    picks.reverse()
    plan = [0] * sum(len(g) for g in groups)
    for g, i in zip(groups, picks):
        for k in g:
            plan[k] = candidates[i]
    return plan, best


def choose_cache(errors: dict, weights, groups, candidates, units: int, total: int,
                 max_reuse: int, costs=None) -> tuple[list[int], float]:
    """The "cache" DP: state (last full group, units used). errors[(j, k)][candidate index] for the error of
    replaying the recording of call j at call k; the first group runs at full depth. Costs as ``choose_drop``."""
    unit = _unit_costs(candidates, costs)
    INF = float("inf")
    G, full_i = len(groups), candidates.index(total)
    # dp[f]: best proxy with the last full group f, per units used
    dp = {}
    c0 = unit[total] * len(groups[0])
    if c0 > units:
        raise ValueError(f"budget: exit_policy='cache' needs the first step at full depth ({c0} block units), "
                         f"the budget allows {units}")
    first = torch.full((units + 1,), INF, dtype=torch.float64)
    first[c0] = 0.0
    dp[0] = first
    back = [{0: (None, full_i, None)}]  # per group: {f: (prev f, candidate, arg tensor)}
    for gi in range(1, G):
        g = groups[gi]
        new, nb = {}, {}
        # full depth at gi: from any state
        cost = unit[total] * len(g)
        best = torch.full((units + 1,), INF, dtype=torch.float64)
        arg_f = torch.full((units + 1,), -1, dtype=torch.long)
        for f, vals in dp.items():
            cand = torch.full_like(vals, INF)
            if cost <= units:
                cand[cost:] = vals[: units + 1 - cost]
            better = cand < best
            best = torch.where(better, cand, best)
            arg_f = torch.where(better, torch.full_like(arg_f, f), arg_f)
        new[gi] = best
        nb[gi] = ("full", arg_f)
        # truncated at gi: keep f
        for f, vals in dp.items():
            j = groups[f][-1]
            if g[-1] - j > max_reuse:
                continue
            keep = torch.full((units + 1,), INF, dtype=torch.float64)
            arg_i = torch.full((units + 1,), -1, dtype=torch.long)
            for i in sorted(range(len(candidates)), key=lambda i: -candidates[i]):
                d = candidates[i]
                if d == total:
                    continue
                c = unit[d] * len(g)
                if c > units:
                    continue
                e = sum(weights[k] * errors[(j, k)][i] for k in g)
                cand = torch.full_like(vals, INF)
                cand[c:] = vals[: units + 1 - c] + e
                better = cand < keep
                keep = torch.where(better, cand, keep)
                arg_i = torch.where(better, torch.full_like(arg_i, i), arg_i)
            if torch.isfinite(keep).any():
                new[f] = keep
                nb[f] = ("trunc", arg_i)
        dp = new
        back.append(nb)
    best_f, best_b, best_v = None, None, INF
    for f, vals in sorted(dp.items()):
        v = float(vals.min())
        if v < best_v:
            best_f, best_v = f, v
            best_b = int(torch.nonzero(vals <= v).min())
    if best_f is None:
        raise ValueError(f"budget: no exit_policy='cache' plan fits {units} block units")
    depths = [0] * G
    f, b = best_f, best_b
    for gi in range(G - 1, 0, -1):
        kind, arg = back[gi][f]
        if kind == "full":
            depths[gi] = total
            f = int(arg[b])
            b -= unit[total] * len(groups[gi])
        else:
            i = int(arg[b])
            depths[gi] = candidates[i]
            b -= unit[candidates[i]] * len(groups[gi])
    depths[0] = total
    plan = [0] * sum(len(g) for g in groups)
    for g, d in zip(groups, depths):
        for k in g:
            plan[k] = d
    return plan, best_v


def plan_proxy(report: CalibrationReport, plan: list[int]) -> float:
    """The proxy ``sum_k w[k] e[k, d_k]`` of any plan (depth per call) from a report's measurements (inf where a
    cached call's reuse distance was not measured or no full call came first)."""
    cands, L, w = report.candidates, report.num_blocks, report.weights
    if len(plan) != len(w):
        raise ValueError(f"plan: expected {len(w)} depths (one per model call), got {len(plan)}")
    total, last = 0.0, None
    for k, d in enumerate(plan):
        if d not in cands:
            raise ValueError(f"plan: depth {d} at call {k} is not a calibrated candidate {cands}")
        i = cands.index(d)
        if report.exit_policy == "drop":
            total += w[k] * report.errors[k][i]
        elif d == L:
            last = k
        else:
            if last is None or k - last > report.max_reuse:
                return float("inf")
            total += w[k] * report.errors[last][k][i]
    return total


# ---- validation ---------------------------------------------------------------------------------------------------

def _spearman(a, b) -> float:
    def ranks(v):
        v = torch.as_tensor(v, dtype=torch.float64)
        order = torch.argsort(v)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for val in torch.unique(v):  # average ranks of ties
            m = v == val
            r[m] = r[m].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


@torch.no_grad()
def validate_proxy(model, schedule: ExitSchedule, noises: torch.Tensor, conditions=None, *, num_plans: int = 8,
                   seed: int = 0, negative: TextCondition | None = None) -> dict:
    """Does the proxy rank plans as the real final-sample error does? On held-out ``noises`` (and labels or
    text conditions, and ``negative`` as ``sample()`` takes it), for
    the calibrated plan, DP plans at other budgets and random plans over the candidates: the proxy (from the
    calibration's measurements) and the RMS distance of the final samples to the full-depth ones. Returns
    {"spearman", "num_samples", "plans": [{"plan", "proxy", "real", "flop_fraction", "cost_fraction"}],
    "seconds"} (its cost: ``num_plans + 2`` sampling runs of the held-out set)."""
    from eekernels.samplers import sample

    rep = _report_of(schedule)
    L, cands, calls = rep.num_blocks, rep.candidates, rep.call_timesteps
    groups = _groups(calls, schedule.num_timesteps)
    units_full, costs = rep.full_units(len(calls)), rep.costs()
    plans = [list(rep.plan)]
    for frac in (rep.budget, 0.35, 0.5, 0.6, 0.8, 0.9):  # the budget's own proxy optimum (closed-loop may differ)
        try:
            p = _choose(rep, groups, int(math.floor(frac * units_full + 1e-9)))[0]
        except ValueError:
            continue
        if p not in plans:
            plans.append(p)
    g = torch.Generator().manual_seed(seed)
    tries = 0
    while len(plans) < num_plans + 1 and tries < 50 * num_plans:
        tries += 1
        picks = [cands[int(torch.randint(len(cands), (1,), generator=g))] for _ in groups]
        if rep.exit_policy == "cache":
            picks[0] = L
        p = [d for grp, d in zip(groups, picks) for _ in grp]
        if math.isfinite(plan_proxy(rep, p)) and p not in plans:
            plans.append(p)
    start = time.perf_counter()
    kw = dict(sampler=rep.sampler, steps=rep.steps, cfg_scale=rep.cfg_scale, negative=negative, **rep.solver_options)
    ref = sample(model, noises, conditions, schedule=None, **kw).double()
    rows = []
    for p in plans:
        sched = _table_schedule(p, calls, L, schedule.num_timesteps, "validation")
        x = sample(model, noises, conditions, schedule=sched, exit_policy=rep.exit_policy, **kw).double()
        rows.append({"plan": p, "proxy": plan_proxy(rep, p), "real": float((x - ref).square().mean().sqrt()),
                     "flop_fraction": sum(p) / (L * len(calls)),
                     "cost_fraction": sum(costs[d] for d in p) / units_full})
    rho = _spearman([r["proxy"] for r in rows], [r["real"] for r in rows]) if len(rows) > 2 else float("nan")
    return {"spearman": rho, "num_samples": int(noises.shape[0]), "plans": rows,
            "seconds": round(time.perf_counter() - start, 4)}


def _report_of(schedule) -> CalibrationReport:
    rep = getattr(schedule, "calibration", None)
    if not isinstance(rep, CalibrationReport):
        raise ValueError("schedule: expected a calibrated ExitSchedule (from calibrate() or ExitSchedule.load()), got "
                         f"{getattr(schedule, 'name', type(schedule).__name__)} without a calibration report")
    if rep.joint is not None:  # its steps and per-call policies are the search's choice, not the DP's alone
        raise ValueError(f"schedule: {schedule.name!r} is a joint plan (calibrate(..., search=...)), chosen by "
                         f"sampling its alternatives; expected a calibration of one step count and policy: calibrate "
                         f"again with the budget or plans wanted")
    return rep


def _choose(rep: CalibrationReport, groups, units):
    if rep.exit_policy == "drop":
        return choose_drop(rep.errors, rep.weights, groups, rep.candidates, units, rep.costs())
    errs = {(j, k): rep.errors[j][k] for j in range(len(rep.errors)) for k in range(len(rep.errors[j]))
            if rep.errors[j][k] is not None}
    return choose_cache(errs, rep.weights, groups, rep.candidates, units, rep.num_blocks, rep.max_reuse,
                        rep.costs())


def nearest_call_table(values, call_timesteps, num_timesteps: int, bins: int | None = None) -> list:
    """A per-bin table over [0, num_timesteps) (``bins`` equal bins; default one per integer t) giving each call's
    bin (``call_timesteps``) that call's value (a depth, a policy, an unconditional mode); bins between calls take the
    value of the nearest call's bin (ties: the noisier one)."""
    bins = num_timesteps if bins is None else bins
    scale = 1.0 if bins == num_timesteps else bins / num_timesteps
    ts = [min(max(int(math.floor(float(t) * scale)), 0), bins - 1) for t in call_timesteps]
    marks = sorted({(b, v) for b, v in zip(ts, values)}, key=lambda m: m[0])
    table = []
    j = 0
    for b in range(bins):
        while j + 1 < len(marks) and abs(marks[j + 1][0] - b) <= abs(marks[j][0] - b):
            j += 1
        table.append(marks[j][1])
    return table


def _table_schedule(plan, call_timesteps, total, num_timesteps, name) -> ExitSchedule:
    """A t-indexed table (one bin per integer t) giving each call's bin (``call_timesteps``: the calibrated
    trajectory's) its planned depth; bins between calls take the depth of the nearest call timestep (ties: the
    noisier one)."""
    return ExitSchedule(nearest_call_table(plan, call_timesteps, num_timesteps), total, num_timesteps, name=name)


# ---- what a call at each depth costs ----------------------------------------------------------------------------

COST_UNITS = 256  # integer cost units of one full-depth call when depth_costs is given (the DP's resolution)


@torch.no_grad()
def depth_flops(model, x: torch.Tensor, y=None, depths=None) -> dict:
    """{depth: FLOPs of one ``model(x, t, y, depth=d)`` call} counted by ``torch.utils.flop_counter`` (GEMMs,
    convolutions and attention, as it counts them) at t = 500, for every depth in ``depths`` (default all)."""
    from torch.utils.flop_counter import FlopCounterMode

    from eekernels.samplers.sampling import _input_dtype

    L, lo = model.num_blocks, int(getattr(model, "min_depth", 1) or 1)
    t = torch.full((x.shape[0],), 500.0, device=x.device)
    x = x.to(_input_dtype(model, x))
    out = {}
    for d in (range(lo, L + 1) if depths is None else depths):
        counter = FlopCounterMode(display=False)
        with counter:
            model(x, t, y, depth=int(d))
        out[int(d)] = int(counter.get_total_flops())
    return out


def _normalized_costs(model, cands, depth_costs, noises, conditions) -> dict | None:
    L = model.num_blocks
    if depth_costs is None:
        return None
    if isinstance(depth_costs, str):
        if depth_costs != "flops":
            raise ValueError(f"depth_costs: expected None, 'flops', or {{depth: cost}}, got {depth_costs!r}")
        y = None if conditions is None else (conditions.index(slice(0, 1)) if isinstance(conditions, TextCondition)
                                             else conditions[:1])
        raw = depth_flops(model, noises[:1], y, cands)
    elif isinstance(depth_costs, dict):
        raw = dict(depth_costs)
    else:
        seq = list(depth_costs)
        if len(seq) != L:
            raise ValueError(f"depth_costs: expected {L} costs (depth 1 .. {L}), got {len(seq)}")
        raw = {d: seq[d - 1] for d in range(1, L + 1)}
    missing = [d for d in cands if d not in raw]
    if missing:
        raise ValueError(f"depth_costs: expected a cost for every candidate depth {cands}, missing {missing}")
    try:
        vals = {d: float(raw[d]) for d in cands}
    except (TypeError, ValueError):
        raise ValueError(f"depth_costs: expected a number per depth, got {raw}") from None
    if any(not math.isfinite(v) or v <= 0 for v in vals.values()):
        raise ValueError(f"depth_costs: expected finite costs > 0, got {vals}")
    return {d: max(1, round(COST_UNITS * v / vals[L])) for d, v in vals.items()}


def replan(schedule: ExitSchedule, budget: float, *, name: str | None = None) -> ExitSchedule:
    """A calibrated ``schedule``'s measurements re-planned under another ``budget`` (same costs, same proxy):
    no model call. Returns a new calibrated schedule whose report has the new plan, proxy, budget and fractions
    (and no validation: that was of the old plan)."""
    rep = _report_of(schedule)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget: expected a block-FLOP fraction in (0, 1], got {budget!r}")
    if rep.errors is None:
        raise ValueError("schedule: its calibration report holds no measurements to re-plan from")
    n = len(rep.call_timesteps)  # the calibrated trajectory's calls, as recorded (no model, no solver here)
    groups = _groups(rep.call_timesteps, schedule.num_timesteps)
    plan, proxy = _choose(rep, groups, int(math.floor(budget * rep.full_units(n) + 1e-9)))
    costs = rep.costs()
    new = dataclasses.replace(rep, budget=float(budget), plan=plan, proxy=proxy, validation=None,
                              block_flop_fraction=sum(plan) / (rep.num_blocks * n),
                              cost_fraction=sum(costs[d] for d in plan) / rep.full_units(n))
    sched = _table_schedule(plan, rep.call_timesteps, rep.num_blocks, schedule.num_timesteps,
                            name or f"calibrated({rep.exit_policy}, {rep.sampler} {rep.steps}, budget {budget:g})")
    sched.calibration = new
    return sched


# ---- closed-loop selection -----------------------------------------------------------------------------------------

def closed_loop_objective(objective) -> tuple[str, object]:
    """``(name, distance)`` for ``calibrate``'s ``objective``: None is the RMS distance of final samples to full
    depth's ("rms"); a callable ``objective(samples, reference)`` is wrapped so that anything but a finite real
    number (a Python number or a one-element tensor) is a named ValueError."""
    if objective is None:
        return "rms", lambda x, ref: float((x.double() - ref.double()).square().mean().sqrt())
    if not callable(objective):
        raise ValueError(f"objective: expected None (RMS to full depth) or a callable (samples, reference) -> float, "
                         f"got {type(objective).__name__}")
    name = getattr(objective, "__name__", type(objective).__name__)

    def distance(x, ref) -> float:
        v = objective(x, ref)
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"objective: expected {name}(samples, reference) to return a finite number, got "
                             f"{v!r}"[:300])
        return float(v)

    return name, distance


def _candidate_plans(errors, exit_policy, solver, groups, cands, units, L, max_reuse, costs, data_std) -> dict:
    """{plan: where it came from}: the DP's optimum under the error weights of each reference data scale
    (``CLOSED_LOOP_DATA_STDS`` and the calibration's own) and, for "cache", each reuse limit 1..max_reuse."""
    plans: dict = {}
    stds = [data_std] + [v for v in CLOSED_LOOP_DATA_STDS if v != data_std]
    for ds in stds:
        w = solver_weights(solver, ds)
        for r in ([None] if exit_policy == "drop" else range(max_reuse, 0, -1)):
            try:
                if exit_policy == "drop":
                    plan, _ = choose_drop(errors, w, groups, cands, units, costs)
                else:
                    plan, _ = choose_cache(errors, w, groups, cands, units, L, r, costs)
            except ValueError:  # no plan under this reuse limit fits the budget
                continue
            plans.setdefault(tuple(plan), f"data_std={ds}" + ("" if r is None else f", max_reuse={r}"))
    return plans


def _closed_loop(model, plans: dict, rep: CalibrationReport, num_timesteps, noises, conditions, negative,
                 cfg_channels, solver_options, distance) -> list[dict]:
    """Sample the calibration set under each candidate plan; ``distance`` (``closed_loop_objective``; by default
    the RMS of its final samples to the full-depth ones, what the proxy stands for, measured), per plan."""
    from eekernels.samplers import sample

    kw = dict(sampler=rep.sampler, steps=rep.steps, cfg_scale=rep.cfg_scale, negative=negative, graphs=False,
              cfg_channels=cfg_channels, **solver_options)
    ref = sample(model, noises, conditions, schedule=None, **kw).double()
    rows = []
    for plan, origin in plans.items():
        sched = _table_schedule(list(plan), rep.call_timesteps, rep.num_blocks, num_timesteps,
                                "closed-loop candidate")
        x = sample(model, noises, conditions, schedule=sched, exit_policy=rep.exit_policy, **kw).double()
        rows.append({"plan": list(plan), "proxy": plan_proxy(rep, list(plan)),
                     "real": distance(x, ref), "from": origin})
    return rows


# ---- calibrate ----------------------------------------------------------------------------------------------------

def _check_holdout(holdout, noises, conditions):
    """``holdout`` as (noises, conditions, negative); a pair (noises, conditions) has no negative (the model's
    null caption under CFG, where it has one)."""
    if holdout is None:
        return None
    if not isinstance(holdout, (tuple, list)) or len(holdout) not in (2, 3):
        n = f" of {len(holdout)}" if isinstance(holdout, (tuple, list)) else ""
        raise ValueError(f"holdout: expected (noises, conditions) or (noises, conditions, negative), got "
                         f"{type(holdout).__name__}{n}")
    hn, hy = holdout[0], holdout[1]
    if not isinstance(hn, torch.Tensor) or hn.dim() != 4 or hn.shape[1:] != noises.shape[1:]:
        got = tuple(hn.shape) if isinstance(hn, torch.Tensor) else type(hn).__name__
        raise ValueError(f"holdout: expected noises of shape (n, {', '.join(map(str, noises.shape[1:]))}), got {got}")
    if (hy is None) != (conditions is None) or isinstance(hy, TextCondition) != isinstance(conditions, TextCondition):
        raise ValueError(f"holdout: expected conditions of the calibration's kind ({type(conditions).__name__}), "
                         f"got {type(hy).__name__}")
    return hn, hy, holdout[2] if len(holdout) == 3 else None


def _check(model, sampler, steps, cfg_scale, exit_policy, budget, noises, conditions, candidates, max_reuse,
           measure, num_timesteps):
    if not isinstance(model, torch.nn.Module) or not isinstance(getattr(model, "num_blocks", None), int):
        raise ValueError(f"model: expected a score network with `num_blocks` (a ScoreModel), got {type(model).__name__}")
    if sampler not in SOLVERS:
        raise ValueError(f"sampler: expected one of {sorted(SOLVERS)}, got {sampler!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    if exit_policy not in EXIT_POLICIES:
        raise ValueError(f"exit_policy: expected one of {EXIT_POLICIES}, got {exit_policy!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget: expected a block-FLOP fraction in (0, 1], got {budget!r}")
    if not isinstance(noises, torch.Tensor) or not noises.is_floating_point() or noises.dim() != 4 or noises.shape[0] < 1:
        got = tuple(noises.shape) if isinstance(noises, torch.Tensor) else type(noises).__name__
        raise ValueError(f"noises: expected a floating (B >= 1, C, H, W) tensor of calibration noise, got {got}")
    B = noises.shape[0]
    if getattr(model, "condition", "label") == "text":
        if not isinstance(conditions, TextCondition):
            raise ValueError(f"conditions: expected an eekernels.TextCondition (caption tokens, mask, pooled: one row "
                             f"per noise) for the text-conditioned {type(model).__name__}, got "
                             f"{type(conditions).__name__}")
        if conditions.batch != B:
            raise ValueError(f"conditions: expected {B} rows (one caption per noise), got {conditions.batch}")
    else:
        if conditions is not None and not isinstance(conditions, torch.Tensor):
            raise ValueError(f"conditions: expected (B,) integer class labels or None for the class-conditional "
                             f"{type(model).__name__}, got {type(conditions).__name__}")
        if conditions is not None and conditions.shape != (B,):
            raise ValueError(f"conditions: expected shape ({B},) (one label per noise), got {tuple(conditions.shape)}")
    L, lo = model.num_blocks, int(getattr(model, "min_depth", 1) or 1)
    if candidates is not None:
        c = list(candidates)
        if not c or any(isinstance(d, bool) or not isinstance(d, int) or not lo <= d <= L for d in c):
            raise ValueError(f"candidates: expected depths in [{lo}, {L}] (the model's range), got {c}")
    if isinstance(max_reuse, bool) or not isinstance(max_reuse, int) or max_reuse < 1:
        raise ValueError(f"max_reuse: expected an integer >= 1 (model calls a recording may be replayed), "
                         f"got {max_reuse!r}")
    if measure not in MEASURES:
        raise ValueError(f"measure: expected one of {MEASURES}, got {measure!r}")
    if measure == "prefix" and not _uses_generic_loop(model):
        raise ValueError(f"measure: 'prefix' needs a family on the scaffold's generic by-depth loop; "
                         f"{type(model).__name__} has its own forward_sorted (use 'calls' or 'auto')")
    if not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"num_timesteps: expected an int >= 2, got {num_timesteps!r}")


@torch.no_grad()
def calibrate(model, *, sampler: str = "dpmsolver++", steps: int = 20, cfg_scale: float = 1.0,
              exit_policy: str = "drop", budget: float = 0.7, noises: torch.Tensor, conditions=None,
              candidates=None, max_reuse: int = 4, measure: str = "auto", holdout=None, validate_plans: int = 8,
              search=None, time_reference: bool = False, cfg_channels: int | None = None, num_timesteps: int = 1000,
              progress=None, name: str | None = None, data_std: float | None = 0.5, depth_costs=None,
              negative: TextCondition | None = None, select: str = "proxy", forecast_order: int | None = None,
              forecast_target: str | None = None, objective=None, **solver_options) -> ExitSchedule:
    """A calibrated ``ExitSchedule`` for ``model`` under ``sampler``/``steps``/``cfg_scale`` (module docstring).

    Args:
        noises: (B, C, H, W) calibration noise; conditions: (B,) labels (or None, unconditional), or for a
            text-conditioned family (PixArt, SD3, FLUX) a ``TextCondition`` of B captions' embeddings.
        negative: text families with CFG: the unconditional half (negative-prompt embeddings), as ``sample()``
            takes it (None: the model's null caption where it has one, PixArt).
        sampler: any of ``SOLVERS`` that fits the model's prediction (flow families: "flow_euler", ...).
        exit_policy: "drop" or "cache". budget: the block-FLOP fraction not to exceed (e.g. 0.7).
        candidates: the depths to consider (default every depth in [min_depth, num_blocks]).
        max_reuse: "cache": the most model calls a full call's recording may be replayed for.
        measure: "prefix" (one forward gives every depth: scaffold generic-loop families), "calls" (any model)
            or "auto" (prefix where it applies).
        holdout: (noises, conditions) or (noises, conditions, negative) to validate the proxy on
            (``validate_proxy``; result in ``schedule.calibration.validation``); validate_plans: how many plans
            it ranks.
        time_reference: also time one plain full-depth ``sample()`` of the calibration set.
        progress: callable(done, total) after each model call of the calibration run.
        data_std: the reference data scale of the error weights (``solver_weights``; None: eps held fixed).
        depth_costs: what a call at each depth costs, for the budget: None (the depth itself: block units, the
            ``ExitSchedule.block_flop_fraction`` convention, right for transformers whose blocks are equal),
            "flops" (measured: ``depth_flops``, one call per candidate depth under ``torch.utils.flop_counter``;
            right for a U-Net, whose full-resolution level costs most), or {depth: cost} / a sequence indexed
            by depth - 1. Costs are normalized to integers (``COST_UNITS`` per full-depth call); ``budget`` is
            then a fraction of full depth's cost, and the report's ``cost_fraction`` is the plan's.
        search: None (the plan above: depths at ``steps``, one policy) or a plan over more (``calibrate_joint``):
            "steps" also tries fewer solver steps at deeper plans spending the same block FLOPs, "policy" gives each
            call its own exit policy among "drop", "cache" and "forecast" (or name those to try), "uncond" (CFG
            only) also plans that run the conditional half alone at some calls and forecast the unconditional output
            (``ExitSchedule.uncond``; half a call each); e.g. "steps,policy". Every alternative and the fewer-steps baseline (full depth at the step count of the same
            FLOPs) are sampled on the set and the closest to full depth at ``steps`` wins
            (``report.joint`` lists them); a plan that does not beat the baseline returns the baseline.
            ``exit_policy="forecast"`` is always planned this way. Wherever "forecast" is planned at a step count,
            the alternatives include, besides the cache plan's depths forecasting, up to ``REGULAR_PLANS`` (12)
            regular plans (``regular_forecast_plans``: full depth at the first w calls and every k-th after, one
            depth between, within the budget and at most 0.06 under it; with ``depth_costs`` counted in those
            costs; depth 0, no block between full calls, where the model allows it). Every forecasting alternative
            is sampled at each order of ``forecast_order``; the chosen plan's order is stored in the schedule
            (``ExitSchedule.forecast_order``), which ``sample()`` and ``accelerate()`` then use. Cost: a calibration
            per step count and policy plus one ``sample()`` per alternative, order and target (up to 12 regular
            plans per step count: 48 runs on the native DiT with both orders and targets).
        forecast_order: the forecast orders the joint search samples its forecasting alternatives at: None (default)
            both 1 and 2 (the better one on the calibration set is kept), or 1 or 2 only.
        forecast_target: what those alternatives extrapolate: None (default) the skipped blocks' residual and, on a
            model whose blocks forecast their branch outputs (``forecast_blocks``: the native DiT), also each skipped
            block's attention and MLP outputs ("blocks", TaylorSeer's predictor); or "residual" or "blocks" only.
            The chosen one is stored in the schedule (``ExitSchedule.forecast_target``).
        select: "proxy" (the DP's optimum of the proxy) or "closed-loop": the DP's optima under several error
            weightings (``CLOSED_LOOP_DATA_STDS``; for "cache" also every reuse limit up to ``max_reuse``) are
            each sampled on the calibration set, and the plan whose final samples are closest to full depth's
            (RMS) is kept. This sees what the first-order proxy does not: how errors compound along the
            truncated trajectory (for "cache", over a run of replayed calls). Cost: one ``sample()`` of the
            set per distinct candidate plan (``report.selection`` lists them), counted in the report.
        objective: how the closed loop (``select="closed-loop"``, ``search`` or ``exit_policy="forecast"``) ranks
            the sampled plans: None (default) the RMS distance of their final samples to full depth's, or a
            callable ``objective(samples, reference) -> float``, lower is better (``samples``: a plan's final
            samples of the calibration set; ``reference``: full depth's at ``steps``, the same noise), e.g. a
            Fréchet distance in a feature space to reference images (``eekernels.eval.fidelity.frechet_to``). It
            also decides whether a plan beats the fewer-steps baseline. It is called once on ``(noises, noises)``
            before any sampling, to check that it returns a finite number; its ``__name__`` is kept in
            ``report.objective``. RMS keeps a plan's samples close to full depth's one by one; a distribution
            measure can prefer a plan whose samples differ from full depth's but match the data as well or better.
    Returns: the schedule (``.calibration``: the :class:`CalibrationReport`).
    """
    _check(model, sampler, steps, cfg_scale, exit_policy, budget, noises, conditions, candidates, max_reuse,
           measure, num_timesteps)
    if forecast_order is not None and (isinstance(forecast_order, bool) or forecast_order not in (1, 2)):
        raise ValueError(f"forecast_order: expected None (try orders 1 and 2) or 1 or 2, got {forecast_order!r}")
    if forecast_target is not None and forecast_target not in FORECAST_TARGETS:
        raise ValueError(f"forecast_target: expected None (try each the model runs) or one of {FORECAST_TARGETS}, got "
                         f"{forecast_target!r}")
    if forecast_target == "blocks" and not getattr(model, "forecast_blocks", False):
        raise ValueError(f"forecast_target: 'blocks' expected a model whose blocks forecast their branch outputs (the "
                         f"native DiT), got {type(model).__name__}")
    if select not in SELECTS:
        raise ValueError(f"select: expected one of {SELECTS}, got {select!r}")
    from eekernels.samplers.sampling import _check_inputs

    _check_inputs(model, noises, conditions, sampler, steps, cfg_scale, exit_policy, None, None, cfg_channels,
                  negative)
    holdout = _check_holdout(holdout, noises, conditions)
    objective_name, distance = closed_loop_objective(objective)
    if objective is not None:
        if select != "closed-loop" and search is None and exit_policy != "forecast":
            raise ValueError("objective: ranks the plans a closed loop samples; expected select='closed-loop', a "
                             "search, or exit_policy='forecast' with it, got select='proxy' (the proxy's optimum, "
                             "nothing sampled)")
        distance(noises, noises)  # a finite number, or a named error before any sampling
    if search is not None or exit_policy == "forecast":  # a plan over steps, depth and policy: calibrate_joint
        return calibrate_joint(model, search=search, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                               exit_policy=exit_policy, budget=budget, noises=noises, conditions=conditions,
                               negative=negative, candidates=candidates, max_reuse=max_reuse, measure=measure,
                               holdout=holdout, time_reference=time_reference, cfg_channels=cfg_channels,
                               num_timesteps=num_timesteps, progress=progress, name=name, data_std=data_std,
                               depth_costs=depth_costs, select=select, objective=objective,
                               solver_options=solver_options,
                               orders=(1, 2) if forecast_order is None else (forecast_order,),
                               targets=(("residual", "blocks") if getattr(model, "forecast_blocks", False) else
                                        ("residual",)) if forecast_target is None else (forecast_target,))
    L, lo = model.num_blocks, int(getattr(model, "min_depth", 1) or 1)
    cands = sorted(set(candidates if candidates is not None else range(lo, L + 1)) | {L})
    how = ("prefix" if _uses_generic_loop(model) else "calls") if measure == "auto" else measure
    solver = solver_for(model, sampler, steps, **solver_options)  # sample()'s solver, by sample()'s own code
    n = solver.num_calls
    call_t = [float(t) for t in solver.timesteps]
    groups = _groups(call_t, num_timesteps)
    weights = solver_weights(solver, data_std)
    costs = _normalized_costs(model, cands, depth_costs, noises, conditions)  # None: block units
    unit = _unit_costs(cands, costs)
    units = int(math.floor(budget * unit[L] * n + 1e-9))

    start = time.perf_counter()
    cfg = cfg_scale != 1
    ref: list = [None]
    probe = _Probe(model, ref, cands, exit_policy, max_reuse, how, noises.shape[1], cfg_channels if cfg else None,
                   progress, n)
    run_probe(probe, ref, model, solver, noises, conditions, cfg_scale, negative, cfg_channels)

    if exit_policy == "drop":
        errors = probe.drop_err
        plan, proxy = choose_drop(errors, weights, groups, cands, units, costs)
        stored = errors
    else:
        errors = probe.cache_err
        plan, proxy = choose_cache(errors, weights, groups, cands, units, L, max_reuse, costs)
        stored = [[probe.cache_err.get((j, k)) for k in range(n)] for j in range(n)]
    sched = _table_schedule(plan, call_t, L, num_timesteps,
                            name or f"calibrated({exit_policy}, {sampler} {steps}, budget {budget:g})")
    rep = CalibrationReport(
        exit_policy=exit_policy, sampler=sampler, steps=steps, cfg_scale=float(cfg_scale), budget=float(budget),
        num_blocks=L, candidates=cands, call_timesteps=call_t, weights=weights, plan=plan, proxy=proxy,
        block_flop_fraction=sum(plan) / (L * n), measure=how, num_samples=int(noises.shape[0]),
        model_calls=probe.calls, block_evaluations=round(probe.blocks, 4), seconds=0.0,
        trajectory_seconds=round(probe.traj_seconds, 4), max_reuse=max_reuse if exit_policy == "cache" else None,
        solver_options=dict(solver_options), errors=stored, data_std=data_std,
        depth_costs=None if costs is None else [costs[d] for d in cands],
        cost_fraction=sum(unit[d] for d in plan) / (unit[L] * n), select=select,
        objective=objective_name if select == "closed-loop" else "rms")
    if select == "closed-loop":
        plans = _candidate_plans(errors, exit_policy, solver, groups, cands, units, L, max_reuse, costs, data_std)
        plans.setdefault(tuple(plan), "proxy optimum")
        rows = _closed_loop(model, plans, rep, num_timesteps, noises, conditions, negative,
                            cfg_channels if cfg else None, solver_options, distance)
        best = min(rows, key=lambda r: (r["real"], sum(r["plan"])))
        rep.plan, rep.proxy, rep.selection = best["plan"], best["proxy"], rows
        rep.block_flop_fraction = sum(best["plan"]) / (L * n)
        rep.cost_fraction = sum(unit[d] for d in best["plan"]) / (unit[L] * n)
        rep.model_calls += (len(rows) + 1) * n  # one sample() per candidate plus the full-depth reference
        rep.block_evaluations = round(rep.block_evaluations + n + sum(sum(r["plan"]) for r in rows) / L, 4)
        sched = _table_schedule(best["plan"], call_t, L, num_timesteps, sched.name)
    rep.seconds = round(time.perf_counter() - start, 4)
    if time_reference:
        from eekernels.samplers import sample

        t0 = time.perf_counter()
        sample(model, noises, conditions, sampler=sampler, steps=steps, cfg_scale=cfg_scale, graphs=False,
               cfg_channels=cfg_channels, negative=negative, **solver_options)
        rep.reference_seconds = round(time.perf_counter() - t0, 4)
    sched.calibration = rep
    if holdout is not None:
        hn, hy, hneg = holdout
        rep.validation = validate_proxy(model, sched, hn, hy, negative=hneg, num_plans=validate_plans)
    return sched


# ---- joint plans over steps, depth and policy (calibrate(..., search=...)) -----------------------------------

# Plans over solver steps, depth and exit policy together: ``eekernels.calibrate(..., budget=B, search=...)``.
#
# At a budget B of the block FLOPs of full depth at S steps, the simplest competitor of any per-call saving is the
# same model at full depth with fewer steps: the largest step count whose calls cost at most B of S's (14 steps for
# 0.7 of 20, with one call per step). The joint search puts every plan against it, on the calibration set:
#
# 1. **Step counts.** S, and (``search`` "steps") the counts between the baseline and S at which B is a per-call
#    depth fraction of about ``DEPTH_FRACTIONS`` (fewer steps, fewer blocks skipped per call).
# 2. **Depths per step count and policy.** For each count s, the ordinary calibration (``calibrate``: measure, then
#    the DP) under the same absolute block budget (B * calls(S) / calls(s) of full depth at s): with "drop"
#    measurements for the drop plan and "cache" measurements (the DP that keeps full calls to record) for the reuse
#    plans. A "forecast" plan takes the cache plan's depths, every truncated call forecasting; and, wherever
#    "forecast" is planned, up to ``REGULAR_PLANS`` regular plans (``regular_forecast_plans``, TaylorSeer's shape:
#    full depth at the first w calls and every k-th after, one depth between; spending at most the budget and at
#    least 0.06 under it), which the cache DP does not produce and on which a forecast does best (benchmarks/knee.py's
#    forecast rows). Only the closed loop judges them, at up to 12 more ``sample()`` runs per step count (the
#    proxy, for the report, is measured for the chosen one only: one more trajectory).
#    With ``search`` "uncond" (CFG only), also the plans at full depth that run the conditional half alone at some
#    calls, the unconditional output forecast from the guidance difference (``uncond_plans``; ``ExitSchedule.uncond``),
#    at each order of ``forecast_order``: a call of one half costs half a call.
# 3. **Policies per call** (``search`` "policy", or two or more policy names): on the cache plan's depths, one more
#    full-depth trajectory measures, at each truncated call, the error of each policy (drop, cache, forecast, on a
#    ``ForecastCache`` recorded at the plan's full calls, exactly as ``sample()`` runs it); each call (each group of
#    calls sharing a timestep bin) takes the policy of least weighted error: the "mixed" plan.
# 4. **Closed loop.** Each alternative and the baseline are sampled on the set (``sample()``, their own steps, depths
#    and policies); the one whose final samples are nearest (RMS) to full depth at S wins. A plan that does not beat
#    the baseline is reported as such and the baseline (full depth at its step count) is returned.
#
# The returned schedule fixes ``steps``, ``sampler`` and per-bin ``policies`` (``ExitSchedule``), which its file
# keeps and ``sample()`` follows; its report (``schedule.calibration``) is the chosen step count's calibration with
# ``policies`` (per call) and ``joint``: the budget, the reference and baseline step counts, whether the plan beat the
# baseline, the spent fraction of the budget's reference, and every alternative's plan and measured error.

#: how many regular forecast plans (``regular_forecast_plans``) the joint search samples per step count
REGULAR_PLANS = 12
#: the per-call depth fractions whose step counts the "steps" search tries (besides S and the baseline)
DEPTH_FRACTIONS = (0.9, 0.75, 0.6)
SEARCH_NAMES = ("steps", "policy") + POLICIES + ("uncond",)


def parse_search(search, exit_policy: str) -> tuple[bool, tuple[str, ...]]:
    """``(search steps?, the policies to plan with)`` from ``search`` ("steps,policy", a list of names, or None) and
    ``exit_policy`` (always among the policies). Named ValueError for anything else."""
    names = search_names(search)
    if exit_policy not in POLICIES:
        raise ValueError(f"exit_policy: expected one of {POLICIES}, got {exit_policy!r}")
    policies = set(POLICIES) if "policy" in names else {v for v in names if v in POLICIES}
    policies.add(exit_policy)
    return "steps" in names, tuple(p for p in POLICIES if p in policies)


def search_names(search) -> list[str]:
    """The names of ``search`` (a comma-separated string, a list of names, or None), each one of
    ``SEARCH_NAMES``; named ValueError otherwise."""
    if search is None:
        names = []
    elif isinstance(search, str):
        names = [v.strip() for v in search.split(",") if v.strip()]
    elif isinstance(search, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in search):
        names = list(search)
    else:
        raise ValueError(f"search: expected None, a comma-separated string or a list of names from {SEARCH_NAMES}, "
                         f"got {search!r}")
    bad = [v for v in names if v not in SEARCH_NAMES]
    if bad:
        raise ValueError(f"search: expected names from {SEARCH_NAMES} ('policy': all of {POLICIES}), got {bad[0]!r}")
    return names


def uncond_plans(calls: int, budget: float, *, under: float = 0.06, groups=None) -> list[tuple[str, ...]]:
    """The plans that forecast CFG's unconditional branch (``ExitSchedule.uncond``) at full depth: both halves at the
    first w calls (at least one: after one, the guidance difference is reused as it is), then the conditional half
    alone at the last calls (the tail) or at every other call (alternating); a call running one half costs half a
    call. Those spending between ``budget - under`` and ``budget`` of ``calls`` full calls, each as one "run" or
    "forecast" per call; ``groups``: calls that must share a mode (one timestep bin)."""
    shapes = set()
    for w in range(1, calls):
        shapes.add(tuple("run" if i < w else "forecast" for i in range(calls)))
        shapes.add(tuple("run" if i < w or (i - w) % 2 else "forecast" for i in range(calls)))

    def spent(u):
        return sum(0.5 if m == "forecast" else 1.0 for m in u) / calls

    return sorted((u for u in shapes if budget - under - 1e-9 <= spent(u) <= budget + 1e-9
                   and all(len({u[k] for k in g}) == 1 for g in (groups or []))), key=lambda u: (-spent(u), u))


def step_counts(calls, steps: int, budget: float, search_steps: bool) -> tuple[int | None, list[int]]:
    """``(baseline, counts)``: the most steps whose full-depth calls cost at most ``budget`` of ``steps``' (None if
    not even one step fits), and the step counts to plan depths at (``steps``, and with ``search_steps`` the counts
    between the baseline and ``steps`` where the budget is about each ``DEPTH_FRACTIONS`` of full depth per call).
    ``calls(s)``: model calls of the solver at s steps."""
    total = calls(steps)
    fits = [s for s in range(1, steps + 1) if calls(s) <= budget * total + 1e-9]
    baseline = max(fits) if fits else None
    counts = {steps} if budget < 1 else set()
    if search_steps:
        for f in DEPTH_FRACTIONS:
            s = max((s for s in range(1, steps + 1) if calls(s) <= budget * total / f + 1e-9), default=None)
            if s is not None and (baseline is None or s > baseline) and s < steps:
                counts.add(s)
    return baseline, sorted(counts, reverse=True)


def regular_forecast_plans(L: int, calls: int, budget: float, max_candidates: int = 12, *, under: float = 0.06,
                           over: float = 0.0, depths=None, costs=None, groups=None) -> list[tuple[int, ...]]:
    """The "regular" plans a forecast runs well on (TaylorSeer's shape): full depth ``L`` at the first w (1 to 4)
    calls and every k-th call after, one depth d below ``L`` at every other call; at least two full calls (a
    forecast extrapolates from two; after one it reuses, as ``cache``); spending between ``budget - under`` and
    ``budget + over`` of full depth over ``calls`` calls; at most ``max_candidates``, the depths taking turns (each
    depth's plans spending most first; ties: the plans in sorted order). w = 1, k = 2 is diffusers' TaylorSeer at
    interval 2 (full every other call).

    ``depths``: the depths d to use (default 1 to L - 1); ``costs``: {depth: cost} of a call (default the depth
    itself, block units), which the spent fraction ``sum(costs[d]) / (costs[L] * calls)`` is counted in;
    ``groups``: lists of calls that must share one depth (``calibrate``'s calls in one timestep bin), plans that
    split a group are left out. ``calibrate_joint`` samples these under ``exit_policy="forecast"`` with
    ``over=0`` (never above the budget); ``benchmarks/knee.py`` with the peer's tolerance ``over=0.02``."""
    cost = (lambda d: d) if costs is None else costs.__getitem__
    ds = [d for d in (range(1, L) if depths is None else sorted(set(depths))) if d < L]
    plans = set()
    for w in range(1, min(5, calls)):
        for k in range(2, calls + 1):
            full = set(range(w)) | set(range(w - 1 + k, calls, k))
            for d in ds:
                plans.add(tuple(L if i in full else d for i in range(calls)))
    total = cost(L) * calls

    def spent(p):
        return sum(cost(v) for v in p) / total

    cands = [p for p in sorted(plans)
             if sum(v == L for v in p) >= 2 and budget - under - 1e-9 <= spent(p) <= budget + over + 1e-9
             and all(len({p[k] for k in g}) == 1 for g in (groups or []))]
    # Variety first: the depths take turns (each depth's plans spending most first, the depth with the plan spending
    # most first), so the plans of one depth that spend a little more cannot crowd out every plan of another (at
    # 0.35 of 20 calls, depth 2 plans at 0.362 left no room for depth 0's at 0.35).
    queues: dict = {}
    for p in sorted(cands, key=lambda p: -spent(p)):
        queues.setdefault(min(p), []).append(p)
    out = []
    for rank in range(max((len(q) for q in queues.values()), default=0)):
        out += [q[rank] for q in queues.values() if rank < len(q)]
    return out[:max_candidates]


def _regular_shape(plan, L: int) -> str:
    """How a regular plan reads: "full at the first w calls and every k-th after, depth d"."""
    full = [i for i, v in enumerate(plan) if v == L]
    w = next((i for i, f in enumerate(full) if f != i), len(full))
    after = f", then one in every {full[w] - full[w - 1]}" if len(full) > w else ""
    between = "no block between" if min(plan) == 0 else f"depth {min(plan)} between"
    return f"full at the first {w} call{'s' if w > 1 else ''}{after}, {between}"


class _PolicyProbe:
    """Stands in for the model in a full-depth trajectory: at the plan's full calls it records (a
    ``ForecastCache``, as ``sample()`` runs a mixed plan); at its truncated calls it measures each policy's error
    (RMS of the guided output against full depth's) at the planned depth."""

    def __init__(self, model, session_ref, plan, policies, host_t, cfg_channels, order=1, target="residual"):
        self.model, self.ref, self.plan, self.policies, self.host_t = model, session_ref, plan, policies, host_t
        self.L, self.cfg_channels = model.num_blocks, cfg_channels
        self.cache = ForecastCache(sorted({d for d in plan if d < self.L}) or [self.L], order=order, target=target)
        self.cache.restart()
        self.errors: list[dict] = []
        self.calls = 0
        self.blocks = 0.0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _eps(self, out):
        s = self.ref[0]
        return guide(out, s.state.x.shape[1], s.cfg, s.state.x.dtype, self.cfg_channels)[0]

    def __call__(self, x, t, y, **kw):
        k = len(self.errors)
        d, tk = self.plan[k], self.host_t[k]
        row = {}
        if d >= self.L:
            self.cache.begin_call(tk, True)
            full = self.model(x, t, y, exit_cache=self.cache)
        else:
            full = self.model(x, t, y)
            e_full = self._eps(full)
            for pol in self.policies:
                self.cache.begin_call(tk, False, pol)
                out = self.model(x, t, y, depth=d, exit_cache=self.cache)
                row[pol] = _Probe._rms(self._eps(out), e_full)
                self.calls += 1
                self.blocks += d / self.L
        self.calls += 1
        self.blocks += 1.0
        self.errors.append(row)
        return full


def _plan_schedule(plan, policies, rep: CalibrationReport, num_timesteps: int, steps: int, sampler: str,
                   name: str, forecast_order: int | None = None, forecast_target: str | None = None,
                   uncond=None) -> ExitSchedule:
    """The t-indexed schedule of a per-call plan, with its per-bin policies and ``uncond`` modes (the same
    nearest-call rule as the depths: ``calibration._table_schedule``), steps and sampler."""
    L = rep.num_blocks

    def per_bin(values):
        return nearest_call_table(values, rep.call_timesteps, num_timesteps)

    depths = _table_schedule(plan, rep.call_timesteps, L, num_timesteps, name)
    return ExitSchedule(depths.table, L, num_timesteps, name=name, steps=steps, sampler=sampler,
                        policies=per_bin(policies), forecast_order=forecast_order,
                        forecast_target=forecast_target,
                        uncond=None if uncond is None else per_bin(uncond))


def _spent(plan, uncond, costs: dict | None = None) -> float:
    """What a per-call plan spends, in ``costs`` units (None: the depth itself, block units): a call that runs CFG's
    conditional half alone costs half."""
    return sum((d if costs is None else costs[d]) * (0.5 if uncond is not None and u != "run" else 1.0)
               for d, u in zip(plan, uncond or plan))


def _forecast_suffix(order, target) -> str:
    """How a forecasting alternative's name says its order and target (order 1 and "residual", the defaults, say
    nothing)."""
    return ("" if order in (None, 1) else f", order {order}") + ("" if target in (None, "residual") else f", {target}")


def calibrate_joint(model, *, search, sampler, steps, cfg_scale, exit_policy, budget, noises, conditions, negative,
                    candidates, max_reuse, measure, holdout, time_reference, cfg_channels, num_timesteps, progress,
                    name, data_std, depth_costs, select, solver_options, orders=(1,),
                    targets=("residual",), objective=None) -> ExitSchedule:
    """The joint search (module docstring); ``calibrate`` calls it with its own, already checked arguments."""
    from eekernels.samplers import sample

    search_steps, policies = parse_search(search, exit_policy)
    search_uncond = "uncond" in search_names(search)
    if search_uncond and cfg_scale == 1:
        raise ValueError("search: 'uncond' plans forecast classifier-free guidance's unconditional branch; expected "
                         "cfg_scale != 1, got 1")
    if holdout is not None:
        raise ValueError("holdout: the joint search validates by sampling every alternative on the calibration set; "
                         "expected no holdout with search or exit_policy='forecast', got one")
    start = time.perf_counter()
    L = model.num_blocks
    solvers: dict = {}

    def solver(s):
        if s not in solvers:
            solvers[s] = solver_for(model, sampler, s, **solver_options)
        return solvers[s]

    n_ref = solver(steps).num_calls
    baseline, counts = step_counts(lambda s: solver(s).num_calls, steps, budget, search_steps)
    cfg = cfg_scale != 1
    kw = dict(sampler=sampler, cfg_scale=cfg_scale, negative=negative, graphs=False,
              cfg_channels=cfg_channels if cfg else None, **solver_options)
    def measure_policies(plan, pols, rep, s, order=1, target="residual"):  # each policy's error at each truncated call
        ref: list = [None]
        probe = _PolicyProbe(model, ref, plan, pols, [float(t) for t in rep.call_timesteps],
                             cfg_channels if cfg else None, order, target)
        run_probe(probe, ref, model, solver(s), noises, conditions, cfg_scale, negative, cfg_channels)
        return probe

    measured = (["drop"] if "drop" in policies else []) + (["cache"] if {"cache", "forecast"} & set(policies) else [])
    # Regular forecast plans may also skip every block between full calls (depth 0, TaylorSeer's skipped steps) on
    # a model that allows it, in block units (depth 0 costs no block; FLOP costs of it are not measured), unless
    # the caller restricted the depths.
    zero = [0] if candidates is None and depth_costs is None and min_depth_of(model, reuse=True) == 0 else []
    forecasts = [(order, target) for target in targets for order in orders]  # how forecasting alternatives run
    subs: dict = {}   # (steps, measured policy) -> calibrated schedule
    alts: list[dict] = []
    skipped: list[str] = []
    calls_used, blocks_used = 0, 0.0
    for s in counts:
        n = solver(s).num_calls
        for mp in measured:
            only_regular = False
            args = dict(sampler=sampler, steps=s, cfg_scale=cfg_scale, exit_policy=mp, noises=noises,
                        conditions=conditions, negative=negative, candidates=candidates, max_reuse=max_reuse,
                        measure=measure, cfg_channels=cfg_channels, num_timesteps=num_timesteps, progress=progress,
                        data_std=data_std, depth_costs=depth_costs, select=select,
                        objective=objective if select == "closed-loop" else None, **solver_options)
            try:
                sub = calibrate(model, budget=min(1.0, budget * n_ref / n), **args)
            except ValueError as e:  # no plan of this policy fits at s steps (e.g. cache's first full call)
                skipped.append(f"{s} steps, {mp}: {e}")
                if not (mp == "cache" and zero and "forecast" in policies):
                    continue
                # No plan running a block per call fits, TaylorSeer's shape (depth 0 between full calls) may: its
                # calls' timesteps, weights and depth costs from this step count's calibration at full budget.
                sub, only_regular = calibrate(model, budget=1.0, **args), True
            subs[(s, mp)] = sub
            rep = sub.calibration
            calls_used += rep.model_calls
            blocks_used += rep.block_evaluations
            if mp == "drop":
                alts.append(dict(steps=s, policy="drop", plan=list(rep.plan), policies=["drop"] * n, proxy=rep.proxy,
                                 source=(s, mp), origin=f"{select} plan, drop measurements"))
                continue
            uniform = [p for p in ("cache", "forecast") if p in policies and not only_regular]
            probe_errors = None
            if ("forecast" in policies or len(policies) > 1) and min(rep.plan) < L and not only_regular:
                probe = measure_policies(rep.plan, policies, rep, s)
                probe_errors = probe.errors
                calls_used += probe.calls
                blocks_used += probe.blocks
            for pol in uniform:
                for order, target in (forecasts if pol == "forecast" else [(None, None)]):
                    # the probe measured the residual at order 1; another's proxy is measured if it is chosen
                    proxy = (rep.proxy if pol == "cache" else float("nan") if probe_errors is None
                             or (order, target) != (1, "residual")
                             else sum(w * e.get(pol, 0.0) for w, e in zip(rep.weights, probe_errors)))
                    alts.append(dict(steps=s, policy=pol, plan=list(rep.plan), policies=[pol] * n, proxy=proxy,
                                     source=(s, mp), origin=f"{select} plan, cache measurements",
                                     name=f"{pol} @ {s} steps{_forecast_suffix(order, target)}", forecast_order=order,
                                     forecast_target=target))
            if "forecast" in policies:  # TaylorSeer's shape, judged on sampled images only (no proxy measured)
                for p in regular_forecast_plans(L, n, min(1.0, budget * n_ref / n), REGULAR_PLANS,
                                                depths=zero + list(rep.candidates), costs={0: 0, **rep.costs()},
                                                groups=_groups(rep.call_timesteps, num_timesteps)):
                    for order, target in forecasts:
                        alts.append(dict(steps=s, policy="forecast", plan=list(p), policies=["forecast"] * n,
                                         proxy=float("nan"), source=(s, mp), name=f"forecast @ {s} steps, regular "
                                         f"plan ({_regular_shape(p, L)}){_forecast_suffix(order, target)}",
                                         origin="regular plan: full at the first w calls and every k-th",
                                         forecast_order=order, forecast_target=target))
            if search_uncond and mp == measured[0]:  # full depth, the unconditional branch forecast at some calls
                # within the same 0.06 of the reference's calls under the budget as the regular plans; proxy 0: the
                # depth proxy of a full-depth plan (the guidance forecast has no proxy: the closed loop judges it)
                for u in uncond_plans(n, min(1.0, budget * n_ref / n), under=0.06 * n_ref / n,
                                      groups=_groups(rep.call_timesteps, num_timesteps)):
                    half = [i for i, m in enumerate(u) if m == "forecast"]
                    kept = u[:half[-1]].count("run")  # calls that ran both halves before its last forecast
                    for order in [o for o in orders if o <= max(1, kept - 1)] or [min(orders)]:  # (order 2 from two
                        # calls is order 1: sampled once)
                        alts.append(dict(steps=s, policy="uncond", plan=[L] * n, policies=["drop"] * n,
                                         uncond=list(u), proxy=0.0, source=(s, mp), forecast_order=order,
                                         name=f"uncond forecast @ {s} steps, calls {half}"
                                              f"{_forecast_suffix(order, None)}",
                                         origin="full depth, the conditional half alone at some calls"))
            if probe_errors is not None and len(policies) > 1:
                per_call = ["cache"] * n
                for g in _groups(rep.call_timesteps, num_timesteps):
                    if not probe_errors[g[0]]:
                        continue  # full depth: records, no policy applies
                    scores = {p: sum(rep.weights[k] * probe_errors[k][p] for k in g) for p in policies}
                    best = min(policies, key=lambda p: (scores[p], policies.index(p)))
                    for k in g:
                        per_call[k] = best
                has_forecast = "forecast" in {p for p, d in zip(per_call, rep.plan) if d < L}
                # its forecasting calls run as the probe measured them, the residual at order 1 (left out if that is
                # not among the orders and targets allowed)
                if len({p for p, d in zip(per_call, rep.plan) if d < L}) > 1 and (
                        (1, "residual") in forecasts or not has_forecast):
                    proxy = sum(w * e[p] for w, e, p in zip(rep.weights, probe_errors, per_call) if e)
                    alts.append(dict(steps=s, policy="mixed", plan=list(rep.plan), policies=per_call, proxy=proxy,
                                     source=(s, mp), origin="per-call policy of least measured error",
                                     forecast_order=1 if has_forecast else None))
    # ---- the closed loop: every alternative and the baseline, sampled on the set, against full depth at `steps`
    reference = sample(model, noises, conditions, steps=steps, schedule=None, **kw).double()
    calls_used += n_ref
    blocks_used += n_ref

    objective_name, objective_distance = closed_loop_objective(objective)

    def distance(x):
        return objective_distance(x.double(), reference)

    any_rep = next(iter(subs.values())).calibration if subs else None
    costs = {0: 0, **(any_rep.costs() if any_rep is not None else {L: 1})}
    rows = []
    for a in alts:
        rep = subs[a["source"]].calibration
        sched = _plan_schedule(a["plan"], a["policies"], rep, num_timesteps, a["steps"], sampler, "joint candidate",
                               a.get("forecast_order"), a.get("forecast_target"), a.get("uncond"))
        x = sample(model, noises, conditions, schedule=sched, **kw)
        calls_used += len(a["plan"])
        blocks_used += _spent(a["plan"], a.get("uncond")) / L
        rows.append(dict(name=a.get("name", f"{a['policy']} @ {a['steps']} steps"), steps=a["steps"],
                         policy=a["policy"], plan=a["plan"], policies=a["policies"],
                         spent_fraction=_spent(a["plan"], a.get("uncond"), costs) / (costs[L] * n_ref),
                         real=distance(x), **{"from": a["origin"]},
                         **{k: a[k] for k in ("forecast_order", "forecast_target", "uncond") if a.get(k) is not None}))
        a["row"] = rows[-1]
    base_row = None
    if baseline is not None:
        x = sample(model, noises, conditions, steps=baseline, schedule=None, **kw)
        n_b = solver(baseline).num_calls
        calls_used += n_b
        blocks_used += n_b
        base_row = dict(name=f"full depth @ {baseline} steps (fewer-steps baseline)", steps=baseline, policy="full",
                        plan=[L] * n_b, policies=["drop"] * n_b, spent_fraction=n_b / n_ref, real=distance(x),
                        **{"from": "fewer-steps baseline"})
        rows.append(base_row)
    if not rows:
        raise ValueError(f"budget: no plan fits {budget:g} of the block FLOPs at {steps} steps ({'; '.join(skipped)})")
    best = min(alts, key=lambda a: (a["row"]["real"], a["row"]["spent_fraction"])) if alts else None
    beats = None if base_row is None or best is None else best["row"]["real"] < base_row["real"]
    use_plan = best is not None and beats is not False
    joint = dict(budget=float(budget), reference_steps=steps, baseline_steps=baseline, beats_baseline=beats,
                 chosen=(best if use_plan else {"row": base_row})["row"]["name"], spent_fraction=0.0,
                 search=(["steps"] if search_steps else []) + list(policies) + (["uncond"] if search_uncond else []),
                 alternatives=rows)
    label = name or f"calibrated(joint, {sampler} {steps}, budget {budget:g})"
    if use_plan:
        sub = subs[best["source"]]
        if math.isnan(best["proxy"]):  # a regular plan, chosen on sampled images: its proxy, for the report
            probe = measure_policies(best["plan"], ("forecast",), sub.calibration, best["steps"],
                                     best.get("forecast_order") or 1, best.get("forecast_target") or "residual")
            best["proxy"] = sum(w * e.get("forecast", 0.0) for w, e in zip(sub.calibration.weights, probe.errors))
            calls_used += probe.calls
            blocks_used += probe.blocks
        rep = dataclasses.replace(sub.calibration, plan=best["plan"], policies=best["policies"], proxy=best["proxy"],
                                  block_flop_fraction=_spent(best["plan"], best.get("uncond"))
                                  / (L * len(best["plan"])))
        if 0 in best["plan"] and 0 not in rep.candidates:  # a depth-0 regular plan: its per-depth error table
            rep.candidates = [0, *rep.candidates]          # (measured at depths >= 1) would not line up: dropped
            rep.errors = None
        if rep.cost_fraction is not None:
            rep.cost_fraction = _spent(best["plan"], best.get("uncond"), costs) / (costs[L] * len(best["plan"]))
        sched = _plan_schedule(best["plan"], best["policies"], rep, num_timesteps, best["steps"], sampler, label,
                               best.get("forecast_order"), best.get("forecast_target"), best.get("uncond"))
        joint["spent_fraction"] = best["row"]["spent_fraction"]
    else:
        sb = solver(baseline)
        n_b = sb.num_calls
        cands = any_rep.candidates if any_rep is not None else [L]
        rep = CalibrationReport(
            exit_policy="drop", sampler=sampler, steps=baseline, cfg_scale=float(cfg_scale), budget=1.0,
            num_blocks=L, candidates=cands, call_timesteps=[float(t) for t in sb.timesteps],
            weights=solver_weights(sb, data_std), plan=[L] * n_b, proxy=0.0, block_flop_fraction=1.0,
            measure=any_rep.measure if any_rep is not None else "calls", num_samples=int(noises.shape[0]),
            model_calls=0, block_evaluations=0.0, seconds=0.0, trajectory_seconds=0.0, data_std=data_std,
            solver_options=dict(solver_options), depth_costs=any_rep.depth_costs if any_rep is not None else None,
            cost_fraction=None if any_rep is None or any_rep.depth_costs is None else 1.0, select=select,
            policies=["drop"] * n_b)
        sched = ExitSchedule([L], L, num_timesteps, name=label, steps=baseline, sampler=sampler, policies=["drop"])
        joint["spent_fraction"] = base_row["spent_fraction"]
    rep.model_calls, rep.block_evaluations = calls_used, round(blocks_used, 4)
    rep.joint, rep.validation, rep.objective = joint, None, objective_name
    rep.seconds = round(time.perf_counter() - start, 4)
    if time_reference:
        t0 = time.perf_counter()
        sample(model, noises, conditions, steps=steps, schedule=None, **kw)
        rep.reference_seconds = round(time.perf_counter() - t0, 4)
    sched.calibration = rep
    return sched


def describe_joint(rep: CalibrationReport) -> list[str]:
    """Lines saying what a joint search chose and what each alternative measured (the CLI prints them)."""
    j = rep.joint
    if j is None:
        return []
    if j["beats_baseline"] is not None:
        verdict = ("beats the fewer-steps baseline" if j["beats_baseline"] else
                   "no plan beat the fewer-steps baseline: it is the plan returned")
    else:
        verdict = ("not even one step at full depth fits the budget: no baseline" if j["baseline_steps"] is None
                   else "full depth fits the budget: no plan to compare")
    out = [f"  joint search ({', '.join(j['search'])}) at {j['budget']:g} of full depth at {j['reference_steps']} "
           f"steps: chose {j['chosen']} ({verdict}); "
           + (f"final-sample RMS to full depth at {j['reference_steps']} steps:" if rep.objective == "rms" else
              f"objective {rep.objective} (lower is better):")]
    for r in sorted(j["alternatives"], key=lambda r: r["real"]):
        mark = "*" if r["name"] == j["chosen"] else " "
        out.append(f"   {mark} {r['name']:<48} spends {r['spent_fraction']:.3f}  "
                   f"{'RMS' if rep.objective == 'rms' else rep.objective} {r['real']:.4g}")
    return out


__all__ = ["calibrate", "replan", "depth_flops", "CalibrationReport", "solver_weights", "choose_drop", "choose_cache",
           "plan_proxy", "validate_proxy", "prefix_forward", "prefix_output", "calibrate_joint", "parse_search",
           "search_names", "uncond_plans",
           "step_counts", "describe_joint", "regular_forecast_plans", "DEPTH_FRACTIONS", "SEARCH_NAMES",
           "REGULAR_PLANS"]
