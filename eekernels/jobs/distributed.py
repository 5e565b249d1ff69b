"""Multi-process sampling with torch.distributed: seeds, sharding, resume, and rank-0 gathering.

``torchrun --nproc_per_node=N -m eekernels sample --num-images M --out DIR`` runs (through eekernels/jobs/sample.py)
:func:`sample_to_folder` on every rank. The rules, chosen so that the result does not depend on N, on M or on
how many times the job was interrupted (for a given batch size, which is part of the run's settings):

- image ``i`` (0 <= i < M) gets the seeded noise and label of :mod:`eekernels.eval.images` (noise seeded
  ``base_seed + i``, label ``i % num_classes``: class-balanced, deterministic);
- images are sampled in fixed batches by index: batch ``k`` is images ``k*B .. k*B+B-1`` (B: the batch size,
  ``--per-proc-batch-size``), the last one padded with the images after M (sampled, not written), so image ``i``
  is always sampled in the same batch, whatever N, M or the interruptions. Sampling is batch-variant in the
  last bits (on the CPU, MKL's GEMMs with fewer than 4 rows, the conditioning's; see :func:`sample_to_folder`),
  so this is what makes image ``i`` independent of N and of resumes; B is recorded in ``DIR/run.json``;
- rank 0 lists the images not yet on disk (a PNG that does not fully decode at the expected size counts as
  not written and is made again) and broadcasts the list; the batches holding them are dealt out, rank r
  taking every N-th of them starting at r, so no two ranks make the same image and a rerun resumes where the
  last one stopped (a batch is sampled whole; only its missing images are written);
- rank 0 holds ``DIR/.eekernels.lock`` (host and pid) for the whole run: a second job on the same DIR stops
  with an error that names the first; a lock whose pid is dead on this host is stale and is taken over;
- each image is written as ``DIR/samples/{i:06d}.png`` through a temporary file and an atomic rename, so an
  interrupted run never leaves a truncated PNG behind;
- after a barrier, rank 0 reads the PNGs back and writes ``DIR/samples.npz`` (key ``arr_0``: uint8
  ``(M, H, W, C)``, the layout of DiT's ``sample_ddp.py`` that the ADM/FID tools read) and a grid
  ``DIR/grid.png`` of the first images.

DIR must be visible to every rank (one machine, or a shared filesystem on a cluster), as for DiT's
``sample_ddp.py``. Stochastic solvers (DDPM) draw per-step noise from a generator seeded with the batch's first
index, which is fixed too: with any solver, image ``i`` depends on its seed, label, the batch size and the
settings in ``run.json``, and on nothing else (given the same software and hardware).

Backends: NCCL with one GPU per rank (``cuda:LOCAL_RANK``), gloo on the CPU. A single process (no
torchrun) runs the same code with world size 1 and no process group.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from eekernels.eval.images import image_labels, save_grid, seeded_noise, to_uint8

SAMPLES_DIR = "samples"
NPZ_NAME = "samples.npz"
GRID_NAME = "grid.png"
RUN_FILE = "run.json"
LEGACY_KEYS = ("batch_size",)  # run.json keys added later: a folder whose run.json lacks one resumes with any value
LOCK_FILE = ".eekernels.lock"
GRID_MAX = 64  # the grid shows the first 64 images: a 50k-image FID run must not make a 50k-tile PNG


# ----------------------------------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, its device, and whether it owns the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # "nccl" | "gloo" | None (single process)
    owns_group: bool  # True when setup() created the process group (teardown() then destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when a torchrun-style launcher started this process (``RANK`` and ``WORLD_SIZE`` are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: str | torch.device | None = None) -> DistContext:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``).

    device: None picks ``cuda:LOCAL_RANK`` when CUDA is available (backend NCCL), else the CPU (gloo).
    A CPU device forces gloo even on a GPU machine. Without torchrun variables, world size is 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count() and world_size > 1:
            raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                             "launch at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(dev)
    if world_size == 1:
        return DistContext(0, 1, 0, dev, None, owns_group=False)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        # Long enough for the slowest rank to finish its shard before the gathering barrier.
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2), **kwargs)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend(), owns)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def broadcast_from_main(ctx: DistContext, obj):
    """Rank 0's ``obj`` on every rank (a small picklable object)."""
    if ctx.world_size == 1:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


