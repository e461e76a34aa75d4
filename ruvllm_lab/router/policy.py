"""FastGRNNPolicy: the registry's "fastgrnn" router, wrapping the network of ``model.py``.

Kept apart from the network so the package's imports are acyclic: ``model`` (the nn.Module and
its head layout) is a leaf; ``numpy_infer`` and ``train`` import it; this module imports all
three.  Registration is explicit: ``router/__init__`` imports this module.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .base import RawRoute, Router, RouterExample, RouterInput, register_router
from .features import featurise, featurise_input
from .model import build_model
from .numpy_infer import NumpyFastGRNN
from .train import accuracy, three_phase_fit, train_epochs


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
        return featurise(examples, self.tiers, self.input_dim, self.model.context_buckets, self.model.hidden_dim,
                         independent=self.config.tier_heads == "independent")

    def fit(self, examples: list[RouterExample]) -> dict:
        """From scratch: fresh weights, then EdgeML's dense -> IHT -> frozen-support schedule."""
        self.model = build_model(self.input_dim, self.tiers, self.config, self.seed)
        report = three_phase_fit(self.model, self.featurise(examples), self.config, seed=self.seed)
        self.masks = report.pop("masks")
        self.trained = True
        return {"router": self.name, "examples": len(examples), "trained": True, **report}

    def partial_fit(self, examples: list[RouterExample]) -> dict:
        """Online update: a few epochs on the new examples, keeping the sparsity support if any."""
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
