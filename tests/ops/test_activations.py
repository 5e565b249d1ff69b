"""The activation list has one Python definition, which csrc/common.cuh's ``activate`` mirrors."""
import pathlib
import re
import sys

import pytest

from eekernels.ops import _common as common

COMMON_CUH = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "common.cuh"


@pytest.mark.skipif(not COMMON_CUH.exists(), reason="needs the source checkout's csrc/common.cuh (CI's wheel leg runs a copy of tests/ without it)")
def test_common_cuh_codes_match_python():
    text = COMMON_CUH.read_text()
    # "// Activations (group_norm_act): codes as in eekernels.ops (0 none, 1 gelu (erf), 2 gelu_tanh, 3 silu)."
    line = next(ln for ln in text.splitlines() if "codes as in eekernels.ops (" in ln)
    listed = line.split("codes as in eekernels.ops (", 1)[1].rstrip(").")
    codes = {}
    for item in listed.split(","):
        code, name = item.split()[:2]
        codes[None if name == "none" else name] = int(code)
    assert codes == common.ACTIVATION_CODES
    body = text[text.index("float activate("):]
    body = body[:body.index("\n}\n")]
    cases = sorted(int(c) for c in re.findall(r"case (\d+):", body))
    assert cases == sorted(c for c in common.ACTIVATION_CODES.values() if c != 0)  # 0 (none) is the default


def test_the_op_files_use_the_one_list():
    assert common.ACTIVATIONS == tuple(common.ACTIVATION_CODES)
    for op in ("linear_act", "group_norm_act"):
        assert not hasattr(sys.modules[f"eekernels.ops.{op}"], "ACTIVATION_CODES"), op
