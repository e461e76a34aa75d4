"""The notebooks run headless through papermill with tiny parameters, each leaving an MLflow run whose
params match what ran, its executed notebook attached, each figure shown once and no progress junk;
the sweep runner (local and Ray) and the results notebook work on real runs."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nbformat
import pytest

from ruvllm_lab.experiments import runner
from ruvllm_lab.experiments.tracking import logged_key, param_value

ROOT = Path(__file__).resolve().parent.parent
NB = ROOT / "notebooks"
TIERS = ["smollm2-135m", "gemma3-270m"]
NOT_EXPERIMENT_PARAMS = {"experiment_name", "run_name", "run_tags", "cache_dir"}  # where a run goes, not what ran


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # papermill kernels inherit the environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return uri


def _execute(name: str, tmp_path: Path, **parameters):
    """Run a notebook the way the sweep does; returns (executed notebook, MLflow run, artifact paths)."""
    from mlflow.tracking import MlflowClient
    record = runner.execute_notebook(NB / name, tmp_path / "out" / name, parameters, cwd=tmp_path)
    assert record["status"] == "ok", record["error"]
    client = MlflowClient()
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert f"notebook/{name}" in {a.path for a in client.list_artifacts(run.info.run_id, "notebook")}
    assert "config.toml" in artifacts
    return nbformat.read(tmp_path / "out" / name, as_version=4), run, artifacts


def _defaults(name: str) -> dict:
    import papermill as pm
    return {k: v["default"] for k, v in pm.inspect_notebook(str(NB / name)).items()}


def _assert_params_match(name: str, run, executed: dict) -> None:
    """Every parameter the notebook ran with is logged once, with the value it ran with."""
    import ast
    params = run.data.params
    values = {}
    for key, default in _defaults(name).items():
        values[key] = executed.get(key, ast.literal_eval(default))
    for key, value in values.items():
        if key in NOT_EXPERIMENT_PARAMS or (key == "workload_path" and not value):
            continue
        if isinstance(value, str) and value.startswith("["):
            value = json.loads(value)  # passed as JSON text, run as a list
        logged = logged_key(key)
        assert logged in params, f"{name}: parameter {key} is not logged (expected {logged})"
        assert params[logged] == str(param_value(value)), f"{name}: {key} ran as {value!r}, logged {params[logged]!r}"
    assert not (set(params) & {"exp.seed", "exp.max_tokens", "exp.buffer_size"})  # one name per value


def _assert_clean_outputs(nb, n_figures: int) -> None:
    """Each figure once (one image output per figure) and no progress bars in the saved notebook."""
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == n_figures
    text = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert runner.WIDGET_MIME not in text and "%|" not in text
    assert "without encryption" not in text


def test_notebooks_have_a_parameters_cell_first_and_match_the_generator():
    gen = _load_script("make_notebooks")
    assert set(gen.NOTEBOOKS) == {p.name for p in NB.glob("*.ipynb")}
    for name, expected in gen.NOTEBOOKS.items():
        nb = nbformat.read(NB / name, as_version=4)
        nbformat.validate(nb)
        assert nb.cells[0].metadata.get("tags") == ["parameters"], name
        assert nb.metadata["kernelspec"]["name"] == "ruvllm-lab", name  # the venv's kernel in JupyterLab
        assert nb.metadata["language_info"]["name"] == "python" and "version" in nb.metadata["language_info"]
        # the committed notebook is what the generator writes (edit the generator, then regenerate), saved clean
        assert [c.source for c in nb.cells] == [c.source for c in expected.cells], name
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "import mlflow" not in code and "plt.ioff()" in code
        if name != "04_results.ipynb":
            assert "experiment_name" in nb.cells[0].source and "open_notebook_run(" in code, name
        # papermill parses every parameter (its --help-notebook and inspect_notebook; a comment with '=' breaks it)
        import ast
        import papermill as pm
        names = [t.id for node in ast.parse(nb.cells[0].source).body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name)]
        assert list(pm.inspect_notebook(str(NB / name))) == names, name
    # every list/dict parameter accepts JSON text (papermill -p passes text)
    forgetting = nbformat.read(NB / "02_forgetting.ipynb", as_version=4)
    assert 'methods = json_param(methods, "methods", list)' in forgetting.cells[2].source


@pytest.mark.slow
@pytest.mark.model
def test_quickstart_notebook(tmp_path, mlflow_uri):
    nb, run, artifacts = _execute("00_quickstart.ipynb", tmp_path, max_tokens=16, experiment_name="nb-quickstart")
    m = run.data.metrics
    assert m["first/latency_ms"] > 0
    assert m["feedback/recorded"] == 1.0
    assert m["memory/nodes"] >= 3  # two interactions and a correction
    assert "memory_graph.png" in artifacts
    assert run.data.params["inference.max_tokens"] == "16" and run.data.params["exp.question"]
    _assert_clean_outputs(nb, 1)


@pytest.mark.slow
def test_forgetting_notebook_params_match_what_ran(tmp_path, mlflow_uri):
    params = dict(pool_size=48, seeds=[0, 1], steps_per_phase=12, labels="synthetic-rule", ewc_lambda=500.0,
                  methods='["naive", "ewc"]', experiment_name="nb-forgetting")  # a list as `-p` passes it
    nb, run, artifacts = _execute("02_forgetting.ipynb", tmp_path, **params)
    m = run.data.metrics
    for method in ("naive", "ewc"):
        for key in ("average_accuracy", "forgetting", "backward_transfer"):
            assert f"{method}/{key}" in m
        assert 0.0 <= m[f"{method}/average_accuracy"] <= 1.0
    assert "replay/average_accuracy" not in m  # the JSON list was honoured
    assert run.data.params["learning.ewc_lambda"] == "500.0"
    _assert_params_match("02_forgetting.ipynb", run, params)
    assert {"accuracy_over_time.png", "forgetting_summary.csv", "forgetting_per_seed.csv"} <= artifacts
    _assert_clean_outputs(nb, 2)


@pytest.mark.slow
@pytest.mark.model
def test_routing_notebook_params_match_what_ran(tmp_path, mlflow_uri):
    params = dict(tiers=TIERS, n_queries=6, seeds=[0, 1], max_tokens=8, update_every=3,
                  routers=["fastgrnn", "always-smallest", "always-largest", "oracle"],
                  cache_dir=str(tmp_path / "cache"), experiment_name="nb-routing")
    nb, run, artifacts = _execute("01_routing.ipynb", tmp_path, **params)
    m = run.data.metrics
    for router in params["routers"]:
        assert f"bandit/{router}/quality" in m, router
    assert m["outcomes/queries"] == 6
    assert {"cost_quality.png", "routing_summary.csv", "routing_per_seed.csv"} <= artifacts
    _assert_params_match("01_routing.ipynb", run, params)
    assert "cost-quality figure:" in json.dumps(nb.cells[-1].outputs)
    _assert_clean_outputs(nb, 2)


@pytest.mark.slow
@pytest.mark.model
def test_routing_notebook_on_the_four_tier_server_profile(tmp_path, mlflow_uri):
    """All four tiers of server-cpu; its embedder (an LLM tier when embedding.model = llm-encoder) is built
    by the experiment itself."""
    from ruvllm_lab.config import Config
    profile = Config.load(ROOT / "configs" / "server-cpu.toml")
    tiers = profile.inference.models
    assert len(tiers) == 4
    nb, run, _ = _execute("01_routing.ipynb", tmp_path, config_path="configs/server-cpu.toml", tiers=tiers,
                          n_queries=4, seeds=[0], max_tokens=6, update_every=2,
                          routers=["fastgrnn", "always-largest"], cache_dir=str(tmp_path / "cache"),
                          experiment_name="nb-routing-server")
    assert run.data.params["embedding.model"] == profile.embedding.model
    assert run.data.params["exp.tiers"] == ",".join(tiers)
    assert run.data.metrics["bandit/always-largest/cost_reduction"] == pytest.approx(0.0)


@pytest.mark.slow
@pytest.mark.model
def test_compression_notebook(tmp_path, mlflow_uri):
    nb, run, artifacts = _execute("03_compression.ipynb", tmp_path, n_interactions=16, cluster_counts=[2], depths=[1],
                                  seeds=[0], n_eval=3, modes=["descent"], summaries="extractive",
                                  answer_quality=False, experiment_name="nb-compression")
    assert {"ratio_recall.png", "compression_summary.csv"} <= artifacts
    _assert_clean_outputs(nb, 1)


# ---- sweeps and comparison --------------------------------------------------------------------------

def test_sweep_grid_expansion_parameters_and_errors(tmp_path):
    sweep = _load_script("sweep")
    grid_file = tmp_path / "g.toml"
    grid_file.write_text('notebook = "notebooks/02_forgetting.ipynb"\nexperiment = "e"\n'
                         '[parameters]\npool_size = 10\n[grid]\newc_lambda = [1.0, 2.0, 3.0]\nreplay_fraction = [0.1, 0.2]\n')
    runs = sweep.expand(sweep.load_grid(grid_file))
    assert len(runs) == 6
    assert {(r.parameters["replay_fraction"], r.parameters["ewc_lambda"]) for r in runs} == {
        (f, l) for f in (0.1, 0.2) for l in (1.0, 2.0, 3.0)}
    assert all(r.parameters["experiment_name"] == "e" and r.parameters["pool_size"] == 10 for r in runs)
    assert len({r.parameters["run_name"] for r in runs}) == 6
    assert all(Path(r.output).parent == ROOT / "runs" / "notebooks" / "g" for r in runs)  # not in notebooks/
    for example in (ROOT / "experiments" / "grids").glob("*.toml"):
        assert sweep.expand(sweep.load_grid(example))  # the shipped grids are valid
    # -p values are JSON when they parse: a list arrives as a list
    assert sweep.parse_value('["naive","ewc"]') == ["naive", "ewc"]
    assert sweep.parse_value("3") == 3 and sweep.parse_value("configs/edge.toml") == "configs/edge.toml"
    # one notebook, one run: the notebook's own experiment name stands
    single = sweep.expand(sweep.load_grid(NB / "02_forgetting.ipynb"))
    assert len(single) == 1 and "experiment_name" not in single[0].parameters
    grid_file.write_text('notebook = "notebooks/02_forgetting.ipynb"\n[grid]\nseeds = 3\n')
    with pytest.raises(SystemExit, match="non-empty list"):
        sweep.load_grid(grid_file)
    grid_file.write_text('notebok = "x"\n')
    with pytest.raises(SystemExit, match="unknown key"):
        sweep.load_grid(grid_file)


@pytest.mark.slow
def test_sweep_then_compare_and_the_results_notebook(tmp_path, mlflow_uri, capsys):
    sweep, compare = _load_script("sweep"), _load_script("compare")
    grid_file = tmp_path / "tiny_forgetting.toml"
    grid_file.write_text('notebook = "notebooks/02_forgetting.ipynb"\nexperiment = "sweep-test"\n'
                         '[parameters]\npool_size = 48\nsteps_per_phase = 10\nlabels = "synthetic-rule"\n'
                         '[grid]\newc_lambda = [100.0, 10000.0]\n')
    assert sweep.main([str(grid_file), "--workers", "2", "--out", str(tmp_path / "executed"),
                       "-p", "methods", '["naive","ewc"]', "-p", "seeds", "[0,1]"]) == 0
    err = capsys.readouterr().err
    assert "2/2" in err and "sweep" in err  # the run counter
    assert len(list((tmp_path / "executed").glob("*.ipynb"))) == 2
    report = compare.compare(["sweep-test"], tmp_path / "cmp", mlflow_uri, quiet=True)
    cmp = report["forgetting"]
    assert cmp.axes == ["learning.ewc_lambda"] and cmp.n_runs == 2
    table = cmp.table("forgetting")
    assert set(table["method"]) == {"naive", "ewc"} and len(table) == 4  # (lambda, method) pairs
    assert (table["n"] == 2).all()  # two seeds per run
    assert (tmp_path / "cmp" / "forgetting_forgetting.png").exists()
    out = tmp_path / "results.ipynb"
    record = runner.execute_notebook(NB / "04_results.ipynb", out, {"experiments": ["sweep-test", "missing"],
                                                                   "out_dir": str(tmp_path / "nbcmp")}, cwd=tmp_path)
    assert record["status"] == "ok", record["error"]
    nb = nbformat.read(out, as_version=4)
    text = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert "skipped:" in text and "diff vs naive" in text and "95% CI" in text
    _assert_clean_outputs(nb, len(_default_metrics("forgetting")))
    assert (tmp_path / "nbcmp" / "forgetting_average_accuracy.csv").exists()


def _default_metrics(kind: str):
    from ruvllm_lab.experiments.results import KINDS
    return KINDS[kind].metrics


def _tiny_notebook(path: Path) -> Path:
    from nbformat.v4 import new_code_cell, new_notebook
    params = new_code_cell('experiment_name = "tiny"\nrun_name = ""\nrun_tags = {}\nx = 1\n')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[params, new_code_cell(
        "import os\nfrom ruvllm_lab.experiments.runner import open_notebook_run\n"
        'tracker = open_notebook_run("99_tiny", experiment_name, run_name, run_tags, log={"x": x})\n'
        "tracker.log_metrics({'square': x * x, 'pid': os.getpid()})\ntracker.end()")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_sweep_on_a_real_local_ray_runtime(tmp_path, mlflow_uri, monkeypatch):
    pytest.importorskip("ray", reason="the optional ray extra: pip install -e '.[ray]'")
    from mlflow.tracking import MlflowClient
    sweep = _load_script("sweep")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    nb = _tiny_notebook(tmp_path / "tiny.ipynb")
    grid_file = tmp_path / "ray.toml"
    grid_file.write_text(f'notebook = "{nb}"\nexperiment = "ray-sweep"\n[grid]\nx = [2, 3]\n')
    assert sweep.main([str(grid_file), "--backend", "ray", "--workers", "1", "--out", str(tmp_path / "executed")]) == 0
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("ray-sweep").experiment_id])
    assert sorted(r.data.metrics["square"] for r in runs) == [4.0, 9.0]
    assert all(r.info.status == "FINISHED" for r in runs)
    import os
    assert all(r.data.metrics["pid"] != os.getpid() for r in runs)  # ran in kernels of Ray workers
