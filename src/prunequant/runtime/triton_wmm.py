"""Weight-only matmul over our packed uniform-grid codes, as Triton kernels (CUDA; the CPU runs them only
under TRITON_INTERPRET=1, for the tests).

``y = x · Wᵀ (+ b)`` where W is held as one or two *segments*, each a (N, K_s) matrix of b-bit codes
(b ∈ {2, 4, 8}; ``8 // b`` codes per byte, code k in byte k // per at bit (k % per)·b, as
export/bitpack.py orders a stream) with a grid per output row and group of ``group_size`` consecutive
columns (``w = scale · (code − zero)``, the convention of solvers/base.py), reading its input columns
``x[:, cols]`` (channel-level mixed precision: the high-bit and the low-bit columns of one layer are
two segments of one launch, both accumulated into the same output tile).

The weight tile is dequantized in float32 — ``(code − zero) · scale`` is exact there, since scales are
fp16 values and codes/zeros small integers — and rounded once to the activation dtype: the tensor-core
product then sees exactly the weights of the dequantized model in that dtype, and only the order of the
float32 accumulation differs from a dense matmul. ``dequantize_into`` writes the same values into a
dense buffer (large inputs: dequantize once, then one cuBLAS matmul).
"""
from __future__ import annotations

import os

import torch

try:  # triton is optional: CPU installs have no need for it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

SUPPORTED_BITS = (2, 4, 8)


