"""Bring your own router, without editing the package.

A router is a subclass of ``ruvllm_lab.router.Router`` that implements ``_raw_route`` (and, if it
learns, ``fit`` / ``partial_fit``).  Name it by import path wherever a router name is accepted:

    # a profile or an override: the orchestrator and the server route with it
    [router]
    kind = "examples.custom_router:LengthRouter"

    # the routing experiment / notebook: compare it with the built-in routers
    papermill notebooks/01_routing.ipynb out.ipynb -p routers '["examples.custom_router:LengthRouter", "fastgrnn"]'

``package.module:Class`` is imported with ``importlib`` (the module must be on ``sys.path``: run
from the repository root, or install your package); results and MLflow metrics use the full
string as the router's name.  The contract every router keeps (tiers smallest first, probabilities
that sum to 1, fallback, state) is in ``ruvllm_lab/router/base.py``.

Run this file to see it route a few queries: ``python examples/custom_router.py``.
"""
from __future__ import annotations

import numpy as np

from ruvllm_lab.router import RawRoute, Router, RouterExample


class LengthRouter(Router):
    """Longer questions go to larger tiers; learns the token length at which each tier starts to pay off.

    ``partial_fit`` keeps, per tier, the mean token count of the queries that tier was the cheapest
    correct answer for; a query goes to the tier whose mean is nearest its own length.
    """

    uses_fallback = False  # a fixed rule, measured as it is

    def __init__(self, tiers, config, input_dim, seed=0):
        super().__init__(tiers, config, input_dim, seed)
        self._sum = np.zeros(len(self.tiers))
        self._n = np.zeros(len(self.tiers))

    def _raw_route(self, x, state):
        seen = self._n > 0
        probs = np.zeros(len(self.tiers))
        if not seen.any():
            probs[0] = 1.0  # nothing learned yet: the cheapest tier
        else:
            means = np.where(seen, self._sum / np.maximum(self._n, 1), np.inf)
            probs[int(np.argmin(np.abs(means - x.query_tokens)))] = 1.0
        return self._fixed(probs, confidence=float(probs.max()))

    def fit(self, examples: list[RouterExample]) -> dict:
        self._sum[:] = 0.0
        self._n[:] = 0.0
        return self.partial_fit(examples)

    def partial_fit(self, examples: list[RouterExample]) -> dict:
        for ex in examples:
            if ex.best_tier in self.tiers:  # only full-information labels teach this rule
                i = self.tiers.index(ex.best_tier)
                self._sum[i] += ex.x.query_tokens
                self._n[i] += 1
        return {"router": self.name, "examples": len(examples), "trained": True}

    def state_dict(self) -> dict:
        return {"sum": self._sum.tolist(), "n": self._n.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self._sum, self._n = np.asarray(state["sum"], float), np.asarray(state["n"], float)


if __name__ == "__main__":
    from ruvllm_lab.config import RouterConfig
    from ruvllm_lab.router import RouterInput, make_router

    tiers = ["smollm2-135m", "qwen2.5-coder-0.5b"]
    router = make_router("examples.custom_router:LengthRouter", tiers, RouterConfig(), input_dim=384)

    def query(tokens: int) -> RouterInput:
        return RouterInput(query_vec=np.zeros(384, np.float32), query_tokens=tokens, top_similarity=0.0, hit_count=0,
                           mean_degree=0.0, session_turn=0, tier_quality={}, max_latency_ms=None, max_tokens=None)

    router.partial_fit([RouterExample(query(6), best_tier=tiers[0]), RouterExample(query(30), best_tier=tiers[1])])
    for n in (4, 12, 25):
        print(f"{n:>3} tokens -> {router.route(query(n)).tier}")
