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
    assert rows["real"]["accuracy"] >= 0.98  # the judge reads real glyphs
    # What the shipped (CPU-trained, undertrained) models show, with margin for 40 samples: fine-tuned ASE
    # stays close to full depth in Fréchet distance, naive truncation is far worse (RESULTS.md section 6:
    # 720 vs 750 vs 2704 at 1,000 samples). Class accuracy is not asserted: the shipped base model is near
    # chance (11%), so the accuracy half of the ASE claim is not shown by these models.
    assert rows["ase-finetuned"]["frechet"] <= 1.25 * rows["full"]["frechet"]
    assert rows["ase-naive"]["frechet"] >= 2.0 * rows["ase-finetuned"]["frechet"]
    assert 0.6 < rows["ase-finetuned"]["block_flop_fraction"] < 0.8
