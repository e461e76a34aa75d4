"""Training the FastGRNN router: censored ordinal loss, EdgeML's three-phase schedule, size report.

Loss per example b (``router_loss``; ``reduction="mean"`` averages the first term over the rows
with at least one observed head event -- at least 1 -- and the rest over all rows)::

    L_b = sum_i w_bi · BCE(z_bi, y_bi)                         # ordinal label loss (``ordinal_loss``)
        + cost_weight · sum_t p_b(t) · cost(t)                 # expected relative cost (0 by default)
        + CE(context_logits_b, bucket_b)         if logged     # context-size class
        + (temperature_b − target)²              if logged
        + (top_p_b − target)²                    if logged

z_bi = logit P(Y <= i) are the cumulative tier heads (``model``); y_bi / w_bi come from what
was observed (``features.ordinal_targets``): success at tier t is a 1 for heads i >= t,
failure a 0 for heads i <= t, nothing else.  The first term is the negative log-likelihood
of the observed label events; it alone is what EWC's Fisher is taken of (``label_loss``).
The context and sampling heads only have targets on well-judged answers (the learning
service leaves them unlogged otherwise).

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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import RouterConfig
from ..errors import ConfigError
from .features import RouterBatch
from .model import FastGRNNRouter

Penalty = Callable[[nn.Module], torch.Tensor]


# ---- loss ---------------------------------------------------------------------------------------
def ordinal_loss(cum_logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, T) logits, targets (NaN where unobserved), weights (0 where unobserved) -> (B,)
    sum_i w_i · BCE(z_i, y_i): the censored ordinal negative log-likelihood of each row."""
    y = torch.nan_to_num(target, nan=0.0)
    bce = F.binary_cross_entropy_with_logits(cum_logits, y, reduction="none")
    return (weight * bce).sum(-1)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


def _h0(model: FastGRNNRouter, batch: RouterBatch) -> torch.Tensor | None:
    return batch.h0 if batch.h0.shape[1] == model.hidden_dim else None


def label_loss(model: FastGRNNRouter, batch: RouterBatch, reduction: str = "mean") -> torch.Tensor:
    """Negative log-likelihood of the observed tier labels only (no cost, no context/sampling
    heads): the objective whose per-sample gradients give EWC's Fisher (Kirkpatrick et al. 2017)."""
    out = model(batch.x, _h0(model, batch))
    return _reduce(ordinal_loss(out.cum_logits, batch.cum_target, batch.cum_weight), reduction)


def router_loss(model: FastGRNNRouter, batch: RouterBatch, reduction: str = "mean",
                cost_weight: float | None = None) -> torch.Tensor:
    """The training objective (module docstring).  ``reduction="none"`` gives (B,) per-example losses."""
    out = model(batch.x, _h0(model, batch))
    cw = model.config.cost_weight if cost_weight is None else cost_weight
    label = ordinal_loss(out.cum_logits, batch.cum_target, batch.cum_weight)  # (B,)
    other = torch.zeros_like(label)
    if cw:
        other = other + cw * (out.tier_probs * model.tier_costs).sum(-1)
    known_ctx = batch.context_bucket >= 0
    if known_ctx.any():
        ctx = F.cross_entropy(out.context_logits, batch.context_bucket.clamp(min=0), reduction="none")
        other = other + torch.where(known_ctx, ctx, torch.zeros_like(ctx))
    for pred, target in ((out.temperature, batch.temperature), (out.top_p, batch.top_p)):
        known = ~torch.isnan(target)
        if known.any():
            other = other + torch.where(known, (pred - torch.nan_to_num(target)) ** 2, torch.zeros_like(pred))
    if reduction == "mean":
        # The label term is averaged over the rows that observed anything (each row's NLL summed over
        # its observed heads), not over all rows: in bandit batches replayed rows may carry no tier
        # outcome, and counting them would shrink the label signal against the EWC penalty.  (Averaging
        # per head event instead made the balance depend on how many heads a row happens to observe:
        # with the largest tier's head learned too, a two-tier full-information row observes two.)
        labelled = (batch.cum_weight.sum(-1) > 0).sum().clamp(min=1)
        return label.sum() / labelled + other.mean()
    return _reduce(label + other, reduction)


