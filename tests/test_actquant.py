"""Simulated activation quantization and SmoothQuant migration on tiny random models."""
import pytest
import torch

from prunequant.errors import RecipeError
from prunequant.models import all_linear_names, norm_groups
from prunequant.solvers.actquant import apply_activation_quant, collect_act_absmax, fake_quant_per_token, smooth_scales
from tiny import tiny_model

IDS = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))


def _model(kind):
    if kind == "gemma3_text":  # its norms compute x̂ · (1 + weight): folding must respect that
        import transformers as tf

        torch.manual_seed(0)
        cfg = tf.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, vocab_size=384, max_position_embeddings=256)
        model = tf.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.normal_(0, 0.5)
        return model
    return tiny_model(kind)


def _with_outliers(kind):
    """A tiny model whose norms create a few large activation channels (what SmoothQuant is for)."""
    model = _model(kind)
    with torch.no_grad():
        for name, m in model.named_modules():
            if "norm" in name.lower() or name.endswith(("ln_1", "ln_2")):
                if getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                    m.weight[:3] *= 20.0
    return model


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def test_fake_quant_per_token_grid():
    x = torch.randn(3, 5, 16)
    x[0, 0] = 0
    for bits in (4, 8):
        q = fake_quant_per_token(x, bits)
        qmax = 2 ** (bits - 1) - 1
        step = x.abs().amax(-1, keepdim=True) / qmax
        step[step == 0] = 1
        codes = q / step
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= qmax + 1e-4
        assert ((q - x).abs() <= step / 2 + 1e-6).all() and not q[0, 0].any()
    assert fake_quant_per_token(x, 16) is x


def test_smooth_scales():
    s = smooth_scales(torch.tensor([4.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 0.0]), 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 1.0, 1.0]))


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2", "gemma3_text"])
def test_smoothing_alone_keeps_outputs(kind):
    model = _with_outliers(kind)
    names = all_linear_names(model)
    ref = _logits(model)
    amax = collect_act_absmax(model, names, [IDS])
    h = apply_activation_quant(model, amax, bits=16, smooth=True, groups=norm_groups(model, set(amax)))
    assert len(h.folded) == 4 and len(h.divided) == 4  # 2 blocks × (attn-in, mlp-in) folded; o/down hooked
    assert torch.allclose(_logits(model), ref, atol=1e-4, rtol=1e-4)
    h.remove()
    assert torch.equal(_logits(model), ref)


def test_no_quant_no_smooth_is_identity():
    model = tiny_model("llama")
    ref = _logits(model)
    h = apply_activation_quant(model, collect_act_absmax(model, all_linear_names(model), [IDS]), bits=16, smooth=False)
    assert not h.hooks and torch.equal(_logits(model), ref)


def test_w8a8_and_smoothing_help():
    model = _with_outliers("llama")
    names = all_linear_names(model)
    ref = _logits(model)
    amax = collect_act_absmax(model, names, [IDS])
    errs = {}
    for bits in (8, 4):
        for smooth in (False, True):
            h = apply_activation_quant(model, amax, bits=bits, smooth=smooth, groups=norm_groups(model, set(amax)))
            errs[bits, smooth] = float((_logits(model) - ref).pow(2).mean())
            h.remove()
    assert torch.equal(_logits(model), ref)
    assert errs[8, False] < errs[4, False] and errs[8, True] < errs[4, True]
    assert errs[8, True] < errs[8, False] and errs[4, True] < errs[4, False]  # outlier channels migrated
    assert errs[8, True] < 1e-3 * float(ref.pow(2).mean())


def test_tied_lm_head_not_rescaled():
    model = tiny_model("gpt2")  # GPT-2 ties lm_head to the token embedding
    ref = _logits(model)
    amax = collect_act_absmax(model, ["lm_head"], [IDS])
    h = apply_activation_quant(model, amax, bits=16, groups=norm_groups(model, set(amax)))
    assert "lm_head" not in h.divided and torch.allclose(_logits(model), ref, atol=1e-5)


def test_bad_bits():
    with pytest.raises(RecipeError):
        apply_activation_quant(tiny_model("llama"), {}, bits=6)
