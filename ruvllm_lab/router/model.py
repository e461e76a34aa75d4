"""FastGRNNRouter: request features -> FastGRNN cell (state carried across a session) -> heads.

    x (B, F) --FastGRNNCell--> h' (B, H) --Linear--> [ tier logits (T) | context logits (C) |
                                                      temperature | top_p | confidence ]

The five heads share one Linear layer (one matmul at batch 1).  Output squashing:
temperature = TEMPERATURE_MAX · σ(a), top_p = σ(b), confidence = σ(c) — the router's own
estimate that its argmax tier is the right one, which ``FastGRNNPolicy`` compares with
``router.confidence_threshold`` to decide whether the fallback takes over.

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
from torch import nn

from .. import models
from ..config import RouterConfig
from .base import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, RawRoute, Router, RouterExample, RouterInput, register_router
from .fastgrnn import FastGRNNCell
from .features import feature_dim, featurise, featurise_input

TEMPERATURE_MAX = 1.5


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
    tier_logits: torch.Tensor  # (B, T)
    context_logits: torch.Tensor  # (B, C)
    temperature: torch.Tensor  # (B,) in (0, TEMPERATURE_MAX)
    top_p: torch.Tensor  # (B,) in (0, 1)
    confidence_logit: torch.Tensor  # (B,)


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
        n_t, n_c = len(self.tiers), len(self.context_buckets)
        self.head = nn.Linear(config.hidden_dim, n_t + n_c + 3)  # fused tier | context | temp | top_p | conf
        with torch.no_grad():  # start at the inference defaults, so an untrained router samples sanely
            self.head.bias[n_t + n_c] = _logit(DEFAULT_TEMPERATURE / TEMPERATURE_MAX)
            self.head.bias[n_t + n_c + 1] = _logit(DEFAULT_TOP_P)
            self.head.bias[n_t + n_c - 1] += 2.0  # and with the largest context bucket until taught otherwise
        self.register_buffer("tier_costs", tier_costs(self.tiers))
        self._splits = (n_t, n_c, 1, 1, 1)

    @property
    def hidden_dim(self) -> int:
        return self.cell.hidden_dim

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> RouterOutput:
        h_new = self.cell(x, h)  # (B, H)
        tier, ctx, temp, top_p, conf = torch.split(self.head(h_new), self._splits, dim=-1)
        return RouterOutput(h_new, tier, ctx, TEMPERATURE_MAX * torch.sigmoid(temp[:, 0]), torch.sigmoid(top_p[:, 0]),
                            conf[:, 0])


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
            probs, conf, ctx, temp, top_p, h_new = (out.tier_probs, out.confidence, out.context_index,
                                                    out.temperature, out.top_p, out.h)
        else:
            with torch.inference_mode():
                o = self.model(torch.from_numpy(feats)[None, :], torch.from_numpy(h)[None, :])
                probs = torch.softmax(o.tier_logits[0], -1).numpy()
                conf = float(torch.sigmoid(o.confidence_logit[0]))
                ctx = int(o.context_logits[0].argmax())
                temp, top_p, h_new = float(o.temperature[0]), float(o.top_p[0]), o.h[0].numpy().copy()
        return RawRoute(probs, conf, self.model.context_buckets[ctx], temp, top_p, h_new)

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
