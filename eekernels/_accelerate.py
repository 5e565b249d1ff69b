"""Drop-in acceleration: ``eekernels.accelerate(obj)`` puts an eekernels model behind another codebase's API.

Supported objects, and what comes back:

| you pass | you get |
| --- | --- |
| a facebookresearch/DiT ``DiT`` module (``x_embedder``, ``t_embedder``, ``blocks``, ``final_layer``) | an :class:`EarlyExitModel`: ``forward(x, t, y)`` and ``forward_with_cfg(x, t, y, cfg_scale)`` as DiT's |
| a baofff/U-ViT ``UViT`` module (``patch_embed``, ``in_blocks``, ``mid_block``, ``out_blocks``) | an :class:`EarlyExitModel`: ``forward(x, timesteps, y)`` |
| an eekernels ``DiT`` / ``UNet`` / ``UViT`` | an :class:`EarlyExitModel` around it (no copy) |
| diffusers ``DiTTransformer2DModel`` | a :class:`DiffusersTransformer`: same call, ``.sample`` output, ``config``, ``dtype``, ``device`` |
| diffusers ``UNet2DModel`` | a :class:`DiffusersUNet`, likewise |
| diffusers ``DiTPipeline`` / ``DDPMPipeline`` / ``DDIMPipeline`` | a NEW pipeline object (shallow copy) whose denoiser is replaced; the original pipeline is untouched |

Weights are shared, not copied, wherever the eekernels layout keeps the original tensor as is (checked
with ``torch.equal`` before sharing; ``data_ptr`` is the same). Two layouts are fused for speed and so are
separate tensors: DiT's adaLN projections of all blocks are one stacked matrix ((2 + 6L)·D, D), and
diffusers' separate ``to_q/to_k/to_v`` become one QKV matrix (diffusers DiT, U-Net attention); the U-Net
also stacks every resnet's ``time_emb_proj``. While you keep the original object alive, those fused
tensors are the memory overhead (for DiT about a third of a facebookresearch model: adaLN is 6D² of a
block's 18D²; half of a diffusers one, whose QKV is split too). Drop the original (``pipe =
eekernels.accelerate(pipe)``) and only one copy of every weight remains.

Early exit: with ``schedule`` (an ``eekernels.ExitSchedule``) each call runs ``depth = schedule.depth(t)``
blocks (DiT/U-ViT) or resolution levels (U-Net). The depth is chosen without a host sync:
- a timestep that is a Python number or a CPU tensor (what DDPM/DDIM pipelines pass, and what
  ``scheduler.timesteps`` holds) is mapped on the host;
- an accelerated pipeline also reads each step's host timestep from the loop it runs
  (``for t in self.progress_bar(self.scheduler.timesteps)``, shared by the three supported pipelines), so
  DiTPipeline's device-side timestep costs no sync either;
- any other device timestep goes to the model as a per-sample depth tensor (one host sync in the model per
  call). Pass CPU timesteps, or use ``eekernels.samplers.sample``, to avoid it.

``exit_policy="cache"`` (training-free, DeepCache-style) records at each full-depth call what the skipped
part adds and reuses it at truncated calls; use a schedule that runs full depth first and periodically,
typically the step-indexed ``ExitSchedule.periodic(k, depth, total_depth)`` (full depth at calls 0, k, 2k,
... of a run). Accelerated pipelines start a new run (call count 0, cache cleared) at each pipeline call;
in your own loop call ``model.start_trajectory()`` before each run.

``graphs``: None captures CUDA graphs per depth when the model is on a GPU and ``eekernels.graphs`` is
available; True requires that; False never captures.
"""
from __future__ import annotations

import copy
import numbers

import torch
import torch.nn as nn

from eekernels.models.cache import ExitCache
from eekernels.samplers.sampling import EXIT_POLICIES

SUPPORTED = (
    "a facebookresearch/DiT `DiT` module; a baofff/U-ViT `UViT` module; "
    "an eekernels model (eekernels.models.DiT, UNet, UViT); "
    "diffusers DiTTransformer2DModel or UNet2DModel; "
    "diffusers DiTPipeline, DDPMPipeline or DDIMPipeline"
)


