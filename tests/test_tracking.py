"""Logging that tells the truth: each value once, experiment values in the config, git tags,
one value per metric step, failed notebooks end FAILED, the executed notebook attached and clean."""
from __future__ import annotations

import subprocess
import tomllib

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from ruvllm_lab.config import Config
from ruvllm_lab.experiments import runner
from ruvllm_lab.experiments.tracking import (CONFIG_KEYS, MemoryTracker, MLflowTracker, git_tags, log_experiment,
                                             logged_key, param_value, readable_run_name)

from .conftest import ROOT


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # papermill kernels inherit it
    return uri


def _client(uri):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def test_experiment_values_replace_the_config_values_they_override(mlflow_uri):
    cfg = Config.load(ROOT / "configs" / "edge.toml")
    params = {"experiment": "forgetting", "seed": 3, "max_tokens": 16, "buffer_size": 20, "ewc_lambda": 5.0,
              "tiers": "smollm2-135m,gemma3-270m", "methods": ["naive", "ewc"]}
    assert cfg.system.seed != 3 and cfg.inference.max_tokens != 16 and cfg.learning.replay_capacity != 20
    with MLflowTracker(experiment="truth") as tr:
        resolved = log_experiment(tr, cfg, params)
    run = _client(mlflow_uri).get_run(tr.run_id)
    p = run.data.params
    # one seed, one max_tokens, one buffer size: under the config key, with the experiment's value
    assert (p["system.seed"], p["inference.max_tokens"], p["learning.replay_capacity"]) == ("3", "16", "20")
    assert p["learning.ewc_lambda"] == "5.0"
    for name in ("seed", "max_tokens", "buffer_size", "ewc_lambda"):
        assert f"exp.{name}" not in p and logged_key(name) == CONFIG_KEYS[name]
    assert p["exp.methods"] == "naive,ewc" and p["exp.tiers"] == "smollm2-135m,gemma3-270m"
    assert (resolved.system.seed, resolved.learning.replay_capacity) == (3, 20)
    # the config.toml artifact is the resolved config plus every experiment parameter
    path = _client(mlflow_uri).download_artifacts(tr.run_id, "config.toml")
    doc = tomllib.loads(open(path).read())
    assert doc["system"]["seed"] == 3 and doc["learning"]["replay_capacity"] == 20
    assert doc["experiment"]["seed"] == 3 and doc["experiment"]["methods"] == ["naive", "ewc"]
    assert Config.from_dict({k: v for k, v in doc.items() if k != "experiment"}) == resolved


def test_runs_carry_the_git_commit_and_a_dirty_flag(mlflow_uri):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    with MLflowTracker(experiment="git", run_name="named") as tr:
        pass
    run = _client(mlflow_uri).get_run(tr.run_id)
    assert run.info.run_name == "named"
    if head.returncode == 0:
        assert run.data.tags["git.commit"] == head.stdout.strip() == git_tags()["git.commit"]
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        assert run.data.tags["git.dirty"] == str(bool(dirty)).lower()
    else:
        assert run.data.tags["git.commit"] == "unknown"


@pytest.mark.parametrize("make", ["memory", "mlflow"])
def test_one_value_per_param_and_per_metric_step(make, mlflow_uri):
    tr = MemoryTracker() if make == "memory" else MLflowTracker(experiment="steps")
    tr.log_params({"exp.seed": 1})
    tr.log_params({"exp.seed": 1})  # the same value again is fine
    with pytest.raises(ValueError, match="exp.seed"):
        tr.log_params({"exp.seed": 2})
    tr.log_metrics({"acc": 0.5}, step=10)
    tr.log_metrics({"acc": 0.5}, step=10)  # a phase boundary evaluated twice: one point
    tr.log_metrics({"acc": 0.7}, step=20)
    with pytest.raises(ValueError, match="step 20"):
        tr.log_metrics({"acc": 0.1}, step=20)
    if make == "memory":
        assert tr.metrics["acc"] == [(10, 0.5), (20, 0.7)]
    else:
        tr.end()
        history = _client(mlflow_uri).get_metric_history(tr.run_id, "acc")
        assert sorted((m.step, m.value) for m in history) == [(10, 0.5), (20, 0.7)]


