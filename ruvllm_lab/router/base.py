"""The router contract, its registry, and the RouteLLM-style baselines.

Contract (every router in ``ROUTERS`` keeps it, so experiments can swap them by name)
-------------------------------------------------------------------------------
* ``Router(tiers, config, input_dim, seed)``: ``tiers`` are the configured model tiers,
  **smallest (cheapest) first** — the order of ``inference.models``; "smallest"/"largest"
  mean ``tiers[0]`` / ``tiers[-1]``.
* ``route(x: RouterInput, state=None) -> RoutingDecision``: pure with respect to the
  outside world (no I/O); deterministic given the seed and the calls made so far.
  ``decision.tier`` is always one of ``tiers``; ``decision.tier_probs`` has one entry per
  tier and sums to 1; ``context_items`` is one of ``config.context_buckets``;
  ``decision.state`` is what to pass as ``state`` on the session's next turn (None for
  stateless routers).
* ``x.forced_tier`` (the request's ``constraints.model``) bypasses the choice: the decision
  names that tier with ``confidence=1`` and ``fallback_used=False``; a forced tier that is
  not configured raises ModelNotFound.  The router still runs, so its hidden state and
  context/sampling suggestions stay meaningful.
* Ordinal routers (FastGRNN) return cumulative probabilities C_i = P(cheapest adequate tier <= i)
  for every tier in ``RawRoute.cum`` (C_{T-1} = P(the largest tier is adequate) < 1: a query no
  tier answers is representable).  ``config.decision_rule`` picks the tier (``ordinal_choice``):
  ``threshold`` -- the cheapest tier i < T-1 with C_i >= ``config.confidence_threshold``, else
  ``config.fallback``; ``utility`` -- the tier maximising C_i - ``config.cost_penalty`` · cost_i
  (cost relative to the largest tier), the Lagrangian of "most adequate answers within a cost
  budget", which also declines to pay for the largest tier when it is unlikely to help either.
* Fallback: a router whose ``uses_fallback`` is True (the learned ones) hands the decision
  to ``config.fallback`` whenever its ``confidence < config.confidence_threshold`` —
  ``largest`` (safe: quality first), ``smallest`` (cheap) or ``default``
  (``config.default_tier``).  ``fallback_used`` says so.  Fixed policies (random, always-*)
  and the oracle never fall back: their choice *is* the policy being measured.
* ``fit(examples) -> dict`` trains from scratch on logged outcomes; ``partial_fit(examples)
  -> dict`` updates online (sklearn baselines simply refit on everything seen).  Both
  return a JSON-able report.  ``state_dict()`` / ``load_state_dict()`` hold only tensors,
  lists and scalars (loadable with ``torch.load(weights_only=True)``); ``save(path)`` /
  ``load(path)`` are the only file I/O.
* The oracle (``"oracle"``) answers from the labels it was fitted on: it is an upper bound
  for evaluation and must never serve traffic.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import InferenceConfig, RouterConfig
from ..errors import ConfigError, DimensionMismatch, ModelNotFound
from .features import featurise_input

DEFAULT_TEMPERATURE = InferenceConfig().temperature
DEFAULT_TOP_P = InferenceConfig().top_p


@dataclass
class RouterInput:
    query_vec: np.ndarray  # (D,) float32 query embedding
    query_tokens: int
    top_similarity: float  # best memory hit's cosine similarity (0 when memory is empty)
    hit_count: int
    mean_degree: float  # mean graph degree of the retrieved nodes
    session_turn: int  # 0 for the first turn of a session
    tier_quality: dict[str, float]  # recent judged quality per tier (missing = unknown)
    max_latency_ms: float | None
    max_tokens: int | None
    forced_tier: str | None = None


@dataclass
class RoutingDecision:
    tier: str
    tier_probs: dict[str, float]
    context_items: int
    temperature: float
    top_p: float
    confidence: float
    fallback_used: bool
    router: str
    state: Any = None  # hidden state to carry to the session's next turn
    propensity: float = 1.0  # probability with which `tier` was chosen (exploration makes it < 1)
    explored: bool = False  # True when exploration replaced the policy's pick with a cheaper tier
    policy_tier: str | None = None  # the policy's own pick (differs from `tier` only when explored)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (the hidden state is left out)."""
        d = asdict(self)
        d.pop("state")
        return d