# --------------------------------------------------------------------------------------------------
# Exit plan: schedule -> depth per call, on the host when the timestep is on the host
# --------------------------------------------------------------------------------------------------
class _ExitPlan:
    """Maps a call's timestep to the depth the model runs, and owns the exit cache."""

    def __init__(self, schedule, exit_policy: str, model: nn.Module):
        from eekernels.schedules import ExitSchedule

        if exit_policy not in EXIT_POLICIES:
            raise ValueError(f"accelerate: `exit_policy` expected one of {EXIT_POLICIES}, got {exit_policy!r}")
        if exit_policy == "cache" and schedule is None:
            raise ValueError("accelerate: `exit_policy='cache'` expected a schedule (which calls run truncated), "
                             "got schedule=None")
        if schedule is not None and not isinstance(schedule, ExitSchedule):
            raise ValueError(f"accelerate: `schedule` expected an eekernels.ExitSchedule or None, "
                             f"got {type(schedule).__name__}")
        self.schedule, self.policy, self.full_depth = schedule, exit_policy, int(model.num_blocks)
        self.host_t = None  # this step's timestep on the host, set by an accelerated pipeline's loop
        self.calls = 0  # model calls since the trajectory started (step-indexed schedules)
        self._memo: dict[float, int] = {}
        self.cache = None
        self.depths = [self.full_depth]
        if schedule is not None:
            schedule.validate_for(model)
            self.depths = sorted(schedule.levels)
            if exit_policy == "cache":
                self.cache = ExitCache(d for d in self.depths if d < self.full_depth)

    def start_trajectory(self) -> None:
        """A new sampling run: restart the call count, forget cached values of the previous run."""
        self.calls = 0
        if self.cache is not None:
            self.cache.clear()

    def _host_depth(self, t) -> int:
        key = float(t)
        d = self._memo.get(key)
        if d is None:
            d = self._memo[key] = int(self.schedule.depth(torch.tensor([key], dtype=torch.float64))[0])
        return d

    def depth(self, t, batch: int):
        """None (full depth), an int, or a (B,) LongTensor on t's device."""
        if self.schedule is None:
            return None
        if self.schedule.step_indexed:  # e.g. periodic(k, d): full depth at calls 0, k, 2k, ...
            full, short = self.schedule.table
            return full if self.calls % self.schedule.period == 0 else short
        if isinstance(t, numbers.Number):
            return self._host_depth(t)
        if t.device.type == "cpu":
            flat = t.reshape(-1)
            if flat.numel() == 1 or bool((flat == flat[0]).all()):  # CPU tensor: no device sync
                return self._host_depth(flat[0])
            return self.schedule.depth(flat)
        if self.host_t is not None:
            return self._host_depth(self.host_t)
        return self.schedule.depth(t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(-1))

    def kwargs(self, t, batch: int) -> dict:
        out = {"depth": self.depth(t, batch)}
        self.calls += 1
        if self.cache is not None:
            out["exit_cache"] = self.cache
        return out


# --------------------------------------------------------------------------------------------------
# Graphs: one CUDA graph per (depth, batch shape) through eekernels.graphs, when available
# --------------------------------------------------------------------------------------------------
def _graphs_module():
    try:
        import eekernels.graphs as graphs
    except ImportError:
        return None
    return graphs if hasattr(graphs, "GraphedModel") else None


class _Runner:
    """Calls the eekernels model eagerly, or through a GraphedModel per input shape (CUDA inputs, int depths)."""

    def __init__(self, model: nn.Module, plan: _ExitPlan, graphs):
        if graphs not in (None, True, False):
            raise ValueError(f"accelerate: `graphs` expected None, True or False, got {graphs!r}")
        self._module = _graphs_module() if graphs is not False else None
        if graphs is True and self._module is None:
            raise ValueError("accelerate: `graphs=True` expected eekernels.graphs.GraphedModel; it is not available")
        if graphs is True and plan.cache is not None:
            raise ValueError("accelerate: `graphs=True` expected exit_policy='drop'; the exit cache changes "
                             "between calls, which a captured graph cannot follow")
        self.graphs, self.model, self.plan = graphs, model, plan
        self._graphed = {}

    def __call__(self, x, t, y, depth, **kwargs):
        # Decided per call: the wrapper may be moved to a GPU after accelerate() returned.
        use = self._module is not None and x.is_cuda and not kwargs and not isinstance(depth, torch.Tensor)
        if self.graphs is True and not x.is_cuda:
            raise ValueError(f"accelerate: `graphs=True` expected CUDA inputs, got a tensor on {x.device}")
        if not use:
            return self.model(x, t, y, depth=depth, **kwargs)
        key = (tuple(x.shape), x.dtype, x.device, y is None)
        g = self._graphed.get(key)
        if g is None:
            depths = self.plan.depths if self.plan.schedule is not None else [None]
            g = self._graphed[key] = self._module.GraphedModel(self.model, x.shape[0], depths,
                                                               sample_shape=tuple(x.shape[1:]))
        return g(x, t, y, depth=depth)


