"""Compare MLflow runs of the routing, forgetting and compression experiments: n, mean, 95 % CI, diff vs baseline.

    python experiments/compare.py                                    # the three sweep experiments that exist
    python experiments/compare.py --experiment ruvllm-forgetting-sweep --metric forgetting
    python experiments/compare.py --experiment ruvllm-routing-sweep --baseline routing=always-smallest

Runs are grouped by the grid's parameters (every parameter that varies across runs, seeds
excepted); each configuration shows n (replicates: the seeds of its runs, from each run's
per-seed table), the mean and a Student-t 95 % CI, and the difference against the baseline
(router - always-largest, method - naive, compressed - uncompressed ``flat`` by default)
paired by (run, seed), with its own t interval.  The logic is
``ruvllm_lab.experiments.results`` (its docstring states the statistics); this script prints one
narrow table per metric and writes them as CSV with one error-bar figure per metric to ``--out``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ruvllm_lab.experiments import results as R

ROOT = Path(__file__).resolve().parent.parent


def _markdown(df) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def compare(experiments: list[str], out: Path | None = None, tracking_uri: str | None = None,
            baselines: dict[str, str] | None = None, metrics: list[str] | None = None,
            by: list[str] | None = None, quiet: bool = False) -> dict[str, R.Comparison]:
    """Load, compare and (with ``out``) write ``<kind>_<metric>.csv|png``; returns the comparisons."""
    found, missing = [], []
    for name in experiments:
        try:
            found.append(R.load_runs(name, tracking_uri))
        except KeyError as e:
            missing.append(str(e.args[0]))
    if not found:
        raise SystemExit("\n".join(missing) or "no experiments given")
    import pandas as pd

    runs = pd.concat(found, ignore_index=True)
    comparisons = R.compare_runs(runs, baselines, {k: by for k in R.KINDS} if by else None,
                                 per_seed=R.load_per_seed(runs, tracking_uri))
    if not comparisons:
        raise SystemExit(f"no finished routing, forgetting or compression runs in {', '.join(experiments)}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for kind, cmp in comparisons.items():
        shown = [m for m in (metrics or R.KINDS[kind].metrics) if m in cmp.metrics]
        if not quiet:
            axes = ", ".join(cmp.axes) or "none (one configuration)"
            print(f"\n## {kind}: {cmp.n_runs} run(s); configurations by {axes}; baseline {cmp.baseline!r}; "
                  f"CI: {R.CI_METHOD}")
        for metric in shown:
            table = cmp.table(metric)
            if not quiet:
                print(f"\n### {metric}\n")
                print(_markdown(table))
            if out is not None:
                table.to_csv(out / f"{kind}_{metric}.csv", index=False)
                cmp.plot(metric).savefig(out / f"{kind}_{metric}.png", dpi=120, bbox_inches="tight")
    for m in missing:
        print(f"(skipped: {m})", file=sys.stderr)
    if out is not None and not quiet:
        print(f"\nCSV and figures in {out}")
    return comparisons


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", action="append", default=None,
                    help=f"MLflow experiment name (repeatable; default: {', '.join(R.DEFAULT_EXPERIMENTS)})")
    ap.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db")
    ap.add_argument("--baseline", action="append", default=[], metavar="KIND=NAME",
                    help="e.g. routing=always-smallest, forgetting=ewc (defaults: "
                         + ", ".join(f"{k}={v.baseline}" for k, v in R.KINDS.items()) + ")")
    ap.add_argument("--metric", action="append", default=None, help="metric to show (repeatable; default: a few per kind)")
    ap.add_argument("--by", action="append", default=None, help="group by these params instead of the detected grid axes")
    ap.add_argument("--out", default=str(ROOT / "runs" / "compare"), help="CSV and figures (default: runs/compare)")
    args = ap.parse_args(argv)
    baselines = {}
    for item in args.baseline:
        kind, sep, name = item.partition("=")
        if not sep or kind not in R.KINDS:
            ap.error(f"--baseline {item!r}: expected KIND=NAME with KIND one of {', '.join(R.KINDS)}")
        baselines[kind] = name
    compare(args.experiment or list(R.DEFAULT_EXPERIMENTS), Path(args.out), args.tracking_uri, baselines,
            args.metric, args.by)
    return 0


if __name__ == "__main__":
    sys.exit(main())