@dataclass
class RouterExample:
    """One training row.  Two ways to give the tier target:

    * ``best_tier`` -- full information: the cheapest adequate tier is known (every cheaper tier
      was tried and failed).  Equivalent to ``outcomes = {best_tier: 1, every cheaper tier: 0}``.
    * ``outcomes`` -- censored: ``{tier: 1.0 adequate / 0.0 not adequate}`` for the tiers that were
      actually tried (bandit feedback: one tier), with optional per-tier ``weights``.

    Nothing is assumed about a tier that was not tried (``train.ordinal_targets``).
    """
    x: RouterInput
    best_tier: str | None = None  # full-information label: the cheapest tier that met the quality bar
    tier_scores: dict[str, float] | None = None  # judged quality per tier tried
    context_items: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    state: Any = None  # the hidden state the router was given on this turn (optional)
    outcomes: dict[str, float] | None = None  # observed adequacy per tried tier: 1.0 yes, 0.0 no
    weights: dict[str, float] | None = None  # per-tier weight of `outcomes` (default 1)

    def observed(self, tiers: list[str]) -> dict[str, tuple[float, float]]:
        """{tier: (adequate in [0, 1], weight)} for the observed tiers; ``best_tier`` expands to success
        there and failure at the next cheaper tier (which implies failure of every cheaper one)."""
        if self.outcomes:
            unknown = set(self.outcomes) - set(tiers)
            if unknown:
                raise ValueError(f"example outcomes name unknown tier(s) {sorted(unknown)}; tiers: {tiers}")
            w = self.weights or {}
            return {t: (float(v), float(w.get(t, 1.0))) for t, v in self.outcomes.items()}
        if self.best_tier is None:
            return {}
        if self.best_tier not in tiers:
            raise ValueError(f"example best_tier {self.best_tier!r} is not one of {tiers}")
        i = tiers.index(self.best_tier)
        out = {self.best_tier: (1.0, 1.0)}
        if i > 0:
            out[tiers[i - 1]] = (0.0, 1.0)
        return out

    def exact_tier(self, tiers: list[str]) -> str | None:
        """The cheapest adequate tier when the observations pin it down (success at t and failure
        at t-1, or t is the cheapest), else None.  Classifier baselines can only use such rows."""
        if self.best_tier is not None and not self.outcomes:
            return self.best_tier
        obs = self.observed(tiers)
        for i, t in enumerate(tiers):
            if obs.get(t, (0.0, 0.0))[0] >= 0.5 and (i == 0 or obs.get(tiers[i - 1], (1.0, 0.0))[0] < 0.5):
                return t
        return None


@dataclass
class RawRoute:
    """What a router computes before the shared forced-tier / fallback rules are applied."""
    probs: np.ndarray  # (T,) sums to 1
    confidence: float
    context_items: int
    temperature: float
    top_p: float
    state: Any = None
    cum: np.ndarray | None = None  # (T,) C_i = P(cheapest adequate tier <= i), ordinal routers only