# --------------------------------------------------------------------------------------------------
# Weight sharing
# --------------------------------------------------------------------------------------------------
def _share_weights(model: nn.Module, source: dict) -> int:
    """Point ``model``'s tensors at ``source``'s where the names match and the values are equal.

    ``source`` is the original's state dict in the eekernels naming (tensors that alias the original's
    parameters). Equality is checked so that a tensor the conversion transformed is never aliased. Returns
    the number of tensors now shared.
    """
    own = model.state_dict()
    shared = {}
    for k, v in source.items():
        mine = own.get(k)
        if (mine is not None and v.shape == mine.shape and v.dtype == mine.dtype and v.device == mine.device
                and torch.equal(v, mine)):
            shared[k] = v.detach()
    # assign=True keeps the given tensors (wrapped as Parameters where the model has Parameters).
    model.load_state_dict(shared, strict=False, assign=True)
    return len(shared)


def _like(model: nn.Module, ref: torch.Tensor) -> nn.Module:
    return model.to(device=ref.device, dtype=ref.dtype).eval()


def _first_tensor(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _num_heads(block: nn.Module) -> int | None:
    attn = getattr(block, "attn", None)  # timm's Attention says num_heads; hand-written ones often heads
    return getattr(attn, "num_heads", None) or getattr(attn, "heads", None)


def _from_reference(module: nn.Module, kind: str) -> nn.Module:
    """facebookresearch DiT (``kind="dit"``) or baofff U-ViT (``"uvit"``): load its state dict, share its weights."""
    from eekernels.models.dit import DiT
    from eekernels.models.uvit import UViT

    cls, first_block = (DiT, module.blocks[0]) if kind == "dit" else (UViT, module.in_blocks[0])
    state = dict(module.state_dict())
    model = _like(cls.from_checkpoint(state, num_heads=_num_heads(first_block)), _first_tensor(module))
    _share_weights(model, state)
    return model


def _from_diffusers_dit(module: nn.Module) -> nn.Module:
    from eekernels.models import convert
    from eekernels.models.dit import DiT

    model = _like(DiT.from_diffusers(module), _first_tensor(module))
    fb = convert.diffusers_dit_to_facebook("accelerate", dict(module.state_dict()))
    fb["pos_embed"] = module.pos_embed.pos_embed.detach().reshape(1, -1, module.pos_embed.pos_embed.shape[-1])
    _share_weights(model, fb)
    return model


def _from_diffusers_unet(module: nn.Module) -> nn.Module:
    from eekernels.models import convert
    from eekernels.models.unet import UNet

    model = _like(UNet.from_diffusers(module), _first_tensor(module))
    _share_weights(model, convert.diffusers_unet_to_ours(model, dict(module.state_dict())))
    return model


# --------------------------------------------------------------------------------------------------
# What comes back: an early-exit model with the caller's call convention
# --------------------------------------------------------------------------------------------------
class _Accelerated(nn.Module):
    """An eekernels model, its exit plan and its runner."""

    def __init__(self, model: nn.Module, schedule=None, exit_policy: str = "drop", graphs=None):
        super().__init__()
        self.model = model
        self.exit_plan = _ExitPlan(schedule, exit_policy, model)
        self._runner = _Runner(model, self.exit_plan, graphs)

    @property
    def schedule(self):
        return self.exit_plan.schedule

    def start_trajectory(self) -> None:
        """Call before each sampling run in your own loop when using ``exit_policy="cache"`` or a step-indexed
        schedule (``ExitSchedule.periodic``); accelerated pipelines do it themselves."""
        self.exit_plan.start_trajectory()

    @property
    def dtype(self) -> torch.dtype:
        return _first_tensor(self.model).dtype

    @property
    def device(self) -> torch.device:
        return _first_tensor(self.model).device

    def _call(self, x, t, y, depth=None):
        """x: (B, C, H, W); t: scalar or (B,); y: (B,) labels or None. depth: None uses the schedule."""
        B = x.shape[0]
        if depth is None:
            kwargs = self.exit_plan.kwargs(t, B)
        else:
            kwargs = {"depth": depth}
        if isinstance(t, numbers.Number) or t.device != x.device or t.numel() == 1:
            t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        if isinstance(kwargs["depth"], torch.Tensor):
            kwargs["depth"] = kwargs["depth"].to(x.device)
        return self._runner(x, t, y, **kwargs)


class EarlyExitModel(_Accelerated):
    """facebookresearch/DiT's call convention over an eekernels model with an exit schedule."""

    def __init__(self, model: nn.Module, schedule=None, exit_policy: str = "drop", graphs=None):
        super().__init__(model, schedule, exit_policy, graphs)
        for name in ("in_channels", "out_channels", "learn_sigma", "num_classes", "null_class", "input_size",
                     "patch_size", "num_blocks"):
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))

    def forward(self, x, t, y=None, depth=None):
        """x: (B, C, H, W); t: (B,) timesteps (or a scalar); y: (B,) labels (None: unconditional / null).
        depth: None takes ``schedule.depth(t)``; an int or (B,) LongTensor overrides it. -> (B, C_out, H, W)."""
        return self._call(x, t, y, depth)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """facebookresearch/DiT's classifier-free guidance over a [cond; uncond] batch (2B, C, H, W)."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        # As the original: guidance on the first 3 channels only ("for exact reproducibility").
        eps, rest = out[:, :3], out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class _DiffusersDenoiser(_Accelerated):
    """Shared part of the diffusers stand-ins: the original's config, dtype, device, output class."""

    def __init__(self, model, original, output_cls, schedule=None, exit_policy="drop", graphs=None):
        super().__init__(model, schedule, exit_policy, graphs)
        self.config = original.config  # the original's (frozen) config: pipelines read sample_size, channels
        self._output_cls = output_cls

    def _wrap(self, out, return_dict):
        return self._output_cls(sample=out) if return_dict else (out,)


