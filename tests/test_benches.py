"""Benchmark scripts run end to end on tiny parameters (shape of their output only; no timing asserts)."""
from __future__ import annotations

import json

import pytest

from ruvllm_lab.cli import main

STAGES = {"embed", "retrieve", "route", "attention", "generate", "judge", "writeback", "total"}


@pytest.mark.model
@pytest.mark.slow
def test_pipeline_bench_quick_through_the_cli(tmp_path):
    assert main(["bench", "--quick", "--memory-nodes", "200", "--n-requests", "2", "--max-tokens", "2",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "pipeline-quick.json").read_text())
    assert "Pipeline benchmark" in (tmp_path / "pipeline-quick.md").read_text()
    assert {"date", "machine", "git_commit", "command"} <= set(report["meta"])
    assert {"cpu", "cores"} <= set(report["meta"]["machine"])
    assert set(report["targets"]) == {"p50_ms", "p99_ms", "qps", "peak_rss_mb"}
    assert report["settings"]["memory_nodes"] == 200 and report["settings"]["tiers"] == ["smollm2-135m"]
    assert report["memory"]["peak_rss_mb"] > 0 and report["memory"]["nodes_after"] >= 200
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
    for lv in report["levels"]:
        assert lv["ok"] == lv["requests"] == 2 and lv["rejected"] == 0
        assert 0 < lv["p50_ms"] <= lv["p99_ms"] and lv["qps"] > 0
        assert lv["overhead_p50_ms"] > 0 and set(lv["stage_p50_ms"]) == STAGES
        assert all(v > 0 for v in lv["stage_p50_ms"].values())
