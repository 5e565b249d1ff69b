"""Plans over solver steps, depth and exit policy together: ``eekernels.calibrate(..., budget=B, search=...)``.

At a budget B of the block FLOPs of full depth at S steps, the simplest competitor of any per-call saving is the
same model at full depth with fewer steps: the largest step count whose calls cost at most B of S's (14 steps for
0.7 of 20, with one call per step). The joint search puts every plan against it, on the calibration set:

1. **Step counts.** S, and (``search`` "steps") the counts between the baseline and S at which B is a per-call
   depth fraction of about ``DEPTH_FRACTIONS`` (fewer steps, fewer blocks skipped per call).
2. **Depths per step count and policy.** For each count s, the ordinary calibration (``calibrate``: measure, then
   the DP) under the same absolute block budget (B * calls(S) / calls(s) of full depth at s): with "drop"
   measurements for the drop plan and "cache" measurements (the DP that keeps full calls to record) for the reuse
   plans. A "forecast" plan takes the cache plan's depths, every truncated call forecasting.
3. **Policies per call** (``search`` "policy", or two or more policy names): on the cache plan's depths, one more
   full-depth trajectory measures, at each truncated call, the error of each policy (drop, cache, forecast, on a
   ``ForecastCache`` recorded at the plan's full calls, exactly as ``sample()`` runs it); each call (each group of
   calls sharing a timestep bin) takes the policy of least weighted error: the "mixed" plan.
4. **Closed loop.** Each alternative and the baseline are sampled on the set (``sample()``, their own steps, depths
   and policies); the one whose final samples are nearest (RMS) to full depth at S wins. A plan that does not beat
   the baseline is reported as such and the baseline (full depth at its step count) is returned.

The returned schedule fixes ``steps``, ``sampler`` and per-bin ``policies`` (``ExitSchedule``), which its file
keeps and ``sample()`` follows; its report (``schedule.calibration``) is the chosen step count's calibration with
``policies`` (per call) and ``joint``: the budget, the reference and baseline step counts, whether the plan beat the
baseline, the spent fraction of the budget's reference, and every alternative's plan and measured error.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from eekernels.models.cache import ForecastCache
from eekernels.schedules import POLICIES, CalibrationReport, ExitSchedule

#: the per-call depth fractions whose step counts the "steps" search tries (besides S and the baseline)
DEPTH_FRACTIONS = (0.9, 0.75, 0.6)
SEARCH_NAMES = ("steps", "policy") + POLICIES


def parse_search(search, exit_policy: str) -> tuple[bool, tuple[str, ...]]:
    """``(search steps?, the policies to plan with)`` from ``search`` ("steps,policy", a list of names, or None) and
    ``exit_policy`` (always among the policies). Named ValueError for anything else."""
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
    if exit_policy not in POLICIES:
        raise ValueError(f"exit_policy: expected one of {POLICIES}, got {exit_policy!r}")
    policies = set(POLICIES) if "policy" in names else {v for v in names if v in POLICIES}
    policies.add(exit_policy)
    return "steps" in names, tuple(p for p in POLICIES if p in policies)


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


class _PolicyProbe:
    """Stands in for the model in a full-depth trajectory: at the plan's full calls it records (a
    ``ForecastCache``, as ``sample()`` runs a mixed plan); at its truncated calls it measures each policy's error
    (RMS of the guided output against full depth's) at the planned depth."""

    def __init__(self, model, session_ref, plan, policies, host_t, cfg_channels):
        self.model, self.ref, self.plan, self.policies, self.host_t = model, session_ref, plan, policies, host_t
        self.L, self.cfg_channels = model.num_blocks, cfg_channels
        self.cache = ForecastCache(sorted({d for d in plan if d < self.L}) or [self.L], order=1)
        self.cache.restart()
        self.errors: list[dict] = []
        self.calls = 0
        self.blocks = 0.0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _eps(self, out):
        from eekernels.samplers import guide

        s = self.ref[0]
        return guide(out, s.state.x.shape[1], s.cfg, s.state.x.dtype, self.cfg_channels)[0]

    def __call__(self, x, t, y, **kw):
        from eekernels.calibration import _Probe

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
                   name: str) -> ExitSchedule:
    """The t-indexed schedule of a per-call plan, with its per-bin policies (the same nearest-call rule as the
    depths: ``calibration._table_schedule``), steps and sampler."""
    from eekernels.calibration import _table_schedule

    L = rep.num_blocks
    depths = _table_schedule(plan, rep.call_timesteps, L, num_timesteps, name)
    codes = _table_schedule([POLICIES.index(p) + 1 for p in policies], rep.call_timesteps, len(POLICIES),
                            num_timesteps, name)
    return ExitSchedule(depths.table, L, num_timesteps, name=name, steps=steps, sampler=sampler,
                        policies=[POLICIES[c - 1] for c in codes.table])


