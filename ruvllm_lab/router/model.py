"""FastGRNNRouter: request features -> FastGRNN cell (state carried across a session) -> heads.

    x (B, F) --FastGRNNCell--> h' (B, H) --Linear--> [ cumulative tier heads (T-1) | context logits (C) |
                                                      temperature | top_p ]

Tier heads are **ordinal and cumulative**.  Tiers are ordered by cost (cheapest first); Y is the
cheapest tier whose answer is adequate.  Head i models C_i = P(Y <= i) for i = 0..T-2
(C_{T-1} = 1: the largest tier is the last resort).  Monotone by construction::

    z_0 = a_0,   z_i = z_{i-1} + softplus(a_i),   C_i = sigmoid(z_i)

so C_0 <= C_1 <= ... for every input.  The tier distribution is the difference
p(i) = C_i - C_{i-1} (C_{-1} = 0, C_{T-1} = 1).  Why cumulative: in serving only the chosen
tier's outcome is seen, and "tier t was adequate" is exactly the event Y <= t ("not adequate"
is Y > t), so every observation is a target for heads without inventing a label for an untried
tier (``train.ordinal_loss``).

Serving rule (``Router._ordinal_choice`` in ``router.base``; ``train.predicted_tiers`` in batch): the cheapest tier i with C_i >= ``router.confidence_threshold``;
when no cheaper tier reaches it, the configured ``router.fallback`` (the largest tier by
default, which is also where the cumulative rule itself ends).  The decision's confidence is
C of the chosen tier.  Output squashing: temperature = TEMPERATURE_MAX · σ(a), top_p = σ(b).

``tier_costs`` (buffer, (T,), max 1) is the relative cost used by the cost-aware loss:
``models.resolve(t).relative_cost`` (parameter-weighted) when every tier is a ladder tier,
otherwise the rank (i+1)/T, because user GGUF files have no trustworthy cost.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..config import RouterConfig
from .base import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, RawRoute, Router, RouterExample, RouterInput, register_router
from .fastgrnn import FastGRNNCell
from .features import feature_dim, featurise, featurise_input

TEMPERATURE_MAX = 1.5
UNTRAINED_CUM_BIAS = -2.0  # raw head bias at init: C_0 = σ(-2) ≈ 0.12, later heads add softplus(-2) ≈ 0.13 each


def tier_costs(tiers: Sequence[str]) -> torch.Tensor:
    """(T,) relative cost per tier, scaled so the most expensive tier costs 1."""
    if all(t in models.LADDER for t in tiers):
        costs = torch.tensor([models.LADDER[t].relative_cost for t in tiers], dtype=torch.float32)
    else:
        costs = torch.arange(1, len(tiers) + 1, dtype=torch.float32) / len(tiers)
    return costs / costs.max()


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@dataclass
class RouterOutput:
    h: torch.Tensor  # (B, H) new hidden state
    cum_logits: torch.Tensor  # (B, T-1) z_i = logit P(Y <= i), non-decreasing in i
    context_logits: torch.Tensor  # (B, C)
    temperature: torch.Tensor  # (B,) in (0, TEMPERATURE_MAX)
    top_p: torch.Tensor  # (B,) in (0, 1)

    @property
    def cum_probs(self) -> torch.Tensor:
        """(B, T-1) C_i = P(Y <= i)."""
        return torch.sigmoid(self.cum_logits)

    @property
    def tier_probs(self) -> torch.Tensor:
        """(B, T) p(i) = C_i - C_{i-1}; sums to 1."""
        return tier_probs_from_cumulative(self.cum_probs)


def cumulative_logits(raw: torch.Tensor) -> torch.Tensor:
    """(B, T-1) raw head outputs a -> z with z_0 = a_0, z_i = z_{i-1} + softplus(a_i) (monotone)."""
    if raw.shape[-1] <= 1:
        return raw
    return torch.cat([raw[..., :1], raw[..., :1] + torch.cumsum(F.softplus(raw[..., 1:]), -1)], -1)


def tier_probs_from_cumulative(cum: torch.Tensor) -> torch.Tensor:
    """(B, T-1) C -> (B, T) p with p(i) = C_i - C_{i-1}, C_{-1} = 0, C_{T-1} = 1."""
    lead = cum.shape[:-1]
    full = torch.cat([torch.zeros(*lead, 1, dtype=cum.dtype), cum, torch.ones(*lead, 1, dtype=cum.dtype)], -1)
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
        n_k, n_c = len(self.tiers) - 1, len(self.context_buckets)
        self.head = nn.Linear(config.hidden_dim, n_k + n_c + 2)  # fused cumulative tier | context | temp | top_p
        with torch.no_grad():  # start at the inference defaults, so an untrained router samples sanely
            self.head.bias[n_k + n_c] = _logit(DEFAULT_TEMPERATURE / TEMPERATURE_MAX)
            self.head.bias[n_k + n_c + 1] = _logit(DEFAULT_TOP_P)
            self.head.bias[n_k + n_c - 1] += 2.0  # and with the largest context bucket until taught otherwise
            # Untaught, every C_i starts low (~0.1), so the serving rule picks the largest tier:
            # quality first until outcomes say a cheaper tier is enough.
            self.head.bias[:n_k] = UNTRAINED_CUM_BIAS
        self.register_buffer("tier_costs", tier_costs(self.tiers))
        self._splits = (n_k, n_c, 1, 1)

    @property
    def hidden_dim(self) -> int:
        return self.cell.hidden_dim

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> RouterOutput:
        h_new = self.cell(x, h)  # (B, H)
        cum, ctx, temp, top_p = torch.split(self.head(h_new), self._splits, dim=-1)
        return RouterOutput(h_new, cumulative_logits(cum), ctx, TEMPERATURE_MAX * torch.sigmoid(temp[:, 0]),
                            torch.sigmoid(top_p[:, 0]))


def build_model(input_dim: int, tiers: Sequence[str], config: RouterConfig, seed: int = 0) -> FastGRNNRouter:
    """A freshly initialised router network, reproducible from `seed` without touching global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FastGRNNRouter(input_dim, tiers, config)


