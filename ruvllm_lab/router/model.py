"""FastGRNNRouter: request features -> FastGRNN cell (state carried across a session) -> heads.

    x (B, F) --FastGRNNCell--> h' (B, H) --Linear--> [ cumulative tier heads (T) | context logits (C) |
                                                      temperature | top_p ]

Tier heads are **ordinal and cumulative**.  Tiers are ordered by cost (cheapest first); Y is the
cheapest tier whose answer is adequate, or "none" when no tier's is.  Head i models
C_i = P(Y <= i) for i = 0..T-1; C_{T-1} = P(the largest tier is adequate) is learned too (it
was fixed at 1 before, which made every query look answerable by the largest tier: a query
family no tier answers -- dates on the server-cpu ladder -- was then always sent to the most
expensive tier).  Monotone by construction::

    z_0 = a_0,   z_i = z_{i-1} + softplus(a_i),   C_i = sigmoid(z_i)

so C_0 <= C_1 <= ... for every input.  The tier distribution is the routing distribution of the
threshold rule, p(i) = C_i - C_{i-1} for i < T-1 and p(T-1) = 1 - C_{T-2} (the largest tier
takes "none" too: it is where the threshold rule ends).  Why cumulative: in serving only the
chosen tier's outcome is seen, and "tier t was adequate" is exactly the event Y <= t ("not
adequate" is Y > t), so every observation is a target for heads without inventing a label for
an untried tier (``train.ordinal_loss``).

Serving rule (``router.base.ordinal_choice``; ``train.predicted_tiers`` in batch): ``threshold``
-- the cheapest tier i < T-1 with C_i >= ``router.confidence_threshold``, else the configured
``router.fallback``; ``utility`` -- argmax_i C_i - ``router.cost_penalty`` · cost_i.  The
decision's confidence is C of the chosen tier.  An untrained router believes the largest tier
adequate (C_{T-1} ≈ UNTRAINED_LARGEST_ADEQUATE) and every cheaper one unlikely, so both rules
start at the largest tier.  Output squashing: temperature = TEMPERATURE_MAX · σ(a), top_p = σ(b).

``tier_costs`` (buffer, (T,), max 1) is the relative cost used by the cost-aware loss:
``models.resolve(t).relative_cost`` (parameter-weighted) when every tier is a ladder tier,
otherwise the rank (i+1)/T, because user GGUF files have no trustworthy cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RouterConfig
from .base import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from .base import tier_costs as base_tier_costs
from .fastgrnn import FastGRNNCell
from .features import feature_dim

TEMPERATURE_MAX = 1.5
UNTRAINED_CUM_BIAS = -2.0  # raw head bias at init: C_0 = σ(-2) ≈ 0.12, later heads add softplus(-2) ≈ 0.13 each
UNTRAINED_LARGEST_ADEQUATE = 0.9  # C_{T-1} at init: quality first until outcomes say otherwise


def tier_costs(tiers: Sequence[str]) -> torch.Tensor:
    """(T,) relative cost per tier, scaled so the most expensive tier costs 1 (``base.tier_costs``)."""
    return torch.from_numpy(base_tier_costs(tiers)).to(torch.float32)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@dataclass
class RouterOutput:
    h: torch.Tensor  # (B, H) new hidden state
    cum_logits: torch.Tensor  # (B, T) z_i = logit P(Y <= i), non-decreasing in i
    context_logits: torch.Tensor  # (B, C)
    temperature: torch.Tensor  # (B,) in (0, TEMPERATURE_MAX)
    top_p: torch.Tensor  # (B,) in (0, 1)

    @property
    def cum_probs(self) -> torch.Tensor:
        """(B, T) C_i = P(Y <= i)."""
        return torch.sigmoid(self.cum_logits)

    @property
    def tier_probs(self) -> torch.Tensor:
        """(B, T) the threshold rule's routing distribution (``tier_probs_from_cumulative``); sums to 1."""
        return tier_probs_from_cumulative(self.cum_probs)


