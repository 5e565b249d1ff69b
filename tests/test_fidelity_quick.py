"""The fidelity benchmark: the whole pipeline at toy scale, and the quick check on the shipped models."""
import json
import sys
from pathlib import Path

import pytest

from eekernels.models.pretrained import PRETRAINED, load_model_file, pretrained_names

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_train_glyphs_quick_end_to_end(tmp_path):
    import train_glyphs

    record = train_glyphs.main(["--out", str(tmp_path), "--quick", "--device", "cpu"])
    for f in (*PRETRAINED.values(), "PROVENANCE.json", "fidelity.md", "samples.png", "log.txt"):
        assert (tmp_path / f).is_file(), f
    prov = json.loads((tmp_path / "PROVENANCE.json").read_text())
    assert prov["glyph-dit"]["steps"] == 8 and prov["glyph-dit-ase"]["steps"] == 4
    assert prov["glyph-dit"]["command"].startswith("python python/train_glyphs.py")
    rows = {r["variant"]: r for r in record["fidelity"]["rows"]}
    assert set(rows) == {"real", "full", "ase-naive", "ase-finetuned", "cache"}
    assert rows["full"]["block_flop_fraction"] == 1.0
    assert rows["ase-finetuned"]["block_flop_fraction"] < 0.8 and rows["cache"]["block_flop_fraction"] < 1.0
    assert all(r["frechet"] >= 0 for r in rows.values())
    tuned = load_model_file(tmp_path / PRETRAINED["glyph-dit-ase"])
    assert tuned.pretrained_meta["schedule"]["preset"] == "ase-demo"


@pytest.mark.skipif(not set(PRETRAINED) <= set(pretrained_names()),
                    reason="the shipped glyph models are not in eekernels/pretrained/ yet (python/train_glyphs.py)")
def test_fidelity_quick_on_the_shipped_models():
    import fidelity

    result = fidelity.main(["--quick", "--device", "cpu"])
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["real"]["accuracy"] >= 0.98
    # the shipped models make recognizable glyphs: the judge reads most samples as the asked-for digit
    assert rows["full"]["accuracy"] >= 0.8 and rows["ase-finetuned"]["accuracy"] >= 0.8
    assert 0.6 < rows["ase-finetuned"]["block_flop_fraction"] < 0.8
