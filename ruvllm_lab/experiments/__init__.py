"""Experiments: routing, forgetting and compression runs that return DataFrames and figures.

Each ``run`` takes a ``Config`` plus its own parameters and a ``tracker`` callback
(``tracking.NullTracker`` by default; ``tracking.MLflowTracker`` logs to MLflow).  Nothing here
imports mlflow except ``MLflowTracker`` itself, when it is constructed.

    from ruvllm_lab.experiments import routing, forgetting, compression, metrics
    from ruvllm_lab.experiments.tracking import MLflowTracker, NullTracker
"""
from . import metrics, tracking
from .tracking import MemoryTracker, NullTracker, Tracker, log_config

__all__ = ["metrics", "tracking", "Tracker", "NullTracker", "MemoryTracker", "log_config",
           "routing", "forgetting", "compression"]


def __getattr__(name):  # the experiment modules pull in torch/pandas: import on first use
    if name in ("routing", "forgetting", "compression"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
