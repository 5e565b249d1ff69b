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
| diffusers ``PixArtTransformer2DModel`` / ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` | a :class:`DiffusersPixArt` / :class:`DiffusersSD3` / :class:`DiffusersFlux`: the same forward (FLUX: on the packed latents), ``.sample`` output |
| diffusers ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline`` / ``StableDiffusion3Pipeline`` / ``FluxPipeline`` | a NEW pipeline object, as above: same ``__call__`` (prompts or ``prompt_embeds``/``pooled_prompt_embeds`` and the negative ones, any scheduler the pipeline takes) |

What a native pipeline or stand-in writes, and what it refuses:
- ``save_pretrained`` writes the diffusers layout: the native model converted back by eekernels' converters
  (``to_diffusers()``: a new module of the original's class and config); ``model_index.json`` names the diffusers
  class the stand-in stands for, so ``DiffusionPipeline.from_pretrained`` loads a plain diffusers pipeline.
- Every other public attribute of the original's diffusers class (LoRA and peft adapters, attention processors
  and backends, QKV fusion, layerwise casting, group offloading, gradient checkpointing, diffusers' caches, ...)
  raises :class:`NativeTierError` (a ``NotImplementedError``) naming it and the in-place tier; so do the
  pipeline's LoRA / IP-adapter loader methods, ``enable_xformers_memory_efficient_attention`` and
  ``enable_group_offload``, before any work. Anything else missing is a plain ``AttributeError`` (``hasattr``
  probes work).
- ``pipe.to(dtype or device)`` converts the stand-in and the shared components (the caller's VAE, text
  encoders); the caller's original denoiser is not part of the native pipeline and is not modified.

Text pipelines: what the stand-ins pass on and what they refuse.
- PixArt: the caption mask (``encoder_attention_mask``, 1 = token) and PixArt-α 1024's ``added_cond_kwargs``
  (``resolution``, ``aspect_ratio``) go to the model as ``TextCondition.mask`` / ``extra``.
- SD3: ``pooled_projections`` becomes ``TextCondition.pooled``. ``skip_layers`` (the pipeline's
  ``skip_guidance_layers``) and ControlNet residuals raise ValueError.
- FLUX: timestep and guidance are sigma-scaled as diffusers' transformer takes them; the stand-in multiplies t
  by 1000 (eekernels' unit) and passes FLUX-dev's guidance as ``TextCondition.extra["guidance"]``. The packed
  (B, HW/4, 64) latents are unpacked to (B, 16, H, W) with the grid FluxPipeline's ``prepare_latents`` was
  asked for (or, called directly, read from ``img_ids``: one small device read per call on a GPU), and the
  output is packed back. IP-adapter, LoRA scale (``joint_attention_kwargs``) and ControlNet raise ValueError.
- Classifier-free guidance: PixArt and SD3 run one [uncond; cond] batch, FLUX's true CFG two calls; either way
  every call of a step gets the same depth.

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
- the text pipelines loop ``with self.progress_bar(total=...)`` over ``scheduler.timesteps``: the accelerated
  copy's bar copies those timesteps to the host once per call and each model call finds its own there (by the
  scheduler's ``step_index``, or for first-order schedulers without one, as DDIM, by the step count);
- any other device timestep goes to the model as a per-sample depth tensor (one host sync in the model per
  call). Pass CPU timesteps, or use ``eekernels.samplers.sample``, to avoid it.

``exit_policy="cache"`` (training-free, DeepCache-style) records at each full-depth call what the skipped
part adds and reuses it at truncated calls; use a schedule that runs full depth first and periodically,
typically the step-indexed ``ExitSchedule.periodic(k, depth, total_depth)`` (full depth at calls 0, k, 2k,
... of a run). Accelerated pipelines start a new run (call count 0, cache cleared) at each pipeline call;
in your own loop call ``model.start_trajectory()`` before each run.

``graphs``: None captures CUDA graphs per depth when the model is on a GPU and ``eekernels.graphs`` is
available; True requires that; False never captures. Text models capture one graph per (depth, input shapes,
condition signature) into ``eekernels.graphs.default_cache()``, with their own static copies of x, t and every
tensor of the condition.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import numbers
import types
import weakref

import torch
import torch.nn as nn

from eekernels import graphs as _graphs
from eekernels.models.cache import ExitCache, ForecastCache
from eekernels.models.condition import TextCondition
from eekernels.samplers.sampling import EXIT_POLICIES, check_forecast_target



# --------------------------------------------------------------------------------------------------
# Exit plan: schedule -> depth per call, on the host when the timestep is on the host
# --------------------------------------------------------------------------------------------------
class _ExitPlan:
    """Maps a call's timestep to the depth the model runs, and owns the exit cache."""

    def __init__(self, schedule, exit_policy: str, model: nn.Module, forecast_order: int = 1,
                 forecast_target: str = "residual"):
        from eekernels.schedules import ExitSchedule

        if exit_policy not in EXIT_POLICIES:
            raise ValueError(f"accelerate: `exit_policy` expected one of {EXIT_POLICIES}, got {exit_policy!r}")
        if exit_policy in ("cache", "forecast") and schedule is None:
            raise ValueError(f"accelerate: `exit_policy={exit_policy!r}` expected a schedule (which calls run "
                             "truncated), got schedule=None")
        if isinstance(forecast_order, bool) or forecast_order not in (1, 2):
            raise ValueError(f"accelerate: `forecast_order` expected 1 or 2, got {forecast_order!r}")
        check_forecast_target(forecast_target, model, exit_policy, "accelerate: `forecast_target`")
        if schedule is not None and not isinstance(schedule, ExitSchedule):
            raise ValueError(f"accelerate: `schedule` expected an eekernels.ExitSchedule or None, "
                             f"got {type(schedule).__name__}")
        self.schedule, self.policy, self.full_depth = schedule, exit_policy, int(model.num_blocks)
        self.host_t = None  # this step's timestep on the host, set by an accelerated pipeline's loop
        self.timeline = None  # a text pipeline's host copy of its scheduler's timesteps, during its loop
        self.calls = 0  # model calls since the trajectory started (step-indexed schedules)
        self._memo: dict[float, int] = {}
        self.cache = None
        self.depths = [self.full_depth]
        if schedule is not None:
            schedule.validate_for(model, exit_policy)
            schedule.check_one_policy(exit_policy, "accelerate")  # a joint plan's per-call policies: sample() runs them
            self.depths = sorted(schedule.levels)
            trunc = [d for d in self.depths if d < self.full_depth]
            if exit_policy == "cache":
                self.cache = ExitCache(trunc)
            elif exit_policy == "forecast":
                self.cache = ForecastCache(trunc, order=forecast_order, target=forecast_target)

    def start_trajectory(self) -> None:
        """A new sampling run: restart the call count; the exit cache starts a new trajectory in its buffers (CUDA
        graphs captured on them stay valid)."""
        self.calls = 0
        if self.cache is not None:
            self.cache.restart()

    def _host_t(self, t) -> float:
        """This call's timestep on the host (a forecast's weights need it; reuse ignores it)."""
        if isinstance(t, numbers.Number):
            return float(t)
        if t.device.type == "cpu":
            return float(t.reshape(-1)[0])
        if self.host_t is not None:
            return float(self.host_t)
        if self.policy == "forecast":
            raise ValueError("accelerate: exit_policy='forecast' needs each call's timestep on the host (a number or "
                             "a CPU tensor, or the accelerated pipeline's loop)")
        return 0.0

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
            d = out["depth"]
            if isinstance(d, torch.Tensor):
                raise ValueError("accelerate: exit_policy 'cache' / 'forecast' runs one depth per call; this call's "
                                 "timesteps give several (pass host timesteps, or run it inside a pipeline)")
            self.cache.begin_call(self._host_t(t), d is None or d >= self.full_depth)
            out["exit_cache"] = self.cache
        return out


# --------------------------------------------------------------------------------------------------
# Graphs: one CUDA graph per (depth, batch shape) through eekernels.graphs
# --------------------------------------------------------------------------------------------------
class _Runner:
    """Calls the eekernels model eagerly, or through a GraphedModel per input shape (CUDA inputs, int depths)."""

    def __init__(self, model: nn.Module, plan: _ExitPlan, graphs):
        if graphs not in (None, True, False):
            raise ValueError(f"accelerate: `graphs` expected None, True or False, got {graphs!r}")
        self._module = _graphs if graphs is not False else None
        if graphs is True and plan.cache is not None:
            raise ValueError("accelerate: `graphs=True` expected exit_policy='drop'; the exit cache changes "
                             "between calls, which a captured graph cannot follow")
        self.graphs, self.model, self.plan = graphs, model, plan
        self._graphed = {}
        self._text_graphs = None
        #: The eekernels.graphs.GraphCache text models capture into (None: the process-wide default_cache()).
        self.graph_cache = None

    def __call__(self, x, t, y, depth, **kwargs):
        if isinstance(y, TextCondition):
            return self._call_text(x, t, y, depth, **kwargs)
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

    def _call_text(self, x, t, y, depth, **kwargs):
        """A text-conditioned model: one graph per (input shapes, condition signature, depth) in the graph cache."""
        cache = self.graph_cache
        if cache is None and self._module is not None:
            cache = self._module.default_cache()
        supported = cache is not None and cache.supports(x.device)
        if self.graphs is True and not supported:
            raise ValueError(f"accelerate: `graphs=True` expected CUDA inputs, got a tensor on {x.device}")
        if not supported or kwargs or isinstance(depth, torch.Tensor):
            return self.model(x, t, y, depth=depth, **kwargs)
        if self._text_graphs is None or self._text_graphs.cache is not cache:
            self._text_graphs = _TextGraphs(self.model, cache)
        return self._text_graphs(x, t, y, depth)


class _StaticText:
    """Static inputs of captured text-model graphs: x, t and every tensor of the TextCondition (own copies)."""

    def __init__(self, x, t, y: TextCondition):
        own = lambda v: v.detach().clone(memory_format=torch.contiguous_format)  # noqa: E731
        self.x, self.t, self.y = own(x), own(t), y.map(own)
        self.out: dict = {}

    def load(self, x, t, y: TextCondition) -> None:
        self.x.copy_(x)
        self.t.copy_(t)
        given = y.tensors()
        for name, buf in self.y.tensors().items():
            buf.copy_(given[name])


class _TextGraphs:
    """CUDA graphs of a text model (GraphedModel takes class labels only): static inputs per shape signature."""

    _tokens = itertools.count()

    def __init__(self, model: nn.Module, cache):
        self.model, self.cache = model, cache
        self._statics: dict = {}
        self._token = ("accelerate-text", next(self._tokens))
        weakref.finalize(self, cache.evict_owner, self._token)

    def __call__(self, x, t, y: TextCondition, depth):
        sig = (tuple(x.shape), x.dtype, x.device, tuple(t.shape), t.dtype, y.signature())
        static = self._statics.get(sig)
        if static is None:
            static = self._statics[sig] = _StaticText(x, t, y)
        else:
            static.load(x, t, y)
        key = (self._token, sig, depth)
        graph = self.cache.get(key)
        if graph is None:
            ref, model = weakref.ref(static), self.model

            def run():
                s = ref()
                with torch.no_grad():
                    s.out[depth] = model(s.x, s.t, s.y, depth=depth)

            graph = self.cache.capture(key, run, device=x.device, owner_key=self._token, owner=None,
                                       what=f"{type(self.model).__name__} at depth {depth}")
            if graph is None:  # the capture failed (warned once): eager from now on
                return self.model(x, t, y, depth=depth)
            static.load(x, t, y)  # the warm-up ran on these inputs; reload in case the model wrote to them
        graph.replay()
        return static.out[depth].clone()


# --------------------------------------------------------------------------------------------------
# What the native tier cannot do: named errors
# --------------------------------------------------------------------------------------------------
class NativeTierError(NotImplementedError, ValueError):
    """A diffusers API that the native tier (``accelerate(..., native=True)``: eekernels' fused model stands in for
    the diffusers one) does not have, and the in-place tier (the default, which keeps the diffusers model) does.
    Both a ``NotImplementedError`` and a ``ValueError`` (eekernels' named refusals), as ``io.UnsupportedOperation``
    is both an ``OSError`` and a ``ValueError``."""


IN_PLACE_HINT = "use the in-place tier: accelerate(pipe) without native=True, which keeps the diffusers model"

_LORA = "load or manage LoRA adapters (peft wraps diffusers' layers; the native model's layers are fused)"
_ATTENTION = ("change the attention (eekernels' fused attention takes no diffusers attention processor, backend, "
              "xformers/NPU/XLA kernel or chunking)")
#: Why the native tier refuses a diffusers model or pipeline API, by name; any other public attribute of the
#: original's class is refused as "does not implement it".
_CANNOT = {
    **dict.fromkeys(("load_lora_adapter", "save_lora_adapter", "add_adapter", "set_adapter", "set_adapters",
                     "active_adapters", "enable_adapters", "disable_adapters", "delete_adapters", "fuse_lora",
                     "unfuse_lora", "unload_lora", "enable_lora", "disable_lora", "enable_lora_hotswap",
                     "load_lora_weights", "unload_lora_weights", "set_lora_device"), _LORA),
    **dict.fromkeys(("load_ip_adapter", "unload_ip_adapter"),
                    "load IP-adapters (they replace diffusers' attention processors)"),
    **dict.fromkeys(("set_attn_processor", "attn_processors", "set_default_attn_processor", "set_attention_backend",
                     "reset_attention_backend", "enable_xformers_memory_efficient_attention",
                     "disable_xformers_memory_efficient_attention", "set_use_memory_efficient_attention_xformers",
                     "enable_npu_flash_attention", "disable_npu_flash_attention", "set_use_npu_flash_attention",
                     "enable_xla_flash_attention", "disable_xla_flash_attention", "set_use_xla_flash_attention",
                     "enable_forward_chunking", "disable_forward_chunking"), _ATTENTION),
    **dict.fromkeys(("fuse_qkv_projections", "unfuse_qkv_projections"),
                    "fuse or unfuse diffusers' QKV projections (its attention already runs one fused QKV matrix)"),
    "enable_layerwise_casting": ("store weights in one dtype and compute in another (diffusers' layerwise casting "
                                 "hooks diffusers' layers; the fused kernels run in the weights' dtype)"),
    "enable_group_offload": "offload groups of diffusers' layers (group offloading hooks diffusers' blocks)",
    **dict.fromkeys(("enable_gradient_checkpointing", "disable_gradient_checkpointing", "is_gradient_checkpointing"),
                    "switch diffusers' gradient checkpointing (fine-tune the native model with eekernels' trainer)"),
    **dict.fromkeys(("enable_cache", "disable_cache", "is_cache_enabled"),
                    "apply diffusers' caches (FirstBlockCache, FasterCache, ...; its own is exit_policy='cache')"),
    **dict.fromkeys(("from_pretrained", "from_single_file", "from_config"),
                    "load weights (load the diffusers model, then accelerate it)"),
}


def native_tier_error(where: str, name: str, cls_name: str = "the diffusers model") -> NativeTierError:
    """The named error for ``name`` (a diffusers API) called as ``where`` on the native tier."""
    what = _CANNOT.get(name, f"do what {cls_name}.{name} does (the native stand-in does not implement it)")
    return NativeTierError(f"{where}: the native tier (accelerate(..., native=True)) cannot {what}; {IN_PLACE_HINT}")


class _Refused:
    """A pipeline method the native tier refuses (set on the native pipeline object in place of the class's)."""

    def __init__(self, where: str, name: str):
        self.where, self.name = where, name

    def __call__(self, *args, **kwargs):
        raise native_tier_error(self.where, self.name)


# --------------------------------------------------------------------------------------------------
# What comes back: an early-exit model with the caller's call convention
# --------------------------------------------------------------------------------------------------
class _Accelerated(nn.Module):
    """An eekernels model, its exit plan and its runner."""

    def __init__(self, model: nn.Module, schedule=None, exit_policy: str = "drop", graphs=None, forecast_order=1,
                 forecast_target="residual"):
        super().__init__()
        self.model = model
        self.exit_plan = _ExitPlan(schedule, exit_policy, model, forecast_order, forecast_target)
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
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _call(self, x, t, y, depth=None, host_t=None):
        """x: (B, C, H, W); t: scalar or (B,); y: (B,) labels, a TextCondition or None. depth: None uses the
        schedule, at ``host_t`` (this call's timestep as a Python number) when given, else at t."""
        B = x.shape[0]
        if depth is None:
            kwargs = self.exit_plan.kwargs(t if host_t is None else host_t, B)
        else:
            kwargs = {"depth": depth}
        if isinstance(t, numbers.Number) or t.device != x.device or t.numel() == 1:
            t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        if isinstance(kwargs["depth"], torch.Tensor):
            kwargs["depth"] = kwargs["depth"].to(x.device)
        return self._runner(x, t, y, **kwargs)


class EarlyExitModel(_Accelerated):
    """facebookresearch/DiT's call convention over an eekernels model with an exit schedule.

    It declares what the wrapped model declares (``DECLARED``: shapes, classes, depths, ``prediction``, the text
    condition's widths, and ``null_condition`` where the model has one), so that ``eekernels.sample`` checks a
    wrapped model as it checks the model itself (e.g. refuses an epsilon solver for a flow model)."""

    #: the attributes samplers and the trainer read off a model, copied from the wrapped one where it has them
    DECLARED = ("in_channels", "out_channels", "learn_sigma", "num_classes", "null_class", "input_size", "patch_size",
                "num_blocks", "min_depth", "prediction", "condition", "token_dim", "pooled_dim", "condition_extras",
                "accepts_mask", "fixed_size", "input_multiple", "null_condition")

    def __init__(self, model: nn.Module, schedule=None, exit_policy: str = "drop", graphs=None, forecast_order=1,
                 forecast_target="residual"):
        super().__init__(model, schedule, exit_policy, graphs, forecast_order, forecast_target)
        for name in self.DECLARED:
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
    """Shared part of the diffusers stand-ins: the original's config, dtype, device, output class; its weights back
    in the diffusers layout (``to_diffusers``, ``save_pretrained``); and a :class:`NativeTierError` for every other
    public attribute of the original's diffusers class (LoRA, attention processors, caches, ...)."""

    #: "module:Class" of the diffusers output this stand-in returns (``.sample``)
    output = "diffusers.models.modeling_outputs:Transformer2DModelOutput"

    def __init__(self, model, original, schedule=None, exit_policy="drop", graphs=None, forecast_order=1,
                 forecast_target="residual"):
        import importlib

        super().__init__(model, schedule, exit_policy, graphs, forecast_order, forecast_target)
        self.config = original.config  # the original's (frozen) config: pipelines read sample_size, channels
        self._diffusers_class = type(original)
        module, _, name = self.output.partition(":")
        self._output_cls = getattr(importlib.import_module(module), name)

    def _wrap(self, out, return_dict):
        return self._output_cls(sample=out) if return_dict else (out,)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules
        except AttributeError:
            cls = self.__dict__.get("_diffusers_class")
            if cls is not None and not name.startswith("_") and hasattr(cls, name):
                raise native_tier_error(f"{type(self).__name__}.{name}", name, cls.__name__) from None
            raise

    # ---------------------------------------------------------------- the diffusers layout
    def _diffusers_state(self) -> dict:
        """The native model's weights in the keys of the original diffusers class (the family's converter)."""
        raise NotImplementedError

    def to_diffusers(self):
        """The diffusers model this stands in for, with the native model's current weights (converted back by
        eekernels' converters): a new module of the original's class and config, on this model's device and
        dtype, in eval mode. Nothing is shared with the native model."""
        m = self._diffusers_class.from_config(self.config)
        m.load_state_dict(self._diffusers_state(), strict=True)
        m = m.to(self.device)
        return (m if self.dtype == torch.float32 else m.to(self.dtype)).eval()  # diffusers warns on any dtype cast

    def save_pretrained(self, save_directory, **kwargs):
        """Writes the diffusers model this stands in for (``to_diffusers()``): ``<Class>.from_pretrained`` loads it.
        ``kwargs`` go to diffusers' ``ModelMixin.save_pretrained``."""
        self.to_diffusers().save_pretrained(save_directory, **kwargs)


class DiffusersTransformer(_DiffusersDenoiser):
    """Stands in for diffusers' ``DiTTransformer2DModel``: same forward, ``.sample`` output, eekernels DiT inside."""

    def _diffusers_state(self) -> dict:
        return self.model.diffusers_state_dict()

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

    output = "diffusers.models.unets.unet_2d:UNet2DOutput"

    def _diffusers_state(self) -> dict:
        from eekernels.models import convert

        return convert.ours_to_diffusers_unet(self.model, self.model.state_dict())

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        """sample: (B, C, H, W); timestep: a number, a scalar tensor or (B,); class_labels: (B,) or None."""
        if isinstance(timestep, numbers.Number):
            # diffusers' UNet2DModel turns a Python timestep into an integer tensor; so do we (same function).
            timestep = torch.tensor([timestep], dtype=torch.long)
        return self._wrap(self._call(sample, timestep, class_labels), return_dict)


# --------------------------------------------------------------------------------------------------
# Text-to-image transformers: PixArt-α/Σ, SD3, FLUX.1
# --------------------------------------------------------------------------------------------------
def _refuse(where: str, name: str, value, what: str) -> None:
    if value is not None and not (isinstance(value, dict) and not value):
        got = f"keys {sorted(value)}" if isinstance(value, dict) else type(value).__name__
        raise ValueError(f"{where}: `{name}` expected None ({what}), got {got}")


def _text_tokens(where: str, tokens) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"{where}: `encoder_hidden_states` expected a (B, L, D) tensor of text-encoder states, "
                         f"got {type(tokens).__name__}")
    return tokens


class _TextTransformer(_DiffusersDenoiser):
    """Shared part of the text-to-image stand-ins: the pipeline's host timestep, ``cache_context``."""

    def _diffusers_state(self) -> dict:
        return self.model.state_dict_in("diffusers")

    def cache_context(self, name: str, **kwargs):
        """diffusers' CacheMixin hook (FluxPipeline opens it around each call): nothing to do here."""
        return contextlib.nullcontext()

    def _text_call(self, x, t, cond: TextCondition):
        if t is None:
            raise ValueError(f"{type(self).__name__}: `timestep` expected a tensor of shape (B,) or a number, got None")
        timeline = self.exit_plan.timeline
        return self._call(x, t, cond, host_t=None if timeline is None else timeline.current())


class DiffusersPixArt(_TextTransformer):
    """Stands in for diffusers' ``PixArtTransformer2DModel`` (PixArt-α and Σ): same forward, eekernels PixArt inside."""

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, added_cond_kwargs=None,
                cross_attention_kwargs=None, attention_mask=None, encoder_attention_mask=None, return_dict=True):
        """hidden_states: (B, C, H, W) latents; encoder_hidden_states: (B, L, 4096) T5 states; timestep: (B,) in
        [0, 1000); added_cond_kwargs: PixArt-α 1024's ``resolution`` (B, 2) and ``aspect_ratio`` (B, 1);
        encoder_attention_mask: (B, L) 1 (token) / 0 (padding)."""
        where = "DiffusersPixArt"
        _refuse(where, "cross_attention_kwargs", cross_attention_kwargs,
                "eekernels' attention takes no processor arguments")
        _refuse(where, "attention_mask", attention_mask, "PixArt's self-attention is unmasked")
        tokens = _text_tokens(where, encoder_hidden_states)
        mask = encoder_attention_mask
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"{where}: `encoder_attention_mask` expected a (B, L) 1/0 keep mask (what the "
                                 f"PixArt pipelines pass), got {got}")
            if mask.is_floating_point():
                mask = mask != 0
        if added_cond_kwargs is not None and not isinstance(added_cond_kwargs, dict):
            raise ValueError(f"{where}: `added_cond_kwargs` expected a dict or None, got "
                             f"{type(added_cond_kwargs).__name__}")
        extra = {}
        for name, value in (added_cond_kwargs or {}).items():
            if value is None:
                continue
            if name not in self.model.condition_extras:
                raise ValueError(f"{where}: `added_cond_kwargs[{name!r}]` is not taken by this model (it takes "
                                 f"{sorted(self.model.condition_extras)}); pass None")
            extra[name] = value
        cond = TextCondition(tokens, mask, None, extra)
        return self._wrap(self._text_call(hidden_states, timestep, cond), return_dict)


class DiffusersSD3(_TextTransformer):
    """Stands in for diffusers' ``SD3Transformer2DModel`` (SD3 / SD3.5): same forward, eekernels SD3 inside."""

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                block_controlnet_hidden_states=None, joint_attention_kwargs=None, return_dict=True, skip_layers=None):
        """hidden_states: (B, C, H, W); encoder_hidden_states: (B, L, 4096) CLIP+T5 states; pooled_projections:
        (B, 2048); timestep: (B,) t = sigma * 1000. Returns the velocity."""
        where = "DiffusersSD3"
        _refuse(where, "block_controlnet_hidden_states", block_controlnet_hidden_states,
                "ControlNet residuals are not supported")
        _refuse(where, "joint_attention_kwargs", joint_attention_kwargs,
                "eekernels' attention takes no processor or LoRA-scale arguments")
        if skip_layers:
            raise ValueError(f"{where}: `skip_layers` expected None (skip-layer guidance, the pipeline's "
                             f"`skip_guidance_layers`, is not supported), got {skip_layers!r}")
        cond = TextCondition(_text_tokens(where, encoder_hidden_states), None, pooled_projections)
        return self._wrap(self._text_call(hidden_states, timestep, cond), return_dict)


class DiffusersFlux(_TextTransformer):
    """Stands in for diffusers' ``FluxTransformer2DModel`` (FLUX.1 dev / schnell): same forward on the packed
    (B, HW/4, 64) latents, eekernels Flux inside on the (B, 16, H, W) latent."""

    #: (tokens, grid height, grid width) of the packed latents, recorded by an accelerated FluxPipeline's
    #: prepare_latents; otherwise read from ``img_ids`` (one small device read per call when on a GPU).
    grid = None

    def _grid(self, where: str, n: int, img_ids) -> tuple[int, int]:
        if self.grid is not None and self.grid[0] == n:
            return self.grid[1], self.grid[2]
        if not isinstance(img_ids, torch.Tensor) or img_ids.shape[-1] != 3 or img_ids.dim() not in (2, 3):
            got = tuple(img_ids.shape) if isinstance(img_ids, torch.Tensor) else type(img_ids).__name__
            raise ValueError(f"{where}: `img_ids` expected ({n}, 3) positions of the packed latents, got {got}")
        ids = img_ids[0] if img_ids.dim() == 3 else img_ids
        if ids.shape[0] != n:
            raise ValueError(f"{where}: `img_ids` expected {n} rows (one per latent token), got {ids.shape[0]}")
        h, w = (int(v) + 1 for v in ids[-1, 1:].tolist())
        if h * w != n:
            raise ValueError(f"{where}: `img_ids` expected a row-major (h, w) grid of the {n} latent tokens "
                             f"(what FluxPipeline builds), got a last position of ({h - 1}, {w - 1})")
        if ids.device.type == "cpu":  # free to check in full
            r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            want = torch.stack([torch.zeros_like(r), r, c], -1).reshape(n, 3).to(ids.dtype)
            if not torch.equal(ids, want):
                raise ValueError(f"{where}: `img_ids` expected the row-major (0, row, col) grid of an {h} x {w} "
                                 "packed latent (extra image tokens, as in Kontext, are not supported)")
        return h, w

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None, controlnet_block_samples=None,
                controlnet_single_block_samples=None, return_dict=True, controlnet_blocks_repeat=False):
        """hidden_states: (B, HW/4, 64) packed latents; encoder_hidden_states: (B, L, 4096) T5 states;
        pooled_projections: (B, 768) CLIP; timestep: (B,) sigma in [0, 1] (multiplied by 1000, as diffusers
        does); img_ids: (HW/4, 3) positions; txt_ids: (L, 3) zeros; guidance: (B,) FLUX-dev's guidance scale."""
        where = "DiffusersFlux"
        _refuse(where, "joint_attention_kwargs", joint_attention_kwargs,
                "eekernels' attention takes no processor, IP-adapter or LoRA-scale arguments")
        _refuse(where, "controlnet_block_samples", controlnet_block_samples, "ControlNet is not supported")
        _refuse(where, "controlnet_single_block_samples", controlnet_single_block_samples,
                "ControlNet is not supported")
        x = hidden_states
        C4 = self.config.in_channels
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != C4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{where}: `hidden_states` expected packed latents (B, HW/4, {C4}), got {got}")
        if timestep is None:
            raise ValueError(f"{where}: `timestep` expected a (B,) tensor of sigmas, got None")
        if isinstance(txt_ids, torch.Tensor) and txt_ids.device.type == "cpu" and bool(txt_ids.any()):
            raise ValueError(f"{where}: `txt_ids` expected zeros (FluxPipeline's text positions), got nonzero ids")
        B, N, _ = x.shape
        h, w = self._grid(where, N, img_ids)
        C = C4 // 4
        latent = x.view(B, h, w, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, 2 * h, 2 * w)
        t = torch.as_tensor(timestep, device=x.device)
        t = t.to(x.dtype) * 1000  # as FluxTransformer2DModel: t = sigma * 1000
        extra = {}
        if guidance is not None:
            g = torch.as_tensor(guidance, device=x.device).to(x.dtype)
            extra["guidance"] = g.reshape(-1).expand(B) if g.numel() == 1 else g
        cond = TextCondition(_text_tokens(where, encoder_hidden_states), None, pooled_projections, extra)
        out = self._text_call(latent, t, cond)
        Co = out.shape[1]
        packed = out.view(B, Co, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, Co * 4)
        return self._wrap(packed, return_dict)


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------
#: Pipeline methods that would reach the denoiser with an API the stand-in lacks (diffusers' LoRA and IP-adapter
#: loaders skip a denoiser that is not a ModelMixin silently or fail inside it; xformers attention and group
#: offloading walk the components in order, changing the others first): on a native pipeline they raise
#: NativeTierError up front, before any work.
_REFUSED_PIPELINE_METHODS = ("load_lora_weights", "unload_lora_weights", "fuse_lora", "unfuse_lora", "set_adapters",
                             "enable_lora", "disable_lora", "delete_adapters", "set_lora_device", "enable_lora_hotswap",
                             "load_ip_adapter", "unload_ip_adapter", "enable_xformers_memory_efficient_attention",
                             "enable_group_offload")


def _accelerate_pipeline(pipe, name: str, schedule, exit_policy, graphs, forecast_order=1,
                         forecast_target="residual"):
    from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple

    original = getattr(pipe, name)
    denoiser = _accelerate_native(original, schedule, exit_policy, graphs, forecast_order, forecast_target)
    new = copy.copy(pipe)  # shallow: VAE, scheduler, text encoders and settings are the original's objects
    setattr(new, name, denoiser)  # DiffusionPipeline.__setattr__ re-registers the component on the copy only
    # model_index.json names the diffusers class the stand-in stands for (what save_pretrained writes back)
    new.register_to_config(**{name: _fetch_class_library_tuple(original)})
    new._eekernels_native = name
    # Instance methods bound to the copy (a deepcopy of the pipeline rebinds them to the new copy):
    # - the loop's progress bar gives the model each step's host timestep. DiT/DDPM/DDIM loop
    #   `for t in self.progress_bar(self.scheduler.timesteps)`: each t is recorded. The text pipelines open
    #   `with self.progress_bar(total=...)` after setting the scheduler's timesteps, then loop over them: the bar
    #   copies them to the host once and each call finds its step's timestep there;
    # - save_pretrained writes the diffusers layout.
    new.progress_bar = types.MethodType(_native_progress_bar, new)
    new.save_pretrained = types.MethodType(_save_native_pipeline, new)
    if isinstance(denoiser, DiffusersFlux):
        new.prepare_latents = types.MethodType(_flux_prepare_latents, new)
    for method in _REFUSED_PIPELINE_METHODS:
        if hasattr(type(new), method):
            setattr(new, method, _Refused(f"{type(new).__name__}.{method}", method))
    return new


def _native_progress_bar(self, iterable=None, total=None):
    plan = getattr(self, self._eekernels_native).exit_plan
    bar = type(self).progress_bar(self, iterable=iterable, total=total)
    if iterable is not None:
        return _track_host_timesteps(bar, plan)
    return _TimelineBar(bar, plan, self, total)


def _save_native_pipeline(self, save_directory, *args, **kwargs):
    """``DiffusionPipeline.save_pretrained`` with the native denoiser written back as the diffusers model it stands
    in for (``to_diffusers()``): ``DiffusionPipeline.from_pretrained`` loads a plain diffusers pipeline."""
    name = self._eekernels_native
    denoiser = getattr(self, name)
    # object.__setattr__: the config already names the diffusers class; DiffusionPipeline.__setattr__ would rewrite it
    object.__setattr__(self, name, denoiser.to_diffusers())
    try:
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    finally:
        object.__setattr__(self, name, denoiser)


def _track_host_timesteps(bar, plan: _ExitPlan):
    plan.start_trajectory()
    try:
        for t in bar:
            on_host = isinstance(t, numbers.Number) or (isinstance(t, torch.Tensor) and t.device.type == "cpu")
            plan.host_t = t if on_host else None
            yield t
    finally:
        plan.host_t = None


class _Timeline:
    """A text pipeline's run: its scheduler's timesteps on the host, and which one the current call is at.

    The step is the scheduler's ``step_index`` (every multistep, Euler, Heun and flow-matching scheduler keeps
    one; None before the first step means ``begin_index`` or 0), else, for first-order schedulers without one
    (DDIM, DDPM), the number of progress-bar updates so far. Otherwise ``current()`` is None and the depth is
    taken from the call's own timestep.
    """

    def __init__(self, scheduler, total):
        ts = getattr(scheduler, "timesteps", None)
        self.values = (ts.detach().to("cpu", torch.float64).reshape(-1).tolist()  # one copy per pipeline call
                       if isinstance(ts, torch.Tensor) else None)
        self.scheduler, self.updates = scheduler, 0
        self.by_index = isinstance(getattr(type(scheduler), "step_index", None), property)
        self.by_count = (not self.by_index and getattr(scheduler, "order", 1) == 1 and self.values is not None
                         and len(self.values) == total)

    def current(self):
        if self.values is None:
            return None
        if self.by_index:
            i = self.scheduler.step_index
            if i is None:
                i = getattr(self.scheduler, "begin_index", None) or 0
        elif self.by_count:
            i = self.updates
        else:
            return None
        return self.values[i] if 0 <= i < len(self.values) else None


class _TimelineBar:
    """The pipeline's progress bar, which also starts the run's timeline (and counts its updates)."""

    def __init__(self, bar, plan: _ExitPlan, pipe, total):
        self._bar, self._plan, self._pipe, self._total = bar, plan, pipe, total

    def __enter__(self):
        self._bar.__enter__()
        self._plan.start_trajectory()
        self._plan.timeline = _Timeline(self._pipe.scheduler, self._total)
        return self

    def __exit__(self, *exc):
        self._plan.timeline = None
        return self._bar.__exit__(*exc)

    def update(self, n=1):
        if self._plan.timeline is not None:
            self._plan.timeline.updates += n
        return self._bar.update(n)

    def __getattr__(self, name):
        return getattr(self._bar, name)


def _flux_prepare_latents(self, *args, **kwargs):
    """FluxPipeline.prepare_latents knows the packed grid (height, width // (2 vae_scale_factor)): record it on the
    stand-in so that unpacking needs no read of ``img_ids``."""
    prepare = type(self).prepare_latents
    out = prepare(self, *args, **kwargs)
    given = inspect.signature(prepare).bind(self, *args, **kwargs).arguments
    f = 2 * int(self.vae_scale_factor)
    h, w = int(given["height"]) // f, int(given["width"]) // f
    getattr(self, self._eekernels_native).grid = (h * w, h, w)
    return out


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------
def _is_eekernels_model(obj) -> bool:
    return (isinstance(obj, nn.Module) and type(obj).__module__.startswith("eekernels.models")
            and hasattr(obj, "num_blocks"))


def _accelerate_native(obj, schedule=None, exit_policy: str = "drop", graphs=None, forecast_order: int = 1,
                       forecast_target: str = "residual"):
    """The native tier: ``obj`` runs on eekernels' own fused model of its family (the family table's ``native``),
    behind the caller's API. A pipeline comes back as a NEW pipeline object whose denoiser is replaced; the one
    passed in is not modified. Raises ``TypeError`` for anything without a native model.
    """
    from eekernels import families

    found = families.family_of_pipeline(obj)
    name = found[1][0] if found is not None else None
    if isinstance(obj, _Accelerated) or (name is not None and isinstance(getattr(obj, name, None), _Accelerated)):
        raise TypeError("accelerate: this object is already accelerated; pass the original to change the schedule")
    if found is not None:
        if found[0].native_build is None:
            raise TypeError(f"accelerate(native=True): family {found[0].name!r} has no native eekernels model; "
                            "use the in-place tier (native=False)")
        if getattr(obj, name, None) is None:
            raise NativeTierError(f"accelerate(native=True): this {type(obj).__name__} has no `{name}` (it was built "
                                  f"with {name}=None); the native tier replaces the denoiser, so it needs one; "
                                  f"{IN_PLACE_HINT}")
        return _accelerate_pipeline(obj, name, schedule, exit_policy, graphs, forecast_order, forecast_target)
    if _is_eekernels_model(obj):
        return EarlyExitModel(obj, schedule, exit_policy, graphs, forecast_order, forecast_target)
    family = families.family_of(obj)
    if family is None:
        raise TypeError(f"accelerate: unsupported object of type {type(obj).__module__}.{type(obj).__qualname__}; "
                        f"supported: {families.supported()}")
    if family.refused:
        raise TypeError(f"accelerate: {type(obj).__name__} (family {family.name!r}) is refused: {family.refused}")
    if family.native_build is None:
        raise TypeError(f"accelerate(native=True): family {family.name!r} has no native eekernels model; use the "
                        "in-place tier (native=False)")
    model = family.native_build(obj)
    adapter = family.load("native_adapter") or EarlyExitModel
    if issubclass(adapter, _DiffusersDenoiser):
        return adapter(model, obj, schedule, exit_policy, graphs, forecast_order, forecast_target)
    return adapter(model, schedule, exit_policy, graphs, forecast_order, forecast_target)


def accelerate(obj, schedule=None, exit_policy: str = "drop", graphs=None, *, native: bool = False,
               kernels: bool = True, forecast_order: int | None = None, forecast_target: str | None = None):
    """Early exit (and fused kernels, and CUDA graphs) on ``obj``.

    In place (the default): ``obj`` is a diffusers pipeline or model of a family in the table
    (:mod:`eekernels.families`); it is kept, hooks decide which of its blocks run, and ``obj`` itself is returned
    (``eekernels.disable(obj)`` restores it). ``native=True``: eekernels' own fused model of the family stands in
    (a new object; the one passed is not modified); see ``_accelerate_native``.

    ``kernels`` (in place): True replaces the forward of the modules that an eekernels fused op matches (RMSNorm,
    modulated LayerNorms, gated residuals, Linear + GELU(tanh), FLUX's QK-norm + RoPE), keeping their parameters;
    they run fused on CUDA tensors. The report: ``eekernels.inplace.controller(obj).patches`` (see
    :mod:`eekernels.patches`). False leaves every module's forward as it is.

    ``exit_policy``: "drop" (skipped blocks contribute nothing: for models fine-tuned under the schedule), "cache"
    (what they added at the last full-depth call) or "forecast" (what they added, extrapolated in t through the
    last ``forecast_order`` + 1 full-depth calls; ``forecast_order`` 1 or 2, default the schedule's own, a calibrated
    plan's ``ExitSchedule.forecast_order``, else 1). ``forecast_target``: "residual" (the skipped part's whole
    residual) or "blocks" (each skipped block's attention and MLP outputs; native DiT only), default the schedule's
    own, else "residual".
    """
    from eekernels import families, inplace
    from eekernels.samplers.sampling import resolve_forecast_order, resolve_forecast_target

    forecast_order = resolve_forecast_order(schedule, forecast_order, "accelerate: `forecast_order`")
    forecast_target = resolve_forecast_target(schedule, forecast_target, "accelerate: `forecast_target`")
    if forecast_target == "blocks" and not (native or _is_eekernels_model(obj) or isinstance(obj, _Accelerated)):
        raise ValueError("accelerate: `forecast_target` expected 'residual' in place (the forecast extrapolates the "
                         "skipped blocks' residual there; diffusers' TaylorSeerCacheConfig forecasts per module), got "
                         "'blocks', which the native tier's DiT runs (native=True)")

    if not isinstance(native, bool):
        raise ValueError(f"accelerate: `native` expected a bool, got {native!r}")
    if not isinstance(kernels, bool):
        raise ValueError(f"accelerate: `kernels` expected a bool, got {kernels!r}")
    if native or _is_eekernels_model(obj) or isinstance(obj, _Accelerated):
        return _accelerate_native(obj, schedule, exit_policy, graphs, forecast_order, forecast_target)
    found = families.family_of_pipeline(obj)
    if found is not None:
        family, names = found
        if family.exit is None:
            raise TypeError(f"accelerate: {type(obj).__name__} (family {family.name!r}) cannot run early exit in "
                            f"place: {family.refused}")
        inplace.accelerate_pipeline(obj, family, names, schedule, exit_policy, graphs, kernels, forecast_order)
        return obj
    family = families.family_of(obj)
    if family is None:
        raise TypeError(f"accelerate: unsupported object of type {type(obj).__module__}.{type(obj).__qualname__}; "
                        f"supported: {families.supported()}")
    if family.exit is None:
        raise TypeError(f"accelerate: {type(obj).__name__} (family {family.name!r}) cannot run early exit in place: "
                        f"{family.refused}")
    return inplace.accelerate_model(obj, family, schedule, exit_policy, graphs, kernels, forecast_order)