# ----------------------------------------------------------------------------------------------------------------
# Sharding (seeds and labels: eekernels.eval.images)
# ----------------------------------------------------------------------------------------------------------------
def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Every ``world_size``-th index starting at ``rank``: disjoint across ranks, balanced within one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"shard: `rank` expected in [0, {world_size}), got {rank}")
    return list(indices)[rank::world_size]


def png_path(out_dir: str | os.PathLike, index: int) -> Path:
    return Path(out_dir) / SAMPLES_DIR / f"{index:06d}.png"


def png_ok(path: Path, image_size: Sequence[int] | None = None) -> bool:
    """True if ``path`` is a PNG that fully decodes (and is ``image_size`` (H, W), when given)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # decodes every row: a truncated file fails here, not at open()
            return image_size is None or (img.height, img.width) == tuple(image_size)
    except (OSError, SyntaxError, ValueError):  # what PIL raises for missing, truncated or corrupt files
        return False


def pending_indices(out_dir: str | os.PathLike, num_images: int,
                    image_size: Sequence[int] | None = None) -> list[int]:
    """Indices in ``[0, num_images)`` without a good PNG: missing, unreadable, truncated or of another size."""
    return [i for i in range(num_images) if not png_ok(png_path(out_dir, i), image_size)]


# ----------------------------------------------------------------------------------------------------------------
# Images on disk
# ----------------------------------------------------------------------------------------------------------------

def write_pngs(out_dir: str | os.PathLike, indices: Sequence[int], images: np.ndarray) -> None:
    """Write ``images[k]`` (uint8 ``(H, W, C)``) as image ``indices[k]``, atomically (temp file + rename)."""
    from PIL import Image

    if len(indices) != len(images):
        raise ValueError(f"write_pngs: {len(indices)} indices for {len(images)} images")
    (Path(out_dir) / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    for i, img in zip(indices, images):
        path = png_path(out_dir, i)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp, format="PNG")
        os.replace(tmp, path)


def read_pngs(out_dir: str | os.PathLike, num_images: int) -> np.ndarray:
    """All images ``0 .. num_images-1`` as uint8 ``(N, H, W, C)``."""
    from PIL import Image

    arrs = []
    for i in range(num_images):
        path = png_path(out_dir, i)
        try:
            with Image.open(path) as img:
                a = np.asarray(img, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError) as e:
            raise RuntimeError(f"read_pngs: cannot read {path} ({type(e).__name__}: {e}); delete it and rerun "
                               "the job to make it again") from None
        a = a[..., None] if a.ndim == 2 else a
        if arrs and a.shape != arrs[0].shape:
            raise RuntimeError(f"read_pngs: {path} is {a.shape} (H, W, C), image 0 is {arrs[0].shape}; delete it "
                               "and rerun the job to make it again")
        arrs.append(a)
    return np.stack(arrs)


def save_npz(path: str | os.PathLike, samples: np.ndarray) -> None:
    """``samples`` uint8 ``(N, H, W, C)`` under key ``arr_0``, as DiT's ``sample_ddp.py`` writes it."""
    np.savez(path, arr_0=samples)


def _check_run_file(out_dir: Path, run_config: dict) -> None:
    """Refuse to resume into a folder made with other settings: its PNGs would silently mix two runs."""
    path = out_dir / RUN_FILE
    if path.exists():
        old = json.loads(path.read_text())
        run_config = {k: v for k, v in run_config.items() if k in old or k not in LEGACY_KEYS}
        if old != run_config:
            diff = {k: (old.get(k), run_config.get(k)) for k in sorted(set(old) | set(run_config))
                    if old.get(k) != run_config.get(k)}
            raise ValueError(f"{out_dir} holds samples made with other settings {diff} (old, new); "
                             "use another --out or delete the folder")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run_config, indent=1, sort_keys=True))


