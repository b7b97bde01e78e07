"""SmolLM2-135M quality suite for issues 2, 4, 5 and 6: every hand-picked configuration, one JSON each.

python benchmarks/quality_suite.py [--group foundation|prune|quant|joint|all] [--only NAME ...] [--out DIR]

Runs on the GPU when one is present (compress and evaluate pick CUDA by default).

Protocol (stated beside every number in BENCHMARKS.md; CPU-sized because the 2-core machine is the only
one left): calibration = 32 windows x 512 tokens from the 'wiki' calibration split (seed 0); perplexity =
non-overlapping 512-token windows, token level, on the first 8,192 tokens of the 'wiki' and 'lambada'
evaluation splits (disjoint from calibration by article / passage hash). The embedded model was distributed as GGUF Q4_1 (4-bit asymmetric, blocks of 32): 4-bit
g32 asymmetric is lossless on it, so 4-bit g128 (ragged last group: 576 = 4x128 + 64) is the headline.
"""
from __future__ import annotations

import argparse

from common import markdown_table, run_configs

from prunequant.recipe import PruneSpec, QuantSpec, Recipe


def Q(method, bits, g=128, **kw):
    return QuantSpec(method, bits, g, ragged=(g == 128), **kw)


def P(method, s=0.5, n=0, m=0):
    return PruneSpec(method, s, n=n, m=m)


GROUPS = {
    "foundation": {
        "baseline": None,
        "rtn8_g128": Recipe(quant=Q("rtn", 8)),
        "rtn4_g128": Recipe(quant=Q("rtn", 4)),
        "rtn3_g128": Recipe(quant=Q("rtn", 3)),
        "magnitude50": Recipe(prune=P("magnitude")),
    },
    "prune": {
        **{f"{m}50": Recipe(prune=P(m)) for m in ("wanda", "sparsegpt")},
        **{f"{m}_2of4": Recipe(prune=P(m, n=2, m=4)) for m in ("magnitude", "wanda", "sparsegpt")},
        **{f"{m}_4of8": Recipe(prune=P(m, n=4, m=8)) for m in ("magnitude", "wanda", "sparsegpt")},
        **{f"{m}{int(s*100)}{'_owl' if owl else ''}": Recipe(prune=P(m, s), allocation={"method": "owl"} if owl
                                                             else {"method": "uniform"})
           for m in ("wanda", "sparsegpt") for s in (0.6, 0.7) for owl in (False, True)},
    },
    "quant": {
        **{f"gptq{b}_g128": Recipe(quant=Q("gptq", b)) for b in (8, 4, 3, 2)},
        "rtn2_g128": Recipe(quant=Q("rtn", 2)),
        **{f"{m}{b}_pc": Recipe(quant=Q(m, b, 0)) for m in ("rtn", "gptq") for b in (8, 4, 3)},
        "gptq4_g32": Recipe(quant=Q("gptq", 4, 32)),
        "gptq_ternary_g64": Recipe(quant=QuantSpec("gptq", 1.58, 64, symmetric=True)),
        "billm1": Recipe(quant=QuantSpec("billm", 1, 128, ragged=True)),
        "mixed2.5_g128": Recipe(quant=Q("gptq", 3), allocation={"method": "bits", "avg_bits": 2.5, "choices": [2, 3, 4]}),
        "mixed3_g128": Recipe(quant=Q("gptq", 3), allocation={"method": "bits", "avg_bits": 3.0, "choices": [2, 3, 4, 8]}),
    },
    "joint": {  # TCr points of issue 6 (bits on a 16-bit baseline)
        "t0.75_q4": Recipe(quant=Q("gptq", 4)),
        "t0.75_s50_q8": Recipe(prune=P("sparsegpt"), quant=Q("gptq", 8)),
        "t0.8125_q3": Recipe(quant=Q("gptq", 3)),
        "t0.8125_s25_q4": Recipe(prune=P("sparsegpt", 0.25), quant=Q("gptq", 4)),
        "t0.8125_2of8_q4": Recipe(prune=P("sparsegpt", n=2, m=8), quant=Q("gptq", 4)),
        "t0.875_q2": Recipe(quant=Q("gptq", 2)),
        "t0.875_s50_q4": Recipe(prune=P("sparsegpt"), quant=Q("gptq", 4)),
        "t0.875_s50_q4_caseA": Recipe(prune=P("sparsegpt"), quant=Q("gptq", 4), joint="A"),
        "t0.875_s50_q4_caseB": Recipe(prune=P("sparsegpt"), quant=Q("gptq", 4), joint="B"),
        "t0.875_2of4_q4": Recipe(prune=P("sparsegpt", n=2, m=4), quant=Q("gptq", 4)),
        "t0.875_s25_mixed2.67": Recipe(prune=P("sparsegpt", 0.25), quant=Q("gptq", 3),
                                       allocation={"method": "bits", "avg_bits": 2.67, "choices": [2, 3, 4]}),
        "t0.9_s60_q4": Recipe(prune=P("sparsegpt", 0.6), quant=Q("gptq", 4)),
        "t0.94_s70_q3": Recipe(prune=P("sparsegpt", 0.7), quant=Q("gptq", 3)),
        "t0.9375_billm1": Recipe(quant=QuantSpec("billm", 1, 128, ragged=True)),
    },
}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", default="all")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--out", default="quality", help="results folder under benchmarks/results, or an absolute path")
    a = ap.parse_args()
    groups = GROUPS if a.group == "all" else {g: GROUPS[g] for g in a.group.split(",")}
    for gname, configs in groups.items():
        if a.only:
            configs = {k: v for k, v in configs.items() if k in a.only}
        res = run_configs("smollm2-135m", configs, a.out, calib_samples=a.calib_samples, max_tokens=a.max_tokens)
        print(f"\n### {gname}\n")
        print(markdown_table(res))
