"""FastGRNN cell (Kusupati et al., NeurIPS 2018), parameterised as Microsoft EdgeML's PyTorch cell.

One gate, one candidate, and a *single* pair of matrices (W, U) shared by both::

    pre = W x + U h                          # (B, H)
    z   = sigmoid(pre + bias_gate)           # gate
    h~  = tanh(pre + bias_update)            # candidate
    h'  = z * h + (sigmoid(zeta) * (1 - z) + sigmoid(nu)) * h~

Sharing W and U is what makes the cell ~3x smaller than a GRU; the two trainable scalars
zeta (init 1.0) and nu (init -4.0) rescale the residual update so the cell stays well
conditioned without the GRU's extra matrices.
"""
from __future__ import annotations

import torch
from torch import nn


class FastGRNNCell(nn.Module):
    """h' = z ⊙ h + (σ(ζ)(1 − z) + σ(ν)) ⊙ h̃ with z = σ(Wx + Uh + b_g), h̃ = tanh(Wx + Uh + b_u).

    Shapes (EdgeML's PyTorch storage, rows = output units):

    - full rank:  ``W`` (hidden_dim, input_dim), ``U`` (hidden_dim, hidden_dim)
    - low rank:   ``W1`` (w_rank, input_dim), ``W2`` (hidden_dim, w_rank), i.e. W = W2 @ W1;
                  ``U1`` (u_rank, hidden_dim), ``U2`` (hidden_dim, u_rank), i.e. U = U2 @ U1
    - ``bias_gate``, ``bias_update``: (1, hidden_dim); ``zeta``, ``nu``: (1, 1)

    Multiplication order (row-vector batches, as EdgeML): ``Wx = (x @ W1ᵀ) @ W2ᵀ`` — x is
    first projected to rank w_rank by W1, then lifted to hidden_dim by W2 (the paper's
    "W = W1 W2" in its row-vector convention).  The low-rank product is never materialised.

    ``w_rank`` / ``u_rank`` of None or 0 mean full rank.
    """

    def __init__(self, input_dim: int, hidden_dim: int, w_rank: int | None = None, u_rank: int | None = None,
                 zeta_init: float = 1.0, nu_init: float = -4.0) -> None:
        super().__init__()
        if input_dim < 1 or hidden_dim < 1:
            raise ValueError(f"FastGRNNCell needs input_dim >= 1 and hidden_dim >= 1, got {input_dim}, {hidden_dim}")
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.w_rank = w_rank or None
        self.u_rank = u_rank or None
        # EdgeML's initialisation: small Gaussian weights, biases at one.
        if self.w_rank is None:
            self.W = nn.Parameter(0.1 * torch.randn(hidden_dim, input_dim))
        else:
            self.W1 = nn.Parameter(0.1 * torch.randn(self.w_rank, input_dim))
            self.W2 = nn.Parameter(0.1 * torch.randn(hidden_dim, self.w_rank))
        if self.u_rank is None:
            self.U = nn.Parameter(0.1 * torch.randn(hidden_dim, hidden_dim))
        else:
            self.U1 = nn.Parameter(0.1 * torch.randn(self.u_rank, hidden_dim))
            self.U2 = nn.Parameter(0.1 * torch.randn(hidden_dim, self.u_rank))
        self.bias_gate = nn.Parameter(torch.ones(1, hidden_dim))
        self.bias_update = nn.Parameter(torch.ones(1, hidden_dim))
        self.zeta = nn.Parameter(torch.full((1, 1), float(zeta_init)))
        self.nu = nn.Parameter(torch.full((1, 1), float(nu_init)))

    def matrix_names(self) -> list[str]:
        """Names of the weight matrices hard thresholding applies to (W/U or their factors)."""
        w = ["W"] if self.w_rank is None else ["W1", "W2"]
        u = ["U"] if self.u_rank is None else ["U1", "U2"]
        return w + u

    def w_times(self, x: torch.Tensor) -> torch.Tensor:
        """(B, input_dim) -> (B, hidden_dim): W x."""
        if self.w_rank is None:
            return x @ self.W.t()
        return (x @ self.W1.t()) @ self.W2.t()

    def u_times(self, h: torch.Tensor) -> torch.Tensor:
        """(B, hidden_dim) -> (B, hidden_dim): U h."""
        if self.u_rank is None:
            return h @ self.U.t()
        return (h @ self.U1.t()) @ self.U2.t()

    def initial_state(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, self.hidden_dim, dtype=self.bias_gate.dtype, device=self.bias_gate.device)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, input_dim), h (B, hidden_dim) or None (zeros) -> h' (B, hidden_dim)."""
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"FastGRNNCell expects x of shape (batch, {self.input_dim}), got {tuple(x.shape)}")
        if h is None:
            h = self.initial_state(x.shape[0])
        pre = self.w_times(x) + self.u_times(h)  # (B, H), shared by gate and candidate
        z = torch.sigmoid(pre + self.bias_gate)  # (B, H)
        h_tilde = torch.tanh(pre + self.bias_update)  # (B, H)
        return z * h + (torch.sigmoid(self.zeta) * (1.0 - z) + torch.sigmoid(self.nu)) * h_tilde

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, hidden_dim={self.hidden_dim}, w_rank={self.w_rank}, u_rank={self.u_rank}"