@torch.no_grad()
def predicted_tiers(model: FastGRNNRouter, batch: RouterBatch, threshold: float | None = None) -> torch.Tensor:
    """(B,) the serving rule's tier index (``router.base.ordinal_choice`` under ``router.decision_rule``;
    the threshold rule falls back to the largest tier).  ``threshold`` overrides
    ``router.confidence_threshold`` and selects the threshold rule."""
    from dataclasses import replace

    from .base import ordinal_choice
    out = model(batch.x, _h0(model, batch))
    config = model.config
    if threshold is not None:
        config = replace(config, decision_rule="threshold", confidence_threshold=float(threshold))
    tiers, _ = ordinal_choice(out.cum_probs.double().numpy(), model.tier_costs.double().numpy(), config)
    return torch.from_numpy(np.asarray(tiers, np.int64))


@torch.no_grad()
def accuracy(model: FastGRNNRouter, batch: RouterBatch, threshold: float | None = None) -> float:
    """Share of rows with an exact label (``batch.tier >= 0``) where the serving rule picks that tier;
    nan when no row has one (purely censored batches)."""
    known = batch.tier >= 0
    if not known.any():
        return float("nan")
    pred = predicted_tiers(model, batch, threshold)
    return float((pred[known] == batch.tier[known]).float().mean())


@torch.no_grad()
def ordinal_accuracy(model: FastGRNNRouter, batch: RouterBatch, threshold: float = 0.5) -> float:
    """Weighted share of observed head events the model gets on the right side of `threshold`
    (works on censored rows, where ``accuracy`` has no exact label)."""
    out = model(batch.x, _h0(model, batch))
    w = batch.cum_weight
    if float(w.sum()) == 0:
        return float("nan")
    right = ((out.cum_probs >= threshold).float() == (torch.nan_to_num(batch.cum_target) >= 0.5).float()).float()
    return float((w * right).sum() / w.sum())


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
EDGEML_SPARSE_BELOW = 0.5  # EdgeML's estimateNNZ stores a matrix sparse only below this density
INT8_INDEX_BYTES = 2  # a 1-byte index cannot address a matrix of more than 256 entries


def edgeml_size_bytes(numel: int, nonzeros: int, sparsifiable: bool, value_bytes: int = 4,
                      index_bytes: int | None = None) -> int:
    """Bytes of one tensor under EdgeML's convention (``utils.estimateNNZ`` / ``getModelSize``).

    A matrix that hard thresholding sparsifies and whose density ``nonzeros / numel`` is below
    0.5 is stored sparse: every non-zero costs its value plus its index (``index_bytes``,
    default = ``value_bytes``, as EdgeML's ``2 * bytesPerVar``).  Everything else (denser
    matrices, biases, ζ, ν, heads) is stored dense: ``numel * value_bytes``.  EdgeML takes the
    density from the sparsity *target*; here it is counted, which is the same after IHT.
    """
    index_bytes = value_bytes if index_bytes is None else index_bytes
    if sparsifiable and numel and nonzeros / numel < EDGEML_SPARSE_BELOW:
        return nonzeros * (value_bytes + index_bytes)
    return numel * value_bytes


def size_report(model: nn.Module) -> dict:
    """Parameter count, non-zeros and size in KB (1 KB = 1024 bytes).

    ``size_kb_float32`` follows EdgeML (``edgeml_size_bytes``: a sparse cell matrix is charged
    4 bytes of value + 4 bytes of index per non-zero, every other tensor dense).
    ``size_kb_int8``: the same layout with 1-byte values and a 2-byte index (EdgeML's
    ``bytesPerVar = 1`` would give a 1-byte index, which cannot address these matrices), plus
    one float32 scale per tensor (symmetric per-tensor quantisation).  ``size_kb_float32_dense``
    is the plain size."""
    params = dict(model.named_parameters())
    cell = getattr(model, "cell", None)
    sparse_names = {f"cell.{n}" for n in cell.matrix_names()} if cell is not None else set()
    count = sum(p.numel() for p in params.values())
    nnz_of = {n: int((p.detach() != 0).sum()) for n, p in params.items()}
    f32 = sum(edgeml_size_bytes(p.numel(), nnz_of[n], n in sparse_names) for n, p in params.items())
    i8 = sum(edgeml_size_bytes(p.numel(), nnz_of[n], n in sparse_names, 1, INT8_INDEX_BYTES) + 4
             for n, p in params.items())
    report = {"param_count": count, "nonzeros": sum(nnz_of.values()),
              "size_kb_float32": f32 / 1024, "size_kb_int8": i8 / 1024,
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
