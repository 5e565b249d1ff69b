"""DiT (facebookresearch/DiT: adaLN-Zero transformer, learned sigma, CFG null class) with early exit.

The forward (the scaffold's by-depth loop, ``scaffold.ScoreModel.forward_sorted``):
1. timestep + label embedding -> c (B, D);
2. ONE GEMM gives the adaLN modulations of every active block and of the final layer: their weights are
   stored stacked in ``adaLN_weight`` ((2 + 6L) * D, D), final layer first, so the active ones are a
   row prefix;
3. per block: attention on the modulated norm, then ``gated_residual_norm`` (gated residual + the MLP's
   modulated norm), the fc1 GEMM with its tanh-GELU epilogue (``linear_act``), fc2, and a second
   ``gated_residual_norm`` that already computes the NEXT block's (or the final layer's) modulated norm;
4. the final linear and unpatchify.

Early exit (ASE): ``blocks[:depth]`` run, then the final layer on that hidden state.

Per-block embedders (``block_embedders=True``): diffusers' ``DiTTransformer2DModel`` gives every block its own copy
of the timestep/label embedder (``norm1.emb``) and its head uses block 0's. Converted checkpoints have the copies
equal and one embedder is shared (one GEMM for every adaLN, as above). A diffusers DiT whose copies differ (every
freshly initialized or from-scratch-trained one) keeps them: block i >= 1 holds its own ``t_embedder`` /
``y_embedder`` and its adaLN rows are a GEMM on its own conditioning (the shared case's path is unchanged).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from eekernels.models import _layers as L
from eekernels.models import convert
from eekernels.models.scaffold import Carry, NextNorm, ScoreModel, add_and_norm
from eekernels.ops import gated_residual_norm, modulated_layer_norm

# --------------------------------------------------------------------------------------------------
# Configs (facebookresearch/DiT models.py)
# --------------------------------------------------------------------------------------------------
_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
DIT_CONFIGS = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for size, (depth, hidden, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}
#: What the output is: "epsilon" (the noise; DiT as trained, with learned sigma) or "flow" (the velocity of
#: rectified flow, t = sigma * 1000, sampled with the flow solvers).
PREDICTION_TYPES = ("epsilon", "flow")


# --------------------------------------------------------------------------------------------------
# Modules (named as facebookresearch/DiT, so checkpoints map key for key; adaLN is stacked in DiT).
# PatchEmbed, Attention and Mlp are the timm-layout ones in _layers, shared with U-ViT.
# --------------------------------------------------------------------------------------------------
class TimestepEmbedder(nn.Module):
    """Sinusoid of t (256 features) then Linear-SiLU-Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256, freq_shift=0.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift  # 0: facebookresearch; 1: diffusers' DiTTransformer2DModel

    def forward(self, t):
        freq = L.timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table; row ``num_classes`` is the CFG null class when class dropout is on."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def drop(self, labels):
        """facebookresearch: in training, labels are replaced by the null class at random (CFG training)."""
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return labels

    def forward(self, labels):
        return self.embedding_table(self.drop(labels))


