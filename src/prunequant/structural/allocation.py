"""One budget for pruning and precision: channel decisions, their cost in bits (docs/internals.md)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import RecipeError
from ..solvers.mixed import MixSpec, matrix_bits
from .arch import parts

MASKS = ("keep_heads", "keep_mlp", "high_qkv", "high_o", "high_gu", "high_down")


@dataclass(frozen=True)
class LayerDims:
    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    inter: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @property
    def rep(self) -> int:
        return self.n_heads // self.n_kv

    @property
    def n_weights(self) -> int:
        hd = self.head_dim
        return self.hidden * hd * (2 * self.n_heads + 2 * self.n_kv) + 3 * self.hidden * self.inter

    def sizes(self) -> dict[str, int]:
        return {"keep_heads": self.n_heads, "keep_mlp": self.inter, "high_qkv": self.hidden,
                "high_o": self.n_heads * self.head_dim, "high_gu": self.hidden, "high_down": self.inter}


def model_dims(model) -> list[LayerDims]:
    return [LayerDims(p["q"].in_features, p.n_heads, p.n_kv, p.head_dim, p.inter, p["q"].bias is not None,
                      p["o"].bias is not None, p["down"].bias is not None) for p in parts(model)]


@dataclass
class LayerAllocation:
    keep_heads: torch.Tensor
    keep_mlp: torch.Tensor
    high_qkv: torch.Tensor
    high_o: torch.Tensor
    high_gu: torch.Tensor
    high_down: torch.Tensor

    def masks(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in MASKS}


def layer_bits(d: LayerDims, la, spec: MixSpec, exact: bool = True):
    """Stored bits of one layer's linears under decisions ``la`` (masks, or probabilities when not ``exact``)."""
    f = {k: (getattr(la, k).float() if isinstance(la, LayerAllocation) else la[k].float()) for k in MASKS}
    hd, bb = d.head_dim, spec.bias_bits
    kh = f["keep_heads"]
    by_group = kh.reshape(d.n_kv, d.rep)
    kv = (by_group.amax(1) if exact else 1 - (1 - by_group).prod(1)).sum() * hd
    q_rows = kh.sum() * hd
    o_cols = kh.repeat_interleave(hd)
    hq = f["high_qkv"].sum()
    lq = d.hidden - hq
    hg = f["high_gu"].sum()
    lg = d.hidden - hg
    km = f["keep_mlp"]
    m_rows = km.sum()
    # q, k, v share the column split (one input) but are stored as three matrices
    bits = matrix_bits(spec, q_rows, hq, lq, exact) + 2 * matrix_bits(spec, kv, hq, lq, exact)
    o_high = (f["high_o"] * o_cols).sum()
    bits = bits + matrix_bits(spec, d.hidden, o_high, o_cols.sum() - o_high, exact)
    bits = bits + 2 * matrix_bits(spec, m_rows, hg, lg, exact)
    d_high = (f["high_down"] * km).sum()
    bits = bits + matrix_bits(spec, d.hidden, d_high, m_rows - d_high, exact)
    if d.qkv_bias:
        bits = bits + bb * (q_rows + 2 * kv)
    if d.mlp_bias:
        bits = bits + bb * 2 * m_rows
    pruned_heads = bool((kh < 1).any()) if exact else spec.allow_prune
    pruned_mlp = bool((km < 1).any()) if exact else spec.allow_prune
    bits = bits + bb * d.hidden * (int(d.o_bias or pruned_heads) + int(d.mlp_bias or pruned_mlp))
    return bits


