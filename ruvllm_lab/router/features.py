"""RouterInput -> fixed-length feature vector, and example lists -> training tensors.

Layout of one feature vector (float32, length ``feature_dim(input_dim, n_tiers)``)::

    [ query_vec (input_dim)                      the embedding; the cell's W projects it
      log1p(query_tokens) / 8
      top_similarity                             best memory hit, cosine in [-1, 1]
      log1p(hit_count) / 3
      log1p(mean_degree) / 3                     graph degree around the hits
      log1p(session_turn) / 3
      has_latency_limit, log1p(max_latency_ms / 1000) / 3
      has_token_limit,   log1p(max_tokens) / 8
      tier_quality[t] for t in tiers             recent judged quality, 0 when unknown
      tier_quality_known[t] for t in tiers ]     1 where a quality was reported

The fixed log scalings keep every scalar roughly in [0, 1.5] without a fitted normaliser,
so a feature vector means the same thing before and after any training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..errors import DimensionMismatch

if TYPE_CHECKING:
    from .base import RouterExample, RouterInput

SCALAR_FEATURES = (
    "log_query_tokens", "top_similarity", "log_hit_count", "log_mean_degree", "log_session_turn",
    "has_latency_limit", "log_latency_limit_s", "has_token_limit", "log_token_limit",
)


def feature_dim(input_dim: int, n_tiers: int) -> int:
    return input_dim + len(SCALAR_FEATURES) + 2 * n_tiers


def featurise_input(x: "RouterInput", tiers: Sequence[str], input_dim: int) -> np.ndarray:
    """One request -> (feature_dim,) float32.  Raises DimensionMismatch on a wrong-sized query_vec."""
    q = np.asarray(x.query_vec, dtype=np.float32).reshape(-1)
    if q.shape[0] != input_dim:
        raise DimensionMismatch(f"router expects a query_vec of dimension {input_dim}, got {q.shape[0]}")
    out = np.empty(feature_dim(input_dim, len(tiers)), np.float32)
    out[:input_dim] = q
    s = input_dim
    out[s + 0] = math.log1p(max(x.query_tokens, 0)) / 8.0
    out[s + 1] = float(x.top_similarity)
    out[s + 2] = math.log1p(max(x.hit_count, 0)) / 3.0
    out[s + 3] = math.log1p(max(x.mean_degree, 0.0)) / 3.0
    out[s + 4] = math.log1p(max(x.session_turn, 0)) / 3.0
    has_lat = x.max_latency_ms is not None
    out[s + 5] = 1.0 if has_lat else 0.0
    out[s + 6] = math.log1p(max(x.max_latency_ms, 0.0) / 1000.0) / 3.0 if has_lat else 0.0
    has_tok = x.max_tokens is not None
    out[s + 7] = 1.0 if has_tok else 0.0
    out[s + 8] = math.log1p(max(x.max_tokens, 0)) / 8.0 if has_tok else 0.0
    s += len(SCALAR_FEATURES)
    n = len(tiers)
    quality = x.tier_quality or {}
    for i, t in enumerate(tiers):
        value = quality.get(t)
        out[s + i] = float(value) if value is not None else 0.0
        out[s + n + i] = 1.0 if value is not None else 0.0
    return out


def context_bucket_index(items: int, buckets: Sequence[int]) -> int:
    """The bucket whose item count is nearest to `items` (ties go to the smaller bucket)."""
    return int(np.argmin([abs(int(items) - int(b)) for b in buckets]))


@dataclass
class RouterBatch:
    """Featurised examples as tensors; targets that an example lacks are masked.

    x (B, F) float32; h0 (B, H) float32 (the hidden state each example was routed with, zeros
    when unknown); tier (B,) int64, the exact cheapest adequate tier, -1 where the observations do
    not pin it down (censored rows); cum_target / cum_weight (B, T) float32, the ordinal targets
    of ``ordinal_targets`` (weight 0 = head unobserved); context_bucket (B,) int64, -1 = unknown;
    temperature and top_p (B,) float32, NaN = unknown; tier_scores (B, T) float32, NaN = unknown.
    """
    x: torch.Tensor
    h0: torch.Tensor
    tier: torch.Tensor
    cum_target: torch.Tensor
    cum_weight: torch.Tensor
    context_bucket: torch.Tensor
    temperature: torch.Tensor
    top_p: torch.Tensor
    tier_scores: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, index: torch.Tensor | slice | Sequence[int]) -> "RouterBatch":
        return RouterBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def minibatches(self, batch_size: int, generator: torch.Generator | None = None) -> list["RouterBatch"]:
        """Shuffled minibatches covering the batch once (an epoch)."""
        order = torch.randperm(len(self), generator=generator)
        return [self.subset(order[i:i + batch_size]) for i in range(0, len(self), batch_size)]


def ordinal_targets(observed: dict[int, tuple[float, float]], n_tiers: int,
                    independent: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Censored observations -> targets and weights of the T cumulative heads (head i: Y <= i).

    ``observed``: {tier index t: (adequate v in [0, 1], weight w)} for the tiers actually tried.
    Adequate at t means Y <= t, an observed 1 for every head i >= t; inadequate at t means Y > t,
    an observed 0 for every head i <= t (by monotonicity no cheaper tier was adequate either;
    inadequate at the largest tier is a 0 for every head, Y = "none").
    A soft v counts as weight w·v of the first and w·(1 - v) of the second.  Each head's target
    is the weighted mean of what it observed and its weight the total (a weighted sum of BCEs
    equals the total weight times one BCE at the mean target); heads nothing speaks to get
    weight 0.  Untried tiers are never given a label.

    ``independent=True`` (``router.tier_heads = "independent"``, head i = P(tier i adequate)): an
    observation at t is a target for head t only -- no monotonicity is assumed.
    """
    k = n_tiers
    pos, neg = np.zeros(k), np.zeros(k)
    for t, (v, w) in observed.items():
        if not 0 <= t < n_tiers:
            raise ValueError(f"observed tier index {t} outside 0..{n_tiers - 1}")
        if not 0.0 <= v <= 1.0 or w < 0:
            raise ValueError(f"observation at tier {t}: need adequacy in [0, 1] and weight >= 0, got {v}, {w}")
        if independent:
            pos[t] += w * v
            neg[t] += w * (1.0 - v)
            continue
        pos[t:] += w * v  # heads i >= t
        neg[:t + 1] += w * (1.0 - v)  # heads i <= t
    weight = pos + neg
    target = np.divide(pos, weight, out=np.full(k, np.nan), where=weight > 0)
    return target.astype(np.float32), weight.astype(np.float32)


