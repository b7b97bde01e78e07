"""The OBS column sweep every Hessian solver shares (docs/methods.md), and the mask helpers."""
from __future__ import annotations

import logging

import torch

from .grid import quantize_to_grid

log = logging.getLogger(__name__)


# ---- masks (True = kept) ------------------------------------------------------------------------

def n_pruned(sparsity: float, size: int) -> int:
    return int(sparsity * size + 0.5)


def prune_lowest(score: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
    """Mask with the k lowest scores pruned, in each row or over the whole tensor."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        if per_row:
            keep.scatter_(1, torch.argsort(score, dim=1)[:, :k], False)
        else:
            keep.view(-1)[torch.argsort(score.reshape(-1))[:k]] = False
    return keep


def nm_keep(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of m consecutive columns of each row, prune the n lowest scores."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2, largest=False).indices, False)
    return keep.reshape(rows, cols)


def prune_columns(W: torch.Tensor, U: torch.Tensor, keep: torch.Tensor, sub: int = 32) -> torch.Tensor:
    """OBS-prune the entries of segment W where ``keep`` is False, column by column (SparseGPT's loop):
    W is updated in place (pruned entries 0, the later columns of the segment compensated through U, its
    part of chol(H⁻¹, upper)); returns the scaled errors E, so that columns right of the segment take
    ``-= E @ U[segment, right]``. Triton's one-launch loop on CUDA float32, else a torch loop with lazy
    updates every ``sub`` columns (no per-row systems: memory stays at the segment's size)."""
    rows, L = W.shape
    kernel = _triton_prune(W, L)
    if kernel is not None:
        E = torch.empty_like(W)
        try:
            kernel(W, U, keep.to(torch.uint8), E)
            _PRUNE_KERNEL["launched"] = True
            return E
        except Exception as e:  # noqa: BLE001
            # a kernel that does not compile fails at its first launch, before W changed
            if not type(e).__module__.startswith("triton") or _PRUNE_KERNEL["launched"]:
                raise
            log.warning("Triton pruning kernel unavailable (%s: %s); using the torch loop",
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            _PRUNE_KERNEL["off"] = True
    E = torch.zeros_like(W)
    for s0 in range(0, L, sub):
        s1 = min(s0 + sub, L)
        for i in range(s0, s1):
            e = torch.where(keep[:, i], 0.0, W[:, i] / U[i, i])
            E[:, i] = e
            if i + 1 < s1:
                W[:, i + 1:s1].addr_(e, U[i, i + 1:s1], alpha=-1.0)
        if s1 < L:
            W[:, s1:].addmm_(E[:, s0:s1], U[s0:s1, s1:], alpha=-1.0)
    W.mul_(keep)
    return E


_PRUNE_KERNEL = {"launched": False, "off": False}  # once launched, a later failure is a real error


def _triton_prune(W: torch.Tensor, L: int):
    if _PRUNE_KERNEL["off"]:
        return None
    try:
        from . import triton_gptq
    except ImportError:
        return None
    if not triton_gptq.available(W) or L > triton_gptq.MAX_BLOCK:
        return None
    return triton_gptq.prune_columns


def after_pruning(Wseg: torch.Tensor, Useg: torch.Tensor, keep: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Weights of a segment after OBS-pruning its pruned entries (no quantization), block by block."""
    W = Wseg.clone()
    for a in range(0, W.shape[1], block):
        b = min(a + block, W.shape[1])
        if keep[:, a:b].all():
            continue
        E = prune_columns(W[:, a:b], Useg[a:b, a:b], keep[:, a:b])
        if b < W.shape[1]:
            W[:, b:].addmm_(E, Useg[a:b, b:], alpha=-1.0)
    return W


# ---- the sweep ----------------------------------------------------------------------------------

def fixed_blocks(cols: int, blocksize: int) -> list[tuple[int, int]]:
    return [(i1, min(i1 + blocksize, cols)) for i1 in range(0, cols, blocksize)]


class Rule:
    """How a method rounds columns. Subclasses override ``column`` and, where they need to, the rest."""

    def cuts(self, i1: int, i2: int) -> list[int]:
        """Columns in (i1, i2) where a new run starts (``start`` is called at i1 and at each of them)."""
        return []

    def start(self, sweep: Sweep, a: int, b: int) -> None:
        """Called when the run [a, b) begins: choose masks, fit grids (``sweep.current`` sees the weights)."""

    def solve_run(self, sweep: Sweep, a: int, b: int) -> bool:
        """Solve the run at once (update ``sweep.W`` up to the block end, fill ``sweep.Err1``); False = loop."""
        return False

    def column(self, c: int, w: torch.Tensor) -> torch.Tensor:
        """The value column c (current weights w) rounds to."""
        raise NotImplementedError


class Sweep:
    """One sweep over the columns of W (updated in place) with U, the upper Cholesky factor of H⁻¹."""

    def __init__(self, W: torch.Tensor, U: torch.Tensor):
        self.W, self.U = W, U
        self.i1 = self.i2 = self.c = 0  # current block [i1, i2) and run start c
        self.Err1: torch.Tensor | None = None

    def current(self, a: int, b: int) -> torch.Tensor:
        """Columns [a, b) as the sweep at column c sees them (this block's lazy update applied beyond it)."""
        parts = []
        if a < self.i2:
            parts.append(self.W[:, a:min(b, self.i2)])
        if b > self.i2:
            lo = max(a, self.i2)
            rest = self.W[:, lo:b]
            if self.c > self.i1:
                rest = rest - self.Err1[:, :self.c - self.i1] @ self.U[self.i1:self.c, lo:b]
            parts.append(rest)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def run(self, rule: Rule, blocks: list[tuple[int, int]]) -> None:
        W, U = self.W, self.U
        cols = W.shape[1]
        for i1, i2 in blocks:
            W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]  # views: updated in place
            self.i1, self.i2, self.Err1 = i1, i2, torch.empty_like(W1)
            starts = [i1, *rule.cuts(i1, i2), i2]
            for a, b in zip(starts[:-1], starts[1:]):
                self.c = a
                rule.start(self, a, b)
                if rule.solve_run(self, a, b):
                    continue
                for i in range(a - i1, b - i1):
                    w = W1[:, i]
                    err = (w - rule.column(i1 + i, w)) / U1[i, i]
                    W1[:, i + 1:].addr_(err, U1[i, i + 1:], alpha=-1.0)
                    self.Err1[:, i] = err
            if i2 < cols:  # lazy batch update of everything right of the block
                W[:, i2:].addmm_(self.Err1, U[i1:i2, i2:], alpha=-1.0)


# ---- uniform grids (GPTQ, joint, channel-mixed) ---------------------------------------------------

def triton_columns(W: torch.Tensor, blocksize: int):
    """The Triton column-loop kernel (triton_gptq.py) when it applies to this problem, else None."""
    try:
        from . import triton_gptq
    except ImportError:
        return None
    if not triton_gptq.available(W) or min(blocksize, W.shape[1]) > triton_gptq.MAX_BLOCK:
        return None
    return triton_gptq.gptq_columns


class GridRule(Rule):
    """Round each column to its group's grid (fitted in ``start``); pruned entries take the zero point."""

    def __init__(self, W: torch.Tensor, col_group: list[int], n_groups: int, maxq: int,
                 keep: torch.Tensor | None, blocksize: int):
        rows = W.shape[0]
        self.col_group, self.maxq, self.keep = col_group, maxq, keep
        self.scale = torch.empty(rows, max(1, n_groups), dtype=W.dtype, device=W.device)
        self.zero = torch.empty_like(self.scale)
        self.codes = torch.empty_like(W)
        self.kernel = triton_columns(W, blocksize)
        self._launched = False  # once the kernel has run, a later failure is a real error

    def maxq_at(self, c: int) -> int:
        return self.maxq

    def set_grid(self, g: int, s: torch.Tensor, z: torch.Tensor) -> None:
        """Store group g's grid, rounded through float32 as it is stored so codes are chosen on it."""
        self.scale[:, g], self.zero[:, g] = s.float().to(self.scale.dtype), z.float().to(self.zero.dtype)

    def column(self, c: int, w: torch.Tensor) -> torch.Tensor:
        g = self.col_group[c]
        s, z = self.scale[:, g], self.zero[:, g]
        code = quantize_to_grid(w, s, z, self.maxq_at(c))
        if self.keep is not None:
            code = torch.where(self.keep[:, c], code, z)
        self.codes[:, c] = code
        return s * (code - z)

    def solve_run(self, sweep: Sweep, a: int, b: int) -> bool:
        if self.kernel is None:
            return False
        i1, i2 = sweep.i1, sweep.i2
        cg = torch.tensor(self.col_group[i1:i2], dtype=torch.int32, device=sweep.W.device)
        m8 = None if self.keep is None else self.keep[:, i1:i2].to(torch.uint8)
        try:
            self.kernel(sweep.W[:, i1:i2], sweep.U[i1:i2, i1:i2], self.scale, self.zero, cg, m8,
                        self.codes[:, i1:i2], sweep.Err1, a - i1, b - i1, self.maxq_at(a))
        except Exception as e:  # noqa: BLE001
            # a kernel that does not compile fails at its first launch, before any column changed
            if not type(e).__module__.startswith("triton") or self._launched:
                raise
            log.warning("Triton column-loop kernel unavailable (%s: %s); using the torch loop",
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            self.kernel = None
            return False
        self._launched = True
        return True