@dataclass
class Allocation:
    """Per-layer decisions under one budget, and their exact cost."""

    layers: list[LayerAllocation]
    dims: list[LayerDims]
    spec: MixSpec
    target_bits: float
    gqa: str = "group"
    info: dict = field(default_factory=dict)

    @property
    def total_bits(self) -> float:
        return float(sum(layer_bits(d, la, self.spec) for d, la in zip(self.dims, self.layers)))

    @property
    def n_weights(self) -> int:
        return sum(d.n_weights for d in self.dims)

    @property
    def avg_bits(self) -> float:
        """Exact stored bits per original block-linear weight (codes + grids + maps + biases)."""
        return self.total_bits / self.n_weights

    def summary(self) -> dict:
        rows = []
        for d, la in zip(self.dims, self.layers):
            rows.append({"heads": int(la.keep_heads.sum()), "mlp": int(la.keep_mlp.sum()),
                         "high_qkv": round(float(la.high_qkv.float().mean()), 3),
                         "high_o": round(float(la.high_o[la.keep_heads.repeat_interleave(d.head_dim)].float().mean()), 3)
                         if la.keep_heads.any() else 0.0,
                         "high_gu": round(float(la.high_gu.float().mean()), 3),
                         "high_down": round(float(la.high_down[la.keep_mlp].float().mean()), 3),
                         "bits": round(float(layer_bits(d, la, self.spec)) / d.n_weights, 3)})
        return {"avg_bits": self.avg_bits, "target_bits": self.target_bits,
                "low_bits": self.spec.low_bits, "high_bits": self.spec.high_bits,
                "group_size": self.spec.group_size, "gqa": self.gqa, "layers": rows}

    def to_dict(self) -> dict:
        d = self.summary()
        d["masks"] = [{k: _pack(v) for k, v in la.masks().items()} for la in self.layers]
        return d


def _pack(mask: torch.Tensor) -> str:
    bits = "".join("1" if b else "0" for b in mask.tolist())
    return f"{len(bits)}:" + (hex(int(bits, 2))[2:] if bits else "")


# ---- from priorities to decisions ----------------------------------------------------------------