@register_router("fastgrnn")
class FastGRNNPolicy(Router):
    """The registry's "fastgrnn" router: featurise -> FastGRNNRouter -> shared decision rules.

    ``route`` runs the plain-numpy inference path (``numpy_infer``) — same numbers as torch,
    a fraction of the per-call overhead.  It re-snapshots the weights whenever any parameter
    changed in place (optimizer steps, ``load_state_dict``), so training ``policy.model``
    directly with ``train.train_steps`` is safe.  ``backend="torch"`` routes through torch.
    """

    uses_fallback = True

    def __init__(self, tiers, config, input_dim, seed=0, backend: str = "numpy"):
        super().__init__(tiers, config, input_dim, seed)
        if backend not in ("numpy", "torch"):
            raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
        self.backend = backend
        self.model = build_model(input_dim, self.tiers, config, seed)
        self.masks: dict[str, torch.Tensor] = {}  # frozen sparsity support after phase 3 (empty = dense)
        self.trained = False
        self._numpy = None
        self._numpy_key: tuple = ()
        self._params_of: nn.Module | None = None
        self._params: list[torch.Tensor] = []

    def __deepcopy__(self, memo: dict) -> "FastGRNNPolicy":
        # A deep copy's tensors restart at version 0, so the weight snapshot could look current
        # when it is not: the copy starts without one.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        skip = {"_numpy", "_numpy_key", "_params_of", "_params"}
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k not in skip})
        new._numpy, new._numpy_key, new._params_of, new._params = None, (), None, []
        return new

    # ---- inference ------------------------------------------------------------------------------
    def initial_state(self) -> np.ndarray:
        return np.zeros(self.model.hidden_dim, np.float32)

    def _numpy_model(self):
        from .numpy_infer import NumpyFastGRNN
        if self._params_of is not self.model:  # fit() or a caller may replace the module
            self._params_of, self._params, self._numpy = self.model, list(self.model.parameters()), None
        key = tuple(p._version for p in self._params)  # a tensor's version bumps on every in-place update
        if self._numpy is None or key != self._numpy_key:
            self._numpy = NumpyFastGRNN.from_model(self.model)
            self._numpy_key = key
        return self._numpy

    def _raw_route(self, x: RouterInput, state: Any) -> RawRoute:
        feats = featurise_input(x, self.tiers, self.input_dim)  # (F,)
        h = self.initial_state() if state is None else np.asarray(state, np.float32).reshape(-1)
        if h.shape[0] != self.model.hidden_dim:
            raise ValueError(f"router state has {h.shape[0]} units, the router has {self.model.hidden_dim}; "
                             "start the session with state=None")
        if self.backend == "numpy":
            out = self._numpy_model().step(feats, h)
            cum, probs, ctx, temp, top_p, h_new = (out.cum_probs, out.tier_probs, out.context_index,
                                                   out.temperature, out.top_p, out.h)
        else:
            with torch.inference_mode():
                o = self.model(torch.from_numpy(feats)[None, :], torch.from_numpy(h)[None, :])
                cum, probs = o.cum_probs[0].double().numpy(), o.tier_probs[0].double().numpy()
                ctx = int(o.context_logits[0].argmax())
                temp, top_p, h_new = float(o.temperature[0]), float(o.top_p[0]), o.h[0].numpy().copy()
        # confidence is filled in by the shared ordinal rule (C of the chosen tier)
        return RawRoute(probs, float("nan"), self.model.context_buckets[ctx], temp, top_p, h_new, cum=cum)

    # ---- learning ---------------------------------------------------------------------------------
    def featurise(self, examples: Sequence[RouterExample]):
        return featurise(examples, self.tiers, self.input_dim, self.model.context_buckets, self.model.hidden_dim)

    def fit(self, examples: list[RouterExample]) -> dict:
        """From scratch: fresh weights, then EdgeML's dense -> IHT -> frozen-support schedule."""
        from .train import three_phase_fit
        self.model = build_model(self.input_dim, self.tiers, self.config, self.seed)
        report = three_phase_fit(self.model, self.featurise(examples), self.config, seed=self.seed)
        self.masks = report.pop("masks")
        self.trained = True
        return {"router": self.name, "examples": len(examples), "trained": True, **report}

    def partial_fit(self, examples: list[RouterExample]) -> dict:
        """Online update: a few epochs on the new examples, keeping the sparsity support if any."""
        from .train import accuracy, train_epochs
        batch = self.featurise(examples)
        epochs = max(1, self.config.epochs // 3)
        losses = train_epochs(self.model, batch, epochs, self.config, masks=self.masks or None, seed=self.seed)
        self.trained = True
        return {"router": self.name, "examples": len(examples), "trained": True, "epochs": epochs,
                "final_loss": losses[-1], "train_accuracy": accuracy(self.model, batch)}

    def state_dict(self) -> dict:
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "masks": {k: v.clone() for k, v in self.masks.items()}, "trained": self.trained}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.masks = dict(state.get("masks", {}))
        self.trained = bool(state.get("trained", True))
