"""Allocators on the real engine: OWL per-block sparsity and knapsack bit allocation."""
import pytest
import torch

from prunequant.allocate import allocate
from prunequant.engine import compress_model
from prunequant.errors import RecipeError
from prunequant.models import all_linear_names, get_weight
from prunequant.recipe import PruneSpec, QuantSpec, Recipe
from tiny import tiny_model


def calib():
    return torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))


def test_owl_keeps_global_sparsity_and_changes_per_block():
    model = tiny_model("llama")
    recipe = Recipe(prune=PruneSpec("wanda", 0.5), allocation={"method": "owl", "lam": 0.1, "M": 3})
    before = {n: get_weight(model.get_submodule(n)).clone() for n in all_linear_names(model)}
    planned, info = allocate(model, recipe, calib(), device="cpu")
    # measuring leaves the model untouched
    assert all(torch.equal(before[n], get_weight(model.get_submodule(n))) for n in before)
    sp = info["sparsity"]
    assert len(sp) == 2 and sum(sp.values()) / 2 == pytest.approx(0.5, abs=1e-9)
    assert all(0.4 - 1e-9 <= s <= 0.6 + 1e-9 for s in sp.values())
    rep = compress_model(model, calib(), planned.plan_for, device="cpu", progress=False)
    for b, s in sp.items():
        got = [r["sparsity"] for n, r in rep.layers.items() if f".{b}." in n]
        assert got and all(g == pytest.approx(s, abs=0.01) for g in got)


def test_bit_allocation_meets_budget_and_prefers_sensitive_layers():
    model = tiny_model("llama")
    recipe = Recipe(quant=QuantSpec("gptq", 4, 32), allocation={"method": "bits", "avg_bits": 3.0, "choices": [2, 3, 4]})
    planned, info = allocate(model, recipe, calib(), device="cpu")
    bits = info["bits"]
    n = {k: get_weight(model.get_submodule(k)).numel() for k in bits}
    avg = sum(n[k] * b for k, b in bits.items()) / sum(n.values())
    assert avg <= 3.0 + 1e-6 and len(set(bits.values())) > 1
    for k, b in bits.items():
        assert planned.plan_for(k).quant.bits == b
    sens = info["sensitivity"]
    assert all(sens[k][2] >= sens[k][4] for k in sens)


def test_allocation_errors():
    model = tiny_model("llama")
    with pytest.raises(RecipeError, match="avg_bits"):
        allocate(model, Recipe(quant=QuantSpec("rtn", 4, 32), allocation={"method": "bits"}), calib(), device="cpu")
    with pytest.raises(RecipeError, match="unstructured"):
        allocate(model, Recipe(prune=PruneSpec("wanda", n=2, m=4), allocation={"method": "owl"}), calib(), device="cpu")
