"""Experiments: RouteLLM metrics on hand-made curves, the MLflow tracker against a real SQLite
store, and the routing / forgetting / compression runs at tiny size with real parts."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pandas as pd
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


def test_forgetting_run_trains_through_the_continual_trainer(edge_config, embedder, mlflow_uri):
    """Synthetic-rule labels (no LLM): every method gets the same updates, replay keeps its stated share."""
    from ruvllm_lab.experiments import forgetting
    from ruvllm_lab.learning.metrics import average_forgetting

    cfg = edge_config.with_overrides({"inference.models": ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]})
    sched = workloads.phases_by_family(workloads.generate(n=150, seed=0, distinct=True), forgetting.DEFAULT_FAMILY_PHASES)
    with MLflowTracker(experiment="forgetting-test") as tr:
        res = forgetting.run(cfg, sched, seeds=(0,), labels="synthetic-rule", ewc_lambda=1e4, replay_fraction=0.2,
                             steps_per_phase=40, embedder=embedder, tracker=tr, show_progress=False)
    s = res.summary.set_index("method")
    assert list(s.index) == list(forgetting.METHODS)
    assert s.loc["online-ewc", "label"] == f"online EWC (gamma = {cfg.learning.ewc_gamma:g})"
    for name, matrix in res.matrices.items():
        a = matrix.to_numpy()
        assert a.shape == (3, 3) and not np.isnan(a).any()
        assert res.per_seed.set_index("method").loc[name, "forgetting"] == pytest.approx(average_forgetting(a))
    # the same number of optimiser steps for every method, reported as the window F is measured over
    assert res.per_seed["updates"].nunique() == 1 and (res.per_seed["updates"] == 3 * 40).all()
    assert (s["updates_window"] == 2 * 40).all()
    # replay keeps 20 % of each past phase; full rehearsal keeps every past training row
    rows = res.per_seed.set_index("method")["replay_rows"]
    train_rows = [len(p.items) - round(0.4 * len(p.items)) for p in sched]
    assert rows["naive"] == 0 and rows["full-rehearsal"] == sum(train_rows)
    assert rows["replay"] == sum(round(0.2 * n) for n in train_rows)
    # later phases (other labels) erode phase 0 without protection; rehearsing everything does not
    assert s.loc["naive", "forgetting"] > s.loc["full-rehearsal", "forgetting"]
    assert res.underpowered  # one seed, small phases
    _, run, artifacts = _run_data(tr)
    assert run.data.tags["underpowered"] == "true"
    for method in forgetting.METHODS:
        for metric in ("forgetting", "average_accuracy", "backward_transfer", "updates_window"):
            assert safe_key(f"{method}/{metric}") in run.data.metrics
    assert not [k for k in run.data.metrics if "10k" in k]  # never extrapolated
    assert {"accuracy_over_time.png", "forgetting_summary.png", "forgetting_summary.csv"} <= artifacts


def test_forgetting_rejects_bad_arguments(edge_config):
    from ruvllm_lab.experiments import forgetting
    with pytest.raises(ValueError, match="unknown forgetting method"):
        forgetting.run(edge_config, methods=["sgd"], labels="synthetic-rule")
    with pytest.raises(ValueError, match="labels must be"):
        forgetting.run(edge_config, labels="synthetic")
    with pytest.raises(ValueError, match="at least two phases"):
        forgetting.run(edge_config, workloads.shift_schedule([{"arithmetic": 1}], 10), labels="synthetic-rule")


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

    items = workloads.generate(n=10, seed=11, distinct=True)
    cache = tmp_path / "outcomes"
    with MLflowTracker(experiment="routing-test") as tr:
        res = routing.run(edge_config, items, tiers=TIERS, max_tokens=12, cache_dir=cache, embedder=embedder,
                          seeds=(0, 1), feedback=("bandit", "full"), update_every=4, tracker=tr, show_progress=False)
    out = res.outcomes
    assert out.correct.shape == (10, 2) and out.generated == 20
    assert set(res.summary["feedback"]) == {"bandit", "full"}
    assert len(res.per_seed) == 2 * 2 * len(routing.DEFAULT_ROUTERS)
    for mode in ("bandit", "full"):
        s = res.summary[res.summary["feedback"] == mode].set_index("router")
        assert set(s.index) == set(routing.DEFAULT_ROUTERS)
        # the always-routers reproduce the tiers alone; their APGR/CPT are undefined (a chord), not 0.5
        assert s.loc["always-smallest", "quality"] == pytest.approx(out.correct[:, 0].mean())
        assert s.loc["always-largest", "quality"] == pytest.approx(out.correct[:, 1].mean())
        assert s.loc["always-largest", "cost_reduction"] == pytest.approx(0.0)
        assert math.isnan(s.loc["always-largest", "apgr"]) and math.isnan(s.loc["random", "cpt50"])
        # the oracle is the upper bound: right whenever any tier is right, at the cheapest such tier
        assert s.loc["oracle", "quality"] == pytest.approx(out.correct.any(axis=1).mean())
        assert s.loc["oracle", "oracle_agreement"] == 1.0
        assert s.loc["oracle", "quality"] >= s["quality"].max() - 1e-12
        assert (s["quality_lo"] <= s["quality"] + 1e-12).all() and (s["quality"] <= s["quality_hi"] + 1e-12).all()
    # bandit feedback shows a learned router one outcome per query, full feedback every tier's
    ps = res.per_seed.set_index(["feedback", "router"])
    assert (ps.loc[("bandit", "fastgrnn"), "observed"] == 10).all()
    assert (ps.loc[("full", "fastgrnn"), "observed"] == 20).all()
    assert "| n/a |" in res.to_markdown("full")
    # cost is parameter-weighted tokens
    rc = out.relative_costs
    assert rc[1] == pytest.approx(2.0)
    s = res.summary[res.summary["feedback"] == "full"].set_index("router")
    assert s.loc["always-largest", "cost"] == pytest.approx(((out.prompt_tokens + out.completion_tokens)[:, 1] * rc[1]).mean())
    # the cached texts are judged by the one strict matcher
    for i, it in enumerate(out.items):
        for j in range(2):
            assert out.correct[i, j] == workloads.is_correct(it, out.texts[i, j])
    # second run: everything comes from the cache, same outcomes
    again = routing.run(edge_config, items, tiers=TIERS, max_tokens=12, cache_dir=cache, embedder=embedder,
                        routers=["always-smallest", "fastgrnn"], seeds=(0,), show_progress=False)
    assert again.outcomes.generated == 0
    assert (again.outcomes.correct == out.correct).all() and (again.outcomes.texts == out.texts).all()
    # 10 queries, 2 seeds: the run says it is underpowered and is tagged so
    assert any("10 queries" in r for r in res.underpowered) and any("seed" in r for r in res.underpowered)
    _, run, artifacts = _run_data(tr)
    assert run.data.tags["underpowered"] == "true"
    for name in ("fastgrnn", "knn", "logreg", "random", "oracle"):
        for key in ("quality", "cost", "cost_reduction", "quality_nofb", "oracle_agreement", "quality_ci_low"):
            assert f"bandit/{name}/{key}" in run.data.metrics
    assert {"cost_quality.png", "online_quality.png", "routing_summary.csv", "routing_per_seed.csv",
            "routing_outcomes.csv", "underpowered.txt"} <= artifacts
    assert run.data.params["exp.tiers"] == ",".join(TIERS)


def _synthetic_outcomes(n=48, seed=0):
    """A real OutcomeMatrix over two real tiers, with outcomes drawn so the larger tier is better."""
    from ruvllm_lab.experiments.outcomes import OutcomeMatrix
    rng = np.random.default_rng(seed)
    items = workloads.generate(n=n, seed=seed, distinct=True)
    correct = np.stack([rng.random(n) < 0.3, rng.random(n) < 0.8], axis=1)
    toks = rng.integers(10, 30, size=(n, 2))
    return OutcomeMatrix(items, TIERS, np.full((n, 2), "x", dtype=object), correct, np.ones((n, 2)), toks, toks)


def test_bandit_feedback_observes_only_the_served_tier(edge_config):
    from ruvllm_lab.experiments import routing, routing_sim
    from ruvllm_lab.learning.service import LearningService
    from ruvllm_lab.router import make_router

    out = _synthetic_outcomes()
    vecs = np.random.default_rng(1).normal(size=(len(out.items), 16)).astype(np.float32)
    inputs = routing_sim.build_inputs(out.items, vecs, [12] * len(out.items), TIERS, None)
    traces = {}
    for mode in ("bandit", "full"):
        router = make_router("logreg", TIERS, edge_config.router, input_dim=16, seed=0)
        svc = LearningService(edge_config, router, resume=False, persist=False)
        traces[mode] = routing_sim.simulate(router, inputs, out, feedback=mode, update_every=8, learning_service=svc)
        assert traces[mode].updates >= 1
    assert traces["bandit"].observed == len(out.items)
    assert traces["full"].observed == 2 * len(out.items)
    with pytest.raises(ValueError, match="learning_service"):
        routing_sim.simulate(make_router("fastgrnn", TIERS, edge_config.router, 16), inputs, out)
    with pytest.raises(ValueError, match="feedback"):
        routing.run(edge_config, out.items, tiers=TIERS, feedback="partial")


def test_underpowered_reasons_name_tied_tiers_small_runs_and_few_seeds():
    from ruvllm_lab.experiments import routing_report
    out = _synthetic_outcomes(n=20)
    out.correct[:, 1] = out.correct[:, 0]  # tied tiers
    per_seed = pd.DataFrame({"router": ["fastgrnn"], "updates": [1]})
    reasons = routing_report.underpowered_reasons(out, [0], per_seed, min_queries=30, min_seeds=5, min_updates=4)
    text = " | ".join(reasons)
    assert "20 queries" in text and "1 seed" in text and "tied tiers" in text and "1 learning update" in text
    out.correct[:, 1] = True
    big = routing_report.underpowered_reasons(out, range(5), per_seed.assign(updates=9), min_queries=20, min_seeds=5,
                                              min_updates=4)
    assert big == []


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible():
    values = [0.50, 0.55, 0.60, 0.52, 0.58]
    mean, lo, hi = M.bootstrap_ci(values)
    assert mean == pytest.approx(np.mean(values))
    assert min(values) <= lo < mean < hi <= max(values)
    assert M.bootstrap_ci(values) == (mean, lo, hi)  # seeded
    assert M.bootstrap_ci([0.4]) == (0.4, 0.4, 0.4)
    assert all(math.isnan(v) for v in M.bootstrap_ci([float("nan")]))
    wide = M.bootstrap_ci(values, confidence=0.99)
    assert wide[1] <= lo and wide[2] >= hi
    with pytest.raises(ValueError):
        M.bootstrap_ci(values, confidence=1.5)


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
    """The real smollm2-135m writes the summaries and answers held-out paraphrases."""
    from ruvllm_lab.experiments import compression

    cfg = edge_config
    with MLflowTracker(experiment="compression-test") as tr:
        res = compression.run(cfg, n_interactions=24, cluster_counts=(2, 4), depths=(1,), seeds=(0,), n_eval=4,
                              token_budget=48, embedder=embedder, work_dir=tmp_path / "mem", tracker=tr,
                              progress=False)
    s = res.summary
    assert list(zip(s["clusters"], s["depth"], s["mode"])) == [
        (0, 0, "flat"), (2, 1, "descent"), (2, 1, "collapsed"), (4, 1, "descent"), (4, 1, "collapsed")]
    base = s.iloc[0]
    assert base["ratio_nodes"] == 1.0 and base["ratio_bytes"] == 1.0
    descent = s[s["mode"] == "descent"]
    assert (descent["indexed_nodes"] < base["indexed_nodes"]).all()
    assert descent.iloc[0]["ratio_nodes"] > descent.iloc[1]["ratio_nodes"]  # fewer clusters, fewer nodes
    assert (s["recall"].between(0, 1) & s["answer_quality"].between(0, 1)).all()
    assert (res.per_seed["context_tokens"] <= 48).all()
    assert len(res.answers) == 5 * 4 and res.answers["answer"].map(bool).any()
    assert res.underpowered  # one seed, four questions
    _, run, artifacts = _run_data(tr)
    assert run.data.tags["underpowered"] == "true"
    assert "c2_d1_descent/ratio_nodes" in run.data.metrics and "flat/recall" in run.data.metrics
    assert {"ratio_recall.png", "compression_summary.csv", "compression_per_seed.csv"} <= artifacts


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


def test_median_ci_is_the_sign_test_interval_and_covers_the_median():
    from ruvllm_lab.experiments.metrics import median_ci

    assert median_ci(list(range(1, 41))) == (20.5, 14.0, 27.0)  # n = 40: order statistics 14 and 27
    assert median_ci([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)  # too few for 95 %: the range
    rng = np.random.default_rng(0)  # coverage of the true median of a skewed (log-normal) latency
    hits = 0
    for _ in range(400):
        _, lo, hi = median_ci(rng.lognormal(0.0, 1.0, 40))
        hits += lo <= 1.0 <= hi
    assert hits / 400 >= 0.93
