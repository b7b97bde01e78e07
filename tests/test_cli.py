"""Command-line contract and bad input: one-line errors, exit code != 0, nothing written."""
import json
import math

import pytest
import torch

from prunequant.cli import main
from tiny import TRAIN_TEXT, save_tiny

TEXT = ("Alpha beta gamma delta. " * 40 + "\n") * 30


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "tiny"
    save_tiny(d)
    return d


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("t")
    calib = d / "calib.txt"
    calib.write_text(TEXT)
    ev = d / "eval.txt"
    ev.write_text(TRAIN_TEXT * 20)
    return calib, ev


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    err = out.err
    if code != 0:  # exactly one error line and no traceback; progress bars aside
        assert "Traceback" not in err
        errors = [ln for ln in err.splitlines() if ln.startswith("prunequant: ")]
        assert len(errors) == 1, err
        err = errors[0]
    return code, out.out, err


def test_compress_then_eval_roundtrip(tiny_dir, texts, tmp_path, capsys):
    calib, ev = texts
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", tiny_dir, "--prune", "magnitude:0.5", "--quant", "rtn:4:g32",
                            "--joint", "B", "--calib-text", calib, "--calib-samples", 4, "--seq-len", 32, "--out", out,
                            "--eval", "--text", ev, "--max-tokens", 256)
    assert code == 0, err
    assert "TCr" in stdout and "0.8750" in stdout
    rec = json.loads((out / "prunequant.json").read_text())
    assert rec["recipe"]["prune"]["sparsity"] == 0.5 and rec["calibration"]["seed"] == 0
    assert len(rec["calibration"]["sha256"]) == 64 and "torch" in rec["versions"]
    assert rec["evaluation"]["compressed"]["texts"][str(ev)]["perplexity"] > 0
    js = tmp_path / "e.json"
    code, stdout, err = run(capsys, "eval", out, "--text", ev, "--seq-len", 32, "--max-tokens", 256, "--json", js)
    assert code == 0, err
    res = json.loads(js.read_text())
    assert res["tokens"] == 256 and res["seq_len"] == 32 and math.isfinite(res["perplexity"])
    same = rec["evaluation"]["compressed"]["texts"][str(ev)]["perplexity"]
    assert res["perplexity"] == pytest.approx(same, rel=1e-4)  # reload gives the same model


BAD = [
    (["--prune", "magnitude:1.0"], "outside [0, 1)"),
    (["--prune", "magnitude:-0.1"], "outside [0, 1)"),
    (["--prune", "wanda:4:2"], "N:M"),
    (["--prune", "foo:0.5"], "unknown pruning method"),
    (["--quant", "rtn:9"], "not supported"),
    (["--quant", "rtn:4:g7"], "multiple of 8"),
    ([], "nothing to do"),
]


@pytest.mark.parametrize("args,msg", BAD)
def test_bad_recipe(tiny_dir, texts, tmp_path, capsys, args, msg):
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", tiny_dir, *args, "--calib-text", texts[0], "--calib-samples", 2,
                       "--seq-len", 16, "--out", out)
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_models(tmp_path, texts, capsys, tiny_dir):
    code, _, err = run(capsys, "eval", tmp_path / "nope", "--text", texts[1])
    assert code == 2 and "does not exist" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    st = broken / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    code, _, err = run(capsys, "eval", broken, "--text", texts[1], "--seq-len", 64)
    assert code == 2 and "cannot load" in err and len(err.strip().splitlines()) == 1
    unsupported = tmp_path / "bert"
    import transformers as tf

    tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  vocab_size=400, is_decoder=True).save_pretrained(unsupported)
    tf.BertLMHeadModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=400, is_decoder=True)).save_pretrained(unsupported)
    from tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(unsupported)
    code, _, err = run(capsys, "eval", unsupported, "--text", texts[1])
    assert code == 2 and "not supported" in err and "llama" in err