def calibrate_joint(model, *, search, sampler, steps, cfg_scale, exit_policy, budget, noises, conditions, negative,
                    candidates, max_reuse, measure, holdout, time_reference, cfg_channels, num_timesteps, progress,
                    name, data_std, depth_costs, select, solver_options) -> ExitSchedule:
    """The joint search (module docstring); ``calibrate`` calls it with its own, already checked arguments."""
    from eekernels.calibration import _groups, calibrate, run_probe, solver_weights
    from eekernels.samplers import sample
    from eekernels.samplers.sampling import solver_for

    search_steps, policies = parse_search(search, exit_policy)
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
    measured = (["drop"] if "drop" in policies else []) + (["cache"] if {"cache", "forecast"} & set(policies) else [])
    subs: dict = {}   # (steps, measured policy) -> calibrated schedule
    alts: list[dict] = []
    skipped: list[str] = []
    calls_used, blocks_used = 0, 0.0
    for s in counts:
        n = solver(s).num_calls
        for mp in measured:
            try:
                sub = calibrate(model, sampler=sampler, steps=s, cfg_scale=cfg_scale, exit_policy=mp,
                                budget=min(1.0, budget * n_ref / n), noises=noises, conditions=conditions,
                                negative=negative, candidates=candidates, max_reuse=max_reuse, measure=measure,
                                cfg_channels=cfg_channels, num_timesteps=num_timesteps, progress=progress,
                                data_std=data_std, depth_costs=depth_costs, select=select, **solver_options)
            except ValueError as e:  # no plan of this policy fits at s steps (e.g. cache's first full call)
                skipped.append(f"{s} steps, {mp}: {e}")
                continue
            subs[(s, mp)] = sub
            rep = sub.calibration
            calls_used += rep.model_calls
            blocks_used += rep.block_evaluations
            if mp == "drop":
                alts.append(dict(steps=s, policy="drop", plan=list(rep.plan), policies=["drop"] * n, proxy=rep.proxy,
                                 source=(s, mp), origin=f"{select} plan, drop measurements"))
                continue
            uniform = [p for p in ("cache", "forecast") if p in policies]
            probe_errors = None
            if ("forecast" in policies or len(policies) > 1) and min(rep.plan) < L:
                ref: list = [None]
                probe = _PolicyProbe(model, ref, rep.plan, policies, [float(t) for t in rep.call_timesteps],
                                     cfg_channels if cfg else None)
                run_probe(probe, ref, model, solver(s), noises, conditions, cfg_scale, negative, cfg_channels)
                probe_errors = probe.errors
                calls_used += probe.calls
                blocks_used += probe.blocks
            for pol in uniform:
                proxy = rep.proxy if pol == "cache" or probe_errors is None else sum(
                    w * e.get(pol, 0.0) for w, e in zip(rep.weights, probe_errors))
                alts.append(dict(steps=s, policy=pol, plan=list(rep.plan), policies=[pol] * n, proxy=proxy,
                                 source=(s, mp), origin=f"{select} plan, cache measurements"))
            if probe_errors is not None and len(policies) > 1:
                per_call = ["cache"] * n
                for g in _groups(rep.call_timesteps, num_timesteps):
                    if not probe_errors[g[0]]:
                        continue  # full depth: records, no policy applies
                    scores = {p: sum(rep.weights[k] * probe_errors[k][p] for k in g) for p in policies}
                    best = min(policies, key=lambda p: (scores[p], policies.index(p)))
                    for k in g:
                        per_call[k] = best
                if len({p for p, d in zip(per_call, rep.plan) if d < L}) > 1:
                    proxy = sum(w * e[p] for w, e, p in zip(rep.weights, probe_errors, per_call) if e)
                    alts.append(dict(steps=s, policy="mixed", plan=list(rep.plan), policies=per_call, proxy=proxy,
                                     source=(s, mp), origin="per-call policy of least measured error"))
    # ---- the closed loop: every alternative and the baseline, sampled on the set, against full depth at `steps`
    reference = sample(model, noises, conditions, steps=steps, schedule=None, **kw).double()
    calls_used += n_ref
    blocks_used += n_ref

    def distance(x):
        return float((x.double() - reference).square().mean().sqrt())

    any_rep = next(iter(subs.values())).calibration if subs else None
    costs = any_rep.costs() if any_rep is not None else {L: 1}
    rows = []
    for a in alts:
        rep = subs[a["source"]].calibration
        sched = _plan_schedule(a["plan"], a["policies"], rep, num_timesteps, a["steps"], sampler, "joint candidate")
        x = sample(model, noises, conditions, schedule=sched, **kw)
        calls_used += len(a["plan"])
        blocks_used += sum(a["plan"]) / L
        rows.append(dict(name=f"{a['policy']} @ {a['steps']} steps", steps=a["steps"], policy=a["policy"],
                         plan=a["plan"], policies=a["policies"],
                         spent_fraction=sum(costs[d] for d in a["plan"]) / (costs[L] * n_ref), real=distance(x),
                         **{"from": a["origin"]}))
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
                 search=(["steps"] if search_steps else []) + list(policies),
                 alternatives=rows)
    label = name or f"calibrated(joint, {sampler} {steps}, budget {budget:g})"
    if use_plan:
        sub = subs[best["source"]]
        rep = dataclasses.replace(sub.calibration, plan=best["plan"], policies=best["policies"], proxy=best["proxy"],
                                  block_flop_fraction=sum(best["plan"]) / (L * len(best["plan"])))
        if rep.cost_fraction is not None:
            rep.cost_fraction = sum(costs[d] for d in best["plan"]) / (costs[L] * len(best["plan"]))
        sched = _plan_schedule(best["plan"], best["policies"], rep, num_timesteps, best["steps"], sampler, label)
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
    rep.joint, rep.validation = joint, None
    rep.seconds = round(time.perf_counter() - start, 4)
    if time_reference:
        t0 = time.perf_counter()
        sample(model, noises, conditions, steps=steps, schedule=None, **kw)
        rep.reference_seconds = round(time.perf_counter() - t0, 4)
    sched.calibration = rep
    return sched


def describe(rep: CalibrationReport) -> list[str]:
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
           f"steps: chose {j['chosen']} ({verdict}); final-sample RMS to full depth at {j['reference_steps']} steps:"]
    for r in sorted(j["alternatives"], key=lambda r: r["real"]):
        mark = "*" if r["name"] == j["chosen"] else " "
        out.append(f"   {mark} {r['name']:<48} spends {r['spent_fraction']:.3f}  RMS {r['real']:.4g}")
    return out


__all__ = ["calibrate_joint", "parse_search", "step_counts", "describe", "DEPTH_FRACTIONS", "SEARCH_NAMES"]
