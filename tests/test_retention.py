"""Retention ratios (exactly 1 for the uncompressed model), chance adjustment, fingerprint cache."""
import copy
import math

import pytest
import torch

from prunequant.errors import DataError
from prunequant.evaluate.retention import (cached_base_results, flatten_metrics, model_fingerprint, retention,
                                           skipped_measures, sr)


def base_metrics():
    return {
        "texts": {"wiki": {"perplexity": 24.9, "seq_len": 512}, "lambada": {"perplexity": 41.6}},
        "tasks": {
            "arc_easy": {"acc": 0.55, "acc_norm": 0.5, "n": 200, "chance": 0.25},
            "winogrande": {"acc": 0.52, "acc_norm": None, "n": 200, "chance": 0.5},  # within noise of chance
            "lambada": {"acc": 0.3, "acc_norm": None, "n": 200, "chance": 0.0},
        },
    }


def test_uncompressed_model_retains_exactly_1_on_every_measure():
    base = base_metrics()
    same = copy.deepcopy(base)
    same["agreement"] = {"kl": 0.0, "top1": 1.0, "tokens": 100}
    same["similarity"] = {"similarity": 1.0, "n": 16}
    r = retention(base, same)
    assert set(r) == {"ppl:wiki", "ppl:lambada", "task:arc_easy", "task:lambada", "kl", "top1", "similarity"}
    assert all(v == 1.0 for v in r.values()), r
    assert sr(r) == 1.0


def test_ratios_of_a_compressed_model():
    base = base_metrics()
    comp = {"texts": {"wiki": {"perplexity": 49.8}},
            "tasks": {"arc_easy": {"acc": 0.4, "acc_norm": 0.375, "n": 200, "chance": 0.25},
                      "lambada": {"acc": 0.15, "acc_norm": None, "n": 200, "chance": 0.0},
                      "winogrande": {"acc": 0.5, "acc_norm": None, "n": 200, "chance": 0.5}},
            "agreement": {"kl": 0.25, "top1": 0.8}, "similarity": {"similarity": 0.7}}
    r = retention(base, comp)
    assert r == pytest.approx({"ppl:wiki": 0.5, "task:arc_easy": 0.5, "task:lambada": 0.5,
                               "kl": math.exp(-0.25), "top1": 0.8, "similarity": 0.7})
    assert sr(r) == pytest.approx(sum(r.values()) / len(r))
    assert "task:winogrande" in skipped_measures(base)
    assert flatten_metrics(comp)["task:arc_easy"] == 0.375  # acc_norm where the task has one


def test_below_chance_counts_as_nothing_in_sr_and_mismatched_limits_fail():
    base = base_metrics()
    comp = copy.deepcopy(base)
    comp["tasks"]["arc_easy"]["acc_norm"] = 0.2
    r = retention(base, comp)
    assert r["task:arc_easy"] < 0
    assert sr(r) == pytest.approx((3 + 0) / 4)  # ppl x2, lambada at 1; arc_easy clipped to 0
    comp["tasks"]["arc_easy"]["n"] = 100
    with pytest.raises(DataError, match="same limit"):
        retention(base, comp)


def test_end_to_end_tiny_model_against_itself_is_exactly_1():
    from tiny import tiny_model

    from prunequant.evaluate.perplexity import perplexity
    from prunequant.evaluate.semantic import logit_agreement

    m = tiny_model("llama")
    ids = torch.randint(0, 300, (256,), generator=torch.Generator().manual_seed(0))
    base = {"texts": {"rand": perplexity(m, ids, 64, progress=False)}}
    twin = copy.deepcopy(m)
    comp = {"texts": {"rand": perplexity(twin, ids, 64, progress=False)},
            "agreement": logit_agreement(twin, m, ids.view(4, 64), progress=False)}
    r = retention(base, comp)
    assert r == {"ppl:rand": 1.0, "kl": 1.0, "top1": 1.0}


def test_fingerprint_sees_every_weight_and_the_settings():
    from tiny import tiny_model

    m = tiny_model("llama")
    fp = model_fingerprint(m, {"tasks": ["arc_easy"], "limit": 200})
    assert fp == model_fingerprint(copy.deepcopy(m), {"limit": 200, "tasks": ["arc_easy"]})
    assert fp != model_fingerprint(m, {"tasks": ["arc_easy"], "limit": 100})
    twin = copy.deepcopy(m)
    with torch.no_grad():  # one element between the strided samples
        w = twin.model.layers[0].mlp.down_proj.weight
        w.view(-1)[7] += 1e-3
    assert model_fingerprint(twin, {"tasks": ["arc_easy"], "limit": 200}) != fp


def test_base_results_are_computed_once(tmp_path):
    from tiny import tiny_model

    m = tiny_model("llama")
    calls = []

    def compute():
        calls.append(1)
        return {"texts": {"wiki": {"perplexity": 3.0}}}

    a = cached_base_results(m, {"limit": 5}, compute, cache_dir=tmp_path)
    b = cached_base_results(copy.deepcopy(m), {"limit": 5}, compute, cache_dir=tmp_path)
    assert a == b and len(calls) == 1
    cached_base_results(m, {"limit": 6}, compute, cache_dir=tmp_path)
    assert len(calls) == 2
    cached_base_results(m, {"limit": 5}, compute, cache_dir=tmp_path, refresh=True)
    assert len(calls) == 3
