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

def _obs_errors(Wseg: torch.Tensor, Useg: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Scaled errors E of pruning the weights where p == 1 in a segment, columns taken left to right,
    each pruned weight's removal compensated over the columns right of it (OBS with a frozen prefix).

    Sweeping column i sets E_i = (current w_i)/U_ii for a pruned weight, 0 for a kept one, and the
    current w_i is w_i − Σ_{k<i} E_k U_ki. So per row: (E·U)_i = w_i where pruned, E_i = 0 where kept,
    i.e. E·A = W∘p with A = U·diag(p) + diag(1 − p), upper triangular: one batched triangular solve
    instead of a kernel launch per column (measured 4-10x faster on an H100 for unstructured).
    """
    rows, L = Wseg.shape
    E = torch.empty_like(Wseg)
    step = max(1, (1 << 25) // (L * L))  # rows per chunk: A takes ≤ 128 MiB in float32
    for r0 in range(0, rows, step):
        pr = p[r0:r0 + step]
        A = Useg[None] * pr[:, None, :] + torch.diag_embed(1.0 - pr)
        E[r0:r0 + step] = torch.linalg.solve_triangular(
            A, (Wseg[r0:r0 + step] * pr)[:, None, :], upper=True, left=False)[:, 0, :]
    return E


def sparsegpt_prune(W: torch.Tensor, stats: LayerStats, spec: PruneSpec, per_row: bool = True) -> LayerResult:
    """SparseGPT: OBS pruning with the damped inverse Hessian, column block by column block.

    In each block of ``spec.blocksize`` columns the mask is chosen from the OBS saliency w²/d²
    (d = diagonal of the Cholesky factor of H⁻¹) on the weights as updated so far; each pruned
    weight's error is spread over the later columns of its row exactly as a column-by-column sweep
    would (computed with one batched triangular solve per segment, see _obs_errors), and the
    columns right of the block are updated once per block (lazy batch update).

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
        W1 = W[:, i1:i2]  # a view: the block is updated in place
        U1 = U[i1:i2, i1:i2]
        inv_d2 = d_all[i1:i2] ** -2
        Err1 = torch.empty_like(W1)
        # segments of the block whose mask is known when the segment starts: the whole block
        # (unstructured, chosen on the weights as updated so far) or one N:M group at a time
        seg = spec.m if spec.structured else i2 - i1
        for a in range(0, i2 - i1, seg):
            b = min(a + seg, i2 - i1)
            sal = W1[:, a:b] ** 2 * inv_d2[a:b]
            if spec.structured:
                keep = nm_mask(sal, spec.n, spec.m)
            else:
                size = rows if not per_row else 1
                k = _n_pruned(spec.sparsity, i2 * size) - _n_pruned(spec.sparsity, i1 * size)
                keep = _prune_lowest(sal, k, per_row)
            E = _obs_errors(W1[:, a:b], U1[a:b, a:b], (~keep).to(W1.dtype))
            W1[:, a:b].addmm_(E, U1[a:b, a:b], alpha=-1.0).mul_(keep)  # pruned → 0 (no host sync)
            if b < i2 - i1:
                W1[:, b:].addmm_(E, U1[a:b, b:], alpha=-1.0)
            Err1[:, a:b] = E
            mask[:, i1 + a:i1 + b] = keep
        if i2 < cols:  # lazy batch update of everything right of the block
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
