"""CUDA graphs: a bounded LRU cache of captured graphs sharing one memory pool, and ``GraphedModel``.

At small batch a diffusion step is launch-bound (docs/design.md; measured for DiT-XL/2 at B=2, eager against a graph:
benchmarks/RESULTS.md §2). The sampler captures one graph per (exit depth, batch shape, dtype, CFG) for a whole step
(``eekernels.samplers.graphs``); ``GraphedModel`` captures the model alone per depth for users who drive their
own loops. Both store their graphs here:

- one memory pool for every graph (``torch.cuda.graph_pool_handle``). Sharing is safe because a graph's
  persistent inputs and outputs live in static buffers allocated outside capture, replays are serialized on
  one stream, and a graph's pool intermediates are dead once its replay ends;
- at most ``max_graphs`` graphs and ``max_bytes`` of accounted memory (per graph: its peak allocation during
  capture, or the growth of reserved memory if larger), least recently used evicted first. Capturing resets
  the device's peak-memory statistics. Configure with ``configure(...)`` or the environment
  (``EEKERNELS_MAX_GRAPHS``, default 32; ``EEKERNELS_MAX_GRAPH_MB``, default 8192); ``stats()`` reports;
- a failed capture (out of memory, an op that syncs or is not capturable) is never fatal: the caller gets
  None, one ``RuntimeWarning`` is issued per owner, and that owner runs eagerly from then on.

A graph replays raw device pointers: owners (the buffers a graph reads and writes) are kept alive by the cache
as long as one of their graphs is cached.
"""
from __future__ import annotations

import itertools
import os
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

import torch


# ---- capture ---------------------------------------------------------------------------------------------------------

def _cuda_capture(fn: Callable[[], None], pool, stream: torch.cuda.Stream) -> tuple[object, int]:
    """Capture ``fn`` into a CUDA graph on ``stream`` in ``pool``; returns (graph, bytes the pool grew by).

    Written out instead of ``torch.cuda.graph`` so that a failure inside the capture still ends it and
    restores the current stream (``torch.cuda.graph.__exit__`` leaves the side stream current if
    ``capture_end`` raises).
    """
    device = stream.device
    torch.cuda.synchronize(device)
    reserved = torch.cuda.memory_reserved(device)
    # A graph's footprint in the pool is at least its peak working set during capture (the shared pool reuses
    # freed blocks, so the growth of reserved memory alone can read 0).
    torch.cuda.reset_peak_memory_stats(device)
    allocated = torch.cuda.memory_allocated(device)
    graph = torch.cuda.CUDAGraph()
    error = None
    with torch.cuda.stream(stream):
        # thread_local: other threads' CUDA work (data loaders, logging) cannot invalidate our capture.
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the capture is ended
            error = e
        try:
            graph.capture_end()
        except BaseException as e:  # noqa: BLE001
            error = error or e
    if error is not None:
        _end_generator_capture(stream)
        raise error
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - allocated
    return graph, max(0, peak, torch.cuda.memory_reserved(device) - reserved)


def _end_generator_capture(stream: torch.cuda.Stream) -> None:
    """After a failed capture, let the CUDA generators leave capture mode.

    ``CUDAGraph.capture_end`` raises on an invalidated capture before it runs the generators' capture epilogue,
    so the default generator would stay "capturing" and every later random op would fail ("Offset increment
    outside graph capture"). A trivial capture that succeeds runs the prologue and epilogue again.
    """
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                torch.zeros(1, device=stream.device).add_(1)
            finally:
                graph.capture_end()
        del graph
        torch.cuda.synchronize(stream.device)
    except Exception:  # noqa: BLE001 - best effort: the caller already falls back to eager
        pass


@dataclass
class _Entry:
    graph: object
    nbytes: int
    owner_key: Hashable


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None


# ---- the cache -----------------------------------------------------------------------------------------------------

