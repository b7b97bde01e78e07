"""compressed-tensors export: reload through prunequant and through transformers' own loader."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunequant.export import ExportError, load_exported, save_compressed_tensors, size_report
from test_export_fixtures import CONFIGS, assert_same_logits, compress, logits, tiny_llama

QUANT_CONFIGS = [c for c in CONFIGS if c != "2:4"]


@pytest.mark.parametrize("config", QUANT_CONFIGS)
def test_roundtrip_through_prunequant(tmp_path, config):
    model = tiny_llama()
    states = compress(model, config)
    ref = logits(model)
    out = save_compressed_tensors(model, states, tmp_path / "m")
    reloaded, fmt = load_exported(out, dtype=torch.float32)
    assert fmt == "compressed-tensors"
    assert_same_logits(ref, logits(reloaded))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    assert "lm_head" in qc["ignore"]
    targets = {t for g in qc["config_groups"].values() for t in g["targets"]}
    assert targets == set(states)


def test_mixed_bits_are_separate_groups(tmp_path):
    model = tiny_llama()
    states = compress(model, "mixed-2/4bit")
    out = save_compressed_tensors(model, states, tmp_path / "m")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    by_bits = {g["weights"]["num_bits"]: set(g["targets"]) for g in groups.values()}
    assert by_bits[2] == {n for n in states if "mlp" in n}
    assert by_bits[4] == {n for n in states if "self_attn" in n}


@pytest.mark.parametrize("config,mode", [
    ("mixed-2/4bit-sym", "zero-point"),  # symmetric grids: no zero points at all
    ("2:4+4bit", "widen"),  # asymmetric b-bit re-expressed exactly as symmetric (b+1)-bit
    ("50%+3bit", "widen"),
    ("4bit-g96-ragged", "widen"),  # g96 over 256 columns: written exactly as g32 (gcd)
])
def test_transformers_from_pretrained_gives_same_logits(tmp_path, config, mode):
    model = tiny_llama()
    states = compress(model, config)
    ref = logits(model)
    out = save_compressed_tensors(model, states, tmp_path / "m", asymmetric=mode)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert_same_logits(ref, logits(hf))


def test_asymmetric_zero_point_loads_in_transformers_dequantize_mode(tmp_path):
    """One asymmetric scheme loads with dequantize=True; transformers then dequantizes in the scale's
    dtype (fp16 here), so the weights are rounded to fp16."""
    from transformers import CompressedTensorsConfig

    model = tiny_llama()
    states = compress(model, "4bit-g128")
    ref = logits(model)
    out = save_compressed_tensors(model, states, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True))
    assert_same_logits(ref, logits(hf), rtol=5e-3)


def test_bytes_are_packed_codes_plus_scales(tmp_path):
    model = tiny_llama()
    states = compress(model, "4bit-g128")
    rep = size_report(save_compressed_tensors(model, states, tmp_path / "m"))
    for row in rep["layers"]:
        out_f, in_f = row["shape"]
        groups = out_f * in_f // 128
        zp_words = -(-out_f * 4 // 32) * (in_f // 128)
        assert row["bytes"] == out_f * in_f // 2 + 2 * groups + 4 * zp_words + 16  # + weight_shape (2 int64)


def test_unsupported_layers_rejected_or_stored_dense(tmp_path):
    model = tiny_llama()
    states = compress(model, "4bit-g128", act_order=True)
    ref = logits(model)
    with pytest.raises(ExportError, match="act-order"):
        save_compressed_tensors(model, states, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    out = save_compressed_tensors(model, states, tmp_path / "b", dtype=torch.float32, fallback="dense")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert_same_logits(ref, logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)))


def test_pruned_only_model_is_plain_dense(tmp_path):
    model = tiny_llama()
    states = compress(model, "2:4")
    ref = logits(model)
    out = save_compressed_tensors(model, states, tmp_path / "m", dtype=torch.float32)
    reloaded, _ = load_exported(out)
    assert_same_logits(ref, logits(reloaded))
