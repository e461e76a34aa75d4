"""Run a notebook headless (papermill) so that its MLflow run tells the whole story.

``execute_notebook`` is what ``experiments/sweep.py``, ``make demo`` and the tests use:

* the notebook runs on this interpreter's kernel (``python3`` as ipykernel installs it in the
  venv; the notebooks' own metadata names ``ruvllm-lab`` for JupyterLab);
* every run gets a ``run_tags`` parameter with a launch id, so the MLflow run the notebook
  opened can be found afterwards; the executed notebook is attached to it as
  ``notebook/<name>.ipynb``, and a run the notebook left RUNNING (it failed before its closing
  cell) is ended FAILED;
* progress bars (tqdm widgets, ``\\r``-redrawn stderr lines such as "Loading weights") are
  shown while the notebook runs and stripped from the saved copy;
* ipykernel's "Kernel is running over TCP without encryption" warning -- the kernel is a
  local child process on a loopback port -- is silenced (the kernel app logs errors only).

``json_param`` lets list parameters arrive as JSON text (``papermill -p methods '["naive","ewc"]'``).
"""
from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from .tracking import PROJECT_ROOT, default_tracking_uri

LAUNCH_TAG = "ruvllm.launch_id"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
_BAR = re.compile(r"\d+%\|")


def json_param(value: Any, name: str, kind: type = list) -> Any:
    """A list/dict notebook parameter: JSON text (papermill's ``-p`` passes text) becomes the value;
    a plain comma-separated string is accepted for lists.  Anything else of the wrong type raises."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            if kind is not list:
                raise ValueError(f"parameter {name}: {value!r} is not JSON for a {kind.__name__}") from None
            value = [v.strip() for v in value.split(",") if v.strip()]
    if kind is list and isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, kind):
        raise ValueError(f"parameter {name} must be a {kind.__name__}, got {type(value).__name__}: {value!r}")
    return value


# ipykernel logs "Kernel is running over TCP without encryption" at WARNING on every start; the
# kernel is a child process on a loopback port, so only errors of the kernel app itself are shown.
KERNEL_ARGS = ["--IPKernelApp.log_level=ERROR"]


def strip_progress(nb: Any) -> int:
    """Remove progress-bar output from an executed notebook in place; returns how many outputs went."""
    removed = 0
    for cell in nb.get("cells", []):
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") in ("display_data", "update_display_data") and WIDGET_MIME in out.get("data", {}):
                removed += 1
                continue
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                text = out.get("text", "")
                text = "".join(text) if isinstance(text, list) else text
                lines = [ln for ln in re.split(r"(?<=\n)", text) if "\r" not in ln and not _BAR.search(ln)]
                if not "".join(lines).strip():
                    removed += 1
                    continue
                out["text"] = "".join(lines)
            kept.append(out)
        if "outputs" in cell:
            cell["outputs"] = kept
    nb.get("metadata", {}).pop("widgets", None)
    return removed


def find_run(launch_id: str, tracking_uri: str | None = None):
    """The MLflow run tagged with ``launch_id`` (None when the notebook never opened one)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return client, None
    runs = client.search_runs(ids, filter_string=f"tags.`{LAUNCH_TAG}` = '{launch_id}'", max_results=5)
    return client, (runs[0] if runs else None)


def execute_notebook(notebook: str | Path, output: str | Path, parameters: Mapping[str, Any] | None = None, *,
                     cwd: str | Path | None = None, log_output: bool = False,
                     tracking_uri: str | None = None) -> dict[str, Any]:
    """Execute ``notebook`` into ``output``; returns {status, error, seconds, output, run_id, launch_id}.

    Never raises for a failing notebook (the record says ``failed`` and why); see the module docstring
    for what happens to the MLflow run.
    """
    import nbformat
    import papermill as pm

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    launch_id = uuid.uuid4().hex
    params = dict(parameters or {})
    params["run_tags"] = {**dict(params.get("run_tags") or {}), LAUNCH_TAG: launch_id}
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(notebook), str(output), parameters=params, kernel_name="python3",
                            cwd=str(cwd or PROJECT_ROOT), progress_bar=False, log_output=log_output,
                            extra_arguments=KERNEL_ARGS)
        status, error = "ok", ""
    except Exception as e:  # a failed notebook is a result to report, not a crash of the caller
        status, error = "failed", f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    seconds = round(time.perf_counter() - t0, 1)
    if output.exists():
        nb = nbformat.read(output, as_version=4)
        if strip_progress(nb):
            nbformat.write(nb, output)
    run_id = None
    try:
        client, run = find_run(launch_id, tracking_uri)
        if run is not None:
            run_id = run.info.run_id
            if output.exists():
                client.log_artifact(run_id, str(output), "notebook")
            if run.info.status == "RUNNING":
                client.set_terminated(run_id, "FAILED" if status != "ok" else "FINISHED")
    except Exception as e:  # the notebook's result stands even if the store cannot be reached now
        error = (error + "; " if error else "") + f"attaching the notebook to its MLflow run failed: {e}"
    return {"status": status, "error": error, "seconds": seconds, "output": str(output), "run_id": run_id,
            "launch_id": launch_id}


def execute_record(index: int, notebook: str, output: str, parameters: Mapping[str, Any],
                   cwd: str | None = None) -> dict[str, Any]:
    """``execute_notebook`` with plain arguments and the sweep's index (what process pools and Ray
    workers are handed: everything here pickles, and this module imports on any worker)."""
    record = execute_notebook(notebook, output, parameters, cwd=cwd)
    return {"index": index, "run_name": str(dict(parameters).get("run_name", "")), **record}


def open_notebook_run(notebook: str, experiment_name: str, run_name: str = "", run_tags: Mapping[str, Any] | None = None,
                      *, log: Mapping[str, Any] | None = None, name: Mapping[str, Any] | None = None):
    """The MLflow run a notebook logs to: a readable name (``name`` params + time) unless ``run_name``
    is given, the notebook and launch tags, FAILED as soon as a cell raises, and the notebook's own
    parameters that the experiment function does not see (``log``, as ``exp.<key>``) logged first."""
    from .tracking import MLflowTracker, readable_run_name

    kind = notebook.split("_", 1)[-1]
    tracker = MLflowTracker(experiment=experiment_name,
                            run_name=run_name or readable_run_name(kind, **dict(name or {})),
                            tags={"notebook": notebook, **{k: str(v) for k, v in dict(run_tags or {}).items()}})
    tracker.fail_on_cell_error()
    if log:
        tracker.log_params({f"exp.{k}": v for k, v in log.items() if v is not None})
    return tracker
