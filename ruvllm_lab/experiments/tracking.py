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

What a run records, so that it tells the truth about what ran:

* ``log_experiment(tracker, config, params)`` -- the experiment parameters *replace* the config
  values they override (``seed`` -> ``system.seed``, ``max_tokens`` -> ``inference.max_tokens``,
  ``buffer_size`` -> ``learning.replay_capacity``, ... see ``CONFIG_KEYS``) before anything is
  logged: each value is logged once, under the config key when there is one, else as
  ``exp.<name>``; the resolved config (with an ``[experiment]`` table of every parameter) is the
  ``config.toml`` artifact.
* A parameter logged twice must keep its value, and a metric gets one value per step: both
  trackers raise ``ValueError`` on a contradiction (and skip exact repeats).
* ``MLflowTracker`` tags the run with the git commit and a dirty flag; ``fail_on_cell_error()``
  ends the run FAILED when a notebook cell raises (papermill stops there) and KILLED when the
  kernel exits with the run still open.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import tempfile
import time
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

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...


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

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass


class MemoryTracker:
    """Keeps params, metric histories (``metrics[key] -> [(step, value)]``), tables, figures, texts."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, list[tuple[int | None, float]]] = {}
        self.figures: dict[str, Any] = {}
        self.tables: dict[str, Any] = {}
        self.texts: dict[str, str] = {}
        self.tags: dict[str, str] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        for k, v in params.items():
            value = param_value(v)
            _check_param(k, self.params.get(k), value)
            self.params[k] = value

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            history = self.metrics.setdefault(k, [])
            if _is_repeat(k, step, float(v), {s: x for s, x in history}):
                continue
            history.append((step, float(v)))

    def log_figure(self, fig: Any, name: str) -> None:
        self.figures[name] = fig

    def log_table(self, df: Any, name: str) -> None:
        self.tables[name] = df

    def log_text(self, text: str, name: str) -> None:
        self.texts[name] = text

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def last(self, key: str) -> float:
        return self.metrics[key][-1][1]


def mark_underpowered(tracker: Tracker, reasons: list[str], experiment: str) -> None:
    """A run below its meaningful size says so: a printed notice naming each reason, the MLflow
    tag ``underpowered=true`` (and ``underpowered_reasons``) and an ``underpowered.txt`` artifact.
    Nothing happens when ``reasons`` is empty."""
    if not reasons:
        return
    text = f"UNDERPOWERED {experiment} run -- its numbers do not support conclusions:\n" + "\n".join(
        f"  - {r}" for r in reasons)
    print(text, flush=True)
    tracker.set_tags({"underpowered": "true", "underpowered_reasons": "; ".join(reasons)})
    tracker.log_text(text + "\n", "underpowered.txt")


def log_config(tracker: Tracker, config: Any) -> None:
    """Log the resolved config: flat params (``section.key``) and the TOML as ``config.toml``."""
    tracker.log_params({k: param_value(v) for k, v in config.to_flat_dict().items()})
    tracker.log_text(config.to_toml(), "config.toml")


# Experiment parameter -> the config value it overrides.  An experiment that takes ``seed``
# runs with that seed whatever ``system.seed`` says, so the run must record that one seed.
CONFIG_KEYS: dict[str, str] = {
    "seed": "system.seed",
    "max_tokens": "inference.max_tokens",
    "buffer_size": "learning.replay_capacity",
    "ewc_lambda": "learning.ewc_lambda",
    "batch_size": "router.batch_size",
    "learning_rate": "router.learning_rate",
    "tier": "compression.tier",
}


def logged_key(name: str) -> str:
    """Where experiment parameter ``name`` is logged: its config key, else ``exp.<name>``."""
    return CONFIG_KEYS.get(name, f"exp.{name}")


def resolve_config(config: Any, params: Mapping[str, Any]) -> Any:
    """``config`` with every value an experiment parameter overrides replaced by that parameter."""
    overrides = {CONFIG_KEYS[k]: v for k, v in params.items() if k in CONFIG_KEYS and v is not None}
    return config.with_overrides(overrides) if overrides else config


def log_experiment(tracker: Tracker, config: Any, params: Mapping[str, Any]) -> Any:
    """Log what an experiment runs with: the resolved config and every parameter, each value once.

    Returns the resolved config.  ``config.toml`` holds the resolved config plus an
    ``[experiment]`` table with every parameter under its own name.
    """
    import tomli_w

    resolved = resolve_config(config, params)
    flat = {k: param_value(v) for k, v in resolved.to_flat_dict().items()}
    flat.update({logged_key(k): param_value(v) for k, v in params.items() if v is not None})
    tracker.log_params(flat)
    doc = resolved.to_dict()
    doc["experiment"] = {k: _toml_value(v) for k, v in params.items() if v is not None}
    tracker.log_text(tomli_w.dumps(doc), "config.toml")
    return resolved


def _toml_value(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
        return list(v)
    return json.dumps(v, sort_keys=True, default=str)


def param_value(v: Any) -> Any:
    """The one text form of a parameter: scalars as they are, a list of scalars comma-joined (what
    the experiments log for ``tiers`` and ``routers``), anything else as sorted JSON."""
    if isinstance(v, (int, float, str, bool)):
        return v
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # numpy scalar
        return v.item()
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str, bool)) for x in v):
        return ",".join(str(x) for x in v)
    if isinstance(v, os.PathLike):
        return str(v)
    try:
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    except TypeError:
        return repr(v)


_param_value = param_value  # older name


def _check_param(key: str, old: Any, new: Any) -> None:
    if old is not None and str(old) != str(new):
        raise ValueError(f"param {key!r} was logged as {old!r}; a run records one value per parameter, "
                         f"not also {new!r}")


def _is_repeat(key: str, step: int | None, value: float, seen: Mapping[Any, float]) -> bool:
    """True for an exact repeat of (key, step, value); raises on a second, different value at a step."""
    if step not in seen:
        return False
    old = seen[step]
    if old == value or (math.isnan(old) and math.isnan(value)):
        return True
    raise ValueError(f"metric {key!r} already has {old} at step {step}; one value per step, not also {value}")


def readable_run_name(kind: str, **params: Any) -> str:
    """``routing-n_queries=30-seed=0-1129-134512``: what ran and when, for the MLflow run list."""
    bits = [kind] + [f"{k}={_short(v)}" for k, v in params.items()]
    return "-".join(bits + [time.strftime("%m%d-%H%M%S")])


def _short(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), default=str)
    return "".join(c if c.isalnum() or c in "-._,=" else "_" for c in text)[:24]


def git_tags(root: str | os.PathLike = None) -> dict[str, str]:
    """The commit the code was run from and whether tracked files differed from it."""
    root = str(root or PROJECT_ROOT)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit, "mlflow.source.git.commit": commit,
            "git.dirty": "unknown" if dirty is None else str(bool(dirty)).lower()}


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
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={**git_tags(), **dict(tags or {})})
        self.run_id = run.info.run_id
        self._ended = False
        self._params: dict[str, str] = {}
        self._steps: dict[str, dict[int, float]] = {}

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

        fresh = []
        for k, v in params.items():
            key, value = safe_key(k), str(param_value(v))[:6000]
            _check_param(key, self._params.get(key), value)
            if key not in self._params:
                self._params[key] = value
                fresh.append(Param(key, value))
        for i in range(0, len(fresh), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = []
        for k, v in _finite(metrics).items():
            key, at = safe_key(k), step or 0
            seen = self._steps.setdefault(key, {})
            if _is_repeat(key, at, v, seen):
                continue
            seen[at] = v
            items.append(Metric(key, v, ts, at))
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

    @property
    def ended(self) -> bool:
        return self._ended

    def fail_on_cell_error(self) -> bool:
        """In an IPython kernel: end the run FAILED as soon as a cell raises (papermill stops
        executing there, so the closing ``end()`` never runs), and KILLED if the kernel exits
        with the run still open.  Returns False outside IPython."""
        import atexit

        try:
            from IPython import get_ipython
        except ImportError:
            return False
        ip = get_ipython()
        if ip is None:
            return False

        def on_cell(result) -> None:
            if (result.error_in_exec is not None or result.error_before_exec is not None) and not self._ended:
                self.end("FAILED")

        ip.events.register("post_run_cell", on_cell)
        atexit.register(self._end_at_exit)
        return True

    def _end_at_exit(self) -> None:
        try:
            self.end("KILLED")
        except Exception:  # the store may be gone (a temporary directory) by interpreter exit
            pass

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
