"""Issue 8: the configuration `prunequant search` finds on SmolLM2-135M at TCr 0.875, against the best
hand-picked joint (SparseGPT 50% / 2:4 + GPTQ 4-bit) and quantization-only (GPTQ 2-bit) configurations at
the same TCr, all measured by one protocol, with the search's wall time.

    python benchmarks/search_smollm2.py                       # CPU: 12 trials, calibration 32 x 256
    python benchmarks/search_smollm2.py --device cuda --n-trials 20 --calib 128 --seq-len 512 --eval-tokens 40000
    python benchmarks/search_smollm2.py --device cuda ... --refine blockwise   # refinement as a searched dimension

Writes benchmarks/results/search/<tag>/ (study.db, trials.json, best_recipe.yaml, pareto.png,
summary.json, summary.md). Resumable: the study continues from study.db, hand-picked rows are cached
in summary.json.

Protocol: calibration = N x L tokens of the 'wiki' calibration split, seed 0 (the same for every row);
proxy = KL(base ‖ model) and top-1 agreement on 16 x 256 tokens of the wiki evaluation split that follow
the perplexity tokens; perplexity = token level, 512-token non-overlapping windows, first E tokens of the
wiki and LAMBADA evaluation splits; Sr = mean of ppl_base/ppl (wiki, LAMBADA), exp(−KL) and top-1
(evaluate/retention.py); SrCr = Sr / (1 − TCr). The model ships as GGUF Q4_1: numbers are relative to the
dequantized model, and 4-bit groups of 32 would be lossless on it, so the search offers groups of 128, 64
and per-channel only (the hand-picked rows use 128, ragged, as benchmarks/joint_vs_quant.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from prunequant.recipe import PruneSpec, QuantSpec, Recipe, RefineSpec

RESULTS = Path(__file__).parent / "results" / "search"
MODEL, BUDGET = "smollm2-135m", "tcr=0.875"


def hand_picked(group: int = 128, refine: tuple = (), refine_steps: int = 40) -> dict:
    """The TCr 0.875 rows of benchmarks/joint_vs_quant.py (groups of 128, ragged), each also refined in every
    mode the search may pick."""
    def Q(bits):
        return QuantSpec("gptq", bits, group, ragged=True)

    rows = {
        f"hand: sparsegpt 50% + gptq 4b g{group} [onepass]": ("joint", Recipe(prune=PruneSpec("sparsegpt", 0.5), quant=Q(4))),
        f"hand: sparsegpt 2:4 + gptq 4b g{group} [onepass]": ("joint", Recipe(prune=PruneSpec("sparsegpt", n=2, m=4),
                                                                              quant=Q(4))),
        f"hand: gptq 2b g{group} (quantization only)": ("quant", Recipe(quant=Q(2))),
    }
    for mode in refine:
        for name, (kind, r) in list(rows.items()):
            if r.refine is None:
                rows[f"{name} · refined {mode}"] = (kind, replace(r, refine=RefineSpec(mode, steps=refine_steps)))
    return rows


def machine(device: str | None) -> str:
    if (device or "").startswith("cuda") or (device is None and torch.cuda.is_available()):
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.machine()} x{os.cpu_count()} (shared), torch threads {torch.get_num_threads()}"


def row_of(name: str, kind: str, recipe: dict, proxy: dict, full: dict) -> dict:
    return {"config": name, "kind": kind, "recipe": recipe, "tcr": proxy["tcr"],
            "rate_with_overheads": proxy["rate_with_overheads"], "kl": proxy["kl"], "top1": proxy["top1"],
            "perplexity": full["perplexity"], "sr": full["sr"], "srcr": full["srcr"], "ratios": full["ratios"],
            "compress_seconds": proxy.get("compress_seconds")}


def markdown(summary: dict) -> str:
    p = summary["protocol"]
    L = [f"# Search at TCr 0.875 vs hand-picked configurations (SmolLM2-135M, {summary['machine']})", "",
         f"Search: {summary['n_trials']} trials (optuna TPE, seed 0, proxy KL on {p['proxy'][0]} x {p['proxy'][1]} "
         f"tokens), full evaluation of the top {p['top_k']} by proxy; wall time {summary['search_seconds']:.0f} s "
         f"({summary['search_seconds'] / max(summary['n_trials'], 1):.1f} s per trial, full evaluations included). "
         f"Calibration {p['calib'][0]} x {p['calib'][1]} wiki tokens, seed 0; perplexity on the first "
         f"{p['eval_tokens']:,} tokens of wiki and LAMBADA (512-token windows). Sr = mean(ppl ratios, exp(−KL), "
         f"top-1); SrCr = Sr/(1 − TCr).", "",
         "| configuration | kind | TCr | rate incl. overheads | KL | top-1 | ppl wiki | ppl lambada | Sr | SrCr |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    base = summary["base_perplexity"]
    L.append(f"| uncompressed (dequantized Q4_1) | base | 0 | 0 | 0 | 1 | {base['wiki']:.2f} | {base['lambada']:.2f} | 1 | 1 |")
    for r in summary["rows"]:
        L.append(f"| {r['config']} | {r['kind']} | {r['tcr']:.4f} | {r['rate_with_overheads']:.4f} | {r['kl']:.4f} | "
                 f"{r['top1']:.3f} | {r['perplexity']['wiki']:.2f} | {r['perplexity']['lambada']:.2f} | "
                 f"{r['sr']:.4f} | {r['srcr']:.3f} |")
    return "\n".join(L) + "\n"


def study_name(a) -> str:
    refine = f"-refine-{'-'.join(a.refine)}-{a.refine_steps}" if a.refine else ""
    return f"smollm2-135m-tcr0.875-c{a.calib}x{a.seq_len}{refine}"


def hand_rows_only(a, out: Path, common: dict) -> None:
    """Hand-picked rows with the search's protocol; the original model's evaluation is shared through the study."""
    import optuna

    from prunequant.search.study import ensure_base_eval
    from prunequant.search.executors import InlineExecutor
    from prunequant.search.trial import TrialRunner, TrialSetup

    study = optuna.load_study(storage=f"sqlite:///{(out / 'study.db').resolve()}", study_name=study_name(a))
    runner = TrialRunner(TrialSetup(model=a.model, device=a.device, **common))
    base = ensure_base_eval(study, InlineExecutor(runner))
    f = out / "summary.json"
    rows = []
    for name, (kind, recipe) in hand_picked(a.hand_group, tuple(a.refine), a.refine_steps).items():
        old = json.loads(f.read_text()) if f.is_file() else {}
        done = {r["config"]: r for r in old.get("rows", [])}
        if name in done:
            rows.append(done[name])
            continue
        proxy = runner.run(recipe.to_dict())
        full = runner.full_eval(recipe.to_dict(), base)
        rows.append(row_of(name, kind, recipe.to_dict(), proxy, full))
        print(f"{name}: {rows[-1]['perplexity']} Sr {rows[-1]['sr']:.4f}", file=sys.stderr, flush=True)
        old = json.loads(f.read_text()) if f.is_file() else {}
        if "protocol" not in old:  # the search has not written its summary yet: leave ours for it to pick up
            f.write_text(json.dumps({"rows": rows, "partial": True}, indent=1, default=str))


def main() -> None:
    from prunequant.search import search
    from prunequant.search.space import SearchSpace
    from prunequant.search.trial import TrialRunner, TrialSetup

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MODEL, help="(a tiny model directory makes a quick dry run)")
    ap.add_argument("--n-trials", type=int, default=12)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--proxy", type=int, default=16)
    ap.add_argument("--proxy-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=20_000)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--hand-group", type=int, default=128, help="group size of the hand-picked rows")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tag", default=None, help="results subfolder (default: cpu or gpu)")
    ap.add_argument("--results", default=None)
    ap.add_argument("--refine", nargs="*", default=[], choices=["blockwise", "global", "both"],
                    help="let the search pick these refinement modes (besides none); hand-picked rows run refined too")
    ap.add_argument("--refine-steps", type=int, default=40, help="refinement steps (searched and hand-picked rows)")
    ap.add_argument("--hand-only", action="store_true",
                    help="only the hand-picked rows (e.g. in a second process while the search runs); they are "
                         "cached in summary.json, where the search's run picks them up")
    a = ap.parse_args()
    on_gpu = (a.device or "").startswith("cuda") or (a.device is None and torch.cuda.is_available())
    out = Path(a.results) if a.results else RESULTS / (a.tag or ("gpu" if on_gpu else "cpu"))
    out.mkdir(parents=True, exist_ok=True)
    common = dict(calib_text="wiki", calib_samples=a.calib, seq_len=a.seq_len, seed=0, proxy_samples=a.proxy,
                  proxy_seq_len=a.proxy_len, eval_texts=("wiki", "lambada"), eval_seq_len=512,
                  eval_max_tokens=a.eval_tokens)

    if a.hand_only:
        return hand_rows_only(a, out, common)
    t0 = time.time()
    res = search(a.model, BUDGET, a.n_trials, storage=f"sqlite:///{(out / 'study.db').resolve()}",
                 study_name=study_name(a), full_eval_top_k=a.top_k, out=out, device=a.device,
                 space=SearchSpace(refine=("none", *a.refine), refine_steps=a.refine_steps) if a.refine else None,
                 **common)
    search_seconds = time.time() - t0
    if res.best is None:
        sys.exit("no feasible trial")

    f = out / "summary.json"
    old = json.loads(f.read_text()) if f.is_file() else {}
    cached = {r["config"]: r for r in old.get("rows", []) if r["kind"] != "search"}
    best = res.best
    rows = [row_of(f"search: {best['short']} (trial {best['number']})", "search", best["recipe"], best,
                   best["full_eval"])]
    runner = None
    for name, (kind, recipe) in hand_picked(a.hand_group, tuple(a.refine), a.refine_steps).items():
        if name in cached:
            rows.append(cached[name])
            continue
        runner = runner or TrialRunner(TrialSetup(model=a.model, device=a.device, **common))
        proxy = runner.run(recipe.to_dict())
        full = runner.full_eval(recipe.to_dict(), res.study.user_attrs["base_eval"])
        rows.append(row_of(name, kind, recipe.to_dict(), proxy, full))
        print(f"{name}: {rows[-1]['perplexity']} Sr {rows[-1]['sr']:.4f}", file=sys.stderr, flush=True)
    base_ppl = {t: v["perplexity"] for t, v in res.study.user_attrs["base_eval"]["texts"].items()}
    n_done = sum(1 for t in res.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE")
    summary = {"machine": machine(a.device), "n_trials": n_done, "search_seconds": round(search_seconds, 1),
               "note": "search_seconds is this invocation's wall time (a resumed study counts only the new trials)",
               "protocol": {"calib": [a.calib, a.seq_len], "proxy": [a.proxy, a.proxy_len], "eval_tokens": a.eval_tokens,
                            "top_k": a.top_k, "refine": list(a.refine), "refine_steps": a.refine_steps},
               "base_perplexity": base_ppl, "best_trial": best["number"], "rows": rows,
               "front": [{k: r.get(k) for k in ("number", "short", "tcr", "kl", "top1", "values")} for r in res.front],
               "date": time.strftime("%Y-%m-%d")}
    f.write_text(json.dumps(summary, indent=1, default=str))
    md = markdown(summary)
    (out / "summary.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
