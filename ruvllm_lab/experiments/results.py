"""Compare experiment runs: per configuration n, mean and 95 % CI, and the difference against a baseline.

The routing, forgetting and compression experiments log one MLflow run each.  A run covers
several seeds and logs a per-seed table (``<kind>_per_seed.csv``: one row per seed and
router / method / compression configuration); runs without one fall back to the logged
metrics ``<name>/<metric>`` (one value per run).  This module turns such runs into tables::

    runs = load_runs(["ruvllm-forgetting-sweep"])          # MLflow: params, metrics
    per_seed = load_per_seed(runs)                          # MLflow: the per-seed artifacts
    report = compare_runs(runs, per_seed=per_seed)          # {kind: Comparison}
    report["forgetting"].table("forgetting")                # narrow: config, method, n, mean, CI, diff vs naive
    report["forgetting"].plot("forgetting")                 # error bars = the 95 % CI

Statistics (stated, so a reader can check them):

* **Replicates** are the seeds: every (run, seed) pair is one replicate, and runs that differ
  only in their seeds (``exp.seeds``, ``system.seed``) pool their seeds.  A *configuration* is
  one value of every other parameter that varies across the runs (the grid's axes, found by
  ``grid_axes``) plus the within-run split (routing's feedback mode), so a sweep over lambda
  gives one row per (lambda, method) with n = the number of seeds.  Nothing is pooled across
  an axis.
* **CI**: Student-t interval over the n runs of a configuration,
  ``mean +- t(0.975, n-1) * sd / sqrt(n)`` (sd with n-1).  It assumes the runs are independent
  draws -- they are: each seed draws its own workload and initialisation.  n = 1 has no interval
  (shown as "n=1, no CI"); small n gives wide intervals, which is the point of showing them.
* **Difference against the baseline** (EWC - naive, router - always-largest, compressed -
  uncompressed): *paired* by (run, seed), because every seed of a run measures the method and
  its baseline on the same workload: ``d = metric(name) - metric(baseline)`` per replicate, then
  the t interval of the ``d``.  Pairing removes the between-seed variance the two means share.
  (The experiments' own summaries use a percentile bootstrap over seeds; with few seeds the t
  interval is the more conservative of the two.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .tracking import default_tracking_uri

DEFAULT_EXPERIMENTS = ("ruvllm-routing-sweep", "ruvllm-forgetting-sweep", "ruvllm-compression-sweep")
CI_LEVEL = 0.95
CI_METHOD = "Student-t over runs (seeds); differences paired by run"
REPLICATE_KEYS = ("system.seed", "exp.seed", "exp.seeds")
# Parameters that differ between runs without making them different configurations.
IGNORED_KEYS = ("system.data_dir", "memory.db_path", "exp.cache_dir", "exp.run_name", "exp.experiment_name",
                "exp.run_tags", "exp.launch_id")


@dataclass(frozen=True)
class Kind:
    """How one experiment names what it compares."""
    entity: str  # column naming the compared thing (router, method, compression configuration)
    baseline: str  # the default baseline entity
    metrics: tuple[str, ...]  # shown by default
    per_seed_table: str  # the run's per-seed artifact
    inner_axes: tuple[str, ...] = ()  # per-seed columns that split one run into configurations
    not_metrics: tuple[str, ...] = ()  # numeric per-seed columns that are not results
    skip_names: tuple[str, ...] = ()  # metric-name prefixes that are not compared things (fallback path)


KINDS: dict[str, Kind] = {
    "routing": Kind("router", "always-largest", ("quality", "cost_reduction", "apgr"), "routing_per_seed.csv",
                    inner_axes=("feedback",), skip_names=("tier", "outcomes", "headroom")),
    "forgetting": Kind("method", "naive", ("average_accuracy", "forgetting"), "forgetting_per_seed.csv",
                       not_metrics=("updates_window", "replay_rows", "train_s")),
    "compression": Kind("config", "flat", ("ratio_nodes", "recall", "answer_quality"), "compression_per_seed.csv",
                        not_metrics=("clusters", "depth", "compress_s", "measure_s")),
}


# ---- loading (MLflow) ---------------------------------------------------------------------------

def load_runs(experiments: str | Sequence[str], tracking_uri: str | None = None,
              statuses: Sequence[str] = ("FINISHED",)) -> pd.DataFrame:
    """Runs of the named MLflow experiments: run_id, run_name, experiment, status, params.*, metrics.*,
    tags.git.* -- one row per run.  Unknown experiment names raise ``KeyError`` naming the known ones."""
    from mlflow.tracking import MlflowClient

    names = [experiments] if isinstance(experiments, str) else list(experiments)
    uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    rows = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = sorted(e.name for e in client.search_experiments())
            raise KeyError(f"no MLflow experiment {name!r} at {uri}; known: {', '.join(known) or 'none'}")
        for run in client.search_runs([exp.experiment_id], max_results=50_000):
            if run.info.status not in statuses:
                continue
            row = {"run_id": run.info.run_id, "run_name": run.info.run_name, "experiment": name,
                   "status": run.info.status}
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            row.update({f"tags.{k}": v for k, v in run.data.tags.items() if k.startswith("git.")})
            rows.append(row)
    return pd.DataFrame(rows)


def kinds_of(runs: pd.DataFrame) -> list[str]:
    """The experiment kinds present (``params.exp.experiment``), in ``KINDS`` order."""
    present = set(runs.get("params.exp.experiment", pd.Series(dtype=object)).dropna())
    return [k for k in KINDS if k in present]


# ---- reshaping ----------------------------------------------------------------------------------

def grid_axes(runs: pd.DataFrame, exclude: Iterable[str] = REPLICATE_KEYS + IGNORED_KEYS) -> list[str]:
    """Parameters (without the ``params.`` prefix) whose value differs between runs, seeds excluded."""
    skip = set(exclude)
    axes = []
    for col in runs.columns:
        if not col.startswith("params."):
            continue
        key = col[len("params."):]
        if key in skip:
            continue
        if runs[col].fillna("<unset>").astype(str).nunique() > 1:
            axes.append(key)
    return axes


def load_per_seed(runs: pd.DataFrame, tracking_uri: str | None = None) -> dict[str, pd.DataFrame]:
    """{run_id: the run's per-seed table} for every run that logged one (``Kind.per_seed_table``)."""
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
    out = {}
    for _, run in runs.iterrows():
        kind = KINDS.get(run.get("params.exp.experiment"))
        if kind is None:
            continue
        names = {a.path for a in client.list_artifacts(run["run_id"])}
        if kind.per_seed_table not in names:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run["run_id"], kind.per_seed_table, tmp)
            out[run["run_id"]] = pd.read_csv(path)
    return out