def test_bad_text_and_existing_output(tiny_dir, texts, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", tiny_dir, "--quant", "rtn:4:g32", "--calib-text", empty, "--seq-len", 64,
                       "--out", out)
    assert code == 2 and "empty" in err and not out.exists()
    short = tmp_path / "short.txt"
    short.write_text("tiny text")
    code, _, err = run(capsys, "compress", tiny_dir, "--quant", "rtn:4:g32", "--calib-text", short, "--seq-len", 64,
                       "--out", out)
    assert code == 2 and "fewer than one sequence" in err and not out.exists()
    code, _, err = run(capsys, "eval", tiny_dir, "--text", short, "--seq-len", 64)
    assert code == 2 and "fewer than one window" in err
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "compress", tiny_dir, "--quant", "rtn:4:g32", "--calib-text", texts[0], "--out", out)
    assert code == 2 and "already exists" in err and (out / "keep.txt").read_text() == "mine"
    code, _, err = run(capsys, "compress", tiny_dir, "--quant", "rtn:4:g32", "--calib-text", "nosuch.txt", "--out",
                       tmp_path / "o2")
    assert code == 2 and "neither a file" in err


def test_interrupt_leaves_no_output(tiny_dir, texts, tmp_path, capsys, monkeypatch):
    import prunequant.engine as eng

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(eng, "run_block", boom)
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", tiny_dir, "--prune", "wanda:0.5", "--calib-text", texts[0],
                       "--calib-samples", 2, "--seq-len", 16, "--out", out)
    assert code == 130 and "interrupted" in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] in ([], ["out.prunequant-work"])


def test_act_quant_is_recorded_and_restored_on_load(tiny_dir, texts, tmp_path, capsys):
    from prunequant.models import load_model

    out = tmp_path / "w8a8"
    code, _, err = run(capsys, "compress", tiny_dir, "--quant", "rtn:8:g32", "--act-bits", "8", "--calib-text",
                       texts[0], "--calib-samples", 2, "--seq-len", 16, "--out", out)
    assert code == 0, err
    rec = json.loads((out / "prunequant.json").read_text())
    assert rec["act_quant"]["bits"] == 8 and rec["act_quant"]["smoothed_linears"] > 0
    model, _ = load_model(str(out))
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 14  # one fake-quant hook per block linear (2 blocks x 7)
    ids = torch.randint(0, 300, (1, 16))
    plain, _ = load_model(str(tiny_dir))
    with torch.no_grad():
        d = (model(ids).logits - plain(ids).logits).abs().max()
    assert 0 < d < 1.0  # W8A8 simulated: close to the original, not identical


def test_structured_and_global_commands_reload(tiny_dir, texts, tmp_path, capsys):
    from prunequant.models import load_model

    out = tmp_path / "st"
    code, stdout, err = run(capsys, "structured", tiny_dir, "--heads", "0.5", "--mlp", "0.25", "--calib-text",
                            texts[0], "--calib-samples", 2, "--seq-len", 16, "--out", out)
    assert code == 0, err
    model, _ = load_model(str(out))
    assert model.model.layers[0].mlp.down_proj.weight.shape[1] == 96
    out2 = tmp_path / "gl"
    code, stdout, err = run(capsys, "global", tiny_dir, "--avg-bits", "3", "--steps", 3, "--calib-text", texts[0],
                            "--calib-samples", 4, "--seq-len", 16, "--out", out2)
    assert code == 0, err
    rec = json.loads((out2 / "prunequant.json").read_text())
    assert rec["avg_bits"] <= 3.0 + 1e-6
    load_model(str(out2))
    code, _, err = run(capsys, "structured", tiny_dir, "--heads", "1.5", "--calib-text", texts[0], "--out",
                       tmp_path / "x")
    assert code == 2 and "outside [0, 1)" in err


