"""benchmarks/static_analysis.py: the compilers' resource reports for Hopper, read without a GPU."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("static_analysis", ROOT / "benchmarks" / "static_analysis.py")
sa = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sa)

PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN3eek12_GLOBAL__N_16kernelILi8ELi5EEEvPKf' for 'sm_90a'
ptxas info    : Function properties for _ZN3eek12_GLOBAL__N_16kernelILi8ELi5EEEvPKf
    24 bytes stack frame, 20 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 74 registers, 128 bytes smem, 424 bytes cmem[0]
ptxas info    : Compiling entry function 'other' for 'sm_90a'
ptxas info    : Function properties for other
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 31 registers, 424 bytes cmem[0]
"""


def test_parse_ptxas_reads_registers_spills_and_smem():
    rows = sa.parse_ptxas(PTXAS)
    assert [r["registers"] for r in rows] == [74, 31]
    assert rows[0]["spill_stores"] == 20 and rows[0]["spill_loads"] == 16 and rows[0]["stack_bytes"] == 24
    assert rows[0]["smem_bytes"] == 128 and "smem_bytes" not in rows[1]
    assert rows[0]["arch"] == "sm_90a"


def test_ptx_widths_counts_vector_accesses():
    ptx = """ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];
ld.global.b16 %rs1, [%rd2];
st.global.v4.b32 [%rd3], {%r1, %r2, %r3, %r4};
cp.async.cg.shared.global [ %r18 + 0 ], [ %rd8 + 0 ], 0x10, %r19;
cp.async.ca.shared.global [ %r18 + 0 ], [ %rd8 + 0 ], 4, %r19;
wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16"""
    w = sa._ptx_widths(ptx)
    assert (w["global_loads"], w["global_loads_16B"], w["global_stores_16B"]) == (2, 1, 1)
    assert (w["cp_async"], w["cp_async_16B"], w["wgmma"]) == (2, 1, 1)


def _can_compile_for_hopper() -> str | None:
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if sa._tool("cuobjdump") is None or sa._tool("ptxas") is None:
        return "triton's bundled ptxas/cuobjdump are missing (a non-NVIDIA triton build)"
    return None


@pytest.mark.skipif(_can_compile_for_hopper() is not None, reason=str(_can_compile_for_hopper()))
def test_triton_report_compiles_a_norm_for_sm90(tmp_path):
    # A fresh process without TRITON_INTERPRET: under the interpreter (as the test suite imports the ops) the
    # kernels are interpreted functions, with nothing to compile.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "static.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static_analysis.py"), "--only", "triton",
                           "--ops", "layer_norm", "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["triton"]
    assert row["kernel"] == "_layer_norm_kernel" and row["target"] == "sm_90"
    assert row["registers"] > 0 and row["local_bytes (spills)"] == 0
    assert row["global_loads_16B"] == row["global_loads"] > 0  # aligned rows load as 16-byte vectors
