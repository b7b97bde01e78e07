"""Shared OBS numerics: dead columns, relative damping, the upper Cholesky factor of H⁻¹ (docs/methods.md)."""
from __future__ import annotations

import torch

from ..errors import NumericalError


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (never less, whatever the weights are in)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def prepare_hessian(
    W: torch.Tensor,
    H: torch.Tensor,
    damp: float = 0.01,
    max_tries: int = 6,
    perm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Copy W and H, fix dead columns, damp H and return (W, U, info) with U = chol(H⁻¹, upper)."""
    if W.ndim != 2 or H.ndim != 2 or H.shape[0] != H.shape[1] or H.shape[0] != W.shape[1]:
        raise ValueError(f"need W (out, in) and H (in, in); got W {tuple(W.shape)} and H {tuple(H.shape)}")
    dtype = compute_dtype(W, H)
    W = W.detach().to(dtype=dtype, copy=True)
    H = H.detach().to(device=W.device, dtype=dtype, copy=True)
    if not torch.isfinite(H).all():
        raise NumericalError(
            "the Hessian (input statistics) contains NaN or Inf: calibration activations overflowed; "
            "collect statistics in float32 or check the model/calibration data for non-finite values")

    diag = torch.diagonal(H)
    dead = diag == 0
    n_dead = int(dead.sum())
    if n_dead:
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
    if perm is not None:
        perm = perm.to(W.device)
        W = W[:, perm]
        H = H[perm][:, perm]

    scale = float(torch.diagonal(H).mean())
    if not scale > 0:
        raise NumericalError(
            f"the Hessian has a non-positive mean diagonal ({scale:g}): the input statistics are corrupt; "
            "recollect them (they must be a mean of x xᵀ)")
    idx = torch.arange(H.shape[0], device=H.device)
    base = damp if damp > 0 else 1e-4  # retries from an undamped start still need something to grow
    tried = []
    for attempt in range(max_tries):
        d = damp if attempt == 0 else base * 10.0 ** attempt
        tried.append(d)
        Hd = H.clone()
        Hd[idx, idx] += d * scale
        L, err = torch.linalg.cholesky_ex(Hd)
        if int(err) != 0:
            continue
        Hinv = torch.cholesky_inverse(L)
        U, err = torch.linalg.cholesky_ex(Hinv, upper=True)
        if int(err) != 0 or not torch.isfinite(U).all():
            continue
        return W, U, {"damp": d, "dead": n_dead, "tries": attempt + 1}
    raise NumericalError(
        f"Cholesky of the damped Hessian failed {max_tries} times (relative damping tried: "
        f"{', '.join(f'{d:g}' for d in tried)}); the Hessian is not positive semidefinite. "
        "Use more calibration tokens, float32 statistics, a larger damp (e.g. damp=0.1), "
        "or a method that needs no Hessian (wanda/magnitude, rtn) for this layer")


def check_tokens(stats, method: str, fallback: str) -> None:
    if stats.n_tokens <= 0:
        raise NumericalError(f"{method} needs calibration inputs but this layer saw none (e.g. an MoE expert no token "
                             f"was routed to): use more calibration data, or {fallback} for this layer")


def checked_hessian(stats, W: torch.Tensor, method: str, fallback: str) -> torch.Tensor:
    """The layer's Hessian on W's device, or the error that says why there is none to use."""
    if stats is None or stats.hessian is None:
        raise ValueError(f"{method} needs stats.hessian (collect the Hessian for this layer)")
    check_tokens(stats, method, fallback)
    if stats.hessian.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"Hessian shape {tuple(stats.hessian.shape)} does not match weight {tuple(W.shape)}")
    return stats.hessian.detach().to(W.device)


def layer_objective(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ): with H the mean of x xᵀ this is ‖WX − ŴX‖²_F / n_tokens."""
    dtype = compute_dtype(W, W_hat, H)
    D = W.to(dtype) - W_hat.to(device=W.device, dtype=dtype)
    return float(((D @ H.to(device=W.device, dtype=dtype)) * D).sum())
