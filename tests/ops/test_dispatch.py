"""Backend selection: EEKERNELS_BACKEND, the eekernels.backend() context manager, auto, and the errors."""
import sys

import pytest
import torch

import eekernels
from eekernels import _ext
from eekernels.ops import _common as C
from eekernels.ops._triton import HAS_TRITON
from tests.utils import INTERPRET, randn

OPS = ["layer_norm", "modulated_layer_norm", "gated_residual_norm", "linear_act", "group_norm_act", "cfg_step",
       "rms_norm", "qk_norm_rope"]


def _module(op):
    return sys.modules[f"eekernels.ops.{op}"]  # eekernels.ops.<op> is the public function, not the module


def _x(op):
    return randn(2, 8, 3, 5) if op == "group_norm_act" else randn(2, 3, 72)


def _chosen(op):
    return _module(op).DISPATCH.select(_x(op)).name


@pytest.mark.parametrize("op", OPS)
def test_auto_picks_torch_on_cpu(op, monkeypatch):
    monkeypatch.delenv("EEKERNELS_BACKEND", raising=False)
    assert eekernels.current_backend() == "auto"
    assert _chosen(op) == "torch"
    assert _module(op).DISPATCH.select(_x(op), backend="auto").name == "torch"


@pytest.mark.skipif(not INTERPRET, reason="triton runs CPU tensors only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("op", OPS)
def test_env_var_selects_backend(op, monkeypatch):
    monkeypatch.setenv("EEKERNELS_BACKEND", "triton")
    assert _chosen(op) == "triton"
    monkeypatch.setenv("EEKERNELS_BACKEND", " Torch ")  # case and blanks are forgiven
    assert _chosen(op) == "torch"


def test_env_var_bad_name_raises(monkeypatch):
    monkeypatch.setenv("EEKERNELS_BACKEND", "cudnn")
    with pytest.raises(ValueError, match=r"EEKERNELS_BACKEND: expected one of .*'cudnn'"):
        eekernels.ops.layer_norm(randn(2, 3, 72))


@pytest.mark.skipif(not INTERPRET, reason="triton runs CPU tensors only under TRITON_INTERPRET=1")
def test_context_manager_overrides_env_and_nests(monkeypatch):
    monkeypatch.setenv("EEKERNELS_BACKEND", "torch")
    with eekernels.backend("triton"):
        assert _chosen("linear_act") == "triton"
        with eekernels.backend("torch"):
            assert _chosen("linear_act") == "torch"
        assert _chosen("linear_act") == "triton"
    assert _chosen("linear_act") == "torch"
    with pytest.raises(ValueError, match=r"backend\(name\): expected one of"):
        with eekernels.backend("fast"):
            pass


@pytest.mark.parametrize("op", ["modulated_layer_norm", "gated_residual_norm", "group_norm_act"])
def test_unavailable_cuda_backend_lists_every_reason(op):
    with eekernels.backend("cuda"), pytest.raises(C.BackendUnavailable) as info:
        _module(op).DISPATCH.select(_x(op))
    msg = str(info.value)
    assert f"{op}: backend 'cuda' cannot run these inputs" in msg
    assert "cuda: needs CUDA tensors, got device cpu" in msg
    assert "torch: supported" in msg
    if not HAS_TRITON:
        assert "triton: triton is not installed" in msg
    else:
        assert ("triton: supported" if INTERPRET else "triton: needs CUDA tensors") in msg


@pytest.mark.parametrize("op", ["layer_norm", "linear_act"])
def test_no_cuda_kernel_raises_for_cuda_backend(op):
    w = randn(37, 72)
    with eekernels.backend("cuda"), pytest.raises(C.BackendUnavailable, match="cuda: no implementation of this op"):
        if op == "layer_norm":
            eekernels.ops.layer_norm(randn(2, 3, 72))
        else:
            eekernels.ops.linear_act(randn(2, 3, 72), w)


def test_triton_without_interpreter_raises_with_reason(monkeypatch):
    pytest.importorskip("triton", reason="needs triton: the reason checked is the interpreter's")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with eekernels.backend("triton"), pytest.raises(C.BackendUnavailable) as info:
        eekernels.ops.group_norm_act(randn(2, 8, 3, 5), 4)
    assert "triton: needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; got device cpu" in str(info.value)


@pytest.fixture
def no_C(monkeypatch):
    """Pretend eekernels._C failed to import, whether or not it is built here."""
    reason = f"{_ext.BUILD_HINT}; import error: No module named 'eekernels._C'"
    monkeypatch.setattr(_ext, "_try_import", lambda: (None, reason))


def test_missing_C_message(no_C):
    assert not _ext.available()
    with pytest.raises(RuntimeError, match=r"eekernels._C is not built: reinstall with nvcc on PATH"):
        _ext.load()
    x = randn(2, 3, 72)
    with eekernels.backend("cuda"), pytest.raises(C.BackendUnavailable, match=r"eekernels._C is not built"):
        eekernels.ops.modulated_layer_norm(x, randn(2, 72), randn(2, 72))


def test_missing_C_raises_before_any_launch(no_C):
    """A direct call of the CUDA path says how to get _C instead of failing on an attribute."""
    x, y = randn(2, 3, 72), randn(2, 3, 72)
    with pytest.raises(RuntimeError, match=r"reinstall with nvcc on PATH"):
        _module("gated_residual_norm")._cuda(x, y, None, None, None, None, None, 1e-6)
    with pytest.raises(RuntimeError, match=r"reinstall with nvcc on PATH"):
        _module("group_norm_act")._cuda(randn(2, 8, 3, 5), 4, None, None, None, None, "silu", 1e-5)


def test_exports():
    assert sorted(eekernels.ops.__all__) == sorted(OPS)
    for op in OPS:
        assert callable(getattr(eekernels.ops, op))
        assert hasattr(torch.ops.eekernels, op)


# --------------------------------------------------------------------------------------------------
# Declared capabilities: devices, dtypes, the largest D; one Dispatch serves select and explain.
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def C_built(monkeypatch):
    monkeypatch.setattr(_ext, "_try_import", lambda: (object(), None))


def test_auto_skips_triton_above_its_largest_row(C_built):
    """No GPU needed: fake CUDA tensors carry device, dtype and shape, which is all the selection reads."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        small = torch.empty(2, 3, 1152, device="cuda")
        big = torch.empty(1, 1, C.TRITON_MAX_ROW + 1, device="cuda")
        for op, fallback in [("layer_norm", "torch"), ("gated_residual_norm", "cuda")]:
            d = _module(op).DISPATCH
            assert d.select(small, backend="auto").name == ("triton" if HAS_TRITON else fallback)
            assert d.select(big, backend="auto").name == fallback
            why = d.explain(big)["triton"]
            assert f"triton: D (x's last dim) at most {C.TRITON_MAX_ROW}, got {C.TRITON_MAX_ROW + 1}" in why
            with pytest.raises(C.BackendUnavailable, match=r"D \(x's last dim\) at most"):
                d.select(big, backend="triton")


def test_explain_gives_every_implementation_its_reasons():
    x = torch.empty(2, 3, 8, device="meta")
    why = _module("linear_act").DISPATCH.explain(x)
    assert list(why) == ["torch", "triton", "cublas"]
    assert why["torch"] == []
    assert why["cublas"] == ["cublas: needs CUDA tensors, got device meta"]
    assert why["triton"][0] == "triton: needs CPU or CUDA tensors, got device meta"
    if not HAS_TRITON:
        assert "triton: triton is not installed (pip install triton; Linux only)" in why["triton"]
