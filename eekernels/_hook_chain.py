"""The in-place tier's diffusers hooks, kept inside accelerate's offload hooks and removed without touching others'.

diffusers' ``HookRegistry`` wraps ``module.forward`` as it finds it and, when its outermost hook is removed, sets
``module.forward`` back to the forward that hook wrapped. accelerate's offload hooks (``enable_model_cpu_offload``,
``enable_sequential_cpu_offload``) also wrap ``module.forward``, keep what they wrapped as ``module._old_forward``
(read at each call) and put it back when removed, which a pipeline under model offloading does at the end of every
call before adding them again. Left alone, the two lose each other's wrappers:

- hooks registered on top of accelerate's would be dropped at the end of the first call (accelerate puts back the
  forward it saw); so :func:`register` puts ours inside accelerate's, where they would be had offloading come second;
- removing ours when accelerate's wraps them would set ``module.forward`` to the plain forward, dropping the offload
  hook; so :func:`remove` keeps the outer wrapper, hands accelerate the forward ours wrapped, and makes our old
  wrapper a pass-through for anyone else who still holds it.
"""
from __future__ import annotations

import torch.nn as nn

_WRAPPER = "_eekernels_wrapper"  # on our hook: the forward the registry made for it


def _accelerate_wraps(module: nn.Module) -> bool:
    return hasattr(module, "_hf_hook") and hasattr(module, "_old_forward")


def register(module: nn.Module, hook, name: str) -> None:
    """``HookRegistry.register_hook(hook, name)`` on ``module``, inside accelerate's hook if the module has one."""
    from diffusers.hooks import HookRegistry

    outer = vars(module).get("forward") if _accelerate_wraps(module) else None
    if outer is not None:
        module.forward = module._old_forward
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    setattr(hook, _WRAPPER, module.forward)
    if outer is not None:
        module._old_forward = module.forward
        module.forward = outer


def _pass_args(module, *args, **kwargs):
    return args, kwargs


def _pass_output(module, output):
    return output


def remove(module: nn.Module, name: str) -> None:
    """Remove the hook ``name`` that :func:`register` put on ``module``, leaving every other wrapper in place."""
    registry = module._diffusers_hook
    hook = registry.get_hook(name)
    if hook is None:
        return
    ref, ours = hook.fn_ref, getattr(hook, _WRAPPER, None)
    inner = ref.original_forward if ref.original_forward is not None else ref.forward
    before = vars(module).get("forward")
    registry.remove_hook(name, recurse=False)
    if before is not None and before is not ours and vars(module).get("forward") is not before:
        module.forward = before  # a wrapper from outside the registry wraps ours: keep it
    if ours is not None and getattr(module, "_old_forward", None) is ours:
        module._old_forward = inner  # accelerate's hook now calls what ours wrapped
    ref.pre_forward, ref.post_forward, ref.forward = _pass_args, _pass_output, inner  # whoever else holds ours
