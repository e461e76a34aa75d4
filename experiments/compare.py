"""Load runs from MLflow into a DataFrame and compare: router against router, EWC against naive.

    python experiments/compare.py --experiment ruvllm-routing-sweep
    python experiments/compare.py --experiment ruvllm-forgetting-sweep --out notebooks/out/compare

Metrics named ``<name>/<metric>`` (how the experiments log them: ``fastgrnn/apgr``,
``ewc_replay/forgetting``) are reshaped to one row per (run, name) with a column per metric;
the tables are averaged over runs (mean and std) and plotted.  Routing runs are recognised
by ``exp.experiment = routing``, forgetting runs by ``forgetting``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
ROUTING_METRICS = ("quality", "cost", "latency_ms", "cost_reduction", "apgr", "cpt50", "cpt80",
                   "cost_reduction_matched", "oracle_agreement")
FORGETTING_METRICS = ("average_accuracy", "forgetting", "backward_transfer", "forgetting_per_10k_updates")


def load_runs(experiment: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """Every finished run of ``experiment``: columns run_id, run_name, params.*, metrics.*."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise SystemExit(f"no MLflow experiment {experiment!r} at {uri}; known: {', '.join(names) or 'none'}")
    rows = []
    for run in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=10_000):
        row = {"run_id": run.info.run_id, "run_name": run.info.run_name}
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def long_table(runs: pd.DataFrame, metric_names: tuple[str, ...], param_cols: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per (run, name) for metrics ``metrics.<name>/<metric>`` with metric in ``metric_names``."""
    records = []
    for _, run in runs.iterrows():
        per_name: dict[str, dict] = {}
        for col, value in run.items():
            if not col.startswith("metrics.") or pd.isna(value):
                continue
            name, _, metric = col[len("metrics."):].rpartition("/")
            if name and metric in metric_names:
                per_name.setdefault(name, {})[metric] = value
        for name, values in per_name.items():
            rec = {"run_id": run["run_id"], "name": name, **values}
            for p in param_cols:
                rec[p] = run.get(f"params.{p}")
            records.append(rec)
    return pd.DataFrame(records)


def summarise(long: pd.DataFrame, by: list[str], metric_names: tuple[str, ...]) -> pd.DataFrame:
    present = [m for m in metric_names if m in long]
    agg = long.groupby(by)[present].agg(["mean", "std", "count"])
    agg.columns = [f"{m}_{s}" for m, s in agg.columns]
    return agg.reset_index()


def plot_bars(table: pd.DataFrame, label: str, metrics: list[str], title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        if f"{m}_mean" not in table:
            ax.set_visible(False)
            continue
        ax.bar(table[label].astype(str), table[f"{m}_mean"], yerr=table[f"{m}_std"].fillna(0), capsize=3)
        ax.set_title(m, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def compare(experiment: str, out: Path, tracking_uri: str | None = None) -> dict[str, pd.DataFrame]:
    runs = load_runs(experiment, tracking_uri)
    if runs.empty:
        raise SystemExit(f"experiment {experiment!r} has no finished runs")
    out.mkdir(parents=True, exist_ok=True)
    kinds = set(runs.get("params.exp.experiment", pd.Series(dtype=str)).dropna())
    tables = {}
    if "routing" in kinds:
        long = long_table(runs[runs["params.exp.experiment"] == "routing"], ROUTING_METRICS, ("exp.n_queries",))
        long = long[~long["name"].str.startswith("tier")]
        table = summarise(long, ["name"], ROUTING_METRICS).rename(columns={"name": "router"})
        tables["routers"] = table.sort_values("apgr_mean", ascending=False) if "apgr_mean" in table else table
        plot_bars(tables["routers"], "router", ["quality", "cost_reduction", "apgr", "oracle_agreement"],
                  f"routers over {long['run_id'].nunique()} run(s) of {experiment}").savefig(out / "routers.png", dpi=120)
    if "forgetting" in kinds:
        long = long_table(runs[runs["params.exp.experiment"] == "forgetting"], FORGETTING_METRICS,
                          ("exp.ewc_lambda", "exp.buffer_size"))
        table = summarise(long, ["name", "exp.ewc_lambda", "exp.buffer_size"], FORGETTING_METRICS)
        tables["methods"] = table.rename(columns={"name": "method"})
        by_method = summarise(long, ["name"], FORGETTING_METRICS).rename(columns={"name": "method"})
        plot_bars(by_method, "method", ["average_accuracy", "forgetting", "forgetting_per_10k_updates"],
                  f"EWC / replay vs naive over {long['run_id'].nunique()} run(s)").savefig(out / "methods.png", dpi=120)
    if not tables:
        raise SystemExit(f"experiment {experiment!r}: no routing or forgetting runs (exp.experiment params: {kinds})")
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    return tables


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", required=True, help="MLflow experiment name")
    ap.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db")
    ap.add_argument("--out", default=str(ROOT / "notebooks" / "out" / "compare"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    tables = compare(args.experiment, out, args.tracking_uri)
    for name, table in tables.items():
        cols = [c for c in table.columns if not c.endswith("_count")]
        print(f"\n## {name}\n")
        print(table[cols].to_markdown(index=False, floatfmt=".3f") if _has_tabulate() else table[cols].to_string())
    print(f"\nfigures and CSV in {out}")
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
