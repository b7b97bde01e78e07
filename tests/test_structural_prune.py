import pytest
import torch

from prunequant.errors import RecipeError
from prunequant.structural import (block_influence, drop_blocks, load_structured, prune_block,
                                   prune_structured, remove_blocks, save_structured)
from prunequant.structural import importance as imp
from prunequant.structural.arch import parts

from structural_models import one_thread, calib, tiny_model

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("kind,gqa,scope", [("llama", "group", "layer"), ("qwen2", "query", "global"),
                                            ("llama", "query", "layer")])
def test_prune_reload_same_logits(tmp_path, kind, gqa, scope):
    model, ids = tiny_model(kind), calib()
    rep = prune_structured(model, ids, head_sparsity=0.5, mlp_sparsity=0.4, gqa=gqa, scope=scope)
    assert rep.params_after < rep.params_before
    for s in rep.shapes:
        assert s["num_attention_heads"] % s["num_key_value_heads"] == 0
        assert s["o_proj_bias"] and s["down_proj_bias"]  # bias compensation added biases
        if gqa == "query":
            assert s["num_key_value_heads"] == 2
    before = logits(model, ids)
    save_structured(model, tmp_path)
    again = load_structured(tmp_path)
    assert [b.mlp.down_proj.in_features for b in again.model.layers] == [s["intermediate_size"] for s in rep.shapes]
    torch.testing.assert_close(logits(again, ids), before, rtol=0, atol=1e-5)


def test_group_mode_removes_whole_kv_groups():
    model, ids = tiny_model(heads=4, kv=2), calib()
    rep = prune_structured(model, ids, head_sparsity=0.5, mlp_sparsity=0.0, gqa="group")
    for s, kept in zip(rep.shapes, rep.kept_heads):
        assert (s["num_attention_heads"], s["num_key_value_heads"]) == (2, 1)
        assert kept in ([0, 1], [2, 3])


def test_bias_compensation_is_exact_for_constant_channels():
    """A channel whose input is constant over tokens is replaced exactly by the added bias."""
    model = tiny_model(layers=1)
    b = model.model.layers[0]
    x = torch.randn(10, 48)
    x[:, 5] = 0.7
    out_full = b.mlp.down_proj(x)
    keep = torch.tensor([i for i in range(48) if i != 5])
    prune_block(parts(model)[0], keep_channels=keep, mlp_mean=x.mean(0))
    torch.testing.assert_close(b.mlp.down_proj(x[:, keep]), out_full, atol=1e-5, rtol=1e-5)


def test_flap_score_matches_definition():
    from prunequant.structural.calib import InputStats
    w, x = torch.randn(6, 5, dtype=torch.float64), torch.randn(40, 5, dtype=torch.float64)
    st = InputStats(5, "cpu")
    st.add(x)
    ref = x.var(0, unbiased=False) * (w ** 2).sum(0)
    torch.testing.assert_close(imp.channel_scores(w, st, "flap").double(), ref, rtol=1e-5, atol=1e-8)
    ref_w = x.norm(dim=0) * w.abs().sum(0)
    torch.testing.assert_close(imp.channel_scores(w, st, "wanda").double(), ref_w, rtol=1e-5, atol=1e-8)


def test_gqa_violation_is_refused():
    model = tiny_model(layers=1)
    with pytest.raises(RecipeError, match="grouped-query"):
        prune_block(parts(model)[0], keep_heads=torch.tensor([0, 1, 2]))


def test_remove_blocks_and_reload(tmp_path):
    model, ids = tiny_model(layers=4), calib()
    bi = block_influence(model, ids)
    rep = remove_blocks(model, ids, 2)
    assert rep.removed_blocks == sorted(sorted(range(4), key=lambda i: bi[i])[:2])
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    before = logits(model, ids)
    # a cache-using generation step still works after renumbering
    model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    save_structured(model, tmp_path)
    again = load_structured(tmp_path)
    assert again.config.prunequant_removed_blocks == rep.removed_blocks
    torch.testing.assert_close(logits(again, ids), before, rtol=0, atol=1e-5)


def test_prune_then_drop_then_prune_keeps_original_indices(tmp_path):
    model, ids = tiny_model(layers=3), calib()
    drop_blocks(model, [1])
    prune_structured(model, ids, head_sparsity=0.5, mlp_sparsity=0.5)
    assert [s["original_index"] for s in model.config.prunequant_layer_shapes] == [0, 2]


def test_bad_inputs_raise():
    model = tiny_model(layers=1)
    with pytest.raises(RecipeError):
        prune_structured(model, calib(), head_sparsity=1.0)
    from prunequant.errors import DataError
    with pytest.raises(DataError):
        prune_structured(model, torch.randn(2, 3), mlp_sparsity=0.5)


def test_architecture_without_structure_is_refused():
    """Shapes come from the ArchSpec: an architecture with fused projections says so in one line."""
    from prunequant.errors import ModelLoadError
    from tiny import tiny_model as any_model

    with pytest.raises(ModelLoadError, match="structural pruning does not support 'opt'.*supported: .*qwen2"):
        prune_structured(any_model("opt"), calib(vocab=64), head_sparsity=0.25)
