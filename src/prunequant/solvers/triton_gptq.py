"""GPTQ's in-block column loop, and SparseGPT's pruning loop, as one Triton kernel launch each (CUDA;
float32); numerics: docs/methods.md."""
from __future__ import annotations

import os

import torch

try:  # triton is optional: CPU installs and CI have no need for it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

MAX_BLOCK = 256
# In the kernel, adding then subtracting 12582912.0 = 1.5·2^23 rounds a float32 |x| < 2^22 to the nearest
# integer, ties to even (exactly torch.round); larger |x| is clamped to [0, maxq] right after anyway.
# (A literal: Triton refuses module-level globals that are not constexpr inside a kernel.)


def available(t: torch.Tensor) -> bool:
    """Use the kernel for this tensor? (CUDA float32, triton installed, not disabled by the user.)"""
    if triton is None or os.environ.get("PRUNEQUANT_NO_TRITON"):
        return False
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    return t.dtype == torch.float32 and (t.is_cuda or interp)


if triton is not None:

    @triton.jit
    def _row_tile(W, sw0, sw1, rows, ncols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's rows of W (all its columns): row and column indices, their masks, the tile."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        rm = r < rows
        cm = c < ncols
        return r, c, rm, cm, tl.load(W + r[:, None] * sw0 + c[None, :] * sw1, mask=rm[:, None] & cm[None, :],
                                     other=0.0)

    @triton.jit
    def _gptq_cols_kernel(W, sw0, sw1, U, su0, su1, S, Z, ss0, ss1, G, M, sm0, sm1, C, sc0, sc1, E, se0, se1,
                          rows, ncols, a, b, maxq,
                          HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r, c, rm, cm, tile = _row_tile(W, sw0, sw1, rows, ncols, BLOCK_R, BLOCK_C)
        for i in range(a, b):
            w = tl.sum(tl.where((c == i)[None, :], tile, 0.0), axis=1)
            g = tl.load(G + i)
            s = tl.load(S + r * ss0 + g * ss1, mask=rm, other=1.0)
            z = tl.load(Z + r * ss0 + g * ss1, mask=rm, other=0.0)
            x = tl.math.div_rn(w, s)
            x = (x + 12582912.0) - 12582912.0
            q = tl.minimum(tl.maximum(x + z, 0.0), maxq)
            if HAS_MASK:
                keep = tl.load(M + r * sm0 + i * sm1, mask=rm, other=1)
                q = tl.where(keep != 0, q, z)
            d = tl.load(U + i * su0 + i * su1)
            err = tl.math.div_rn(w - s * (q - z), d)
            u = tl.load(U + i * su0 + c * su1, mask=(c > i) & cm, other=0.0)
            tile = tile - err[:, None] * u[None, :]
            tl.store(C + r * sc0 + i * sc1, q, mask=rm)
            tl.store(E + r * se0 + i * se1, err, mask=rm)
        tl.store(W + r[:, None] * sw0 + c[None, :] * sw1, tile, mask=rm[:, None] & cm[None, :])

    @triton.jit
    def _prune_cols_kernel(W, sw0, sw1, U, su0, su1, M, sm0, sm1, E, se0, se1, rows, ncols,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r, c, rm, cm, tile = _row_tile(W, sw0, sw1, rows, ncols, BLOCK_R, BLOCK_C)
        for i in range(0, ncols):
            w = tl.sum(tl.where((c == i)[None, :], tile, 0.0), axis=1)
            keep = tl.load(M + r * sm0 + i * sm1, mask=rm, other=1)
            d = tl.load(U + i * su0 + i * su1)
            err = tl.where(keep != 0, 0.0, tl.math.div_rn(w, d))
            u = tl.load(U + i * su0 + c * su1, mask=(c > i) & cm, other=0.0)
            tile = tile - err[:, None] * u[None, :]
            tile = tl.where((c == i)[None, :] & (keep == 0)[:, None], 0.0, tile)
            tl.store(E + r * se0 + i * se1, err, mask=rm)
        tl.store(W + r[:, None] * sw0 + c[None, :] * sw1, tile, mask=rm[:, None] & cm[None, :])


def prune_columns(W1: torch.Tensor, U1: torch.Tensor, mask_u8: torch.Tensor, err1: torch.Tensor,
                  block_rows: int = 16) -> None:
    """obs.prune_columns in one launch: W1 (rows, B) in place, U1 (B, B), mask_u8 (1 = kept), err1 out."""
    rows, B = W1.shape
    if B > MAX_BLOCK:
        raise ValueError(f"segment of {B} columns is wider than the kernel's {MAX_BLOCK}")
    block_c = max(16, triton.next_power_of_2(B))
    _prune_cols_kernel[(triton.cdiv(rows, block_rows),)](
        W1, *W1.stride(), U1, *U1.stride(), mask_u8, *mask_u8.stride(), err1, *err1.stride(), rows, B,
        BLOCK_R=block_rows, BLOCK_C=block_c, num_warps=4 if block_c <= 128 else 8)


def gptq_columns(W1: torch.Tensor, U1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 col_group: torch.Tensor, mask_u8: torch.Tensor | None, codes1: torch.Tensor,
                 err1: torch.Tensor, a: int, b: int, maxq: int, block_rows: int = 16) -> None:
    """Quantize columns a..b-1 of one block in place, as GPTQ's torch column loop does. W1 (rows, B): the
    block's weights (any strides, updated in place); U1 (B, B): its part of chol(H⁻¹, upper); scale/zero
    (rows, n_groups); col_group (B,) int32; mask_u8 (rows, B) or None (1 = kept); codes1/err1: outputs (views)."""
    rows, B = W1.shape
    if B > MAX_BLOCK:
        raise ValueError(f"block of {B} columns is wider than the kernel's {MAX_BLOCK}")
    for t in (W1, U1, codes1, err1, scale, zero):
        assert t.dtype == torch.float32
    assert scale.stride() == zero.stride() and col_group.is_contiguous() and col_group.dtype == torch.int32
    block_c = max(16, triton.next_power_of_2(B))
    m = mask_u8 if mask_u8 is not None else codes1  # dummy pointer when there is no mask
    grid = (triton.cdiv(rows, block_rows),)
    _gptq_cols_kernel[grid](
        W1, *W1.stride(), U1, *U1.stride(), scale, zero, *scale.stride(), col_group,
        m, *m.stride(), codes1, *codes1.stride(), err1, *err1.stride(),
        rows, B, a, b, float(maxq),
        HAS_MASK=mask_u8 is not None, BLOCK_R=block_rows, BLOCK_C=block_c,
        num_warps=4 if block_c <= 128 else 8)