def cumulative_logits(raw: torch.Tensor) -> torch.Tensor:
    """(B, T) raw head outputs a -> z with z_0 = a_0, z_i = z_{i-1} + softplus(a_i) (monotone)."""
    if raw.shape[-1] <= 1:
        return raw
    return torch.cat([raw[..., :1], raw[..., :1] + torch.cumsum(F.softplus(raw[..., 1:]), -1)], -1)


def tier_probs_from_cumulative(cum: torch.Tensor) -> torch.Tensor:
    """(B, T) C -> (B, T) p with p(i) = C_i - C_{i-1} for i < T-1 (C_{-1} = 0) and p(T-1) = 1 - C_{T-2}:
    the largest tier also takes "no tier adequate" (the threshold rule's last resort).  Independent
    heads need not be monotone: their running maximum is used (the threshold rule's cheapest i with
    C_i >= tau is the same on it), so p is the threshold rule's routing distribution either way."""
    cum = torch.cummax(cum, dim=-1).values
    lead = cum.shape[:-1]
    full = torch.cat([torch.zeros(*lead, 1, dtype=cum.dtype), cum[..., :-1], torch.ones(*lead, 1, dtype=cum.dtype)],
                     -1)
    return (full[..., 1:] - full[..., :-1]).clamp(min=0.0)


class FastGRNNRouter(nn.Module):
    """The router network; pure (no I/O).  ``forward(x (B, F), h (B, H) | None) -> RouterOutput``."""

    def __init__(self, input_dim: int, tiers: Sequence[str], config: RouterConfig) -> None:
        super().__init__()
        self.input_dim = int(input_dim)
        self.tiers = list(tiers)
        self.context_buckets = [int(b) for b in config.context_buckets]
        self.config = config
        self.feature_dim = feature_dim(self.input_dim, len(self.tiers))
        self.cell = FastGRNNCell(self.feature_dim, config.hidden_dim, config.w_rank or None, config.u_rank or None)
        n_k, n_c = len(self.tiers), len(self.context_buckets)
        self.independent = config.tier_heads == "independent"  # head i = logit P(tier i adequate), no cumsum
        self.head = nn.Linear(config.hidden_dim, n_k + n_c + 2)  # fused cumulative tier | context | temp | top_p
        with torch.no_grad():  # start at the inference defaults, so an untrained router samples sanely
            self.head.bias[n_k + n_c] = _logit(DEFAULT_TEMPERATURE / TEMPERATURE_MAX)
            self.head.bias[n_k + n_c + 1] = _logit(DEFAULT_TOP_P)
            self.head.bias[n_k + n_c - 1] += 2.0  # and with the largest context bucket until taught otherwise
            # Untaught, every C_i below the largest starts low (~0.1) and the largest high, so both
            # serving rules pick the largest tier: quality first until outcomes say a cheaper one is enough.
            self.head.bias[:n_k] = UNTRAINED_CUM_BIAS
            top = _logit(UNTRAINED_LARGEST_ADEQUATE)
            if self.independent or n_k == 1:
                self.head.bias[n_k - 1] = top
            else:  # z_{T-1} = z_{T-2} + softplus(a_{T-1}) = top
                below = float(cumulative_logits(self.head.bias[:n_k][None, :])[0, -2])
                self.head.bias[n_k - 1] = math.log(math.expm1(max(top - below, 1e-3)))  # softplus^{-1}
        self.register_buffer("tier_costs", tier_costs(self.tiers))
        self._splits = (n_k, n_c, 1, 1)

    @property
    def hidden_dim(self) -> int:
        return self.cell.hidden_dim

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> RouterOutput:
        h_new = self.cell(x, h)  # (B, H)
        cum, ctx, temp, top_p = torch.split(self.head(h_new), self._splits, dim=-1)
        return RouterOutput(h_new, cum if self.independent else cumulative_logits(cum), ctx,
                            TEMPERATURE_MAX * torch.sigmoid(temp[:, 0]), torch.sigmoid(top_p[:, 0]))


def build_model(input_dim: int, tiers: Sequence[str], config: RouterConfig, seed: int = 0) -> FastGRNNRouter:
    """A freshly initialised router network, reproducible from `seed` without touching global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FastGRNNRouter(input_dim, tiers, config)
