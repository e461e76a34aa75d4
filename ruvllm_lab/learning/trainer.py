"""ContinualTrainer: the one code path that updates a FastGRNN router from a stream of examples.

The serving loop (``LearningService.learn``) and the forgetting experiment
(``experiments/forgetting.py``) both train through it, so what the experiment measures is
what the server runs::

    from ruvllm_lab.learning.trainer import ContinualTrainer
    from ruvllm_lab.router import make_router

    policy = make_router("fastgrnn", tiers, config.router, input_dim, seed=0)
    trainer = ContinualTrainer.from_config(config, seed=0)        # replay_ratio=0, ewc_lambda=0, ... override
    for fresh in stream_of_example_lists:
        report = trainer.update(policy, fresh)                     # or steps=S / epochs=E
        trainer.end_task(policy, fresh)                            # Fisher + replay, after the task / cycle

What one ``update`` does
------------------------
* **Replay mix.**  Each step is one batch of ``batch_size`` rows: ``round(replay_ratio ·
  batch_size)`` drawn from the replay reservoir (``self.replay``) and the rest fresh (all fresh
  while the reservoir is empty).  Fresh rows are taken in shuffled passes, so ``epochs=E``
  shows every fresh row E times; ``steps=S`` runs S steps (default ``learning.steps_per_cycle``).
* **Loss.**  ``router.train.router_loss``: the censored ordinal label loss plus the context and
  sampling heads (those only have targets on well-judged answers), plus the online-EWC penalty
  lam/2 · sum F (theta - theta*)^2 once a Fisher has been consolidated.
* **Sparsity.**  EdgeML's schedule inside every update: the first ``1 - iht_fraction`` of the
  steps are dense (phase 1: any weight may grow, so what the new data needs can overtake the
  current support), the rest hard-threshold each cell matrix to ``router.sparsity`` after
  every step (phase 2, iterative hard thresholding), and the update ends hard-thresholded,
  its support stored in ``policy.masks``.  The router that serves after any update therefore
  has exactly the configured sparsity -- there is no dense serving phase.  (IHT from the
  first step, measured on a 3-cluster bandit simulation, left the support at the
  initialisation's largest entries and needed 6 cycles where dense-then-IHT needs 1-2.)
* **Optimiser state, deliberately.**  Adam's moments are carried across ``update`` calls, keyed
  by parameter name (the service trains a deep copy each cycle, so the parameter objects change
  while the names do not).  A fresh Adam each cycle would restart bias correction, making the
  first steps of every cycle move each weight by about ``learning_rate`` whatever its gradient
  scale -- a systematic push away from the EWC anchor at every cycle.  The moments are committed
  only when the update finished with finite weights; a failed update leaves the trainer as it was.
* **Failure.**  A non-finite loss or weight raises ``FloatingPointError``; the caller discards
  the policy it passed in (the service trains a copy, so the serving router is untouched).

``consolidate`` estimates the diagonal Fisher of the **label log-likelihood only**
(``router.train.label_loss``: the ordinal heads' observed events; not the cost term nor the
context/sampling heads) per sample at the current weights (Kirkpatrick et al. 2017) and folds
it in online: F <- gamma · F_old + F_new, theta* <- theta (Schwarz et al. 2018; gamma = 1 is
plain accumulating EWC).  ``remember`` adds examples to the reservoir; ``end_task`` does both.
``updates`` counts optimiser steps -- the unit of "updates" in the forgetting metrics.
"""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Sequence

import numpy as np
import torch

from ..config import Config, RouterConfig
from ..router.base import RouterExample
from .ewc import EWCState
from .replay import ReplayBuffer


def _batch_as_dict(batch) -> dict[str, torch.Tensor]:
    return {f.name: getattr(batch, f.name) for f in fields(batch)}


def replay_key(example: RouterExample, tiers: Sequence[str]) -> str:
    """The reservoir a (tier-balanced) replay buffer files an example under: its exact tier when
    known, else the cheapest tier observed adequate, else the largest observed inadequate."""
    exact = example.exact_tier(list(tiers))
    if exact is not None:
        return exact
    obs = example.observed(list(tiers))
    good = [t for t in tiers if t in obs and obs[t][0] >= 0.5]
    bad = [t for t in tiers if t in obs and obs[t][0] < 0.5]
    return good[0] if good else (bad[-1] if bad else "unlabelled")