def long_table(runs: pd.DataFrame, kind: str, params: Sequence[str] = (),
               per_seed: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """One row per replicate and compared name: run_id, seed, <entity>, the inner axes, the parameters
    asked for, one column per metric.  From the run's per-seed table when there is one, else from
    its logged ``<name>/<metric>`` metrics (seed = nan: the run is the replicate)."""
    spec = KINDS[kind]
    frames = []
    for _, run in runs.iterrows():
        table = (per_seed or {}).get(run["run_id"])
        if table is not None:
            df = _from_per_seed(table, spec)
        else:
            df = _from_metrics(run, spec)
        if df.empty:
            continue
        df.insert(0, "run_id", run["run_id"])
        for p in params:
            df[p] = _typed(run.get(f"params.{p}"))
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _from_per_seed(table: pd.DataFrame, spec: Kind) -> pd.DataFrame:
    df = table.copy()
    if spec.entity not in df:  # compression: the configuration tag, as the experiment logs it
        df[spec.entity] = [("flat" if int(c) == 0 else f"c{int(c)}_d{int(d)}_{m}")
                           for c, d, m in zip(df["clusters"], df["depth"], df.get("mode", ["flat"] * len(df)))]
    keep = ["seed", spec.entity, *[a for a in spec.inner_axes if a in df]]
    metrics = [c for c in df.columns if c not in keep and c not in spec.not_metrics and c != "key"
               and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    return df[keep + metrics]


def _from_metrics(run: pd.Series, spec: Kind) -> pd.DataFrame:
    per_name: dict[str, dict[str, float]] = {}
    for col, value in run.items():
        if not isinstance(col, str) or not col.startswith("metrics.") or pd.isna(value):
            continue
        name, _, metric = col[len("metrics."):].rpartition("/")
        if not name or name.split("/")[0] in spec.skip_names or metric.endswith(("_ci_low", "_ci_high", "_lo", "_hi")):
            continue
        per_name.setdefault(name, {})[metric] = float(value)
    return pd.DataFrame([{"seed": math.nan, spec.entity: name, **values} for name, values in per_name.items()])


def _typed(v: Any) -> Any:
    """MLflow params are text: give numbers back their type so axes sort 100 < 1000."""
    if not isinstance(v, str):
        return v
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


# ---- statistics ---------------------------------------------------------------------------------

def t_interval(values: Sequence[float], level: float = CI_LEVEL) -> tuple[int, float, float, float]:
    """(n, mean, low, high): the Student-t interval of the mean; low = high = nan when n < 2."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))], float)
    n = len(x)
    if n == 0:
        return 0, math.nan, math.nan, math.nan
    mean = float(x.mean())
    if n < 2:
        return n, mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return n, mean, mean - half, mean + half


def summarise(long: pd.DataFrame, by: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Tidy: one row per (by..., metric) with n, mean, sd, ci_low, ci_high."""
    rows = []
    present = [m for m in metrics if m in long]
    for key, group in long.groupby(list(by), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        for m in present:
            n, mean, lo, hi = t_interval(group[m].tolist())
            if n == 0:
                continue
            sd = float(np.std(group[m].dropna(), ddof=1)) if n > 1 else math.nan
            rows.append({**dict(zip(by, key)), "metric": m, "n": n, "mean": mean, "sd": sd,
                         "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


def paired_difference(long: pd.DataFrame, entity: str, baseline: str, by: Sequence[str],
                      metrics: Sequence[str], pair_on: Sequence[str] = ("run_id", "seed")) -> pd.DataFrame:
    """Per (by..., entity, metric): mean and t interval of ``metric(entity) - metric(baseline)`` over
    the replicates (``pair_on`` + ``by``) that measured both."""
    cols = [*by, entity, "metric", "n_pairs", "diff", "diff_low", "diff_high"]
    if long.empty or baseline not in set(long[entity]):
        return pd.DataFrame(columns=cols)
    keys = list(dict.fromkeys([*pair_on, *by]))
    base = long[long[entity] == baseline]
    rows = []
    for key, group in long[long[entity] != baseline].groupby([*by, entity], sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        for m in metrics:
            if m not in group or m not in base:
                continue
            joined = group[keys + [m]].merge(base[keys + [m]], on=keys, suffixes=("", "_base"))
            d = (joined[m] - joined[f"{m}_base"]).dropna()
            n, mean, lo, hi = t_interval(d.tolist())
            if n:
                rows.append({**dict(zip([*by, entity], key)), "metric": m, "n_pairs": n, "diff": mean,
                             "diff_low": lo, "diff_high": hi})
    return pd.DataFrame(rows, columns=cols)


# ---- the comparison ----------------------------------------------------------------------------

@dataclass
class Comparison:
    """One experiment kind's runs, reshaped and summarised; ``table``/``plot`` render one metric."""
    kind: str
    axes: list[str]  # configuration parameters (the grid's axes, seeds excluded)
    baseline: str
    long: pd.DataFrame  # one row per (run, name)
    summary: pd.DataFrame  # (axes..., name, metric): n, mean, sd, ci_low, ci_high
    differences: pd.DataFrame  # (axes..., name, metric): n_pairs, diff, diff_low, diff_high
    n_runs: int

    @property
    def entity(self) -> str:
        return KINDS[self.kind].entity

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(self.summary["metric"])) if "metric" in self.summary else []

    def table(self, metric: str, digits: int = 3) -> pd.DataFrame:
        """Narrow: axes..., name, n, mean, 95 % CI, diff vs baseline, its 95 % CI (text cells)."""
        keys = [*self.axes, self.entity]
        s = self.summary[self.summary["metric"] == metric]
        if s.empty:
            raise KeyError(f"{self.kind}: no metric {metric!r}; have {', '.join(self.metrics)}")
        d = self.differences[self.differences["metric"] == metric] if not self.differences.empty else None
        out = s[keys + ["n", "mean", "ci_low", "ci_high"]].copy()
        if d is not None and not d.empty:
            out = out.merge(d[keys + ["n_pairs", "diff", "diff_low", "diff_high"]], on=keys, how="left")
        else:
            out = out.assign(n_pairs=np.nan, diff=np.nan, diff_low=np.nan, diff_high=np.nan)
        fmt = f"{{:.{digits}f}}"

        def ci(lo, hi, n):
            if n is None or (isinstance(n, float) and math.isnan(n)):
                return ""
            return f"n={int(n)}, no CI" if int(n) < 2 else f"[{fmt.format(lo)}, {fmt.format(hi)}]"

        view = out[keys].copy()
        view["n"] = out["n"].astype(int)
        view[metric] = out["mean"].map(fmt.format)
        view["95% CI"] = [ci(lo, hi, n) for lo, hi, n in zip(out["ci_low"], out["ci_high"], out["n"])]
        view[f"diff vs {self.baseline}"] = ["–" if name == self.baseline else ("" if math.isnan(v) else
                                            f"{v:+.{digits}f}") for name, v in zip(out[self.entity], out["diff"])]
        view["diff 95% CI"] = ["" if name == self.baseline else ci(lo, hi, n) for name, lo, hi, n in
                               zip(out[self.entity], out["diff_low"], out["diff_high"], out["n_pairs"])]
        return view.reset_index(drop=True)

    def plot(self, metric: str, ax: Any = None):
        """Mean with 95 % CI error bars per name, one marker/offset per configuration; closes the figure
        (the caller displays the returned figure once)."""
        import matplotlib.pyplot as plt

        s = self.summary[self.summary["metric"] == metric]
        names = list(dict.fromkeys(s[self.entity]))
        configs = list(dict.fromkeys(map(tuple, s[self.axes].to_numpy()))) if self.axes else [()]
        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(names) * max(1, len(configs)) ** 0.5 + 2), 3.6))
        else:
            fig = ax.figure
        markers = "osD^vP*X<>"
        width = 0.7
        for c, config in enumerate(configs):
            sel = s
            for a, v in zip(self.axes, config):
                sel = sel[sel[a] == v]
            sel = sel.set_index(self.entity).reindex(names)
            offset = (c - (len(configs) - 1) / 2) * (width / max(1, len(configs)))
            x = np.arange(len(names)) + offset
            lo = (sel["mean"] - sel["ci_low"]).fillna(0.0).clip(lower=0)
            hi = (sel["ci_high"] - sel["mean"]).fillna(0.0).clip(lower=0)
            label = ", ".join(f"{a}={v}" for a, v in zip(self.axes, config)) or "all runs"
            label += f" (n={int(sel['n'].max())})" if sel["n"].notna().any() else ""
            ax.errorbar(x, sel["mean"], yerr=[lo, hi], fmt=markers[c % len(markers)], capsize=3, ms=6,
                        mfc="white" if c % 2 else None, label=label)
        ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel(self.entity)
        ax.set_ylabel(f"{metric} (mean, 95 % CI)")
        ax.set_title(f"{self.kind}: {metric} over {self.n_runs} run(s)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        if len(configs) > 1 or self.axes:
            ax.legend(fontsize=7, loc="best")
        if own:
            fig.tight_layout()
            plt.close(fig)
        return fig


def compare_runs(runs: pd.DataFrame, baselines: dict[str, str] | None = None,
                 axes: dict[str, Sequence[str]] | None = None,
                 per_seed: dict[str, pd.DataFrame] | None = None) -> dict[str, Comparison]:
    """A ``Comparison`` per experiment kind present in ``runs``.  ``baselines`` / ``axes`` override
    ``KINDS[kind].baseline`` / the detected grid axes per kind; ``per_seed`` (``load_per_seed``)
    makes each seed a replicate."""
    if runs.empty:
        return {}
    baselines, axes = dict(baselines or {}), dict(axes or {})
    out = {}
    for kind in kinds_of(runs):
        spec = KINDS[kind]
        sub = runs[runs["params.exp.experiment"] == kind].dropna(axis=1, how="all")
        by = list(axes.get(kind, grid_axes(sub)))
        long = long_table(sub, kind, by, per_seed)
        if long.empty:
            continue
        inner = [a for a in spec.inner_axes if a in long]
        groups = [*by, *inner]
        metrics = [c for c in long.columns if c not in ("run_id", "seed", spec.entity, *groups)
                   and pd.api.types.is_numeric_dtype(long[c])]
        baseline = baselines.get(kind, spec.baseline)
        summary = summarise(long, [*groups, spec.entity], metrics)
        diffs = paired_difference(long, spec.entity, baseline, groups, metrics)
        out[kind] = Comparison(kind, groups, baseline, long, summary, diffs, n_runs=int(sub["run_id"].nunique()))
    return out
