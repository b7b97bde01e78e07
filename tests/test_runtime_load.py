"""Packed serving from a compact export: the loaded model computes what the dequantized model computes
(logits, greedy generations), with no float weight of a packed layer ever made; the decode kernels
(through Triton's interpreter) against a float64 reference; bad directories fail in one line."""
import json

import pytest
import torch

from prunequant.errors import ModelLoadError
from prunequant.export import load_compact, save_compact
from prunequant.runtime import QuantLinear
from prunequant.runtime.fuse import ProjectionSlice
from prunequant.runtime.load import load_packed
from interpreter import interpreted
from test_export_fixtures import VOCAB, assert_same_logits, compress, logits, tiny_gpt2, tiny_llama


EXACT = {b: ["packed"] for b in (2, 3, 4, 8)}  # dequantize-per-call: the float32 weights of the export exactly


def test_sparse24_loads_a_24_export_smaller_with_the_same_logits(tmp_path):
    from prunequant.runtime.qlinear import module_bytes
    from prunequant.runtime.serve import backends_for

    model = tiny_llama()
    out = save_compact(model, compress(model, "2:4+4bit"), tmp_path / "m")
    ref = load_compact(out, dtype=torch.float32)
    s24, rec = load_packed(out, device="cpu", dtype=torch.float32, prefer=backends_for("sparse24", "cpu"))
    assert rec["modules"] == {"4-bit:sparse24": 14}, rec
    packed, _ = load_packed(out, device="cpu", dtype=torch.float32, prefer=EXACT)
    assert module_bytes(s24) < module_bytes(packed)
    assert_same_logits(logits(ref), logits(s24))


@pytest.mark.parametrize("config", ["4bit-g128", "2:4+4bit", "50%+3bit", "mixed-2/4bit", "8bit-pc", "4bit-g96-ragged",
                                    "ternary-g128", "2:4"])
def test_packed_load_equals_the_dequantized_model(tmp_path, config):
    model = tiny_llama()
    states = compress(model, config)
    out = save_compact(model, states, tmp_path / "m")
    ref = load_compact(out, dtype=torch.float32)
    packed, rec = load_packed(out, device="cpu", dtype=torch.float32, prefer=EXACT)
    quantized = [n for n, s in states.items() if s.quant is not None and float(s.quant.bits).is_integer()]
    for n in quantized:  # integer-bit grids run packed, float layers (2:4 only, ternary) stay dense
        assert isinstance(packed.get_submodule(n), (QuantLinear, ProjectionSlice)), (n, rec)
        ql = packed.get_submodule(n)
        torch.testing.assert_close(ql.dense_weight(torch.float32), ref.get_submodule(n).weight, rtol=0, atol=0)
    assert rec["layers"] == len(states)
    assert_same_logits(logits(ref), logits(packed))
    fast, rec = load_packed(out, device="cpu", dtype=torch.float32)  # default CPU kernels (torch's int4 / int8)
    assert_same_logits(logits(ref), logits(fast), rtol=1e-4)


def test_gpt2_conv1d_layers_load_packed(tmp_path):
    model = tiny_gpt2()
    states = compress(model, "4bit-g128")
    out = save_compact(model, states, tmp_path / "m")
    packed, rec = load_packed(out, device="cpu", dtype=torch.float32)
    assert sum(isinstance(m, QuantLinear) for m in packed.modules()) == len(states)
    assert_same_logits(logits(load_compact(out, dtype=torch.float32)), logits(packed))


