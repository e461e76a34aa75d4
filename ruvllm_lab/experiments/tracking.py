"""Experiment tracking as a callback.

Experiment functions take ``tracker=`` and call five methods on it; they never start or end
runs (the caller owns the run) and never import mlflow::

    tracker.log_params({"router.hidden_dim": 32, ...})
    tracker.log_metrics({"fastgrnn/apgr": 0.71}, step=None)
    tracker.log_figure(fig, "cost_quality.png")
    tracker.log_table(df, "summary.csv")
    tracker.log_text(text, "config.toml")

Implementations:

* ``NullTracker`` -- the default; does nothing.
* ``MemoryTracker`` -- keeps everything in dicts (notebooks inspect it; tests read it back).
* ``MLflowTracker`` -- one MLflow run (names pass through ``safe_key``: MLflow refuses
  characters such as '+', so ``ewc+replay/forgetting`` is logged as ``ewc_replay/forgetting``);
  the only place in the package that imports mlflow, and
  only when constructed.  Tracking URI: the ``tracking_uri`` argument, else
  ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlruns/mlflow.db``.  Artifacts of a new
  experiment go to an ``artifacts/`` folder next to a SQLite store, so runs started from any
  working directory (papermill runs notebooks from ``notebooks/``) land in one place.
"""
from __future__ import annotations

import io
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@runtime_checkable
class Tracker(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_figure(self, fig: Any, name: str) -> None: ...

    def log_table(self, df: Any, name: str) -> None: ...

    def log_text(self, text: str, name: str) -> None: ...


class NullTracker:
    """Does nothing: the default, so the core runs without any tracking backend."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_figure(self, fig: Any, name: str) -> None:
        pass

    def log_table(self, df: Any, name: str) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass


class MemoryTracker:
    """Keeps params, metric histories (``metrics[key] -> [(step, value)]``), tables, figures, texts."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, list[tuple[int | None, float]]] = {}
        self.figures: dict[str, Any] = {}
        self.tables: dict[str, Any] = {}
        self.texts: dict[str, str] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, float(v)))

    def log_figure(self, fig: Any, name: str) -> None:
        self.figures[name] = fig

    def log_table(self, df: Any, name: str) -> None:
        self.tables[name] = df

    def log_text(self, text: str, name: str) -> None:
        self.texts[name] = text

    def last(self, key: str) -> float:
        return self.metrics[key][-1][1]


def log_config(tracker: Tracker, config: Any) -> None:
    """Log the resolved config: flat params (``section.key``) and the TOML as ``config.toml``."""
    tracker.log_params({k: _param_value(v) for k, v in config.to_flat_dict().items()})
    tracker.log_text(config.to_toml(), "config.toml")


def _param_value(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) else repr(v)


def default_tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    store = PROJECT_ROOT / "mlruns" / "mlflow.db"
    return f"sqlite:///{store}"


_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")


def safe_key(key: str) -> str:
    """A metric/param name MLflow accepts: other characters become '_' ("ewc+replay" -> "ewc_replay")."""
    return _KEY_BAD.sub("_", str(key))


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


class _store_lock:
    """flock on ``<db>.lock`` beside a SQLite store; a no-op for other stores."""

    def __init__(self, db: Path | None):
        self.path = db.with_name(db.name + ".lock") if db is not None else None

    def __enter__(self):
        if self.path is not None:
            import fcntl
            self.fh = open(self.path, "w")
            fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.path is not None:
            import fcntl
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    """MLflow rejects nothing but stores NaN awkwardly; drop non-numbers, keep nan/inf out of charts."""
    out = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


class MLflowTracker:
    """One MLflow run in ``experiment`` (created on first use).  Use as a context manager or call ``end()``.

    Non-finite metric values (a CPT the router never reaches is ``nan``) are not logged; the
    CSV tables keep them.
    """

    def __init__(self, experiment: str = "ruvllm-lab", run_name: str | None = None,
                 tracking_uri: str | None = None, tags: Mapping[str, str] | None = None):
        import mlflow  # noqa: F401  (the only mlflow import in the package)
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri or default_tracking_uri()
        db = _sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        with _store_lock(db):  # parallel sweep runs would race on creating the schema of a fresh store
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            self.experiment_id = self._experiment_id(experiment, db)
        self.experiment = experiment
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
        self.run_id = run.info.run_id
        self._ended = False

    def _experiment_id(self, experiment: str, db: Path | None) -> str:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is not None:
            return exp.experiment_id
        artifact_location = (db.parent / "artifacts" / experiment).resolve().as_uri() if db is not None else None
        try:
            return self.client.create_experiment(experiment, artifact_location=artifact_location)
        except Exception:  # created concurrently by a process that does not share our lock (a remote store)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            return exp.experiment_id

    # -- Tracker ------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(safe_key(k), str(_param_value(v))[:6000]) for k, v in params.items()
                 if safe_key(k) not in existing]
        for i in range(0, len(fresh), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(safe_key(k), v, ts, step or 0) for k, v in _finite(metrics).items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_figure(self, fig: Any, name: str) -> None:
        self.client.log_figure(self.run_id, fig, name)

    def log_table(self, df: Any, name: str) -> None:
        buf = io.StringIO()
        df.to_csv(buf, index=False)
        self.client.log_text(self.run_id, buf.getvalue(), name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    # -- run lifecycle --------------------------------------------------------------------
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if not self._ended:
            self.client.set_terminated(self.run_id, status)
            self._ended = True

    def __enter__(self) -> "MLflowTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type else "FINISHED")

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def __repr__(self) -> str:
        return f"MLflowTracker(experiment={self.experiment!r}, run_id={self.run_id!r}, uri={self.tracking_uri!r})"


def tempdir_tracking_uri() -> str:
    """A throwaway SQLite store (handy in notebooks run from CI when no URI is set)."""
    d = Path(tempfile.mkdtemp(prefix="ruvllm-mlflow-"))
    return f"sqlite:///{d / 'mlflow.db'}"
