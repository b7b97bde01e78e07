"""Terminal tables for the CLI's compress/eval commands."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _ppl_rows(ev: dict | None) -> dict:
    return {} if not ev else {k: v for k, v in ev.get("texts", {}).items()}


def print_compression_table(record: dict, evaluation: dict | None = None) -> None:
    con = Console()
    r = record["rates"]
    t = Table(title=f"prunequant: {record['recipe_description']}")
    t.add_column("measure")
    t.add_column("original", justify="right")
    t.add_column("compressed", justify="right")
    t.add_row("theoretical compression rate (TCr)", "0", f"{r['tcr']:.4f}")
    t.add_row("rate incl. overheads (whole model)", "0", f"{r['rate_with_overheads']:.4f}")
    t.add_row("bits / linear weight (incl. overheads)", "16", f"{r['bits_per_param_linears']:.3f}")
    t.add_row("mean sparsity of linears", "0", f"{r['mean_sparsity']:.3f}")
    if evaluation:
        base, comp = _ppl_rows(evaluation.get("base")), _ppl_rows(evaluation.get("compressed"))
        for name, c in comp.items():
            b = base.get(name, {})
            label = f"perplexity {c.get('text', name)} (L={c['seq_len']}, {c['tokens']} tok)"
            t.add_row(label, f"{b.get('perplexity', float('nan')):.3f}", f"{c['perplexity']:.3f}")
        comp_m = evaluation.get("compressed") or {}
        ag = comp_m.get("agreement") or {}
        if ag:
            t.add_row("KL(original ‖ compressed), nats/token", "0", f"{ag['kl']:.4f}")
            t.add_row("top-1 agreement with original", "1", f"{ag['top1']:.4f}")
        for task, r in (comp_m.get("tasks") or {}).items():
            b = ((evaluation.get("base") or {}).get("tasks") or {}).get(task, {})
            t.add_row(f"{task} acc (n={r['n']})", f"{b.get('acc', float('nan')):.3f}", f"{r['acc']:.3f}")
        if comp_m.get("similarity"):
            t.add_row("continuation similarity (MiniLM cosine)", "1", f"{comp_m['similarity']['similarity']:.4f}")
        if evaluation.get("sr") is not None:
            t.add_row("Sr (mean retention ratio)", "1", f"{evaluation['sr']:.4f}")
        if evaluation.get("srcr") is not None:
            t.add_row("SrCr = Sr / (1 - TCr)  [docs/srcr.md]", "1", f"{evaluation['srcr']:.4f}")
    t.add_row("compression time (s)", "", f"{record['seconds']:.1f}")
    con.print(t)


def print_eval_table(res: dict) -> None:
    t = Table(title=f"prunequant eval: {res.get('model', '')}")
    for col in ("text", "seq_len", "tokens", "perplexity", "seconds"):
        t.add_column(col, justify="right" if col != "text" else "left")
    for name, r in res["texts"].items():
        t.add_row(r.get("text", name), str(r["seq_len"]), str(r["tokens"]), f"{r['perplexity']:.3f}", f"{r['seconds']:.1f}")
    Console().print(t)
    if res.get("tasks") or res.get("retention"):
        from .report import print_report

        print_report([{"name": str(res.get("model")), "metrics": {k: res[k] for k in ("texts", "tasks", "agreement",
                                                                                    "similarity") if k in res},
                       "retention": res.get("retention") or {}, "sr": res.get("sr"), "srcr": res.get("srcr")}])
