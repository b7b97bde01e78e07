"""GPTQ 4-bit on the same Llama-shaped random model: prunequant vs llm-compressor, side by side.

Each side runs in its own process (fresh CUDA context, own peak-memory counter) on the same model
(benchmarks/gpu_scale.py's builder, same seed) and the same 128 × 2048 random calibration tokens, with
llm-compressor's W4A16 scheme (4-bit symmetric, groups of 128, static act-order, damping 0.01, blocks
of 128 columns) and ours set alike (--peer-like). Both keep the model on the CPU and onload one decoder
block at a time. llm-compressor keeps calibration activations on the CPU between blocks by default
(sequential_offload_device="cpu"); ours is run both ways: activations on the GPU when they fit (our
default) and offloaded to pinned CPU memory (the same placement as theirs).

    python benchmarks/peer_gpu.py --shape 7b --blocks 8 --out peer.json
Needs llmcompressor (see BENCHMARKS.md for the wheels carried to the GPU machine).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_scale import build_model, run_one  # noqa: E402


def run_theirs(shape, blocks, samples, seq, batch_size, device) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    model, cfg = build_model(shape, blocks, "cpu", seed=0, lm_head=True)
    ids = torch.randint(0, cfg.vocab_size, (samples, seq), generator=torch.Generator().manual_seed(0))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    tok = _stub_tokenizer()  # the data is token ids already; oneshot still wants a processor object
    cfg_dir = tempfile.mkdtemp()  # oneshot re-reads the config from model.config.name_or_path
    model.config.save_pretrained(cfg_dir)
    model.config.name_or_path = cfg_dir
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=seq, num_calibration_samples=samples,
            batch_size=batch_size, shuffle_calibration_samples=False, tokenizer=tok)
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    import llmcompressor

    return {"side": "llm-compressor " + llmcompressor.__version__, "seconds": round(secs, 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0.0,
            "blocks_run": cfg.num_hidden_layers}


def _stub_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>")


def run_ours(shape, blocks, samples, seq, batch_size, device, offload) -> dict:
    rates = {"bf16": 7e14, "fp32": 5e13}  # floors are gpu_scale.py's business; only time and memory here
    if device == "cuda":  # compile the Triton kernel and create library handles outside the timed run
        run_one("tiny", "gptq", 1, "cpu", 4, 256, 4, False, True, rates, peer_like=True, device=device)
    r = run_one(shape, "gptq", blocks, "cpu", samples, seq, batch_size, False, True, rates, peer_like=True,
                device=device, offload=offload)
    return {"side": "prunequant" + (" (activations offloaded)" if offload else ""), "seconds": r["seconds"],
            "peak_gib": r["peak_gib"], "blocks_run": r["blocks_run"], "phases_s": r["phases_s"],
            "offloaded": r["offloaded"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--side", choices=["theirs", "ours", "ours-offload", "all"], default="all")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    common = (a.shape, a.blocks, a.samples, a.seq_len, a.batch_size, a.device)
    if a.side == "theirs":
        print(json.dumps(run_theirs(*common)))
        return
    if a.side in ("ours", "ours-offload"):
        print(json.dumps(run_ours(*common, offload=True if a.side == "ours-offload" else None)))
        return
    results = []
    for side in ("ours", "ours-offload", "theirs"):
        cmd = [sys.executable, __file__, "--side", side, "--shape", a.shape, "--samples", str(a.samples),
               "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), "--device", a.device]
        if a.blocks:
            cmd += ["--blocks", str(a.blocks)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            print(f"--- {side} failed ---\n{p.stderr[-4000:]}", flush=True)
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(json.dumps(r), flush=True)
        results.append(r)
    theirs = next((r for r in results if r["side"].startswith("llm-compressor")), None)
    for r in results:
        if theirs and r is not theirs:
            r["time_ratio_ours_over_theirs"] = round(r["seconds"] / theirs["seconds"], 3)
            r["speedup"] = round(theirs["seconds"] / r["seconds"], 2)
            r["peak_ratio_ours_over_theirs"] = round(r["peak_gib"] / max(theirs["peak_gib"], 1e-9), 3)
    print(f"\n{a.shape} x {results[0]['blocks_run'] if results else '?'} blocks, {a.samples} x {a.seq_len} tokens, "
          f"GPTQ W4A16 g128 act-order, {torch.cuda.get_device_name() if a.device == 'cuda' else 'cpu'}")
    print(f"{'side':<40} {'seconds':>8} {'peak GiB':>9} {'speedup':>8} {'peak ratio':>10}")
    for r in results:
        print(f"{r['side']:<40} {r['seconds']:>8.1f} {r['peak_gib']:>9.2f} {r.get('speedup', 1.0):>8.2f} "
              f"{r.get('peak_ratio_ours_over_theirs', 1.0):>10.2f}")
    if a.out:
        with open(a.out, "a") as fh:
            for r in results:
                fh.write(json.dumps({"shape": a.shape, "blocks": a.blocks, **r}) + "\n")


if __name__ == "__main__":
    main()
