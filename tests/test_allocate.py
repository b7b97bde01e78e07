"""Allocators on the real engine: OWL per-block sparsity and knapsack bit allocation."""
from dataclasses import replace

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
        got = [r.sparsity for n, r in rep.layers.items() if f".{b}." in n]
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


def test_output_fisher_matches_autograd_and_leaves_the_model_alone():
    from prunequant.allocate import output_fisher

    model = tiny_model("llama")
    names = all_linear_names(model)
    ids = calib()
    flags = [p.requires_grad for p in model.parameters()]
    fisher = output_fisher(model, ids, names, device="cpu", batch_size=3)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    # reference: gradient of the summed next-token loss w.r.t. one layer's output, squared, token mean
    name = names[3]
    mod = model.get_submodule(name)
    keep = {}

    def grab(m, i, o):
        o.retain_grad()
        keep["o"] = o

    h = mod.register_forward_hook(grab)
    logits = model(ids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    h.remove()
    model.zero_grad(set_to_none=True)
    ref = keep["o"].grad.pow(2).reshape(-1, keep["o"].shape[-1]).sum(0) / ids[:, 1:].numel()
    assert fisher[name].shape == (get_weight(mod).shape[0],)
    torch.testing.assert_close(fisher[name], ref, rtol=1e-4, atol=1e-12)


def test_fisher_weighting_sends_low_bits_where_the_loss_does_not_care(monkeypatch):
    import prunequant.allocate as al

    model = tiny_model("llama")
    names = all_linear_names(model)
    deaf = names[0]
    real = al.output_fisher

    def fake(model, ids, names, **kw):
        f = real(model, ids, names, **kw)
        f[deaf] = torch.zeros_like(f[deaf])  # the loss ignores this layer's output
        return f

    monkeypatch.setattr(al, "output_fisher", fake)
    recipe = Recipe(quant=QuantSpec("rtn", 4, 32), allocation={"method": "bits", "avg_bits": 3.0, "choices": [2, 3, 4]})
    _, info = allocate(model, recipe, calib(), device="cpu")
    assert info["weighting"] == "fisher" and info["bits"][deaf] == 2 and info["sensitivity"][deaf][2] == 0.0
    _, plain = allocate(model, Recipe(quant=recipe.quant, allocation=replace(recipe.allocation, weighting="none")),
                        calib(), device="cpu")
    assert plain["sensitivity"][deaf][2] > 0
    with pytest.raises(RecipeError, match="weighting"):
        allocate(model, Recipe(quant=recipe.quant, allocation={**recipe.allocation.to_dict(), "weighting": "hessian"}), calib(),
                 device="cpu")