class DiffusersTransformer(_DiffusersDenoiser):
    """Stands in for diffusers' ``DiTTransformer2DModel``: same forward, ``.sample`` output, eekernels DiT inside."""

    def forward(self, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None,
                return_dict=True):
        """hidden_states: (B, C, H, W) latents; timestep: (B,) or scalar; class_labels: (B,)."""
        if cross_attention_kwargs:
            raise ValueError(f"DiffusersTransformer: `cross_attention_kwargs` expected None (eekernels' "
                             f"attention takes no processor arguments), got keys {sorted(cross_attention_kwargs)}")
        if timestep is None:
            raise ValueError("DiffusersTransformer: `timestep` expected a tensor of shape (B,) or a number, got None")
        return self._wrap(self._call(hidden_states, timestep, class_labels), return_dict)


class DiffusersUNet(_DiffusersDenoiser):
    """Stands in for diffusers' ``UNet2DModel``: same forward, ``.sample`` output, eekernels UNet inside."""

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        """sample: (B, C, H, W); timestep: a number, a scalar tensor or (B,); class_labels: (B,) or None."""
        if isinstance(timestep, numbers.Number):
            # diffusers' UNet2DModel turns a Python timestep into an integer tensor; so do we (same function).
            timestep = torch.tensor([timestep], dtype=torch.long)
        return self._wrap(self._call(sample, timestep, class_labels), return_dict)


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------
_PIPELINES = {"DiTPipeline": "transformer", "DDPMPipeline": "unet", "DDIMPipeline": "unet"}


def _pipeline_denoiser_name(obj) -> str | None:
    for cls in type(obj).__mro__:
        if cls.__name__ in _PIPELINES and cls.__module__.startswith("diffusers"):
            return _PIPELINES[cls.__name__]
    return None


def _accelerate_pipeline(pipe, name: str, schedule, exit_policy, graphs):
    denoiser = accelerate(getattr(pipe, name), schedule=schedule, exit_policy=exit_policy, graphs=graphs)
    new = copy.copy(pipe)  # shallow: VAE, scheduler, labels and settings are the original's objects
    setattr(new, name, denoiser)  # DiffusionPipeline.__setattr__ re-registers the component on the copy only
    plan = denoiser.exit_plan
    loop_bar = new.progress_bar  # the class's bound method

    def progress_bar(iterable=None, total=None):
        bar = loop_bar(iterable=iterable, total=total)
        return bar if iterable is None else _track_host_timesteps(bar, plan)

    # The three pipelines loop `for t in self.progress_bar(self.scheduler.timesteps)` and call the
    # denoiser with that t; recording it lets the denoiser pick the depth on the host.
    new.progress_bar = progress_bar
    return new