class ContinualTrainer:
    """See the module docstring."""

    def __init__(self, router_config: RouterConfig, *, replay_ratio: float = 0.5, batch_size: int = 32,
                 steps_per_cycle: int = 50, learning_rate: float = 0.01, ewc_lambda: float = 100.0,
                 ewc_gamma: float = 0.9, replay_capacity: int = 1000, replay_balance_by_tier: bool = False,
                 iht_fraction: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= replay_ratio <= 1.0:
            raise ValueError(f"replay_ratio must be in [0, 1], got {replay_ratio}")
        if batch_size < 1 or steps_per_cycle < 1:
            raise ValueError("batch_size and steps_per_cycle must be >= 1")
        self.router_config = router_config
        self.replay_ratio = float(replay_ratio)
        self.batch_size = int(batch_size)
        self.steps_per_cycle = int(steps_per_cycle)
        self.learning_rate = float(learning_rate)
        if not 0.0 <= iht_fraction <= 1.0:
            raise ValueError(f"iht_fraction must be in [0, 1], got {iht_fraction}")
        self.iht_fraction = float(iht_fraction)
        self.seed = int(seed)
        self.replay = ReplayBuffer(int(replay_capacity), replay_balance_by_tier, seed=seed)
        self.ewc = EWCState(lam=float(ewc_lambda), gamma=float(ewc_gamma))
        self.updates = 0
        self._rng = np.random.default_rng(seed)
        self._optimizer_state: dict[str, dict[str, torch.Tensor]] = {}  # param name -> Adam moments

    @classmethod
    def from_config(cls, config: Config, seed: int | None = None, **overrides: Any) -> "ContinualTrainer":
        """Defaults from ``config.learning`` (and ``config.router``); keyword overrides win, None = default."""
        lc = config.learning
        kw = dict(replay_ratio=lc.replay_ratio, batch_size=lc.batch_size, steps_per_cycle=lc.steps_per_cycle,
                  learning_rate=lc.learning_rate, ewc_lambda=lc.ewc_lambda, ewc_gamma=lc.ewc_gamma,
                  replay_capacity=lc.replay_capacity, replay_balance_by_tier=lc.replay_balance_by_tier,
                  iht_fraction=lc.iht_fraction)
        unknown = set(overrides) - set(kw)
        if unknown:
            raise TypeError(f"unknown ContinualTrainer override(s) {sorted(unknown)}; known: {sorted(kw)}")
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(config.router, seed=config.system.seed if seed is None else seed, **kw)

    # ---- one update ---------------------------------------------------------------------------------
    def _fresh_chunks(self, n: int, per_step: int, steps: int) -> list[np.ndarray]:
        """`steps` chunks of `per_step` fresh row indices, read from successive shuffled passes over
        the n rows (fewer rows than a step needs are repeated, so the replay share stays as configured)."""
        passes = math.ceil(per_step * steps / n)
        stream = np.concatenate([self._rng.permutation(n) for _ in range(passes)])
        return [stream[i * per_step:(i + 1) * per_step] for i in range(steps)]

    def update(self, policy: Any, fresh: Sequence[RouterExample], steps: int | None = None,
               epochs: int | None = None) -> dict[str, Any]:
        """Train ``policy.model`` in place on `fresh` (+ replay); see the module docstring."""
        from ..router.train import router_loss, size_report, sparsify_, train_steps

        fresh = list(fresh)
        if not fresh:
            raise ValueError("ContinualTrainer.update needs at least one fresh example")
        if steps is not None and epochs is not None:
            raise ValueError("give steps or epochs, not both")
        model = policy.model
        bs = self.batch_size
        n_replay = int(round(self.replay_ratio * bs)) if len(self.replay) else 0
        n_fresh = max(1, bs - n_replay)
        if epochs is not None:
            steps = int(epochs) * math.ceil(len(fresh) / n_fresh)
        steps = self.steps_per_cycle if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        chunks = self._fresh_chunks(len(fresh), n_fresh, steps)

        def batches():
            for idx in chunks:
                rows = [fresh[int(i)] for i in idx]
                yield policy.featurise(rows + self.replay.sample(n_replay) if n_replay else rows)

        optimizer = torch.optim.Adam(model.parameters(), lr=self.learning_rate)
        self._restore_optimizer(model, optimizer)
        sparsity = float(policy.config.sparsity)
        n_iht = int(round(self.iht_fraction * steps)) if sparsity > 0 else 0
        penalty = self.ewc.penalty if self.ewc.active else None
        stream = batches()
        losses = train_steps(model, (next(stream) for _ in range(steps - n_iht)), optimizer=optimizer,
                             extra_penalty=penalty)
        if n_iht:
            losses += train_steps(model, stream, optimizer=optimizer, extra_penalty=penalty,
                                  after_step=lambda m: sparsify_(m, sparsity))
        bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
        if bad or not all(torch.isfinite(p).all() for p in model.parameters()):
            raise FloatingPointError(f"non-finite loss or weights after training (first bad step {bad[:1]})")
        policy.masks = sparsify_(model, sparsity) if sparsity > 0 else {}  # the support that serves
        policy.trained = True
        self._save_optimizer(model, optimizer)  # committed only after a finite update
        self.updates += steps
        report: dict[str, Any] = {"steps": steps, "loss_first": losses[0], "loss_last": losses[-1],
                                  "fresh_per_step": n_fresh, "replay_per_step": n_replay,
                                  "updates_total": self.updates}
        if self.ewc.active:
            report["ewc_penalty"] = float(self.ewc.penalty(model).detach())
        size = size_report(model)
        report["cell_matrix_sparsity"] = size.get("cell_matrix_sparsity")
        report["train_loss_fresh"] = float(router_loss(model, policy.featurise(fresh)).detach())
        return report

    # ---- after a task / cycle -----------------------------------------------------------------------
    def consolidate(self, policy: Any, examples: Sequence[RouterExample]) -> dict[str, Any]:
        """Online EWC: per-sample Fisher of the label log-likelihood on `examples`, folded in."""
        from ..router.train import label_loss

        examples = list(examples)
        if self.ewc.lam <= 0 or not examples:
            return {}
        batch = policy.featurise(examples)
        minis = [_batch_as_dict(b) for b in batch.minibatches(self.batch_size)]
        kind = type(batch)
        f_new = self.ewc.consolidate(policy.model, minis, lambda m, d: label_loss(m, kind(**d)), per_sample=True)
        return {"fisher_mean": float(torch.cat([f.flatten() for f in f_new.values()]).mean()),
                "ewc_consolidations": self.ewc.consolidations}

    def remember(self, examples: Sequence[RouterExample], tiers: Sequence[str] | None = None) -> None:
        """Offer examples to the replay reservoir (filed under ``replay_key`` when `tiers` are given)."""
        for e in examples:
            self.replay.add(e, tier=replay_key(e, tiers) if tiers is not None else "unlabelled")

    def end_task(self, policy: Any, examples: Sequence[RouterExample]) -> dict[str, Any]:
        """``consolidate`` then ``remember`` (the Fisher is taken before the examples join replay)."""
        report = self.consolidate(policy, examples)
        self.remember(examples, policy.tiers)
        return report

    # ---- optimiser state ------------------------------------------------------------------------------
    def _restore_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for name, p in model.named_parameters():
            saved = self._optimizer_state.get(name)
            if saved and saved["exp_avg"].shape == p.shape:
                optimizer.state[p] = {k: v.clone() for k, v in saved.items()}

    def _save_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer_state = {name: {k: v.detach().clone() for k, v in optimizer.state[p].items()}
                                 for name, p in model.named_parameters() if p in optimizer.state}

    def state_dict(self) -> dict[str, Any]:
        """Optimiser moments and the update count (tensors and scalars: ``torch.load(weights_only=True)``)."""
        return {"updates": self.updates,
                "optimizer": {n: {k: v.cpu() for k, v in s.items()} for n, s in self._optimizer_state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))
        self._optimizer_state = {n: dict(s) for n, s in dict(state.get("optimizer", {})).items()}


__all__ = ["ContinualTrainer", "replay_key"]