def test_param_values_have_one_text_form():
    assert param_value(["a", "b"]) == "a,b" == param_value(("a", "b"))
    assert param_value({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert param_value(3) == 3 and param_value(0.5) == 0.5
    name = readable_run_name("routing", n=30, seed=0)
    assert name.startswith("routing-n=30-seed=0-") and " " not in name


def test_fail_on_cell_error_is_a_no_op_outside_ipython(mlflow_uri):
    tr = MLflowTracker(experiment="plain")
    assert tr.fail_on_cell_error() is False
    tr.end()


# ---- notebooks through the runner (tiny notebooks, no model) -----------------------------------------

def _tiny_notebook(path):
    params = new_code_cell('experiment_name = "tiny"\nrun_name = ""\nrun_tags = {}\nitems = ["x"]\nfail = False\n')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[
        params,
        new_code_cell("from ruvllm_lab.experiments.runner import json_param, open_notebook_run\n"
                      'items = json_param(items, "items", list)\n'
                      'tracker = open_notebook_run("99_tiny", experiment_name, run_name, run_tags, log={"items": items})\n'
                      "from tqdm.auto import tqdm\n"
                      "for i in tqdm(range(50), desc='long step'):\n"
                      "    pass\n"
                      "print('items:', items)"),
        new_code_cell("if fail:\n    raise RuntimeError('mid-way failure')\ntracker.log_metrics({'done': 1.0})"),
        new_code_cell("tracker.end()"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_a_notebook_failing_mid_way_ends_its_run_failed_with_params_and_notebook(tmp_path, mlflow_uri):
    nb = _tiny_notebook(tmp_path / "tiny.ipynb")
    record = runner.execute_notebook(nb, tmp_path / "out" / "failed.ipynb", {"fail": True}, cwd=tmp_path)
    assert record["status"] == "failed" and "mid-way failure" in record["error"]
    client = _client(mlflow_uri)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FAILED"
    assert run.data.params["exp.items"] == "x"
    assert "done" not in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "notebook")} == {"notebook/failed.ipynb"}


def test_json_list_parameters_progress_stripped_and_notebook_attached(tmp_path, mlflow_uri):
    nb = _tiny_notebook(tmp_path / "tiny.ipynb")
    out = tmp_path / "out" / "ok.ipynb"
    # what `papermill -p items '["naive","ewc"]'` passes: text
    record = runner.execute_notebook(nb, out, {"items": '["naive", "ewc"]'}, cwd=tmp_path)
    assert record["status"] == "ok", record["error"]
    client = _client(mlflow_uri)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["exp.items"] == "naive,ewc"
    assert run.data.tags[runner.LAUNCH_TAG] == record["launch_id"]
    assert run.info.run_name.startswith("tiny-")  # readable: notebook kind + time
    saved = nbformat.read(out, as_version=4)
    import json
    outputs = json.dumps([c.get("outputs", []) for c in saved.cells])
    assert "items: ['naive', 'ewc']" in outputs
    assert runner.WIDGET_MIME not in outputs and "long step" not in outputs and "%|" not in outputs
    assert "widgets" not in saved.metadata
    local = client.download_artifacts(run.info.run_id, "notebook/ok.ipynb", str(tmp_path / "dl"))
    assert nbformat.read(local, as_version=4).cells[1].outputs == saved.cells[1].outputs


def test_json_param_errors_name_the_parameter():
    assert runner.json_param('["a", "b"]', "x") == ["a", "b"]
    assert runner.json_param("a, b", "x") == ["a", "b"]
    assert runner.json_param('{"k": 1}', "o", dict) == {"k": 1}
    with pytest.raises(ValueError, match="parameter o"):
        runner.json_param("k=1", "o", dict)
    with pytest.raises(ValueError, match="parameter x must be a list"):
        runner.json_param(3, "x")
