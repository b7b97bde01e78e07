"""The packed runtime computes what the dequantized model computes, on real weights (SmolLM2-135M).

For each configuration the model is compressed by the project's own pipeline (data-free RTN / magnitude, so
it runs on a small CPU), written as a compact export, then loaded twice: ``load_compact`` (float32 weights
decoded from the export: the dequantized model) and ``load_packed`` (packed modules, no float weights). It
reports the perplexity of both on the same windows (relative difference; the target is ≤ 0.5%) and
whether greedy generations of --new-tokens tokens on 8 prompts are identical, in float32 with the exact
path (dequantize per call) and with the default CPU kernels (torch's int4 / int8 weight-only kernels).

    python benchmarks/runtime_exactness.py --model smollm2-135m --out results.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# "w8" is asymmetric g128 (rtn:8's defaults), which torch's int8 kernel does not take (one symmetric scale per
# row); "w8 pc sym" is the grid that kernel takes, so that the "cpu kernels" mode runs it.
CONFIGS = {"w4 g128": ("", "rtn:4:g128"), "w8": ("", "rtn:8"), "w8 pc sym": ("", "rtn:8:pc:sym"),
           "2:4+w4 g128": ("magnitude:2:4", "rtn:4:g128"), "w3 g128": ("", "rtn:3:g128")}
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The best way to learn",
           "In 1969, the first", "Water boils at", "My favourite recipe is", "The theory of relativity"]


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, window: int) -> float:
    nll, n = 0.0, 0
    for s in range(0, ids.numel() - 1, window):
        chunk = ids[s:s + window + 1][None]
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1]).logits.float()
        nll += float(F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
        n += chunk.shape[1] - 1
    return math.exp(nll / n)


@torch.inference_mode()
def greedy(model, tok, prompt: str, new_tokens: int) -> list[int]:
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(next(model.buffers(), next(model.parameters())).device)
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=30)
    ap.add_argument("--modes", nargs="*", default=["exact", "cpu kernels"],
                    choices=["exact", "cpu kernels", "gpu kernels", "gpu bf16"],
                    help="gpu kernels: our Triton kernels in float32 on CUDA against the float32 dequantized model; "
                         "gpu bf16: the same kernels in bfloat16 against the bfloat16 dequantized model")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from prunequant.engine import compress_model
    from prunequant.data import load_text, tokenize
    from prunequant.export import load_compact, save_compact
    from prunequant.models import load_model
    from prunequant.recipe import Recipe, parse_prune, parse_quant
    from prunequant.runtime import load_packed

    torch.manual_seed(0)
    base, tok = load_model(args.model)
    ids = tokenize(tok, load_text("wiki", "eval"), max_tokens=args.eval_tokens)
    rows = []
    for name in args.configs:
        prune, quant = CONFIGS[name]
        model, _ = load_model(args.model)
        recipe = Recipe(prune=parse_prune(prune) if prune else None, quant=parse_quant(quant))
        rep = compress_model(model, None, recipe.plan_for, device="cpu", progress=False)
        with tempfile.TemporaryDirectory() as d:
            out = save_compact(model, rep.states, Path(d) / "m", torch.bfloat16, tokenizer=tok)
            del model
            row = {"model": args.model, "config": name, "prune": prune, "quant": quant,
                   "eval_tokens": int(ids.numel())}
            t = time.time()
            triton_first = {b: ["triton"] for b in (2, 3, 4, 8)}
            modes = {"exact": ("cpu", torch.float32, {b: ["packed"] for b in (2, 3, 4, 8)}),
                     "cpu kernels": ("cpu", torch.float32, None), "gpu kernels": ("cuda", torch.float32, triton_first),
                     "gpu bf16": ("cuda", torch.bfloat16, triton_first)}
            refs = {}
            for mode in args.modes:
                device, dtype, prefer = modes[mode]
                if (device, dtype) not in refs:  # the dequantized model on the same device and dtype
                    t_ref = time.time()
                    deq = load_compact(out, dtype=dtype).to(device)
                    refs[device, dtype] = (perplexity(deq, ids.to(device), args.window),
                                           [greedy(deq, tok, p, args.new_tokens) for p in PROMPTS])
                    row.setdefault("seconds_dequantized", {})[f"{device} {dtype}".replace("torch.", "")] = \
                        round(time.time() - t_ref, 1)
                    del deq
                ppl_ref, gens = refs[device, dtype]
                row.setdefault("ppl_dequantized", ppl_ref)
                t_mode = time.time()
                packed, rec = load_packed(out, device=device, dtype=dtype, prefer=prefer)
                ppl = perplexity(packed, ids.to(device), args.window)
                same = [greedy(packed, tok, p, args.new_tokens) == g for p, g in zip(PROMPTS, gens)]
                row[mode] = {"ppl": ppl, "ppl_dequantized": ppl_ref, "ppl_rel_diff": abs(ppl / ppl_ref - 1),
                             "identical_generations": f"{sum(same)}/{len(same)}", "modules": rec["modules"],
                             "fallbacks": rec["fallbacks"], "seconds": round(time.time() - t_mode, 1)}
                print(json.dumps({"config": name, "mode": mode, **row[mode]}), flush=True)
                del packed
            row["seconds"] = round(time.time() - t, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    strict = [m for m in ("exact", "gpu kernels") if m in args.modes]  # float32 paths: must match
    bad = [f"{r['config']} ({m})" for r in rows for m in strict if r[m]["ppl_rel_diff"] > 0.005
           or r[m]["identical_generations"] != f"{len(PROMPTS)}/{len(PROMPTS)}"]
    if bad:
        print(f"packed model differs from the dequantized model for: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
