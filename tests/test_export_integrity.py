"""Atomic saves, manifest checks, sharding, dense export and size accounting."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunequant.errors import ModelLoadError
from prunequant.export import (ExportError, export, load_exported, print_size_report, save_compact, save_dense,
                               size_report, verify_manifest)
from prunequant.export import integrity
from test_export_fixtures import assert_same_logits, compress, logits, tiny_llama


@pytest.fixture(scope="module")
def compressed():
    model = tiny_llama()
    states = compress(model, "50%+3bit")
    return model, states, logits(model)


@pytest.fixture
def saved(tmp_path, compressed):
    model, states, _ = compressed
    return save_compact(model, states, tmp_path / "m")


def test_existing_output_is_an_error_unless_overwrite(saved, compressed):
    model, states, ref = compressed
    with pytest.raises(ExportError, match="overwrite=True"):
        save_compact(model, states, saved)
    save_compact(model, states, saved, overwrite=True)
    assert_same_logits(ref, logits(load_exported(saved, dtype=torch.float32)[0]))
    assert [p.name for p in saved.parent.iterdir()] == ["m"]  # no temporary or old directory left


def test_failed_save_leaves_nothing(tmp_path, compressed, monkeypatch):
    model, states, _ = compressed

    def boom(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(integrity.ShardWriter, "flush", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_compact(model, states, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_named(saved):
    shard = saved / "compact.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="compact.safetensors.*truncated"):
        load_exported(saved)
    with pytest.raises(ModelLoadError, match="compact.safetensors"):  # unchecked load still fails clearly
        load_exported(saved, verify=False)


def test_altered_byte_is_detected(saved):
    shard = saved / "compact.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    verify_manifest(saved, full=False)  # same size: only the hash can tell
    with pytest.raises(ModelLoadError, match="compact.safetensors.*SHA-256"):
        load_exported(saved)


def test_altered_descriptor_and_missing_manifest(saved):
    desc = saved / "prunequant-export.json"
    desc.write_text(desc.read_text().replace('"bits": 3', '"bits": 4', 1))
    with pytest.raises(ModelLoadError, match="prunequant-export.json"):
        load_exported(saved)
    (saved / "prunequant-manifest.json").unlink()
    with pytest.raises(ModelLoadError, match="written by prunequant but has no prunequant-manifest.json"):
        load_exported(saved)
    for record in ("prunequant-export.json", "prunequant.json"):  # the shards still say who wrote them
        (saved / record).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="--no-verify"):
        load_exported(saved)


def test_sharded_compact_and_dense(tmp_path, compressed):
    model, states, ref = compressed
    out = save_compact(model, states, tmp_path / "c", max_shard_size="300KB")
    shards = sorted(p.name for p in out.glob("compact-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"compact-00001-of-{len(shards):05d}.safetensors"
    assert_same_logits(ref, logits(load_exported(out, dtype=torch.float32)[0]))

    dense = save_dense(model, tmp_path / "d", dtype=torch.float32, states=states, max_shard_size="1MB")
    index = json.loads((dense / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert_same_logits(ref, logits(AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)))
    reloaded, fmt = load_exported(dense)
    assert fmt == "dense" and reloaded.dtype == torch.float32
    assert_same_logits(ref, logits(reloaded))


def test_shard_writer_keeps_memory_to_one_shard(tmp_path):
    w = integrity.ShardWriter(tmp_path, "model", max_bytes=1000)
    peak = 0
    for i in range(10):
        w.add({f"t{i}": torch.zeros(100)})  # 400 bytes each
        peak = max(peak, w.pending_bytes)
    assert w.close() and peak <= 1000


def test_manifest_reuses_hashes_taken_while_writing(tmp_path, monkeypatch):
    """Shards are hashed on the writer thread as they are written; the manifest reads only what it has not
    seen, and its hashes are those of the files on disk (a file rewritten afterwards is hashed again)."""
    import hashlib

    out = tmp_path / "out"
    with integrity.atomic_output(out) as root:
        w = integrity.ShardWriter(root, "model", max_bytes=1000)
        for i in range(6):
            w.add({f"t{i}": torch.full((100,), float(i))})
        names = w.close()
        (root / "config.json").write_text("{}")
        (root / names[0]).write_bytes((root / names[0]).read_bytes())  # rewritten: its stored hash is stale
        read = []
        real = integrity.sha256_file
        monkeypatch.setattr(integrity, "sha256_file", lambda p, *a: read.append(p.name) or real(p, *a))
    assert len(names) == 3 and sorted(read) == sorted(["config.json", "model.safetensors.index.json", names[0]])
    files = json.loads((out / integrity.MANIFEST).read_text())["files"]
    for rel, f in files.items():
        assert f["sha256"] == hashlib.sha256((out / rel).read_bytes()).hexdigest()
    verify_manifest(out)


def test_size_report_rates(tmp_path, compressed, capsys):
    model, states, _ = compressed
    compact = size_report(save_compact(model, states, tmp_path / "c"))
    dense = size_report(export(model, states, tmp_path / "d", fmt="dense"))
    n_lin = sum(r["n_params"] for r in compact["layers"])
    assert compact["compressed"]["tcr"] == pytest.approx(1 - 3 * 0.5 / 16, abs=1e-3)
    assert dense["compressed"]["tcr"] == pytest.approx(compact["compressed"]["tcr"])
    assert dense["compressed"]["real_cr"] == pytest.approx(0.0)  # fp16 dense: no real compression
    b = compact["compressed"]["bytes"]
    assert compact["compressed"]["real_cr"] == pytest.approx(1 - 8 * b / (16 * n_lin))
    # 50% unstructured + 3-bit g128: 1 (mask) + 1.5 (codes) + 16/128 (scales) + 3/128 (zeros) bits/weight
    assert compact["compressed"]["bits_per_param"] == pytest.approx(1 + 1.5 + 19 / 128, abs=0.01)
    assert compact["model"]["n_params"] == dense["model"]["n_params"] == sum(p.numel() for p in model.parameters())
    print_size_report(compact)
    assert "whole model" in capsys.readouterr().out


def test_unknown_format_and_dtype(tmp_path, compressed):
    model, states, _ = compressed
    with pytest.raises(ExportError, match="unknown export format"):
        export(model, states, tmp_path / "x", fmt="gguf")
    with pytest.raises(ExportError, match="dtype"):
        save_compact(model, states, tmp_path / "y", dtype=torch.int8)
    assert list(tmp_path.iterdir()) == []