def _track_host_timesteps(bar, plan: _ExitPlan):
    plan.start_trajectory()
    try:
        for t in bar:
            on_host = isinstance(t, numbers.Number) or (isinstance(t, torch.Tensor) and t.device.type == "cpu")
            plan.host_t = t if on_host else None
            yield t
    finally:
        plan.host_t = None


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------
def _is_facebook_dit(obj) -> bool:
    return (isinstance(obj, nn.Module) and all(hasattr(obj, a) for a in ("x_embedder", "t_embedder", "blocks",
                                                                          "final_layer"))
            and hasattr(obj.blocks[0], "adaLN_modulation") and hasattr(obj.final_layer, "adaLN_modulation"))


def _is_baofff_uvit(obj) -> bool:
    return isinstance(obj, nn.Module) and all(hasattr(obj, a) for a in ("patch_embed", "in_blocks", "mid_block",
                                                                         "out_blocks", "decoder_pred"))


def _diffusers_class(obj, name: str) -> bool:
    return any(c.__name__ == name and c.__module__.startswith("diffusers") for c in type(obj).__mro__)


def _is_eekernels_model(obj) -> bool:
    return (isinstance(obj, nn.Module) and type(obj).__module__.startswith("eekernels.models")
            and hasattr(obj, "num_blocks"))


def accelerate(obj, schedule=None, exit_policy: str = "drop", graphs=None):
    """Run ``obj`` on eekernels models (fused kernels, early exit, CUDA graphs), keeping its own API.

    obj: a facebookresearch DiT or baofff U-ViT module, an eekernels model, a diffusers ``DiTTransformer2DModel`` or
    ``UNet2DModel``, or a diffusers ``DiTPipeline`` / ``DDPMPipeline`` / ``DDIMPipeline``.
    schedule: an ``eekernels.ExitSchedule`` (None: full depth, the original's function); each call runs
    ``schedule.depth(t)`` blocks. exit_policy: ``"drop"`` (ASE: skipped blocks contribute nothing) or
    ``"cache"`` (reuse what they added at the last full-depth call). graphs: None | True | False.

    Returns the same kind of object (see the module docstring); a pipeline comes back as a new pipeline
    object, the one passed in is not modified. Raises ``TypeError`` for anything else.
    """
    name = _pipeline_denoiser_name(obj)
    if isinstance(obj, _Accelerated) or (name is not None and isinstance(getattr(obj, name, None), _Accelerated)):
        raise TypeError("accelerate: this object is already accelerated; pass the original to change the schedule")
    if name is not None:
        return _accelerate_pipeline(obj, name, schedule, exit_policy, graphs)
    if _diffusers_class(obj, "DiTTransformer2DModel"):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return DiffusersTransformer(_from_diffusers_dit(obj), obj, Transformer2DModelOutput, schedule,
                                    exit_policy, graphs)
    if _diffusers_class(obj, "UNet2DModel"):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return DiffusersUNet(_from_diffusers_unet(obj), obj, UNet2DOutput, schedule, exit_policy, graphs)
    if _is_eekernels_model(obj):
        return EarlyExitModel(obj, schedule, exit_policy, graphs)
    if _is_facebook_dit(obj):
        return EarlyExitModel(_from_reference(obj, "dit"), schedule, exit_policy, graphs)
    if _is_baofff_uvit(obj):
        if hasattr(obj, "context_embed"):  # baofff libs/uvit_t2i.py: CLIP-token context, no label_emb
            raise TypeError("accelerate: text-conditioned U-ViT (uvit_t2i, with `context_embed` taking CLIP "
                            "tokens) is not supported; supported U-ViTs are baofff libs/uvit.py's class-"
                            f"conditional and unconditional models. Supported: {SUPPORTED}")
        return EarlyExitModel(_from_reference(obj, "uvit"), schedule, exit_policy, graphs)
    raise TypeError(f"accelerate: unsupported object of type {type(obj).__module__}.{type(obj).__qualname__}; "
                    f"supported: {SUPPORTED}")
