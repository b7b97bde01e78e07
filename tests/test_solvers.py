"""The solver registry: every recipe method has exactly one entry; unknown names fail clearly."""
import pytest
import torch

from prunequant.errors import RecipeError
from prunequant.recipe import PRUNE_METHODS, QUANT_METHODS, LayerPlan, PruneSpec, QuantSpec
from prunequant.solvers import SOLVERS, needs, row_separable, run_quantize, solver
from prunequant.solvers.base import LayerStats


def test_registry_covers_recipe_methods():
    # plus channel-mixed quantization, whose per-layer channel sets come from a structural allocation
    assert set(SOLVERS) == set(PRUNE_METHODS) | set(QUANT_METHODS) | {"mixed", "mixed-rtn"}


def test_unknown_method_is_a_clear_error():
    with pytest.raises(RecipeError, match="unknown method 'obq'.*gptq"):
        solver("obq")


@pytest.mark.parametrize("plan, need", [
    (LayerPlan(), None),
    (LayerPlan(prune=PruneSpec(method="magnitude"), quant=QuantSpec(method="rtn")), None),
    (LayerPlan(prune=PruneSpec(method="wanda"), quant=QuantSpec(method="rtn")), "sq_norm"),
    (LayerPlan(prune=PruneSpec(method="wanda"), quant=QuantSpec(method="gptq")), "hessian"),
    (LayerPlan(prune=PruneSpec(method="sparsegpt")), "hessian"),
])
def test_needs_is_the_strongest_statistic(plan, need):
    assert needs(plan) == need


def test_row_separable_gptq_rows_solve_independently():
    assert row_separable(LayerPlan(quant=QuantSpec(method="gptq"))) and not row_separable(
        LayerPlan(prune=PruneSpec(method="sparsegpt"), quant=QuantSpec(method="gptq")))
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(6, 16, generator=g, dtype=torch.float64), torch.randn(16, 100, generator=g, dtype=torch.float64)
    stats = LayerStats(hessian=X @ X.T / 100, sq_norm=None, n_tokens=100)
    spec = QuantSpec(bits=3, group_size=8)
    whole = run_quantize(W, stats, spec).weight
    halves = torch.cat([run_quantize(W[:3], stats, spec).weight, run_quantize(W[3:], stats, spec).weight])
    assert torch.allclose(whole, halves, atol=1e-12)


def test_stored_results_hold_masks_as_bits():
    import pickle

    from prunequant.solvers.base import LayerResult, StoredResult

    mask = torch.rand(37, 53) > 0.5  # a size that is no multiple of 8
    kept = LayerResult(weight=torch.zeros(37, 53), mask=mask).for_export()
    assert isinstance(kept, StoredResult) and kept.weight is None
    assert kept.mask.dtype == torch.bool and torch.equal(kept.mask, mask)
    assert kept.__dict__["_mask_bits"][1].nbytes == (37 * 53 + 7) // 8  # an eighth of the bool tensor
    assert torch.equal(pickle.loads(pickle.dumps(kept)).mask, mask)  # search workers send states between processes
    assert LayerResult(weight=torch.zeros(2, 2)).for_export().mask is None


@pytest.mark.parametrize("bits,packed", [(4, True), (3, True), (8, False)])
def test_stored_results_hold_low_bit_codes_two_to_a_byte(bits, packed):
    import pickle

    from prunequant.solvers.base import LayerResult, QuantState

    codes = torch.randint(0, 2 ** bits, (37, 53), dtype=torch.uint8)  # an odd count: the last byte half-used
    q = QuantState("uniform", bits, 32, False, codes=codes, scale=torch.rand(37, 2), zero=torch.rand(37, 2),
                   g_idx=(torch.arange(53) // 32).int())
    kept = LayerResult(weight=torch.zeros(37, 53), quant=q).for_export()
    assert kept.quant.codes.dtype == torch.uint8 and torch.equal(kept.quant.codes, codes)
    assert torch.equal(kept.quant.dequantize(), q.dequantize())
    held = kept.__dict__["_code_nibbles"]
    assert (held is not None and held[0].nbytes == (37 * 53 + 1) // 2) == packed
    assert torch.equal(pickle.loads(pickle.dumps(kept)).quant.codes, codes)


@pytest.mark.parametrize("in_f,gs", [(576, 128), (512, 128), (70, 64), (100, 0), (64, 32)])
def test_dequantize_equals_the_per_column_gather_bit_for_bit(in_f, gs):
    from prunequant.solvers.base import QuantState
    from prunequant.solvers.grid import group_index

    torch.manual_seed(in_f + gs)
    n = 1 if gs == 0 else -(-in_f // gs)
    q = QuantState("uniform", 4, gs, False, codes=torch.randint(0, 16, (6, in_f), dtype=torch.uint8),
                   scale=torch.rand(6, n) * 0.1, zero=torch.randint(0, 16, (6, n)).float(), g_idx=group_index(in_f, gs))
    for _ in range(2):  # contiguous groups (the reshaped path), then act-order's permuted groups (the gather)
        g = q.g_idx.long()
        reference = torch.stack([q.scale[r, g] * (q.codes[r].float() - q.zero[r, g]) for r in range(6)])
        assert torch.equal(q.dequantize(), reference)
        q.g_idx = q.g_idx[torch.randperm(in_f)]


def test_stored_results_unpack_on_the_device_they_are_asked_for():
    from prunequant.solvers.base import LayerResult, QuantState

    codes = torch.randint(0, 16, (9, 40), dtype=torch.uint8)
    mask = torch.rand(9, 40) > 0.5
    q = QuantState("uniform", 4, 32, False, codes=codes, scale=torch.rand(9, 2), zero=torch.rand(9, 2),
                   g_idx=(torch.arange(40) // 32).int(), extra={"perm": torch.arange(40)})
    for kept in (LayerResult(weight=None, mask=mask, quant=q), LayerResult(weight=None, mask=mask, quant=q).for_export()):
        moved = kept.quant_on("cpu")
        assert moved is not q and torch.equal(moved.codes, codes) and torch.equal(moved.dequantize(), q.dequantize())
        assert torch.equal(moved.extra["perm"], q.extra["perm"])
        assert kept.mask_on("cpu").dtype == torch.bool and torch.equal(kept.mask_on("cpu"), mask)
    assert LayerResult(weight=torch.zeros(2, 2)).for_export().quant_on("cpu") is None