def _attn_units(prio: torch.Tensor, d: LayerDims, gqa: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Attention decision units: (unit priorities, head indices of each unit), GQA-consistent."""
    g = prio.reshape(d.n_kv, d.rep)
    if gqa == "group":
        heads = [torch.arange(i * d.rep, (i + 1) * d.rep) for i in range(d.n_kv)]
        return g.mean(1), heads
    if gqa == "query":  # unit r = the r-th best head of every group; units are kept best-first
        order = g.argsort(1, descending=True)
        base = torch.arange(d.n_kv)[:, None] * d.rep
        heads = [(base[:, 0] + order[:, r]) for r in range(d.rep)]
        val = g.gather(1, order).mean(0)
        return torch.cummin(val, 0).values, heads
    raise RecipeError(f"gqa mode {gqa!r} unknown: use 'group' or 'query'")


def decide(d: LayerDims, prio: dict[str, torch.Tensor], tau: float, spec: MixSpec, gqa: str) -> LayerAllocation:
    """Keep / make high everything whose priority is >= tau (at least one unit of each kind survives)."""
    units, heads = _attn_units(prio["keep_heads"].float().cpu(), d, gqa)
    keep_u = units >= tau
    keep_u[int(units.argmax())] = True
    keep_heads = torch.zeros(d.n_heads, dtype=torch.bool)
    for k, h in zip(keep_u.tolist(), heads):
        keep_heads[h] = k
    km = prio["keep_mlp"].float().cpu()
    keep_mlp = km >= tau
    keep_mlp[int(km.argmax())] = True
    if not spec.allow_prune:
        keep_heads[:] = True
        keep_mlp[:] = True
    hi = {k: prio[k].float().cpu() >= tau for k in ("high_qkv", "high_o", "high_gu", "high_down")}
    return LayerAllocation(keep_heads, keep_mlp, **hi)


def _fit(dims, prios, spec, budget_bits, gqa):
    """Largest threshold set within budget_bits, topped up greedily (docs/internals.md)."""
    vals = torch.cat([p.float().flatten().cpu() for pr in prios for p in pr.values()]).unique().sort().values
    vals = torch.cat([vals, vals.new_tensor([float("inf")])])

    def cost(tau):
        las = [decide(d, p, tau, spec, gqa) for d, p in zip(dims, prios)]
        return float(sum(layer_bits(d, la, spec) for d, la in zip(dims, las))), las

    lo, hi = 0, len(vals) - 1  # cost(vals[hi]) is the minimum possible
    c_hi, las_hi = cost(float(vals[hi]))
    if c_hi > budget_bits:
        raise RecipeError(f"the budget is below the smallest possible model ({c_hi / sum(d.n_weights for d in dims):.3f} "
                          f"bits per weight with everything at {spec.low_bits} bits and the minimum kept): raise it")
    c_lo, las_lo = cost(float(vals[lo]))
    if c_lo <= budget_bits:
        return las_lo
    best = las_hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        c, las = cost(float(vals[mid]))
        if c <= budget_bits:
            hi, best = mid, las
        else:
            lo = mid
    _top_up(dims, prios, best, spec, budget_bits, gqa)
    return best


def _top_up(dims, prios, las, spec, budget_bits, gqa):
    """Add single decisions (best priority first) while the exact cost stays within the budget."""
    per_layer = [float(layer_bits(d, la, spec)) for d, la in zip(dims, las)]
    gap = budget_bits - sum(per_layer)
    ql, dq = spec.low_bits, spec.high_bits - spec.low_bits
    cands = []  # (priority, lower bound of the added bits, layer, key, index)
    for i, (d, p, la) in enumerate(zip(dims, prios, las)):
        units, heads = _attn_units(p["keep_heads"].float().cpu(), d, gqa)
        if spec.allow_prune:
            for u, h in enumerate(heads):
                if not la.keep_heads[h].all():
                    cands.append((float(units[u]), 2 * h.numel() * d.head_dim * d.hidden * ql, i, "keep_heads", h))
            for j in (~la.keep_mlp).nonzero().flatten().tolist():
                cands.append((float(p["keep_mlp"][j]), 3 * d.hidden * ql, i, "keep_mlp", j))
        kept_o = la.keep_heads.repeat_interleave(d.head_dim)
        rows = {"high_qkv": int(la.keep_heads.sum()) * d.head_dim, "high_o": d.hidden,
                "high_gu": 2 * int(la.keep_mlp.sum()), "high_down": d.hidden}
        for k in ("high_qkv", "high_o", "high_gu", "high_down"):
            free = ~getattr(la, k)
            if k == "high_o":
                free &= kept_o
            if k == "high_down":
                free &= la.keep_mlp
            for j in free.nonzero().flatten().tolist():
                cands.append((float(p[k][j]), dq * rows[k], i, k, j))
    cands.sort(key=lambda c: -c[0])
    min_lb = min((c[1] for c in cands), default=0)
    for _, lb, i, k, j in cands:
        if gap < min_lb:
            break
        if lb > gap:
            continue
        mask = getattr(las[i], k)
        if k == "keep_heads" and gqa == "query":
            trial = mask.clone()
            trial[j] = True
            counts = trial.reshape(dims[i].n_kv, dims[i].rep).sum(1)
            if not (counts == counts[0]).all():
                continue
        old = mask[j].clone()
        mask[j] = True
        new = float(layer_bits(dims[i], las[i], spec))
        if new - per_layer[i] <= gap:
            gap -= new - per_layer[i]
            per_layer[i] = new
        else:
            mask[j] = old


def discretize(dims: list[LayerDims], prios: list[dict], spec: MixSpec, target_bits: float,
               gqa: str = "group", per_layer: bool = False, info: dict | None = None) -> Allocation:
    """Decisions meeting ``target_bits`` per original weight exactly, per layer or with one global threshold."""
    if per_layer:
        layers = []
        for d, p in zip(dims, prios):
            layers += _fit([d], [p], spec, target_bits * d.n_weights, gqa)
    else:
        layers = _fit(dims, prios, spec, target_bits * sum(d.n_weights for d in dims), gqa)
    return Allocation(layers, dims, spec, target_bits, gqa, info or {})
