"""Shared benchmark plumbing: load the model once, run configurations resumably (one JSON per config)."""
from __future__ import annotations

import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from prunequant.api import compress, evaluate, library_versions
from prunequant.models import load_model
from prunequant.recipe import Recipe

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import os

    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def run_configs(model_name: str, configs: dict[str, Recipe | None], out_name: str, *, calib_samples=64,
                seq_len=512, eval_seq_len=512, max_tokens=20_000, texts=("wiki", "lambada"), seed=0):
    """configs: name → Recipe (None = the uncompressed baseline). Returns {name: result}."""
    out_dir = RESULTS / out_name
    out_dir.mkdir(parents=True, exist_ok=True)
    base, tok = load_model(model_name)
    results = {}
    for name, recipe in configs.items():
        f = out_dir / f"{name}.json"
        if f.is_file():
            results[name] = json.loads(f.read_text())
            print(f"[cached] {name}", file=sys.stderr)
            continue
        t0 = time.time()
        model = copy.deepcopy(base)
        row = {"config": name, "recipe": recipe.to_dict() if recipe else None,
               "describe": recipe.describe() if recipe else "uncompressed"}
        if recipe is not None:
            res = compress(model, recipe, tokenizer=tok, calib_samples=calib_samples, seq_len=seq_len, seed=seed,
                           progress=False)
            row.update(rates=res.rates, compress_seconds=round(res.report.seconds, 1),
                       calibration=res.record["calibration"], allocation=res.record.get("allocation"))
        else:
            row.update(rates={"tcr": 0.0, "rate_with_overheads": 0.0})
        ev = evaluate(model, tok, texts=list(texts), seq_len=eval_seq_len, max_tokens=max_tokens, progress=False)
        model.to("cpu")
        row.update(eval=ev, total_seconds=round(time.time() - t0, 1), machine=machine(),
                   versions=library_versions(), date=time.strftime("%Y-%m-%d"))
        f.write_text(json.dumps(row, indent=2, default=str))
        results[name] = row
        ppl = {k: round(v["perplexity"], 3) for k, v in ev["texts"].items()}
        print(f"{name}: {ppl} tcr={row['rates']['tcr']:.4f} ({row['total_seconds']}s)", file=sys.stderr)
    return results


def markdown_table(results: dict, texts=("wiki", "lambada")) -> str:
    head = "| config | recipe | TCr | rate incl. overheads | " + " | ".join(f"ppl {t}" for t in texts) + " | compress s |"
    lines = [head, "|" + "---|" * (5 + len(texts))]
    for name, r in results.items():
        ppl = " | ".join(f"{r['eval']['texts'][t]['perplexity']:.3f}" for t in texts)
        desc = r["describe"]
        alloc = r.get("allocation") or {}
        if alloc.get("method") == "bits":
            desc += f", bits allocated per layer (avg {alloc.get('avg_bits', 0):.3f})"
        elif alloc.get("method") == "owl":
            desc += ", OWL per-block sparsity"
        lines.append(f"| {name} | {desc} | {r['rates']['tcr']:.4f} | {r['rates'].get('rate_with_overheads', 0):.4f} | "
                     f"{ppl} | {r.get('compress_seconds', '')} |")
    return "\n".join(lines)
