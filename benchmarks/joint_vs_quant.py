"""Issue 6: joint pruning + quantization vs quantization alone at equal TCr, on SmolLM2-135M (or --model).

    python benchmarks/joint_vs_quant.py run    [--device cuda] [--results DIR] [--only NAME ...]
    python benchmarks/joint_vs_quant.py report [--results DIR]        (CPU: similarity, Sr, SrCr, table, plot)

Second model, reduced protocol for a CPU: ``run --model gemma3-270m --results benchmarks/results/joint_vs_quant_gemma3
--calib 32 --eval-tokens 8192 --tasks arc_easy,piqa,lambada --task-limit 150 --agree-windows 8 --prompts 16
--batch-size 2`` (every protocol option defaults to the values below; the JSONs record what ran and the report
prints it). The report goes next to the results folder: DIR.md and DIR.png.

``run`` compresses and measures each configuration and writes one JSON per configuration (resumable: a
configuration with a JSON is skipped). ``report`` embeds the stored continuations with all-MiniLM-L6-v2
(so the GPU machine needs no embedding model), computes retention ratios, Sr and SrCr, and writes
benchmarks/results/joint_vs_quant.md and .png.

Protocol (printed into the report): calibration = CALIB windows x 512 tokens of the 'wiki' calibration
split (seed 0); perplexity = non-overlapping 512-token windows, token level, first EVAL_TOKENS tokens of
the 'wiki' and 'lambada' evaluation splits (disjoint from calibration); zero-shot tasks = first TASK_LIMIT
examples of each task, lm-evaluation-harness conventions; KL / top-1 agreement with the base model on
AGREE_WINDOWS x 512 tokens of the wiki evaluation split; semantic similarity = cosine of MiniLM embeddings
of 32-token greedy continuations of N_PROMPTS held-out wiki prompts. SmolLM2 ships as GGUF Q4_1
(4-bit asymmetric, blocks of 32): every number is relative to that dequantized model, and 4-bit g32 would
be lossless on it, so groups are 128 (ragged: 576 = 4 x 128 + 64, 1536 = 12 x 128).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from prunequant.recipe import PruneSpec, QuantSpec, Recipe

RESULTS = Path(__file__).parent / "results"
DEFAULT_DIR = RESULTS / "joint_vs_quant"
MODEL = "smollm2-135m"
CALIB, SEQ = 128, 512
EVAL_TOKENS = 40_000
TASKS = ("arc_easy", "hellaswag", "piqa", "sciq", "lambada")
TASK_LIMIT = 500
AGREE_WINDOWS = 32
N_PROMPTS, NEW_TOKENS = 32, 32
BATCH = 8  # perplexity and KL windows per forward (tasks 4x, continuations 2x); lower it for 262k-token vocabularies
# model short name -> (display name, what the baseline is, plot title)
MODELS = {
    "smollm2-135m": ("SmolLM2-135M", "SmolLM2-135M-Instruct, dequantized from its GGUF Q4_1 release", "dequantized Q4_1"),
    "gemma3-270m": ("Gemma-3-270M", "Gemma-3-270M (base), dequantized from its GGUF Q4_K_M release (q/k/v, gate, up "
                    "Q5_0; v of half the blocks Q8_0; o_proj and half of down_proj Q4_K; other down_proj Q6_K; "
                    "embedding Q8_0)", "dequantized Q4_K_M"),
}


def _model_info(name: str) -> tuple[str, str, str]:
    return MODELS.get(name, (name, name, "uncompressed"))


def Q(bits, method="gptq", **kw):
    return QuantSpec(method, bits, 128, ragged=True, symmetric=bits == 1.58, **kw)


def P(s=0.5, n=0, m=0):
    return PruneSpec("sparsegpt", s, n=n, m=m)


# name: (TCr point, kind, recipe). kind: quant = quantization only, joint = one-pass joint OBS,
# caseB = SparseGPT then GPTQ with the mask kept (sequential).
CONFIGS = {  # in priority order (the run stops between configurations when its time budget is used)
    "baseline": (0.0, "base", None),
    "t0.8125_q3": (0.8125, "quant", Recipe(quant=Q(3))),
    "t0.8125_s25_q4": (0.8125, "joint", Recipe(prune=P(0.25), quant=Q(4))),
    "t0.8125_2of8_q4": (0.8125, "joint", Recipe(prune=P(n=2, m=8), quant=Q(4))),
    "t0.875_q2": (0.875, "quant", Recipe(quant=Q(2))),
    "t0.875_s50_q4": (0.875, "joint", Recipe(prune=P(0.5), quant=Q(4))),
    "t0.875_2of4_q4": (0.875, "joint", Recipe(prune=P(n=2, m=4), quant=Q(4))),
    "t0.75_q4": (0.75, "quant", Recipe(quant=Q(4))),
    "t0.75_s50_q8": (0.75, "joint", Recipe(prune=P(0.5), quant=Q(8))),
    "t0.9_ternary": (0.9, "quant", Recipe(quant=Q(1.58))),
    "t0.9_s60_q4": (0.9, "joint", Recipe(prune=P(0.6), quant=Q(4))),
    "t0.9_s70_q3": (0.9, "joint", Recipe(prune=P(0.7), quant=Q(3))),
    "t0.8125_s25_q4_caseB": (0.8125, "caseB", Recipe(prune=P(0.25), quant=Q(4), joint="B")),
    "t0.875_s50_q4_caseB": (0.875, "caseB", Recipe(prune=P(0.5), quant=Q(4), joint="B")),
}


# ---- run (GPU or CPU) ---------------------------------------------------------------------------------

def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def measure(model, base, tok, device, inputs: dict, proto: dict) -> dict:
    """Perplexities, task accuracies, agreement with the base, and greedy continuations (texts)."""
    from prunequant.evaluate.semantic import greedy_continuations, logit_agreement
    from prunequant.evaluate.suite import SuiteConfig, run_suite

    model.to(device).eval()
    t = {}
    t0 = time.time()
    bs = proto["batch_size"]
    cfg = SuiteConfig(texts=("wiki", "lambada"), seq_len=SEQ, max_tokens=proto["eval_tokens"], batch_size=bs,
                      tasks=tuple(proto["tasks"]), task_limit=proto["task_limit"], task_batch_size=4 * bs,
                      agree_tokens=0)
    out = run_suite(model, tok, cfg, progress=False).metrics  # perplexities and task accuracies
    t["ppl_tasks"] = time.time() - t0
    t0 = time.time()
    out["agreement"] = logit_agreement(model, base, inputs["agree_ids"], batch_size=bs, progress=False)
    out["continuations"] = greedy_continuations(model, tok, inputs["prompts"], NEW_TOKENS, batch_size=2 * bs,
                                                progress=False)
    t["semantic"] = time.time() - t0
    out["eval_seconds"] = {k: round(v, 1) for k, v in t.items()}
    return out


def run(args) -> None:
    from prunequant.api import compress, library_versions

    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    todo = [n for n in CONFIGS if (not args.only or n in args.only) and not (out_dir / f"{n}.json").is_file()]
    if "baseline" not in todo and not (out_dir / "baseline.json").is_file():
        todo.insert(0, "baseline")
    if not todo:
        print("all configurations done", file=sys.stderr)
        return
    proto, base, tok, inputs = protocol(args, device, NEW_TOKENS)
    t_loop = time.time()
    for name in todo:
        if time.time() - t_loop > args.budget:
            print(f"stopping before {name}: time budget of {args.budget}s used", file=sys.stderr)
            break
        point, kind, recipe = CONFIGS[name]
        t0 = time.time()
        row = {"config": name, "point": point, "kind": kind, "model": args.model,
               "recipe": recipe.to_dict() if recipe else None,
               "describe": recipe.describe() if recipe else f"uncompressed ({_model_info(args.model)[2]})"}
        if recipe is None:
            model = base
            row["rates"] = {"tcr": 0.0, "rate_with_overheads": 0.0, "mean_sparsity": 0.0}
        else:
            model = copy.deepcopy(base).to("cpu")
            res = compress(model, recipe, tokenizer=tok, calib_samples=args.calib, seq_len=SEQ, seed=0, device=device,
                           progress=False)
            model = res.model
            row.update(rates=res.rates, compress_seconds=round(res.report.seconds, 1),
                       calibration=res.record["calibration"])
        row["metrics"] = measure(model, base, tok, device, inputs, {**proto, "batch_size": args.batch_size})
        row["metrics"]["prompts"] = inputs["prompts"]
        row.update(total_seconds=round(time.time() - t0, 1), device=str(device),
                   gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                   versions=library_versions(), date=time.strftime("%Y-%m-%d"),
                   protocol=proto, threads=torch.get_num_threads())
        _write(out_dir / f"{name}.json", row)
        ppl = {k: round(v["perplexity"], 2) for k, v in row["metrics"]["texts"].items()}
        print(f"{name}: tcr={row['rates']['tcr']:.4f} ppl={ppl} ({row['total_seconds']}s)", file=sys.stderr, flush=True)
        if model is not base:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ---- report (CPU) -------------------------------------------------------------------------------------

def _similarity(rows: dict) -> None:
    """Fill metrics['similarity'] from the stored continuations (cosine of MiniLM embeddings vs base)."""
    from prunequant.evaluate.semantic import embed

    theirs = rows["baseline"]["metrics"]["continuations"]
    for row in rows.values():
        m = row["metrics"]
        if "similarity" in m:
            continue
        ours = m["continuations"]
        e = embed(ours + theirs)
        cos = (e[: len(ours)] * e[len(ours):]).sum(-1).double().clamp(-1, 1)
        cos[torch.tensor([a == b for a, b in zip(ours, theirs)])] = 1.0
        m["similarity"] = {"similarity": float(cos.mean()), "n": len(ours), "max_new_tokens": NEW_TOKENS}


def scores(rows: dict) -> dict:
    """Per configuration: retention ratios, Sr, SrCr (ours at λ=1, on TCr and on the real rate) and the
    sqrt/log reconstruction."""
    from prunequant.evaluate.retention import retention
    from prunequant.evaluate.srcr import semantic_retention, srcr_from_rate, srcr_sqrt_log

    base = rows["baseline"]["metrics"]
    out = {}
    for name, row in rows.items():
        ratios = retention(base, row["metrics"])
        sr = semantic_retention(ratios)
        r = row["rates"]
        s = float(r.get("mean_sparsity") or 0.0)
        q = 16 * (1 - r["tcr"]) / (1 - s)  # effective bits of the kept weights
        out[name] = {"ratios": ratios, "sr": sr, "srcr": srcr_from_rate(sr, r["tcr"]),
                     "srcr_real": srcr_from_rate(sr, max(0.0, r.get("rate_with_overheads", 0.0))),
                     "srcr_sqrt_log": srcr_sqrt_log(sr, s, min(16.0, q)), "s": s, "q": q}
    return out


def _fmt(x, nd=3):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def markdown(rows: dict, sc: dict) -> str:
    from prunequant.evaluate.retention import skipped_measures
    from prunequant.evaluate.srcr import relative_gain

    any_row = rows["baseline"]
    proto = any_row["protocol"]
    tasks = list(any_row["metrics"]["tasks"])
    skipped = skipped_measures(any_row["metrics"])
    short, what, _ = _model_info(any_row.get("model", MODEL))
    bos = "BOS first" in any_row["metrics"]["texts"]["wiki"].get("protocol", "")
    differ = [n for n, r in rows.items() if json.dumps(r["protocol"], sort_keys=True) != json.dumps(proto, sort_keys=True)]
    L = [f"# Joint pruning + quantization vs quantization alone ({short})", "",
         f"Model: {what} (all numbers relative to it). "
         f"Device: {any_row.get('gpu') or any_row['device']}"
         + (f", {any_row['threads']} threads" if any_row.get("threads") and not any_row.get("gpu") else "")
         + f". Calibration: {proto['calib'][0]} x {proto['calib'][1]} "
         f"tokens of the wiki calibration split, seed 0. Perplexity: token level, {SEQ}-token non-overlapping windows, "
         f"first {proto['eval_tokens']:,} tokens of the wiki and LAMBADA evaluation splits"
         + (" (a BOS token in front of every window, calibration and task context: the model needs it)" if bos else "")
         + ". Tasks: first "
         f"{proto['task_limit']} examples each of {', '.join(tasks)} (zero-shot, acc_norm where the harness reports it, "
         f"else acc). Agreement: KL(base‖model) and top-1 on {proto['agree_windows']} x {SEQ} wiki evaluation tokens. "
         f"Similarity: all-MiniLM-L6-v2 cosine of {proto['new_tokens']}-token greedy continuations of "
         f"{proto['prompts']} held-out wiki prompts. Groups of 128 (ragged), asymmetric (ternary symmetric); "
         f"joint = one-pass joint OBS solver, caseB = SparseGPT then GPTQ with the mask kept.", "",
         "Retention ratios (1 = nothing lost): ppl_base/ppl, chance-adjusted accuracy, exp(−KL), top-1, "
         "similarity. Sr = their mean; SrCr = Sr·16/b (λ = 1, b = stored bits per weight, docs/srcr.md); "
         "'SrCr real' uses the overhead-inclusive rate; 'sqrt/log' is the reconstruction of the paper's form "
         "(not its verified formula)." + (f" Left out of Sr (base at chance): {', '.join(skipped)}." if skipped else "")
         + (f" Warning: measured with a different protocol: {', '.join(differ)}." if differ else ""),
         "",
         "| config | kind | TCr | rate real | ppl wiki | ppl lambada | " + " | ".join(tasks)
         + " | KL | top-1 | sim | Sr | SrCr | SrCr real | sqrt/log | Sr vs quant-only |",
         "|" + "---|" * (14 + len(tasks))]
    by_point: dict[float, list[str]] = {}
    for name, row in rows.items():
        by_point.setdefault(row["point"], []).append(name)
    for point in sorted(by_point):
        quant = [n for n in by_point[point] if rows[n]["kind"] == "quant"]
        ref = sc[quant[0]]["sr"] if quant else None
        for name in by_point[point]:
            row, s, m = rows[name], sc[name], rows[name]["metrics"]
            acc = [m["tasks"][t].get("acc_norm") if m["tasks"][t].get("acc_norm") is not None else m["tasks"][t]["acc"]
                   for t in tasks]
            gain = "" if ref is None or rows[name]["kind"] == "quant" else f"{relative_gain(s['sr'], ref):+.1%}"
            L.append(f"| {name} | {row['kind']} | {row['rates']['tcr']:.4f} | {row['rates'].get('rate_with_overheads', 0):.4f} | "
                     f"{m['texts']['wiki']['perplexity']:.2f} | {m['texts']['lambada']['perplexity']:.2f} | "
                     + " | ".join(_fmt(a) for a in acc)
                     + f" | {_fmt(m['agreement']['kl'], 4)} | {_fmt(m['agreement']['top1'])} | "
                       f"{_fmt(m['similarity']['similarity'])} | {_fmt(s['sr'])} | {_fmt(s['srcr'], 2)} | "
                       f"{_fmt(s['srcr_real'], 2)} | {_fmt(s['srcr_sqrt_log'], 2)} | {gain} |")
    L += ["", "## Best joint configuration vs quantization only, at equal TCr", "",
          "| TCr | quantization only (Sr) | best joint (Sr) | Sr gain | ppl wiki quant → joint |", "|---|---|---|---|---|"]
    for point in sorted(by_point):
        quant = [n for n in by_point[point] if rows[n]["kind"] == "quant"]
        joint = [n for n in by_point[point] if rows[n]["kind"] == "joint"]
        if not quant or not joint:
            continue
        q, j = quant[0], max(joint, key=lambda n: sc[n]["sr"])
        pq, pj = (rows[n]["metrics"]["texts"]["wiki"]["perplexity"] for n in (q, j))
        L.append(f"| {point:g} | {q} ({sc[q]['sr']:.3f}) | {j} ({sc[j]['sr']:.3f}) | "
                 f"{relative_gain(sc[j]['sr'], sc[q]['sr']):+.1%} | {pq:.2f} → {pj:.2f} |")
    L += ["", "Verdict (Sr at equal TCr, the paper's measure): "
          + "; ".join(_verdict(rows, sc, by_point, p) for p in sorted(by_point) if p > 0) + "."]
    if any_row.get("model", MODEL) == MODEL:
        L += ["", "Caveat: the model was released as GGUF Q4_1, so its weights already sit on a 4-bit grid per block "
              "of 32; 4-bit groups of 128 are not lossless but start from a favourable point, and every joint "
              "configuration here uses 4 (or 8) bits while quantization-only uses 3 or 2. A model not distributed at "
              "4 bits (e.g. Gemma-3-270M, mostly Q8_0/Q5_0) is the cross-check. How large the head start is, measured "
              "separately (RTN, CPU, first 8,192 wiki evaluation tokens, same windows): base 23.79, 8-bit g128 23.85, "
              "4-bit g32 29.93, 4-bit g128 31.56, 3-bit g128 129.4 — with our grids (range always includes 0) even "
              "4-bit g32 is not lossless here, so the Q4_1 origin does not make 4-bit free."]
    elif any_row.get("model") == "gemma3-270m":
        L += ["", "Origin: the GGUF is mixed precision. q/k/v, gate and up (65% of the compressed weights) are Q5_0 or "
              "Q8_0 (up to 32 or 256 levels per block of 32), and half of the down_proj (12%) Q6_K, so 4-bit has no "
              "head start there; o_proj and the other half of the down_proj (24%) are Q4_K (16 levels per sub-block "
              "of 32), where 4-bit g128 starts from a 4-bit grid."]
    missing = [n for n in CONFIGS if n not in rows]
    if missing:
        L += ["", f"Not run yet (resumable: `python benchmarks/joint_vs_quant.py run --only ...`): {', '.join(missing)}."]
    return "\n".join(L) + "\n"


def _verdict(rows, sc, by_point, point) -> str:
    from prunequant.evaluate.srcr import relative_gain

    quant = [n for n in by_point[point] if rows[n]["kind"] == "quant"]
    joint = [n for n in by_point[point] if rows[n]["kind"] == "joint"]
    if not quant or not joint:
        return f"TCr {point:g}: incomplete"
    j = max(joint, key=lambda n: sc[n]["sr"])
    g = relative_gain(sc[j]["sr"], sc[quant[0]]["sr"])
    word = "reproduces (≥ +20%)" if g >= 0.2 else ("joint better, below +20%" if g > 0 else "does not reproduce")
    return f"TCr {point:g}: {j} vs {quant[0]} {g:+.0%}, {word}"


def plot(rows: dict, sc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"quant": ("o", "tab:blue", "quantization only"), "joint": ("^", "tab:red", "joint (one pass)"),
             "caseB": ("s", "tab:orange", "SparseGPT → GPTQ (case B)")}
    base_ppl = rows["baseline"]["metrics"]["texts"]["wiki"]["perplexity"]
    for ax, key, label in ((axes[0], "sr", "Sr (mean retention)"), (axes[1], "ppl", "perplexity, wiki (log)")):
        seen = set()
        ax.axhline(1.0 if key == "sr" else base_ppl, color="k", ls="--", lw=0.8, label="uncompressed")
        for name, row in rows.items():
            if row["kind"] not in style:
                continue
            mk, col, lab = style[row["kind"]]
            y = sc[name]["sr"] if key == "sr" else row["metrics"]["texts"]["wiki"]["perplexity"]
            ax.scatter(row["rates"]["tcr"], y, marker=mk, color=col, s=50, label=None if lab in seen else lab)
            seen.add(lab)
            ax.annotate(name.split("_", 1)[1], (row["rates"]["tcr"], y), fontsize=6, xytext=(4, 2),
                        textcoords="offset points")
        ax.set_xlabel("theoretical compression rate (TCr)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "ppl":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{_model_info(rows['baseline'].get('model', MODEL))[0]}: joint pruning + quantization vs "
                 "quantization alone at equal TCr", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def report(args) -> None:
    import logging

    logging.getLogger("prunequant.evaluate.retention").setLevel(logging.ERROR)  # the table states what is left out
    out_dir = Path(args.results)
    rows = {n: json.loads((out_dir / f"{n}.json").read_text()) for n in CONFIGS if (out_dir / f"{n}.json").is_file()}
    if "baseline" not in rows:
        sys.exit(f"no baseline.json in {out_dir}: run first")
    _similarity(rows)
    for name, row in rows.items():  # keep the similarity so the report is cheap to redo
        _write(out_dir / f"{name}.json", row)
    sc = scores(rows)
    md = markdown(rows, sc)
    out_dir.with_suffix(".md").write_text(md)  # benchmarks/results/joint_vs_quant{,_gemma3}.md next to the folder
    plot(rows, sc, out_dir.with_suffix(".png"))
    print(md)


def protocol(args, device, new_tokens: int):
    """The evaluation protocol record, the original model on ``device``, its tokenizer, and the held-out
    agreement windows and prompts every configuration is compared on."""
    from prunequant.data import load_text, tokenize
    from prunequant.evaluate.semantic import held_out_prompts
    from prunequant.models import load_model

    proto = {"calib": [args.calib, SEQ], "eval_tokens": args.eval_tokens, "tasks": tuple(args.tasks.split(",")),
             "task_limit": args.task_limit, "agree_windows": args.agree_windows, "prompts": args.prompts,
             "new_tokens": new_tokens}
    base, tok = load_model(args.model)
    base.to(device).eval()
    wiki = load_text("wiki", "eval")
    ids = tokenize(tok, wiki, args.agree_windows * SEQ)
    inputs = {"agree_ids": ids[: ids.numel() // SEQ * SEQ].reshape(-1, SEQ),
              "prompts": held_out_prompts(wiki.text, args.prompts)}
    return proto, base, tok, inputs


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["run", "report"])
    ap.add_argument("--results", default=str(DEFAULT_DIR))
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--device")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--calib", type=int, default=CALIB)
    ap.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, help="perplexity tokens per text")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    ap.add_argument("--task-limit", type=int, default=TASK_LIMIT, help="first N examples of each task")
    ap.add_argument("--agree-windows", type=int, default=AGREE_WINDOWS, help="512-token windows for KL / top-1")
    ap.add_argument("--prompts", type=int, default=N_PROMPTS, help="held-out prompts for the continuations")
    ap.add_argument("--batch-size", type=int, default=BATCH,
                    help="windows per forward for perplexity/KL (tasks 4x, continuations 2x)")
    ap.add_argument("--budget", type=float, default=float("inf"),
                    help="seconds after the model is loaded; no new configuration starts after that")
    a = ap.parse_args()
    run(a) if a.command == "run" else report(a)
