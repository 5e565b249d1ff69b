"""One CUDA graph per exit depth for a whole sampling step (and per depth and mode whose calls run CFG's conditional
half alone, a plan's ``ExitSchedule.uncond``).

A step (``Session.step``: model call at depth d, CFG combine, solver update, step counter += 1) reads and
writes only static buffers and reads its coefficients from a device table at the device-side counter, so the
same graph serves every call at depth d: the host's only work per step is choosing which graph to replay, and
the depth plan says that ahead of time. Graphs are keyed (session, depth); a session is one (model weights,
solver and its options, noise shape and dtype, device, labels or not or the text condition's signature
(fields, batch, caption length, dtypes), CFG or not, exit-cache depths), so
they are reused by later ``sample()`` calls of the same kind. If a capture fails, the run goes on eagerly on
the same buffers, with one warning (``GraphCache.capture``).
"""
from __future__ import annotations

from typing import Hashable

from eekernels.graphs import GraphCache


class StepGraphs:
    """Callable ``run(depth)``: replay the session's step graph for ``depth``, capturing it on first use."""

    def __init__(self, cache: GraphCache, session_key: Hashable, session):
        self.cache, self.key, self.session = cache, session_key, session
        self.eager = cache.failed(session_key) is not None

    def __call__(self, depth: int | None, uncond: str = "run") -> None:
        if self.eager:
            self.session.step(depth, uncond)
            return
        key = (self.key, depth) if uncond == "run" else (self.key, depth, f"uncond {uncond}")
        graph = self.cache.get(key)
        if graph is None:
            s = self.session
            half = "" if uncond == "run" else f", the conditional half alone (unconditional branch: {uncond})"
            graph = self.cache.capture(
                key, lambda: s.step(depth, uncond), device=s.state.x.device, owner_key=self.key, owner=s,
                restore=s.mutable(),
                what=f"a {s.solver.name} step at depth {depth}{half} (batch {s.batch}, {s.in_dtype})")
        if graph is None:  # capture failed: warned once; this run and later ones run eagerly
            self.eager = True
            self.session.step(depth, uncond)
            return
        graph.replay()
