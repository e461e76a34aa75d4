"""Plain-numpy inference for a trained FastGRNNRouter (batch 1, no torch dispatch overhead).

Same equations as ``FastGRNNCell.forward`` and ``FastGRNNRouter.forward``; the weights are a
float32 snapshot taken by ``from_model``.  Matrices are stored pre-transposed so each
product is a single row-vector × matrix call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .model import TEMPERATURE_MAX, FastGRNNRouter


@dataclass
class NumpyStep:
    h: np.ndarray  # (H,) new hidden state
    cum_probs: np.ndarray  # (T,) C_i = P(cheapest adequate tier <= i)
    tier_probs: np.ndarray  # (T,) C_i - C_{i-1}, the largest tier 1 - C_{T-2} (model.tier_probs_from_cumulative)
    context_index: int
    temperature: float
    top_p: float


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _sigmoid_scalar(a: float) -> float:
    if a >= 0:
        return 1.0 / (1.0 + math.exp(-a))
    e = math.exp(a)
    return e / (1.0 + e)


def _softplus(a: float) -> float:
    return max(a, 0.0) + math.log1p(math.exp(-abs(a)))  # stable log(1 + e^a), as torch's softplus


class NumpyFastGRNN:
    def __init__(self, arrays: dict[str, np.ndarray], n_tiers: int, n_buckets: int, independent: bool = False) -> None:
        a = arrays
        self.w_factors = [a["cell.W"].T.copy()] if "cell.W" in a else [a["cell.W1"].T.copy(), a["cell.W2"].T.copy()]
        self.u_factors = [a["cell.U"].T.copy()] if "cell.U" in a else [a["cell.U1"].T.copy(), a["cell.U2"].T.copy()]
        self.bias_gate = a["cell.bias_gate"].reshape(-1)
        self.bias_update = a["cell.bias_update"].reshape(-1)
        self.sig_zeta = float(_sigmoid(a["cell.zeta"].reshape(())))
        self.sig_nu = float(_sigmoid(a["cell.nu"].reshape(())))
        self.head_w = a["head.weight"].T.copy()  # (H, T + C + 2)
        self.head_b = a["head.bias"]
        self.n_tiers, self.n_buckets = n_tiers, n_buckets
        self.independent = independent

    @classmethod
    def from_model(cls, model: FastGRNNRouter) -> "NumpyFastGRNN":
        arrays = {k: v.detach().cpu().to(torch.float32).numpy().copy() for k, v in model.state_dict().items()}
        return cls(arrays, len(model.tiers), len(model.context_buckets), bool(getattr(model, "independent", False)))

    def cell(self, x: np.ndarray, h: np.ndarray) -> np.ndarray:
        """x (F,) or (B, F), h (H,) or (B, H) -> h'."""
        wx = x
        for m in self.w_factors:
            wx = wx @ m
        uh = h
        for m in self.u_factors:
            uh = uh @ m
        pre = wx + uh
        z = _sigmoid(pre + self.bias_gate)
        h_tilde = np.tanh(pre + self.bias_update)
        return z * h + (self.sig_zeta * (1.0 - z) + self.sig_nu) * h_tilde

    def step(self, x: np.ndarray, h: np.ndarray) -> NumpyStep:
        """One routing decision: x (F,), h (H,)."""
        h_new = self.cell(x, h).astype(np.float32)
        out = (h_new @ self.head_w + self.head_b).tolist()  # T + C + 2 floats: plain math beats tiny ufuncs
        k, c = self.n_tiers, self.n_buckets
        cum, z = [], 0.0
        for i, a in enumerate(out[:k]):  # z_0 = a_0, z_i = z_{i-1} + softplus(a_i): monotone
            z = a if (i == 0 or self.independent) else z + _softplus(a)  # independent heads: z_i = a_i
            cum.append(_sigmoid_scalar(z))
        full = [0.0, *np.maximum.accumulate(cum[:-1]).tolist(), 1.0] if k > 1 else [0.0, 1.0]
        ctx = out[k:k + c]
        return NumpyStep(h=h_new, cum_probs=np.array(cum), tier_probs=np.array([max(full[i + 1] - full[i], 0.0)
                                                                               for i in range(k)]),
                         context_index=ctx.index(max(ctx)),
                         temperature=TEMPERATURE_MAX * _sigmoid_scalar(out[k + c]),
                         top_p=_sigmoid_scalar(out[k + c + 1]))
