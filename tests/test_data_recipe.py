"""Text sources, calibration sampling, disjointness proof, recipes and TCr, perplexity by hand."""
import math

import pytest
import torch

from prunequant.data import Text, calibration_ids, check_disjoint, load_text, tokenize
from prunequant.errors import DataError, RecipeError
from prunequant.evaluate.perplexity import perplexity
from prunequant.accounting import tcr, tcr_layers
from prunequant.recipe import PruneSpec, QuantSpec, Recipe, parse_prune, parse_quant
from tiny import TRAIN_TEXT, tiny_model, tiny_tokenizer


def test_calibration_sampling_is_seeded_and_shaped():
    tok = tiny_tokenizer()
    text = Text("t", [TRAIN_TEXT * 10])
    a = calibration_ids(tok, text, 5, 16, seed=1)
    b = calibration_ids(tok, text, 5, 16, seed=1)
    c = calibration_ids(tok, text, 5, 16, seed=2)
    assert a.shape == (5, 16) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(DataError, match="fewer than one sequence"):
        calibration_ids(tok, Text("t", ["short"]), 2, 64)


def test_disjointness_is_checked():
    para = "x" * 100
    check_disjoint(Text("a", [para + "1"]), Text("b", [para + "2"]))
    with pytest.raises(DataError, match="share 1 paragraph"):
        check_disjoint(Text("a", [para, "other"]), Text("b", [para]))


def test_embedded_wiki_splits_are_disjoint_and_deterministic():
    c, e = load_text("wiki", "calib"), load_text("wiki", "eval")
    assert len(c.docs) > 50 and len(e.docs) > 15
    check_disjoint(c, e)
    assert load_text("wiki", "eval").sha256 == e.sha256
    assert e.text.lstrip().startswith("= ")


def test_jsonl_source_and_malformed_line(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text('{"text": "hello"}\n{"text": "world"}\n')
    assert load_text(str(good)).docs == ["hello", "world"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "hello"}\n{oops\n')
    with pytest.raises(DataError, match=r"b.jsonl:2"):
        load_text(str(bad))


def test_perplexity_equals_hand_computation():
    model = tiny_model("llama")
    ids = torch.randint(0, 300, (100,), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, ids, seq_len=16, batch_size=4, progress=False)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in range(100 // 16):
            x = ids[w * 16:(w + 1) * 16]
            logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)
            for t in range(15):
                nll -= float(logp[t, x[t + 1]])
                n += 1
    assert got["tokens"] == 96 and got["predicted_tokens"] == n and got["seq_len"] == 16
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    with pytest.raises(DataError, match="fewer than one window"):
        perplexity(model, ids[:10], seq_len=16, progress=False)


def test_parse_and_nm_convention():
    p = parse_prune("wanda:2:4")
    assert (p.n, p.m, p.sparsity) == (2, 4, 0.5)
    assert parse_prune("sparsegpt:2:8").sparsity == 0.25 and "2 of every 8 weights pruned" in parse_prune("sparsegpt:2:8").describe()
    q = parse_quant("gptq:3:g64:sym:actorder:mse")
    assert (q.bits, q.group_size, q.symmetric, q.act_order, q.mse_clip) == (3, 64, True, True, True)
    assert parse_quant("gptq:1.58").bits == 1.58 and parse_quant("gptq:1.58").symmetric
    assert parse_quant("rtn:8:pc").group_size == 0
    for bad in ("gptq", "gptq:x", "gptq:4:zz", "rtn:9", "gptq:1", "billm:2"):
        with pytest.raises(RecipeError):
            parse_quant(bad)
    for bad in ("sparsegpt:1", "sparsegpt:1.5", "wanda:4:4", "wanda:5:4", "x:0.5", "wanda:0:4", "sparsegpt"):
        with pytest.raises(RecipeError):
            parse_prune(bad)


def test_overrides_and_roundtrip(tmp_path):
    r = Recipe.from_dict({
        "prune": {"method": "sparsegpt", "sparsity": 0.5},
        "quant": {"method": "gptq", "bits": 4, "group_size": 128},
        "overrides": [{"pattern": "model.layers.0.*", "prune": {}},
                      {"pattern": "re:down_proj$", "quant": {"bits": 8}},
                      {"pattern": "*.k_proj", "skip": True}],
    })
    assert r.plan_for("model.layers.0.mlp.up_proj").prune is None
    assert r.plan_for("model.layers.3.mlp.down_proj").quant.bits == 8
    assert r.plan_for("model.layers.3.self_attn.k_proj").is_identity
    assert r.plan_for("model.layers.3.self_attn.q_proj").prune.sparsity == 0.5
    for suffix in (".yaml", ".json"):
        f = tmp_path / f"r{suffix}"
        r.save(f)
        assert Recipe.load(f).to_dict() == r.to_dict()
    with pytest.raises(RecipeError, match="unknown recipe key"):
        Recipe.from_dict({"prunes": {}})
    with pytest.raises(RecipeError, match="unknown field"):
        Recipe.from_dict({"overrides": [{"pattern": "*", "quant": {"bitz": 3}}]})


def test_tcr_formulas():
    assert tcr(0.0, 16) == 0.0 and tcr(0.5, 16) == 0.5 and tcr(0.0, 4) == 0.75
    assert tcr(0.25, 4) == pytest.approx(0.8125) and tcr(0.5, 4) == pytest.approx(0.875)
    assert tcr_layers([(100, 0.5, 4), (100, 0.0, 4)]) == pytest.approx(1 - (2 + 4) / 32)
    assert tcr_layers([(10, 0.0, 16)]) == 0.0


def test_joint_modes_and_their_old_names():
    from prunequant.recipe import LayerPlan

    assert Recipe(joint="B").joint == "keep-mask" and Recipe(joint="A").joint == "quantize-pruned"
    assert Recipe.from_dict({"joint": "B"}).to_dict()["joint"] == "keep-mask"
    assert LayerPlan(joint="A").joint == "quantize-pruned"
    with pytest.raises(RecipeError, match="joint mode 'C' unknown; choose one of onepass, quantize-pruned"):
        Recipe(joint="C")


def test_allocation_options_are_typed():
    from prunequant.recipe import Allocation

    r = Recipe.from_dict({"allocation": {"method": "bits", "avg_bits": 3, "choices": [2, 4]}})
    assert r.allocation == Allocation(method="bits", avg_bits=3, choices=(2, 4))
    assert Recipe.from_dict(r.to_dict()).allocation == r.allocation
    assert Recipe(allocation="owl").allocation.lam == 0.08
    with pytest.raises(RecipeError, match="unknown allocation option"):
        Recipe(allocation={"method": "owl", "lamda": 0.1})
    with pytest.raises(RecipeError, match="average-bit budget"):
        Recipe(allocation="bits")
