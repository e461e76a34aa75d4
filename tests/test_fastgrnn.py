"""FastGRNNCell against the paper's equations written out in numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ruvllm_lab.router import FastGRNNCell


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def numpy_fastgrnn(x, h, W, U, b_g, b_u, zeta, nu):
    """z = σ(Wx + Uh + b_g); h~ = tanh(Wx + Uh + b_u); h' = z h + (σ(ζ)(1 − z) + σ(ν)) h~ (column vectors)."""
    out = []
    for xi, hi in zip(x, h):
        pre = W @ xi + U @ hi
        z = _sigmoid(pre + b_g)
        h_tilde = np.tanh(pre + b_u)
        out.append(z * hi + (_sigmoid(zeta) * (1.0 - z) + _sigmoid(nu)) * h_tilde)
    return np.stack(out)


def _randomise(cell: FastGRNNCell, seed: int) -> None:
    """Random values everywhere, including biases, ζ and ν (not just the initialisation)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cell.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_cell_matches_numpy_equations(seed):
    cell = FastGRNNCell(7, 5).double()
    _randomise(cell, seed)
    rng = np.random.default_rng(seed)
    x, h = rng.normal(size=(4, 7)), rng.normal(size=(4, 5))
    got = cell(torch.from_numpy(x), torch.from_numpy(h)).detach().numpy()
    want = numpy_fastgrnn(x, h, _np(cell.W), _np(cell.U), _np(cell.bias_gate)[0], _np(cell.bias_update)[0],
                          _np(cell.zeta).item(), _np(cell.nu).item())
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("w_rank,u_rank", [(3, 2), (3, None), (None, 2)])
def test_low_rank_cell_matches_numpy_equations(w_rank, u_rank):
    cell = FastGRNNCell(9, 6, w_rank=w_rank, u_rank=u_rank).double()
    _randomise(cell, 7)
    W = _np(cell.W2) @ _np(cell.W1) if w_rank else _np(cell.W)  # W x = W2 (W1 x)
    U = _np(cell.U2) @ _np(cell.U1) if u_rank else _np(cell.U)
    assert W.shape == (6, 9) and U.shape == (6, 6)
    rng = np.random.default_rng(3)
    x, h = rng.normal(size=(5, 9)), rng.normal(size=(5, 6))
    got = cell(torch.from_numpy(x), torch.from_numpy(h)).detach().numpy()
    want = numpy_fastgrnn(x, h, W, U, _np(cell.bias_gate)[0], _np(cell.bias_update)[0],
                          _np(cell.zeta).item(), _np(cell.nu).item())
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_dense_parameter_names_and_shapes():
    cell = FastGRNNCell(10, 4)
    shapes = {n: tuple(p.shape) for n, p in cell.named_parameters()}
    assert shapes == {"W": (4, 10), "U": (4, 4), "bias_gate": (1, 4), "bias_update": (1, 4),
                      "zeta": (1, 1), "nu": (1, 1)}


def test_low_rank_parameter_names_and_shapes():
    cell = FastGRNNCell(10, 4, w_rank=3, u_rank=2)
    shapes = {n: tuple(p.shape) for n, p in cell.named_parameters()}
    assert shapes == {"W1": (3, 10), "W2": (4, 3), "U1": (2, 4), "U2": (4, 2), "bias_gate": (1, 4),
                      "bias_update": (1, 4), "zeta": (1, 1), "nu": (1, 1)}
    assert cell.matrix_names() == ["W1", "W2", "U1", "U2"]


def test_rank_zero_means_full_rank():
    cell = FastGRNNCell(10, 4, w_rank=0, u_rank=0)
    assert hasattr(cell, "W") and hasattr(cell, "U") and not hasattr(cell, "W1")


def test_low_rank_has_fewer_parameters():
    full = sum(p.numel() for p in FastGRNNCell(100, 32).parameters())
    low = sum(p.numel() for p in FastGRNNCell(100, 32, w_rank=4, u_rank=4).parameters())
    assert low < full / 4


def test_zeta_and_nu_initialised_as_in_the_paper():
    cell = FastGRNNCell(3, 2)
    assert cell.zeta.item() == pytest.approx(1.0)
    assert cell.nu.item() == pytest.approx(-4.0)


def test_gradients_reach_zeta_and_nu():
    torch.manual_seed(0)
    cell = FastGRNNCell(6, 4, w_rank=2)
    x, h = torch.randn(3, 6), torch.randn(3, 4)
    cell(x, h).pow(2).sum().backward()
    for name in ("zeta", "nu", "W1", "W2", "U", "bias_gate", "bias_update"):
        grad = getattr(cell, name).grad
        assert grad is not None and torch.all(torch.isfinite(grad)) and grad.abs().sum() > 0, name


def test_missing_state_means_zeros():
    torch.manual_seed(0)
    cell = FastGRNNCell(6, 4)
    x = torch.randn(2, 6)
    assert torch.equal(cell(x), cell(x, torch.zeros(2, 4)))


def test_state_changes_the_output():
    torch.manual_seed(0)
    cell = FastGRNNCell(6, 4)
    x = torch.randn(1, 6)
    h1 = cell(x)
    assert not torch.allclose(cell(x, h1), h1)


def test_wrong_input_shape_is_a_clear_error():
    cell = FastGRNNCell(6, 4)
    with pytest.raises(ValueError, match=r"\(batch, 6\)"):
        cell(torch.randn(2, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        cell(torch.randn(6), None)


def test_invalid_dimensions_rejected():
    with pytest.raises(ValueError):
        FastGRNNCell(0, 4)
