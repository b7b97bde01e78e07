"""Sr and SrCr: definitions, edges and the ranking properties docs/srcr.md promises."""
import itertools
import math
import random

import pytest

from prunequant.errors import PrunequantError
from prunequant.evaluate.srcr import (
    relative_gain, semantic_retention, srcr, srcr_from_rate, srcr_layers, srcr_sqrt_log, srcr_sqrt_log_layers,
    stored_bits,
)
from prunequant.accounting import tcr, tcr_layers

CONFIGS = [(0.0, 16), (0.0, 8), (0.0, 4), (0.0, 3), (0.0, 2), (0.25, 4), (0.5, 4), (0.5, 8), (0.7, 3), (0.25, 16)]


def test_sr_is_mean_of_ratios():
    assert semantic_retention({"ppl_wiki": 0.9, "acc": 0.7, "sim": 0.8}) == pytest.approx(0.8)
    assert semantic_retention({"a": 1.2, "b": -0.4}) == pytest.approx(0.6)  # below chance counts as 0
    assert semantic_retention({"a": 1.0, "b": 0.0}, weights={"a": 3, "b": 1}) == pytest.approx(0.75)
    for bad in ({}, {"a": float("nan")}):
        with pytest.raises(PrunequantError):
            semantic_retention(bad)
    with pytest.raises(PrunequantError, match="weights"):
        semantic_retention({"a": 1.0}, weights={"a": 0})


@pytest.mark.parametrize("s,q", CONFIGS)
def test_lambda_zero_is_sr(s, q):
    for sr in (0.0, 0.3, 0.97, 1.1):
        assert srcr(sr, s, q, lam=0) == pytest.approx(sr)
        assert srcr_sqrt_log(sr, s, q, lam=0) == pytest.approx(sr)
        assert srcr_layers(sr, [(10, s, q), (30, s, q)], lam=0) == pytest.approx(sr)


def test_uncompressed_is_sr():
    for lam in (0, 0.5, 1, 2):
        assert srcr(0.8, 0.0, 16, lam) == pytest.approx(0.8)
        assert srcr_sqrt_log(0.8, 0.0, 16, lam) == pytest.approx(0.8)
        assert srcr_from_rate(0.8, 0.0, lam) == pytest.approx(0.8)
        assert srcr_layers(0.8, [(5, 0.0, 16), (7, 0.0, 16)], lam) == pytest.approx(0.8)


@pytest.mark.parametrize("f", [srcr, srcr_sqrt_log])
@pytest.mark.parametrize("lam", [0.25, 1.0, 2.0])
def test_monotone_in_sr_and_compression(f, lam):
    for s, q in CONFIGS:
        assert f(0.9, s, q, lam) > f(0.8, s, q, lam)  # more retention, higher
    for q in (2, 3, 4, 8):
        assert f(0.8, 0.5, q, lam) > f(0.8, 0.5, q + 1, lam)  # fewer bits, higher
    for s in (0.0, 0.25, 0.5):
        assert f(0.8, s + 0.1, 4, lam) > f(0.8, s, 4, lam)  # more sparsity, higher


@pytest.mark.parametrize("lam", [0.25, 1.0, 2.0])
def test_equal_sr_higher_tcr_ranks_higher(lam):
    for (s1, q1), (s2, q2) in itertools.combinations(CONFIGS, 2):
        t1, t2 = tcr(s1, q1), tcr(s2, q2)
        if abs(t1 - t2) < 1e-12:
            assert srcr(0.7, s1, q1, lam) == pytest.approx(srcr(0.7, s2, q2, lam))
            continue
        hi, lo = ((s1, q1), (s2, q2)) if t1 > t2 else ((s2, q2), (s1, q1))
        assert srcr(0.7, *hi, lam) > srcr(0.7, *lo, lam)


def test_equal_tcr_ranks_by_sr():
    """25% + 4-bit and 3-bit alone (TCr 0.8125) compare on Sr alone, whatever λ."""
    assert tcr(0.25, 4) == tcr(0.0, 3)
    for lam in (0.5, 1.0, 3.0):
        assert srcr(0.61, 0.25, 4, lam) > srcr(0.60, 0.0, 3, lam)
        assert srcr(0.59, 0.25, 4, lam) < srcr(0.60, 0.0, 3, lam)
    # the sqrt/log reconstruction does not: it adds a bonus for pruning at this TCr ...
    assert srcr_sqrt_log(0.59, 0.25, 4) > srcr_sqrt_log(0.60, 0.0, 3)
    assert srcr_sqrt_log(1, 0.25, 4) / srcr_sqrt_log(1, 0.0, 3) == pytest.approx(2 ** (2.5 - math.log2(16 / 3)))
    # ... and a penalty at 50% + 4-bit against 2-bit (TCr 0.875)
    assert srcr_sqrt_log(1, 0.5, 4) / srcr_sqrt_log(1, 0.0, 2) == pytest.approx(2 ** (2 + math.sqrt(0.5) - 3))


def test_lambda_one_is_meaning_per_stored_bit():
    """At λ = 1, A ranks above B exactly when Sr_A / bits_A > Sr_B / bits_B."""
    rng = random.Random(0)
    for _ in range(500):
        a = (rng.random(), rng.choice([0, 0.25, 0.5, 0.7]), rng.choice([2, 3, 4, 8, 16]))
        b = (rng.random(), rng.choice([0, 0.25, 0.5, 0.7]), rng.choice([2, 3, 4, 8, 16]))
        per_bit = [sr / stored_bits(s, q) for sr, s, q in (a, b)]
        if abs(per_bit[0] - per_bit[1]) < 1e-12:
            continue
        assert (srcr(*a, lam=1) > srcr(*b, lam=1)) == (per_bit[0] > per_bit[1])


def test_rate_and_layer_forms_agree():
    layers = [(100, 0.5, 4), (300, 0.0, 3), (50, 0.25, 16)]
    t = tcr_layers(layers)
    for lam in (0.5, 1.0):
        assert srcr_layers(0.8, layers, lam) == pytest.approx(srcr_from_rate(0.8, t, lam))
        assert srcr_layers(0.8, [(7, 0.25, 4)], lam) == pytest.approx(srcr(0.8, 0.25, 4, lam))
        assert srcr_sqrt_log_layers(0.8, [(7, 0.25, 4), (9, 0.25, 4)], lam) == pytest.approx(
            srcr_sqrt_log(0.8, 0.25, 4, lam))
    assert stored_bits(0.25, 4) == pytest.approx(16 * (1 - tcr(0.25, 4)))
    assert srcr(0.5, 0.5, 4) == pytest.approx(0.5 * 8)  # 2 stored bits per weight: 8x fewer than 16


def test_relative_gain_and_bad_inputs():
    assert relative_gain(0.6, 0.5) == pytest.approx(0.2)
    with pytest.raises(PrunequantError):
        relative_gain(0.6, 0.0)
    for args in [(-0.1, 0, 16), (0.5, 1.0, 4), (0.5, 0.2, 0), (0.5, 0.2, 32), (float("inf"), 0, 4)]:
        with pytest.raises(PrunequantError):
            srcr(*args)
    with pytest.raises(PrunequantError, match="λ"):
        srcr(0.5, 0.5, 4, lam=-1)
    with pytest.raises(PrunequantError):
        srcr_from_rate(0.5, 1.0)
    with pytest.raises(PrunequantError):
        srcr_layers(0.5, [])
