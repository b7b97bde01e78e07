"""The search space: which configurations a trial may pick (docs/search.md)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import PrunequantError
from ..recipe import REFINE_MODES, Override, PruneSpec, QuantSpec, Recipe, RefineSpec
from .budget import Budget, Inventory, meets, nominal, solve_monotone

FAMILIES = ("joint", "quant", "prune")


class Infeasible(Exception):
    """This trial's choices cannot meet the budget (recorded, not compressed)."""


@dataclass
class SearchSpace:
    families: tuple = ("joint", "quant", "prune")
    prune_methods: tuple = ("sparsegpt", "wanda")
    quant_methods: tuple = ("gptq", "rtn")
    nm_patterns: tuple = ("2:4", "4:8", "1:4")  # N of every M pruned
    bits: tuple = (2, 3, 4, 5, 6, 8)  # uniform bit widths
    group_sizes: tuple = (128, 64, 0)  # 0 = per channel; sizes that do not divide a layer are ragged
    joint_modes: tuple = ("onepass", "keep-mask")  # "quantize-pruned" stores every weight: see notes
    allocations: tuple = ("uniform", "owl", "bits")
    alloc_choices: tuple = (1.58, 2, 3, 4, 8)  # bit widths the knapsack may mix
    owl_lambda: tuple = (0.02, 0.2)
    sparsity_range: tuple = (0.1, 0.7)  # picked sparsity when the bits are derived
    max_sparsity: float = 0.8  # a derived sparsity above this is not offered
    act_order: tuple = (False, True)  # GPTQ only
    edges: tuple = ("none", "8bit", "skip")  # ordered from cheapest to costliest
    # end-to-end refinement after the solve (none, blockwise, global, both): it changes no stored bit, so it
    # is a free dimension of the budget; off by default because each refined trial costs a few times more
    refine: tuple = ("none",)
    refine_steps: int = 100

    def __post_init__(self):
        bad = set(self.refine) - {"none", *REFINE_MODES}
        if bad or not self.refine:
            raise PrunequantError(f"search-space refine choices {sorted(bad) or '[]'} unknown; use none, "
                                  f"{', '.join(REFINE_MODES)}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSpace":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise PrunequantError(f"unknown search-space field(s) {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class Resolved:
    """The study's fixed choice sets after removing what the model or the budget rules out."""

    space: SearchSpace
    families: list = field(default_factory=list)
    patterns: list = field(default_factory=list)
    joint_bits: list = field(default_factory=list)  # bits for joint unstructured with derived sparsity
    group_sizes: list = field(default_factory=list)


def _cats(trial, name: str, choices):
    choices = list(choices)
    if len(choices) == 1:  # nothing to choose (recorded in the trial's plan, not as a parameter)
        return choices[0]
    return trial.suggest_categorical(name, choices)


def _allocations(space: SearchSpace, cfg: dict) -> list[str]:
    out = ["uniform"]
    if "owl" in space.allocations and cfg["family"] in ("joint", "prune") and cfg.get("pattern") == "unstructured":
        out.append("owl")
    if "bits" in space.allocations and cfg["family"] in ("joint", "quant"):
        out.append("bits")
    return out


def _edge_overrides(edges: str, inv: Inventory) -> list[Override]:
    pats = [f"{inv.blocks_prefix}.0.*", f"{inv.blocks_prefix}.{inv.n_blocks - 1}.*"]
    if edges == "skip":
        return [Override(pattern=p, skip=True) for p in pats]
    if edges == "8bit":
        return [Override(pattern=p, prune={}, quant={"bits": 8}) for p in pats]
    return []


def build_recipe(cfg: dict, inv: Inventory, x: float | None = None) -> Recipe:
    """The recipe of a configuration; ``x`` is the derived variable (cfg['derive'] says which)."""
    fam, derive, alloc = cfg["family"], cfg["derive"], cfg.get("allocation", "uniform")
    prune = quant = None
    if fam in ("joint", "prune"):
        if cfg["pattern"] == "unstructured":
            s = x if derive == "sparsity" else cfg["sparsity"]
            prune = PruneSpec(cfg["prune_method"], round(float(s), 6))
        else:
            n, m = (int(v) for v in cfg["pattern"].split(":"))
            prune = PruneSpec(cfg["prune_method"], n=n, m=m)
    allocation = {"method": "uniform"}
    if fam in ("joint", "quant"):
        g = int(cfg["group_size"])
        ragged = bool(g) and any(layer.in_features % g for layer in inv.layers)
        if alloc == "bits":
            avg = float(x if derive == "avg_bits" else cfg["avg_bits"])
            bits = max(b for b in cfg["alloc_choices"] if b <= avg) if min(cfg["alloc_choices"]) <= avg else 2
            allocation = {"method": "bits", "avg_bits": round(avg, 4), "choices": list(cfg["alloc_choices"])}
        else:
            bits = x if derive == "bits" else cfg["bits"]
        quant = QuantSpec(cfg["quant_method"], bits, g, act_order=bool(cfg.get("act_order", False)), ragged=ragged)
    if alloc == "owl":
        allocation = {"method": "owl", "lam": float(cfg["owl_lambda"])}
    joint = cfg.get("joint", "onepass")
    refine = cfg.get("refine", "none")
    return Recipe(prune=prune, quant=quant, joint=joint, allocation=allocation,
                  overrides=_edge_overrides(cfg.get("edges", "none"), inv),
                  refine=None if refine == "none" else RefineSpec(refine, steps=int(cfg.get("refine_steps", 100))))


def short_describe(recipe: Recipe) -> str:
    """One line for tables: 'sparsegpt 2:4 + gptq 4b g128 [onepass] · bits avg 2.66 · edges 8b'."""
    parts = []
    p, q = recipe.prune, recipe.quant
    if p:
        parts.append(f"{p.method} {p.n}:{p.m}" if p.structured else f"{p.method} {p.sparsity:.1%}")
    if q:
        g = f"g{q.group_size}" if q.group_size else "pc"
        parts.append(f"{q.method} {q.bits:g}b {g}{' ao' if q.act_order else ''}")
    s = " + ".join(parts) + (f" [{recipe.joint}]" if p and q else "")
    a = recipe.allocation
    if a.method == "owl":
        s += f" · owl λ{a.lam:g}"
    elif a.method == "bits":
        s += f" · bits avg {a.avg_bits:g}"
    if any(o.skip for o in recipe.overrides):
        s += " · edges dense"
    elif recipe.overrides:
        s += " · edges 8b"
    if recipe.refine:
        s += f" · refined {recipe.refine.mode}"
    return s


def derive(cfg: dict, inv: Inventory, budget: Budget, space: SearchSpace) -> float | None:
    """The value of the derived variable that meets the budget with the least compression, or None."""
    d = cfg["derive"]
    make = lambda x: build_recipe(cfg, inv, x)  # noqa: E731
    if d == "sparsity":
        return solve_monotone(make, 0.0, space.max_sparsity, budget, inv, increasing=True, step=1e-3)
    if d == "avg_bits":
        lo, hi = min(cfg["alloc_choices"]), max(cfg["alloc_choices"])
        return solve_monotone(make, lo, hi, budget, inv, increasing=False, step=1e-2)
    for b in sorted(space.bits, reverse=True):  # discrete bits: the largest that fits
        if meets(budget, nominal(make(b), inv)):
            return b
    return None


def _derive_kind(cfg: dict) -> str:
    fam, alloc = cfg["family"], cfg.get("allocation", "uniform")
    if fam == "prune":
        return "sparsity"
    if alloc == "bits":
        return "sparsity_picked" if fam == "joint" and cfg["pattern"] == "unstructured" else "avg_bits"
    if fam == "joint" and cfg["pattern"] == "unstructured":
        return "sparsity"
    return "bits"


def resolve(space: SearchSpace, inv: Inventory, budget: Budget) -> Resolved:
    """Fixed choice sets for a study: drop what this model's shapes or this budget can never satisfy."""
    r = Resolved(space)
    r.group_sizes = [g for g in space.group_sizes if g == 0 or g <= inv.min_in_features]
    r.patterns = ["unstructured"] + [p for p in space.nm_patterns
                                     if all(layer.in_features % int(p.split(":")[1]) == 0 for layer in inv.layers)]
    base = {"prune_method": space.prune_methods[0], "quant_method": space.quant_methods[0],
            "group_size": r.group_sizes[0] if r.group_sizes else 0, "joint": "keep-mask", "alloc_choices": space.alloc_choices}
    for b in space.bits:  # joint unstructured: bits whose derived sparsity is a real pruning level
        cfg = {**base, "family": "joint", "pattern": "unstructured", "bits": b, "derive": "sparsity"}
        s = derive(cfg, inv, budget, space)
        if s is not None and 0.05 <= s <= space.max_sparsity:
            r.joint_bits.append(b)
    for fam in space.families:
        if fam not in FAMILIES:
            raise PrunequantError(f"unknown family {fam!r}; choose from {', '.join(FAMILIES)}")
        cfgs = []
        if fam == "joint":
            ok = bool(r.joint_bits) or any(derive(c, inv, budget, space) is not None
                                           for c in _joint_extremes(space, r, base))
        elif fam == "quant":
            cfgs = [{**base, "family": "quant", "derive": "bits", "bits": None}]
            if "bits" in space.allocations:
                cfgs.append({**base, "family": "quant", "allocation": "bits", "derive": "avg_bits"})
            ok = any(derive(c, inv, budget, space) is not None for c in cfgs)
        else:
            c = {**base, "family": "prune", "pattern": "unstructured", "derive": "sparsity"}
            ok = derive(c, inv, budget, space) is not None
        if ok and (fam == "prune" or r.group_sizes):
            r.families.append(fam)
    if not r.families:
        raise PrunequantError(f"no configuration of the search space can meet {budget.describe()}; "
                              "loosen the budget or widen the space (bits, sparsity)")
    return r


def _joint_extremes(space: SearchSpace, r: Resolved, base: dict) -> list[dict]:
    """The most compressing joint configurations of each kind: if none meets the budget, no joint one does."""
    cfgs = [{**base, "family": "joint", "pattern": p, "derive": "bits"} for p in r.patterns[1:]]
    if "bits" in space.allocations:
        cfgs += [{**base, "family": "joint", "pattern": p, "allocation": "bits", "derive": "avg_bits",
                  "sparsity": max(space.sparsity_range)} for p in r.patterns]
    return cfgs


def preflight(recipe: Recipe, inv: Inventory) -> None:
    """Run every distinct layer plan of ``recipe`` once on a small matrix, to fail fast on a refused plan."""
    import torch

    from ..errors import RecipeError
    from ..solvers import solve_layer
    from ..solvers.base import LayerStats

    seen = set()
    for layer in inv.layers:
        plan = recipe.plan_for(layer.name)
        if plan.is_identity or (plan, layer.in_features) in seen:
            continue
        seen.add((plan, layer.in_features))
        n = layer.in_features
        g = torch.Generator().manual_seed(0)
        stats = LayerStats(hessian=torch.eye(n), sq_norm=torch.ones(n), n_tokens=n)
        try:
            solve_layer(torch.randn(2, n, generator=g), stats, plan)
        except RecipeError as e:
            raise Infeasible(f"the solvers refuse {recipe.describe()}: {e}") from None


def suggest(trial, res: Resolved, inv: Inventory, budget: Budget) -> tuple[Recipe, dict]:
    """Ask the trial for a configuration; derive the last variable. Raises Infeasible."""
    sp = res.space
    cfg: dict = {"family": _cats(trial, "family", res.families), "alloc_choices": list(sp.alloc_choices)}
    fam = cfg["family"]
    if fam in ("joint", "prune"):
        cfg["prune_method"] = _cats(trial, "prune_method", sp.prune_methods)
        cfg["pattern"] = _cats(trial, "pattern", res.patterns) if fam == "joint" else "unstructured"
    if fam in ("joint", "quant"):
        cfg["quant_method"] = _cats(trial, "quant_method", sp.quant_methods)
        cfg["group_size"] = _cats(trial, "group_size", res.group_sizes)
    if fam == "joint":
        obs = cfg["prune_method"] == "sparsegpt" and cfg["quant_method"] == "gptq"
        modes = [m for m in sp.joint_modes if obs or m != "onepass"]
        cfg["joint"] = _cats(trial, "joint" if obs else "joint_sequential", modes)
    # GPTQ act-order: not with the one-pass joint solver on N:M groups (it visits columns out of order)
    nm_onepass = fam == "joint" and cfg["pattern"] != "unstructured" and cfg["joint"] == "onepass"
    if cfg.get("quant_method") == "gptq" and not nm_onepass:
        cfg["act_order"] = _cats(trial, "act_order", sp.act_order)
    allocs = _allocations(sp, cfg)
    cfg["allocation"] = _cats(trial, "allocation:" + ",".join(allocs), allocs)
    if cfg["allocation"] == "owl":
        cfg["owl_lambda"] = trial.suggest_float("owl_lambda", *sp.owl_lambda, step=0.01)
    kind = _derive_kind(cfg)
    if kind == "sparsity_picked":
        cfg["sparsity"] = trial.suggest_float("sparsity", *sp.sparsity_range, step=0.05)
        kind = "avg_bits"
    elif kind == "sparsity" and fam == "joint":
        if not res.joint_bits:
            raise Infeasible("no bit width leaves a sparsity in range for joint unstructured compression")
        cfg["bits"] = _cats(trial, "bits", res.joint_bits)
    cfg["derive"] = kind
    # edges: offer only the treatments that still meet the budget (cheapest first, so the offer is a prefix)
    allowed = [e for e in sp.edges if e != "8bit" or (cfg["allocation"] == "uniform" and fam != "prune")]
    offer, values = [], {}
    for e in allowed:
        v = derive({**cfg, "edges": e}, inv, budget, sp)
        if v is None or (kind == "sparsity" and fam == "joint" and v < 0.05):
            continue
        offer.append(e)
        values[e] = v
    if not offer:
        raise Infeasible(f"{fam} with {cfg} cannot meet {budget.describe()}")
    cfg["edges"] = _cats(trial, "edges:" + ",".join(offer), offer)
    cfg["refine"] = _cats(trial, "refine", sp.refine)
    if cfg["refine"] != "none":
        cfg["refine_steps"] = sp.refine_steps
    x = values[cfg["edges"]]
    recipe = build_recipe(cfg, inv, x)
    preflight(recipe, inv)
    fig = nominal(recipe, inv)
    info = {"short": short_describe(recipe), "config": {k: v for k, v in cfg.items() if k != "alloc_choices"}, "derived": {kind: x},
            "nominal_tcr": fig["tcr"], "predicted_bytes": fig["predicted_bytes"]}
    return recipe, info


# Warm start: the standard recipes of the literature at this budget (SparseGPT + GPTQ at 4 or 3 bits with the
# sparsity that meets the budget, GPTQ alone, 2:4 + GPTQ), tried first so that the search starts
# where a careful hand-picker would and can only improve on them (TPE models the rest from these points).
# With refinement in the space, the first of them is also tried refined in each mode on offer (seed_params).
SEED_PREFERENCES = (
    {"family": "joint", "prune_method": "sparsegpt", "pattern": "unstructured", "quant_method": "gptq",
     "group_size": 128, "joint": "onepass", "act_order": False, "allocation": "uniform", "edges": "none",
     "bits": (4,)},
    {"family": "joint", "prune_method": "sparsegpt", "pattern": "unstructured", "quant_method": "gptq",
     "group_size": 128, "joint": "onepass", "act_order": False, "allocation": "uniform", "edges": "none",
     "bits": (3,)},
    {"family": "quant", "quant_method": "gptq", "group_size": 128, "act_order": False, "allocation": "uniform",
     "edges": "none"},
    {"family": "joint", "prune_method": "sparsegpt", "pattern": "2:4", "quant_method": "gptq", "group_size": 128,
     "joint": "onepass", "allocation": "uniform", "edges": "none"},
)


class _SeedTrial:
    """Stands in for an optuna trial: answers each question from a preference, records the parameters."""

    def __init__(self, prefs: dict):
        self.prefs, self.params = prefs, {}

    def suggest_categorical(self, name, choices):
        key = name.split(":")[0]
        want = self.prefs.get(key, choices[0])
        if isinstance(want, tuple):  # preferences in order: the first on offer
            want = next((w for w in want if w in choices), None)
        if key == "group_size" and want not in choices:  # narrow model: the widest group it has
            want = max(choices, key=lambda g: (g != 0, g))
        if want not in choices:
            raise Infeasible(f"seed wants {key}={want!r}, not on offer ({list(choices)})")
        self.params[name] = want
        return want

    def suggest_float(self, name, low, high, step=None):
        v = self.prefs.get(name, low)
        self.params[name] = v
        return v


def seed_params(res: Resolved, inv: Inventory, budget: Budget) -> list[dict]:
    """optuna parameter sets of the standard recipes that this model and budget admit (duplicates dropped),
    then the first of them refined in each mode the space offers (what a hand-picker would try next)."""
    refined = tuple({**SEED_PREFERENCES[0], "refine": m} for m in res.space.refine if m != "none")
    out = []
    for prefs in SEED_PREFERENCES + refined:
        t = _SeedTrial(prefs)
        try:
            suggest(t, res, inv, budget)
        except Infeasible:
            continue
        if t.params not in out:
            out.append(t.params)
    return out
