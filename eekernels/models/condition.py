"""Conditions beyond class labels: caption token embeddings with their mask, pooled text, and per-sample extras.

A text-conditioned family (PixArt, SD3, FLUX) takes ``y`` as a :class:`TextCondition`:

- ``tokens`` (B, L, D_text): the text encoder's hidden states (T5 for PixArt; CLIP+T5 for SD3; T5 for FLUX);
- ``mask`` (B, L) bool, or integer / floating with values 0/1 (True/1: a real token, False/0: padding; any
  other value is refused), or None (every token attends);
- ``pooled`` (B, P): pooled text embeddings (SD3 and FLUX), or None;
- ``extra``: per-sample (B, ...) tensors a family needs besides text, by name: PixArt-α 1024's
  ``resolution`` (B, 2) and ``aspect_ratio`` (B, 1), FLUX-dev's ``guidance`` (B,).

Classifier-free guidance runs ``[cond; uncond]`` as one batch: :meth:`TextCondition.cat`. The unconditional half
is the family's null condition (``model.null_condition(batch, length)``: PixArt's learned ``y_embedding``) or
the caller's negative-prompt embeddings. Everything is checked once, before any kernel, by
:func:`check_text_condition`, which names the field, what was expected and what was given.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TextCondition:
    """Caption embeddings, their mask, pooled text and per-sample extras for a batch (see the module docstring)."""

    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def tensors(self) -> dict:
        """Every tensor by field name (``extra.<name>`` for extras), None fields left out."""
        out = {"tokens": self.tokens, "mask": self.mask, "pooled": self.pooled}
        out.update({f"extra.{k}": v for k, v in self.extra.items()})
        return {k: v for k, v in out.items() if v is not None}

    def map(self, fn) -> "TextCondition":
        """A new condition with ``fn`` applied to every tensor (the original is not modified)."""
        f = lambda v: None if v is None else fn(v)  # noqa: E731
        return TextCondition(f(self.tokens), f(self.mask), f(self.pooled), {k: fn(v) for k, v in self.extra.items()})

    def index(self, idx) -> "TextCondition":
        """Rows ``idx`` (a slice, or a LongTensor permutation) of every tensor."""
        return self.map(lambda v: v[idx])

    def to(self, device=None, dtype=None) -> "TextCondition":
        """Move to ``device``; floating tensors other than the mask also to ``dtype``."""
        def move(v, floating):
            if dtype is not None and floating and v.is_floating_point():
                return v.to(device=device, dtype=dtype)
            return v.to(device=device)
        return TextCondition(move(self.tokens, True), None if self.mask is None else move(self.mask, False),
                             None if self.pooled is None else move(self.pooled, True),
                             {k: move(v, True) for k, v in self.extra.items()})

    def cat(self, other: "TextCondition") -> "TextCondition":
        """``[self; other]`` along the batch: the CFG batch. A None mask on one side becomes all-ones."""
        if self.length != other.length:
            raise ValueError(f"TextCondition.cat: the unconditional caption length ({other.length}) expected the "
                             f"conditional one ({self.length}); pad both to the same length")
        if (self.pooled is None) != (other.pooled is None) or set(self.extra) != set(other.extra):
            raise ValueError("TextCondition.cat: the unconditional condition expected the same fields as the "
                             f"conditional one, got pooled {self.pooled is not None}/{other.pooled is not None}, "
                             f"extra {sorted(self.extra)}/{sorted(other.extra)}")
        mask = None
        if self.mask is not None or other.mask is not None:
            ones = lambda c: torch.ones(c.tokens.shape[:2], dtype=torch.bool, device=c.tokens.device)  # noqa: E731
            a = self.mask if self.mask is not None else ones(self)
            b = other.mask if other.mask is not None else ones(other)
            mask = torch.cat([a.bool(), b.bool()])
        pooled = None if self.pooled is None else torch.cat([self.pooled, other.pooled])
        return TextCondition(torch.cat([self.tokens, other.tokens]), mask, pooled,
                             {k: torch.cat([v, other.extra[k]]) for k, v in self.extra.items()})

    def signature(self) -> tuple:
        """What a CUDA graph's static buffers depend on: every field's shape and dtype."""
        return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(self.tensors().items()))


def check_values(where: str, named: dict) -> None:
    """Refuse non-finite floating tensors and masks with values other than 0/1, by name, with ONE host read for
    all of them. ``named``: ``{name: (tensor or None, "finite" | "mask")}`` on one device, the name as the message
    shows it (``y.tokens``, ``noise``). A ValueError names the first bad one, what was expected and what was given."""
    checks = {k: (v, kind) for k, (v, kind) in named.items()
              if v is not None and not (kind == "mask" and v.dtype == torch.bool)
              and not (kind == "finite" and not v.is_floating_point())}
    if not checks:
        return
    flags = [torch.isfinite(v).all() if kind == "finite" else ((v == 0) | (v == 1)).all()
             for v, kind in checks.values()]
    for (name, (v, kind)), good in zip(checks.items(), torch.stack(flags).tolist()):  # the one host read
        if good:
            continue
        if kind == "mask":
            bad = v[~((v == 0) | (v == 1))]
            raise ValueError(f"{where}: `{name}` expected 0/1 values (1: a real token, 0: padding) or a bool "
                             f"tensor, got {bad.numel()} other value(s), e.g. {bad[0].item():g}")
        nan, inf = int(v.isnan().sum()), int(v.isinf().sum())
        raise ValueError(f"{where}: `{name}` expected finite values, got {nan} NaN and {inf} Inf among "
                         f"{v.numel()} values")


def check_text_condition(where: str, y, *, batch: int, token_dim: int, device, pooled_dim: int | None = None,
                         extras: dict | None = None, max_length: int | None = None,
                         values: bool = False) -> TextCondition:
    """Validate ``y`` for a text-conditioned model and return it with a bool mask (or None).

    ``pooled_dim``: the pooled-text width the model takes (None: it takes none). ``extras``: ``{name: shape
    after the batch dim}`` the model needs (e.g. ``{"resolution": (2,)}``); an extra the model does not know is
    refused. Raises ValueError naming the field, what was expected and what was given.

    ``values``: also check values (:func:`check_values`): the mask is 0/1 and every floating tensor is finite,
    with one host read (``sample()`` does this once per call). Without it nothing waits on the device: only a
    non-bool mask on the CPU has its 0/1 values checked, so a model's forward stays capturable in a CUDA graph.
    """
    if not isinstance(y, TextCondition):
        raise ValueError(f"{where}: `y` expected an eekernels.models.TextCondition (caption tokens, mask, ...) "
                         f"for this text-conditioned model, got {type(y).__name__}")
    tok = y.tokens
    if not isinstance(tok, torch.Tensor) or tok.dim() != 3:
        got = tuple(tok.shape) if isinstance(tok, torch.Tensor) else type(tok).__name__
        raise ValueError(f"{where}: `y.tokens` expected a (B, L, {token_dim}) tensor, got {got}")
    if tok.shape[0] != batch or tok.shape[2] != token_dim or tok.shape[1] < 1:
        raise ValueError(f"{where}: `y.tokens` expected shape ({batch}, L >= 1, {token_dim}) (batch of x, the "
                         f"model's caption width), got {tuple(tok.shape)}")
    if max_length is not None and tok.shape[1] > max_length:
        raise ValueError(f"{where}: `y.tokens` expected at most {max_length} tokens, got {tok.shape[1]}")
    if not tok.is_floating_point():
        raise ValueError(f"{where}: `y.tokens` expected a floating tensor, got {tok.dtype}")
    if tok.device != torch.device(device):
        raise ValueError(f"{where}: `y.tokens` expected device {device} (as x), got {tok.device}")
    mask = y.mask
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(tok.shape[:2]):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{where}: `y.mask` expected shape {tuple(tok.shape[:2])} (B, L of the tokens), got {got}")
        if mask.is_complex():
            raise ValueError(f"{where}: `y.mask` expected a bool, integer or floating 0/1 tensor, got {mask.dtype}")
        if mask.device != tok.device:
            raise ValueError(f"{where}: `y.mask` expected device {tok.device}, got {mask.device}")
    if pooled_dim is None:
        if y.pooled is not None:
            raise ValueError(f"{where}: `y.pooled` expected None (this model takes no pooled text), got a tensor")
    else:
        p = y.pooled
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != (batch, pooled_dim) or not p.is_floating_point():
            got = f"{tuple(p.shape)} {p.dtype}" if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"{where}: `y.pooled` expected a floating ({batch}, {pooled_dim}) tensor, got {got}")
        if p.device != tok.device:
            raise ValueError(f"{where}: `y.pooled` expected device {tok.device}, got {p.device}")
    extras = extras or {}
    unknown = sorted(set(y.extra) - set(extras))
    if unknown:
        raise ValueError(f"{where}: `y.extra` has {unknown}, which this model does not take (it takes {sorted(extras)})")
    for name, shape in extras.items():
        v = y.extra.get(name)
        if v is None:
            continue  # optional: the family decides whether it is needed
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != (batch, *shape):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{where}: `y.extra[{name!r}]` expected shape {(batch, *shape)}, got {got}")
        if v.device != tok.device:
            raise ValueError(f"{where}: `y.extra[{name!r}]` expected device {tok.device}, got {v.device}")
    if values:
        check_values(where, {"y.tokens": (tok, "finite"), "y.mask": (mask, "mask"), "y.pooled": (y.pooled, "finite"),
                             **{f"y.extra[{k!r}]": (v, "finite") for k, v in y.extra.items()}})
    elif mask is not None and mask.device.type == "cpu":
        check_values(where, {"y.mask": (mask, "mask")})
    if mask is None or mask.dtype == torch.bool:
        return y
    return TextCondition(tok, mask.bool(), y.pooled, dict(y.extra))


# ---- prompt-embedding files ----------------------------------------------------------------------------------------
#: The keys of a prompt-embedding file: diffusers' names (what ``pipe.encode_prompt`` returns and the pipelines'
#: ``prompt_embeds=`` arguments take), positive and negative.
PROMPT_KEYS = {"tokens": "prompt_embeds", "mask": "prompt_attention_mask", "pooled": "pooled_prompt_embeds"}


def save_prompt_embeds(path, y: TextCondition, negative: TextCondition | None = None) -> None:
    """Write captions' embeddings (and optionally the negative prompt's) as a flat ``{name: tensor}`` file
    (``.safetensors`` by suffix): ``prompt_embeds``, ``prompt_attention_mask``, ``pooled_prompt_embeds`` and
    ``negative_...``; extras (FLUX-dev's guidance) as ``extra.<name>`` / ``negative_extra.<name>``."""
    from eekernels.serialization import save_state

    state = {}
    for prefix, c in (("", y), ("negative_", negative)):
        if c is None:
            continue
        if not isinstance(c, TextCondition):
            raise ValueError(f"{prefix or 'y'}: expected a TextCondition, got {type(c).__name__}")
        for field_, key in PROMPT_KEYS.items():
            v = getattr(c, field_)
            if v is not None:
                state[prefix + key] = v
        state.update({f"{prefix}extra.{k}": v for k, v in c.extra.items()})
    save_state(state, path, metadata={"format": "eekernels.prompt_embeds"})


def load_prompt_embeds(path, *, where: str = "prompt_embeds") -> tuple[TextCondition, TextCondition | None]:
    """Read a prompt-embedding file (``save_prompt_embeds``'s keys; ``.safetensors`` through the safetensors
    package, anything else through ``torch.load(weights_only=True)``): returns ``(y, negative or None)``. The
    shapes are checked against each other here, and against a model where the condition is used."""
    from eekernels.serialization import load_any

    state = load_any(path, where=where)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where}: expected a flat {{name: tensor}} file with {PROMPT_KEYS['tokens']!r}, got "
                         f"{type(state).__name__}")
    known = {p + k for p in ("", "negative_") for k in PROMPT_KEYS.values()}
    odd = sorted(k for k in state if k not in known and not k.startswith(("extra.", "negative_extra.")))
    if odd:
        raise ValueError(f"{where}: unexpected keys {odd} (expected {sorted(known)} and extra.<name>)")

    def build(prefix):
        tok = state.get(prefix + PROMPT_KEYS["tokens"])
        if tok is None:
            if not prefix:
                raise ValueError(f"{where}: expected a {PROMPT_KEYS['tokens']!r} tensor (N, L, D), got keys "
                                 f"{sorted(state)}")
            if any(k.startswith(prefix) for k in state):
                raise ValueError(f"{where}: has negative_* keys but no {prefix + PROMPT_KEYS['tokens']!r}")
            return None
        if tok.dim() != 3 or not tok.is_floating_point():
            raise ValueError(f"{where}: {prefix + PROMPT_KEYS['tokens']!r} expected a floating (N, L, D) tensor, "
                             f"got {tuple(tok.shape)} {tok.dtype}")
        n, L = tok.shape[:2]
        mask, pooled = state.get(prefix + PROMPT_KEYS["mask"]), state.get(prefix + PROMPT_KEYS["pooled"])
        if mask is not None and tuple(mask.shape) != (n, L):
            raise ValueError(f"{where}: {prefix + PROMPT_KEYS['mask']!r} expected shape ({n}, {L}), got "
                             f"{tuple(mask.shape)}")
        if pooled is not None and (pooled.dim() != 2 or pooled.shape[0] != n):
            raise ValueError(f"{where}: {prefix + PROMPT_KEYS['pooled']!r} expected shape ({n}, P), got "
                             f"{tuple(pooled.shape)}")
        tag = prefix + "extra."
        extra = {k[len(tag):]: v for k, v in state.items() if k.startswith(tag)}
        for k, v in extra.items():
            if v.dim() < 1 or v.shape[0] != n:
                raise ValueError(f"{where}: {tag + k!r} expected {n} rows, got {tuple(v.shape)}")
        return TextCondition(tok, None if mask is None else mask.bool(), pooled, extra)

    return build(""), build("negative_")
