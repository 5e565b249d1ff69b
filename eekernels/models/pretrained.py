"""Models shipped inside the package (``eekernels/pretrained/``): load them offline by name.

| name | what |
| --- | --- |
| ``glyph-dit`` | a small class-conditional pixel-space DiT trained on the procedural glyphs (``eekernels.data``) |
| ``glyph-dit-ase`` | the same model after ASE fine-tuning under its exit schedule (the main job's default) |
| ``glyph-judge`` | the CNN classifier the fidelity benchmark scores samples with |
| ``glyph-dit-flow`` | the flow-matching (velocity) glyph DiT, same recipe as glyph-dit (``--prediction flow``) |
| ``glyph-dit-flow-distilled`` | glyph-dit-flow reflowed for 4- and 8-step Euler sampling (``python/distill_flow_glyphs.py``) |

Each file is a ``torch.save`` dict: ``kind`` ("dit" | "judge"), ``model_kwargs`` (the constructor's
arguments), ``state_dict`` (float16 weights, half the bytes, for glyph-dit and glyph-judge; float32 for
glyph-dit-ase, as ``eekernels finetune`` wrote it; the models compute in float32 after loading), and
``meta`` (the exit schedule it was tuned for, and provenance: command, seed, steps, final loss).
``eekernels/pretrained/PROVENANCE.json`` collects the records, plus the fidelity numbers.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from eekernels.models._layers import warn_nonfinite
from eekernels.serialization import UnsafeCheckpointError, load_any

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
PRETRAINED = {
    "glyph-dit": "glyph-dit.pt",
    "glyph-dit-ase": "glyph-dit-ase.pt",
    "glyph-judge": "glyph-judge.pt",
    "glyph-dit-flow": "glyph-dit-flow.pt",
    "glyph-dit-flow-distilled": "glyph-dit-flow-distilled.pt",
    "glyph-dit-ase-dpm5": "glyph-dit-ase-dpm5.pt",
    "glyph-dit-guided-dpm5": "glyph-dit-guided-dpm5.pt",
}
#: the command that makes each shipped file (see benchmarks/RESULTS.md for the settings used)
MAKE = {
    "glyph-dit": "python python/train_glyphs.py --out DIR --install",
    "glyph-dit-flow": "python python/train_glyphs.py --prediction flow --out DIR --install",
    "glyph-dit-flow-distilled": "python python/distill_flow_glyphs.py --teacher glyph-dit-flow --out DIR --install",
    "glyph-dit-ase-dpm5": "python python/distill_exit_glyphs.py --out DIR --install",
    "glyph-dit-guided-dpm5": "python python/distill_exit_glyphs.py --out DIR --init glyph-dit --plan 8,8,8,8,8 "
                             "--uncond drop,drop,drop,drop,drop --name glyph-dit-guided-dpm5 --lr 1e-4 --steps 1693 "
                             "--weights student --install",
}
FORMAT = "eekernels-pretrained-v1"


def pretrained_names() -> list[str]:
    """Names of the shipped models whose files are present in this install."""
    return sorted(name for name, f in PRETRAINED.items() if (PRETRAINED_DIR / f).is_file())


def pretrained_path(name: str) -> Path:
    if name not in PRETRAINED:
        raise ValueError(f"load_pretrained: unknown name {name!r}; known: {sorted(PRETRAINED)}")
    path = PRETRAINED_DIR / PRETRAINED[name]
    if not path.is_file():
        raise ValueError(f"load_pretrained: {name!r} is not shipped in this install (no {path}); "
                         f"make it with `{MAKE.get(name, MAKE['glyph-dit'])}`")
    return path


def save_model_file(model: torch.nn.Module, path, kind: str, model_kwargs: dict, meta: dict | None = None,
                    dtype: torch.dtype = torch.float16) -> int:
    """Write ``model`` in the shipped format (floating weights in ``dtype``); returns the file size in bytes."""
    if kind not in ("dit", "judge"):
        raise ValueError(f"save_model_file: `kind` expected 'dit' or 'judge', got {kind!r}")
    persistent = {n for n, _ in model.named_parameters()}
    if kind == "judge":  # BatchNorm running statistics are part of the function
        persistent |= {n for n, _ in model.named_buffers()}
    state = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items() if k in persistent}
    payload = {"format": FORMAT, "kind": kind, "model_kwargs": dict(model_kwargs), "state_dict": state,
               "meta": meta or {}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path.stat().st_size


def _build(payload: dict, where: str) -> torch.nn.Module:
    kind = payload.get("kind")
    if kind == "dit":
        from eekernels.models.dit import DiT

        model = DiT(**payload["model_kwargs"])
    elif kind == "judge":
        from eekernels.models.judge import GlyphJudge

        model = GlyphJudge(**payload["model_kwargs"])
    else:
        raise ValueError(f"{where}: unknown model kind {kind!r} (expected 'dit' or 'judge')")
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    warn_nonfinite(where, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {n for n, _ in model.named_buffers()}
    if unexpected or set(missing) - buffers:
        raise ValueError(f"{where}: weights do not fit {kind} {payload['model_kwargs']}: "
                         f"missing {sorted(set(missing) - buffers)}, unexpected {sorted(unexpected)}")
    model.pretrained_meta = payload.get("meta", {})
    return model.eval()


def load_model_file(path, device="cpu", num_heads: int | None = None, config=None, *,
                    config_option: str | None = None) -> torch.nn.Module:
    """Load a model file: the shipped format, a trainer checkpoint (its EMA), a facebookresearch DiT file
    (a bare state dict or a ``train.py`` checkpoint ``{"model", "ema", "opt", "args"}``), or a PixArt, SD3 or
    FLUX transformer in its original or diffusers layout (``.pth`` or ``.safetensors``; see ``detect_family``).

    Returns the model in eval mode on ``device`` (float32). ``num_heads`` is needed only for a
    facebookresearch DiT or a PixArt checkpoint whose width/depth is not one of the named configs.

    ``config``: PixArt checkpoints only, the PixArt-sigma training config it was trained with (a dict of its
    variables or its ``.py`` file, read without running it; ``PixArt.from_checkpoint(config=)``). It is the only
    way to load a PixArt-Σ trained with the KV compressions that add no weights ("uniform", "ave",
    "uniform_every"): nothing in the weights says they were on, and without it the model runs uncompressed. Any
    other file is refused with ``config`` given (``config_option``: its name in that error, e.g. a CLI option).
    """
    where = f"load_model_file({str(path)!r})"
    if not Path(path).is_file():
        raise ValueError(f"{where}: no such file")
    try:  # weights_only=True with a small allowlist: a file needing any other global is refused, unexecuted
        payload = load_any(path, where="load_model_file")  # .safetensors: the safetensors package
    except UnsafeCheckpointError:
        raise
    except ValueError as e:  # not a torch file
        raise ValueError(f"{where}: not a checkpoint ({e})") from None
    family = detect_family(payload)
    cls = None
    if family is not None:  # a family whose layouts the table lists (text transformers)
        from eekernels import families

        cls = families.get(family).load("native")
    if config is not None and (cls is None or "config" not in inspect.signature(cls.from_checkpoint).parameters):
        head, got = (f"{config_option}:", f"{str(path)!r}, ") if config_option else (f"{where}: `config`", "")
        raise ValueError(f"{head} expected a PixArt checkpoint (a PixArt-sigma training config sets only PixArt-Σ's "
                         f"qk_norm and KV compression), got {got}{_describe(payload, family)}")
    if cls is not None:
        takes = inspect.signature(cls.from_checkpoint).parameters
        extra = {"num_heads": num_heads} if num_heads and "num_heads" in takes else {}  # not in every layout's weights
        if config is not None:
            extra["config"] = config
        model = cls.from_checkpoint(payload, **extra)
        model.pretrained_meta = {}
        return model.eval().to(device)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return _build(payload, where).to(device)
    if isinstance(payload, dict) and "ema" in payload and payload.get("model_kwargs"):  # a Trainer checkpoint
        from eekernels.models.dit import DiT

        model = DiT(**payload["model_kwargs"])
        warn_nonfinite(where, payload["ema"])
        model.load_state_dict(payload["ema"])
        model.pretrained_meta = {"trainer_step": payload.get("step"), "config": payload.get("config")}
        if "schedule" in payload:  # the schedule it was trained under, so that `--schedule auto` takes it
            rec = payload["schedule"]
            if rec is None:
                model.pretrained_meta["schedule"] = {"preset": "full", "table": None}
            elif isinstance(rec, dict) and rec.get("period") is None and rec.get("table"):
                model.pretrained_meta["schedule"] = {"preset": rec.get("name"), "table": list(rec["table"])}
        return model.eval().to(device)
    from eekernels.models.dit import DiT

    model = DiT.from_checkpoint(payload, num_heads=num_heads)
    model.pretrained_meta = {}
    return model.eval().to(device)


def _describe(payload, family: str | None) -> str:
    """What kind of model file ``payload`` is, for errors."""
    if family is not None:
        return f"a checkpoint of the {family!r} family"
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return f"an eekernels model file ({payload.get('kind')})"
    if isinstance(payload, dict) and "ema" in payload and payload.get("model_kwargs"):
        return "an eekernels finetune checkpoint (DiT)"
    return "a DiT checkpoint"


def detect_family(payload) -> str | None:
    """The name of the family (the table's ``checkpoint_keys``: every key of one of its layouts present) of a flat
    state dict (original or diffusers layout, DDP/compile prefixes stripped), else None (DiT and the shipped
    formats are told apart by ``load_model_file`` itself). A file that matches two families is refused."""
    if not isinstance(payload, dict):
        return None
    for nest in ("state_dict", "ema", "model"):  # PixArt-alpha's released .pth files: {"state_dict": {...}}
        if isinstance(payload.get(nest), dict):
            payload = payload[nest]
            break
    from eekernels import families

    keys = {k.removeprefix("module.").removeprefix("_orig_mod.") for k in payload if isinstance(k, str)}
    found = [f.name for f in families.families().values()
             if any(all(k in keys for k in layout) for layout in f.checkpoint_keys.values())]
    if len(found) > 1:
        raise ValueError(f"detect_family: the checkpoint's keys match the layouts of several families {found}")
    return found[0] if found else None


def load_diffusion_model(spec, device="cpu", *, num_heads: int | None = None, option: str = "--checkpoint",
                         config=None, config_option: str | None = None):
    """A shipped model by name, or a model file (``load_model_file``, with its ``num_heads`` and ``config``),
    checked to be a diffusion model with blocks (not, e.g., glyph-judge). ``option`` / ``config_option`` name the
    CLI options in errors. Returns ``(model, name)``."""
    if spec in PRETRAINED:
        if config is not None:
            head = f"{config_option}:" if config_option else "load_diffusion_model: `config`"
            raise ValueError(f"{head} expected a PixArt checkpoint file, got the shipped model {spec!r}")
        model, name = load_pretrained(spec, device), spec
    elif not Path(spec).is_file():
        raise ValueError(f"{option}: expected a shipped model {sorted(PRETRAINED)} or a model file, got {spec!r}")
    else:
        model, name = load_model_file(spec, device, num_heads=num_heads, config=config,
                                      config_option=config_option), str(spec)
    if getattr(model, "num_blocks", None) is None:  # e.g. glyph-judge, the fidelity benchmark's classifier
        raise ValueError(f"{option}: expected a diffusion model with blocks, got {name!r}, a {type(model).__name__}")
    return model, name


def load_pretrained(name: str, device="cpu") -> torch.nn.Module:
    """A shipped model by name (``pretrained_names()``), in eval mode on ``device``; nothing is downloaded.

    The model's ``pretrained_meta`` dict holds its exit schedule (``meta["schedule"]``) and provenance.
    """
    path = pretrained_path(name)
    return load_model_file(path, device)


def provenance() -> dict:
    """The shipped models' provenance and fidelity records (``PROVENANCE.json``), or {} if absent."""
    path = PRETRAINED_DIR / "PROVENANCE.json"
    return json.loads(path.read_text()) if path.is_file() else {}