def check_out(out_dir: str | os.PathLike, option: str = "--out") -> Path:
    """``out_dir`` can hold a run (an existing folder or one to create, none of the run's names taken by something
    of the wrong kind); nothing is created. ValueError naming ``option`` otherwise."""
    from eekernels.jobs.options import output_folder

    out = output_folder(str(out_dir), option, files=(NPZ_NAME, GRID_NAME, RUN_FILE, LOCK_FILE))
    if (out / SAMPLES_DIR).exists() and not (out / SAMPLES_DIR).is_dir():
        raise ValueError(f"{option}: the job writes its images into {out / SAMPLES_DIR}, which is a file")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def acquire_lock(out_dir: str | os.PathLike, log: Callable[[str], None] = print) -> Path:
    """Create ``out_dir/.eekernels.lock`` naming this host and pid; returns its path (see :func:`release_lock`).

    Raises ``ValueError`` naming the other job's host and pid while another live job holds it. A lock left by a
    process that is no longer running on this host is stale: it is taken over, and ``log`` says so.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):  # the second try follows the removal of a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(path.read_text())
                host, pid = str(other["host"]), int(other["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                raise ValueError(f"--out: {out} is locked by another job (unreadable lock file {path}); if no job "
                                 "is writing there, delete the lock file") from None
            if host == me["host"] and not _pid_alive(pid):
                log(f"  taking over the stale lock {path}: pid {pid} on {host} is not running")
                path.unlink(missing_ok=True)
                continue
            raise ValueError(f"--out: {out} is being written by another job (host {host}, pid {pid}; lock file "
                             f"{path}); wait for it to finish or use another --out (if that job is no longer "
                             "running, delete the lock file)") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise ValueError(f"--out: another job took the lock {path} first; use another --out")


def release_lock(path: Path) -> None:
    """Remove the lock :func:`acquire_lock` made, if it is still ours."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass  # gone already, or someone else's: leave it


