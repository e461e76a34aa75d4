"""Run a notebook over a parameter grid with papermill; every run is one MLflow run in one experiment.

    python experiments/sweep.py experiments/grids/routing_seeds.toml
    python experiments/sweep.py experiments/grids/forgetting_lambda.toml --workers 2
    python experiments/sweep.py GRID.toml --backend ray          # same runs, spread over a Ray cluster
    python experiments/sweep.py GRID.toml --dry-run              # list the runs only

Grid file (TOML)::

    notebook = "notebooks/01_routing.ipynb"   # relative to the repo root
    experiment = "ruvllm-routing-sweep"       # MLflow experiment every run logs to
    workers = 1                               # local process pool size (CLI --workers wins)

    [parameters]                              # the same for every run
    n_queries = 30

    [grid]                                    # cartesian product over these lists
    seed = [0, 1, 2]
    update_every = [4, 8]

Each run gets ``experiment_name`` and a ``run_name`` naming its grid point; executed notebooks
go to ``notebooks/out/<grid stem>/`` (``--out`` to change).  ``MLFLOW_TRACKING_URI`` is passed through to the kernels
(default: ``sqlite:///<repo>/mlruns/mlflow.db``).  The routing outcome cache is shared (and
file-locked), so runs that differ only in router settings never regenerate answers.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    index: int
    notebook: str
    output: str
    parameters: dict[str, Any]


def _slug(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in text)[:40]


def load_grid(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        grid = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"grid file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise SystemExit(f"{path}: invalid TOML: {e}") from None
    unknown = set(grid) - {"notebook", "experiment", "workers", "parameters", "grid"}
    if unknown:
        raise SystemExit(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; "
                         "known: notebook, experiment, workers, parameters, grid")
    if "notebook" not in grid:
        raise SystemExit(f"{path}: name the notebook to run, e.g. notebook = \"notebooks/01_routing.ipynb\"")
    for key, values in grid.get("grid", {}).items():
        if not isinstance(values, list) or not values:
            raise SystemExit(f"{path}: grid.{key} must be a non-empty list of values")
    grid["_stem"] = path.stem
    return grid


def expand(grid: dict[str, Any], out_dir: str | os.PathLike | None = None) -> list[Run]:
    """The cartesian product of ``grid`` over ``parameters``, one Run per point."""
    notebook = str((ROOT / grid["notebook"]).resolve())
    if not Path(notebook).exists():
        raise SystemExit(f"notebook not found: {notebook}")
    experiment = grid.get("experiment", f"ruvllm-{grid['_stem']}")
    fixed = dict(grid.get("parameters", {}))
    axes = grid.get("grid", {})
    keys = list(axes)
    out_dir = Path(out_dir) if out_dir else ROOT / "notebooks" / "out" / grid["_stem"]
    runs = []
    for i, combo in enumerate(itertools.product(*(axes[k] for k in keys)) if keys else [()]):
        point = dict(zip(keys, combo))
        name = f"{grid['_stem']}-{i:03d}" + "".join(f"-{k}={_slug(v)}" for k, v in point.items())
        params = {**fixed, **point, "experiment_name": experiment, "run_name": name}
        runs.append(Run(i, notebook, str(out_dir / f"{name}.ipynb"), params))
    return runs


def execute(run: Run) -> dict[str, Any]:
    """Run one notebook with papermill (in this process); returns a status record."""
    import papermill as pm

    Path(run.output).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(run.notebook, run.output, parameters=run.parameters, kernel_name="python3",
                            cwd=str(ROOT), progress_bar=False, log_output=False)
        status, error = "ok", ""
    except Exception as e:  # a failed run is reported, the sweep goes on
        status, error = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return {"index": run.index, "run_name": run.parameters["run_name"], "status": status, "error": error,
            "seconds": round(time.perf_counter() - t0, 1), "output": run.output}


def run_local(runs: list[Run], workers: int) -> list[dict[str, Any]]:
    if workers <= 1:
        return [_report(execute(r)) for r in runs]
    results = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(execute, r) for r in runs]
        for f in as_completed(futures):
            results.append(_report(f.result()))
    return sorted(results, key=lambda r: r["index"])


def run_ray(runs: list[Run], workers: int) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise SystemExit("--backend ray needs ray: pip install -e '.[ray]' (or use the default local backend)") from None
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, ignore_reinit_error=True,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                       if k in ("MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "RUVLLM_MODEL_DIR")}})
    remote = ray.remote(num_cpus=max(1, (os.cpu_count() or 2) // max(1, workers)))(execute)
    results = [_report(r) for r in ray.get([remote.remote(r) for r in runs])]
    return sorted(results, key=lambda r: r["index"])


def _report(result: dict[str, Any]) -> dict[str, Any]:
    mark = "ok " if result["status"] == "ok" else "FAIL"
    print(f"[{mark}] {result['run_name']} ({result['seconds']} s){' ' + result['error'] if result['error'] else ''}",
          flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grid", help="grid TOML file")
    ap.add_argument("--backend", choices=("local", "ray"), default="local")
    ap.add_argument("--workers", type=int, default=None, help="parallel runs (default: the grid's `workers`, else 1)")
    ap.add_argument("--out", default=None, help="folder for executed notebooks (default: notebooks/out/<grid stem>)")
    ap.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    (ROOT / "mlruns").mkdir(exist_ok=True)
    grid = load_grid(args.grid)
    runs = expand(grid, args.out)
    workers = args.workers or int(grid.get("workers", 1))
    print(f"{len(runs)} runs of {Path(grid['notebook']).name} -> MLflow experiment "
          f"{runs[0].parameters['experiment_name']!r} at {os.environ['MLFLOW_TRACKING_URI']} "
          f"({args.backend}, {workers} worker(s))", flush=True)
    if args.dry_run:
        for r in runs:
            print(r.parameters["run_name"], json.dumps({k: v for k, v in r.parameters.items()
                                                        if k not in ("run_name", "experiment_name")}))
        return 0
    results = run_ray(runs, workers) if args.backend == "ray" else run_local(runs, workers)
    failed = [r for r in results if r["status"] != "ok"]
    print(f"{len(results) - len(failed)}/{len(results)} runs succeeded; executed notebooks in "
          f"{Path(runs[0].output).parent}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
