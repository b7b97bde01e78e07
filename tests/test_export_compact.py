"""Compact format: export -> reload gives the in-memory compressed model's logits; bytes match theory."""
import logging

import pytest
import torch

from prunequant.export import ExportError, load_compact, load_exported, save_compact, size_report
from test_export_fixtures import (CONFIGS, EXTRA_CONFIGS, assert_same_logits, compress, expected_compact_bytes,
                                  logits, tiny_gpt2, tiny_llama)


@pytest.mark.parametrize("config", list(CONFIGS) + list(EXTRA_CONFIGS))
def test_roundtrip_identical_logits_and_theoretical_bytes(tmp_path, config):
    model = tiny_llama()
    states = compress(model, config)
    ref = logits(model)
    out = save_compact(model, states, tmp_path / "m")
    reloaded = load_compact(out, dtype=torch.float32)
    assert_same_logits(ref, logits(reloaded))
    for name in states:  # weights come back bit-exact
        assert torch.equal(reloaded.get_submodule(name).weight, model.get_submodule(name).weight)

    rep = size_report(out)
    assert rep["format"] == "compact"
    for row in rep["layers"]:
        w = model.get_submodule(row["name"]).weight
        assert row["bytes"] == expected_compact_bytes(states[row["name"]], w), row["name"]
    # whole directory = tensor payload + small fixed overheads (headers, config, descriptor, manifest)
    assert rep["model_bytes"] - rep["tensor_bytes"] < 40_000


def test_theoretical_rate_plus_documented_overheads(tmp_path):
    """4-bit g128 asym: q + 16/128 (fp16 scale) + 4/128 (packed zero) bits per weight, exactly."""
    model = tiny_llama()
    states = compress(model, "2:4+4bit")
    rep = size_report(save_compact(model, states, tmp_path / "m"))
    c = rep["compressed"]
    assert c["tcr"] == pytest.approx(1 - 4 * 0.5 / 16)
    # 2:4 ranks: ceil(log2 C(4,2)) = 3 bits per 4 weights
    assert c["bits_per_param"] == pytest.approx(4 * 0.5 + 0.75 + 16 / 128 + 4 / 128)
    assert c["real_cr"] == pytest.approx(1 - c["bits_per_param"] / 16)


def test_float32_scales_bit_exact_with_scale_dtype_float32(tmp_path, caplog):
    model = tiny_llama()
    states = compress(model, "4bit-g128", fp16_scales=False)
    ref = logits(model)
    exact = load_compact(save_compact(model, states, tmp_path / "a", scale_dtype=torch.float32), dtype=torch.float32)
    assert_same_logits(ref, logits(exact))
    # the solvers put scales on the fp16 grid (solvers/grid.py), so the default fp16 scale storage is exact too
    with caplog.at_level(logging.WARNING):
        rounded = load_compact(save_compact(model, states, tmp_path / "b"), dtype=torch.float32)
    assert "scale_dtype=torch.float32" not in caplog.text
    assert_same_logits(ref, logits(rounded))


def test_act_order_groups_are_stored(tmp_path):
    model = tiny_llama()
    states = compress(model, "4bit-g128", act_order=True)
    ref = logits(model)
    out = save_compact(model, states, tmp_path / "m")
    model2, fmt = load_exported(out, dtype=torch.float32)
    assert fmt == "compact"
    assert_same_logits(ref, logits(model2))
    for r in size_report(out)["layers"]:
        assert r["bytes"] == expected_compact_bytes(states[r["name"]], model.get_submodule(r["name"]).weight)


def test_tied_embeddings_and_bf16(tmp_path):
    model = tiny_llama(tie=True)
    states = compress(model, "50%+3bit")
    out = save_compact(model, states, tmp_path / "m", dtype=torch.bfloat16)
    reloaded = load_compact(out)
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    for name in states:
        assert torch.equal(reloaded.get_submodule(name).weight, model.get_submodule(name).weight.bfloat16())


def test_gpt2_conv1d_is_transposed(tmp_path):
    model = tiny_gpt2()
    states = compress(model, "2:4+4bit")
    ref = logits(model)
    out = save_compact(model, states, tmp_path / "m")
    assert size_report(out)["layers"][0]["shape"] == [384, 128]  # (out, in) of c_attn
    assert_same_logits(ref, logits(load_compact(out, dtype=torch.float32)))


def test_state_not_matching_model_is_stored_exactly_with_a_warning(tmp_path, caplog):
    model = tiny_llama()
    states = compress(model, "2:4+4bit")
    name = "model.layers.0.mlp.up_proj"
    with torch.no_grad():
        model.get_submodule(name).weight[0, :8] = 0.5  # touches pruned positions and changes codes
    ref = logits(model)
    with caplog.at_level(logging.WARNING):  # float32 storage: the fallback float values are exact too
        out = save_compact(model, states, tmp_path / "m", dtype=torch.float32)
    assert name in caplog.text
    assert_same_logits(ref, logits(load_compact(out, dtype=torch.float32)))
    row = next(r for r in size_report(out)["layers"] if r["name"] == name)
    assert row["stored_as"] == "sparse-float"


def test_states_for_missing_layer_rejected(tmp_path):
    model = tiny_llama()
    states = compress(model, "4bit-g128")
    states["model.layers.9.mlp.up_proj"] = states["model.layers.0.mlp.up_proj"]
    with pytest.raises(ExportError, match="layers.9"):
        save_compact(model, states, tmp_path / "m")
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())


def test_tcr_of_mixed_bits_counts_no_sparsity(tmp_path):
    """Low-bit grids round some weights to exactly 0 (the 2-bit layers are even stored sparse because
    that is smaller), but TCr follows the recorded recipe: quantization only."""
    model = tiny_llama()
    states = compress(model, "mixed-2/4bit")
    rep = size_report(save_compact(model, states, tmp_path / "m"))
    n = {r["name"]: r["n_params"] for r in rep["layers"]}
    q = {name: 2 if "mlp" in name else 4 for name in n}
    assert rep["compressed"]["tcr"] == pytest.approx(1 - sum(n[k] * q[k] for k in n) / (16 * sum(n.values())))
    assert all(r["sparsity"] == 0 for r in rep["layers"])


def _payload(d):
    """Every file of an export; a safetensors file as (parsed header, data bytes) (metadata has no fixed order)."""
    import json

    out = {}
    for p in sorted(d.iterdir()):
        if p.name == "prunequant-manifest.json":
            continue
        raw = p.read_bytes()
        if p.suffix == ".safetensors":
            n = int.from_bytes(raw[:8], "little")
            out[p.name] = (json.loads(raw[8:8 + n]), raw[8 + n:])
        else:
            out[p.name] = raw
    return out


@pytest.mark.parametrize("config", ["4bit-g128", "2:4+4bit", "50%+3bit", "ternary-g128", "4:8+4bit", "8bit-pc"])
def test_device_encoding_writes_the_cpu_bytes(tmp_path, monkeypatch, config):
    """Where a block sits on a GPU, codes, masks and ranks are packed there with torch ops (and decoded there
    on reload); the files must be those of the numpy path. The torch path runs here on the CPU."""
    from prunequant.export import bitpack

    model = tiny_llama()
    states = compress(model, config)
    cpu = save_compact(model, states, tmp_path / "cpu")
    monkeypatch.setattr(bitpack, "_on_device", lambda t: True)
    dev = save_compact(model, states, tmp_path / "dev")
    assert _payload(dev) == _payload(cpu)
    reloaded = load_compact(dev, dtype=torch.float32)
    for name in states:
        assert torch.equal(reloaded.get_submodule(name).weight, model.get_submodule(name).weight)
