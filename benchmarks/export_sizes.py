"""On-disk size of SmolLM2-135M in each export format, next to TCr.

For every configuration the model is compressed data-free (magnitude masks + RTN: the layout — masks,
bits, groups — is what sets the size, not the solver), exported as compact, compressed-tensors and
dense fp16, reloaded through ``load_exported`` and compared with the in-memory model's logits, and
measured with ``size_report``. Writes benchmarks/results/export_sizes.json and prints a markdown table.

    python benchmarks/export_sizes.py [--model smollm2-135m] [--keep DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from prunequant.api import compress, library_versions
from prunequant.export import export, load_exported, size_report
from prunequant.models import all_linear_names, load_model
from prunequant.recipe import PruneSpec, QuantSpec, Recipe
from prunequant.solvers.base import LayerResult

RESULTS = Path(__file__).parent / "results"


def q(bits, **kw):
    # SmolLM2's 576-wide inputs are not a multiple of 128: the last group of those rows has 64 columns
    return QuantSpec(method="rtn", bits=bits, group_size=128, ragged=True, **kw)


CONFIGS = {
    "fp16": None,
    "4-bit g128": Recipe(quant=q(4)),
    "2:4 + 4-bit g128": Recipe(prune=PruneSpec(method="magnitude", n=2, m=4), quant=q(4), joint="B"),
    "50% + 4-bit g128": Recipe(prune=PruneSpec(method="magnitude", sparsity=0.5), quant=q(4), joint="B"),
    "70% + 3-bit g128": Recipe(prune=PruneSpec(method="magnitude", sparsity=0.7), quant=q(3), joint="B"),
}
FORMATS = ("compact", "compressed-tensors", "dense")


def max_logit_diff(a, b, ids) -> float:
    with torch.no_grad():
        return float((a(ids).logits.float() - b(ids).logits.float()).abs().max())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--keep", help="keep the exports under this directory")
    a = ap.parse_args()
    base, tok = load_model(a.model)
    ids = torch.randint(0, base.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="export_sizes_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for cname, recipe in CONFIGS.items():
        model = copy.deepcopy(base)
        if recipe is not None:
            states = compress(model, recipe, tokenizer=tok, progress=False).report.states
        else:  # the linears, untouched, so that the tables show them at 16 bits
            states = {n: LayerResult(weight=None) for n in all_linear_names(model)}
        with torch.no_grad():  # what a 16-bit checkpoint holds of the tensors that were not compressed
            for pname, p in model.named_parameters():
                if pname.rpartition(".")[0] not in states or recipe is None:
                    p.copy_(p.half().float())
        for fmt in FORMATS:
            out = work / f"{cname.replace(' ', '').replace('%', 'pc').replace(':', '-')}.{fmt}"
            t0 = time.time()
            export(model, states, out, fmt=fmt, dtype=torch.float16, overwrite=True)
            save_s = time.time() - t0
            rep = size_report(out)
            t0 = time.time()
            reloaded, _ = load_exported(out, dtype=torch.float32)
            load_s = time.time() - t0
            diff = max_logit_diff(model, reloaded, ids)
            del reloaded
            c, m = rep["compressed"], rep["model"]
            rows.append({"config": cname, "format": fmt, "bytes_on_disk": rep["bytes_on_disk"],
                         "model_bytes": m["bytes"], "linear_bytes": c["bytes"],
                         "tcr_linears": c["tcr"], "bits_per_param_linears": c["bits_per_param"],
                         "real_cr_linears": c["real_cr"], "tcr_model": m["tcr"],
                         "bits_per_param_model": m["bits_per_param"], "real_cr_model": m["real_cr"],
                         "n_params": m["n_params"], "max_abs_logit_diff": diff,
                         "save_seconds": round(save_s, 1), "load_seconds": round(load_s, 1)})
            print(f"{cname:18s} {fmt:19s} {m['bytes'] / 2**20:8.2f} MiB  TCr {c['tcr'] or 0:.3f}  "
                  f"real {c['real_cr'] or 0:.3f}  Δlogit {diff:.2e}", file=sys.stderr)
        del model
    RESULTS.mkdir(exist_ok=True)
    record = {"model": a.model, "rows": rows, "versions": library_versions(), "date": time.strftime("%Y-%m-%d"),
              "protocol": "data-free magnitude + RTN asym (ragged g128), exports in fp16 with fp16 scales; "
                          "Δlogit: reloaded (float32) vs in-memory compressed model, 64 random tokens"}
    (RESULTS / "export_sizes.json").write_text(json.dumps(record, indent=2, default=str))
    print(markdown(rows))
    return 0


def markdown(rows) -> str:
    head = ("| config | format | MiB on disk | TCr (linears) | bits/weight (linears) | real CR (linears) | "
            "bits/param (model) | real CR (model) | max Δlogit |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        tcr = "—" if r["tcr_linears"] is None else f"{100 * r['tcr_linears']:.1f}%"
        bpl = "—" if r["bits_per_param_linears"] is None else f"{r['bits_per_param_linears']:.3f}"
        rcl = "—" if r["real_cr_linears"] is None else f"{100 * r['real_cr_linears']:.1f}%"
        lines.append(f"| {r['config']} | {r['format']} | {r['model_bytes'] / 2**20:.2f} | {tcr} | {bpl} | {rcl} | "
                     f"{r['bits_per_param_model']:.3f} | {100 * r['real_cr_model']:.1f}% | "
                     f"{r['max_abs_logit_diff']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
