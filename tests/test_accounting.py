"""One ledger: `prunequant size` on the compact export, the compress report and the search budget agree."""
import pytest

from prunequant.accounting import summarize
from prunequant.api import linear_param_counts
from prunequant.engine import compress_model
from prunequant.export import export
from prunequant.export.size import size_report
from prunequant.recipe import PruneSpec, QuantSpec, Recipe
from prunequant.search.budget import Inventory, nominal

from tiny import tiny_model

RECIPES = [
    Recipe(quant=QuantSpec("rtn", 3, 32)),
    Recipe(quant=QuantSpec("rtn", 4, 0, symmetric=True)),
    Recipe(quant=QuantSpec("rtn", 1.58, 16, symmetric=True)),
    Recipe(prune=PruneSpec("magnitude", 0.5)),
    Recipe(prune=PruneSpec("magnitude", 0.4), quant=QuantSpec("rtn", 4, 16), joint="B"),
    Recipe(prune=PruneSpec("magnitude", n=2, m=4), quant=QuantSpec("rtn", 8, 32), joint="B"),
]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.describe())
def test_size_report_and_budget_agree(recipe, tmp_path):
    m = tiny_model()
    rep = compress_model(m, None, recipe.plan_for, device="cpu", progress=False)
    rates = summarize(rep.layers, recipe.plan_for, sum(p.numel() for p in m.parameters()), linear_param_counts(m))
    fig = nominal(recipe, Inventory.of(tiny_model()))
    size = size_report(export(m, rep.states, tmp_path / "c", fmt="compact"))
    n_layers = len(rep.layers)
    assert rates["tcr"] == pytest.approx(size["compressed"]["tcr"], abs=1e-6)  # the report rounds sparsity
    assert rates["tcr"] == pytest.approx(fig["tcr"], abs=1e-3)  # only the rounding of pruned counts differs
    assert rates["compressed_bytes"] == pytest.approx(fig["linear_bytes"], rel=1e-3)
    # the export pads each stored tensor to whole bytes (≤ 5 tensors per layer); it may also find a cheaper
    # layout than the recipe's (ternary codes that are mostly 0: a mask of the non-zeros), never a dearer one
    extra = size["compressed"]["bytes"] - rates["compressed_bytes"]
    assert extra <= 5 * n_layers
    if recipe.quant is None or recipe.quant.bits != 1.58:
        assert extra >= 0


def test_layer_bits_by_hand():
    from prunequant.accounting import layer_bits
    from prunequant.recipe import LayerPlan

    q4 = QuantSpec("rtn", 4, 128)
    # 4-bit codes, per group an fp16 scale and a 4-bit zero point
    assert layer_bits((256, 512), LayerPlan(quant=q4)) == 256 * 512 * 4 + 256 * 4 * (16 + 4)
    sym = QuantSpec("rtn", 4, 128, symmetric=True)
    assert layer_bits((256, 512), LayerPlan(quant=sym)) == 256 * 512 * 4 + 256 * 4 * 16
    # 50% unstructured: half the codes and a 1-bit mask; 2:4: 3 bits name the kept pair of every 4 weights
    half = LayerPlan(prune=PruneSpec("sparsegpt", 0.5), quant=q4, joint="keep-mask")
    assert layer_bits((256, 512), half) == 256 * 512 * (2 + 1) + 256 * 4 * 20
    nm = LayerPlan(prune=PruneSpec("sparsegpt", n=2, m=4))
    assert layer_bits((256, 512), nm) == 256 * 512 * (8 + 3 / 4)
    # quantize-pruned keeps no mask: every weight is a code
    a = LayerPlan(prune=PruneSpec("sparsegpt", 0.5), quant=q4, joint="quantize-pruned")
    assert layer_bits((256, 512), a) == layer_bits((256, 512), LayerPlan(quant=q4))
