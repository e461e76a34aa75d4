"""Benchmark scripts run end to end on tiny parameters (shape of their output only; no timing asserts)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ruvllm_lab.cli import main

ROOT = Path(__file__).resolve().parent.parent
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
        assert 0 < lv["p50_ms"] <= lv["p99_ms"] and lv["qps"] > 0 and lv["qps_wall"] > 0
        assert lv["rounds"] == 1 and lv["qps_rounds"] == [lv["qps"]]
        assert lv["overhead_p50_ms"] > 0 and set(lv["stage_p50_ms"]) == STAGES
        assert all(v > 0 for v in lv["stage_p50_ms"].values())


def _pipeline_bench():
    spec = importlib.util.spec_from_file_location("pipeline_bench", ROOT / "benches" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pipeline_steady_state_window_leaves_out_the_ramps():
    bench = _pipeline_bench()
    # 2 clients, 8 requests: a slow start (both first answers at 1.0 s) and a slow drain (the last at
    # 9.0 s); in between, one completion every 0.5 s: t_C = 1.0, t_{N-C} = 3.0, (8 - 4) / 2.0 = 2 QPS.
    done = [1.0, 1.0, 1.5, 2.0, 2.5, 3.0, 6.0, 9.0]
    assert bench.steady_qps(done, clients=2) == pytest.approx(2.0)
    assert bench.steady_qps(done[:4], clients=2) == pytest.approx(4 / 2.0)  # N <= 2C: whole-level rate


def test_pipeline_interval_verdict_needs_the_whole_interval_on_one_side():
    bench = _pipeline_bench()
    assert bench.interval_verdict(1.6, 1.52, 1.7, 1.5) == "pass"
    assert bench.interval_verdict(1.2, 1.1, 1.3, 1.5) == "miss"
    assert bench.interval_verdict(1.45, 1.3, 1.6, 1.5) == "inconclusive"
    assert bench.interval_verdict(1.6, float("nan"), float("nan"), 1.5) == "pass"  # one round: the point value