def test_eval_against_base_reports_retention(tiny_dir, texts, tmp_path, capsys):
    task = tmp_path / "mc.jsonl"
    task.write_text("\n".join(json.dumps({"context": f"Question {i}:", "choices": ["yes", "no"], "label": i % 2})
                              for i in range(8)) + "\n")
    js, rep = tmp_path / "e.json", tmp_path / "report"
    code, stdout, err = run(capsys, "eval", tiny_dir, "--against", tiny_dir, "--text", texts[1], "--seq-len", 32,
                            "--max-tokens", 256, "--tasks", f"file:{task}", "--agree-tokens", 128, "--json", js,
                            "--report-dir", rep)
    assert code == 0, err
    res = json.loads(js.read_text())
    assert res["agreement"]["kl"] == pytest.approx(0.0, abs=1e-6) and res["agreement"]["top1"] == 1.0
    assert all(v == pytest.approx(1.0) for v in res["retention"].values()) and res["sr"] == pytest.approx(1.0)
    assert any(p.suffix == ".png" for p in rep.iterdir()) and any(p.suffix == ".md" for p in rep.iterdir())


@pytest.mark.parametrize("fmt", ["compact", "compressed-tensors"])
def test_formats_reload_same_perplexity_size_and_corruption(tiny_dir, texts, tmp_path, capsys, fmt):
    calib, ev = texts
    out = tmp_path / fmt
    code, _, err = run(capsys, "compress", tiny_dir, "--prune", "sparsegpt:2:4", "--quant", "gptq:4:g32",
                       "--calib-text", calib, "--calib-samples", 4, "--seq-len", 32, "--out", out, "--format", fmt,
                       "--eval", "--text", ev, "--max-tokens", 256, "--agree-tokens", 0)
    assert code == 0, err
    rec = json.loads((out / "prunequant.json").read_text())
    js = tmp_path / "e.json"
    code, _, err = run(capsys, "eval", out, "--text", ev, "--seq-len", 32, "--max-tokens", 256, "--json", js)
    assert code == 0, err
    mem = rec["evaluation"]["compressed"]["texts"][str(ev)]["perplexity"]
    assert json.loads(js.read_text())["perplexity"] == pytest.approx(mem, rel=1e-3)
    code, stdout, err = run(capsys, "size", out)
    assert code == 0, err
    assert "TCr" in stdout
    shard = next(p for p in out.iterdir() if p.suffix == ".safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = run(capsys, "eval", out, "--text", ev, "--seq-len", 32)
    assert code == 2 and shard.name in err


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_structured_and_global_on_qwen2_and_gemma3_shapes(kind, texts, tmp_path, capsys):
    """Both structural commands run through the engine's block loop on other architectures than Llama:
    Qwen2 (q/k/v biases) and Gemma 3 (sliding and full attention blocks, q/k norms, one KV head)."""
    from prunequant.models import load_model

    src = tmp_path / kind
    save_tiny(src, kind)
    out = tmp_path / "st"
    code, _, err = run(capsys, "structured", src, "--heads", "0.25", "--mlp", "0.25", "--calib-text", texts[0],
                       "--calib-samples", 2, "--seq-len", 16, "--out", out)
    assert code == 0, err
    model, _ = load_model(str(out))
    assert all(b.mlp.down_proj.weight.shape[1] == 96 for b in model.model.layers)
    assert (out / "prunequant.json").is_file() and any(out.glob("*manifest*"))
    out2 = tmp_path / "gl"
    code, _, err = run(capsys, "global", src, "--avg-bits", "3", "--steps", 2, "--calib-text", texts[0],
                       "--calib-samples", 4, "--seq-len", 16, "--out", out2)
    assert code == 0, err
    assert json.loads((out2 / "prunequant.json").read_text())["avg_bits"] <= 3.0 + 1e-6
    load_model(str(out2))
    for d in (out, out2):  # both outputs evaluate from disk
        js = tmp_path / f"{d.name}.json"
        code, _, err = run(capsys, "eval", d, "--text", texts[1], "--seq-len", 16, "--max-tokens", 64, "--json", js)
        assert code == 0, err
        assert math.isfinite(json.loads(js.read_text())["perplexity"])
