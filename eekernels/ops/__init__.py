"""Fused ops. Each is a public function here and a registered ``torch.ops.eekernels.<name>``.

One file per op (``eekernels/ops/<name>.py``) holds its torch reference, Triton kernel, the call into
``_C`` where a CUDA C++ kernel exists, validation and registration.
"""
from eekernels.ops.cfg_step import cfg_step
from eekernels.ops.gated_residual_norm import gated_residual_norm
from eekernels.ops.group_norm_act import group_norm_act
from eekernels.ops.layer_norm import layer_norm
from eekernels.ops.linear_act import linear_act
from eekernels.ops.modulated_layer_norm import modulated_layer_norm
from eekernels.ops.qk_norm_rope import qk_norm_rope
from eekernels.ops.rms_norm import rms_norm

__all__ = ["cfg_step", "gated_residual_norm", "group_norm_act", "layer_norm", "linear_act", "modulated_layer_norm",
           "qk_norm_rope", "rms_norm"]
