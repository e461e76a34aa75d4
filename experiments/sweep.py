"""Run a notebook over a parameter grid with papermill; every run is one MLflow run in one experiment.

    python experiments/sweep.py experiments/grids/routing_seeds.toml
    python experiments/sweep.py experiments/grids/forgetting_lambda.toml --workers 2
    python experiments/sweep.py GRID.toml -p n_queries 20 -p tiers '["smollm2-135m","gemma3-270m"]'
    python experiments/sweep.py notebooks/02_forgetting.ipynb -p methods '["naive","ewc"]'   # one run
    python experiments/sweep.py GRID.toml --backend ray          # same runs, spread over a Ray cluster
    python experiments/sweep.py GRID.toml --dry-run              # list the runs only

``-p NAME VALUE`` sets a parameter for every run (it wins over the grid file's
``[parameters]``); VALUE is read as JSON when it parses (numbers, lists, objects, true/false),
else taken as text.  A progress bar counts runs (i/n, elapsed, ETA) and each finished run
prints one line.  ``--backend ray`` needs the optional extra: ``pip install -e '.[ray]'``.

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
go to ``runs/notebooks/<grid stem>/`` (``--out`` to change) and are attached to their MLflow run
(``ruvllm_lab.experiments.runner``; a run whose notebook failed is ended FAILED).  ``MLFLOW_TRACKING_URI`` is passed through to the kernels
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
    if path.suffix == ".ipynb":  # one notebook, one run: a grid with no axes
        return {"notebook": str(path.resolve()), "_stem": path.stem, "_single": True}
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
    single = grid.get("_single", False)  # one notebook: its own experiment_name default stands
    experiment = grid.get("experiment", None if single else f"ruvllm-{grid['_stem']}")
    fixed = dict(grid.get("parameters", {}))
    axes = grid.get("grid", {})
    keys = list(axes)
    out_dir = Path(out_dir) if out_dir else ROOT / "runs" / "notebooks" / grid["_stem"]
    runs = []
    for i, combo in enumerate(itertools.product(*(axes[k] for k in keys)) if keys else [()]):
        point = dict(zip(keys, combo))
        name = (f"{grid['_stem']}-{time.strftime('%m%d-%H%M%S')}" if single else
                f"{grid['_stem']}-{i:03d}" + "".join(f"-{k}={_slug(v)}" for k, v in point.items()))
        params = {**fixed, **point}
        if experiment:
            params.setdefault("experiment_name", experiment)
        params.setdefault("run_name", name)
        name = _slug(params["run_name"]) if params["run_name"] != name else name
        runs.append(Run(i, notebook, str(out_dir / f"{name}.ipynb"), params))
    return runs


def execute(run: Run) -> dict[str, Any]:
    """Run one notebook with papermill (in this process); returns a status record."""
    from ruvllm_lab.experiments.runner import execute_record
    return execute_record(run.index, run.notebook, run.output, run.parameters, str(ROOT))


def parse_value(text: str) -> Any:
    """``-p`` values: JSON when it parses (``3``, ``0.5``, ``true``, ``["a","b"]``), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _progress(n: int):
    from tqdm.auto import tqdm
    return tqdm(total=n, desc="sweep", unit="run", dynamic_ncols=True)


def run_local(runs: list[Run], workers: int) -> list[dict[str, Any]]:
    results = []
    with _progress(len(runs)) as bar:
        if workers <= 1:
            for r in runs:
                bar.set_postfix_str(r.parameters["run_name"][-40:])
                results.append(_report(execute(r), bar))
        else:
            from ruvllm_lab.experiments.runner import execute_record
            with ProcessPoolExecutor(max_workers=workers) as pool:  # plain arguments: any start method works
                futures = [pool.submit(execute_record, r.index, r.notebook, r.output, r.parameters, str(ROOT))
                           for r in runs]
                for f in as_completed(futures):
                    results.append(_report(f.result(), bar))
    return sorted(results, key=lambda r: r["index"])


def run_ray(runs: list[Run], workers: int) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise SystemExit("--backend ray needs the optional ray extra: pip install -e '.[ray]' "
                         "(or use the default local backend)") from None
    env = {k: v for k, v in os.environ.items()
           if k in ("MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RUVLLM_MODEL_DIR",
                    "TOKENIZERS_PARALLELISM")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    started_here = not ray.is_initialized()
    if started_here:
        address = os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                 runtime_env={"env_vars": env}, **({} if address else {"num_cpus": max(1, workers)}))
    try:
        from ruvllm_lab.experiments.runner import execute_record  # importable on every worker
        remote = ray.remote(num_cpus=1)(execute_record)
        pending = {remote.remote(r.index, r.notebook, r.output, r.parameters, str(ROOT)): r for r in runs}
        results = []
        with _progress(len(runs)) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    pending.pop(ref)
                    results.append(_report(ray.get(ref), bar))
    finally:
        if started_here:
            ray.shutdown()
    return sorted(results, key=lambda r: r["index"])


def _report(result: dict[str, Any], bar: Any = None) -> dict[str, Any]:
    mark = "ok " if result["status"] == "ok" else "FAIL"
    line = f"[{mark}] {result['run_name']} ({result['seconds']} s){' ' + result['error'] if result['error'] else ''}"
    if bar is not None:
        bar.write(line)
        bar.update(1)
    else:
        print(line, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grid", help="grid TOML file, or one notebook (.ipynb) to run once")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="set a parameter for every run; VALUE is JSON when it parses (lists: '[\"a\",\"b\"]')")
    ap.add_argument("--backend", choices=("local", "ray"), default="local")
    ap.add_argument("--workers", type=int, default=None, help="parallel runs (default: the grid's `workers`, else 1)")
    ap.add_argument("--out", default=None, help="folder for executed notebooks (default: runs/notebooks/<grid stem>)")
    ap.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    (ROOT / "mlruns").mkdir(exist_ok=True)
    grid = load_grid(args.grid)
    if args.parameter:
        grid["parameters"] = {**grid.get("parameters", {}), **{k: parse_value(v) for k, v in args.parameter}}
        clash = set(grid["parameters"]) & set(grid.get("grid", {}))
        if clash:
            raise SystemExit(f"-p {', '.join(sorted(clash))}: already a grid axis in {args.grid}")
    runs = expand(grid, args.out)
    workers = args.workers or int(grid.get("workers", 1))
    print(f"{len(runs)} runs of {Path(grid['notebook']).name} -> MLflow experiment "
          f"{runs[0].parameters.get('experiment_name', '(the notebook default)')!r} at {os.environ['MLFLOW_TRACKING_URI']} "
          f"({args.backend}, {workers} worker(s))", flush=True)
    if args.dry_run:
        for r in runs:
            print(r.parameters["run_name"], json.dumps({k: v for k, v in r.parameters.items()
                                                        if k not in ("run_name", "experiment_name")}, default=str))
        return 0
    results = run_ray(runs, workers) if args.backend == "ray" else run_local(runs, workers)
    failed = [r for r in results if r["status"] != "ok"]
    print(f"{len(results) - len(failed)}/{len(results)} runs succeeded; executed notebooks in "
          f"{Path(runs[0].output).parent}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
