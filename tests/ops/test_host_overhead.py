"""The host-overhead shortcuts keep the checks they shortcut: fast validation, the cached backend lookup and
the op-path test (benchmarks/bench_host_overhead.py measures what they save)."""
import pytest
import torch

import eekernels
from eekernels import _backend
from eekernels.ops import _common as C

OP = "some_op"


def _outcome(fn, *args, **kwargs):
    """None when ``fn`` accepts, else its ValueError message."""
    try:
        fn(*args, **kwargs)
    except ValueError as exc:
        return str(exc)
    return None


def _candidates():
    """Inputs for a (2, 5) parameter: valid ones in every accepted form, and each way of being wrong."""
    return {
        "float32": torch.randn(2, 5),
        "float16": torch.randn(2, 5).half(),
        "bfloat16": torch.randn(2, 5).bfloat16(),
        "float64": torch.randn(2, 5, dtype=torch.float64),
        "int64": torch.randint(1, 9, (2, 5)),
        "parameter": torch.nn.Parameter(torch.randn(2, 5)),
        "transposed": torch.randn(5, 2).t(),
        "wrong shape": torch.randn(5, 2),
        "wrong rank": torch.randn(2, 5, 1),
        "1-d": torch.randn(10),
        "meta device": torch.empty(2, 5, device="meta"),
        "list": [[1.0] * 5] * 2,
        "None": None,
        "float": 3.0,
    }


XS = {
    "float32": torch.randn(2, 3, 5),
    "bfloat16": torch.randn(2, 3, 5).bfloat16(),
    "float64": torch.randn(2, 3, 5, dtype=torch.float64),
    "int64": torch.randint(1, 9, (2, 3, 5)),
}


@pytest.mark.parametrize("x_dtype", list(XS))
def test_check_param_agrees_with_the_step_by_step_checks(x_dtype):
    x = XS[x_dtype]
    for label, t in _candidates().items():
        want = _outcome(C.check_tensor_steps, OP, "shift", t, None, (2, 5), x, "(B, D)", True)
        if want is None:
            want = _outcome(C.check_dtype, OP, "shift", t, x)
        got = _outcome(C.check_param, OP, "shift", t, (2, 5), x, "(B, D)")
        assert got == want, f"{label} with x {x_dtype}: {got!r} != {want!r}"


CHECK_TENSOR_KWARGS = [
    dict(ndim=2, dims="(B, D)"),
    dict(shape=(2, 5), dims="(B, D)"),
    dict(shape=(None, 5), dims="(*, D)"),  # a free entry: accepted by the step-by-step path only
    dict(shape=(2, None), like=XS["float32"], dims="(B, *)"),
    dict(ndim=2, floating=False),
    dict(like=XS["float32"]),
]


@pytest.mark.parametrize("kwargs", CHECK_TENSOR_KWARGS,
                         ids=["ndim", "shape", "free-first", "free-last-like", "not-floating", "like"])
def test_check_tensor_agrees_with_the_step_by_step_checks(kwargs):
    full = {**dict(ndim=None, shape=None, like=None, dims="", floating=True), **kwargs}
    for label, t in _candidates().items():
        want = _outcome(C.check_tensor_steps, OP, "scale", t, full["ndim"], full["shape"], full["like"],
                        full["dims"], full["floating"])
        got = _outcome(C.check_tensor, OP, "scale", t, **kwargs)
        assert got == want, f"{label}, {kwargs}: {got!r} != {want!r}"
    assert _outcome(C.check_tensor, OP, "scale", torch.randn(7, 5), shape=(None, 5)) is None


def test_cached_env_backend_follows_every_change(monkeypatch):
    steps = [("torch", "torch"), ("torch", "torch"), (" Triton ", "triton"), ("", "auto"), ("CUDA", "cuda"),
             ("cudnn", ValueError), ("cudnn", ValueError), ("torch", "torch"), (None, "auto")]
    for raw, want in steps:
        if raw is None:
            monkeypatch.delenv("EEKERNELS_BACKEND", raising=False)
        else:
            monkeypatch.setenv("EEKERNELS_BACKEND", raw)
        if want is ValueError:  # a bad name raises on every call: it is never cached
            with pytest.raises(ValueError, match=r"EEKERNELS_BACKEND: expected one of .*'cudnn'"):
                _backend.current_backend()
        else:
            assert _backend.current_backend() == want, raw
            with eekernels.backend("triton"):  # the context still wins over the cached value
                assert _backend.current_backend() == "triton"


def test_dispatch_indexes_impls_once_and_skips_unknown_auto_names():
    impls = (C.Impl("torch", lambda: "t", lambda *a: []), C.Impl("triton", lambda: "tr", lambda *a: []))
    d = C.Dispatch(OP, impls, ("cuda", "triton"))
    assert d.auto == (impls[1],) and d.torch is impls[0]
    assert d.select(torch.randn(2, 3)) is impls[0]  # auto on CPU: the reference
    with eekernels.backend("triton"):
        assert d.select(torch.randn(2, 3)) is impls[1]
    with eekernels.backend("cuda"), pytest.raises(C.BackendUnavailable, match="cuda: no implementation"):
        d.select(torch.randn(2, 3))


@pytest.mark.parametrize("position", range(4))
def test_needs_op_path_sees_requires_grad_in_any_position(position):
    tensors = [torch.randn(3), None, torch.randn(3), None]
    assert not C.needs_op_path(*tensors)
    tensors[position] = torch.randn(3, requires_grad=True)
    assert C.needs_op_path(*tensors)
    with torch.no_grad():
        assert not C.needs_op_path(*tensors)


def test_row_launch_config_pads_rows_to_powers_of_two():
    for D, block, warps in [(1, 1, 1), (63, 64, 1), (257, 512, 2), (1152, 2048, 8), (5000, 8192, 8)]:
        assert C.row_launch_config(D) == (block, warps)


def test_needs_op_path_leaves_what_the_schema_refuses_to_the_eager_checks():
    """A value the op's schema refuses (a list for a tensor, a string or None for a number) takes the eager path,
    whose validation raises the op's ValueError; a bool for a number does not (a Scalar schema passes it on)."""
    g = torch.randn(3, requires_grad=True)
    assert C.needs_op_path(g, None, numbers=(1e-6, True, 4), strings=(None, "silu"))
    assert not C.needs_op_path([1.0, 2.0], g)  # the list first or last: never the op path
    assert not C.needs_op_path(g, [1.0, 2.0])
    for bad in ("1e-6", None, __import__("numpy").int64(4), torch.tensor(1e-6)):
        assert not C.needs_op_path(g, numbers=(bad,)), bad
    assert not C.needs_op_path(g, strings=(3,))
