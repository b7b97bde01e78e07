"""Channel-level mixed precision: high-bit and low-bit input channels in one matrix (docs/methods.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import RecipeError
from .base import LayerResult, LayerStats, QuantState
from .grid import fake_quantize, fit_grid, maxq_of, quantize_to_grid
from .hessian import layer_objective, prepare_hessian
from .obs import GridRule, Sweep


@dataclass(frozen=True)
class MixSpec:
    """Bit widths of the two channel sets, their grids, and how storage overhead is counted."""

    low_bits: int = 2
    high_bits: int = 4
    group_size: int = 128  # 0 = one grid per output row and part
    symmetric: bool = False
    scale_bits: int = 16  # each grid stores an fp16 scale, and (asymmetric) a zero point of ``bits`` bits
    bias_bits: int = 16
    allow_prune: bool = True  # whether channels may also be removed (a third, 0-bit choice)

    def __post_init__(self):
        for b in (self.low_bits, self.high_bits):
            if b not in range(1, 9):
                raise RecipeError(f"channel bit width {b} unsupported: use integers 1..8 (e.g. 4/2, 8/4)")
        if self.low_bits > self.high_bits:
            raise RecipeError(f"low_bits {self.low_bits} exceeds high_bits {self.high_bits}: swap them")
        if self.group_size < 0 or (self.group_size and self.group_size % 8):
            raise RecipeError(f"group size {self.group_size} must be 0 (per channel) or a multiple of 8")

    def grid_bits(self, bits: int) -> int:
        return self.scale_bits + (0 if self.symmetric else bits)

    def n_grids(self, n_cols, exact: bool = True):
        """Grids per output row for a part of ``n_cols`` columns (works on floats when not exact)."""
        if self.group_size <= 0:
            return (n_cols > 0) * 1 if exact else 1
        return math.ceil(n_cols / self.group_size) if exact else n_cols / self.group_size


@dataclass(frozen=True)
class MixedQuant:
    """One layer's plan: columns where ``high`` is True at spec.high_bits, the others at spec.low_bits."""

    spec: MixSpec
    high: tuple[bool, ...]
    method: str = "mixed"
    damp: float = 0.01

    @property
    def bits(self) -> float:
        n_high = sum(self.high)
        return (n_high * self.spec.high_bits + (len(self.high) - n_high) * self.spec.low_bits) / max(len(self.high), 1)

    @property
    def group_size(self) -> int:
        return self.spec.group_size

    def describe(self) -> str:
        return (f"{self.method} {self.spec.high_bits}/{self.spec.low_bits}-bit ({sum(self.high)} of {len(self.high)} "
                f"input channels high) g{self.spec.group_size}")


def mixed_solve(w: torch.Tensor, stats: LayerStats, plan: MixedQuant, mask=None) -> LayerResult:
    """The registry's entry: ``mixed_quantize`` of one layer under its plan (with the Hessian for "mixed")."""
    if mask is not None:
        raise RecipeError("channel-mixed quantization keeps every weight: it does not follow a pruning mask")
    H = stats.hessian if plan.method == "mixed" else None
    res = mixed_quantize(w, torch.tensor(plan.high, dtype=torch.bool), plan.spec, H=H, damp=plan.damp)
    if H is not None:
        res.info["error"] = layer_objective(w, res.weight, H)
    return res


def matrix_bits(spec: MixSpec, rows, n_high, n_low, exact: bool = True):
    """Bits to store one matrix: codes + grids of both parts + the column map (when both parts are used)."""
    codes = rows * (n_high * spec.high_bits + n_low * spec.low_bits)
    grids = rows * (spec.n_grids(n_high, exact) * spec.grid_bits(spec.high_bits)
                    + spec.n_grids(n_low, exact) * spec.grid_bits(spec.low_bits))
    if exact:
        colmap = (n_high + n_low) if (n_high > 0 and n_low > 0) else 0
    else:
        colmap = n_high + n_low
    return codes + grids + colmap


def rtn_fake(W: torch.Tensor, bits: int, spec: MixSpec) -> torch.Tensor:
    """Round-to-nearest of a whole matrix at one bit width (the training-time stand-in for each part)."""
    maxq = maxq_of(bits)
    scale, zero = fit_grid(W, bits, spec.group_size, spec.symmetric)
    gs = W.shape[1] if spec.group_size <= 0 else spec.group_size
    g = torch.arange(W.shape[1], device=W.device) // gs
    return fake_quantize(W, scale[:, g], zero[:, g], maxq)


def _segments(n_high: int, n: int, group_size: int, blocksize: int) -> list[tuple[int, int, bool]]:
    """(start, end, fit_grid_here) column segments of the permuted matrix; a grid never spans two parts."""
    segs = []
    for lo, hi in ((0, n_high), (n_high, n)):
        step = group_size if group_size > 0 else blocksize
        for s in range(lo, hi, step):
            segs.append((s, min(s + step, hi), group_size > 0 or s == lo))
    return segs


