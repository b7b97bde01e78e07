"""Pruning solvers: magnitude, Wanda and SparseGPT, unstructured or N:M.

Masks are True where a weight is kept. N:M means n of every m consecutive input weights are
pruned (recipe.py). Counts are exact: ``round(sparsity · size)`` weights are pruned per scope
(per row for Wanda and SparseGPT, per layer for magnitude by default), ties broken arbitrarily.
"""
from __future__ import annotations

import torch

from ..errors import NumericalError, RecipeError
from ..recipe import PruneSpec
from .base import LayerResult, LayerStats
from .hessian import compute_dtype, layer_objective, prepare_hessian


# ---- masks ------------------------------------------------------------------------------------

def _n_pruned(sparsity: float, size: int) -> int:
    return int(sparsity * size + 0.5)


def _prune_lowest(score: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
    """Mask with the k lowest scores pruned (per row, or over the whole tensor)."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if k <= 0:
        return keep
    if per_row:
        idx = torch.argsort(score, dim=1)[:, :k]
        keep.scatter_(1, idx, False)
    else:
        idx = torch.argsort(score.reshape(-1))[:k]
        keep.view(-1)[idx] = False
    return keep


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Prune the ``round(sparsity · n)`` lowest scores of each row (per_row) or of the whole matrix."""
    if not 0.0 <= sparsity < 1.0:
        raise RecipeError(f"sparsity {sparsity} is outside [0, 1); e.g. use 0.5 for 50% of weights pruned")
    size = score.shape[1] if per_row else score.numel()
    return _prune_lowest(score, _n_pruned(sparsity, size), per_row)


def _check_nm(in_features: int, n: int, m: int) -> None:
    if not (1 <= n < m):
        raise RecipeError(f"N:M pattern {n}:{m} is invalid: need integers 1 <= N < M")
    if in_features % m:
        raise RecipeError(f"N:M pattern {n}:{m} needs the input size to be a multiple of {m}, "
                          f"but this layer has {in_features} inputs; use unstructured sparsity "
                          f"or an override that leaves this layer dense")


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of m consecutive input columns of each row, prune the n lowest scores."""
    rows, cols = score.shape
    _check_nm(cols, n, m)
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, idx, False)
    return keep.reshape(rows, cols)


def _spec_mask(score: torch.Tensor, spec: PruneSpec, per_row: bool) -> torch.Tensor:
    if spec.structured:
        return nm_mask(score, spec.n, spec.m)
    return unstructured_mask(score, spec.sparsity, per_row)


def _check_weight(W: torch.Tensor) -> None:
    if W.ndim != 2:
        raise ValueError(f"weights must be (out_features, in_features); got shape {tuple(W.shape)}")
    if W.shape[1] == 0 or W.shape[0] == 0:
        raise ValueError(f"empty weight of shape {tuple(W.shape)}")


def _result(W_hat: torch.Tensor, mask: torch.Tensor, error, **info) -> LayerResult:
    W_hat = W_hat.to(torch.float32)
    W_hat[~mask] = 0.0  # exact zeros, whatever rounding the updates left
    return LayerResult(weight=W_hat, mask=mask, info={"error": error, **info})


# ---- magnitude and Wanda ------------------------------------------------------------------------

def magnitude_prune(W: torch.Tensor, spec: PruneSpec, per_row: bool = False) -> LayerResult:
    """Prune the smallest |W|. Unstructured: over the whole layer by default (as in the literature
    baselines), or per output row with ``per_row=True``. N:M is always per group."""
    _check_weight(W)
    W = W.detach()
    mask = _spec_mask(W.abs(), spec, per_row)
    return _result(W.clone(), mask, None)


def _wanda_score(W: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    norm = stats.col_norm.to(device=W.device, dtype=compute_dtype(W))
    if norm.shape != (W.shape[1],):
        raise ValueError(f"input statistics have {norm.shape[0]} columns but the weight has {W.shape[1]}")
    return W.abs().to(norm.dtype) * norm[None, :]


def wanda_prune(W: torch.Tensor, stats: LayerStats, spec: PruneSpec) -> LayerResult:
    """Wanda: score |W_ij| · ‖x_j‖₂, pruned per output row (unstructured) or per N:M group.

    info["error"] is ‖WX − ŴX‖²/n_tokens when stats.hessian is present, else None."""
    _check_weight(W)
    _check_tokens(stats, "wanda")
    W = W.detach()
    mask = _spec_mask(_wanda_score(W, stats), spec, per_row=True)
    W_hat = W.clone()
    W_hat[~mask] = 0
    err = layer_objective(W, W_hat, stats.hessian) if stats.hessian is not None else None
    return _result(W_hat, mask, err)


def _check_tokens(stats: LayerStats, method: str) -> None:
    if stats.n_tokens <= 0:
        raise NumericalError(
            f"{method} needs calibration inputs but this layer saw none (e.g. an MoE expert no token was "
            f"routed to): use more calibration data, or magnitude pruning / a dense override for this layer")


# ---- SparseGPT ----------------------------------------------------------------------------------

def sparsegpt_prune(W: torch.Tensor, stats: LayerStats, spec: PruneSpec, per_row: bool = True) -> LayerResult:
    """SparseGPT: OBS pruning with the damped inverse Hessian, column block by column block.

    In each block of ``spec.blocksize`` columns the mask is chosen from the OBS saliency w²/d²
    (d = diagonal of the Cholesky factor of H⁻¹) on the weights as updated so far; then the block
    is swept column by column, each pruned weight's error spread over the later columns of its
    row, and the later blocks updated once per block (lazy batch update).

    Unstructured: ``per_row=True`` prunes exactly the same count in every row of each block (so each
    row ends at exactly ``round(sparsity · in)``); ``per_row=False`` selects over the whole block as
    the reference SparseGPT code does (same layer total, rows may differ).
    N:M: every m columns the n lowest-saliency weights of each row are pruned (block size is
    rounded to a multiple of m so groups never straddle blocks).

    info: error (‖WX − ŴX‖²/n_tokens with the undamped H), damp, dead.
    """
    _check_weight(W)
    _check_tokens(stats, "sparsegpt")
    if stats.hessian is None:
        raise ValueError("sparsegpt needs stats.hessian (collect the Hessian for this layer)")
    rows, cols = W.shape
    if spec.structured:
        _check_nm(cols, spec.n, spec.m)
    if spec.blocksize < 1:
        raise RecipeError(f"block size {spec.blocksize} must be a positive number of columns, e.g. 128")
    W0 = W.detach()
    H = stats.hessian.detach().to(W0.device)
    if not spec.structured and _n_pruned(spec.sparsity, cols if per_row else W.numel()) == 0:
        return _result(W0.clone(), torch.ones_like(W0, dtype=torch.bool), 0.0, damp=None, dead=0)

    W, U, hinfo = prepare_hessian(W0, H, damp=spec.damp)
    mask = torch.ones_like(W, dtype=torch.bool)
    blocksize = spec.blocksize
    if spec.structured:
        blocksize = max(spec.m, blocksize // spec.m * spec.m)
    d_all = torch.diagonal(U)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d1 = d_all[i1:i2]
        Err1 = torch.zeros_like(W1)
        M1 = torch.ones_like(W1, dtype=torch.bool)
        if not spec.structured:
            size = rows if not per_row else 1
            k = _n_pruned(spec.sparsity, i2 * size) - _n_pruned(spec.sparsity, i1 * size)
            M1 = _prune_lowest(W1 ** 2 / d1[None, :] ** 2, k, per_row)
        for i in range(i2 - i1):
            if spec.structured and i % spec.m == 0:
                sal = W1[:, i:i + spec.m] ** 2 / d1[None, i:i + spec.m] ** 2
                M1[:, i:i + spec.m] = nm_mask(sal, spec.n, spec.m)
            w = W1[:, i]
            err = torch.where(M1[:, i], torch.zeros_like(w), w) / d1[i]
            # spread the error of this column over the rest of the block (OBS update, frozen prefix)
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W1[~M1] = 0.0
        W[:, i1:i2] = W1
        mask[:, i1:i2] = M1
        if i2 < cols:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)

    err = layer_objective(W0, W, H)
    return _result(W, mask, err, damp=hinfo["damp"], dead=hinfo["dead"])


def prune_layer(W: torch.Tensor, stats: LayerStats | None, spec: PruneSpec) -> LayerResult:
    """Dispatch on spec.method (stats may be None for magnitude)."""
    if spec.method == "magnitude":
        return magnitude_prune(W, spec)
    if stats is None:
        raise ValueError(f"{spec.method} needs input statistics for this layer")
    if spec.method == "wanda":
        return wanda_prune(W, stats, spec)
    if spec.method == "sparsegpt":
        return sparsegpt_prune(W, stats, spec)
    raise RecipeError(f"unknown pruning method {spec.method!r}")
