"""Issue 19: does end-to-end refinement move the retention frontier at TCr >= 0.875?

    python benchmarks/refine_frontier.py run    [--device cuda] [--results DIR] [--only NAME ...] [--budget S]
    python benchmarks/refine_frontier.py report [--results DIR]   (CPU: similarity, Sr, table, frontier plot)

Each recipe of the issue runs twice in one process, one-shot and refined (``--refine both``: block output
matching, then KL to the original logits), on the same calibration tokens; evaluation is the
joint_vs_quant protocol (held-out wiki/LAMBADA perplexity, zero-shot tasks, KL/top-1, continuation
similarity) with its options. ``run`` writes one JSON per configuration (resumable; configurations start
in priority order until ``--budget`` seconds are used; several processes with disjoint ``--only`` lists
can share one results folder, one of them naming ``baseline``). ``report`` writes DIR.md (the side-by-side table
against the issue's targets, refinement time as a ratio to the one-shot time, and the block and global loss
curves) and, through ``prunequant report``, DIR/ frontier.png (Sr against TCr for quantization only,
joint one-shot and joint refined).

Second model, reduced protocol for a CPU (BENCHMARKS.md): ``run --model gemma3-270m --device cpu --calib 16
--calib-seq-len 256 --compress-batch-size 4 --batch-size 2 --eval-tokens 4096 --task-limit 50 --agree-windows 8
--prompts 8 --refine-steps 20 --global-steps 20 --only ...``.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from joint_vs_quant import P, Q, SEQ, _model_info, _similarity, _write, measure, protocol, scores  # noqa: E402

from prunequant.recipe import QuantSpec, Recipe, RefineSpec  # noqa: E402

RESULTS = Path(__file__).parent / "results"
REFINE = RefineSpec(mode="both", steps=50, global_steps=100)

# name: (TCr, kind, recipe, Sr target of the issue); refined twins ("+r") are added below
RECIPES = {
    "t0.875_s50_q4": (0.875, "joint", Recipe(prune=P(0.5), quant=Q(4)), 0.65),
    "t0.875_q2": (0.875, "quant", Recipe(quant=Q(2)), 0.65),
    "t0.8125_s25_q4": (0.8125, "joint", Recipe(prune=P(0.25), quant=Q(4)), 0.85),
    "t0.9375_s50_q2": (0.9375, "joint", Recipe(prune=P(0.5), quant=Q(2)), 0.35),
    "t0.9375_s75_q4": (0.9375, "joint", Recipe(prune=P(0.75), quant=Q(4)), 0.35),
    "t0.9375_q1": (0.9375, "quant", Recipe(quant=QuantSpec("billm", 1, 128, ragged=True)), 0.35),
}
# more points of the frontier (one-shot only), run after the recipes
FRONTIER = {
    "t0.5_q8": (0.5, "quant", Recipe(quant=Q(8)), None),
    "t0.75_q4": (0.75, "quant", Recipe(quant=Q(4)), None),
    "t0.8125_q3": (0.8125, "quant", Recipe(quant=Q(3)), None),
    "t0.9_s60_q4": (0.9, "joint", Recipe(prune=P(0.6), quant=Q(4)), None),
}


def configs(refine: RefineSpec = REFINE) -> dict:
    out = {"baseline": (0.0, "base", None, None)}
    for name, (t, kind, r, target) in RECIPES.items():
        out[name] = (t, kind, r, target)
        out[name + "+r"] = (t, kind + "+refined", replace(r, refine=refine), target)
    out.update(FRONTIER)
    # ablation: block-wise targets from the original model's own activations instead of the same inputs
    for name in ("t0.875_q2", "t0.875_s50_q4"):
        t, kind, r, target = RECIPES[name]
        out[name + "+rs"] = (t, kind + "+refined-stream", replace(r, refine=replace(refine, target="original-stream")),
                             target)
    return out


def run(args) -> None:
    from prunequant.api import compress, library_versions

    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    refine = replace(REFINE, steps=args.refine_steps, global_steps=args.global_steps, global_batch=args.global_batch,
                     lr_code=args.lr_code, lr_scale=args.lr_scale, global_lr=args.global_lr, lr_norm=args.lr_norm)
    cfgs = configs(refine)
    todo = [n for n in cfgs if (not args.only or n in args.only) and not (out_dir / f"{n}.json").is_file()]
    proto, base, tok, inputs = protocol(args, device, 32)
    proto["calib"] = [args.calib, args.calib_seq_len]
    t_loop = time.time()
    for name in todo:
        if time.time() - t_loop > args.budget:
            print(f"stopping before {name}: time budget of {args.budget}s used", file=sys.stderr)
            break
        point, kind, recipe, target = cfgs[name]
        t0 = time.time()
        row = {"config": name, "point": point, "kind": kind, "model": args.model, "target_sr": target,
               "recipe": recipe.to_dict() if recipe else None,
               "describe": recipe.describe() if recipe else f"uncompressed ({_model_info(args.model)[2]})"}
        if recipe is None:
            model = base
            row["rates"] = {"tcr": 0.0, "rate_with_overheads": 0.0, "mean_sparsity": 0.0}
        else:
            model = copy.deepcopy(base).to("cpu")
            res = compress(model, recipe, tokenizer=tok, calib_samples=args.calib, seq_len=args.calib_seq_len, seed=0,
                           device=device, batch_size=args.compress_batch_size or args.batch_size, progress=False)
            model = res.model
            row.update(rates=res.rates, compress_seconds=round(res.report.seconds, 1),
                       compress_batch_size=args.compress_batch_size or args.batch_size,
                       calibration=res.record["calibration"], refine=res.record.get("refine"))
        row["metrics"] = measure(model, base, tok, device, inputs, {**proto, "batch_size": args.batch_size})
        row["metrics"]["prompts"] = inputs["prompts"]
        row.update(total_seconds=round(time.time() - t0, 1), device=str(device),
                   gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                   versions=library_versions(), date=time.strftime("%Y-%m-%d"), protocol=proto,
                   threads=torch.get_num_threads())
        _write(out_dir / f"{name}.json", row)
        ppl = {k: round(v["perplexity"], 2) for k, v in row["metrics"]["texts"].items()}
        r = row.get("refine") or {}
        print(f"{name}: tcr={row['rates']['tcr']:.4f} ppl={ppl} compress={row.get('compress_seconds')}s "
              f"refine={r.get('seconds')}s ratio={r.get('time_ratio')} ({row['total_seconds']}s)", file=sys.stderr,
              flush=True)
        if model is not base:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ---- report (CPU) -------------------------------------------------------------------------------------

def _f(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def _curve(c: list, n: int = 4) -> str:
    if not c:
        return "–"
    idx = sorted({round(i * (len(c) - 1) / (n - 1)) for i in range(n)})
    return " → ".join(f"{c[i]:.3g}" for i in idx)


def markdown(rows: dict, sc: dict) -> str:
    b = rows["baseline"]
    proto = b["protocol"]
    short, what, _ = _model_info(b.get("model"))
    spec = next((r["refine"]["spec"] for r in rows.values() if r.get("refine")), None)
    L = [f"# Refinement vs one-shot at equal TCr ({short})", "",
         f"Model: {what}. Device: {b.get('gpu') or b['device']}, {b.get('date')}. Calibration {proto['calib'][0]} x "
         f"{proto['calib'][1]} wiki calibration tokens (seed 0), the same for both columns; perplexity on the first "
         f"{proto['eval_tokens']:,} tokens of the held-out wiki and LAMBADA splits (L = {SEQ}); tasks: first "
         f"{proto['task_limit']} of {', '.join(proto['tasks'])}; KL/top-1 on {proto['agree_windows']} x {SEQ} held-out "
         f"wiki tokens; similarity of 32-token continuations of {proto['prompts']} held-out prompts. g128 (ragged) "
         "asymmetric; joint = one-pass joint OBS; 1-bit = BiLLM residual binarization.",
         "", f"Refinement: {json.dumps(spec)}" if spec else "", "",
         "| TCr | recipe | target Sr | one-shot Sr | refined Sr | Δ Sr | refined vs target | ppl wiki one-shot → refined "
         "| ppl LAMBADA | KL | top-1 | refine s | × one-shot time |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (t, kind, _, target) in RECIPES.items():
        if name not in rows or name + "+r" not in rows:
            one = f"{sc[name]['sr']:.3f}" if name in rows else "not run"
            ppl = f"{rows[name]['metrics']['texts']['wiki']['perplexity']:.1f} → –" if name in rows else ""
            L.append(f"| {t:g} | {name} | ≥ {target} | {one} | not run | | | {ppl} | | | | | |")
            continue
        o, r = rows[name], rows[name + "+r"]
        so, sr = sc[name]["sr"], sc[name + "+r"]["sr"]
        mo, mr = o["metrics"], r["metrics"]
        ref = r.get("refine") or {}
        miss = sr - target
        L.append(f"| {t:g} | {o['describe']} | ≥ {target} | {so:.3f} | {sr:.3f} | {sr - so:+.3f} | "
                 f"{'met' if miss >= 0 else f'missed by {-miss:.3f}'} | "
                 f"{mo['texts']['wiki']['perplexity']:.1f} → {mr['texts']['wiki']['perplexity']:.1f} | "
                 f"{mo['texts']['lambada']['perplexity']:.1f} → {mr['texts']['lambada']['perplexity']:.1f} | "
                 f"{mo['agreement']['kl']:.3f} → {mr['agreement']['kl']:.3f} | "
                 f"{mo['agreement']['top1']:.3f} → {mr['agreement']['top1']:.3f} | "
                 f"{_f(ref.get('seconds'), 1)} | {_f(ref.get('time_ratio'), 1)} |")
    tasks = list(b["metrics"]["tasks"])
    L += ["", "All rows (accuracy: acc_norm where reported, else acc):", "",
          "| config | TCr | ppl wiki | ppl lambada | " + " | ".join(tasks) + " | KL | top-1 | sim | Sr |",
          "|" + "---|" * (8 + len(tasks))]
    for name, row in sorted(rows.items(), key=lambda kv: (kv[1]["point"], kv[0])):
        m = row["metrics"]
        acc = [m["tasks"][t].get("acc_norm") if m["tasks"][t].get("acc_norm") is not None else m["tasks"][t]["acc"]
               for t in tasks]
        L.append(f"| {name} | {row['rates']['tcr']:.4f} | {m['texts']['wiki']['perplexity']:.2f} | "
                 f"{m['texts']['lambada']['perplexity']:.2f} | " + " | ".join(_f(a) for a in acc)
                 + f" | {m['agreement']['kl']:.4f} | {m['agreement']['top1']:.3f} | "
                 f"{_f(m.get('similarity', {}).get('similarity'))} | {sc[name]['sr']:.3f} |")
    L += ["", "Loss curves (refined rows): block-wise relative output error ‖block'(X) − block(X)‖²/‖block(X)‖², "
          "one-shot → refined, first / middle / last block; global stage: calibration top-k KL, every 10 steps "
          "(4 points of the curve).", "",
          "| config | block 0 | middle block | last block | blocks kept | global KL curve | calib KL before → after |",
          "|---|---|---|---|---|---|---|"]
    for name in RECIPES:
        r = (rows.get(name + "+r") or {}).get("refine")
        if not r:
            continue
        bl = r.get("blocks") or []
        cells = [f"{x['error_before']:.4g} → {x['error_after']:.4g}" for x in (bl[0], bl[len(bl) // 2], bl[-1])] if bl \
            else ["–"] * 3
        g = r.get("global") or {}
        L.append(f"| {name}+r | " + " | ".join(cells) + f" | {sum(x['kept'] for x in bl)}/{len(bl)} | "
                 f"{_curve(g.get('curve', []))} | {_f(g.get('kl_before'), 4)} → {_f(g.get('kl_after'), 4)} |")
    return "\n".join(L) + "\n"


def report_runs(rows: dict, sc: dict) -> list[dict]:
    """Rows in the shape ``prunequant report`` reads (one JSON file per run)."""
    out = []
    for name, row in rows.items():
        kind = row["kind"]
        series = {"quant": "quantization only", "joint": "joint one-shot", "quant+refined": "quantization refined",
                  "joint+refined": "joint refined"}.get(kind)
        out.append({"name": name, "tcr": row["rates"]["tcr"], "sr": sc[name]["sr"], "series": series,
                    "metrics": {k: v for k, v in row["metrics"].items() if k in ("texts", "tasks", "agreement",
                                                                                   "similarity")},
                    "retention": sc[name]["ratios"]})
    return out


def report(args) -> None:
    import logging

    logging.getLogger("prunequant.evaluate.retention").setLevel(logging.ERROR)
    out_dir = Path(args.results)
    names = [p.stem for p in sorted(out_dir.glob("*.json"))]
    rows = {n: json.loads((out_dir / f"{n}.json").read_text()) for n in names}
    if "baseline" not in rows:
        sys.exit(f"no baseline.json in {out_dir}: run first")
    _similarity(rows)
    for name, row in rows.items():
        _write(out_dir / f"{name}.json", row)
    sc = scores(rows)
    md = markdown(rows, sc)
    out_dir.with_suffix(".md").write_text(md)
    runs_dir = out_dir.parent / (out_dir.name + "_report")
    runs_dir.mkdir(exist_ok=True)
    runs = report_runs(rows, sc)
    if args.also and Path(args.also).is_dir():  # one-shot points of an earlier run, as their own series
        old = {p.stem: json.loads(p.read_text()) for p in sorted(Path(args.also).glob("*.json"))}
        tag = f" ({Path(args.also).name}, {old['baseline'].get('gpu') or old['baseline']['device']})"
        for r in report_runs(old, scores(old)):
            if r["series"]:
                runs.append({**r, "name": r["name"] + "@" + Path(args.also).name, "series": r["series"] + tag})
    files = []
    for r in runs:
        f = runs_dir / f"{r['name']}.run.json"
        f.write_text(json.dumps(r, default=str))
        files.append(str(f))
    subprocess.run([sys.executable, "-m", "prunequant.cli", "report", *files, "--out", str(runs_dir),
                    "--title", f"{_model_info(rows['baseline'].get('model'))[0]}: Sr vs TCr"], check=True)
    print(md)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["run", "report"])
    ap.add_argument("--results", default=str(RESULTS / "refine_frontier"))
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--device")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=SEQ,
                    help="tokens per calibration window (solve and refinement; evaluation windows stay at %d)" % SEQ)
    ap.add_argument("--refine-steps", type=int, default=REFINE.steps)
    ap.add_argument("--global-steps", type=int, default=REFINE.global_steps)
    ap.add_argument("--eval-tokens", type=int, default=40_000)
    ap.add_argument("--tasks", default="arc_easy,hellaswag,piqa,sciq,lambada")
    ap.add_argument("--task-limit", type=int, default=200)
    ap.add_argument("--agree-windows", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8, help="evaluation windows per forward")
    ap.add_argument("--compress-batch-size", type=int,
                    help="calibration windows per forward in the solve and per block-wise refinement step (default: "
                         "--batch-size; the same for one-shot and refined rows)")
    ap.add_argument("--global-batch", type=int, default=REFINE.global_batch,
                    help="windows per global KL step (at most the compress batch size)")
    ap.add_argument("--lr-code", type=float, default=REFINE.lr_code)
    ap.add_argument("--lr-scale", type=float, default=REFINE.lr_scale)
    ap.add_argument("--global-lr", type=float, default=REFINE.global_lr, help="global stage rates = this x the block-wise ones")
    ap.add_argument("--lr-norm", type=float, default=REFINE.lr_norm, help="Adam rate of the norm weights (0: frozen)")
    ap.add_argument("--budget", type=float, default=float("inf"))
    ap.add_argument("--also", default=str(RESULTS / "joint_vs_quant"),
                    help="report: add the one-shot points of this joint_vs_quant results folder to the frontier plot")
    a = ap.parse_args()
    run(a) if a.command == "run" else report(a)
