"""Fused ops. Each is a public function here and a registered ``torch.ops.eekernels.<name>``.

One file per op (``eekernels/ops/<name>.py``) holds its torch reference, Triton kernel, the call into
``_C`` where a CUDA C++ kernel exists, validation and registration.
"""
from eekernels.ops.modulated_layer_norm import modulated_layer_norm

__all__ = ["modulated_layer_norm"]
