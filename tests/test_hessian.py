import pytest
import torch

from prunequant.errors import NumericalError
from prunequant.solvers.hessian import layer_objective, prepare_hessian


def _spd(n, seed=0, tokens=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, tokens or 4 * n, generator=g, dtype=dtype)
    return X @ X.T / X.shape[1]


def test_upper_cholesky_of_damped_inverse():
    H = _spd(10)
    W = torch.randn(3, 10, dtype=torch.float64)
    W2, U, info = prepare_hessian(W, H, damp=0.01)
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(10, dtype=H.dtype)
    assert torch.allclose(U.T @ U, torch.linalg.inv(Hd), atol=1e-10)
    assert torch.equal(U, U.triu())
    # U[i, i]² is the OBS denominator of column i among the remaining columns {i, ...}
    for i in range(10):
        assert U[i, i] ** 2 == pytest.approx(float(torch.linalg.inv(Hd[i:, i:])[0, 0]), rel=1e-10)
    assert info == {"damp": 0.01, "dead": 0, "tries": 1}
    assert torch.equal(W2, W) and W2.data_ptr() != W.data_ptr()


def test_inputs_not_modified_and_dtypes():
    H = _spd(6, dtype=torch.float32)
    H[2, :] = H[:, 2] = 0
    H0 = H.clone()
    W = torch.randn(2, 6)
    W0 = W.clone()
    W2, U, info = prepare_hessian(W, H)
    assert torch.equal(H, H0) and torch.equal(W, W0)
    assert W2.dtype == U.dtype == torch.float32
    W2, U, _ = prepare_hessian(W.double(), H)
    assert U.dtype == torch.float64


def test_dead_columns_zeroed_like_gptq():
    H = _spd(8)
    for j in (1, 5):
        H[j, :] = H[:, j] = 0
    W = torch.randn(4, 8, dtype=torch.float64)
    W2, U, info = prepare_hessian(W, H)
    assert info["dead"] == 2
    assert (W2[:, [1, 5]] == 0).all()
    assert torch.equal(W2[:, [0, 2, 3, 4, 6, 7]], W[:, [0, 2, 3, 4, 6, 7]])
    assert torch.isfinite(U).all()


def test_fallback_raises_damping_on_indefinite_hessian():
    H = torch.diag(torch.tensor([1.0, 1.0, -0.2], dtype=torch.float64))  # mean diagonal 0.6
    _, U, info = prepare_hessian(torch.ones(1, 3, dtype=torch.float64), H, damp=0.01)
    assert info["tries"] == 3 and info["damp"] == pytest.approx(1.0)  # 0.01, 0.1 fail; 1.0 works
    assert torch.isfinite(U).all()


def test_fallback_on_singular_hessian_without_damping():
    H = _spd(12, tokens=4)  # rank 4: singular
    _, U, info = prepare_hessian(torch.ones(1, 12, dtype=torch.float64), H, damp=0.0)
    assert info["damp"] > 0 and info["tries"] >= 2
    assert torch.isfinite(U).all()


def test_unfixable_hessian_raises_actionable_error():
    H = torch.tensor([[1.0, 10.0], [10.0, 1.0]])  # eigenvalue −9: needs damping ≥ 9
    with pytest.raises(NumericalError, match="damp"):
        prepare_hessian(torch.ones(1, 2), H, damp=0.01, max_tries=3)
    _, _, info = prepare_hessian(torch.ones(1, 2), H, damp=0.01, max_tries=6)
    assert info["damp"] == pytest.approx(10.0)


def test_non_finite_hessian_raises():
    H = _spd(4)
    H[0, 1] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        prepare_hessian(torch.ones(1, 4, dtype=torch.float64), H)


def test_permutation_matches_permuted_inputs():
    H = _spd(7)
    W = torch.randn(3, 7, dtype=torch.float64)
    perm = torch.randperm(7)
    Wp, Up, _ = prepare_hessian(W, H, perm=perm)
    Wq, Uq, _ = prepare_hessian(W[:, perm], H[perm][:, perm])
    assert torch.allclose(Wp, Wq) and torch.allclose(Up, Uq)
    assert torch.equal(Wp[:, torch.argsort(perm)], W)


def test_layer_objective_is_output_error_per_token():
    X = torch.randn(5, 40, dtype=torch.float64)
    W, V = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    expected = float(((W @ X - V @ X) ** 2).sum()) / 40
    assert layer_objective(W, V, X @ X.T / 40) == pytest.approx(expected, rel=1e-10)
