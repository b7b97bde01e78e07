"""Shared helpers for the export tests (no tests here): tiny random models and locally built states."""
from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from prunequant.recipe import QuantSpec
from prunequant.solvers.base import LayerResult
from prunequant.solvers.prune import nm_mask, unstructured_mask
from prunequant.solvers.quant import rtn_quantize

VOCAB = 512


def tiny_llama(seed: int = 0, tie: bool = False):
    """Float32 Llama with dims multiple of 128; every parameter is fp16-representable (as a model loaded
    from a 16-bit checkpoint is), so a 16-bit export of the untouched tensors is lossless."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tie)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=128, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=64)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules()
            if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and n != "lm_head"]


# configurations: name -> function(layer name) -> (prune, QuantSpec | None)
CONFIGS = {
    "4bit-g128": lambda n: (None, QuantSpec(method="rtn", bits=4, group_size=128)),
    "2:4": lambda n: (("nm", 2, 4), None),
    "2:4+4bit": lambda n: (("nm", 2, 4), QuantSpec(method="rtn", bits=4, group_size=128)),
    "50%+3bit": lambda n: (("u", 0.5), QuantSpec(method="rtn", bits=3, group_size=128)),
    "mixed-2/4bit": lambda n: (None, QuantSpec(method="rtn", bits=2 if "mlp" in n else 4, group_size=128)),
}
EXTRA_CONFIGS = {
    "70%+3bit-sym-pc": lambda n: (("u", 0.7), QuantSpec(method="rtn", bits=3, group_size=0, symmetric=True)),
    "ternary-g128": lambda n: (None, QuantSpec(method="rtn", bits=1.58, group_size=128, symmetric=True)),
    "8bit-pc": lambda n: (None, QuantSpec(method="rtn", bits=8, group_size=0)),
    "4:8+4bit": lambda n: (("nm", 4, 8), QuantSpec(method="rtn", bits=4, group_size=128)),
    "4bit-g96-ragged": lambda n: (None, QuantSpec(method="rtn", bits=4, group_size=96, ragged=True)),
    "mixed-2/4bit-sym": lambda n: (None, QuantSpec(method="rtn", bits=2 if "mlp" in n else 4, group_size=128,
                                                   symmetric=True)),
}


def _get_w(mod):
    return mod.weight.data.t() if type(mod).__name__ == "Conv1D" else mod.weight.data


def _set_w(mod, w):
    mod.weight.data = (w.t() if type(mod).__name__ == "Conv1D" else w).contiguous().to(mod.weight.dtype)


def compress(model, config, fp16_scales: bool = True, act_order: bool = False) -> dict[str, LayerResult]:
    """Apply a config in place with magnitude masks + RTN; return states as the engine keeps them
    (weight=None). ``fp16_scales`` rounds each grid's scales to fp16 (and re-derives the weight), as a
    solver that stores fp16 scales does; ``act_order`` permutes the group of each column."""
    fn = CONFIGS.get(config) or EXTRA_CONFIGS[config]
    states = {}
    for name in linear_names(model):
        mod = model.get_submodule(name)
        W = _get_w(mod).clone()
        prune, spec = fn(name)
        mask = None
        if prune and prune[0] == "nm":
            mask = nm_mask(W.abs(), prune[1], prune[2])
        elif prune:
            mask = unstructured_mask(W.abs(), prune[1])
        if spec is None:
            res = LayerResult(weight=W * mask, mask=mask)
        else:
            res = rtn_quantize(W, spec, mask=mask)
            res.mask = mask
            q = res.quant
            if act_order:
                q.g_idx = q.g_idx[torch.randperm(q.g_idx.numel())].contiguous()
            if fp16_scales:
                q.scale = q.scale.half().float()
            if fp16_scales or act_order:
                res.weight = q.dequantize()
        _set_w(mod, res.weight)
        states[name] = LayerResult(weight=None, mask=res.mask, quant=res.quant, info={})
    return states


def logits(model, seed: int = 1, length: int = 24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, length), generator=g)
    with torch.no_grad():
        return model(ids).logits.float()


def assert_same_logits(a, b, rtol=1e-5):
    scale = float(a.abs().max())
    torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * scale)


def _payload_bytes(mask, q, shape, scale_bytes):
    from prunequant.export.bitpack import detect_nm, nm_rank_bits

    out_f, in_f = shape
    n = out_f * in_f
    total, kept = 0, n
    if mask is not None:
        kept = int(mask.sum())
        nm = detect_nm(mask)
        total += math.ceil(n / 8) if nm is None else math.ceil(n // nm[1] * nm_rank_bits(nm[1], nm[1] - nm[0]) / 8)
    if q is None:
        return total + 2 * kept
    bits = 2 if q.bits == 1.58 else int(q.bits)
    total += math.ceil(kept / 5) if q.bits == 1.58 else math.ceil(kept * bits / 8)
    groups = q.scale.numel()
    total += scale_bytes * groups
    if not bool((q.zero == q.zero.reshape(-1)[0]).all()):
        total += math.ceil(groups * bits / 8)
    if not torch.equal(q.g_idx.long(), torch.arange(in_f) // q.group_size if q.group_size else
                       torch.zeros(in_f, dtype=torch.long)):
        total += 2 * in_f
    return total


def expected_compact_bytes(st: LayerResult, weight: torch.Tensor, scale_bytes: int = 2) -> int:
    """The compact format's payload for one layer from first principles (docs/format.md): mask or N:M
    ranks, kept codes at their width, fp16 scales, packed zeros, g_idx if permuted; the stored positions
    are the cheapest of: all, the recorded mask, the weight's non-zeros (low-bit grids round many
    weights to exactly 0)."""
    shape = tuple(weight.shape)
    masks = [None, weight != 0] + ([st.mask] if st.mask is not None else [])
    return min(_payload_bytes(m, st.quant, shape, scale_bytes) for m in masks)
