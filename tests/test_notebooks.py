"""The four notebooks run headless through papermill with tiny parameters, each leaving an MLflow
run with its metrics; the sweep runner and the MLflow comparison work on real runs."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NB = ROOT / "notebooks"
TIERS = ["smollm2-135m", "gemma3-270m"]


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


def _only_run(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"notebook did not create MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    return client, run, {a.path for a in client.list_artifacts(run.info.run_id)}


def _execute(name: str, tmp_path: Path, **parameters) -> nbformat.NotebookNode:
    import papermill as pm
    out = tmp_path / name
    pm.execute_notebook(str(NB / name), str(out), parameters=parameters, kernel_name="python3", cwd=str(tmp_path),
                        progress_bar=False)
    return nbformat.read(out, as_version=4)


def test_notebooks_have_a_parameters_cell_first_and_match_the_generator():
    gen = _load_script("make_notebooks")
    assert set(gen.NOTEBOOKS) == {p.name for p in NB.glob("*.ipynb")}
    for name, expected in gen.NOTEBOOKS.items():
        nb = nbformat.read(NB / name, as_version=4)
        nbformat.validate(nb)
        assert nb.cells[0].metadata.get("tags") == ["parameters"], name
        assert "experiment_name" in nb.cells[0].source
        # the committed notebook is what the generator writes (edit the generator, then regenerate)
        assert [c.source for c in nb.cells] == [c.source for c in expected.cells], name
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "MLflowTracker" in code and "import mlflow" not in code


@pytest.mark.slow
@pytest.mark.model
def test_quickstart_notebook(tmp_path, mlflow_uri):
    _execute("00_quickstart.ipynb", tmp_path, max_tokens=16, experiment_name="nb-quickstart")
    _, run, artifacts = _only_run(mlflow_uri, "nb-quickstart")
    m = run.data.metrics
    assert m["first/latency_ms"] > 0
    assert m["feedback/recorded"] == 1.0
    assert m["memory/nodes"] >= 3  # two interactions and a correction
    assert "memory_graph.png" in artifacts and "config.toml" in artifacts


@pytest.mark.slow
@pytest.mark.model
def test_routing_notebook(tmp_path, mlflow_uri):
    nb = _execute("01_routing.ipynb", tmp_path, tiers=TIERS, n_queries=6, max_tokens=8, update_every=3,
                  cache_dir=str(tmp_path / "cache"), experiment_name="nb-routing")
    _, run, artifacts = _only_run(mlflow_uri, "nb-routing")
    m = run.data.metrics
    for router in ("fastgrnn", "knn", "logreg", "random", "always-smallest", "always-largest", "oracle"):
        for key in ("quality", "cost", "cost_reduction", "oracle_agreement", "latency_ms"):
            assert f"{router}/{key}" in m, f"{router}/{key}"
    assert m["oracle/oracle_agreement"] == 1.0
    assert m["always-largest/cost_reduction"] == pytest.approx(0.0)
    assert m["outcomes/queries"] == 6
    assert {"cost_quality.png", "routing_summary.csv", "routing_summary.md"} <= artifacts
    assert "cost-quality figure:" in json.dumps(nb.cells[-1].outputs)


@pytest.mark.slow
def test_forgetting_notebook(tmp_path, mlflow_uri):
    _execute("02_forgetting.ipynb", tmp_path, n_per_phase=24, epochs_per_phase=10, experiment_name="nb-forgetting")
    _, run, artifacts = _only_run(mlflow_uri, "nb-forgetting")
    m = run.data.metrics
    for method in ("naive", "ewc", "replay", "ewc_replay"):
        for key in ("average_accuracy", "forgetting", "backward_transfer", "forgetting_per_10k_updates"):
            assert f"{method}/{key}" in m
        assert 0.0 <= m[f"{method}/average_accuracy"] <= 1.0
        assert m[f"{method}/backward_transfer"] == pytest.approx(-m[f"{method}/forgetting"])
    assert run.data.params["exp.ewc_lambda"] == "10000.0"
    assert {"accuracy_over_time.png", "forgetting_summary.csv", "accuracy_matrix_naive.csv"} <= artifacts


@pytest.mark.slow
@pytest.mark.model
def test_compression_notebook(tmp_path, mlflow_uri):
    _execute("03_compression.ipynb", tmp_path, n_interactions=16, cluster_counts=[2], depths=[1], n_eval=3,
             experiment_name="nb-compression")
    _, run, artifacts = _only_run(mlflow_uri, "nb-compression")
    m = run.data.metrics
    assert m["baseline/compression_ratio"] == 1.0
    assert m["c2_d1/compression_ratio"] > 1.0
    assert 0.0 <= m["c2_d1/recall"] <= 1.0 and 0.0 <= m["c2_d1/answer_quality"] <= 1.0
    assert {"ratio_recall.png", "compression_summary.csv"} <= artifacts


# ---- sweeps and comparison --------------------------------------------------------------------------

def test_sweep_grid_expansion_and_errors(tmp_path):
    sweep = _load_script("sweep")
    grid_file = tmp_path / "g.toml"
    grid_file.write_text('notebook = "notebooks/02_forgetting.ipynb"\nexperiment = "e"\n'
                         '[parameters]\nn_per_phase = 10\n[grid]\nseed = [0, 1]\newc_lambda = [1.0, 2.0, 3.0]\n')
    runs = sweep.expand(sweep.load_grid(grid_file))
    assert len(runs) == 6
    assert {(r.parameters["seed"], r.parameters["ewc_lambda"]) for r in runs} == {(s, l) for s in (0, 1)
                                                                                 for l in (1.0, 2.0, 3.0)}
    assert all(r.parameters["experiment_name"] == "e" and r.parameters["n_per_phase"] == 10 for r in runs)
    assert len({r.parameters["run_name"] for r in runs}) == 6
    for example in (ROOT / "experiments" / "grids").glob("*.toml"):
        assert sweep.expand(sweep.load_grid(example))  # the shipped grids are valid
    grid_file.write_text('notebook = "notebooks/02_forgetting.ipynb"\n[grid]\nseed = 3\n')
    with pytest.raises(SystemExit, match="non-empty list"):
        sweep.load_grid(grid_file)
    grid_file.write_text('notebok = "x"\n')
    with pytest.raises(SystemExit, match="unknown key"):
        sweep.load_grid(grid_file)


@pytest.mark.slow
def test_sweep_then_compare_ewc_against_naive(tmp_path, mlflow_uri):
    sweep, compare = _load_script("sweep"), _load_script("compare")
    grid_file = tmp_path / "tiny_forgetting.toml"
    grid_file.write_text('notebook = "notebooks/02_forgetting.ipynb"\nexperiment = "sweep-test"\n'
                         '[parameters]\nn_per_phase = 24\nepochs_per_phase = 8\nmethods = ["naive", "ewc"]\n'
                         '[grid]\newc_lambda = [100.0, 10000.0]\n')
    assert sweep.main([str(grid_file), "--workers", "2", "--out", str(tmp_path / "executed")]) == 0
    assert len(list((tmp_path / "executed").glob("*.ipynb"))) == 2
    runs = compare.load_runs("sweep-test", mlflow_uri)
    assert len(runs) == 2 and set(runs["params.exp.ewc_lambda"]) == {"100.0", "10000.0"}
    tables = compare.compare("sweep-test", tmp_path / "cmp", mlflow_uri)
    methods = tables["methods"]
    assert set(methods["method"]) == {"naive", "ewc"}
    assert len(methods) == 4  # (method, lambda) pairs
    naive = methods[methods["method"] == "naive"]
    assert (naive["average_accuracy_count"] == 1).all()
    assert (tmp_path / "cmp" / "methods.png").exists() and (tmp_path / "cmp" / "methods.csv").exists()