class DiTBlock(nn.Module):
    """One adaLN-Zero block; its modulation weights are rows of ``DiT.adaLN_weight``."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qkv_bias=True, activation="gelu_tanh", mlp_norm_eps=1e-6):
        super().__init__()
        self.attn = L.Attention(hidden_size, num_heads, qkv_bias)
        self.mlp = L.Mlp(hidden_size, int(hidden_size * mlp_ratio), activation)
        self.mlp_norm_eps = mlp_norm_eps

    def forward(self, carry: Carry, mod, next_norm: NextNorm, keep: list | None = None) -> Carry:
        """``x + gate_msa * attn(h)``, then ``x + gate_mlp * mlp(modulate(norm(x), shift_mlp, scale_mlp))``.

        ``carry.h`` is ``modulate(norm(x), shift_msa, scale_msa)``, computed by the block before; the last
        residual add also computes ``next_norm`` of its result (the next block's or the final layer's). ``keep``: a
        list that receives the two branch outputs ``(attn, mlp)`` (a per-block forecast records them).
        """
        a = self.attn(carry.h)
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x, h = gated_residual_norm(carry.x, a, gate_msa, shift_mlp, scale_mlp, self.mlp_norm_eps)
        m = self.mlp(h)
        if keep is not None:
            keep += [a, m]
        return Carry(*add_and_norm(x, m, gate_mlp, next_norm))

    def forecast(self, carry: Carry, mod, next_norm: NextNorm, a: torch.Tensor, m: torch.Tensor) -> Carry:
        """The block with its attention and MLP outputs given (forecast): the gated residual adds and the next norm
        only (the MLP's own input norm is not needed: its output is given)."""
        gate_msa, _, _, gate_mlp = mod
        return Carry(*add_and_norm(carry.x + gate_msa[:, None] * a, m, gate_mlp, next_norm))


class FinalLayer(nn.Module):
    """Modulated norm (rows ``[0, 2D)`` of ``DiT.adaLN_weight``) and the linear to patches."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)


# --------------------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------------------
class DiT(ScoreModel):
    """Diffusion transformer with early exit: ``model(x, t, y, depth)`` runs ``blocks[:depth]``."""

    family = "DiT"
    prediction = "epsilon"  # the class default; an instance's is its constructor's ``prediction_type``

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int | None = 1000,
        learn_sigma: bool = True,
        qkv_bias: bool = True,
        activation: str = "gelu_tanh",
        eps: float = 1e-6,
        mlp_norm_eps: float | None = None,
        freq_shift: float = 0.0,
        block_embedders: bool = False,
        prediction_type: str = "epsilon",
    ):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"DiT: `prediction_type` expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if prediction_type == "flow" and learn_sigma:
            raise ValueError("DiT: `prediction_type` 'flow' expected learn_sigma=False (a velocity has no variance "
                             "channels), got learn_sigma=True")
        if hidden_size % num_heads:
            raise ValueError(f"DiT: `num_heads` expected to divide hidden_size={hidden_size}, got {num_heads}")
        if input_size % patch_size:
            raise ValueError(f"DiT: `input_size` expected a multiple of patch_size={patch_size}, got {input_size}")
        if depth < 1:
            raise ValueError(f"DiT: `depth` expected >= 1 blocks, got {depth}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.num_heads, self.num_blocks = hidden_size, num_heads, depth
        self.learn_sigma, self.prediction = learn_sigma, prediction_type
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.null_class = num_classes if num_classes is not None and class_dropout_prob > 0 else None
        self.eps = eps
        # diffusers' DiT normalizes before the MLP with its config's norm_eps (1e-5 by default).
        self.mlp_norm_eps = eps if mlp_norm_eps is None else mlp_norm_eps
        self.min_depth, self.min_reuse_depth = 1, 0  # depth 0 with an exit cache: no block runs
        self.forecast_blocks = True  # DiTBlock.forecast: a per-block forecast (ForecastCache(target="blocks"))

        self.x_embedder = L.PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes else None
        grid = input_size // patch_size
        self.register_buffer("pos_embed", L.sincos_pos_embed_2d(hidden_size, grid)[None])
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, activation, self.mlp_norm_eps) for _ in range(depth)
        )
        #: blocks 1.. hold their own timestep/label embedders (a diffusers DiT whose per-block copies differ)
        self.block_embedders = bool(block_embedders)
        if self.block_embedders:
            for blk in self.blocks[1:]:
                blk.t_embedder = TimestepEmbedder(hidden_size, freq_shift=freq_shift)
                blk.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes else None
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # All adaLN projections stacked: final layer's 2D rows, then 6D rows per block (one GEMM per forward).
        rows = (2 + 6 * depth) * hidden_size
        self.adaLN_weight = nn.Parameter(torch.empty(rows, hidden_size))
        self.adaLN_bias = nn.Parameter(torch.empty(rows))
        self.initialize_weights()

    # ---------------------------------------------------------------- init and parameter views
    def initialize_weights(self) -> None:
        """facebookresearch's init: xavier linears, N(0, 0.02) embeddings, zero adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for t_emb, y_emb in self.embedders():
            if y_emb is not None:
                nn.init.normal_(y_emb.embedding_table.weight, std=0.02)
            nn.init.normal_(t_emb.mlp[0].weight, std=0.02)
            nn.init.normal_(t_emb.mlp[2].weight, std=0.02)
        for p in (self.adaLN_weight, self.adaLN_bias, self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    def embedders(self) -> list:
        """``[(timestep embedder, label embedder or None)]``: the model's (block 0 and the head), then, with
        ``block_embedders``, block 1's, 2's, ... own copies."""
        own = [(b.t_embedder, b.y_embedder) for b in self.blocks[1:]] if self.block_embedders else []
        return [(self.t_embedder, self.y_embedder), *own]

    def block_adaLN(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (not copies) of block i's adaLN (6D, D) weight and (6D,) bias inside the stacked parameter."""
        D = self.hidden_size
        lo, hi = (2 + 6 * i) * D, (8 + 6 * i) * D
        return self.adaLN_weight[lo:hi], self.adaLN_bias[lo:hi]

    def final_adaLN(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the final layer's adaLN (2D, D) weight and (2D,) bias."""
        D = self.hidden_size
        return self.adaLN_weight[: 2 * D], self.adaLN_bias[: 2 * D]

    # ---------------------------------------------------------------- the scaffold's hooks
    def embed(self, x, t, y, depth):
        """Patch tokens and, in one GEMM, the adaLN modulations of the final layer and the ``depth`` active blocks."""
        B, D = x.shape[0], self.hidden_size
        depth = max(depth, 1)  # depth 0 (no block, exit cache): the head still reads block 0's conditioning
        # (B, N, D): the residual stream. pos_embed first: the sum takes its contiguous layout, not the
        # patches' transposed one (which costs a copy in each of the next norms).
        x = self.pos_embed.to(x.dtype) + self.x_embedder(x)
        if self.y_embedder is not None:
            y = self.y_embedder.drop(y)  # once: every embedder copy sees the same dropped labels
        cs = [t_emb(t) if y_emb is None else t_emb(t) + y_emb.embedding_table(y)
              for t_emb, y_emb in self.embedders()[:depth]]
        # In the stream's dtype (under autocast the GEMM gives bfloat16 while the stream stays float32).
        if len(cs) == 1:  # one conditioning vector (shared embedders): one GEMM for the head and every block
            rows = (2 + 6 * depth) * D
            mods = F.linear(F.silu(cs[0]), self.adaLN_weight[:rows], self.adaLN_bias[:rows]).to(x.dtype)
        else:  # per-block embedders: the head and block 0 on block 0's conditioning, block i on its own
            parts = [F.linear(F.silu(cs[0]), *self.final_adaLN())]
            parts += [F.linear(F.silu(c), *self.block_adaLN(i)) for i, c in enumerate(cs)]
            mods = torch.cat(parts, dim=1).to(x.dtype)
        # Block i: mv[6i : 6i+6] = shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, D).
        # One unbind makes all 6d views (host time matters at small batch: each indexing call costs).
        cond = (mods[:, :D], mods[:, D : 2 * D], mods[:, 2 * D :].view(B, 6 * depth, D).unbind(1))
        return Carry(x, modulated_layer_norm(x, cond[2][0], cond[2][1], self.eps)), cond

    def block_inputs(self, cond, i, n):
        return [v[:n] for v in cond[2][6 * i + 2 : 6 * i + 6]]  # gate_msa, shift_mlp, scale_mlp, gate_mlp

    def entry_norm(self, cond, j):
        return NextNorm(self.eps, shift=cond[2][6 * j], scale=cond[2][6 * j + 1])

    def head_norm(self, cond):
        return NextNorm(self.eps, shift=cond[0], scale=cond[1])

    def head(self, h, cond):
        return self.final_layer.linear(h)

    def unembed(self, out, cond):
        return L.unpatchify(out, self.patch_size, self.out_channels)

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_config(cls, name: str, **overrides) -> "DiT":
        """A randomly initialized DiT of a named config (``DIT_CONFIGS``), e.g. ``"DiT-XL/2"``."""
        if name not in DIT_CONFIGS:
            raise ValueError(f"DiT: unknown config {name!r}; known: {sorted(DIT_CONFIGS)}")
        return cls(**{**DIT_CONFIGS[name], **overrides})

    @classmethod
    def from_checkpoint(cls, state_dict_or_path, num_heads: int | None = None, *, which: str | None = None,
                        **overrides) -> "DiT":
        """Load the facebookresearch/DiT layout (or this class's own ``state_dict()``), in eval mode.

        Depth, width, patch, channels, MLP ratio and input size come from the tensor shapes; the heads from
        the known configs (``DIT_CONFIGS``) or ``num_heads``. A path is read with ``torch.load(weights_only=True)``
        (``eekernels.serialization.safe_load``): a facebookresearch ``train.py`` checkpoint ``{"model", "ema",
        "opt", "args"}`` loads, a file needing any other global is refused. Its ``"ema"`` (else ``"model"``) is
        used unless ``which`` names another. ``overrides`` go to the constructor.

        Classes: facebookresearch's label table has ``num_classes + (class_dropout_prob > 0)`` rows, the last
        one the CFG null class. ``num_classes=`` or ``class_dropout_prob=`` (given here, else read from the
        checkpoint's ``args`` when it holds them) decide exactly; without either, R rows are read as R - 1
        classes plus the null class (the default, as trained: DiT-XL/2 ImageNet's 1001 rows are 1000 + null).
        Pass ``class_dropout_prob=0`` (or ``num_classes=R``) for a model trained without class dropout.
        The model comes back in eval mode: in train mode the label embedder drops labels at random
        (facebookresearch's CFG training); call ``.train()`` for that.
        """
        where = "DiT.from_checkpoint"
        ckpt = L.read_checkpoint(where, state_dict_or_path)
        state = L.load_state(where, ckpt, which)
        cfg = convert.dit_config(where, state, num_heads, DIT_CONFIGS)
        table = state.get("y_embedder.embedding_table.weight")
        if table is not None:
            cfg.update(convert.dit_label_classes(where, table.shape[0], overrides, L.checkpoint_args(ckpt)))
        model = cls(**{**cfg, **overrides})
        targets = dict(model.state_dict(keep_vars=True))
        if "adaLN_weight" not in state:  # facebookresearch layout: one adaLN_modulation per block
            del targets["adaLN_weight"], targets["adaLN_bias"]
            targets.update(model._facebook_adaLN())
        L.copy_into("DiT.from_checkpoint", targets, state)
        return model.eval()

    def checkpoint_state_dict(self) -> dict:
        """This model's weights in the facebookresearch/DiT layout (loads into the original code). A model with
        per-block embedders (``block_embedders``) has no such layout: ValueError (use ``to_diffusers()`` or
        ``state_dict()``)."""
        if self.block_embedders:
            raise ValueError("DiT.checkpoint_state_dict: this model keeps a timestep/label embedder per block (from "
                             "a diffusers DiT whose blocks' copies differ); the facebookresearch layout has one "
                             "embedder; use diffusers_state_dict() / to_diffusers() or state_dict()")
        return self._layout_state()

    def _layout_state(self) -> dict:
        """The facebookresearch keys (and ``blocks.i.t_embedder`` / ``blocks.i.y_embedder`` per-block copies)."""
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("adaLN_")}
        state.update(self._facebook_adaLN())
        return {k: v.detach().clone() for k, v in state.items()}

    def diffusers_state_dict(self) -> dict:
        """This model's weights in the keys of diffusers' ``DiTTransformer2DModel`` (``load_state_dict(strict=True)``
        of one with the same configuration takes them; ``pos_embed`` is a fixed buffer there, not included).
        New tensors."""
        return convert.facebook_dit_to_diffusers(self._layout_state(), self.num_blocks)

    def _facebook_adaLN(self) -> dict:
        """``{facebookresearch key: view}`` of the stacked adaLN rows: the final layer's and each block's."""
        views = {"final_layer": self.final_adaLN()}
        views.update({f"blocks.{i}": self.block_adaLN(i) for i in range(self.num_blocks)})
        return {f"{k}.adaLN_modulation.1.{name}": v
                for k, (w, b) in views.items() for name, v in (("weight", w), ("bias", b))}

    @classmethod
    def from_diffusers(cls, module_or_state_dict, num_heads: int | None = None, **overrides) -> "DiT":
        """Load diffusers' ``DiTTransformer2DModel`` (a module, or its state dict).

        Reproduces its conventions: timestep sinusoid ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=1)``,
        LayerNorm eps 1e-6 before attention and ``norm_eps`` before the MLP. diffusers keeps a copy of the
        timestep/label embedders in every block; converted checkpoints have them identical and they are
        shared here; copies that differ are kept per block (``block_embedders``, see the module docstring).
        Keys the conversion does not read raise ``ValueError`` (strict, as ``from_checkpoint``).
        From a bare state dict, the heads come from the known configs or ``num_heads``, ``input_size``
        defaults to diffusers' sample_size 32 and ``mlp_norm_eps`` to its norm_eps 1e-5 (override both).
        The model comes back in eval mode (see ``from_checkpoint``).
        """
        where = "DiT.from_diffusers"
        if isinstance(module_or_state_dict, nn.Module):
            config = module_or_state_dict.config
            if config.norm_type != "ada_norm_zero" or config.norm_elementwise_affine:
                raise ValueError(f"{where}: expected norm_type='ada_norm_zero' without elementwise affine, "
                                 f"got norm_type={config.norm_type!r}, norm_elementwise_affine="
                                 f"{config.norm_elementwise_affine}")
            acts = {"gelu-approximate": "gelu_tanh", "gelu": "gelu"}
            if config.activation_fn not in acts:
                raise ValueError(f"{where}: activation_fn expected one of {list(acts)}, got {config.activation_fn!r}")
            cfg = dict(input_size=config.sample_size, mlp_norm_eps=config.norm_eps, activation=acts[config.activation_fn])
            num_heads = num_heads or config.num_attention_heads
            state = dict(module_or_state_dict.state_dict())
            pos_embed = module_or_state_dict.pos_embed.pos_embed  # a non-persistent buffer: not in the state dict
        else:
            state = L.load_state(where, module_or_state_dict)
            cfg = dict(input_size=32, mlp_norm_eps=1e-5)
            pos_embed = None
        cfg = {**cfg, **overrides, "freq_shift": overrides.get("freq_shift", 1.0)}
        fb = convert.diffusers_dit_to_facebook(where, state)
        hidden, patch = fb["x_embedder.proj.weight"].shape[0], fb["x_embedder.proj.weight"].shape[-1]
        if pos_embed is None:
            pos_embed = L.sincos_pos_embed_2d(hidden, cfg["input_size"] // patch)
        fb["pos_embed"] = pos_embed.detach().float().reshape(1, -1, hidden)
        cfg.pop("input_size")  # now implied by pos_embed
        return cls.from_checkpoint(fb, num_heads, **cfg)

    def to_diffusers(self):
        """These weights as diffusers' ``DiTTransformer2DModel`` (needs diffusers), computing the same function:
        this model's timestep frequencies (``downscale_freq_shift`` set to its ``freq_shift``), its MLP LayerNorm
        eps as ``norm_eps`` and its ``pos_embed`` copied into diffusers' fixed buffer. A new module on this
        model's device and dtype, in eval mode; nothing is shared. diffusers' DiT is class-conditional with a CFG
        null label row, so this model must have ``num_classes`` and a ``null_class``."""
        import diffusers

        where = "DiT.to_diffusers"
        if self.num_classes is None or self.null_class is None:
            raise ValueError(f"{where}: diffusers' DiTTransformer2DModel is class-conditional with a CFG null label "
                             f"row; this model has num_classes={self.num_classes}, null_class={self.null_class}")
        acts = {"gelu_tanh": "gelu-approximate", "gelu": "gelu"}
        act = self.blocks[0].mlp.activation
        if act not in acts:
            raise ValueError(f"{where}: activation expected one of {list(acts)}, got {act!r}")
        if self.blocks[0].attn.qkv.bias is None:
            raise ValueError(f"{where}: diffusers' DiT attention has q/k/v biases; this model has qkv_bias=False")
        if self.eps != 1e-6:
            raise ValueError(f"{where}: diffusers' adaLN-Zero LayerNorm has eps 1e-6; this model's is {self.eps}")
        m = diffusers.DiTTransformer2DModel(
            num_attention_heads=self.num_heads, attention_head_dim=self.hidden_size // self.num_heads,
            in_channels=self.in_channels, out_channels=self.out_channels, num_layers=self.num_blocks,
            sample_size=self.input_size, patch_size=self.patch_size, activation_fn=acts[act],
            num_embeds_ada_norm=self.num_classes, norm_eps=self.mlp_norm_eps)
        m.load_state_dict(self.diffusers_state_dict(), strict=True)
        with torch.no_grad():
            m.pos_embed.pos_embed.copy_(self.pos_embed.reshape(m.pos_embed.pos_embed.shape))
        for blk in m.transformer_blocks:
            blk.norm1.emb.time_proj.downscale_freq_shift = float(self.t_embedder.freq_shift)
        p = next(self.parameters())
        m = m.to(p.device)
        return (m if p.dtype == torch.float32 else m.to(p.dtype)).eval()  # diffusers warns on any dtype cast
