"""Recipes as data: what to prune and quantize, globally and per layer by name pattern (docs/internals.md)."""
from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import RecipeError

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
QUANT_METHODS = ("rtn", "gptq", "billm")
SUPPORTED_BITS = (1, 1.58, 2, 3, 4, 5, 6, 7, 8)
ALLOCATIONS = ("uniform", "owl", "bits")
REFINE_MODES = ("blockwise", "global", "both")
# one-pass joint OBS; prune then quantize every weight, zeros included (no mask kept); prune then quantize the kept
# weights (mask kept exact). "A" and "B" are the older names of the last two.
JOINT_MODES = ("onepass", "quantize-pruned", "keep-mask")
JOINT_ALIASES = {"A": "quantize-pruned", "B": "keep-mask"}


def joint_mode(name: str) -> str:
    mode = JOINT_ALIASES.get(name, name)
    if mode not in JOINT_MODES:
        raise RecipeError(f"joint mode {name!r} unknown; choose one of {', '.join(JOINT_MODES)}")
    return mode


@dataclass(frozen=True)
class PruneSpec:
    method: str = "sparsegpt"
    sparsity: float = 0.5
    n: int = 0  # n of every m pruned; 0 = unstructured
    m: int = 0
    blocksize: int = 128
    damp: float = 0.01

    def __post_init__(self):
        _numbers(self, sparsity=float, n=int, m=int, blocksize=int, damp=float)
        if self.method not in PRUNE_METHODS:
            raise RecipeError(f"unknown pruning method {self.method!r}; choose one of {', '.join(PRUNE_METHODS)}")
        if self.n or self.m:
            if not (isinstance(self.n, int) and isinstance(self.m, int)) or self.m < 2 or self.n < 1:
                raise RecipeError(f"N:M pattern {self.n}:{self.m} is invalid: need integers 1 <= N < M")
            if self.n >= self.m:
                raise RecipeError(f"N:M pattern {self.n}:{self.m} prunes every weight: N (pruned per group) must be < M")
            object.__setattr__(self, "sparsity", self.n / self.m)
        if not (0.0 <= float(self.sparsity) < 1.0) or math.isnan(float(self.sparsity)):
            raise RecipeError(f"sparsity {self.sparsity} is outside [0, 1); e.g. use 0.5 for 50% of weights pruned")
        if not 0 <= self.damp < 1:
            raise RecipeError(f"damping {self.damp} must be in [0, 1), e.g. 0.01")

    @property
    def structured(self) -> bool:
        return self.m > 0

    def describe(self) -> str:
        if self.structured:
            return (f"{self.method} {self.n}:{self.m} ({self.n} of every {self.m} weights pruned, "
                    f"{self.sparsity:.1%} sparsity)")
        return f"{self.method} {self.sparsity:.1%} unstructured"


@dataclass(frozen=True)
class QuantSpec:
    method: str = "gptq"
    bits: float = 4
    group_size: int = 128  # 0 = per output channel
    symmetric: bool = False
    act_order: bool = False
    mse_clip: bool = False
    damp: float = 0.01
    blocksize: int = 128
    ragged: bool = False  # allow a group size that does not divide a layer (last group of a row smaller)

    def __post_init__(self):
        _numbers(self, bits=_bits, group_size=int, damp=float, blocksize=int)
        if self.method not in QUANT_METHODS:
            raise RecipeError(f"unknown quantization method {self.method!r}; choose one of {', '.join(QUANT_METHODS)}")
        if self.bits not in SUPPORTED_BITS:
            raise RecipeError(f"{self.bits}-bit weights are not supported; choose one of "
                              f"{', '.join(str(b) for b in SUPPORTED_BITS)} (1.58 = ternary)")
        if self.method == "billm" and self.bits != 1:
            raise RecipeError("billm is the 1-bit method: use bits=1 (or rtn/gptq for more bits)")
        if self.bits == 1 and self.method != "billm":
            raise RecipeError("1-bit weights need the residual-binarization method: use billm:1")
        if self.group_size < 0 or (self.group_size and self.group_size % 8):
            raise RecipeError(f"group size {self.group_size} must be 0 (per channel) or a positive multiple of 8, e.g. 128")
        if not 0 <= self.damp < 1:
            raise RecipeError(f"damping {self.damp} must be in [0, 1), e.g. 0.01")

    def describe(self) -> str:
        g = f"g{self.group_size}{'r' if self.ragged else ''}" if self.group_size else "per-channel"
        b = "ternary (1.58-bit)" if self.bits == 1.58 else f"{self.bits:g}-bit"
        return f"{self.method} {b} {g} {'sym' if self.symmetric else 'asym'}{' act-order' if self.act_order else ''}"