def _on_main(ctx: DistContext, fn: Callable[[], object]):
    """``fn()`` on rank 0, its result broadcast to every rank; if it raises, every rank raises.

    Without this a rank-0-only error (a lock held, a corrupt PNG) would leave the other ranks waiting at the next
    collective for the process group's timeout (hours). Rank 0 re-raises its own exception; the others raise
    ``ValueError`` for a ``ValueError`` on rank 0 (bad input: the CLI exits quietly with code 2) else
    ``RuntimeError``.
    """
    if ctx.world_size == 1:
        return fn()
    value, error = None, None
    if ctx.is_main:
        try:
            value = fn()
        except Exception as e:
            error = e
    box = broadcast_from_main(ctx, (value, None if error is None else (isinstance(error, ValueError), str(error))))
    if error is not None:
        raise error
    value, failed = box
    if failed is not None:
        is_value_error, msg = failed
        raise (ValueError if is_value_error else RuntimeError)(f"rank 0: {msg}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------
SampleFn = Callable[[torch.Tensor, "torch.Tensor | None", torch.Generator], torch.Tensor]


def sample_to_folder(sample_fn: SampleFn, *, num_images: int, out_dir: str | os.PathLike,
                     noise_shape: Sequence[int], batch_size: int = 16, base_seed: int = 0,
                     num_classes: int | None = None, ctx: DistContext | None = None,
                     run_config: dict | None = None, noise_dtype: torch.dtype = torch.float32,
                     progress: bool = False, image_size: Sequence[int] | None = None,
                     log: Callable[[str], None] = print) -> dict:
    """Sample images ``0 .. num_images-1`` into ``out_dir`` across all ranks, resuming what is on disk.

    sample_fn(noise, labels, generator) -> images: noise ``(batch_size, *noise_shape)`` on ``ctx.device``,
    labels LongTensor ``(batch_size,)`` on that device or None, a generator on that device seeded with
    ``base_seed`` plus the batch's first index (for stochastic solvers). It returns float ``(n, C, H, W)`` in
    [-1, 1] or uint8 ``(n, H, W, C)``. batch_size: images sampled at once, in fixed batches by index (batch k:
    images ``k*batch_size ..``, the last one padded past ``num_images``), so that image i never depends on the
    number of ranks or on resumes: sampling is not batch-invariant in the last bits (measured on the CPU with
    the shipped glyph DiT: one image alone against a batch of 8, up to 2.4e-5, because MKL's GEMMs take
    another kernel below 4 rows). It is part of the run's settings. run_config: the settings that determine the
    images (model, solver, steps, ...); a rerun with other settings (batch_size included) into the same folder
    raises ``ValueError``. image_size: the (H, W) sample_fn returns (default: ``noise_shape[-2:]``, a
    pixel-space model); a PNG on disk of another size is made again. progress: a tqdm bar on rank 0 (stderr).
    log: where rank 0's notes go (stale lock, PNGs made again).

    Returns (every rank) a dict: ``made`` (how many images this rank wrote now; ``indices``: which), ``resumed``
    (already on disk at the start), ``remade`` (indices whose PNG was on disk but unreadable, truncated or of another size),
    ``seconds`` (sampling wall time, slowest rank), and on rank 0 ``npz``, ``grid`` and ``images_per_s``
    (all ranks together, this run). While it runs, rank 0 holds ``out_dir/.eekernels.lock``.
    """
    if num_images < 1:
        raise ValueError(f"sample_to_folder: `num_images` expected >= 1, got {num_images}")
    if batch_size < 1:
        raise ValueError(f"sample_to_folder: `batch_size` expected >= 1, got {batch_size}")
    ctx = ctx or setup()
    out = Path(out_dir)
    size = tuple(int(v) for v in (image_size if image_size is not None else noise_shape[-2:]))
    config = {"num_images": int(num_images), "base_seed": int(base_seed), "num_classes": num_classes,
              "noise_shape": list(noise_shape), "batch_size": int(batch_size), **(run_config or {})}
    config.pop("num_images")  # asking for more images later extends a folder; it does not invalidate it
    lock = None

    def plan():
        # Rank 0 decides what is left, so every rank shards the same list even if the filesystem lags.
        nonlocal lock
        lock = acquire_lock(out, log)
        _check_run_file(out, json.loads(json.dumps(config, default=str)))
        todo = pending_indices(out, num_images, size)
        remade = [i for i in todo if png_path(out, i).exists()]
        if remade:
            log(f"  {len(remade)} PNG(s) on disk do not decode as {size[0]}x{size[1]} images and are made again "
                f"(first: {png_path(out, remade[0])})")
        return todo, remade

    def gather(todo, seconds):
        missing = [i for i in range(num_images) if not png_path(out, i).exists()]
        if missing:
            raise RuntimeError(f"{len(missing)} images missing after sampling (first: {png_path(out, missing[0])}); "
                               f"is {out} on a filesystem every rank sees?")
        samples = read_pngs(out, num_images)  # names any file it cannot decode
        if samples.shape[1:3] != size:
            raise RuntimeError(f"the PNGs in {out / SAMPLES_DIR} are {samples.shape[1]}x{samples.shape[2]}, expected "
                               f"{size[0]}x{size[1]}")
        save_npz(out / NPZ_NAME, samples)
        save_grid(out / GRID_NAME, samples[:GRID_MAX], min_size=128)
        return dict(npz=str(out / NPZ_NAME), grid=str(out / GRID_NAME),
                    images_per_s=len(todo) / seconds if seconds > 0 and todo else float("nan"))

    try:
        todo, remade = _on_main(ctx, plan)
        wanted = set(todo)
        mine = shard(sorted({i // batch_size for i in todo}), ctx.rank, ctx.world_size)  # this rank's batches

        t0 = time.perf_counter()
        written = []
        if progress and ctx.is_main:
            from tqdm import tqdm

            mine = tqdm(mine, desc=f"rank 0/{ctx.world_size} sampling", unit="batch")
        for k in mine:
            idx = range(k * batch_size, (k + 1) * batch_size)  # the whole batch, past num_images too
            noise = seeded_noise(idx, noise_shape, base_seed, noise_dtype).to(ctx.device)
            labels = image_labels(idx, num_classes)
            labels = None if labels is None else labels.to(ctx.device)
            gen = torch.Generator(ctx.device).manual_seed(int(base_seed) + idx[0])
            images = to_uint8(sample_fn(noise, labels, gen))
            if images.shape[1:3] != size:
                raise ValueError(f"sample_to_folder: sample_fn returned {images.shape[1]}x{images.shape[2]} images, "
                                 f"expected {size[0]}x{size[1]} (`image_size`)")
            keep = [j for j, i in enumerate(idx) if i in wanted]
            write_pngs(out, [idx[j] for j in keep], images[keep])
            written += [idx[j] for j in keep]

        # Every rank's PNGs are on disk after the barrier; rank 0 gathers them from there, as sample_ddp.py does.
        barrier(ctx)
        seconds = time.perf_counter() - t0  # after the barrier: the wall time of the slowest rank
        result = {"made": len(written), "indices": written, "resumed": num_images - len(todo), "remade": remade,
                  "seconds": seconds}
        gathered = _on_main(ctx, lambda: gather(todo, seconds))
        if ctx.is_main:
            result.update(gathered)
    finally:
        if lock is not None:
            release_lock(lock)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Options of `eekernels sample` under torchrun (the runner is eekernels/jobs/sample.py's run_sharded)
# ----------------------------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    """The options only the multi-process runner reads."""
    p.add_argument("--per-proc-batch-size", type=int, default=16,
                   help="images sampled at once (under torchrun: per rank, in fixed batches by index, recorded in "
                        "DIR/run.json: image i does not depend on the number of processes)")
