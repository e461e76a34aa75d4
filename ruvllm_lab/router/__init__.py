"""The router: picks a model tier, a context size and sampling settings for each request.

``make_router(name, tiers, config, input_dim, seed)`` builds any router in ``ROUTERS``
(``fastgrnn``, ``random``, ``always-smallest``, ``always-largest``, ``always-<tier>``, ``knn``,
``logreg``, ``oracle``); the contract they share is in ``router.base``.
"""
from .base import (ROUTERS, AlwaysRouter, KNNRouter, LogRegRouter, OracleRouter, RandomRouter, RawRoute, Router,
                   RouterExample, RouterInput, RoutingDecision, make_router, register_router)
from .fastgrnn import FastGRNNCell
from .features import RouterBatch, feature_dim, featurise, featurise_input, ordinal_targets
from .model import FastGRNNRouter, RouterOutput, build_model, tier_costs, tier_probs_from_cumulative
from .numpy_infer import NumpyFastGRNN
from .policy import FastGRNNPolicy  # registers "fastgrnn"
from .train import (accuracy, hard_threshold_, label_loss, load_router, ordinal_accuracy, ordinal_loss,
                    predicted_tiers, router_loss, save_router, size_report, sparsify_, three_phase_fit,
                    train_epochs, train_steps)

__all__ = [
    "ROUTERS", "AlwaysRouter", "FastGRNNCell", "FastGRNNPolicy", "FastGRNNRouter", "KNNRouter", "LogRegRouter",
    "NumpyFastGRNN", "OracleRouter", "RandomRouter", "RawRoute", "Router", "RouterBatch", "RouterExample",
    "RouterInput", "RouterOutput", "RoutingDecision", "accuracy", "build_model", "feature_dim", "featurise",
    "featurise_input", "hard_threshold_", "load_router", "make_router", "register_router", "router_loss",
    "save_router", "size_report", "sparsify_", "three_phase_fit", "tier_costs", "train_epochs", "train_steps",
    "label_loss", "ordinal_accuracy", "ordinal_loss", "ordinal_targets", "predicted_tiers",
    "tier_probs_from_cumulative",
]
