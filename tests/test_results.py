"""Comparing runs: grouped by the grid's axes (seeds are replicates), n, mean, Student-t 95 % CI and the
paired difference against a baseline -- checked against scipy on real MLflow runs."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from scipy import stats

from ruvllm_lab.config import Config
from ruvllm_lab.experiments import results as R
from ruvllm_lab.experiments.tracking import MLflowTracker, log_experiment

from .conftest import ROOT

LAMBDAS = (100.0, 10000.0)
SEEDS = (0, 1, 2)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _forgetting_runs(rng):
    """Two runs (one per lambda), each with three seeds in its per-seed table, shaped like the forgetting
    experiment's; returns what was logged."""
    import pandas as pd
    logged = {}
    for lam in LAMBDAS:
        rows = []
        for seed in SEEDS:
            for method in ("naive", "ewc", "ewc+replay"):
                vals = {"forgetting": float(rng.uniform(0, 0.5)), "average_accuracy": float(rng.uniform(0.4, 1))}
                rows.append({"seed": seed, "method": method, "key": method.replace("+", "_"), **vals,
                             "updates": 100, "train_s": 0.1})
                logged[(lam, seed, method)] = vals
        with MLflowTracker(experiment="forget-sweep") as tr:
            log_experiment(tr, Config(), {"experiment": "forgetting", "ewc_lambda": lam, "seeds": list(SEEDS),
                                          "methods": "naive,ewc,ewc+replay", "n_per_phase": 24})
            tr.log_table(pd.DataFrame(rows), "forgetting_per_seed.csv")
            tr.log_metrics({"naive/forgetting": 0.0})  # the run's own mean: the per-seed table wins
            tr.log_metrics({"naive/acc_phase0": 0.5}, step=3)
    return logged


def _compare(name):
    runs = R.load_runs(name)
    return R.compare_runs(runs, per_seed=R.load_per_seed(runs))


def test_forgetting_runs_grouped_by_lambda_with_t_intervals_and_paired_differences(mlflow_uri):
    logged = _forgetting_runs(np.random.default_rng(7))
    runs = R.load_runs("forget-sweep")
    assert len(runs) == len(LAMBDAS)
    report = R.compare_runs(runs, per_seed=R.load_per_seed(runs))
    assert list(report) == ["forgetting"]
    cmp = report["forgetting"]
    assert cmp.axes == ["learning.ewc_lambda"]  # seeds are replicates, not configurations
    assert cmp.baseline == "naive" and cmp.n_runs == len(LAMBDAS)
    s = cmp.summary
    for lam in LAMBDAS:
        for method in ("naive", "ewc", "ewc+replay"):
            x = [logged[(lam, seed, method)]["forgetting"] for seed in SEEDS]
            row = s[(s["learning.ewc_lambda"] == lam) & (s["method"] == method) & (s["metric"] == "forgetting")]
            assert len(row) == 1 and int(row["n"].iloc[0]) == len(SEEDS)
            lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
            assert row["mean"].iloc[0] == pytest.approx(np.mean(x))
            assert (row["ci_low"].iloc[0], row["ci_high"].iloc[0]) == pytest.approx((lo, hi))
            if method == "naive":
                continue
            d = np.array(x) - np.array([logged[(lam, seed, "naive")]["forgetting"] for seed in SEEDS])
            diff = cmp.differences
            drow = diff[(diff["learning.ewc_lambda"] == lam) & (diff["method"] == method)
                        & (diff["metric"] == "forgetting")]
            dlo, dhi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
            assert drow["diff"].iloc[0] == pytest.approx(d.mean())
            assert (drow["diff_low"].iloc[0], drow["diff_high"].iloc[0]) == pytest.approx((dlo, dhi))
            assert int(drow["n_pairs"].iloc[0]) == len(SEEDS)
    assert "train_s" not in cmp.metrics and "seed" not in cmp.metrics
    # the narrow table: one row per (lambda, method), a handful of columns
    table = cmp.table("forgetting")
    assert list(table.columns) == ["learning.ewc_lambda", "method", "n", "forgetting", "95% CI", "diff vs naive",
                                   "diff 95% CI"]
    assert len(table) == len(LAMBDAS) * 3
    assert (table.loc[table["method"] == "naive", "diff vs naive"] == "–").all()