def test_no_float_weight_of_a_packed_layer_is_made(tmp_path, monkeypatch):
    """decode_linear (the float reconstruction) is never called for a quantized layer."""
    import prunequant.export.compact as compact

    model = tiny_llama()
    out = save_compact(model, compress(model, "4bit-g128"), tmp_path / "m")
    calls = []
    original = compact.decode_linear
    monkeypatch.setattr(compact, "decode_linear", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
    load_packed(out, device="cpu", dtype=torch.float32)
    assert calls == []


@torch.no_grad()
def test_greedy_generations_identical_for_30_tokens_on_8_prompts(tmp_path):
    model = tiny_llama(seed=3)
    out = save_compact(model, compress(model, "2:4+4bit"), tmp_path / "m")
    ref = load_compact(out, dtype=torch.float32)
    packed, _ = load_packed(out, device="cpu", dtype=torch.float32, prefer=EXACT)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        prompt = torch.randint(0, VOCAB, (1, 6), generator=g)
        a = ref.generate(prompt, max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
        b = packed.generate(prompt, max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
        assert torch.equal(a, b)


def test_bad_directories_fail_in_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_packed(tmp_path / "nothing")
    (tmp_path / "d").mkdir()
    with pytest.raises(ModelLoadError, match="no prunequant-export.json"):
        load_packed(tmp_path / "d")
    model = tiny_llama()
    out = save_compact(model, compress(model, "4bit-g128"), tmp_path / "m")
    desc = json.loads((out / "prunequant-export.json").read_text())
    desc["format_version"] = 99
    (out / "prunequant-export.json").write_text(json.dumps(desc))
    with pytest.raises(ModelLoadError, match="newer than this prunequant"):
        load_packed(out, verify=False)
    desc["format_version"], desc["format"] = 1, "prunequant-dense"
    (out / "prunequant-export.json").write_text(json.dumps(desc))
    with pytest.raises(ModelLoadError, match="loads 'prunequant-compact'"):
        load_packed(out, verify=False)


# ---- decode kernels in the interpreter (it decides at import, hence a child process) -------------------

def _kernels() -> list[dict]:
    from prunequant.runtime import triton_wmm as T
    from prunequant.runtime.qlinear import PackedSegment
    from prunequant.solvers.base import QuantState
    from prunequant.solvers.grid import group_index

    g = torch.Generator().manual_seed(0)
    rows = []
    for bits, gs, n, k, m, cols in [(4, 128, 40, 300, 1, False), (4, 32, 33, 256, 3, False), (3, 128, 20, 200, 2, True),
                                    (8, 0, 24, 100, 2, False), (2, 64, 17, 96, 1, False), (3, 30, 16, 64, 2, False)]:
        ng = 1 if gs <= 0 else -(-k // gs)
        q = QuantState("uniform", bits, gs, False, torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.uint8),
                       (torch.rand(n, ng, generator=g) * 0.1 + 0.01).half().float(),
                       torch.randint(0, 2 ** bits, (n, ng), generator=g).float(), group_index(k, gs))
        c = torch.randperm(k + 5, generator=g)[:k].to(torch.int32) if cols else None
        seg = PackedSegment(q, c, "cpu", True)
        x = torch.randn(m, k + 5 if cols else k, generator=g)
        b = torch.randn(n, generator=g)
        xg = x if c is None else x[:, c.long()]
        ref = xg.double() @ q.dequantize().double().t() + b.double()
        cfgs = T._gemv_candidates(m, n, seg)[:2] + [{"kind": "gemv", "BN": 4, "BW": 4, "SPLIT": 3, "num_warps": 2,
                                                     "num_stages": 1}] + T._pdot_candidates(m, n, seg)[:1] + \
            [dict(T._pdot_candidates(m, n, seg)[0], SPLIT=3)] + \
            [dict(c, SPLIT=3) for c in T._sdot_candidates(m, n, seg)[:1]]
        for cfg in cfgs:
            y = T.run(x, [seg], n, b, cfg)
            rows.append({"case": f"{bits}b g{gs} m{m} cols={cols}", "cfg": cfg["kind"],
                         "err": float((y.double() - ref).norm() / ref.norm())})
    return rows


def test_decode_kernels_in_the_interpreter():
    rows = interpreted("test_runtime_load", "_kernels()")
    assert {r["cfg"] for r in rows} == {"gemv", "pdot", "sdot"}
    for r in rows:
        assert r["err"] < 1e-5, r


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tuned_kernels_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEQUANT_TILE_CACHE", str(tmp_path / "tiles.json"))
    model = tiny_llama()
    out = save_compact(model, compress(model, "4bit-g128"), tmp_path / "m")
    ref = load_compact(out, dtype=torch.bfloat16).cuda()
    packed, rec = load_packed(out, device="cuda")
    assert "4-bit:triton" in rec["modules"], rec
    for m in (1, 3, 8, 32, 200):
        x = torch.randint(0, VOCAB, (1, m), device="cuda")
        a, b = ref(x).logits.float(), packed(x).logits.float()
        assert float((a - b).norm() / a.norm()) < 2e-2
    assert (tmp_path / "tiles.json").is_file()


# ---- the commands ------------------------------------------------------------------------------------

def _exports(tmp_path):
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_llama()
    dense = tmp_path / "dense"
    model.save_pretrained(dense)
    tok.save_pretrained(dense)
    out = save_compact(model, compress(model, "4bit-g128"), tmp_path / "packed", tokenizer=tok)
    return out, dense, tok


def test_generate_streams_the_dequantized_models_text(tmp_path, capsys):
    from prunequant.cli import main

    out, _, tok = _exports(tmp_path)
    assert main(["generate", str(out), "--prompt", "the quick brown", "--max-new-tokens", "12", "--exact"]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and "4-bit:packed" in captured.err
    ref = load_compact(out, dtype=torch.float32)
    ids = tok("the quick brown", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = ref.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    assert captured.out.strip() == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_bench_against_the_dense_model(tmp_path, capsys):
    from prunequant.cli import main

    out, dense, _ = _exports(tmp_path)
    js = tmp_path / "bench.json"
    assert main(["bench", str(out), "--batch", "1,2", "--prompt-len", "16", "--decode", "4", "--decode-prompt-len", "8",
                 "--repeats", "1", "--json", str(js), "--against", str(dense)]) == 0
    res = json.loads(js.read_text())
    assert set(res["prefill"]) == {"1", "2"} and set(res["decode"]) == {"1", "2"}
    assert res["packed_linears"] == 14 and res["against"]["packed_linears"] == 0
    assert res["ratios"]["weights"] < 1 and all(v > 0 for v in res["ratios"]["decode"].values())
    cap = capsys.readouterr()
    assert "ratios (compressed / against)" in cap.out
    assert "loaded" in cap.err and "prefill b2 × 16" in cap.err and "decode b1 × 4" in cap.err  # progress as it goes


def test_commands_refuse_bad_input_in_one_line(tmp_path, capsys):
    from prunequant.cli import main

    out, _, _ = _exports(tmp_path)
    assert main(["bench", str(out), "--batch", "1,x"]) == 2
    assert "--batch" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "a", "--max-new-tokens", "0"]) == 2
    assert main(["bench", str(out), "--prompt-len", "100000", "--decode", "1"]) == 2
    assert "context" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", str(out), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("config,asym", [("4bit-g128", "zero-point"), ("8bit-pc", "zero-point"),
                                         ("mixed-2/4bit-sym", "zero-point"), ("2:4+4bit", "widen")])
def test_compressed_tensors_load_packed(tmp_path, config, asym):
    pytest.importorskip("compressed_tensors")
    from prunequant.export.ctensors import load_compressed_tensors, save_compressed_tensors

    model = tiny_llama()
    states = compress(model, config)
    out = save_compressed_tensors(model, states, tmp_path / "m", torch.float32, asymmetric=asym)
    ref = load_compressed_tensors(out, dtype=torch.float32)
    packed, rec = load_packed(out, device="cpu", dtype=torch.float32, prefer=EXACT, fuse=False)
    assert rec["format"] == "compressed-tensors" and rec["layers"] == len(states)
    if asym == "zero-point":  # widened grids are 5-bit: no packed layout, dense with the reason recorded
        assert sum(isinstance(m, QuantLinear) and m.segs[0].backend == "packed" for m in packed.modules()) \
            == len(states), rec
    assert_same_logits(logits(ref), logits(packed))


def test_kernel_choice_falls_back_with_the_reason(tmp_path):
    from prunequant.runtime.serve import load_for_serving

    out, _, _ = _exports(tmp_path)
    model, _, rec = load_for_serving(str(out), "cpu", torch.float32, kernel="triton")
    if not torch.cuda.is_available():
        assert rec["modules"] == {"4-bit:tinygemm": 14}, rec
        assert any(f["reason"].startswith("triton:") for f in rec["fallbacks"]), rec
    _, _, rec = load_for_serving(str(out), "cpu", torch.float32, exact=True)
    assert rec["modules"] == {"4-bit:packed": 14}


def test_sibling_projections_fuse_into_one_matmul(tmp_path):
    model = tiny_llama()
    out = save_compact(model, compress(model, "4bit-g128"), tmp_path / "m")
    ref = load_compact(out, dtype=torch.float32)
    plain, rec0 = load_packed(out, device="cpu", dtype=torch.float32, prefer=EXACT, fuse=False)
    fused, rec = load_packed(out, device="cpu", dtype=torch.float32, prefer=EXACT)
    n_layers = len(fused.model.layers)
    assert rec0["fused_groups"] == 0 and rec["fused_groups"] == 2 * n_layers, rec
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert all(isinstance(getattr(attn, n), ProjectionSlice) for n in ("q_proj", "k_proj", "v_proj"))
    assert all(isinstance(getattr(mlp, n), ProjectionSlice) for n in ("gate_proj", "up_proj"))
    for n in ("q_proj", "k_proj", "v_proj"):  # each slice is exactly its layer's dequantized weight
        torch.testing.assert_close(getattr(attn, n).dense_weight(torch.float32),
                                   getattr(ref.model.layers[0].self_attn, n).weight, rtol=0, atol=0)
    calls = []
    shared = attn.fused_q_proj_k_proj_v_proj.linear
    shared.register_forward_hook(lambda *a: calls.append(1))
    assert_same_logits(logits(plain), logits(fused), rtol=1e-5)
    assert_same_logits(logits(ref), logits(fused))
    assert len(calls) == 2  # one shared matmul per forward (two forwards above), not one per sibling


def test_projections_with_different_packing_stay_apart(tmp_path):
    model = tiny_llama()
    out = save_compact(model, compress(model, "mixed-2/4bit"), tmp_path / "m")
    packed, rec = load_packed(out, device="cpu", dtype=torch.float32, prefer=EXACT)
    ref = load_compact(out, dtype=torch.float32)
    assert_same_logits(logits(ref), logits(packed))


def _compiled_step(backend: str, sparse24: bool = False) -> dict:
    """One decode step of a tiny packed model (q/k/v and gate/up fused; or 2:4-sparse layers held as
    sparse24), eager and through torch.compile: the logits, and how many times the packed kernel ran."""
    from transformers import StaticCache

    from prunequant.runtime import fuse_siblings, pack_model, triton_wmm
    from prunequant.runtime.serve import compiled
    from structural_models import calib, tiny_model
    from test_runtime import _uniform

    torch.manual_seed(0)
    model = tiny_model(layers=2, hidden=64, inter=96, heads=4, kv=2).eval()
    states = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            W = mod.weight.data.float()
            if sparse24:  # the two largest of every four
                top = W.abs().reshape(W.shape[0], -1, 4).topk(2, -1).indices
                W = W * torch.zeros_like(W).reshape(W.shape[0], -1, 4).scatter_(-1, top, 1.0).reshape(W.shape)
            states[name] = _uniform(W, 4, 32)
            mod.weight.data.copy_(states[name].dequantize())
    with torch.no_grad():
        pack_model(model, states, prefer={4: ["sparse24" if sparse24 else "triton"]})
        fused = fuse_siblings(model, torch.float32)
    calls, kernel = [0], triton_wmm.matmul

    def counting(*a, **k):
        calls[0] += 1
        return kernel(*a, **k)
    triton_wmm.matmul = counting
    out = {"fused": fused}
    with torch.inference_mode():
        cache = StaticCache(config=model.config, max_cache_len=32)
        ids = calib(1, 12)
        tok = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        step = compiled(model, backend)
        for name, fwd in (("eager", model), ("compiled", step), ("compiled again", step)):
            for layer in cache.layers:  # every step at the same position
                layer.cumulative_length.fill_(ids.shape[1])
            calls[0] = 0
            logits = fwd(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            out[name] = {"calls": calls[0], "logits": logits.flatten().tolist()}
    out["shared_state_released"] = all(m._x is None and m._y is None for m in model.modules()
                                       if type(m).__name__ == "SharedProjection")
    return out


def test_packed_kernels_trace_into_torch_compile():
    """The Triton kernels enter a compiled graph as custom ops (interpreter here): same logits, and a fused
    q/k/v or gate/up projection still runs its kernel once per step, not once per sibling."""
    fused = interpreted("test_runtime_load", "_compiled_step('aot_eager')")
    s24 = interpreted("test_runtime_load", "_compiled_step('aot_eager', sparse24=True)")
    assert fused["fused"] == 4 and fused["shared_state_released"] and s24["fused"] == 0
    for r, calls in ((fused, 8), (s24, 14)):  # per block: q/k/v, o, gate/up, down; 2:4: the 7 linears
        assert r["eager"]["calls"] == calls
        for name in ("compiled", "compiled again"):
            assert r[name]["calls"] == calls, r[name]["calls"]
            diff = max(abs(a - b) for a, b in zip(r[name]["logits"], r["eager"]["logits"]))
            assert diff < 1e-5, diff


def test_bench_decodes_through_torch_compile_on_the_cpu(tmp_path):
    from prunequant.runtime.serve import bench, load_for_serving

    out, _, _ = _exports(tmp_path)
    model, _, _ = load_for_serving(str(out), "cpu", torch.float32)
    res = bench(model, [2], 16, 4, decode_prompt_len=8, repeats=1, compile="aot_eager")
    assert res["decode_compiled"] and res["decode"]["2"] > 0


def test_generate_through_torch_compile_gives_the_same_text(tmp_path):
    import io

    from torch._dynamo.utils import counters

    from prunequant.runtime.serve import generate, load_for_serving

    out, _, _ = _exports(tmp_path)
    model, tok, _ = load_for_serving(str(out), "cpu", torch.float32)
    texts = []
    for compile in (False, "aot_eager"):
        counters.clear()
        buf = io.StringIO()
        r = generate(model, tok, "the quick brown", 12, out=buf, compile=compile)
        texts.append(buf.getvalue())
        assert r["new_tokens"] == 12
        assert (counters["stats"]["unique_graphs"] > 0) == bool(compile)
    assert texts[0] == texts[1] and texts[0].strip()
