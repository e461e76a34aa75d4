"""Continual-learning metrics over an accuracy matrix.

``A[i, j]`` = accuracy on phase j's test set measured right after training on phase i
(rows: training progress, columns: evaluation phase; ``nan`` where not measured).  With T
phases trained so far (rows 0..T-1) and "now" = row T-1:

* **Forgetting** (Avalanche ``ExperienceForgetting`` / Chaudhry et al. 2018 with the
  ``"after"`` reference)::

      F_j = A[j, j] - A[T-1, j]                  (accuracy right after learning j, minus now)
      F   = 1/(T-1) * sum_{j < T-1} F_j           (the current phase is excluded)

  ``reference="max"`` uses max_{l < T-1} A[l, j] instead of A[j, j] (GEM's definition).
* **Backward transfer** BWT = -F (with the "after" reference): positive when later training
  helped earlier phases.
* **Average accuracy** ACC = mean_j A[T-1, j] over the phases seen so far.
* **Forgetting per 10K updates** (the seed's "Forgetting Rate < 5%/10K"): the accuracy lost
  on each past phase, divided by the number of router *updates* (optimiser steps on the
  router's weights, not examples) made since that phase was learned, scaled to 10,000::

      R_j = (A[j, j] - A[T-1, j]) / (U_{T-1} - U_j) * 10_000
      R   = mean over past phases j with U_{T-1} > U_j

  where ``U_i`` is the cumulative update count when phase i's training ended.  It is a
  fraction (0.05 = 5 accuracy points per 10K updates); negative means accuracy went up.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class AccuracyMatrix:
    """Grows as phases are trained and evaluated: ``record(trained, evaluated, acc)``."""

    def __init__(self, n_phases: int | None = None):
        self._cells: dict[tuple[int, int], float] = {}
        self._n = n_phases

    def record(self, trained_phase: int, eval_phase: int, accuracy: float) -> None:
        if trained_phase < 0 or eval_phase < 0:
            raise ValueError("phase indices must be >= 0")
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy must be in [0, 1], got {accuracy!r}")
        self._cells[(trained_phase, eval_phase)] = float(accuracy)

    def as_array(self) -> np.ndarray:
        """(T, P) with nan where not measured; T = phases trained, P = phases evaluated."""
        if not self._cells:
            n = self._n or 0
            return np.full((n, n), np.nan)
        t = max(i for i, _ in self._cells) + 1
        p = max(max(j for _, j in self._cells) + 1, self._n or 0)
        a = np.full((t, p), np.nan)
        for (i, j), v in self._cells.items():
            a[i, j] = v
        return a

    def to_markdown(self) -> str:
        a = self.as_array()
        head = "| trained \\ eval | " + " | ".join(f"phase {j}" for j in range(a.shape[1])) + " |"
        lines = [head, "|---|" + "---|" * a.shape[1]]
        for i in range(a.shape[0]):
            cells = ["" if np.isnan(v) else f"{v:.3f}" for v in a[i]]
            lines.append(f"| phase {i} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _as_matrix(acc: np.ndarray | Sequence[Sequence[float]] | AccuracyMatrix) -> np.ndarray:
    a = acc.as_array() if isinstance(acc, AccuracyMatrix) else np.asarray(acc, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"accuracy matrix must be 2-D, got shape {a.shape}")
    if a.shape[1] < a.shape[0]:
        raise ValueError(f"accuracy matrix {a.shape}: needs a column for every trained phase")
    return a


def forgetting_per_phase(acc, reference: str = "after") -> np.ndarray:
    """F_j for every past phase j < T-1 (length T-1)."""
    a = _as_matrix(acc)
    t = a.shape[0]
    if reference not in ("after", "max"):
        raise ValueError(f"reference must be 'after' or 'max', got {reference!r}")
    out = np.empty(max(t - 1, 0))
    for j in range(t - 1):
        ref = a[j, j] if reference == "after" else np.nanmax(a[j:t - 1, j])
        out[j] = ref - a[t - 1, j]
    return out


def average_forgetting(acc, reference: str = "after") -> float:
    """F = mean_j F_j over past phases; nan when fewer than two phases were trained."""
    f = forgetting_per_phase(acc, reference)
    return float(np.nanmean(f)) if f.size and not np.all(np.isnan(f)) else float("nan")


def backward_transfer(acc) -> float:
    return -average_forgetting(acc, "after")


def average_accuracy(acc) -> float:
    """mean_j A[T-1, j] over the phases trained so far (j <= T-1)."""
    a = _as_matrix(acc)
    t = a.shape[0]
    return float(np.nanmean(a[t - 1, :t])) if t else float("nan")


def forgetting_per_10k_updates(acc, updates_at_phase_end: Sequence[int]) -> float:
    """R = mean_j (A[j, j] - A[T-1, j]) / (U_{T-1} - U_j) * 10_000 (see module docstring).

    ``updates_at_phase_end[i]``: cumulative router updates when training on phase i ended.
    Past phases with no update since are skipped (nothing could have been forgotten);
    nan when no phase qualifies.
    """
    a = _as_matrix(acc)
    t = a.shape[0]
    u = np.asarray(updates_at_phase_end, dtype=np.float64)
    if u.shape[0] < t:
        raise ValueError(f"need an update count for each of the {t} trained phases, got {u.shape[0]}")
    if np.any(np.diff(u[:t]) < 0):
        raise ValueError("updates_at_phase_end must be non-decreasing (cumulative counts)")
    rates = []
    for j in range(t - 1):
        gap = u[t - 1] - u[j]
        if gap > 0 and not np.isnan(a[j, j]) and not np.isnan(a[t - 1, j]):
            rates.append((a[j, j] - a[t - 1, j]) / gap * 10_000.0)
    return float(np.mean(rates)) if rates else float("nan")


def continual_report(acc, updates_at_phase_end: Sequence[int] | None = None) -> dict[str, float]:
    """All of the above in one dict (what experiments log)."""
    rep = {"average_accuracy": average_accuracy(acc), "forgetting": average_forgetting(acc),
           "forgetting_max": average_forgetting(acc, "max"), "backward_transfer": backward_transfer(acc)}
    if updates_at_phase_end is not None:
        rep["forgetting_per_10k_updates"] = forgetting_per_10k_updates(acc, updates_at_phase_end)
    return rep
