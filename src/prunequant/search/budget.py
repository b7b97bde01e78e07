"""Budgets (``tcr=X`` or ``size=40MB``) and the accounting that lands a configuration on one (docs/search.md)."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from ..errors import PrunequantError
from ..accounting import effective_bits, layer_bits, tcr_layers
from ..recipe import Recipe

TCR_TOLERANCE = 1e-3
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class Budget:
    kind: str  # "tcr" or "size"
    value: float  # target TCr, or bytes

    def describe(self) -> str:
        return f"TCr ≥ {self.value:g}" if self.kind == "tcr" else f"size ≤ {self.value / 1e6:,.2f} MB"

    def violation(self, tcr: float, nbytes: float | None) -> float:
        """≤ 0 when the measured figures satisfy the budget (optuna's constraint convention)."""
        if self.kind == "tcr":
            return (self.value - TCR_TOLERANCE) - tcr
        return float(nbytes) - self.value


def parse_budget(text: str | Budget) -> Budget:
    """``tcr=0.875`` or ``size=40MB`` (KB/MB/GB are powers of 10; KiB/MiB/GiB powers of 2)."""
    if isinstance(text, Budget):
        return text
    m = re.fullmatch(r"\s*(tcr|size)\s*=\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m:
        raise PrunequantError(f"cannot read budget {text!r}: use tcr=0.875 (theoretical compression rate) "
                              "or size=40MB (bytes of the compact export)")
    kind, num, unit = m.group(1), float(m.group(2)), m.group(3).upper()
    if kind == "tcr":
        if unit or not 0 < num < 1:
            raise PrunequantError(f"budget tcr={m.group(2)}{m.group(3)} must be a fraction in (0, 1), e.g. tcr=0.875")
        return Budget("tcr", num)
    if unit not in _SIZE_UNITS:
        raise PrunequantError(f"unknown size unit {m.group(3)!r} in budget {text!r}; use B, KB, MB, GB, KiB, MiB, GiB")
    if num <= 0:
        raise PrunequantError(f"size budget {text!r} must be positive")
    return Budget("size", num * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class Layer:
    name: str
    out_features: int
    in_features: int
    block: int

    @property
    def n_params(self) -> int:
        return self.out_features * self.in_features


@dataclass
class Inventory:
    """The block linears of a model (what a recipe can touch) and the count of every other parameter."""

    layers: list[Layer]
    n_blocks: int
    blocks_prefix: str
    other_params: int

    @classmethod
    def of(cls, model) -> "Inventory":
        from ..models import arch_of, get_blocks, get_weight, named_linears

        arch = arch_of(model)
        layers = [Layer(name, *map(int, get_weight(mod).shape), i) for i, name, mod in named_linears(model, arch)]
        total = sum(p.numel() for p in model.parameters())
        return cls(layers, len(get_blocks(model, arch)), arch.blocks, total - sum(x.n_params for x in layers))

    def to_dict(self) -> dict:
        return {"layers": [asdict(x) for x in self.layers], "n_blocks": self.n_blocks,
                "blocks_prefix": self.blocks_prefix, "other_params": self.other_params}

    @classmethod
    def from_dict(cls, d: dict) -> "Inventory":
        return cls([Layer(**x) for x in d["layers"]], d["n_blocks"], d["blocks_prefix"], d["other_params"])

    @property
    def min_in_features(self) -> int:
        return min(x.in_features for x in self.layers)

    @property
    def dense_bytes(self) -> int:
        return 2 * (self.other_params + sum(x.n_params for x in self.layers))


def nominal(recipe: Recipe, inv: Inventory) -> dict:
    """Nominal TCr and predicted compact-export bytes of ``recipe`` on ``inv``, without running it."""
    avg = recipe.allocation.avg_bits if recipe.allocation.method == "bits" else None
    # other tensors at 16 bits; ~1 kB per compressed layer of safetensors header and descriptor JSON, and
    # ~4 kB of config and manifest (measured on the compact format; the budget check uses the real bytes)
    rows, linear_bits = [], 0.0
    for layer in inv.layers:
        plan = recipe.plan_for(layer.name)
        bits = float(avg) if avg is not None and plan.quant is not None else None
        s = plan.prune.sparsity if plan.prune else 0.0
        rows.append((layer.n_params, s, effective_bits(plan.quant) if bits is None else bits))
        linear_bits += layer_bits((layer.out_features, layer.in_features), plan, bits=bits)
    nbytes = linear_bits / 8 + 2.0 * inv.other_params + 1000 * len(inv.layers) + 4096
    return {"tcr": tcr_layers(rows), "predicted_bytes": nbytes, "linear_bytes": linear_bits / 8}


def meets(budget: Budget, fig: dict) -> bool:
    if budget.kind == "tcr":
        return fig["tcr"] >= budget.value - 1e-12
    return fig["predicted_bytes"] <= budget.value


def solve_monotone(make, lo: float, hi: float, budget: Budget, inv: Inventory, increasing: bool,
                   step: float) -> float | None:
    """The least compressing x in [lo, hi] (grid ``step``) whose recipe ``make(x)`` meets the budget, or None."""
    best_end = hi if increasing else lo
    if not meets(budget, nominal(make(best_end), inv)):
        return None
    a, b = (lo, hi) if increasing else (hi, lo)  # a: least compressing end, b: feasible end
    if meets(budget, nominal(make(a), inv)):
        return a
    for _ in range(60):
        mid = (a + b) / 2
        if meets(budget, nominal(make(mid), inv)):
            b = mid
        else:
            a = mid
    # snap onto the grid on the feasible side
    x = math.ceil(b / step - 1e-9) * step if increasing else math.floor(b / step + 1e-9) * step
    x = round(min(max(x, lo), hi), 10)
    return x if meets(budget, nominal(make(x), inv)) else round(b, 10)
