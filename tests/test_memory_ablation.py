"""The memory ablation at a tiny size on the edge profile (real SmolLM2-135M, MiniLM, faiss, SQLite)."""
from __future__ import annotations

import pytest

from ruvllm_lab.config import Config
from ruvllm_lab.experiments import memory_ablation
from ruvllm_lab.experiments.tracking import MemoryTracker
from ruvllm_lab.relevance import load_memory_eval

from .conftest import ROOT

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_split_is_disjoint_and_deterministic():
    rows = load_memory_eval(split="eval")
    a = memory_ablation.split_items(rows, ["t1", "t2"], 3, 4, 2, 3, 2)
    b = memory_ablation.split_items(rows, ["t1", "t2"], 3, 4, 2, 3, 2)
    ids = [r["id"] for r in a.seeded + a.fresh["t1"] + a.fresh["t2"] + a.cross + a.corrected]
    assert len(ids) == len(set(ids)) == 4 + 2 * 2 + 3 + 2
    assert ids == [r["id"] for r in b.seeded + b.fresh["t1"] + b.fresh["t2"] + b.cross + b.corrected]
    with pytest.raises(ValueError, match="distinct questions"):
        memory_ablation.split_items(rows, ["t1"], 0, 40, 40, 0, 0)


def test_strict_match_uses_aliases():
    row = {"question": "Who wrote Romeo and Juliet?", "answer": "Shakespeare", "aliases": ["Shakespear"],
           "family": "general", "match": "text"}
    assert memory_ablation.correct_any(row, "Shakespear wrote it.")
    assert not memory_ablation.correct_any(row, "Marlowe")


def test_tiny_ablation_runs_the_loop_and_reports_every_case(tmp_path):
    cfg = Config.load(ROOT / "configs" / "edge.toml")
    tracker = MemoryTracker()
    result = memory_ablation.run(cfg, seeds=[0], n_seeded=2, n_fresh=2, n_cross=2, n_corrected=1,
                                 policies=["off", "verified"], max_tokens=8, work_dir=tmp_path,
                                 tracker=tracker, progress=False)
    df = result.rows
    assert len(df) == 2 * (2 + 2 + 2 * 2 + 1)
    assert set(df.case) == {"fresh", "cross", "repeat", "paraphrase", "corrected"}
    assert (df[df.policy == "off"].notes == 0).all()  # "off" shows nothing, corrections included
    corrected = df[(df.policy == "verified") & (df.case == "corrected")]
    assert corrected.correction_recalled.all()
    assert result.underpowered and tracker.tags.get("underpowered") == "true"
    assert {"target", "measured", "met"} <= set(result.criteria.columns)
    assert "| policy | tier | case |" in result.to_markdown()