class Router:
    """Base class: subclasses implement ``_raw_route``; see the module docstring for the contract."""

    name = "base"
    uses_fallback = False

    def __init__(self, tiers: list[str], config: RouterConfig, input_dim: int, seed: int = 0) -> None:
        tiers = list(tiers)
        if not tiers:
            raise ConfigError("router needs at least one tier (inference.models is empty)")
        if len(set(tiers)) != len(tiers):
            raise ConfigError(f"router tiers must be unique, got {tiers}")
        if not config.context_buckets:
            raise ConfigError("router.context_buckets is empty: give at least one bucket, e.g. [0, 4]")
        if config.fallback == "default" and config.default_tier not in tiers:
            raise ConfigError(f"router.fallback = 'default' needs router.default_tier to be one of {tiers}, "
                              f"got {config.default_tier!r}")
        self.tiers = tiers
        self.config = config
        self.input_dim = int(input_dim)
        self.seed = int(seed)

    # ---- the shared decision rules -------------------------------------------------------
    @property
    def fallback_tier(self) -> str:
        return {"largest": self.tiers[-1], "smallest": self.tiers[0]}.get(self.config.fallback,
                                                                           self.config.default_tier)

    @property
    def default_context_items(self) -> int:
        return int(max(self.config.context_buckets))

    def route(self, x: RouterInput, state: Any = None) -> RoutingDecision:
        if x.forced_tier is not None and x.forced_tier not in self.tiers:
            raise ModelNotFound(f"forced tier {x.forced_tier!r} is not configured; configured tiers: "
                                f"{', '.join(self.tiers)}")
        raw = self._raw_route(x, state)
        probs = {t: float(p) for t, p in zip(self.tiers, raw.probs)}
        if x.forced_tier is not None:
            tier, confidence, fallback = x.forced_tier, 1.0, False
        elif raw.cum is not None:
            tier, confidence, fallback = self._ordinal_choice(np.asarray(raw.cum, np.float64))
        else:
            tier = self.tiers[int(np.argmax(raw.probs))]
            confidence, fallback = float(raw.confidence), False
            if self.uses_fallback and confidence < self.config.confidence_threshold:
                tier, fallback = self.fallback_tier, True
        return RoutingDecision(tier=tier, tier_probs=probs, context_items=int(raw.context_items),
                               temperature=float(raw.temperature), top_p=float(raw.top_p), confidence=confidence,
                               fallback_used=fallback, router=self.name, state=raw.state)

    def _ordinal_choice(self, cum: np.ndarray) -> tuple[str, float, bool]:
        """The configured ordinal rule (module docstring); confidence is C of the chosen tier."""
        if len(self.tiers) == 1:
            return self.tiers[0], 1.0, False
        fb = self.tiers.index(self.fallback_tier)
        if getattr(self, "_tier_costs", None) is None:  # once per router: the ladder lookup is not free
            self._tier_costs = tier_costs(self.tiers)
        i, fallback = ordinal_choice(cum[None, :], self._tier_costs, self.config, fb)
        return self.tiers[int(i[0])], float(cum[int(i[0])]), bool(fallback[0])

    def _raw_route(self, x: RouterInput, state: Any) -> RawRoute:
        raise NotImplementedError

    def _fixed(self, probs: np.ndarray, confidence: float) -> RawRoute:
        return RawRoute(probs, confidence, self.default_context_items, DEFAULT_TEMPERATURE, DEFAULT_TOP_P)

    # ---- learning and persistence ----------------------------------------------------------
    def fit(self, examples: list[RouterExample]) -> dict:
        return {"router": self.name, "examples": len(examples), "trained": False}

    def partial_fit(self, examples: list[RouterExample]) -> dict:
        return self.fit(examples)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"router": self.name, "tiers": self.tiers, "input_dim": self.input_dim,
                    "state": self.state_dict()}, path)
        return path

    def load(self, path: str | os.PathLike) -> "Router":
        blob = torch.load(Path(path), weights_only=True)
        if blob.get("router") != self.name or list(blob.get("tiers", [])) != self.tiers:
            raise ConfigError(f"{path}: holds router {blob.get('router')!r} over tiers {blob.get('tiers')}, "
                              f"not {self.name!r} over {self.tiers}")
        self.load_state_dict(blob["state"])
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tiers={self.tiers})"