@dataclass(frozen=True)
class RefineSpec:
    """End-to-end refinement after the layer-wise solve (refine/; learning-rate units: docs/internals.md)."""

    mode: str = "blockwise"
    steps: int = 100  # optimiser steps per block (block-wise stage)
    global_steps: int = 0  # steps of the global stage (0 = same as steps)
    lr_code: float = 5e-3
    # codes barely flip at lr_code over ~50 steps: the scales carry the gain, at a rate chosen on held-out
    # calibration windows (BENCHMARKS.md, issue 19)
    lr_scale: float = 2e-2
    topk: int = 64  # teacher log-probabilities kept per token for the global KL (plus the tail mass)
    global_batch: int = 4  # windows per global step
    # the global stage moves every layer at once: its rates are lr_code and lr_scale times this (0.1 chosen on
    # held-out calibration windows, BENCHMARKS.md, issue 19)
    global_lr: float = 0.1
    # Adam rate of the normalisation layers' weights (stored in full precision, so the format and TCr stay as
    # they are; "norm tweaking", Li et al. 2024); 0 = frozen
    lr_norm: float = 0.0
    # share of the calibration windows the global stage does not train on but judges by (best step, keep or not)
    holdout: float = 0.125
    # block-wise targets: the original block on the same (compressed-stream) inputs, or the original model's
    # own activations at that depth (then each block also learns to undo the error of the blocks before it)
    target: str = "same-inputs"
    # learning rate over each stage's steps: constant, or cosine decay to zero (EfficientQAT's schedule)
    schedule: str = "constant"

    def __post_init__(self):
        _numbers(self, steps=int, global_steps=int, lr_code=float, lr_scale=float, topk=int, global_batch=int,
                 holdout=float, global_lr=float, lr_norm=float)
        if self.mode not in REFINE_MODES:
            raise RecipeError(f"refine mode {self.mode!r} unknown; choose one of {', '.join(REFINE_MODES)}")
        if self.steps < 1 or self.global_steps < 0:
            raise RecipeError(f"refine steps {self.steps} must be a positive integer, e.g. 100")
        if not self.global_lr > 0:
            raise RecipeError(f"refine global_lr {self.global_lr} must be positive (a multiplier of the rates)")
        if not (self.lr_code > 0 and self.lr_scale >= 0 and self.lr_norm >= 0):
            raise RecipeError("refine learning rates must be positive (lr_code) and non-negative (lr_scale, lr_norm)")
        if self.target not in ("same-inputs", "original-stream"):
            raise RecipeError(f"refine target {self.target!r} unknown; choose same-inputs or original-stream")
        if self.schedule not in ("constant", "cosine"):
            raise RecipeError(f"refine schedule {self.schedule!r} unknown; choose constant or cosine")
        if self.topk < 1 or self.global_batch < 1:
            raise RecipeError("refine topk and global_batch must be >= 1")
        if not 0 <= self.holdout < 1:
            raise RecipeError(f"refine holdout {self.holdout} must be a share of the calibration windows in [0, 1)")

    @property
    def blockwise(self) -> bool:
        return self.mode in ("blockwise", "both")

    @property
    def global_stage(self) -> bool:
        return self.mode in ("global", "both")

    @property
    def n_global_steps(self) -> int:
        return self.global_steps or self.steps

    def describe(self) -> str:
        steps = f"{self.steps} steps/block" if self.blockwise else ""
        if self.global_stage:
            steps = ", ".join(s for s in (steps, f"{self.n_global_steps} global KL steps") if s)
        return f"refined {self.mode} ({steps})"


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one linear layer. Both None = left dense and unquantized."""

    prune: PruneSpec | None = None
    quant: QuantSpec | None = None
    joint: str = "onepass"

    def __post_init__(self):
        object.__setattr__(self, "joint", joint_mode(self.joint))

    @property
    def is_identity(self) -> bool:
        return (self.prune is None or self.prune.sparsity == 0) and self.quant is None


@dataclass
class Override:
    """Per-layer change by module-name glob (fnmatch) or regex (prefix ``re:``)."""

    pattern: str
    skip: bool = False
    prune: dict | None = None  # fields to change in the global PruneSpec; {} with "sparsity": 0 = dense
    quant: dict | None = None

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern:
            raise RecipeError(f"override pattern {self.pattern!r} must be a non-empty string (a glob, or re:REGEX)")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as e:
                raise RecipeError(f"override pattern {self.pattern!r} is not a valid regular expression ({e})") \
                    from None
        for key in ("prune", "quant"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, dict):
                raise RecipeError(f"override {self.pattern!r}: {key} must be a mapping of fields to change, "
                                  f"e.g. {{bits: 8}}, not {v!r}")

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.search(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)


@dataclass(frozen=True)
class Allocation:
    """How a budget is spread over the layers (allocate.py) and the allocator's options."""

    method: str = "uniform"  # uniform, owl (per-block sparsity) or bits (per-layer bit widths)
    avg_bits: float | None = None  # bits: the average-bit budget
    choices: tuple = (2, 3, 4, 8)  # bits: candidate widths
    proxy: str = "rtn"  # bits: the quantizer that measures each width's error (gptq: the solver itself)
    weighting: str = "fisher"  # bits: errors weighted by the loss's output Fisher, or none
    lam: float = 0.08  # owl: largest deviation from the mean sparsity
    M: float = 5.0  # owl: outlier threshold, in multiples of the mean score

    def __post_init__(self):
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.method not in ALLOCATIONS:
            raise RecipeError(f"unknown allocation {self.method!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.method == "bits" and self.avg_bits is None:
            raise RecipeError("bit allocation needs an average-bit budget: --avg-bits 3.0, or "
                              "allocation: {method: bits, avg_bits: 3.0}")
        if self.weighting not in ("fisher", "none"):
            raise RecipeError(f"unknown bit-allocation weighting {self.weighting!r}; choose fisher or none")
        if self.proxy not in QUANT_METHODS:
            raise RecipeError(f"unknown bit-allocation proxy {self.proxy!r}; choose one of {', '.join(QUANT_METHODS)}")

    @classmethod
    def parse(cls, value) -> "Allocation":
        """From a method name (``bits``), a mapping (``{method: owl, lam: 0.1}``) or an Allocation."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            value = {"method": value}
        if not isinstance(value, dict):
            raise RecipeError(f"allocation must be a method name or a mapping such as {{method: owl}}, not {value!r}")
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise RecipeError(f"unknown allocation option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**value)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["choices"] = list(self.choices)
        return d


@dataclass
class Recipe:
    prune: PruneSpec | None = None
    quant: QuantSpec | None = None
    joint: str = "onepass"
    allocation: Allocation = field(default_factory=lambda: Allocation())
    overrides: list[Override] = field(default_factory=list)
    true_sequential: bool = True
    refine: RefineSpec | None = None

    def __post_init__(self):
        self.allocation = Allocation.parse(self.allocation)
        self.joint = joint_mode(self.joint)
        for o in self.overrides:
            for spec, cls in ((o.prune, PruneSpec), (o.quant, QuantSpec)):
                if spec:
                    unknown = set(spec) - set(cls.__dataclass_fields__)
                    if unknown:
                        raise RecipeError(f"override {o.pattern!r}: unknown field(s) {sorted(unknown)}")

    # ---- per-layer resolution -------------------------------------------------------------
    def plan_for(self, name: str) -> LayerPlan:
        prune, quant = self.prune, self.quant
        for o in self.overrides:
            if not o.matches(name):
                continue
            if o.skip:
                return LayerPlan()
            if o.prune is not None:
                prune = _merge(prune, o.prune, PruneSpec) if o.prune else None
            if o.quant is not None:
                quant = _merge(quant, o.quant, QuantSpec) if o.quant else None
        if prune is not None and prune.sparsity == 0:
            prune = None
        return LayerPlan(prune=prune, quant=quant, joint=self.joint)

    # ---- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "prune": asdict(self.prune) if self.prune else None,
            "quant": asdict(self.quant) if self.quant else None,
            "joint": self.joint,
            "allocation": self.allocation.to_dict(),
            "overrides": [asdict(o) for o in self.overrides],
            "true_sequential": self.true_sequential,
            **({"refine": asdict(self.refine)} if self.refine else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict):
            raise RecipeError("a recipe must be a mapping with keys such as prune, quant, overrides")
        known = {"prune", "quant", "joint", "allocation", "overrides", "true_sequential", "refine"}
        unknown = set(d) - known
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {sorted(unknown)}; known: {sorted(known)}")
        try:
            return cls(
                prune=PruneSpec(**d["prune"]) if d.get("prune") else None,
                quant=QuantSpec(**d["quant"]) if d.get("quant") else None,
                joint=d.get("joint", "onepass"),
                allocation=d.get("allocation") or Allocation(),
                overrides=[Override(**o) if isinstance(o, dict) else _bad_override(o)
                           for o in d.get("overrides") or []],
                true_sequential=bool(d.get("true_sequential", True)),
                refine=_refine_of(d.get("refine")),
            )
        except TypeError as e:
            raise RecipeError(f"malformed recipe: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} not found")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - any parse error is the user's file
            raise RecipeError(f"cannot parse recipe {path}: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2))

    def describe(self) -> str:
        parts = [self.prune.describe() if self.prune else None, self.quant.describe() if self.quant else None]
        s = " + ".join(p for p in parts if p) or "no compression"
        if self.prune and self.quant:
            s += f" [{self.joint}]"
        if self.refine:
            s += f", {self.refine.describe()}"
        return s


def _refine_of(d) -> RefineSpec | None:
    """A recipe's ``refine`` key: a mode name or a mapping of RefineSpec fields."""
    if not d:
        return None
    if isinstance(d, str):
        return RefineSpec(mode=d)
    if not isinstance(d, dict):
        raise RecipeError(f"refine must be a mode ({', '.join(REFINE_MODES)}) or a mapping such as "
                          f"{{mode: both, steps: 100}}, not {d!r}")
    return RefineSpec(**d)


def _bad_override(o):
    raise RecipeError(f"each override must be a mapping such as {{pattern: '*.k_proj', skip: true}}, not {o!r}")


def _bits(v):
    return float(v) if float(v) != int(float(v)) else int(float(v))


def _numbers(spec, **kinds) -> None:
    """Numeric fields of a frozen spec as numbers, or a RecipeError naming the field (YAML gives strings)."""
    for name, kind in kinds.items():
        v = getattr(spec, name)
        if isinstance(v, bool):
            raise RecipeError(f"{name} {v!r} must be a number")
        try:
            num = kind(v)
        except (TypeError, ValueError, OverflowError):
            raise RecipeError(f"{name} {v!r} is not a number; e.g. "
                              f"{ {'sparsity': '0.5', 'bits': '4', 'group_size': '128'}.get(name, '1')}") from None
        if kind is int and num != float(v):
            raise RecipeError(f"{name} {v!r} must be a whole number")
        object.__setattr__(spec, name, num)


def _merge(base, changes: dict, cls):
    return cls(**changes) if base is None else replace(base, **changes)


# ---- command-line shorthands ------------------------------------------------------------------

def parse_prune(text: str) -> PruneSpec:
    """``sparsegpt:0.5``, ``wanda:2:4`` (2 of every 4 pruned), ``magnitude:0.7``."""
    parts = text.split(":")
    try:
        if len(parts) == 2:
            return PruneSpec(method=parts[0], sparsity=float(parts[1]))
        if len(parts) == 3:
            return PruneSpec(method=parts[0], n=int(parts[1]), m=int(parts[2]))
    except ValueError:
        pass
    raise RecipeError(f"cannot read --prune {text!r}: use METHOD:SPARSITY (sparsegpt:0.5) or METHOD:N:M (wanda:2:4)")


_QUANT_OPTIONS = {"pc": ("group_size", 0), "perchannel": ("group_size", 0), "sym": ("symmetric", True),
                  "asym": ("symmetric", False), "actorder": ("act_order", True), "act_order": ("act_order", True),
                  "mse": ("mse_clip", True), "ragged": ("ragged", True)}


def parse_quant(text: str) -> QuantSpec:
    """``gptq:4:g128``, ``rtn:8``, ``gptq:3:g64:sym:actorder:mse``, ``gptq:1.58`` (ternary), ``billm:1``."""
    parts = text.split(":")
    if len(parts) < 2:
        raise RecipeError(f"cannot read --quant {text!r}: use METHOD:BITS[:gGROUP][:sym][:actorder][:mse], e.g. gptq:4:g128")
    kw: dict = {"method": parts[0]}
    try:
        kw["bits"] = float(parts[1]) if "." in parts[1] else int(parts[1])
    except ValueError:
        raise RecipeError(f"bits {parts[1]!r} in --quant {text!r} is not a number") from None
    for p in parts[2:]:
        if re.fullmatch(r"g\d+", p):
            kw["group_size"] = int(p[1:])
        elif p in _QUANT_OPTIONS:
            kw.update([_QUANT_OPTIONS[p]])
        else:
            raise RecipeError(f"unknown --quant option {p!r}; options: gN, pc, sym, asym, actorder, mse, ragged")
    if kw["bits"] == 1.58:
        kw.setdefault("symmetric", True)
    return QuantSpec(**kw)
