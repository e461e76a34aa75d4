"""`make demo` is honest about its own output: every answer is checked against its expected value,
a miss is marked, and the correction step corrects an answer the model really got wrong."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from ruvllm_lab import demo
from ruvllm_lab.workloads import WorkItem, is_correct


def test_misses_are_marked_not_printed_as_fine():
    wrong = demo.check("What is 12 + 30?", "42", SimpleNamespace(text="12 + 30 = 32"), "number")
    assert not wrong.correct and demo.verdict(wrong) == "MISSES expected '42'"
    stranger = demo.check("What is my name?", "Ada", SimpleNamespace(text="Kara Kaito."))
    assert not stranger.correct and "MISSES" in demo.verdict(stranger)
    right = demo.check("What is the capital of Australia?", "Canberra",
                       SimpleNamespace(text="The capital of Australia is Canberra."))
    assert right.correct and demo.verdict(right) == "matches expected 'Canberra'"
    assert all(isinstance(q, str) and a and m in ("text", "number") for q, a, m in demo.QUESTIONS)


@pytest.mark.slow
@pytest.mark.model
def test_pipeline_demo_corrects_a_real_mistake_and_marks_every_miss(edge_config, capsys):
    report = demo.pipeline_demo(edge_config)
    out = capsys.readouterr().out
    checked = report["asked"] + report["probes"] + [c for c in (report["after"], report["session"]) if c]
    assert len(report["asked"]) == len(demo.QUESTIONS)
    for c in checked:  # the verdict is the strict gold matcher's, and it is printed
        if c.match != "text" or not c.correct:  # aliases only widen text matches
            assert c.correct == is_correct(WorkItem(c.question, c.expected, "demo", 1, c.match), c.answer)
        assert demo.verdict(c) in out
    if report["corrected"] is not None:
        assert report["corrected"].correct is False  # only a real mistake is corrected
        assert "correction retrieved:" in out and report["after"] is not None
    else:
        assert "nothing to correct" in out
    n_ok = sum(c.correct for c in checked)
    assert f"{n_ok}/{len(checked)} answers match their expected value" in out
