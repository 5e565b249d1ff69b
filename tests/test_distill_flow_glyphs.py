"""python/distill_flow_glyphs.py: reflow pairs made by the teacher, the guidance-distilled student, resumption."""
import json
import sys
from pathlib import Path

import pytest
import torch

from eekernels.models import DiT
from eekernels.models.judge import GlyphJudge
from eekernels.models.pretrained import load_model_file, save_model_file
from eekernels.samplers import sample
from eekernels.training import model_kwargs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    teacher = DiT(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                  learn_sigma=False, prediction_type="flow")
    for p in teacher.parameters():  # not the zero-initialised output layer: a velocity that depends on x, t, y
        torch.nn.init.normal_(p, std=0.05)
    save_model_file(teacher, d / "teacher.pt", "dit", model_kwargs(teacher))
    judge = GlyphJudge(width=4, feature_dim=8).eval()
    save_model_file(judge, d / "judge.pt", "judge", judge.config)
    return d


def _run(files, out, *extra):
    import distill_flow_glyphs

    return distill_flow_glyphs.main(["--teacher", str(files / "teacher.pt"), "--judge", str(files / "judge.pt"),
                                     "--out", str(out), "--quick", "--device", "cpu", *extra])


def test_quick_end_to_end_and_resume(files, tmp_path):
    record = _run(files, tmp_path)
    teacher = load_model_file(files / "teacher.pt")
    # the pairs: the teacher's flow-Euler samples (3 steps at quick size, CFG 1.5) of seeded noise, label i % 10
    chunk = torch.load(tmp_path / "pairs" / "00001.pt")
    assert chunk["index"].tolist() == list(range(8, 16)) and chunk["labels"].tolist() == [8, 9, 0, 1, 2, 3, 4, 5]
    again = sample(teacher, chunk["noise"], chunk["labels"], sampler="flow_euler", steps=3, cfg_scale=1.5)
    torch.testing.assert_close(chunk["images"], again)
    assert record["pairs"]["chunks_made"] == 3 and record["pairs"]["count"] == 24

    student = load_model_file(tmp_path / "glyph-dit-flow-distilled.pt")
    assert student.prediction == "flow" and student.pretrained_meta["sampling"]["cfg_scale"] == 1.0
    assert student.pretrained_meta["sampling"]["sampler"] == "flow_euler"
    assert student.pretrained_meta["sampling"]["steps"] == 4
    assert record["config"]["noise"] == "paired" and record["config"]["label_dropout"] == 0.0
    assert record["steps"] == 6 and record["distilled_from"] == str(files / "teacher.pt")
    rows = {(r.get("model"), r.get("steps"), r.get("cfg_scale")) for r in record["fidelity"]["rows"]}
    teacher_name = str(files / "teacher.pt")
    assert {("glyph-dit-flow-distilled", 4, 1.0), ("glyph-dit-flow-distilled", 8, 1.0), (teacher_name, 4, 1.5),
            (teacher_name, 8, 1.5), (teacher_name, 3, 1.5)} <= rows
    assert (tmp_path / "fidelity.md").is_file() and (tmp_path / "samples.png").is_file()
    saved = json.loads((tmp_path / "PROVENANCE-distilled.json").read_text())["glyph-dit-flow-distilled"]
    assert saved["fidelity"]["knee"]["glyph-dit-flow-distilled"] in (4, 8)

    # Interrupted: one chunk lost, the student further on. The rerun makes only that chunk (the same images)
    # and continues the student from its checkpoint.
    (tmp_path / "pairs" / "00001.pt").unlink()
    more = _run(files, tmp_path, "--steps", "8", "--samples", "0")
    assert (more["pairs"]["chunks_made"], more["pairs"]["chunks_kept"]) == (1, 2)
    torch.testing.assert_close(torch.load(tmp_path / "pairs" / "00001.pt")["images"], chunk["images"])
    assert more["resumed_from_step"] == 6 and more["steps"] == 8 and "fidelity" not in more


def test_time_budget_stops_the_student_and_the_teacher_rows_can_be_left_out(files, tmp_path):
    """--minutes bounds pairs + student (the record says how many steps ran); --no-teacher-eval: student rows only."""
    record = _run(files, tmp_path, "--steps", "1000", "--minutes", "1e-9", "--no-teacher-eval", "--eval-steps", "2")
    assert record["steps"] == 1 and record["steps_this_run"] == 1 and record["config"]["steps"] == 1000
    assert {r.get("model") for r in record["fidelity"]["rows"]} == {None, "glyph-dit-flow-distilled"}  # None: real
    assert record["fidelity"]["knee"] == {"glyph-dit-flow-distilled": 2}


def test_refusals_before_any_work(files, tmp_path):
    _run(files, tmp_path / "a", "--samples", "0")
    with pytest.raises(ValueError, match="--out: .* other settings .*teacher_steps"):
        _run(files, tmp_path / "a", "--teacher-steps", "5")
    with pytest.raises(ValueError, match="--out: .* other settings .*lr"):
        _run(files, tmp_path / "a", "--lr", "3e-4")
    with pytest.raises(ValueError, match="--teacher-sampler"):
        _run(files, tmp_path / "b", "--teacher-sampler", "dpmsolver++")
    with pytest.raises(ValueError, match="--pairs"):
        _run(files, tmp_path / "b", "--pairs", "0")
    with pytest.raises(ValueError, match="--minutes: expected a finite number >= 0"):
        _run(files, tmp_path / "b", "--minutes", "-1")
    eps = DiT(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    save_model_file(eps, tmp_path / "eps.pt", "dit", model_kwargs(eps))
    import distill_flow_glyphs

    with pytest.raises(ValueError, match="--teacher: expected a class-conditional flow model"):
        distill_flow_glyphs.main(["--teacher", str(tmp_path / "eps.pt"), "--out", str(tmp_path / "b"), "--quick"])
    assert not (tmp_path / "b").exists()