class GraphCache:
    """LRU cache of captured graphs, bounded in count and in accounted bytes, sharing one memory pool.

    Args:
        max_graphs: most graphs kept (>= 1).
        max_bytes: most accounted bytes kept (None: no byte bound). The newest graph is always kept.
        warmup: eager runs of a function (on a side stream) before its capture: cuBLAS handles, Triton
            autotuning and lazy initialisations happen there, outside the capture.
        capture: ``capture(fn, pool, stream) -> (graph, nbytes)``; default: real CUDA capture. Tests on machines
            without a GPU pass an eager stand-in so that the cache and runners run their real code paths.
    """

    def __init__(self, max_graphs: int = 32, max_bytes: int | None = 8 << 30, *, warmup: int = 2,
                 capture: Callable | None = None):
        self.configure(max_graphs=max_graphs, max_bytes=max_bytes)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup: expected an integer >= 0, got {warmup!r}")
        self.warmup = warmup
        self._capture_fn = capture
        self._entries: "OrderedDict[Hashable, _Entry]" = OrderedDict()
        self._owners: dict[Hashable, list] = {}  # owner key -> [owner, number of cached graphs]
        self._failed: dict[Hashable, str] = {}
        self._pool = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._counts = dict(hits=0, misses=0, captures=0, evictions=0, failures=0)

    def configure(self, *, max_graphs: int | None = None, max_bytes: int | None | str = "keep") -> None:
        """Change the bounds (evicting at once if they shrink). ``max_bytes=None`` removes the byte bound."""
        if max_graphs is not None:
            if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
                raise ValueError(f"max_graphs: expected an integer >= 1, got {max_graphs!r}")
            self.max_graphs = max_graphs
        if max_bytes != "keep":
            if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                          or max_bytes < 0):
                raise ValueError(f"max_bytes: expected an integer >= 0 or None, got {max_bytes!r}")
            self.max_bytes = max_bytes
        if hasattr(self, "_entries"):
            self._evict_over_bounds()

    # ---- queries ----

    def supports(self, device: torch.device | str) -> bool:
        """Whether graphs can be captured for tensors on ``device``."""
        return self._capture_fn is not None or torch.device(device).type == "cuda"

    def get(self, key: Hashable):
        """The graph cached under ``key`` (now most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            self._counts["misses"] += 1
            return None
        self._entries.move_to_end(key)
        self._counts["hits"] += 1
        return entry.graph

    def owner(self, owner_key: Hashable):
        """The owner object registered under ``owner_key`` while it has cached graphs, else None."""
        item = self._owners.get(owner_key)
        return None if item is None else item[0]

    def failed(self, owner_key: Hashable) -> str | None:
        """The capture error recorded for ``owner_key`` (that owner then runs eagerly), or None."""
        return self._failed.get(owner_key)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def stats(self) -> dict:
        """Counts and memory: graphs, bytes, bounds, hits, misses, captures, evictions, failures, owners."""
        return dict(graphs=len(self._entries), bytes=self.nbytes, max_graphs=self.max_graphs,
                    max_bytes=self.max_bytes, owners=len(self._owners), **self._counts)

    def __repr__(self) -> str:
        s = self.stats()
        return (f"GraphCache({s['graphs']}/{s['max_graphs']} graphs, {s['bytes'] / 2**20:.1f} MiB, hits={s['hits']}, "
                f"misses={s['misses']}, captures={s['captures']}, evictions={s['evictions']}, "
                f"failures={s['failures']})")

    # ---- capture ----

    def capture(self, key: Hashable, fn: Callable[[], None], *, device: torch.device | str,
                owner_key: Hashable = None, owner: object = None, restore: list[torch.Tensor] = (),
                what: str = "graph"):
        """Warm up and capture ``fn`` under ``key``; returns the graph, or None (with one warning) on failure.

        ``restore``: tensors ``fn`` writes; their values are put back after the warm-up, so capturing never
        advances the caller's state. An exception in the warm-up is the function's own error and propagates;
        an exception in the capture marks ``owner_key`` failed and returns None.
        """
        owner_key = key if owner_key is None else owner_key
        if owner_key in self._failed:
            return None
        device = torch.device(device)
        snapshot = [t.clone() for t in restore]

        def put_back():
            for t, s in zip(restore, snapshot):
                t.copy_(s)

        for _ in range(self.warmup):
            try:
                self._warm(fn, device)
            finally:
                put_back()
        try:
            if self._capture_fn is not None:
                graph, nbytes = self._capture_fn(fn, self._pool, None)
            else:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph, nbytes = _cuda_capture(fn, self._pool, self._stream(device))
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
            put_back()
            self._failed[owner_key] = f"{type(e).__name__}: {e}"
            self._counts["failures"] += 1
            warnings.warn(f"eekernels: CUDA graph capture of {what} failed ({type(e).__name__}: {e}); "
                          "running it eagerly from now on", RuntimeWarning, stacklevel=3)
            return None
        put_back()
        self._counts["captures"] += 1
        self._entries[key] = _Entry(graph, int(nbytes), owner_key)
        item = self._owners.setdefault(owner_key, [owner, 0])
        item[1] += 1
        self._evict_over_bounds()
        return graph

    def _warm(self, fn, device: torch.device) -> None:
        if device.type != "cuda":
            fn()
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        # One capture stream per device: graphs sharing a pool should be captured on the same stream.
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    # ---- eviction ----

    def _evict_over_bounds(self) -> None:
        while len(self._entries) > 1 and (
            len(self._entries) > self.max_graphs or (self.max_bytes is not None and self.nbytes > self.max_bytes)
        ):
            self.evict(next(iter(self._entries)))
        while len(self._entries) > self.max_graphs:  # max_graphs >= 1, so only if it was lowered to below 1
            self.evict(next(iter(self._entries)))

    def evict(self, key: Hashable) -> None:
        """Drop the graph under ``key`` (and its owner once the owner has no graph left)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._counts["evictions"] += 1
        item = self._owners.get(entry.owner_key)
        if item is not None:
            item[1] -= 1
            if item[1] <= 0:
                del self._owners[entry.owner_key]

    def evict_owner(self, owner_key: Hashable) -> None:
        """Drop every graph of one owner."""
        for key in [k for k, e in self._entries.items() if e.owner_key == owner_key]:
            self.evict(key)
        self._failed.pop(owner_key, None)

    def clear(self) -> None:
        """Drop every graph and forget failures (the next use captures again)."""
        for key in list(self._entries):
            self.evict(key)
        self._failed.clear()


