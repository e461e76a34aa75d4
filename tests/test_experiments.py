"""Experiments: RouteLLM metrics on hand-made curves, the MLflow tracker against a real SQLite
store, and the routing / forgetting / compression runs at tiny size with real parts."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

from ruvllm_lab import workloads
from ruvllm_lab.experiments import metrics as M
from ruvllm_lab.experiments.tracking import MemoryTracker, MLflowTracker, NullTracker, Tracker, safe_key

from .conftest import ROOT


# ---- metrics -------------------------------------------------------------------------------------

def test_apgr_and_cpt_on_a_hand_made_curve():
    c, q = [0.0, 0.5, 1.0], [0.5, 0.9, 1.0]
    # AUC = 0.5 * (0.5 + 0.9) / 2 + 0.5 * (0.9 + 1.0) / 2 = 0.825; APGR = (0.825 - 0.5) / 0.5
    assert M.auc(c, q) == pytest.approx(0.825)
    assert M.apgr(c, q, 0.5, 1.0) == pytest.approx(0.65)
    # 50 %: target 0.75 lies on the first segment at (0.75 - 0.5) / 0.4 of its width
    assert M.cpt(c, q, 0.5, 1.0, 50) == pytest.approx(0.3125)
    assert M.cpt(c, q, 0.5, 1.0, 80) == pytest.approx(0.5)
    # monotone curve: RouteLLM's np.interp(target, accuracy, calls) gives the same numbers
    for pct in (20, 50, 80):
        target = 0.5 + pct / 100 * 0.5
        assert M.cpt(c, q, 0.5, 1.0, pct) == pytest.approx(np.interp(target, q, c))
    assert M.pgr(0.75, 0.5, 1.0) == pytest.approx(0.5)


def test_random_mixing_line_scores_one_half_and_order_does_not_matter():
    c = np.linspace(0, 1, 11)
    q = 0.2 + 0.6 * c
    assert M.apgr(c, q, 0.2, 0.8) == pytest.approx(0.5)
    assert M.cpt(c, q, 0.2, 0.8, 50) == pytest.approx(0.5)
    perm = np.random.default_rng(0).permutation(11)
    assert M.apgr(c[perm], q[perm], 0.2, 0.8) == pytest.approx(0.5)


def test_cost_reduction_at_matched_quality_and_unreached_targets():
    assert M.cost_reduction_at_matched_quality([10, 20, 30], [0.5, 1.0, 1.0], 1.0, 30) == pytest.approx(1 / 3)
    assert M.cost_reduction_at_matched_quality([10, 20, 30], [0.5, 0.9, 1.0], 1.0, 30) == pytest.approx(0.0)
    assert math.isnan(M.cost_reduction_at_matched_quality([10, 20], [0.5, 0.7], 1.0, 30))
    assert math.isnan(M.cpt([0, 1], [0.5, 0.6], 0.5, 1.0, 80))
    assert M.cost_reduction(25, 100) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        M.apgr([0, 1], [0.5], 0.5, 1.0)
    with pytest.raises(ValueError):
        M.cpt([0, 1], [0, 1], 0, 1, 120)
    assert math.isnan(M.apgr([0, 1], [0.5, 0.5], 0.5, 0.5))


def test_optimal_curve_upgrades_the_cheapest_fixable_queries_first():
    # 4 queries, tiers cost 1 / 3 / 10; query 0 is right everywhere, 1 needs tier 1, 2 needs tier 2, 3 is never right
    correct = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 0, 0]], bool)
    cost, quality = M.optimal_curve(correct, [1, 3, 10], n_points=3)
    assert cost.tolist() == pytest.approx([1.0, 5.5, 10.0])
    assert quality.tolist() == pytest.approx([0.25, 0.75, 0.75])  # budget 22: +2 fixes q1, +9 fixes q2


# ---- trackers ------------------------------------------------------------------------------------

def test_null_and_memory_trackers_keep_the_protocol():
    for t in (NullTracker(), MemoryTracker()):
        assert isinstance(t, Tracker)
    t = MemoryTracker()
    t.log_metrics({"a": 1}, step=0)
    t.log_metrics({"a": 2}, step=1)
    assert t.metrics["a"] == [(0, 1.0), (1, 2.0)] and t.last("a") == 2.0


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _run_data(tracker: MLflowTracker):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    return client, run, artifacts


def test_mlflow_tracker_logs_params_metrics_tables_figures(mlflow_uri, tmp_path):
    import matplotlib.pyplot as plt
    import pandas as pd

    from ruvllm_lab.config import Config
    from ruvllm_lab.experiments.tracking import log_config

    with MLflowTracker(experiment="unit", run_name="t1") as tr:
        assert tr.tracking_uri == mlflow_uri  # MLFLOW_TRACKING_URI is honoured
        log_config(tr, Config())
        tr.log_metrics({"x/apgr": 0.7, "x/cpt50": float("nan")})
        tr.log_metrics({"x/online": 0.1}, step=1)
        tr.log_metrics({"x/online": 0.3}, step=2)
        tr.log_table(pd.DataFrame({"a": [1, 2]}), "t.csv")
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        tr.log_figure(fig, "curve.png")
    client, run, artifacts = _run_data(tr)
    assert run.info.status == "FINISHED"
    assert run.data.params["router.hidden_dim"] == "32"
    assert run.data.metrics["x/apgr"] == pytest.approx(0.7)
    assert "x/cpt50" not in run.data.metrics  # nan is kept out of MLflow (the CSV keeps it)
    assert [m.value for m in client.get_metric_history(tr.run_id, "x/online")] == pytest.approx([0.1, 0.3])
    assert {"t.csv", "curve.png", "config.toml"} <= artifacts
    # artifacts land next to the SQLite store, whatever the working directory
    assert str(tmp_path / "mlruns" / "artifacts") in tr.artifact_uri


def test_core_experiment_modules_do_not_import_mlflow():
    import subprocess
    code = ("import sys; import ruvllm_lab.experiments.routing, ruvllm_lab.experiments.forgetting, "
            "ruvllm_lab.experiments.compression, ruvllm_lab.workloads; print('mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- experiments at tiny size -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ruvllm_lab.config import EmbeddingConfig
    from ruvllm_lab.embedding import EmbeddingService
    return EmbeddingService(EmbeddingConfig())


def test_forgetting_run_fills_the_matrix_and_replay_forgets_less(edge_config, embedder, mlflow_uri):
    from ruvllm_lab.experiments import forgetting
    from ruvllm_lab.learning.metrics import average_forgetting

    sched = workloads.shift_schedule(n_per_phase=60, seed=0)
    with MLflowTracker(experiment="forgetting-test") as tr:
        res = forgetting.run(edge_config, sched, ewc_lambda=1e4, buffer_size=200, embedder=embedder, tracker=tr)
    s = res.summary.set_index("method")
    assert list(s.index) == list(forgetting.METHODS)
    for method, matrix in res.matrices.items():
        a = matrix.to_numpy()
        assert a.shape == (3, 3) and not np.isnan(a).any()
        assert s.loc[method, "forgetting"] == pytest.approx(average_forgetting(a))
    # the same seed and schedule: every method does the same number of updates
    assert s["updates"].nunique() == 1
    # phase 0 is learned, then the later phases (other labels) erode it without protection
    naive = res.matrices["naive"].to_numpy()
    assert naive[0, 0] > naive[2, 0]
    assert s.loc["replay", "forgetting"] < s.loc["naive", "forgetting"]
    _, run, artifacts = _run_data(tr)
    for method in forgetting.METHODS:
        for key in ("forgetting", "average_accuracy", "forgetting_per_10k_updates"):
            assert safe_key(f"{method}/{key}") in run.data.metrics
    assert {"accuracy_over_time.png", "forgetting_summary.png", "forgetting_summary.csv"} <= artifacts


def test_forgetting_rejects_bad_arguments(edge_config):
    from ruvllm_lab.experiments import forgetting
    with pytest.raises(ValueError, match="unknown forgetting method"):
        forgetting.run(edge_config, methods=["sgd"])
    with pytest.raises(ValueError, match="at least two phases"):
        forgetting.run(edge_config, workloads.shift_schedule([{"arithmetic": 1}], 10))


def test_synthetic_label_grows_with_difficulty():
    from ruvllm_lab.experiments.forgetting import synthetic_label
    labels = [synthetic_label(workloads.WorkItem("q", "a", "string", d), 3) for d in (1, 2, 3)]
    assert labels == [0, 1, 2]
    assert synthetic_label(workloads.WorkItem("q", "a", "factual", 1), 3) == 0
    assert synthetic_label(workloads.WorkItem("q", "a", "arithmetic", 3), 3) == 2


TIERS = ["smollm2-135m", "gemma3-270m"]


@pytest.mark.slow
@pytest.mark.model
def test_routing_run_end_to_end_with_cache_and_mlflow(edge_config, embedder, mlflow_uri, tmp_path):
    from ruvllm_lab.experiments import routing

    items = workloads.generate(n=10, seed=11)
    cache = tmp_path / "outcomes"
    with MLflowTracker(experiment="routing-test") as tr:
        res = routing.run(edge_config, items, tiers=TIERS, max_tokens=12, cache_dir=cache, embedder=embedder,
                          update_every=4, tracker=tr)
    out = res.outcomes
    assert out.correct.shape == (10, 2) and out.generated == 20
    s = res.summary.set_index("router")
    assert set(s.index) == set(routing.DEFAULT_ROUTERS)
    # the always-routers reproduce the tiers alone
    assert s.loc["always-smallest", "quality"] == pytest.approx(out.correct[:, 0].mean())
    assert s.loc["always-largest", "quality"] == pytest.approx(out.correct[:, 1].mean())
    assert s.loc["always-largest", "cost_reduction"] == pytest.approx(0.0)
    # the oracle is the upper bound: right whenever any tier is right, at the cheapest such tier
    assert s.loc["oracle", "quality"] == pytest.approx(out.correct.any(axis=1).mean())
    assert s.loc["oracle", "oracle_agreement"] == 1.0
    assert s.loc["oracle", "quality"] >= s["quality"].max() - 1e-12
    # cost is parameter-weighted tokens
    rc = out.relative_costs
    assert rc[1] == pytest.approx(2.0)
    assert s.loc["always-largest", "cost"] == pytest.approx(((out.prompt_tokens + out.completion_tokens)[:, 1] * rc[1]).mean())
    # gold matching agrees with the judge on every cached answer
    for i, it in enumerate(items):
        for j in range(2):
            assert out.correct[i, j] == routing.judge_correct(it, out.texts[i, j])
    # second run: everything comes from the cache, same outcomes
    again = routing.run(edge_config, items, tiers=TIERS, max_tokens=12, cache_dir=cache, embedder=embedder,
                        routers=["always-smallest", "fastgrnn"])
    assert again.outcomes.generated == 0
    assert (again.outcomes.correct == out.correct).all()
    assert (again.outcomes.texts == out.texts).all()
    _, run, artifacts = _run_data(tr)
    for name in ("fastgrnn", "knn", "logreg", "random", "oracle"):
        for key in ("quality", "cost", "cost_reduction", "oracle_agreement", "latency_ms"):
            assert f"{name}/{key}" in run.data.metrics
    assert {"cost_quality.png", "online_quality.png", "routing_summary.csv", "routing_outcomes.csv"} <= artifacts
    assert run.data.params["exp.tiers"] == ",".join(TIERS)


def test_routing_needs_two_tiers(edge_config):
    from ruvllm_lab.experiments import routing
    with pytest.raises(ValueError, match="at least two tiers"):
        routing.run(edge_config, workloads.generate(n=2), tiers=["smollm2-135m"])


def test_threshold_curve_spans_smallest_to_largest():
    from ruvllm_lab.experiments.routing import threshold_curve
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    correct = np.array([[1, 1], [0, 1], [0, 0]], bool)
    cost = np.array([[1.0, 4.0]] * 3)
    curve = threshold_curve(probs, correct, cost)
    first, last = curve.iloc[0], curve.iloc[-1]
    assert (first["cost"], first["quality"]) == pytest.approx((1.0, 1 / 3))  # tau = 0: all smallest
    assert (last["cost"], last["quality"]) == pytest.approx((4.0, 2 / 3))  # closed by always-largest
    assert curve["cost"].is_monotonic_increasing  # raising tau never moves a query to a cheaper tier
    # tau = 0.5: query 0 (P(small) 0.9) and query 2 (0.5) stay small, query 1 goes large
    row = curve[np.isclose(curve["tau"], 0.5)].iloc[0]
    assert row["quality"] == pytest.approx(2 / 3) and row["cost"] == pytest.approx(2.0)


@pytest.mark.slow
@pytest.mark.model
def test_compression_run_trades_ratio_for_recall(edge_config, embedder, mlflow_uri, tmp_path):
    from ruvllm_lab.experiments import compression

    cfg = edge_config
    with MLflowTracker(experiment="compression-test") as tr:
        res = compression.run(cfg, n_interactions=24, cluster_counts=(2, 4), depths=(1,), n_eval=4, embedder=embedder,
                              work_dir=tmp_path / "mem", tracker=tr)
    s = res.summary
    assert list(zip(s["clusters"], s["depth"])) == [(0, 0), (2, 1), (4, 1)]
    base = s.iloc[0]
    assert base["compression_ratio"] == 1.0 and base["recall"] == 1.0  # the queries are in memory verbatim
    for _, row in s.iloc[1:].iterrows():
        assert row["nodes_after"] < row["nodes_before"]
        assert row["compression_ratio"] == pytest.approx(row["nodes_before"] / row["nodes_after"])
        assert 0.0 <= row["recall"] <= 1.0 and 0.0 <= row["answer_quality"] <= 1.0
    assert s.iloc[1]["compression_ratio"] > s.iloc[2]["compression_ratio"]  # fewer clusters, fewer nodes
    assert len(res.answers) == 3 * 4
    _, run, artifacts = _run_data(tr)
    assert "c2_d1/compression_ratio" in run.data.metrics and "baseline/recall" in run.data.metrics
    assert {"ratio_recall.png", "compression_summary.csv"} <= artifacts


@pytest.mark.slow
@pytest.mark.model
def test_judge_calibration_script_writes_a_table_for_every_signal(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("judge_calibration", ROOT / "experiments" / "judge_calibration.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--n", "4", "--judge-tier", "smollm2-135m", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "judge_calibration.json").read_text())
    assert [row["signal"] for row in result["table"]] == ["logprob", "llm:smollm2-135m"]
    assert len(result["rows"]) == 4 and all(r["gold"] in (0.0, 1.0) for r in result["rows"])
    assert all(0.0 < r["logprob"] <= 1.0 for r in result["rows"])
    assert "| logprob | 4 |" in (tmp_path / "judge_calibration.md").read_text()
