"""Weight-only matmul over packed uniform-grid codes as Triton kernels (CUDA; on the CPU only under
TRITON_INTERPRET=1, for the tests): GEMVs for decode, tensor-core kernels for more rows, dequantization for
prefill, and the tile tuner with its cache. Code layout, kernels and tuning: docs/runtime.md.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch

try:  # triton is optional: CPU installs have no need for it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

SUPPORTED_BITS = (2, 3, 4, 8)


def per_word(bits: int) -> int:
    return 32 // bits


def available(t: torch.Tensor) -> bool:
    """Can the kernels run on this tensor's device? (CUDA with triton, or the interpreter for tests.)"""
    if triton is None or os.environ.get("PRUNEQUANT_NO_TRITON"):
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if triton is not None:

    @triton.jit
    def _segment(acc, X, sxm, sxk, rm, m_mask, rn, n_mask, C, scn, S, Z, ssn, COLS, K, GS,
                 BITS: tl.constexpr, HAS_COLS: tl.constexpr, GROUP_TILE: tl.constexpr, IEEE: tl.constexpr,
                 BK: tl.constexpr):
        PER: tl.constexpr = 32 // BITS
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
            word = tl.load(C + rn[:, None] * scn + (rk // PER)[None, :], mask=wk_mask, other=0)
            code = ((word >> ((rk % PER) * BITS)[None, :]) & LOW).to(tl.float32)
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
            acc = _dot_wt(acc, x, w, IEEE)
        return acc

    @triton.jit
    def _dot_wt(acc, x, w, IEEE: tl.constexpr):
        """acc + x · wᵀ on tensor cores, w rounded to x's type; IEEE: exact float32 products (no tf32)."""
        w = w.to(x.dtype)
        if IEEE:
            return acc + tl.dot(x, tl.trans(w), input_precision="ieee")
        return acc + tl.dot(x, tl.trans(w))

    @triton.jit
    def _tile(M, N, BM: tl.constexpr, BN: tl.constexpr):
        """Rows and output columns of program (n-tile, m-tile), with their bounds masks."""
        rm = tl.program_id(1) * BM + tl.arange(0, BM)
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        return rm, rn, rm < M, rn < N

    @triton.jit
    def _store_tile(acc, Y, sym, syn, BIAS, rm, rn, m_mask, n_mask, HAS_BIAS: tl.constexpr):
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * sym + rn[None, :] * syn, acc.to(Y.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _split_tile(pid_n, pid_k, pid_m, M, N, KW, KWS, BM: tl.constexpr, BN: tl.constexpr):
        """Output rows and mask, input rows and mask, and word range [w_lo, w_hi) of tile (n, k-split, m)."""
        rn = pid_n * BN + tl.arange(0, BN)
        rm = pid_m * BM + tl.arange(0, BM)
        w_lo = pid_k * KWS
        return rn, rn < N, rm, rm < M, w_lo, tl.minimum(w_lo + KWS, KW)

    @triton.jit
    def _split_program(M, N, KW, KWS, BM: tl.constexpr, BN: tl.constexpr):
        """Program (n-tile, k-split, block of BM input rows; a 2-D grid has one block): (k-split, output
        rows and mask, input rows and mask, its word range [w_lo, w_hi))."""
        pid_k = tl.program_id(1)
        rn, n_mask, rm, m_mask, w_lo, w_hi = _split_tile(tl.program_id(0), pid_k, tl.program_id(2), M, N, KW, KWS,
                                                         BM, BN)
        return pid_k, rn, n_mask, rm, m_mask, w_lo, w_hi

    @triton.jit
    def _store_split(acc, Y, sym, BIAS, rm, rn, m_mask, n_mask, pid_k, HAS_BIAS: tl.constexpr,
                     ATOMIC: tl.constexpr):
        """Store a k-split's (BM, BN) partial sum: the bias from the first split only, atomically if split."""
        if HAS_BIAS:
            bias = tl.load(BIAS + rn, mask=n_mask, other=0.0).to(tl.float32)
            acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
        ptr = Y + rm[:, None] * sym + rn[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        if ATOMIC:
            tl.atomic_add(ptr, acc, mask=mask)
        else:
            tl.store(ptr, acc.to(Y.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["M", "N", "KA", "KB", "GSA", "GSB"])
    def _wmm_kernel(X, sxm, sxk, Y, sym, syn, BIAS, M, N,
                    CA, scna, SA, ZA, ssna, COLA, KA, GSA,
                    CB, scnb, SB, ZB, ssnb, COLB, KB, GSB,
                    BITS_A: tl.constexpr, BITS_B: tl.constexpr, HAS_B: tl.constexpr,
                    COLS_A: tl.constexpr, COLS_B: tl.constexpr, GT_A: tl.constexpr, GT_B: tl.constexpr,
                    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm, rn, m_mask, n_mask = _tile(M, N, BM, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc = _segment(acc, X, sxm, sxk, rm, m_mask, rn, n_mask, CA, scna, SA, ZA, ssna, COLA, KA, GSA,
                       BITS_A, COLS_A, GT_A, IEEE, BK)
        if HAS_B:
            acc = _segment(acc, X, sxm, sxk, rm, m_mask, rn, n_mask, CB, scnb, SB, ZB, ssnb, COLB, KB, GSB,
                           BITS_B, COLS_B, GT_B, IEEE, BK)
        _store_tile(acc, Y, sym, syn, BIAS, rm, rn, m_mask, n_mask, HAS_BIAS)

    @triton.jit
    def _code_at(words, J: tl.constexpr, BITS: tl.constexpr):
        """Code J of every int32 word as float32 ``c · 2^sh`` (sh = _shift_of(J)), without an int→float
        conversion: the code's bits are OR-ed into the mantissa of 2^23 (exact while they stay below bit 23;
        the codes above are first shifted down once)."""
        LOW: tl.constexpr = (1 << BITS) - 1
        DIRECT: tl.constexpr = 23 // BITS  # codes whose bits lie in 0..22
        if J < DIRECT:
            u = words & (LOW << (J * BITS))
        else:
            u = (words >> (DIRECT * BITS)) & (LOW << ((J - DIRECT) * BITS))
        return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _split_codes(words, BITS: tl.constexpr):
        """The codes of int32 words (2, 4 or 8 bits) as float32 (…, 2, …, 2): halves joined on new last axes until
        each element holds one code, so that a reshape to (…, per) puts code j at index j, in the word's thread
        (the float conversion as in _code_at)."""
        v = tl.join(words & 0xFFFF, (words >> 16) & 0xFFFF)
        if BITS <= 8:
            v = tl.join(v & 0xFF, (v >> 8) & 0xFF)
        if BITS <= 4:
            v = tl.join(v & 0xF, (v >> 4) & 0xF)
        if BITS <= 2:
            v = tl.join(v & 0x3, (v >> 2) & 0x3)
        return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _inv_shift(J: tl.constexpr, BITS: tl.constexpr):
        """2^-sh for code J (see _code_at), built from its exponent bits (exact)."""
        DIRECT: tl.constexpr = 23 // BITS
        SH: tl.constexpr = J * BITS if J < DIRECT else (J - DIRECT) * BITS
        return tl.full((), (127 - SH) << 23, tl.int32).to(tl.float32, bitcast=True)

    @triton.jit
    def _word_products(words, X, sxk, rw, w_mask, n_mask, rn, S, Z, ssn, COLS, K, GS,
                       BITS: tl.constexpr, HAS_COLS: tl.constexpr, WORD_GROUPS: tl.constexpr,
                       BN: tl.constexpr, BW: tl.constexpr, UNPACK3: tl.constexpr):
        """(BN, BW) float32: Σ_j w[n, k] · x[k] over the codes k of each word (x: one input row)."""
        PER: tl.constexpr = 32 // BITS
        if UNPACK3 and WORD_GROUPS and not HAS_COLS and PER * BITS == 32:
            # all codes of a word at once: (BN, BW, PER) against the (BW, PER) contiguous inputs
            rj = tl.arange(0, PER)
            k2 = rw[:, None] * PER + rj[None, :]
            x2 = tl.load(X + k2 * sxk, mask=w_mask[:, None] & (k2 < K), other=0.0).to(tl.float32)
            f3 = _split_codes(words, BITS)
            t = tl.sum(tl.reshape(f3, (BN, BW, PER)) * x2[None, :, :], axis=2)
            xs = tl.sum(x2, axis=1)
        else:
            t = tl.zeros((BN, BW), dtype=tl.float32)
            xs = tl.zeros((BW,), dtype=tl.float32)
            for j in tl.static_range(PER):
                k, k_mask, xc = _position(rw, w_mask, j, PER, K, COLS, HAS_COLS)
                xj = tl.load(X + xc * sxk, mask=k_mask, other=0.0).to(tl.float32)
                f = _code_at(words, j, BITS)
                if WORD_GROUPS:
                    t += f * (xj * _inv_shift(j, BITS))[None, :]
                    xs += xj
                else:  # groups change inside a word: the grid per weight
                    s, z = _weight_grid(S, Z, ssn, rn, n_mask, k, k_mask, GS)
                    t += (f * _inv_shift(j, BITS) - z) * s * xj[None, :]
        return t, xs

    @triton.jit
    def _position(rw, w_mask, J: tl.constexpr, PER: tl.constexpr, K, COLS, HAS_COLS: tl.constexpr):
        """Code position J of words rw: its weight columns, their mask, and the input columns they read."""
        k = rw * PER + J
        k_mask = w_mask & (k < K)
        if HAS_COLS:
            xc = tl.load(COLS + k, mask=k_mask, other=0)
        else:
            xc = k
        return k, k_mask, xc

    @triton.jit
    def _weight_grid(S, Z, ssn, rn, n_mask, k, k_mask, GS):
        """Scale and zero point of every (row, column) weight: groups that change inside a word."""
        g = k // GS
        gm = n_mask[:, None] & k_mask[None, :]
        s = tl.load(S + rn[:, None] * ssn + g[None, :], mask=gm, other=0.0).to(tl.float32)
        z = tl.load(Z + rn[:, None] * ssn + g[None, :], mask=gm, other=0.0).to(tl.float32)
        return s, z

    @triton.jit
    def _grid_at(S, Z, ssn, rn, n_mask, w0, rw, nw_mask, K, GS,
                 PER: tl.constexpr, GRID: tl.constexpr, NGT: tl.constexpr, BW: tl.constexpr):
        """The scales / zero points a gemv tile needs: per word (GRID 1, (BN, BW)) or per group of the tile
        (GRID 2, (BN, NGT)); other grids load theirs elsewhere."""
        if GRID == 2 or GRID == 4:
            if NGT > 1:  # the tile holds NGT whole groups of BW // NGT words (a shift, not a division)
                g = w0 // (BW // NGT) + tl.arange(0, NGT)
            else:
                g = (w0 * PER) // GS + tl.arange(0, NGT)
            m = n_mask[:, None] & (g * GS < K)[None, :]
            s = tl.load(S + rn[:, None] * ssn + g[None, :], mask=m, other=0.0).to(tl.float32)
            z = tl.load(Z + rn[:, None] * ssn + g[None, :], mask=m, other=0.0).to(tl.float32)
        else:
            g = (rw * PER) // GS
            s = tl.load(S + rn[:, None] * ssn + g[None, :], mask=nw_mask, other=0.0).to(tl.float32)
            z = tl.load(Z + rn[:, None] * ssn + g[None, :], mask=nw_mask, other=0.0).to(tl.float32)
        return s, z

    @triton.jit
    def _apply_grid(t, xs, s, z, GRID: tl.constexpr, NGT: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
        """Σ over a tile's words of w · x, per row and word (GRID 0, 1, 3, 4) or per row and group (GRID 2)."""
        if GRID == 1:
            out = s * (t - z * xs[None, :])
        elif GRID == 2:
            tg = tl.sum(tl.reshape(t, (BN, NGT, BW // NGT)), axis=2)
            xg = tl.sum(tl.reshape(xs, (NGT, BW // NGT)), axis=1)
            out = s * (tg - z * xg[None, :])
        elif GRID == 4:  # GRID 2's scales spread over their groups' words: no sums across lanes per trip
            sw = tl.reshape(tl.broadcast_to(s[:, :, None], (BN, NGT, BW // NGT)), (BN, BW))
            zw = tl.reshape(tl.broadcast_to(z[:, :, None], (BN, NGT, BW // NGT)), (BN, BW))
            out = sw * (t - zw * xs[None, :])
        else:
            out = t
        return out

    @triton.jit
    def _gemv_tile(C, scn, rn, n_mask, w0, w_hi, S, Z, ssn, K, GS, s_row, z_row,
                   EVEN: tl.constexpr, PER: tl.constexpr, GRID: tl.constexpr, NGT: tl.constexpr, BW: tl.constexpr):
        """The word tile at w0 of rows rn: its words (declared contiguous from a multiple of BW, where tiles start,
        which the compiler cannot derive through a loop), their mask, the words, and its scales / zero points."""
        rw = tl.max_contiguous(tl.multiple_of(w0 + tl.arange(0, BW), BW), BW)
        w_mask = _word_mask(rw, w_hi, EVEN, BW)
        nw_mask = n_mask[:, None] & w_mask[None, :]
        words = tl.load(C + rn[:, None] * scn + rw[None, :], mask=nw_mask, other=0)
        s, z = s_row, z_row
        if GRID == 1 or GRID == 2 or GRID == 4:
            s, z = _grid_at(S, Z, ssn, rn, n_mask, w0, rw, nw_mask, K, GS, PER, GRID, NGT, BW)
        return rw, w_mask, words, s, z

    @triton.jit
    def _word_mask(rw, w_hi, EVEN: tl.constexpr, BW: tl.constexpr):
        """Words rw below w_hi; all of them where the split is whole tiles (a constant mask keeps loads vector)."""
        if EVEN:
            return tl.full((BW,), 1, tl.int1)
        return rw < w_hi

    @triton.jit
    def _gemv_step(acc, xacc, words, s, z, rw, w_mask, first, X, sxm, sxk, Y, sym, M, rn, n_mask, S, Z, ssn, COLS,
                   K, GS, bias, s_row, z_row, BITS: tl.constexpr, HAS_COLS: tl.constexpr, GRID: tl.constexpr,
                   NGT: tl.constexpr, ONE_ROW: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr,
                   UNPACK3: tl.constexpr):
        """One word tile of _gemv_body: accumulated (one row) or reduced and added to the output (more rows)."""
        WORD_GROUPS: tl.constexpr = GRID != 0
        if ONE_ROW:  # accumulate over the k-tiles, one reduction at the end
            t, xs = _word_products(words, X, sxk, rw, w_mask, n_mask, rn, S, Z, ssn, COLS, K, GS,
                                   BITS, HAS_COLS, WORD_GROUPS, BN, BW, UNPACK3)
            acc += _apply_grid(t, xs, s, z, GRID, NGT, BN, BW)
            xacc += xs
        else:  # every input row reduces its own tile and adds it to the output
            for m in range(0, M):
                t, xs = _word_products(words, X + m * sxm, sxk, rw, w_mask, n_mask, rn, S, Z, ssn, COLS, K,
                                       GS, BITS, HAS_COLS, WORD_GROUPS, BN, BW, UNPACK3)
                part = tl.sum(_apply_grid(t, xs, s, z, GRID, NGT, BN, BW), axis=1)
                if GRID == 3:
                    part = s_row * (part - z_row * tl.sum(xs, axis=0))
                if first:
                    part += bias
                tl.atomic_add(Y + m * sym + rn, part, mask=n_mask)
        return acc, xacc

    @triton.jit
    def _gemv_body(pid_n, pid_k, X, sxm, sxk, Y, sym, BIAS, M, N, C, scn, S, Z, ssn, COLS, K, KW, KWS, GS,
                   BITS: tl.constexpr, HAS_COLS: tl.constexpr, GRID: tl.constexpr, NGT: tl.constexpr,
                   HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, ONE_ROW: tl.constexpr,
                   BN: tl.constexpr, BW: tl.constexpr, UNPACK3: tl.constexpr, PIPE: tl.constexpr,
                   EVEN: tl.constexpr):
        # program (n-tile, k-split): rows rn of W over words [pid_k·KWS, (pid_k+1)·KWS), every input row.
        # Decode needs bytes in flight and few instructions per word (at one row it is issue-bound on sm_90,
        # BENCHMARKS "What the one-row GEMV issues"): the next tile's words are loaded before this tile is used, or
        # (PIPE > 0) each tile loads its own and Triton's software pipeliner keeps PIPE tiles in flight
        # (K, KW, KWS stay specialized so that Triton can prove 16-byte alignment and vectorize); the
        # weights are read once for all input rows. Per word position j: t += c_j · x_j elementwise over
        # (rows, words); the grid is applied per word, per group of the tile (s · (t − z · Σ x)), or, with
        # one group per row (GRID 3), once at the end.
        # GRID: 0 groups change inside words (grid per weight), 1 per word, 2 per group tile, 3 per row,
        # 4 per group tile applied per word (the sums across the tile's words wait until the end).
        # EVEN: every k-split is whole tiles of whole words, so only rows are masked (no compare per word).
        PER: tl.constexpr = 32 // BITS
        rn = pid_n * BN + tl.arange(0, BN)
        n_mask = rn < N
        w_lo = pid_k * KWS
        w_hi = tl.minimum(w_lo + KWS, KW)
        if GRID == 2:
            acc = tl.zeros((BN, NGT), dtype=tl.float32)
        else:
            acc = tl.zeros((BN, BW), dtype=tl.float32)
        xacc = tl.zeros((BW,), dtype=tl.float32)
        bias = tl.zeros((BN,), dtype=tl.float32)
        if HAS_BIAS:  # added by the first k-split only
            bias = tl.load(BIAS + rn, mask=n_mask, other=0.0).to(tl.float32)
            bias = tl.where(pid_k == 0, bias, 0.0)
        s_row = tl.zeros((BN,), dtype=tl.float32)
        z_row = tl.zeros((BN,), dtype=tl.float32)
        if GRID == 3:
            s_row = tl.load(S + rn * ssn, mask=n_mask, other=0.0).to(tl.float32)
            z_row = tl.load(Z + rn * ssn, mask=n_mask, other=0.0).to(tl.float32)
        if PIPE > 0:
            for w0 in tl.range(w_lo, w_hi, BW, num_stages=PIPE):
                rw, w_mask, words, s, z = _gemv_tile(C, scn, rn, n_mask, w0, w_hi, S, Z, ssn, K, GS, s_row, z_row,
                                                     EVEN, PER, GRID, NGT, BW)
                acc, xacc = _gemv_step(acc, xacc, words, s, z, rw, w_mask, w0 == w_lo, X, sxm, sxk, Y, sym, M, rn,
                                       n_mask, S, Z, ssn, COLS, K, GS, bias, s_row, z_row, BITS, HAS_COLS, GRID,
                                       NGT, ONE_ROW, BN, BW, UNPACK3)
        else:
            rw, w_mask, words, s, z = _gemv_tile(C, scn, rn, n_mask, w_lo, w_hi, S, Z, ssn, K, GS, s_row, z_row,
                                                 EVEN, PER, GRID, NGT, BW)
            for w0 in range(w_lo, w_hi, BW):
                nxt = _gemv_tile(C, scn, rn, n_mask, w0 + BW, w_hi, S, Z, ssn, K, GS, s_row, z_row,
                                 EVEN, PER, GRID, NGT, BW)
                acc, xacc = _gemv_step(acc, xacc, words, s, z, rw, w_mask, w0 == w_lo, X, sxm, sxk, Y, sym, M, rn,
                                       n_mask, S, Z, ssn, COLS, K, GS, bias, s_row, z_row, BITS, HAS_COLS, GRID,
                                       NGT, ONE_ROW, BN, BW, UNPACK3)
                rw, w_mask, words, s, z = nxt
        if ONE_ROW:
            out = tl.sum(acc, axis=1)
            if GRID == 3:
                out = s_row * (out - z_row * tl.sum(xacc, axis=0))
            out += bias
            if ATOMIC:
                tl.atomic_add(Y + rn, out, mask=n_mask)
            else:
                tl.store(Y + rn, out.to(Y.dtype.element_ty), mask=n_mask)

    @triton.jit(do_not_specialize=["M", "N", "GS"])
    def _gemv_kernel(X, sxm, sxk, Y, sym, BIAS, M, N, C, scn, S, Z, ssn, COLS, K, KW, KWS, GS,
                     BITS: tl.constexpr, HAS_COLS: tl.constexpr, GRID: tl.constexpr, NGT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, ONE_ROW: tl.constexpr,
                     BN: tl.constexpr, BW: tl.constexpr, UNPACK3: tl.constexpr, PIPE: tl.constexpr,
                     EVEN: tl.constexpr):
        _gemv_body(tl.program_id(0), tl.program_id(1), X, sxm, sxk, Y, sym, BIAS, M, N, C, scn, S, Z, ssn, COLS,
                   K, KW, KWS, GS, BITS, HAS_COLS, GRID, NGT, HAS_BIAS, ATOMIC, ONE_ROW, BN, BW, UNPACK3, PIPE, EVEN)

    @triton.jit(do_not_specialize=["M", "N", "GSA", "GSB"])
    def _cat_kernel(X, sxm, sxk, Y, sym, BIAS, M, N, SPLIT_A,
                    CA, scna, SA, ZA, ssna, KA, KWA, KWSA, GSA,
                    CB, scnb, SB, ZB, ssnb, KB, KWB, KWSB, GSB,
                    BITS_A: tl.constexpr, GRID_A: tl.constexpr, NGT_A: tl.constexpr, BW_A: tl.constexpr,
                    BITS_B: tl.constexpr, GRID_B: tl.constexpr, NGT_B: tl.constexpr, BW_B: tl.constexpr,
                    TC: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_ROW: tl.constexpr, IEEE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, UNPACK3: tl.constexpr, PIPE: tl.constexpr):
        # A channel-mixed layer in one launch. Its input is gathered into [part A's columns | part B's]; the
        # first SPLIT_A k-splits of every n-tile read part A, the others part B, all adding into Y (float32):
        # each part on the GEMV (TC false) or on tensor cores (TC: sdot tiles of BW_A / BW_B words).
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        if pid_k < SPLIT_A:
            if TC:
                _sdot_body(pid_n, pid_k, X, sxm, sxk, Y, sym, BIAS, M, N, CA, scna, SA, ZA, ssna, KA, KWA, KWSA,
                           GSA, BITS_A, HAS_BIAS, True, IEEE, NGT_A, BM, BN, BW_A, PIPE)
            else:
                _gemv_body(pid_n, pid_k, X, sxm, sxk, Y, sym, BIAS, M, N, CA, scna, SA, ZA, ssna, CA, KA, KWA,
                           KWSA, GSA, BITS_A, False, GRID_A, NGT_A, HAS_BIAS, True, ONE_ROW, BN, BW_A, UNPACK3,
                           PIPE, False)
        else:
            XB = X + KA * sxk
            if TC:
                _sdot_body(pid_n, pid_k - SPLIT_A, XB, sxm, sxk, Y, sym, BIAS, M, N, CB, scnb, SB, ZB, ssnb, KB,
                           KWB, KWSB, GSB, BITS_B, False, True, IEEE, NGT_B, BM, BN, BW_B, PIPE)
            else:
                _gemv_body(pid_n, pid_k - SPLIT_A, XB, sxm, sxk, Y, sym, BIAS, M, N, CB, scnb, SB, ZB, ssnb, CB,
                           KB, KWB, KWSB, GSB, BITS_B, False, GRID_B, NGT_B, False, True, ONE_ROW, BN, BW_B,
                           UNPACK3, PIPE, False)

    @triton.jit(do_not_specialize=["M", "N", "GS"])
    def _gemv_rows_kernel(X, sxm, sxk, Y, sym, BIAS, M, N, C, scn, S, Z, ssn, COLS, META, smn, K, KW, KWS, GS,
                          BITS: tl.constexpr, HAS_COLS: tl.constexpr, HAS_META: tl.constexpr, GRID: tl.constexpr,
                          NGT: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, MR: tl.constexpr,
                          BN: tl.constexpr, BW: tl.constexpr):
        # _gemv_kernel for a few input rows: each word tile is unpacked once for all MR rows (the one-row
        # kernel unpacks it again per row), products accumulated as (MR, BN, BW). GRID and NGT as in
        # _gemv_kernel. HAS_META: 2:4-sparse codes, the kept two of every four columns; kept code k reads
        # input column 4·(k // 2) + its 2-bit position (16 per META word): the four inputs of its group are
        # loaded once for all weight rows and each row selects its own (XN = BN inputs per row, not 1), so
        # no load is gathered per weight.
        PER: tl.constexpr = 32 // BITS
        XN: tl.constexpr = BN if HAS_META else 1
        pid_k, rn, n_mask, rm, m_mask, w_lo, w_hi = _split_program(M, N, KW, KWS, MR, BN)
        acc = tl.zeros((MR, BN), dtype=tl.float32)
        xacc = tl.zeros((MR, XN), dtype=tl.float32)
        for w0 in range(w_lo, w_hi, BW):
            rw = w0 + tl.arange(0, BW)
            w_mask = rw < w_hi
            nw_mask = n_mask[:, None] & w_mask[None, :]
            words = tl.load(C + rn[:, None] * scn + rw[None, :], mask=nw_mask, other=0)
            t = tl.zeros((MR, BN, BW), dtype=tl.float32)
            xs = tl.zeros((MR, XN, BW), dtype=tl.float32)
            for j in tl.static_range(PER):
                k, k_mask, xc = _position(rw, w_mask, j, PER, K, COLS, HAS_COLS)
                if HAS_META:
                    mw = tl.load(META + rn[:, None] * smn + (k // 16)[None, :], mask=n_mask[:, None] & k_mask[None, :],
                                 other=0)
                    pos = ((mw >> ((k % 16) * 2)[None, :]) & 3)[None, :, :]
                    if j % 2 == 0:  # codes 2i and 2i + 1 (PER is even) select from the same four inputs
                        xp = X + rm[:, None] * sxm + (4 * (k // 2))[None, :] * sxk
                        mk = m_mask[:, None] & k_mask[None, :]
                        x0 = tl.load(xp, mask=mk, other=0.0).to(tl.float32)[:, None, :]
                        x1 = tl.load(xp + sxk, mask=mk, other=0.0).to(tl.float32)[:, None, :]
                        x2 = tl.load(xp + 2 * sxk, mask=mk, other=0.0).to(tl.float32)[:, None, :]
                        x3 = tl.load(xp + 3 * sxk, mask=mk, other=0.0).to(tl.float32)[:, None, :]
                    xj = tl.where(pos < 2, tl.where(pos == 0, x0, x1), tl.where(pos == 2, x2, x3))
                else:
                    xj = tl.load(X + rm[:, None] * sxm + xc[None, :] * sxk, mask=m_mask[:, None] & k_mask[None, :],
                                 other=0.0).to(tl.float32)[:, None, :]
                f = _code_at(words, j, BITS)
                if GRID == 0:  # groups change inside a word: the grid per weight
                    sw, zw = _weight_grid(S, Z, ssn, rn, n_mask, k, k_mask, GS)
                    t += ((f * _inv_shift(j, BITS) - zw) * sw)[None, :, :] * xj
                else:
                    t += f[None, :, :] * (xj * _inv_shift(j, BITS))
                    xs += xj
            if GRID == 1:
                g = (rw * PER) // GS
                sw = tl.load(S + rn[:, None] * ssn + g[None, :], mask=nw_mask, other=0.0).to(tl.float32)
                zw = tl.load(Z + rn[:, None] * ssn + g[None, :], mask=nw_mask, other=0.0).to(tl.float32)
                acc += tl.sum(sw[None, :, :] * (t - zw[None, :, :] * xs), axis=2)
            elif GRID == 2 and NGT == 1:
                g = (w0 * PER) // GS
                s1 = tl.load(S + rn * ssn + g, mask=n_mask, other=0.0).to(tl.float32)
                z1 = tl.load(Z + rn * ssn + g, mask=n_mask, other=0.0).to(tl.float32)
                acc += s1[None, :] * (tl.sum(t, axis=2) - z1[None, :] * tl.sum(xs, axis=2))
            elif GRID == 2:  # the tile holds NGT whole groups: sum each group's words, then its grid
                g = (w0 * PER) // GS + tl.arange(0, NGT)
                ng_mask = n_mask[:, None] & (g * GS < K)[None, :]
                sg = tl.load(S + rn[:, None] * ssn + g[None, :], mask=ng_mask, other=0.0).to(tl.float32)
                zg = tl.load(Z + rn[:, None] * ssn + g[None, :], mask=ng_mask, other=0.0).to(tl.float32)
                tg = tl.sum(tl.reshape(t, (MR, BN, NGT, BW // NGT)), axis=3)
                xg = tl.sum(tl.reshape(xs, (MR, XN, NGT, BW // NGT)), axis=3)
                acc += tl.sum(sg[None, :, :] * (tg - zg[None, :, :] * xg), axis=2)
            else:
                acc += tl.sum(t, axis=2)
                xacc += tl.sum(xs, axis=2)
        if GRID == 3:
            s_row = tl.load(S + rn * ssn, mask=n_mask, other=0.0).to(tl.float32)
            z_row = tl.load(Z + rn * ssn, mask=n_mask, other=0.0).to(tl.float32)
            acc = s_row[None, :] * (acc - z_row[None, :] * xacc)
        _store_split(acc, Y, sym, BIAS, rm, rn, m_mask, n_mask, pid_k, HAS_BIAS, ATOMIC)

    @triton.jit
    def _word_tile(C, scn, rn, n_mask, w0, w_hi, BW: tl.constexpr):
        """The (BN, BW) int32 words of rows rn from word w0 (zeros past w_hi)."""
        rw = w0 + tl.arange(0, BW)
        return tl.load(C + rn[:, None] * scn + rw[None, :], mask=n_mask[:, None] & (rw < w_hi)[None, :], other=0)

    @triton.jit
    def _sdot_step(acc, words, w0, X, sxm, sxk, rm, m_mask, k_hi, S, Z, ssn, rn, n_mask, s, z, K, GS,
                   BITS: tl.constexpr, IEEE: tl.constexpr, NGT: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
        """acc += x · wᵀ for the (BN, BW) word tile ``words`` at word ``w0`` (see _sdot_kernel)."""
        PER: tl.constexpr = 32 // BITS
        BK: tl.constexpr = BW * PER
        rk = w0 * PER + tl.arange(0, BK)
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=m_mask[:, None] & (rk < k_hi)[None, :],
                    other=0.0)
        f = _split_codes(words, BITS)
        f = tl.reshape(f, (BN, BK))
        if NGT <= 1:
            if NGT == 1:
                g = (w0 * PER) // GS
                s = tl.load(S + rn * ssn + g, mask=n_mask, other=0.0).to(tl.float32)
                z = tl.load(Z + rn * ssn + g, mask=n_mask, other=0.0).to(tl.float32)
            w = (f - z[:, None]) * s[:, None]
        else:
            g = (w0 * PER) // GS + tl.arange(0, NGT)
            gm = n_mask[:, None] & (g * GS < K)[None, :]
            sg = tl.load(S + rn[:, None] * ssn + g[None, :], mask=gm, other=0.0).to(tl.float32)
            zg = tl.load(Z + rn[:, None] * ssn + g[None, :], mask=gm, other=0.0).to(tl.float32)
            f = tl.reshape(f, (BN, NGT, BK // NGT))
            w = tl.reshape((f - zg[:, :, None]) * sg[:, :, None], (BN, BK))
        return _dot_wt(acc, x, w, IEEE)

    @triton.jit
    def _sdot_body(pid_n, pid_k, X, sxm, sxk, Y, sym, BIAS, M, N, C, scn, S, Z, ssn, K, KW, KWS, GS,
                   BITS: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr,
                   NGT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, PIPE: tl.constexpr):
        # Tensor cores for a few input rows: program (n-tile, k-split) unpacks each (BN, BW) word tile once
        # into its (BN, BW·per) weights and multiplies every input row with it. NGT: groups per k-tile (0:
        # one group per row; 1: the tile lies inside one group; more: the tile holds NGT whole groups). Words
        # are unpacked by joining halves (_split_codes), so the reshape to (BN, BK) moves no data; a 3-D
        # broadcast unpack spilled. Loads: the next tile's words before this one is used, or (PIPE) each
        # tile's own, left to Triton's software pipeliner (num_stages tiles in flight).
        PER: tl.constexpr = 32 // BITS
        rn, n_mask, rm, m_mask, w_lo, w_hi = _split_tile(pid_n, pid_k, 0, M, N, KW, KWS, BM, BN)
        k_hi = tl.minimum(w_hi * PER, K)
        s = tl.zeros((BN,), dtype=tl.float32)
        z = tl.zeros((BN,), dtype=tl.float32)
        if NGT == 0:
            s = tl.load(S + rn * ssn, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(Z + rn * ssn, mask=n_mask, other=0.0).to(tl.float32)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if PIPE:
            for w0 in range(w_lo, w_hi, BW):
                words = _word_tile(C, scn, rn, n_mask, w0, w_hi, BW)
                acc = _sdot_step(acc, words, w0, X, sxm, sxk, rm, m_mask, k_hi, S, Z, ssn, rn, n_mask, s, z, K, GS,
                                 BITS, IEEE, NGT, BN, BW)
        else:
            words = _word_tile(C, scn, rn, n_mask, w_lo, w_hi, BW)
            for w0 in range(w_lo, w_hi, BW):
                words_n = _word_tile(C, scn, rn, n_mask, w0 + BW, w_hi, BW)
                acc = _sdot_step(acc, words, w0, X, sxm, sxk, rm, m_mask, k_hi, S, Z, ssn, rn, n_mask, s, z, K, GS,
                                 BITS, IEEE, NGT, BN, BW)
                words = words_n
        _store_split(acc, Y, sym, BIAS, rm, rn, m_mask, n_mask, pid_k, HAS_BIAS, ATOMIC)

    @triton.jit(do_not_specialize=["M", "N", "GS"])
    def _sdot_kernel(X, sxm, sxk, Y, sym, BIAS, M, N, C, scn, S, Z, ssn, K, KW, KWS, GS,
                     BITS: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr,
                     NGT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, PIPE: tl.constexpr):
        _sdot_body(tl.program_id(0), tl.program_id(1), X, sxm, sxk, Y, sym, BIAS, M, N, C, scn, S, Z, ssn, K, KW,
                   KWS, GS, BITS, HAS_BIAS, ATOMIC, IEEE, NGT, BM, BN, BW, PIPE)

    @triton.jit(do_not_specialize=["M", "N", "GS"])
    def _pdot_kernel(X, sxm, sxk, Y, sym, BIAS, M, N, C, scn, S, Z, ssn, COLS, K, KW, KWS, GS,
                     BITS: tl.constexpr, HAS_COLS: tl.constexpr, GRID: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ATOMIC: tl.constexpr, IEEE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
        # Tensor-core product over word tiles, program (m-tile · n-tile, k-split): for each word position j,
        # the (BN, BW) weights of code j (dequantized exactly: fma(c·2^sh, s·2^-sh, −z·s) = s·(c − z)) meet
        # the input columns rw·per + j in one tl.dot — no reshape of the unpacked codes. The next tile's
        # words are loaded before this one is used. GRID as in _gemv_kernel: 0 groups change inside words,
        # 1 per word, 2 the tile lies inside one group (one scale per row), 3 one group per row.
        PER: tl.constexpr = 32 // BITS
        n_tiles = tl.cdiv(N, BN)
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = (pid % n_tiles) * BN + tl.arange(0, BN)
        rm = (pid // n_tiles) * BM + tl.arange(0, BM)
        m_mask = rm < M
        n_mask = rn < N
        w_lo = pid_k * KWS
        w_hi = tl.minimum(w_lo + KWS, KW)
        rw = w_lo + tl.arange(0, BW)
        w_mask = rw < w_hi
        words = tl.load(C + rn[:, None] * scn + rw[None, :], mask=n_mask[:, None] & w_mask[None, :], other=0)
        if GRID == 3:
            s = tl.load(S + rn * ssn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            z = tl.load(Z + rn * ssn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for w0 in range(w_lo, w_hi, BW):
            rw_n = rw + BW
            w_mask_n = rw_n < w_hi
            words_n = tl.load(C + rn[:, None] * scn + rw_n[None, :], mask=n_mask[:, None] & w_mask_n[None, :],
                              other=0)
            if GRID == 1:
                g = (rw * PER) // GS
                nw_mask = n_mask[:, None] & w_mask[None, :]
                s = tl.load(S + rn[:, None] * ssn + g[None, :], mask=nw_mask, other=0.0).to(tl.float32)
                z = tl.load(Z + rn[:, None] * ssn + g[None, :], mask=nw_mask, other=0.0).to(tl.float32)
            elif GRID == 2:
                g = (w0 * PER) // GS
                s = tl.load(S + rn * ssn + g, mask=n_mask, other=0.0).to(tl.float32)[:, None]
                z = tl.load(Z + rn * ssn + g, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            for j in tl.static_range(PER):
                k, k_mask, xc = _position(rw, w_mask, j, PER, K, COLS, HAS_COLS)
                x = tl.load(X + rm[:, None] * sxm + xc[None, :] * sxk, mask=m_mask[:, None] & k_mask[None, :],
                            other=0.0)
                f = _code_at(words, j, BITS)
                if GRID == 0:
                    sj, zj = _weight_grid(S, Z, ssn, rn, n_mask, k, k_mask, GS)
                    w = (f * _inv_shift(j, BITS) - zj) * sj
                else:
                    w = tl.fma(f, s * _inv_shift(j, BITS), -(z * s))
                acc = _dot_wt(acc, x, w, IEEE)
            words, rw, w_mask = words_n, rw_n, w_mask_n
        _store_split(acc, Y, sym, BIAS, rm, rn, m_mask, n_mask, pid_k, HAS_BIAS, ATOMIC)

    @triton.jit(do_not_specialize=["N", "K", "KW", "GS", "col0"])
    def _dequant_words_kernel(C, scn, S, Z, ssn, OUT, son, col0, N, K, KW, GS,
                              BITS: tl.constexpr, NGT: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
        # Prefill's dequantization, bound by the bytes it writes: each word is read once and unpacked into
        # its codes in registers, one scale / zero point per row and group of the tile (NGT: groups per
        # tile; 0 one group per row), the (BN, BW·per) tile stored at once. Only for 2, 4 and 8 bits.
        PER: tl.constexpr = 32 // BITS
        BK: tl.constexpr = BW * PER
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rw = tl.program_id(1) * BW + tl.arange(0, BW)
        n_mask = rn < N
        words = tl.load(C + rn[:, None] * scn + rw[None, :], mask=n_mask[:, None] & (rw < KW)[None, :], other=0)
        f = _split_codes(words, BITS)
        k0 = tl.program_id(1) * BK
        if NGT <= 1:
            g = k0 // GS  # NGT 0: GS is past the last column, so every k is in group 0
            s = tl.load(S + rn * ssn + g, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(Z + rn * ssn + g, mask=n_mask, other=0.0).to(tl.float32)
            w = (tl.reshape(f, (BN, BK)) - z[:, None]) * s[:, None]
        else:
            g = k0 // GS + tl.arange(0, NGT)
            gm = n_mask[:, None] & (g * GS < K)[None, :]
            s = tl.load(S + rn[:, None] * ssn + g[None, :], mask=gm, other=0.0).to(tl.float32)
            z = tl.load(Z + rn[:, None] * ssn + g[None, :], mask=gm, other=0.0).to(tl.float32)
            w = tl.reshape((tl.reshape(f, (BN, NGT, BK // NGT)) - z[:, :, None]) * s[:, :, None], (BN, BK))
        rk = k0 + tl.arange(0, BK)
        tl.store(OUT + rn[:, None] * son + (col0 + rk)[None, :], w.to(OUT.dtype.element_ty),
                 mask=n_mask[:, None] & (rk < K)[None, :])

    @triton.jit(do_not_specialize=["N", "K", "GS", "col0"])
    def _dequant_kernel(C, scn, S, Z, ssn, OUT, son, col0, N, K, GS, META, smn,
                        BITS: tl.constexpr, HAS_META: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # HAS_META: 2:4 codes, kept code k stored at column 4·(k // 2) + its position (the caller zeroes
        # the pruned ones)
        PER: tl.constexpr = 32 // BITS
        LOW: tl.constexpr = (1 << BITS) - 1
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        mask = (rn < N)[:, None] & (rk < K)[None, :]
        word = tl.load(C + rn[:, None] * scn + (rk // PER)[None, :], mask=mask, other=0)
        code = ((word >> ((rk % PER) * BITS)[None, :]) & LOW).to(tl.float32)
        g = rk // GS
        s = tl.load(S + rn[:, None] * ssn + g[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(Z + rn[:, None] * ssn + g[None, :], mask=mask, other=0.0).to(tl.float32)
        w = (code - z) * s
        if HAS_META:
            mw = tl.load(META + rn[:, None] * smn + (rk // 16)[None, :], mask=mask, other=0)
            col = 4 * (rk // 2)[None, :] + ((mw >> ((rk % 16) * 2)[None, :]) & 3)
        else:
            col = rk[None, :]
        tl.store(OUT + rn[:, None] * son + col0 + col, w.to(OUT.dtype.element_ty), mask=mask)


# ---- launch configurations -----------------------------------------------------------------------

def _override(M: int) -> dict | None:
    """PRUNEQUANT_WMM_TILES="BM,BN,BK,warps,stages" (for M <= 16) / PRUNEQUANT_WMM_TILES_LARGE (M > 64):
    dot-kernel tiles to use without tuning."""
    key = "PRUNEQUANT_WMM_TILES" if M <= 16 else ("PRUNEQUANT_WMM_TILES_LARGE" if M > 64 else None)
    val = os.environ.get(key) if key else None
    if not val:
        return None
    bm, bn, bk, w, st = (int(v) for v in val.split(","))
    return {"kind": "dot", "BM": bm, "BN": bn, "BK": bk, "num_warps": w, "num_stages": st}


def launch_config(M: int, N: int) -> dict:
    """Untuned dot-kernel tiles by the number of input rows (used under the interpreter, during CUDA-graph
    capture of a shape never tuned, and as the tuner's first candidate)."""
    cfg = _override(M)
    if cfg is not None:
        return cfg
    if M <= 16:
        bn = 16 if N <= 2048 else (32 if N <= 4096 else 64)
        return {"kind": "dot", "BM": 16, "BN": bn, "BK": 128, "num_warps": 4, "num_stages": 4}
    if M <= 64:
        return {"kind": "dot", "BM": 32 if M <= 32 else 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 3}
    return {"kind": "dot", "BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}


def _gemv_candidates(M: int, N: int, seg) -> list[dict]:
    """Decode tiles (rows × words per load) and k-splits: enough programs to keep the memory system busy,
    never a split shorter than one tile. The next tile is prefetched by hand, or (PIPE) 3-4 tiles are kept
    in flight by Triton's software pipeliner."""
    kw = seg.codes.shape[1]
    out = []
    # EVEN: no mask along the words where the splits allow it (the compiler then schedules the loads
    # differently: sm_90 registers 80 → 148 for 16 × 128, 128 → 96 for 8 × 256), so it is timed, not assumed.
    # WG: a tile's group scales applied per word, its sums left to the end (no sums across lanes per trip:
    # 55.8 → 48.8 sm_90 instructions per word for 16 × 128, BENCHMARKS "What the one-row GEMV issues").
    for bn, bw, warps, extra in ((16, 128, 4, {}), (8, 256, 4, {}), (8, 128, 4, {}), (4, 256, 4, {}),
                                 (16, 256, 8, {}), (8, 128, 4, {"U3": True}), (32, 128, 4, {}), (64, 64, 8, {}),
                                 (16, 128, 4, {"EVEN": True}), (8, 256, 4, {"EVEN": True}),
                                 (16, 128, 4, {"WG": True}), (16, 256, 8, {"WG": True}),
                                 (16, 64, 4, {"PIPE": 4}), (16, 128, 4, {"PIPE": 3}), (8, 128, 4, {"PIPE": 4}),
                                 (32, 64, 4, {"PIPE": 3}), (8, 256, 4, {"PIPE": 3, "EVEN": True}),
                                 (16, 128, 8, {"PIPE": 4}), (16, 128, 4, {"PIPE": 3, "WG": True})):
        pipe = extra.get("PIPE", 0)
        if extra.get("U3") and (seg.cols is not None or 32 % seg.bits):
            continue
        if pipe and M > 1:  # the row loop is not pipelined
            continue
        c = dict({"kind": "gemv", "BN": bn, "BW": bw, "num_warps": warps, "num_stages": pipe or 1, "U3": False},
                 **extra)
        out += _gemv_splits(c, kw, triton.cdiv(N, bn))
    return out


def _gemv_splits(tile: dict, kw: int, tiles: int) -> list[dict]:
    """``tile`` with k-splits 1, 2, 4, 8: never a split shorter than one tile, at most 8192 programs."""
    return [dict(tile, SPLIT=split) for split in (1, 2, 4, 8)
            if split == 1 or (kw >= split * tile["BW"] and tiles * split <= 8192)]


def _gemv_rows_candidates(M: int, N: int, seg) -> list[dict]:
    """Few-row GEMV tiles (2-16 rows; 1-32 for 2:4 codes, which only this kernel reads)."""
    sparse24 = getattr(seg, "meta", None) is not None
    if not (1 if sparse24 else 2) <= M <= (ROWS_MAX if sparse24 else 16):
        return []
    kw = seg.codes.shape[1]
    out = []
    for bn, bw, warps in ((8, 16, 4), (16, 16, 4), (32, 16, 8), (16, 32, 8), (8, 32, 4), (16, 8, 4), (32, 8, 4)):
        out += _gemv_splits({"kind": "gemvr", "BN": bn, "BW": bw, "num_warps": warps, "num_stages": 2}, kw,
                            triton.cdiv(N, bn))
    if M > 8:  # blocks of 8 or 4 rows, each program reading the weights again (all rows at once spill)
        out += [dict(c, MR=mr) for mr in (8, 4) for c in out if c["SPLIT"] == 1]
    return out


ROWS_MAX = 32  # input rows the few-row GEMV takes


ROWS_DEFAULT = {"kind": "gemvr", "BN": 16, "BW": 8, "SPLIT": 1, "MR": 8, "num_warps": 4, "num_stages": 2}  # untuned


def _sdot_candidates(M: int, N: int, seg) -> list[dict]:
    """Tensor-core tiles for a few rows: k-tiles of 128 or 256 columns, inside one group or holding whole
    groups (the four tiles that won every 8- and 32-row shape of BENCHMARKS run 6), with the next tile
    prefetched by hand or (PIPE) 3-4 tiles in flight through Triton's software pipeliner."""
    bm = max(16, _pow2(M))
    if seg.bits not in (2, 4, 8) or seg.cols is not None or bm > 64:
        return []
    per, kw = per_word(seg.bits), seg.codes.shape[1]
    out = []
    for bk, bn, pipe in ((128, 16, 0), (128, 32, 0), (128, 64, 0), (256, 32, 0), (128, 32, 3), (128, 64, 4),
                         (256, 32, 3)):
        if _tile_groups(seg.group_size, bk) is None:
            continue
        bw = bk // per
        for split in (1, 2, 4, 8):
            if split > 1 and (kw < 2 * split * bw or triton.cdiv(N, bn) * split > 4096):
                break
            c = {"kind": "sdot", "BM": bm, "BN": bn, "BW": bw, "SPLIT": split, "num_warps": 4, "num_stages": 2}
            out.append(dict(c, PIPE=True, num_stages=pipe) if pipe else c)
    return out


def _pdot_candidates(M: int, N: int, seg) -> list[dict]:
    """Per-position tensor-core tiles (no reshape of the unpacked codes), with k-splits for few rows."""
    bm = max(16, _pow2(M))
    if bm > 64:
        return []
    kw = seg.codes.shape[1]
    out = []
    for bn, bw, warps, stages in ((32, 16, 4, 3), (64, 32, 8, 3), (16, 16, 4, 2), (32, 32, 4, 2)):
        tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
        for split in (1, 2, 4, 8):
            if split > 1 and (kw < 2 * split * bw or tiles * split > 4096):
                break
            out.append({"kind": "pdot", "BM": bm, "BN": bn, "BW": bw, "SPLIT": split, "num_warps": warps,
                        "num_stages": stages})
    return out


def _dot_candidates(M: int) -> list[dict]:
    bm = max(16, _pow2(M))
    if bm > 64:
        return [launch_config(M, 0)]
    return [{"kind": "dot", "BM": bm, "BN": bn, "BK": bk, "num_warps": w, "num_stages": st}
            for bn, bk, w, st in ((32, 128, 4, 4), (64, 64, 4, 4))]


# ---- tuning cache --------------------------------------------------------------------------------

_TUNED: dict[str, dict] = {}
TRIALS: list[dict] = []  # every timed candidate of this process (benchmarks report them)
TUNE_SPLIT_LEADERS = 2  # unsplit tiles whose k-splits are timed too
_LOADED = [False]


def _cache_path() -> Path | None:
    p = os.environ.get("PRUNEQUANT_TILE_CACHE")
    if p == "":
        return None
    return Path(p) if p else Path.home() / ".cache" / "prunequant" / "tiles.json"


def _load_cache() -> None:
    if _LOADED[0]:
        return
    _LOADED[0] = True
    p = _cache_path()
    if p is not None and p.is_file():
        try:
            _TUNED.update(json.loads(p.read_text()))
        except (OSError, ValueError):  # a damaged cache is only lost tuning: start afresh
            pass


def _save_cache() -> None:
    p = _cache_path()
    if p is None:
        return
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_TUNED, indent=0, sort_keys=True))
        os.replace(tmp, p)
    except OSError:
        pass


def _bucket(M: int) -> int:
    return M if M <= 8 else _pow2(M)


def _size_bucket(n: int) -> int:
    """``n`` rounded up to an eighth of the power of two above it: a channel-mixed or non-uniformly pruned
    model gives each layer its own column counts, and tuning each one alone would time hundreds of
    layers that want the same tiles (every configuration is valid for every size: splits follow K)."""
    step = max(1, _pow2(n) // 8)
    return -(-int(n) // step) * step


_DEVICE_NAMES: dict[int, str] = {}


def _device_name(t: torch.Tensor) -> str:
    if not t.is_cuda:
        return t.device.type
    i = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if i not in _DEVICE_NAMES:  # the query is slow; the forward of every layer asks
        _DEVICE_NAMES[i] = torch.cuda.get_device_name(i)
    return _DEVICE_NAMES[i]


def tune_key(x: torch.Tensor, segments: list, N: int, has_bias: bool) -> str:
    dev = _device_name(x)
    segs = ";".join(f"{s.bits}b,g{s.group_size},k{_size_bucket(s.k)},{'cols' if s.cols is not None else 'all'}"
                    + (",2:4" if getattr(s, "meta", None) is not None else "") for s in segments)
    dtype = str(x.dtype).replace("torch.", "")
    return f"{dev}|m{_bucket(x.shape[0])}|n{_size_bucket(N)}|{segs}|{dtype}|{'bias' if has_bias else ''}"


_UNTUNED = [0]


@contextlib.contextmanager
def untuned():
    """Run with the default tiles, tuning nothing: load-time probes check the kernel's arithmetic at a
    row count decode never uses, and tuning there would compile every candidate for nothing (each
    candidate is checked against the default tiles' output when it is tuned)."""
    _UNTUNED[0] += 1
    try:
        yield
    finally:
        _UNTUNED[0] -= 1


def _tuning_allowed(x: torch.Tensor) -> bool:
    if not x.is_cuda or _UNTUNED[0] or os.environ.get("PRUNEQUANT_TUNE", "1") == "0":
        return False
    return not torch.cuda.is_current_stream_capturing()


_FLUSH: dict[torch.device, torch.Tensor] = {}


def graph_time_us(fn, calls: int = 20, replays: int = 5) -> float:
    """GPU microseconds of one ``fn()`` as decode runs it: launched from a CUDA graph (no Python launch
    cost, which would otherwise dominate a few-microsecond kernel) after the L2 cache is flushed (decode
    reads every layer's weights once per token); the flush's own time is measured alone and taken off."""
    dev = torch.device("cuda", torch.cuda.current_device())
    if dev not in _FLUSH:
        _FLUSH[dev] = torch.empty(256 << 20, dtype=torch.int8, device=dev)
    buf = _FLUSH[dev]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and allocate outside the capture
        graphs = []
        for with_fn in (False, True):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream):
                for _ in range(calls):
                    buf.zero_()
                    if with_fn:
                        fn()
            graphs.append(g)
    torch.cuda.current_stream().wait_stream(stream)
    times = []
    for g in graphs:
        g.replay()
        ts = []
        for _ in range(replays):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        times.append(sorted(ts)[len(ts) // 2])
    return max(times[1] - times[0], 0.0) * 1e3 / calls


def _time(fn) -> float:
    return graph_time_us(fn) / 1e3


def tuned(x: torch.Tensor, segments: list, N: int, bias) -> dict:
    """The launch configuration for this input: cached, else timed over the candidates (the fastest whose
    output matches the untuned kernel's), else the untuned default."""
    M = x.shape[0]
    sparse24 = getattr(segments[0], "meta", None) is not None
    env = None if sparse24 else _override(M)
    if env is not None:
        return env
    _load_cache()
    key = tune_key(x, segments, N, bias is not None)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    default = dict(ROWS_DEFAULT) if sparse24 else launch_config(M, N)
    if not _tuning_allowed(x):
        return default
    if sparse24:
        cands = [default] + _gemv_rows_candidates(M, N, segments[0])
    elif len(segments) == 1:
        seg = segments[0]
        # one row: only the GEMV can win (a tensor-core tile would waste 15 of its 16 rows)
        cands = [default] + (_gemv_candidates(M, N, seg) if M <= 8 else []) + _gemv_rows_candidates(M, N, seg) + \
            (_sdot_candidates(M, N, seg) + _pdot_candidates(M, N, seg) if M > 1 else [])
    else:  # a channel-mixed layer: one launch (over column-indexed or gathered inputs), or each part alone
        cands = [default] + _dot_candidates(M) + [{"kind": "split"}, {"kind": "split", "GATHER": True}] + \
            _cat_candidates(M, N, segments)
    ref = run(x, segments, N, bias, default).float()
    tol = 1e-4 if x.dtype == torch.float32 else 1e-2
    times: dict[int, float] = {}

    def trial(i: int) -> None:
        c = cands[i]
        try:
            y = run(x, segments, N, bias, c).float()
            if float((y - ref).norm() / ref.norm().clamp_min(1e-30)) > tol:
                return
            t = _time(lambda: run(x, segments, N, bias, c))
        except Exception:  # noqa: BLE001 - a tile that does not fit this GPU (shared memory, registers)
            return
        TRIALS.append({"key": key, "cfg": c, "us": round(t * 1e3, 2)})
        times[i] = t

    # two stages (each candidate compiles a kernel): every tile unsplit, then the k-splits of the best tiles
    for i, c in enumerate(cands):
        if c.get("SPLIT", 1) == 1:
            trial(i)
    tile = lambda c: tuple(sorted((k, v) for k, v in c.items() if k != "SPLIT"))  # noqa: E731
    leaders = {tile(cands[i]) for i in sorted(times, key=times.get)[:TUNE_SPLIT_LEADERS]}
    for i, c in enumerate(cands):
        if c.get("SPLIT", 1) != 1 and tile(c) in leaders:
            trial(i)
    best_i = min(times, key=times.get) if times else None
    best, best_t = (cands[best_i], times[best_i]) if best_i is not None else (default, float("inf"))
    _TUNED[key] = dict(best, us=round(best_t * 1e3, 2))
    _save_cache()
    return _TUNED[key]


# ---- entry points --------------------------------------------------------------------------------

def _gs_arg(group_size: int, k: int, bk: int) -> tuple[int, bool]:
    """(group size passed to the kernel, whether every k-tile lies inside one group)."""
    if group_size <= 0:  # one group per row: any k lands in group 0
        return max(k, 1) + bk, True
    return group_size, group_size % bk == 0


def matmul(x: torch.Tensor, segments: list, out_features: int, bias: torch.Tensor | None = None,
           cfg: dict | None = None) -> torch.Tensor:
    """``x`` (M, K_in) 2-D; ``segments``: 1 or 2 objects with ``codes`` (N, words) int32, ``scale`` /
    ``zero`` (N, G), ``cols`` (K_s,) int32 or None, ``bits``, ``group_size``, ``k``."""
    if x.shape[0] == 0:
        return torch.empty((0, out_features), device=x.device, dtype=x.dtype)
    return run(x, segments, out_features, bias, cfg or tuned(x, segments, out_features, bias))


def run(x, segments, N, bias, cfg) -> torch.Tensor:
    kind = cfg["kind"]
    if kind == "gemv":
        return _gemv(x, segments[0], N, bias, cfg)
    if kind == "gemvr":
        return _gemv_rows(x, segments[0], N, bias, cfg)
    if kind == "pdot":
        return _pdot(x, segments[0], N, bias, cfg)
    if kind == "sdot":
        return _sdot(x, segments[0], N, bias, cfg)
    if kind == "cat":
        return _cat(x, segments, N, bias, cfg)
    if kind == "split":
        parts = [_gathered(x, s) if cfg.get("GATHER") else (x, s) for s in segments]
        y = matmul(parts[0][0], [parts[0][1]], N, bias)
        for xs, s in parts[1:]:
            y += matmul(xs, [s], N)
        return y
    return _dot(x, segments, N, bias, cfg)


def _gathered(x: torch.Tensor, seg):
    """The input columns ``seg`` reads, gathered once, and ``seg`` as a part over all of them: the kernels for
    contiguous columns (``sdot``'s tensor cores among them) then serve a channel-mixed part."""
    if seg.cols is None:
        return x, seg
    view = SimpleNamespace(codes=seg.codes, scale=seg.scale, zero=seg.zero, cols=None, bits=seg.bits,
                           group_size=seg.group_size, k=seg.k, meta=getattr(seg, "meta", None))
    return x.index_select(1, seg.cols), view


_PERMS: dict[tuple, tuple] = {}  # (cols A, cols B) → their concatenation, made once per layer pair


def _cat_input(x: torch.Tensor, a, b) -> torch.Tensor:
    """``x``'s columns in the order [a.cols | b.cols]: one gather for both parts of a channel-mixed layer."""
    key = (a.cols.data_ptr(), b.cols.data_ptr(), a.cols.numel(), b.cols.numel(), a.cols.device)
    hit = _PERMS.get(key)
    if hit is None:  # the entry keeps both column tensors alive, so their addresses cannot be reused
        hit = _PERMS[key] = (a.cols, b.cols, torch.cat((a.cols, b.cols)))
    return x.index_select(1, hit[2])


def _cat_splits(segments, split: int, bw: list[int]) -> list[tuple[int, int]]:
    """(words per k-split, k-splits) of each part: ``split`` programs per n-tile shared by word count."""
    kws = [s.codes.shape[1] for s in segments]
    out = []
    for kw, b in zip(kws, bw):
        n = max(1, round(split * kw / sum(kws)))
        per_split = triton.cdiv(triton.cdiv(kw, n), b) * b
        out.append((per_split, triton.cdiv(kw, per_split)))
    return out


def _cat(x, segments, N, bias, cfg) -> torch.Tensor:
    """A channel-mixed layer (two parts, each over its own input columns) in one launch: the input gathered
    once into the parts' column order, then _cat_kernel over contiguous columns (GEMV or sdot tiles)."""
    a, b = segments
    M = x.shape[0]
    xp = _cat_input(x, a, b)
    y = torch.zeros((M, N), device=x.device, dtype=torch.float32)
    if cfg["inner"] == "gemv":
        bws = [cfg["BW"], cfg["BW"]]
    else:
        if M > cfg["BM"]:
            raise ValueError(f"sdot tiles take up to {cfg['BM']} rows")
        bws = [cfg["BK"] // per_word(s.bits) for s in segments]
    (kwsa, sa), (kwsb, sb) = _cat_splits(segments, cfg["SPLIT"], bws)
    grid = (triton.cdiv(N, cfg["BN"]), sa + sb)
    gsa, gsb = (_word_groups(s)[0] for s in segments)
    args = (xp, xp.stride(0), xp.stride(1), y, y.stride(0), bias if bias is not None else y, M, N, sa,
            a.codes, a.codes.stride(0), a.scale, a.zero, a.scale.stride(0), a.k, a.codes.shape[1], kwsa, gsa,
            b.codes, b.codes.stride(0), b.scale, b.zero, b.scale.stride(0), b.k, b.codes.shape[1], kwsb, gsb)
    tc = cfg["inner"] != "gemv"
    if tc:
        (ga, na), (gb, nb) = ((0, _sdot_groups(s.group_size, cfg["BK"])) for s in segments)
    else:
        (ga, na), (gb, nb) = (_gemv_grid(s, cfg["BW"]) for s in segments)
    _cat_kernel[grid](*args, BITS_A=a.bits, GRID_A=ga, NGT_A=na, BW_A=bws[0], BITS_B=b.bits, GRID_B=gb, NGT_B=nb,
                      BW_B=bws[1], TC=tc, HAS_BIAS=bias is not None, ONE_ROW=M == 1, IEEE=x.dtype == torch.float32,
                      BM=cfg.get("BM", 16), BN=cfg["BN"], UNPACK3=cfg.get("U3", False), PIPE=cfg.get("PIPE", 0),
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.to(x.dtype)


def _cat_candidates(M: int, N: int, segments) -> list[dict]:
    """One-launch tiles for a channel-mixed layer: the GEMV's (one row) and sdot's (2-64 rows, 2-, 4-
    and 8-bit parts whose groups fit the k-tile); SPLIT programs per n-tile shared by the parts (each ≥ 1)."""
    if len(segments) != 2 or any(s.cols is None or getattr(s, "meta", None) is not None for s in segments):
        return []
    out = []
    if M == 1:  # at 2-8 rows the GEMV's row loop lost to sdot on every shape of BENCHMARKS run 6
        u3_ok = all(32 % s.bits == 0 for s in segments)
        for bn, bw, warps, u3 in ((16, 128, 4, False), (8, 256, 4, False), (8, 128, 4, False),
                                  (16, 256, 8, False), (8, 128, 4, True)):
            if u3 and not u3_ok:
                continue
            out += [{"kind": "cat", "inner": "gemv", "BN": bn, "BW": bw, "SPLIT": split, "num_warps": warps,
                     "num_stages": 1, "U3": u3} for split in (1, 2, 4, 8)]
    bm = max(16, _pow2(M))
    if 1 < M and bm <= 64 and all(s.bits in (2, 4, 8) for s in segments):
        for bk, bn, pipe in ((128, 16, 0), (128, 32, 0), (128, 64, 0), (256, 32, 0), (128, 32, 3)):
            if any(_tile_groups(s.group_size, bk) is None for s in segments):
                continue
            c = {"kind": "cat", "inner": "sdot", "BM": bm, "BN": bn, "BK": bk, "num_warps": 4, "num_stages": 2}
            c = dict(c, PIPE=True, num_stages=pipe) if pipe else c
            out += [dict(c, SPLIT=split) for split in (1, 2, 4, 8)]
    return out


def _word_groups(seg) -> tuple[int, bool]:
    """(group size for the kernel, whether every word lies inside one group)."""
    per = per_word(seg.bits)
    if seg.group_size <= 0:
        return seg.codes.shape[1] * per + per, True
    return seg.group_size, seg.group_size % per == 0


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _gemv_grid(seg, bw: int) -> tuple[int, int]:
    """(GRID, NGT) of _gemv_kernel: how a word tile of ``bw`` words finds its scales and zero points."""
    per = per_word(seg.bits)
    if seg.group_size <= 0:
        return 3, 1
    if seg.group_size % per:
        return 0, 1
    wpg = seg.group_size // per
    if bw % wpg == 0 and _is_pow2(bw // wpg):
        return 2, bw // wpg
    if wpg % bw == 0:
        return 2, 1
    return 1, 1


def _tile_groups(group_size: int, bk: int) -> int | None:
    """Groups per k-tile of ``bk`` columns: 0 one group per row, 1 the tile lies inside one group, more the
    tile holds that many whole groups (a power of two); None otherwise."""
    if group_size <= 0:
        return 0
    if group_size % bk == 0:
        return 1
    if bk % group_size == 0 and _is_pow2(bk // group_size):
        return bk // group_size
    return None


def _sdot_groups(group_size: int, bk: int) -> int:
    """NGT of _sdot_kernel for k-tiles of ``bk`` columns."""
    ngt = _tile_groups(group_size, bk)
    if ngt is None:
        raise ValueError(f"k-tiles of {bk} columns neither lie inside nor hold whole groups of {group_size}")
    return ngt


def _gemv(x, seg, N, bias, cfg) -> torch.Tensor:
    M = x.shape[0]
    kw = seg.codes.shape[1]
    bw, split = cfg["BW"], cfg["SPLIT"]
    kws = triton.cdiv(triton.cdiv(kw, split), bw) * bw
    split = triton.cdiv(kw, kws)
    gs, _ = _word_groups(seg)
    grid_kind, ngt = _gemv_grid(seg, bw)
    if grid_kind == 2 and cfg.get("WG"):
        grid_kind = 4
    one_row = M == 1
    atomic = split > 1 or not one_row
    y = torch.zeros((M, N), device=x.device, dtype=torch.float32) if atomic else \
        torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(N, cfg["BN"]), split)
    _gemv_kernel[grid](x, x.stride(0), x.stride(1), y, y.stride(0), bias if bias is not None else y, M, N,
                       seg.codes, seg.codes.stride(0), seg.scale, seg.zero, seg.scale.stride(0),
                       seg.cols if seg.cols is not None else seg.codes, seg.k, kw, kws, gs,
                       BITS=seg.bits, HAS_COLS=seg.cols is not None, GRID=grid_kind, NGT=ngt,
                       HAS_BIAS=bias is not None, ATOMIC=atomic, ONE_ROW=one_row, BN=cfg["BN"], BW=bw,
                       UNPACK3=cfg.get("U3", False), PIPE=cfg.get("PIPE", 0),
                       EVEN=cfg.get("EVEN", False) and kw % bw == 0 == kws % bw and seg.k == kw * per_word(seg.bits),
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.to(x.dtype) if atomic else y


def _gemv_rows(x, seg, N, bias, cfg) -> torch.Tensor:
    M = x.shape[0]
    kw, bw = seg.codes.shape[1], cfg["BW"]
    grid_kind, ngt = _gemv_grid(seg, bw)
    meta = getattr(seg, "meta", None)
    if M > ROWS_MAX:
        raise ValueError(f"few-row GEMV tiles take up to {ROWS_MAX} rows (got {M})")
    mr = min(_pow2(M), cfg.get("MR", ROWS_MAX))  # rows per program: more rows spill the accumulators
    kws = triton.cdiv(triton.cdiv(kw, cfg["SPLIT"]), bw) * bw
    split = triton.cdiv(kw, kws)
    atomic = split > 1
    y = torch.zeros((M, N), device=x.device, dtype=torch.float32) if atomic else \
        torch.empty((M, N), device=x.device, dtype=x.dtype)
    gs, _ = _word_groups(seg)
    _gemv_rows_kernel[(triton.cdiv(N, cfg["BN"]), split, triton.cdiv(M, mr))](
        x, x.stride(0), x.stride(1), y, y.stride(0), bias if bias is not None else y, M, N,
        seg.codes, seg.codes.stride(0), seg.scale, seg.zero, seg.scale.stride(0),
        seg.cols if seg.cols is not None else seg.codes, meta if meta is not None else seg.codes,
        meta.stride(0) if meta is not None else 0, seg.k, kw, kws, gs,
        BITS=seg.bits, HAS_COLS=seg.cols is not None, HAS_META=meta is not None, GRID=grid_kind, NGT=ngt,
        HAS_BIAS=bias is not None, ATOMIC=atomic, MR=mr, BN=cfg["BN"], BW=bw, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return y.to(x.dtype) if atomic else y


def _sdot(x, seg, N, bias, cfg) -> torch.Tensor:
    M = x.shape[0]
    if M > cfg["BM"] or seg.cols is not None:
        raise ValueError(f"sdot tiles take up to {cfg['BM']} rows over all columns")
    per, kw, bw = per_word(seg.bits), seg.codes.shape[1], cfg["BW"]
    ngt = _sdot_groups(seg.group_size, bw * per)
    gs = seg.group_size if seg.group_size > 0 else kw * per + per
    kws = triton.cdiv(triton.cdiv(kw, cfg["SPLIT"]), bw) * bw
    split = triton.cdiv(kw, kws)
    atomic = split > 1
    y = torch.zeros((M, N), device=x.device, dtype=torch.float32) if atomic else \
        torch.empty((M, N), device=x.device, dtype=x.dtype)
    _sdot_kernel[(triton.cdiv(N, cfg["BN"]), split)](
        x, x.stride(0), x.stride(1), y, y.stride(0), bias if bias is not None else y, M, N,
        seg.codes, seg.codes.stride(0), seg.scale, seg.zero, seg.scale.stride(0), seg.k, kw, kws, gs,
        BITS=seg.bits, HAS_BIAS=bias is not None, ATOMIC=atomic, IEEE=x.dtype == torch.float32, NGT=ngt,
        BM=cfg["BM"], BN=cfg["BN"], BW=bw, PIPE=cfg.get("PIPE", False), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return y.to(x.dtype) if atomic else y


def _pdot_grid(seg, bw: int) -> int:
    """GRID of _pdot_kernel for word tiles of ``bw`` words (see _gemv_grid)."""
    per = per_word(seg.bits)
    if seg.group_size <= 0:
        return 3
    if seg.group_size % per:
        return 0
    return 2 if seg.group_size % (bw * per) == 0 else 1


def _pdot(x, seg, N, bias, cfg) -> torch.Tensor:
    M = x.shape[0]
    kw, bw = seg.codes.shape[1], cfg["BW"]
    kws = triton.cdiv(triton.cdiv(kw, cfg.get("SPLIT", 1)), bw) * bw
    split = triton.cdiv(kw, kws)
    atomic = split > 1
    y = torch.zeros((M, N), device=x.device, dtype=torch.float32) if atomic else \
        torch.empty((M, N), device=x.device, dtype=x.dtype)
    gs, _ = _word_groups(seg)
    grid = (triton.cdiv(N, cfg["BN"]) * triton.cdiv(M, cfg["BM"]), split)
    _pdot_kernel[grid](x, x.stride(0), x.stride(1), y, y.stride(0), bias if bias is not None else y, M, N,
                       seg.codes, seg.codes.stride(0), seg.scale, seg.zero, seg.scale.stride(0),
                       seg.cols if seg.cols is not None else seg.codes, seg.k, kw, kws, gs,
                       BITS=seg.bits, HAS_COLS=seg.cols is not None, GRID=_pdot_grid(seg, bw),
                       HAS_BIAS=bias is not None, ATOMIC=atomic, IEEE=x.dtype == torch.float32,
                       BM=cfg["BM"], BN=cfg["BN"], BW=bw, num_warps=cfg["num_warps"],
                       num_stages=cfg["num_stages"])
    return y.to(x.dtype) if atomic else y


def _dot(x, segments, N, bias, cfg) -> torch.Tensor:
    M = x.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
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
    """Write segment ``seg``'s weights into ``out[:, col0 : col0 + seg.k]`` (out: (N, ≥ col0 + k)); 2:4
    codes (``seg.meta``) into ``out[:, col0 : col0 + 2·seg.k]``."""
    N, K = seg.codes.shape[0], seg.k
    per, kw = per_word(seg.bits), seg.codes.shape[1]
    meta = getattr(seg, "meta", None)
    if meta is not None:
        out[:, col0:col0 + 2 * K].zero_()
    bn, bw = 16, 32
    ngt = _tile_groups(seg.group_size, bw * per) if _is_pow2(per) and meta is None else None
    if ngt is not None:
        gs = seg.group_size if seg.group_size > 0 else K + 1
        _dequant_words_kernel[(triton.cdiv(N, bn), triton.cdiv(kw, bw))](
            seg.codes, seg.codes.stride(0), seg.scale, seg.zero, seg.scale.stride(0), out, out.stride(0), col0,
            N, K, kw, gs, BITS=seg.bits, NGT=ngt, BN=bn, BW=bw, num_warps=4)
        return out
    bn, bk = 32, 128  # groups that change inside words, 3-bit codes, or 2:4 codes
    gs = seg.group_size if seg.group_size > 0 else K + 1
    grid = (triton.cdiv(N, bn), triton.cdiv(K, bk))
    _dequant_kernel[grid](seg.codes, seg.codes.stride(0), seg.scale, seg.zero, seg.scale.stride(0),
                          out, out.stride(0), col0, N, K, gs, meta if meta is not None else seg.codes,
                          meta.stride(0) if meta is not None else 0, BITS=seg.bits, HAS_META=meta is not None,
                          BN=bn, BK=bk, num_warps=4)
    return out