_DEFAULT: GraphCache | None = None


def default_cache() -> GraphCache:
    """The process-wide cache used by ``sample()`` and ``GraphedModel`` unless given another."""
    global _DEFAULT
    if _DEFAULT is None:
        mb = _env_int("EEKERNELS_MAX_GRAPH_MB", 8192)
        _DEFAULT = GraphCache(max_graphs=_env_int("EEKERNELS_MAX_GRAPHS", 32), max_bytes=None if mb <= 0 else mb << 20)
    return _DEFAULT


def configure(*, max_graphs: int | None = None, max_bytes: int | None | str = "keep") -> GraphCache:
    """Set the process-wide cache's bounds; returns the cache."""
    cache = default_cache()
    cache.configure(max_graphs=max_graphs, max_bytes=max_bytes)
    return cache


def stats() -> dict:
    """The process-wide cache's statistics (see ``GraphCache.stats``)."""
    return default_cache().stats()


# ---- GraphedModel ------------------------------------------------------------------------------------------------

_tokens = itertools.count()


class GraphedModel:
    """A model captured as one CUDA graph per exit depth on static inputs, for users who drive their own loops.

    ``graphed = GraphedModel(model, batch_size, depths=[28, 24, 20])`` captures ``model(x, t, y, depth=d)`` for
    each depth (None: full depth). ``graphed(x, t, y, depth=d)`` copies x (B, C, H, W), t (B,) and y (B,) into
    the static inputs and replays; the result is a fresh tensor (``clone_output=False``: the static output
    buffer itself, overwritten by the next call of that depth). Off CUDA (``enabled=False``) or after a failed
    capture (one warning) the model runs eagerly. ``exit_cache`` is not supported here (use ``sample``).

    Text-conditioned models (``model.condition == "text"``): pass ``condition=`` an example ``TextCondition`` of
    ``batch_size`` rows; every tensor of it gets a static buffer (a bool mask), the graphs are captured on them,
    and each call's ``y`` (same fields, shapes and dtypes: ``y.signature()``) is copied in before the replay.
    """

    def __init__(self, model, batch_size: int, depths=(None,), *, sample_shape: tuple[int, ...] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 cache: GraphCache | None = None, enabled: bool | None = None, clone_output: bool = True,
                 condition=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        self.device = torch.device(device) if device is not None else (param.device if param is not None
                                                                          else torch.device("cpu"))
        self.dtype = dtype or (param.dtype if param is not None else torch.float32)
        if sample_shape is None:
            C, S = getattr(model, "in_channels", None), getattr(model, "input_size", None)
            if C is None or S is None:
                raise ValueError("sample_shape: expected (C, H, W) for a model without in_channels/input_size")
            sample_shape = (C, S, S) if isinstance(S, int) else (C, *S)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        depths = list(depths)
        num_blocks = getattr(model, "num_blocks", None)
        for d in depths:
            if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
                raise ValueError(f"depths: expected None or integers >= 1, got {d!r}")
        if num_blocks is not None:
            from eekernels.models.scaffold import check_depth_range

            ints = [d for d in depths if d is not None]
            if ints:
                check_depth_range("GraphedModel: depths", ints, int(num_blocks), int(getattr(model, "min_depth", 1)))
        if not depths:
            raise ValueError("depths: expected at least one depth (None for full depth), got none")
        self.model, self.batch_size, self.depths = model, batch_size, tuple(dict.fromkeys(depths))
        self.cache = cache if cache is not None else default_cache()
        if enabled is None:
            enabled = self.cache.supports(self.device)
        elif enabled and not self.cache.supports(self.device):
            raise ValueError(f"enabled: CUDA graphs need a CUDA model, got device {self.device}")
        self.enabled, self.clone_output = bool(enabled), clone_output
        # Static inputs: valid values (never garbage) because the warm-up runs the model on them.
        B = batch_size
        self.x = torch.randn(B, *self.sample_shape, device=self.device, dtype=self.dtype)
        self.t = torch.full((B,), 500.0, device=self.device)
        self.y = (torch.zeros(B, dtype=torch.int64, device=self.device)
                  if getattr(model, "num_classes", None) is not None else None)
        self.text = getattr(model, "condition", None) == "text" or condition is not None
        if self.text:
            from eekernels.models.condition import TextCondition

            if not isinstance(condition, TextCondition):
                raise ValueError(f"condition: expected an example eekernels.TextCondition ({B} rows) for the static "
                                 f"caption buffers of a text-conditioned model, got {type(condition).__name__}")
            if condition.batch != B:
                raise ValueError(f"condition: expected {B} rows (batch_size), got {condition.batch}")
            for k, v in condition.tensors().items():
                if v.device != self.device:
                    raise ValueError(f"condition.{k}: expected device {self.device} (the model's), got {v.device}")
            self.y = condition.map(lambda v: v.detach().clone())  # valid values: the warm-up runs on them
            if self.y.mask is not None:
                self.y.mask = self.y.mask.bool()
            self._signature = self.y.signature()
        self.out: dict = {}
        self._token = ("GraphedModel", next(_tokens))
        weakref.finalize(self, self.cache.evict_owner, self._token)
        if self.enabled:
            for d in self.depths:
                self._graph(d)

    def _run(self, depth) -> None:
        kwargs = {} if depth is None else {"depth": depth}
        with torch.no_grad():
            self.out[depth] = self.model(self.x, self.t, self.y, **kwargs)

    def _graph(self, depth):
        key = (self._token, depth)
        graph = self.cache.get(key)
        if graph is None:
            # Owner token and a weak reference: the cache must not keep this object alive (finalize evicts).
            ref = weakref.ref(self)
            graph = self.cache.capture(key, lambda: ref()._run(depth), device=self.device, owner_key=self._token,
                                       owner=None, what=f"{type(self.model).__name__} at depth {depth}")
        return graph

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, depth=None):
        if depth not in self.depths:
            raise ValueError(f"depth: expected one of the captured depths {self.depths}, got {depth!r}")
        shape = (self.batch_size, *self.sample_shape)
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
            raise ValueError(f"x: expected shape {shape}, got {tuple(x.shape) if isinstance(x, torch.Tensor) else x}")
        t = torch.as_tensor(t, device=self.device)
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != self.batch_size):
            raise ValueError(f"t: expected shape ({self.batch_size},) or a scalar, got {tuple(t.shape)}")
        if self.text:
            y = self._text_input(y)
        else:
            if (y is None) != (self.y is None):
                raise ValueError(f"y: expected {'labels (B,)' if self.y is not None else 'None (unconditional model)'}, "
                                 f"got {'None' if y is None else tuple(y.shape)}")
            if y is not None and tuple(y.shape) != (self.batch_size,):
                raise ValueError(f"y: expected shape ({self.batch_size},), got {tuple(y.shape)}")
        graph = self._graph(depth) if self.enabled else None
        if graph is None:  # eager: off CUDA, or the capture failed (warned once)
            kwargs = {} if depth is None else {"depth": depth}
            return self.model(x, t.expand(self.batch_size).to(torch.float32), y, **kwargs)
        self.x.copy_(x)
        self.t.copy_(t.expand(self.batch_size))
        if self.text:
            src = y.tensors()
            for k, buf in self.y.tensors().items():
                buf.copy_(src[k])
        elif y is not None:
            self.y.copy_(y)
        graph.replay()
        out = self.out[depth]
        return out.clone() if self.clone_output else out

    def _text_input(self, y):
        """``y`` as a condition with the static buffers' fields (a None mask becomes all ones), or ValueError."""
        from eekernels.models.condition import TextCondition

        if not isinstance(y, TextCondition):
            raise ValueError(f"y: expected an eekernels.TextCondition for this text-conditioned model, got "
                             f"{type(y).__name__}")
        if y.mask is None and self.y.mask is not None:
            y = TextCondition(y.tokens, torch.ones(y.tokens.shape[:2], dtype=torch.bool, device=y.tokens.device),
                              y.pooled, y.extra)
        elif y.mask is not None:
            y = TextCondition(y.tokens, y.mask.bool(), y.pooled, y.extra)
        if y.signature() != self._signature:
            raise ValueError(f"y: expected a TextCondition with the captured fields, shapes and dtypes "
                             f"{self._signature}, got {y.signature()} (capture another GraphedModel for another "
                             "caption length or batch)")
        for k, v in y.tensors().items():
            if v.device != self.device:
                raise ValueError(f"y.{k}: expected device {self.device}, got {v.device}")
        return y

    def __repr__(self) -> str:
        return (f"GraphedModel({type(self.model).__name__}, batch_size={self.batch_size}, depths={self.depths}, "
                f"enabled={self.enabled})")
