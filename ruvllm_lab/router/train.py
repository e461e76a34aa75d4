"""Training the FastGRNN router: cost-aware loss, EdgeML's three-phase schedule, size report.

Loss per example i (``router_loss``)::

    L_i = CE(tier_logits_i, best_tier_i)                       # the cheapest tier that answered well
        + cost_weight · Σ_t p_i(t) · cost(t)                   # expected relative cost under the prediction
        + CE(context_logits_i, bucket_i)         if logged     # context-size class
        + (temperature_i − target)²              if logged
        + (top_p_i − target)²                    if logged
        + BCE(confidence_logit_i, [argmax p_i == best_tier_i]) # calibrates the fallback trigger

Three-phase schedule (Kusupati et al. 2018 / EdgeML ``FastTrainer``), epochs split in thirds:

1. dense training;
2. iterative hard thresholding (IHT): after every optimizer step each cell matrix
   (W, U or their low-rank factors) keeps only its ``round((1 − sparsity) · n)`` largest-magnitude
   entries; entries may re-enter the support because the gradient step is dense;
3. the support at the end of phase 2 is frozen (a 0/1 mask per matrix) and training continues
   with masked entries held at zero.

No file I/O here except ``save_router`` / ``load_router``.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RouterConfig
from ..errors import ConfigError
from .features import RouterBatch
from .model import FastGRNNRouter

Penalty = Callable[[nn.Module], torch.Tensor]


# ---- loss ---------------------------------------------------------------------------------------
def router_loss(model: FastGRNNRouter, batch: RouterBatch, reduction: str = "mean",
                cost_weight: float | None = None) -> torch.Tensor:
    """Cost-aware routing loss (module docstring).  ``reduction="none"`` gives (B,) per-example
    losses, which is what a per-sample Fisher (EWC) needs."""
    out = model(batch.x, batch.h0 if batch.h0.shape[1] == model.hidden_dim else None)
    cw = model.config.cost_weight if cost_weight is None else cost_weight
    log_p = F.log_softmax(out.tier_logits, dim=-1)  # (B, T)
    loss = F.nll_loss(log_p, batch.tier, reduction="none")  # (B,)
    loss = loss + cw * (log_p.exp() * model.tier_costs).sum(-1)
    known_ctx = batch.context_bucket >= 0
    if known_ctx.any():
        ctx = F.cross_entropy(out.context_logits, batch.context_bucket.clamp(min=0), reduction="none")
        loss = loss + torch.where(known_ctx, ctx, torch.zeros_like(ctx))
    for pred, target in ((out.temperature, batch.temperature), (out.top_p, batch.top_p)):
        known = ~torch.isnan(target)
        if known.any():
            loss = loss + torch.where(known, (pred - torch.nan_to_num(target)) ** 2, torch.zeros_like(pred))
    correct = (out.tier_logits.argmax(-1) == batch.tier).float()  # (B,), no gradient: a label
    loss = loss + F.binary_cross_entropy_with_logits(out.confidence_logit, correct, reduction="none")
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


@torch.no_grad()
def accuracy(model: FastGRNNRouter, batch: RouterBatch) -> float:
    """Fraction of examples whose argmax tier is the label (no fallback applied)."""
    out = model(batch.x, batch.h0 if batch.h0.shape[1] == model.hidden_dim else None)
    return float((out.tier_logits.argmax(-1) == batch.tier).float().mean())


# ---- hard thresholding ---------------------------------------------------------------------------------
def sparsifiable(model: FastGRNNRouter) -> dict[str, nn.Parameter]:
    """The cell matrices IHT applies to, by state_dict name (biases, ζ, ν and the head stay dense, as in EdgeML)."""
    return {f"cell.{n}": getattr(model.cell, n) for n in model.cell.matrix_names()}


@torch.no_grad()
def hard_threshold_(param: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero all but the round((1 − sparsity)·n) largest-|w| entries in place; return the 0/1 mask.

    Exactly ``round(sparsity · n)`` entries are masked (ties broken by position)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    n = param.numel()
    keep = n - int(round(sparsity * n))
    mask = torch.zeros(n, dtype=param.dtype, device=param.device)
    if keep > 0:
        mask[torch.topk(param.detach().abs().flatten(), keep).indices] = 1.0
    mask = mask.view_as(param)
    param.mul_(mask)
    return mask


@torch.no_grad()
def sparsify_(model: FastGRNNRouter, sparsity: float) -> dict[str, torch.Tensor]:
    """Hard-threshold every cell matrix to `sparsity`; return the masks by parameter name."""
    return {name: hard_threshold_(p, sparsity) for name, p in sparsifiable(model).items()}


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)


# ---- training loops ---------------------------------------------------------------------------------
def train_steps(model: FastGRNNRouter, batches: Iterable[RouterBatch], lr: float | None = None,
                optimizer: torch.optim.Optimizer | None = None, extra_penalty: Penalty | None = None,
                masks: dict[str, torch.Tensor] | None = None, loss_fn: Callable = router_loss,
                after_step: Callable[[FastGRNNRouter], None] | None = None,
                max_grad_norm: float | None = 5.0) -> list[float]:
    """One optimizer step per batch; returns the loss of each step (before the step).

    ``extra_penalty(model) -> scalar`` is added to the loss (EWC's λ/2 Σ F (θ − θ*)² hooks in here).
    ``masks`` (name -> 0/1 tensor) freeze a sparsity support: masked gradients are zeroed and
    masked weights re-zeroed after every step, so the support cannot grow.
    ``after_step(model)`` runs after each step (phase 2 uses it for hard thresholding).
    """
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=model.config.learning_rate if lr is None else lr)
    params = dict(model.named_parameters())
    model.train()
    losses = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        total = loss + extra_penalty(model) if extra_penalty is not None else loss
        total.backward()
        if masks:
            for name, mask in masks.items():
                if params[name].grad is not None:
                    params[name].grad.mul_(mask)
        if max_grad_norm:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if masks:
            apply_masks_(model, masks)
        if after_step is not None:
            after_step(model)
        losses.append(float(total.detach()))
    model.eval()
    return losses


def train_epochs(model: FastGRNNRouter, batch: RouterBatch, epochs: int, config: RouterConfig,
                 masks: dict[str, torch.Tensor] | None = None, seed: int = 0,
                 extra_penalty: Penalty | None = None, after_step: Callable | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """`epochs` shuffled passes of minibatches of `config.batch_size`; returns the mean loss per epoch."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    per_epoch = []
    for _ in range(epochs):
        losses = train_steps(model, batch.minibatches(config.batch_size, gen), optimizer=optimizer,
                             extra_penalty=extra_penalty, masks=masks, after_step=after_step)
        per_epoch.append(sum(losses) / len(losses))
    return per_epoch


def phase_epochs(total: int) -> tuple[int, int, int]:
    """Split `total` epochs into (dense, IHT, frozen-support) thirds, dense getting the remainder."""
    third = total // 3
    return total - 2 * third, third, third


def three_phase_fit(model: FastGRNNRouter, batch: RouterBatch, config: RouterConfig, seed: int = 0,
                    epochs: int | None = None, extra_penalty: Penalty | None = None) -> dict:
    """Dense -> IHT to `config.sparsity` -> retrain on the frozen support.  Returns the report
    (losses per phase, train accuracy, size) with the final masks under ``"masks"``."""
    total = config.epochs if epochs is None else epochs
    dense, iht, frozen = phase_epochs(total)
    sparse = config.sparsity > 0
    if not sparse:
        dense, iht, frozen = total, 0, 0
    report: dict = {"sparsity_target": config.sparsity, "epochs": {"dense": dense, "iht": iht, "frozen": frozen}}
    report["loss_dense"] = train_epochs(model, batch, dense, config, seed=seed, extra_penalty=extra_penalty)[-1]
    masks: dict[str, torch.Tensor] = {}
    if sparse:
        losses = train_epochs(model, batch, max(iht, 1), config, seed=seed + 1, extra_penalty=extra_penalty,
                              after_step=lambda m: sparsify_(m, config.sparsity))
        report["loss_iht"] = losses[-1]
        masks = sparsify_(model, config.sparsity)  # the support phase 3 keeps
        if frozen:
            report["loss_frozen"] = train_epochs(model, batch, frozen, config, masks=masks, seed=seed + 2,
                                                 extra_penalty=extra_penalty)[-1]
    report["train_accuracy"] = accuracy(model, batch)
    report.update(size_report(model))
    report["masks"] = masks
    return report


# ---- size -------------------------------------------------------------------------------------------------
def size_report(model: nn.Module) -> dict:
    """Parameter count, non-zeros and size in KB.

    Convention (EdgeML's ``get_model_size``): a sparse model is charged for its non-zero values
    only; ``size_kb_int8`` adds one float32 scale per tensor (symmetric per-tensor quantisation).
    Index storage for the sparse layout is not counted; ``size_kb_float32_dense`` is the plain size."""
    params = list(model.parameters())
    count = sum(p.numel() for p in params)
    nnz = sum(int((p.detach() != 0).sum()) for p in params)
    cell = getattr(model, "cell", None)
    report = {"param_count": count, "nonzeros": nnz,
              "size_kb_float32": nnz * 4 / 1024, "size_kb_int8": (nnz + 4 * len(params)) / 1024,
              "size_kb_float32_dense": count * 4 / 1024}
    if cell is not None:
        mats = [getattr(cell, n) for n in cell.matrix_names()]
        n_mat = sum(m.numel() for m in mats)
        report["cell_matrix_sparsity"] = 1.0 - sum(int((m.detach() != 0).sum()) for m in mats) / n_mat
    return report


# ---- save / load -------------------------------------------------------------------------------------------
def save_router(model: FastGRNNRouter, path: str | os.PathLike, masks: dict[str, torch.Tensor] | None = None) -> Path:
    """Weights, masks and the construction arguments, loadable with ``torch.load(weights_only=True)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"kind": "fastgrnn_router", "input_dim": model.input_dim, "tiers": model.tiers,
                "config": asdict(model.config), "state_dict": model.state_dict(), "masks": masks or {}}, path)
    return path


def load_router(path: str | os.PathLike) -> tuple[FastGRNNRouter, dict[str, torch.Tensor]]:
    blob = torch.load(Path(path), weights_only=True)
    if blob.get("kind") != "fastgrnn_router":
        raise ConfigError(f"{path}: not a FastGRNN router checkpoint")
    model = FastGRNNRouter(blob["input_dim"], blob["tiers"], RouterConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, dict(blob["masks"])
