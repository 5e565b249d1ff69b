"""`eekernels info` prints every section and never fails, even with nothing built."""
import json
import subprocess
import sys

from eekernels import _ext, info


def test_info_json_has_every_section():
    out = subprocess.run([sys.executable, "-m", "eekernels", "info", "--json"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    data = json.loads(out)
    assert set(data) == {"versions", "build", "device", "ops (auto)", "graphs", "families", "patches (in place)"}
    assert data["versions"]["torch"]
    for op in ("layer_norm", "modulated_layer_norm", "gated_residual_norm", "linear_act", "group_norm_act"):
        assert op in data["ops (auto)"], op
    assert "max_graphs" in data["graphs"]


def test_info_survives_missing_build(monkeypatch, capsys):
    monkeypatch.setattr(_ext, "_try_import", lambda: (None, _ext.BUILD_HINT))
    assert info.run() == 0
    text = capsys.readouterr().out
    assert "eekernels._C is not built" in text
    assert "[ops (auto)]" in text
