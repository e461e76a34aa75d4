"""Elastic Weight Consolidation (Kirkpatrick et al. 2017) as pure functions, plus online EWC.

Penalty (quadratic pull towards the weights that solved earlier tasks)::

    Omega(theta) = lam / 2 * sum_i F_i * (theta_i - theta*_i)^2

with theta* the anchor weights and F the diagonal of the empirical Fisher information at
theta*, estimated from N training samples (x_n, y_n)::

    F_i = 1/N * sum_n ( d loss(x_n, y_n; theta*) / d theta_i )^2          (per-sample)

Online EWC (Schwarz et al. 2018) keeps one running Fisher instead of one per task::

    F <- gamma * F_old + F_new,      theta* <- theta after the newest task

Avalanche's ``EWCPlugin`` squares the *minibatch-mean* gradient instead
(``per_sample=False`` here)::

    F~_i = 1/M * sum_b ( 1/B * sum_{n in b} g_{n,i} )^2

That is not the Fisher: E[(mean of B gradients)^2] = mean_grad^2 + Var(g)/B, so at a
converged anchor (mean gradient ~ 0) it underestimates the per-sample Fisher by about a
factor B, and the factor changes with the batch size.  The per-sample form is the default.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import DimensionMismatch

LossFn = Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> scalar mean loss over the batch


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _batch_size(batch: Any) -> int:
    leaves = [x for x in tree_flatten(batch)[0] if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not leaves:
        raise ValueError("a batch must contain at least one tensor with a leading batch dimension")
    sizes = {int(x.shape[0]) for x in leaves}
    if len(sizes) != 1:
        raise DimensionMismatch(f"batch tensors disagree on the batch dimension: sizes {sorted(sizes)}")
    return sizes.pop()


def _slice(batch: Any, i: int) -> Any:
    return tree_map(lambda x: x[i:i + 1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x, batch)


class _LossModule(nn.Module):
    """Wraps (model, loss_fn) so ``functional_call`` can substitute the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _per_sample_sq_grads_vmap(model: nn.Module, batch: Any, loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """sum_n g_n^2 for one batch via vmap(grad(...)) over the samples."""
    from torch.func import functional_call, grad, vmap

    wrapper = _LossModule(model, loss_fn)
    params = {f"model.{n}": p.detach() for n, p in _trainable(model).items()}
    buffers = {f"model.{n}": b.detach() for n, b in model.named_buffers()}

    def sample_loss(p, sample):
        one = tree_map(lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x, sample)
        return functional_call(wrapper, {**p, **buffers}, (one,))

    in_dims = (None, tree_map(lambda x: 0 if isinstance(x, torch.Tensor) and x.dim() > 0 else None, batch))
    grads = vmap(grad(sample_loss), in_dims=in_dims, randomness="different")(params, batch)
    return {n[len("model."):]: g.pow(2).sum(0) for n, g in grads.items()}


def _per_sample_sq_grads_loop(model: nn.Module, batch: Any, loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """sum_n g_n^2 for one batch, one backward pass per sample (the brute-force reference)."""
    params = _trainable(model)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(_batch_size(batch)):
        loss = loss_fn(model, _slice(batch, i))
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                acc[n] += g.detach().pow(2)
    return acc


def fisher_diag(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, per_sample: bool = True,
                method: str = "auto") -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of `model` at its current weights.

    ``batches``: an iterable of batches (a tensor, or a tuple/list/dict of tensors sharing a
    leading batch dimension); ``loss_fn(model, batch)`` returns the *mean* loss over the batch
    (so on a one-sample slice it is that sample's loss).

    ``per_sample=True``: F = 1/N sum_n g_n^2 (see module docstring).  ``method`` picks how the
    per-sample gradients are computed: ``"vmap"`` (torch.func.vmap over grad), ``"loop"``
    (one backward per sample), or ``"auto"`` (vmap, falling back to the loop when the loss
    function is not vmap-compatible, e.g. it calls ``.item()``).

    ``per_sample=False``: Avalanche's F~ = 1/M sum_b (mean-gradient of batch b)^2.

    Returns {parameter name: tensor shaped like the parameter}, detached; the model's
    ``.grad`` fields and train/eval mode are left as they were.
    """
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")
    params = _trainable(model)
    if not params:
        raise ValueError("fisher_diag: the model has no trainable parameters")
    total = {n: torch.zeros_like(p, requires_grad=False) for n, p in params.items()}
    count = 0
    use_vmap = method in ("auto", "vmap")
    for batch in batches:
        b = _batch_size(batch)
        if b == 0:
            continue
        if not per_sample:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    total[n] += g.detach().pow(2)
            count += 1
            continue
        sq = None
        if use_vmap:
            try:
                sq = _per_sample_sq_grads_vmap(model, batch, loss_fn)
            except Exception:
                if method == "vmap":
                    raise
                use_vmap = False  # not vmap-compatible: loop for the rest
        if sq is None:
            sq = _per_sample_sq_grads_loop(model, batch, loss_fn)
        for n in total:
            total[n] += sq[n].detach()
        count += b
    if count == 0:
        raise ValueError("fisher_diag: no samples in `batches`")
    return {n: t / count for n, t in total.items()}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters: the EWC anchor theta*."""
    return {n: p.detach().clone() for n, p in _trainable(model).items()}


def ewc_penalty(model: nn.Module, anchor: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
                lam: float) -> torch.Tensor:
    """lam / 2 * sum_i F_i (theta_i - theta*_i)^2 over parameters present in `fisher`; differentiable."""
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device if params else torch.device("cpu")
    total = torch.zeros((), device=device)
    for name, f in fisher.items():
        if name not in params:
            raise KeyError(f"EWC Fisher names parameter {name!r}, which the model does not have")
        if name not in anchor:
            raise KeyError(f"EWC anchor lacks parameter {name!r}")
        p = params[name]
        if f.shape != p.shape or anchor[name].shape != p.shape:
            raise DimensionMismatch(f"EWC state for {name!r} has shape {tuple(f.shape)}, the model {tuple(p.shape)}")
        total = total + (f.to(p.device) * (p - anchor[name].to(p.device)).pow(2)).sum()
    return 0.5 * lam * total


@dataclass
class EWCState:
    """Online EWC: one running Fisher and the latest anchor.

    ``consolidate`` after training on new data: F <- gamma * F_old + F_new, theta* <- theta.
    Offline ``gamma = 1`` keeps summing; ``gamma = 0`` remembers only the newest task.
    """

    lam: float = 100.0
    gamma: float = 0.9
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    anchor: dict[str, torch.Tensor] = field(default_factory=dict)
    consolidations: int = 0

    @property
    def active(self) -> bool:
        return bool(self.fisher) and self.lam > 0

    def consolidate(self, model: nn.Module, batches: Iterable[Any], loss_fn: LossFn,
                    per_sample: bool = True, method: str = "auto") -> dict[str, torch.Tensor]:
        """Estimate F_new at the model's current weights, fold it in, move the anchor; returns F_new."""
        f_new = fisher_diag(model, batches, loss_fn, per_sample=per_sample, method=method)
        if self.fisher and set(self.fisher) != set(f_new):
            raise DimensionMismatch("EWC: the model's parameters differ from the ones the Fisher was built on")
        self.fisher = {n: (self.gamma * self.fisher[n] + f if self.fisher else f) for n, f in f_new.items()}
        self.anchor = snapshot(model)
        self.consolidations += 1
        return f_new

    def penalty(self, model: nn.Module) -> torch.Tensor:
        if not self.active:
            return torch.zeros(())
        return ewc_penalty(model, self.anchor, self.fisher, self.lam)

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "gamma": self.gamma, "consolidations": self.consolidations,
                "fisher": {n: t.cpu() for n, t in self.fisher.items()},
                "anchor": {n: t.cpu() for n, t in self.anchor.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam, self.gamma = float(state["lam"]), float(state["gamma"])
        self.consolidations = int(state["consolidations"])
        self.fisher, self.anchor = dict(state["fisher"]), dict(state["anchor"])

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EWCState":
        state = torch.load(path, map_location="cpu", weights_only=True)
        s = cls()
        s.load_state_dict(state)
        return s