def available(t: torch.Tensor) -> bool:
    """Can the kernels run on this tensor's device? (CUDA with triton, or the interpreter for tests.)"""
    if triton is None or os.environ.get("PRUNEQUANT_NO_TRITON"):
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _segment(acc, X, sxm, sxk, rm, m_mask, rn, n_mask, C, scn, S, Z, ssn, COLS, K, GS,
                 BITS: tl.constexpr, HAS_COLS: tl.constexpr, GROUP_TILE: tl.constexpr, IEEE: tl.constexpr,
                 BK: tl.constexpr):
        PER: tl.constexpr = 8 // BITS
        LOW: tl.constexpr = (1 << BITS) - 1
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            k_mask = rk < K
            if HAS_COLS:
                xc = tl.load(COLS + rk, mask=k_mask, other=0)
            else:
                xc = rk
            x = tl.load(X + rm[:, None] * sxm + xc[None, :] * sxk, mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)
            wk_mask = n_mask[:, None] & k_mask[None, :]
            byte = tl.load(C + rn[:, None] * scn + (rk // PER)[None, :], mask=wk_mask, other=0)
            code = ((byte.to(tl.int32) >> ((rk % PER) * BITS)[None, :]) & LOW).to(tl.float32)
            if GROUP_TILE:  # the whole k-tile lies in one group: one scale / zero per row
                g = k0 // GS
                s = tl.load(S + rn * ssn + g, mask=n_mask, other=0.0).to(tl.float32)
                z = tl.load(Z + rn * ssn + g, mask=n_mask, other=0.0).to(tl.float32)
                w = (code - z[:, None]) * s[:, None]
            else:
                g = rk // GS
                s = tl.load(S + rn[:, None] * ssn + g[None, :], mask=wk_mask, other=0.0).to(tl.float32)
                z = tl.load(Z + rn[:, None] * ssn + g[None, :], mask=wk_mask, other=0.0).to(tl.float32)
                w = (code - z) * s
            w = w.to(x.dtype)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        return acc

    @triton.jit(do_not_specialize=["M", "N", "KA", "KB", "GSA", "GSB"])
    def _wmm_kernel(X, sxm, sxk, Y, sym, syn, BIAS, M, N,
                    CA, scna, SA, ZA, ssna, COLA, KA, GSA,
                    CB, scnb, SB, ZB, ssnb, COLB, KB, GSB,
                    BITS_A: tl.constexpr, BITS_B: tl.constexpr, HAS_B: tl.constexpr,
                    COLS_A: tl.constexpr, COLS_B: tl.constexpr, GT_A: tl.constexpr, GT_B: tl.constexpr,
                    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        m_mask = rm < M
        n_mask = rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc = _segment(acc, X, sxm, sxk, rm, m_mask, rn, n_mask, CA, scna, SA, ZA, ssna, COLA, KA, GSA,
                       BITS_A, COLS_A, GT_A, IEEE, BK)
        if HAS_B:
            acc = _segment(acc, X, sxm, sxk, rm, m_mask, rn, n_mask, CB, scnb, SB, ZB, ssnb, COLB, KB, GSB,
                           BITS_B, COLS_B, GT_B, IEEE, BK)
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * sym + rn[None, :] * syn, acc.to(Y.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit(do_not_specialize=["N", "K", "GS", "col0"])
    def _dequant_kernel(C, scn, S, Z, ssn, OUT, son, col0, N, K, GS,
                        BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        PER: tl.constexpr = 8 // BITS
        LOW: tl.constexpr = (1 << BITS) - 1
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        mask = (rn < N)[:, None] & (rk < K)[None, :]
        byte = tl.load(C + rn[:, None] * scn + (rk // PER)[None, :], mask=mask, other=0)
        code = ((byte.to(tl.int32) >> ((rk % PER) * BITS)[None, :]) & LOW).to(tl.float32)
        g = rk // GS
        s = tl.load(S + rn[:, None] * ssn + g[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(Z + rn[:, None] * ssn + g[None, :], mask=mask, other=0.0).to(tl.float32)
        w = (code - z) * s
        tl.store(OUT + rn[:, None] * son + (col0 + rk)[None, :], w.to(OUT.dtype.element_ty), mask=mask)


def _override(M: int) -> dict | None:
    """PRUNEQUANT_WMM_TILES="BM,BN,BK,warps,stages" (for M <= 16) / PRUNEQUANT_WMM_TILES_LARGE (M > 64):
    tile sizes to try without editing the code."""
    key = "PRUNEQUANT_WMM_TILES" if M <= 16 else ("PRUNEQUANT_WMM_TILES_LARGE" if M > 64 else None)
    val = os.environ.get(key) if key else None
    if not val:
        return None
    bm, bn, bk, w, st = (int(v) for v in val.split(","))
    return {"BM": bm, "BN": bn, "BK": bk, "num_warps": w, "num_stages": st}


def launch_config(M: int, N: int) -> dict:
    """Tile sizes by the number of input rows: skinny (decode) tiles spread N over many programs."""
    cfg = _override(M)
    if cfg is not None:
        return cfg
    if M <= 16:
        bn = 16 if N <= 2048 else (32 if N <= 4096 else 64)
        return {"BM": 16, "BN": bn, "BK": 128, "num_warps": 4, "num_stages": 4}
    if M <= 64:
        return {"BM": 32 if M <= 32 else 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 3}
    return {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}


def _gs_arg(group_size: int, k: int, bk: int) -> tuple[int, bool]:
    """(group size passed to the kernel, whether every k-tile lies inside one group)."""
    if group_size <= 0:  # one group per row: any k lands in group 0
        return max(k, 1) + bk, True
    return group_size, group_size % bk == 0


def matmul(x: torch.Tensor, segments: list, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (M, K_in) contiguous-strided 2-D; ``segments``: 1 or 2 objects with ``codes`` (N, bytes) uint8,
    ``scale`` / ``zero`` (N, G), ``cols`` (K_s,) int32 or None, ``bits``, ``group_size``, ``k``."""
    M = x.shape[0]
    N = out_features
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    cfg = launch_config(M, N)
    bk = cfg["BK"]
    a = segments[0]
    b = segments[1] if len(segments) > 1 else segments[0]
    gsa, gta = _gs_arg(a.group_size, a.k, bk)
    gsb, gtb = _gs_arg(b.group_size, b.k, bk)
    grid = (triton.cdiv(N, cfg["BN"]), triton.cdiv(M, cfg["BM"]))
    cola = a.cols if a.cols is not None else a.codes
    colb = b.cols if b.cols is not None else b.codes
    _wmm_kernel[grid](
        x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1), bias if bias is not None else y, M, N,
        a.codes, a.codes.stride(0), a.scale, a.zero, a.scale.stride(0), cola, a.k, gsa,
        b.codes, b.codes.stride(0), b.scale, b.zero, b.scale.stride(0), colb, b.k, gsb,
        BITS_A=a.bits, BITS_B=b.bits, HAS_B=len(segments) > 1,
        COLS_A=a.cols is not None, COLS_B=b.cols is not None, GT_A=gta, GT_B=gtb,
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BM=cfg["BM"], BN=cfg["BN"], BK=bk, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def dequantize_into(seg, out: torch.Tensor, col0: int = 0) -> torch.Tensor:
    """Write segment ``seg``'s weights into ``out[:, col0 : col0 + seg.k]`` (out: (N, ≥ col0 + k))."""
    N, K = seg.codes.shape[0], seg.k
    bn, bk = 32, 128
    gs = seg.group_size if seg.group_size > 0 else K + 1
    grid = (triton.cdiv(N, bn), triton.cdiv(K, bk))
    _dequant_kernel[grid](seg.codes, seg.codes.stride(0), seg.scale, seg.zero, seg.scale.stride(0),
                          out, out.stride(0), col0, N, K, gs, BITS=seg.bits, BN=bn, BK=bk, num_warps=4)
    return out