def test_runs_without_a_per_seed_table_are_one_replicate_each(mlflow_uri):
    for lam in LAMBDAS:
        with MLflowTracker(experiment="single") as tr:
            log_experiment(tr, Config(), {"experiment": "forgetting", "ewc_lambda": lam, "seed": 0})
            tr.log_metrics({"naive/forgetting": 0.3, "ewc/forgetting": 0.1})
    cmp = _compare("single")["forgetting"]
    table = cmp.table("forgetting")
    assert (table["n"] == 1).all() and (table["95% CI"] == "n=1, no CI").all()
    assert set(table.loc[table["method"] == "ewc", "diff vs naive"]) == {"-0.200"}


def test_routing_and_compression_names_and_baselines(mlflow_uri):
    import pandas as pd
    rng = np.random.default_rng(3)
    with MLflowTracker(experiment="mixed") as tr:
        log_experiment(tr, Config(), {"experiment": "routing", "seeds": list(SEEDS), "n_queries": 30})
        tr.log_table(pd.DataFrame([{"feedback": fb, "seed": seed, "router": r, "quality": float(rng.uniform()),
                                    "cost": 10.0} for fb in ("bandit", "full") for seed in SEEDS
                                   for r in ("fastgrnn", "always-largest", "oracle")]), "routing_per_seed.csv")
        tr.log_metrics({"tier/smollm2-135m/quality": 0.2, "outcomes/queries": 30})
    with MLflowTracker(experiment="mixed") as tr:
        log_experiment(tr, Config(), {"experiment": "compression", "seeds": list(SEEDS), "n_interactions": 40})
        tr.log_table(pd.DataFrame([{"seed": seed, "clusters": c, "depth": d, "mode": m, "recall": float(rng.uniform()),
                                    "ratio_nodes": 1.0 if c == 0 else 9.0} for seed in SEEDS
                                   for c, d, m in ((0, 0, "flat"), (4, 1, "descent"))]), "compression_per_seed.csv")
    runs = R.load_runs(["mixed"])
    report = R.compare_runs(runs, baselines={"routing": "oracle"}, per_seed=R.load_per_seed(runs))
    assert set(report) == {"routing", "compression"}
    routing = report["routing"]
    assert routing.axes == ["feedback"] and routing.baseline == "oracle"  # the feedback mode splits a run
    assert set(routing.summary["router"]) == {"fastgrnn", "always-largest", "oracle"}
    assert set(routing.differences["router"]) == {"fastgrnn", "always-largest"}
    assert (routing.summary["n"] == len(SEEDS)).all()
    comp = report["compression"]
    assert comp.baseline == "flat" and set(comp.summary["config"]) == {"flat", "c4_d1_descent"}
    assert "clusters" not in comp.metrics and "recall" in comp.metrics


def test_plot_has_error_bars_per_configuration_and_is_shown_once(mlflow_uri):
    import matplotlib.pyplot as plt
    _forgetting_runs(np.random.default_rng(1))
    cmp = _compare("forget-sweep")["forgetting"]
    before = set(plt.get_fignums())
    fig = cmp.plot("forgetting")
    assert set(plt.get_fignums()) == before  # closed: a notebook shows it once, where it is displayed
    ax = fig.axes[0]
    assert len(ax.containers) == len(LAMBDAS)  # one errorbar series per lambda, not pooled
    assert ax.get_ylabel().startswith("forgetting") and ax.get_title() and ax.get_legend() is not None


def test_compare_script_writes_tables_and_figures(mlflow_uri, tmp_path, capsys):
    _forgetting_runs(np.random.default_rng(2))
    spec = importlib.util.spec_from_file_location("experiments_compare", ROOT / "experiments" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    assert mod.main(["--experiment", "forget-sweep", "--experiment", "missing-one", "--out", str(tmp_path / "cmp"),
                     "--baseline", "forgetting=ewc"]) == 0
    out = capsys.readouterr()
    assert "## forgetting: 2 run(s); configurations by learning.ewc_lambda; baseline 'ewc'" in out.out
    assert "diff vs ewc" in out.out and "missing-one" in out.err
    for metric in R.KINDS["forgetting"].metrics:
        assert (tmp_path / "cmp" / f"forgetting_{metric}.csv").exists()
        assert (tmp_path / "cmp" / f"forgetting_{metric}.png").exists()
    with pytest.raises(SystemExit):
        mod.main(["--experiment", "missing-one", "--out", str(tmp_path / "x")])