def featurise(examples: Sequence["RouterExample"], tiers: Sequence[str], input_dim: int,
              context_buckets: Sequence[int] = (0, 2, 4, 8), hidden_dim: int | None = None,
              independent: bool = False) -> RouterBatch:
    """Examples -> RouterBatch.  Raises ValueError naming an example whose tier is unknown."""
    tiers = list(tiers)
    if not examples:
        raise ValueError("featurise needs at least one example")
    index = {t: i for i, t in enumerate(tiers)}
    b = len(examples)
    x = np.stack([featurise_input(e.x, tiers, input_dim) for e in examples])
    h_dim = hidden_dim or 0
    h0 = np.zeros((b, h_dim), np.float32)
    tier = np.full(b, -1, np.int64)
    cum_target = np.full((b, len(tiers)), np.nan, np.float32)
    cum_weight = np.zeros((b, len(tiers)), np.float32)
    bucket = np.full(b, -1, np.int64)
    temperature = np.full(b, np.nan, np.float32)
    top_p = np.full(b, np.nan, np.float32)
    scores = np.full((b, len(tiers)), np.nan, np.float32)
    for i, e in enumerate(examples):
        if e.best_tier is not None and e.best_tier not in index:
            raise ValueError(f"example {i}: best_tier {e.best_tier!r} is not one of the router's tiers {tiers}")
        try:
            observed = e.observed(tiers)
        except ValueError as err:
            raise ValueError(f"example {i}: {err}") from None
        cum_target[i], cum_weight[i] = ordinal_targets({index[t]: ow for t, ow in observed.items()}, len(tiers),
                                                       independent)
        exact = e.exact_tier(tiers)
        if exact is not None:
            tier[i] = index[exact]
        if e.context_items is not None:
            bucket[i] = context_bucket_index(e.context_items, context_buckets)
        if e.temperature is not None:
            temperature[i] = e.temperature
        if e.top_p is not None:
            top_p[i] = e.top_p
        for t, v in (e.tier_scores or {}).items():
            if t in index and v is not None:
                scores[i, index[t]] = v
        state = getattr(e, "state", None)
        if h_dim and state is not None:
            s = np.asarray(state, np.float32).reshape(-1)
            if s.shape[0] == h_dim:  # a state from a differently sized router is ignored, not an error
                h0[i] = s
    return RouterBatch(torch.from_numpy(x), torch.from_numpy(h0), torch.from_numpy(tier), torch.from_numpy(cum_target),
                       torch.from_numpy(cum_weight), torch.from_numpy(bucket),
                       torch.from_numpy(temperature), torch.from_numpy(top_p), torch.from_numpy(scores))