def tier_costs(tiers: Sequence[str]) -> np.ndarray:
    """(T,) relative cost per tier, scaled so the most expensive tier costs 1:
    ``models.resolve(t).relative_cost`` (parameter-weighted) when every tier is a ladder tier,
    otherwise the rank (i+1)/T, because user GGUF files have no trustworthy cost."""
    from .. import models
    if all(t in models.LADDER for t in tiers):
        costs = np.array([models.LADDER[t].relative_cost for t in tiers], np.float64)
    else:
        costs = np.arange(1, len(tiers) + 1, dtype=np.float64) / len(tiers)
    return costs / costs.max()


def ordinal_choice(cum: np.ndarray, costs: np.ndarray, config: RouterConfig,
                   fallback: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Batch form of the ordinal serving rule: cum (B, T) C_i = P(Y <= i), costs (T,) relative
    (max 1) -> (tier index (B,), fallback used (B,)).  ``fallback`` is the tier index the
    threshold rule falls back to (default: the largest)."""
    cum = np.asarray(cum, np.float64)
    b, n = cum.shape
    if config.decision_rule == "utility":
        # argmax of expected adequacy minus priced cost; ties go to the cheaper tier (argmax takes the first)
        return np.argmax(cum - config.cost_penalty * np.asarray(costs)[None, :], axis=1), np.zeros(b, bool)
    reached = cum[:, :n - 1] >= config.confidence_threshold  # the largest tier is the fallback, not a candidate
    found = reached.any(axis=1)
    fb = n - 1 if fallback is None else int(fallback)
    return np.where(found, reached.argmax(axis=1), fb), ~found


ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    def deco(cls: type[Router]) -> type[Router]:
        cls.name = name
        ROUTERS[name] = cls
        return cls
    return deco


def make_router(name: str, tiers: list[str], config: RouterConfig, input_dim: int, seed: int = 0) -> Router:
    """Registry lookup.  ``always-<tier>`` works for any configured tier name too, and
    ``"package.module:Class"`` imports a router of your own (``router.kind`` in a profile, or a
    name in an experiment's ``routers`` list; see ``examples/custom_router.py``)."""
    if name in ROUTERS:
        return ROUTERS[name](tiers, config, input_dim, seed)
    if name.startswith("always-") and name[len("always-"):] in list(tiers):
        return AlwaysRouter(tiers, config, input_dim, seed, tier=name[len("always-"):])
    if ":" in name:
        router = resolve_router_class(name)(tiers, config, input_dim, seed)
        router.name = name  # results and MLflow metrics are keyed by the name that was asked for
        return router
    import difflib
    near = difflib.get_close_matches(name, list(ROUTERS), n=1)
    raise ConfigError(f"unknown router {name!r}{f'; did you mean {near[0]!r}?' if near else ''} known routers: "
                      f"{', '.join(ROUTERS)} (or always-<tier>, or package.module:Class)")


def resolve_router_class(spec: str) -> type[Router]:
    """``"package.module:Class"`` -> the class; a clear ConfigError when it cannot be a router."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"router {spec!r}: expected 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"router {spec!r}: cannot import {module_name!r} ({e}); is it on sys.path?") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError(f"router {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, Router)):
        raise ConfigError(f"router {spec!r}: {cls!r} is not a subclass of ruvllm_lab.router.Router")
    return cls


# ---- baselines --------------------------------------------------------------------------------
@register_router("random")
class RandomRouter(Router):
    """Uniform over tiers (seeded): the floor every learned router must beat."""

    def __init__(self, tiers, config, input_dim, seed=0):
        super().__init__(tiers, config, input_dim, seed)
        self._rng = np.random.default_rng(seed)

    def _raw_route(self, x, state):
        probs = np.zeros(len(self.tiers))
        probs[self._rng.integers(len(self.tiers))] = 1.0  # the sampled choice, so argmax picks it
        return self._fixed(probs, 1.0 / len(self.tiers))


class AlwaysRouter(Router):
    """Always the same tier: the cost floor (smallest) or the quality ceiling (largest)."""

    def __init__(self, tiers, config, input_dim, seed=0, tier: str | None = None):
        super().__init__(tiers, config, input_dim, seed)
        self.tier = tier if tier is not None else self._default_tier()
        if self.tier not in self.tiers:
            raise ConfigError(f"always-router tier {self.tier!r} is not one of {self.tiers}")
        self.name = f"always-{self.tier}" if tier is not None else self.name

    def _default_tier(self) -> str:
        raise ConfigError("AlwaysRouter needs a tier")

    def _raw_route(self, x, state):
        probs = np.zeros(len(self.tiers))
        probs[self.tiers.index(self.tier)] = 1.0
        return self._fixed(probs, 1.0)


@register_router("always-smallest")
class AlwaysSmallestRouter(AlwaysRouter):
    def _default_tier(self) -> str:
        return self.tiers[0]


@register_router("always-largest")
class AlwaysLargestRouter(AlwaysRouter):
    def _default_tier(self) -> str:
        return self.tiers[-1]


class _MemoryRouter(Router):
    """Baselines that keep every example seen (as arrays) and refit on all of them."""

    def __init__(self, tiers, config, input_dim, seed=0):
        super().__init__(tiers, config, input_dim, seed)
        self._clear()

    def _clear(self) -> None:
        self._inputs = np.zeros((0, 0), np.float32)  # (N, encoded dim)
        self._labels = np.zeros(0, np.int64)  # (N,) tier index
        self._aux = np.zeros((0, 3), np.float32)  # (N, 3) context_items, temperature, top_p; NaN = not logged

    def _encode(self, x: RouterInput) -> np.ndarray:
        raise NotImplementedError

    def fit(self, examples):
        self._clear()
        return self.partial_fit(examples)

    def partial_fit(self, examples):
        for e in examples:
            if e.best_tier is not None and e.best_tier not in self.tiers:
                raise ValueError(f"example best_tier {e.best_tier!r} is not one of {self.tiers}")
        # A classifier needs the exact cheapest adequate tier; censored rows that do not pin it
        # down are skipped rather than given an invented label.
        labelled = [(e, e.exact_tier(self.tiers)) for e in examples]
        labelled = [(e, t) for e, t in labelled if t is not None]
        examples = [e for e, _ in labelled]
        if examples:
            enc = np.stack([self._encode(e.x) for e in examples]).astype(np.float32)
            aux = np.array([[np.nan if v is None else v for v in (e.context_items, e.temperature, e.top_p)]
                            for e in examples], np.float32)
            self._inputs = enc if not len(self._labels) else np.concatenate([self._inputs, enc])
            self._labels = np.concatenate([self._labels, [self.tiers.index(t) for _, t in labelled]])
            self._aux = np.concatenate([self._aux, aux])
            self._refit()
        return {"router": self.name, "examples": int(len(self._labels)), "trained": bool(len(self._labels))}

    def _refit(self) -> None:
        pass

    def _targets(self, rows: np.ndarray | slice) -> tuple[int, float, float]:
        """Median context size (snapped to a bucket) and mean sampling settings where logged."""
        aux = self._aux[rows]
        ctx, temps, tops = (col[~np.isnan(col)] for col in aux.T)
        items = self.default_context_items
        if len(ctx):
            median = float(np.median(ctx))
            items = min(self.config.context_buckets, key=lambda b: abs(b - median))
        return (int(items), float(temps.mean()) if len(temps) else DEFAULT_TEMPERATURE,
                float(tops.mean()) if len(tops) else DEFAULT_TOP_P)

    def _unfitted(self) -> RawRoute:
        # Nothing seen: uniform and unconfident, so the fallback decides.
        return self._fixed(np.full(len(self.tiers), 1.0 / len(self.tiers)), 0.0)

    def state_dict(self):
        return {"inputs": torch.from_numpy(self._inputs.copy()), "labels": torch.from_numpy(self._labels.copy()),
                "aux": torch.from_numpy(self._aux.copy())}

    def load_state_dict(self, state):
        self._inputs = state["inputs"].numpy().astype(np.float32)
        self._labels = state["labels"].numpy().astype(np.int64)
        self._aux = state["aux"].numpy().astype(np.float32)
        if len(self._labels):
            self._refit()


@register_router("knn")
class KNNRouter(_MemoryRouter):
    """k nearest past queries by cosine similarity of query_vec; tier probs are the vote shares."""

    uses_fallback = True
    k = 5

    def _encode(self, x):
        q = np.asarray(x.query_vec, np.float32).reshape(-1)
        if q.shape[0] != self.input_dim:
            raise DimensionMismatch(f"router expects a query_vec of dimension {self.input_dim}, got {q.shape[0]}")
        return q / max(float(np.linalg.norm(q)), 1e-12)

    def _raw_route(self, x, state):
        if not len(self._labels):
            return self._unfitted()
        sims = self._inputs @ self._encode(x)  # (N,)
        k = min(self.k, len(sims))
        nearest = np.argpartition(-sims, k - 1)[:k]
        probs = np.bincount(self._labels[nearest], minlength=len(self.tiers)) / k
        items, temp, top_p = self._targets(nearest)
        return RawRoute(probs, float(probs.max()), items, temp, top_p)


@register_router("logreg")
class LogRegRouter(_MemoryRouter):
    """Multinomial logistic regression (scikit-learn) on the same features as FastGRNN, without state."""

    uses_fallback = True

    def _encode(self, x):
        return featurise_input(x, self.tiers, self.input_dim)

    def _refit(self):
        from sklearn.linear_model import LogisticRegression
        self._classes = np.unique(self._labels)
        self._summary = self._targets(slice(None))
        if len(self._classes) < 2:  # sklearn cannot fit a single class: predict it with certainty
            self._clf = None
            return
        self._clf = LogisticRegression(max_iter=1000, random_state=self.seed).fit(self._inputs, self._labels)

    def _raw_route(self, x, state):
        if not len(self._labels):
            return self._unfitted()
        probs = np.zeros(len(self.tiers))
        if self._clf is None:
            probs[self._classes[0]] = 1.0
        else:
            probs[self._clf.classes_] = self._clf.predict_proba(self._encode(x)[None, :])[0]
        items, temp, top_p = self._summary
        return RawRoute(probs, float(probs.max()), items, temp, top_p)


@register_router("oracle")
class OracleRouter(Router):
    """Evaluation only: answers each query with the label it was fitted on (an upper bound)."""

    def __init__(self, tiers, config, input_dim, seed=0):
        super().__init__(tiers, config, input_dim, seed)
        self._labels: dict[bytes, RouterExample] = {}

    @staticmethod
    def _key(vec: np.ndarray) -> bytes:
        return np.asarray(vec, np.float32).reshape(-1).tobytes()

    def fit(self, examples):
        self._labels = {}
        return self.partial_fit(examples)

    def partial_fit(self, examples):
        for e in examples:
            tier = e.exact_tier(self.tiers)
            if tier is None or tier not in self.tiers:
                raise ValueError(f"example best_tier {tier!r} is not one of {self.tiers}")
            self._labels[self._key(e.x.query_vec)] = e
        return {"router": self.name, "examples": len(self._labels), "trained": True}

    def _raw_route(self, x, state):
        e = self._labels.get(self._key(x.query_vec))
        if e is None:
            raise ValueError("oracle router has no label for this query: fit it on the evaluation set first "
                             "(the oracle is an evaluation upper bound, never a serving router)")
        probs = np.zeros(len(self.tiers))
        probs[self.tiers.index(e.exact_tier(self.tiers))] = 1.0
        items = self.default_context_items
        if e.context_items is not None:
            items = min(self.config.context_buckets, key=lambda b: abs(b - e.context_items))
        return RawRoute(probs, 1.0, items, e.temperature if e.temperature is not None else DEFAULT_TEMPERATURE,
                        e.top_p if e.top_p is not None else DEFAULT_TOP_P)