class _MixedRule(GridRule):
    """GPTQ over [high | low] with each part's bit width; one grid per group of a part (or per part)."""

    def __init__(self, Wp, n_high: int, spec: MixSpec, segs, blocksize: int):
        n = Wp.shape[1]
        col_group, self.fit_at, g = [0] * n, {}, -1
        for s, e, fit in segs:
            if fit:
                g += 1
                self.fit_at[s] = e if spec.group_size > 0 else (n_high if s < n_high else n)
            col_group[s:e] = [g] * (e - s)
        super().__init__(Wp, col_group, g + 1, maxq_of(spec.low_bits), None, blocksize)
        self.n_high, self.spec, self.n_high_grids = n_high, spec, (col_group[n_high - 1] + 1 if n_high else 0)

    def bits_at(self, c: int) -> int:
        return self.spec.high_bits if c < self.n_high else self.spec.low_bits

    def maxq_at(self, c: int) -> int:
        return maxq_of(self.bits_at(c))

    def fit(self, Wcols: torch.Tensor, a: int) -> None:
        s, z = fit_grid(Wcols, self.bits_at(a), 0, self.spec.symmetric)
        self.set_grid(self.col_group[a], s[:, 0], z[:, 0])

    def start(self, sweep: Sweep, a: int, b: int) -> None:
        if a in self.fit_at:  # blocks are the segments: [a, part end) is up to date at a segment start
            self.fit(sweep.current(a, self.fit_at[a]), a)


def mixed_quantize(W: torch.Tensor, high: torch.Tensor, spec: MixSpec, H: torch.Tensor | None = None,
                   damp: float = 0.01, blocksize: int = 128) -> LayerResult:
    """Quantize W (out, in): columns with ``high`` at spec.high_bits, the rest at spec.low_bits."""
    if W.dim() != 2 or high.shape != (W.shape[1],):
        raise ValueError(f"need W (out, in) and a bool mask of its {W.shape[-1]} input columns")
    high = high.to(device=W.device, dtype=torch.bool)
    perm = torch.cat([high.nonzero().flatten(), (~high).nonzero().flatten()])
    n_high, n = int(high.sum()), W.shape[1]
    segs = _segments(n_high, n, spec.group_size, blocksize)
    if H is None:
        Wp = W.detach().to(torch.float64 if W.dtype == torch.float64 else torch.float32)[:, perm].clone()
        info = {"method": "rtn"}
        rule = _MixedRule(Wp, n_high, spec, segs, max(e - s for s, e, _ in segs))
        for s, e, fit in segs:
            if fit:
                rule.fit(Wp[:, s:rule.fit_at[s]], s)
            g = rule.col_group[s]
            rule.codes[:, s:e] = quantize_to_grid(Wp[:, s:e], rule.scale[:, g:g + 1], rule.zero[:, g:g + 1],
                                                  rule.maxq_at(s))
    else:
        Wp, U, info = prepare_hessian(W, H, damp=damp, perm=perm)
        info["method"] = "gptq"
        rule = _MixedRule(Wp, n_high, spec, segs, max(e - s for s, e, _ in segs))
        Sweep(Wp, U).run(rule, [(s, e) for s, e, _ in segs])
    g = torch.tensor(rule.col_group, device=W.device)
    codes, scale, zero = rule.codes, rule.scale, rule.zero
    weight = (scale[:, g] * (codes - zero[:, g]))[:, torch.argsort(perm)]
    parts = {}
    for name, lo, hi, bits, sl in (("high", 0, n_high, spec.high_bits, slice(0, rule.n_high_grids)),
                                   ("low", n_high, n, spec.low_bits, slice(rule.n_high_grids, None))):
        if hi > lo:
            gs = (hi - lo) if spec.group_size <= 0 else spec.group_size
            parts[name] = QuantState(
                kind="uniform", bits=bits, group_size=spec.group_size, symmetric=spec.symmetric,
                codes=codes[:, lo:hi].to(torch.uint8), scale=scale[:, sl].float(), zero=zero[:, sl].float(),
                g_idx=(torch.arange(hi - lo, device=W.device) // gs).int())
    out_rows = W.shape[0]
    bits_total = matrix_bits(spec, out_rows, n_high, n - n_high)
    state = QuantState(kind="channel-mixed", bits=bits_total / max(W.numel(), 1), group_size=spec.group_size,
                       symmetric=spec.symmetric, extra={"perm": perm.int(), "n_high": n_high, **parts})
    info["bits"] = bits_total
    return LayerResult(weight=weight.to(torch.float64 if W.dtype == torch.float64 else torch.float32),
                       quant=state, info=info)


def dequantize_mixed(state: QuantState) -> torch.Tensor:
    """Weight in the original column order from a "channel-mixed" QuantState."""
    parts = [state.extra[p].dequantize() for p in ("high", "low") if p in state.extra]
    Qp = torch.cat(parts, 1)
    return Qp[:, torch.argsort(state.extra["perm"].long())]
