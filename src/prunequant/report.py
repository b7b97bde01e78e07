"""Evaluation report: terminal table, JSON, Markdown and PNG plots for one or several runs (docs/internals.md)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .evaluate.retention import flatten_metrics, sr as mean_ratio

MEASURE_ORDER = ("ppl:", "task:", "kl", "top1", "similarity")


def _runs(results) -> list[dict]:
    runs = [results] if isinstance(results, dict) else list(results)
    out = []
    for i, r in enumerate(runs):
        r = dict(r)
        r.setdefault("name", f"run{i}")
        r.setdefault("metrics", {})
        r.setdefault("retention", {})
        if r.get("sr") is None and r["retention"]:
            r["sr"] = mean_ratio(r["retention"])
        out.append(r)
    return out


def _measures(runs: list[dict]) -> list[str]:
    names = {m for r in runs for m in list(r["retention"]) + list(flatten_metrics(r["metrics"]))}

    def key(m):
        return next(i for i, p in enumerate(MEASURE_ORDER + ("",)) if m.startswith(p)), m
    return sorted(names, key=key)


def _cell(raw: float | None, ratio: float | None) -> str:
    parts = []
    if raw is not None:
        parts.append(f"{raw:.2f}" if abs(raw) >= 10 else f"{raw:.3f}")
    if ratio is not None:
        parts.append(f"[{ratio:.3f}]" if raw is not None else f"{ratio:.3f}")
    return " ".join(parts) or "–"


def table_rows(results) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per measure, 'raw [retention]' per run, then Sr, SrCr and TCr."""
    runs = _runs(results)
    header = ["measure"] + [r["name"] for r in runs]
    rows = []
    flat = [flatten_metrics(r["metrics"]) for r in runs]
    for m in _measures(runs):
        rows.append([m] + [_cell(f.get(m), r["retention"].get(m)) for f, r in zip(flat, runs)])
    for key, label in (("sr", "Sr"), ("srcr", "SrCr"), ("tcr", "TCr")):
        if any(r.get(key) is not None for r in runs):
            rows.append([label] + ["–" if r.get(key) is None else f"{r[key]:.4f}" for r in runs])
    return header, rows


def print_report(results, console: Console | None = None, title: str = "prunequant evaluation") -> None:
    header, rows = table_rows(results)
    t = Table(title=escape(title), caption=escape("raw value [retention ratio vs. the original; 1 = nothing lost]"))
    for i, h in enumerate(header):
        t.add_column(escape(h), justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*map(escape, row))
    (console or Console()).print(t)


def markdown_report(results, title: str = "prunequant evaluation") -> str:
    header, rows = table_rows(results)
    lines = [f"# {title}", "", "Raw value [retention ratio against the original model; 1 = nothing lost].", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    sources = {}
    for r in _runs(results):
        for name, t in (r["metrics"].get("tasks") or {}).items():
            if t.get("source"):
                sources[name] = f"{t['source']} (n={t.get('n')}, chance {t.get('chance', 0):.3f})"
        for name, t in (r["metrics"].get("texts") or {}).items():
            if isinstance(t, dict) and "seq_len" in t:
                sources[f"ppl:{name}"] = (f"perplexity, {t.get('protocol', 'non-overlapping windows')}, "
                                          f"L={t['seq_len']}, {t.get('tokens')} tokens, text sha256 "
                                          f"{str(t.get('text_sha256', '?'))[:12]}")
    if sources:
        lines += ["", "## Data and protocols", ""] + [f"- **{k}**: {v}" for k, v in sorted(sources.items())]
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (both maximised), by increasing x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated and not any(points[k] == (x, y) for k in front):
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_retention(results, path: str | Path) -> Path:
    """Grouped bars: retention ratio per measure, one bar per run; a line at 1 (nothing lost)."""
    runs = [r for r in _runs(results) if r["retention"]]
    measures = [m for m in _measures(runs) if any(m in r["retention"] for r in runs)] + ["Sr"]
    fig = _figure(max(6.0, 0.6 * len(measures) * max(1, len(runs)) ** 0.5 + 2), 4.2)
    ax = fig.add_subplot(111)
    width = 0.8 / max(1, len(runs))
    for k, r in enumerate(runs):
        vals = [r.get("sr", math.nan) if m == "Sr" else r["retention"].get(m, math.nan) for m in measures]
        ax.bar([i + (k - (len(runs) - 1) / 2) * width for i in range(len(measures))], vals, width, label=r["name"])
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(measures)))
    ax.set_xticklabels(measures, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("retention (1 = original)")
    ax.set_title("Retention per measure")
    if runs:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_pareto(results, path: str | Path, quality: str = "sr") -> Path:
    """Quality (Sr by default) against theoretical compression rate, the Pareto front drawn as a step line."""
    runs = [r for r in _runs(results) if r.get("tcr") is not None and r.get(quality) is not None]
    pts = [(float(r["tcr"]), float(r[quality])) for r in runs]
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot(111)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], zorder=3)
    for r, (x, y) in zip(runs, pts):
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(pts)
    if len(front) > 1:
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="pre", color="C3", lw=1.2,
                label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel("theoretical compression rate (TCr)")
    ax.set_ylabel({"sr": "Sr (mean retention)", "srcr": "SrCr"}.get(quality, quality))
    ax.set_title("Quality vs. compression")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_frontier(results, path: str | Path, quality: str = "sr") -> Path:
    """Quality against TCr, one curve per series: its points and its upper envelope."""
    runs = [r for r in _runs(results) if r.get("series") and r.get("tcr") is not None and r.get(quality) is not None]
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot(111)
    markers = "o^sDvP*X"
    for k, series in enumerate(dict.fromkeys(r["series"] for r in runs)):
        pts = sorted((float(r["tcr"]), float(r[quality])) for r in runs if r["series"] == series)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[k % len(markers)], color=f"C{k}",
                   zorder=3, label=series)
        front = [pts[i] for i in pareto_front(pts)]
        ax.plot([p[0] for p in front], [p[1] for p in front], color=f"C{k}", lw=1.2)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("theoretical compression rate (TCr)")
    ax.set_ylabel({"sr": "Sr (mean retention)", "srcr": "SrCr"}.get(quality, quality))
    ax.set_title("Retention frontier")
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(fontsize=8)
    return _save(fig, path)


def series_of(record: dict) -> str:
    """The frontier series of a compression record (prunequant.json): what was compressed, and whether refined."""
    r = record.get("recipe") or {}
    prune, quant = r.get("prune") is not None, r.get("quant") is not None
    kind = "joint" if prune and quant else "quantization" if quant else "pruning"
    if record.get("refine") or r.get("refine"):
        return f"{kind} refined"
    return f"{kind} one-shot" if kind == "joint" else f"{kind} only"


def load_runs(paths) -> list[dict]:
    """Runs from run JSON files, compressed-model directories or their prunequant.json files."""
    runs = []
    for p in map(Path, paths):
        f = p / "prunequant.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"{p}: neither a run JSON nor a directory with prunequant.json")
        d = json.loads(f.read_text())
        if "evaluation" in d:  # a compression record
            ev = d["evaluation"]
            d = {"name": p.name if p.is_dir() else p.stem, "tcr": d["rates"]["tcr"], "metrics": ev["compressed"],
                 "retention": ev["retention"], "sr": ev["sr"], "srcr": ev.get("srcr"), "series": series_of(d)}
        elif "metrics" not in d and "sr" not in d:
            raise ValueError(f"{f}: no evaluation in it (compress with --eval, or give a run JSON)")
        runs.append(d)
    return runs


def write_report(results, out_dir: str | Path, title: str = "prunequant evaluation", console: Console | None = None,
                 plots: bool = True, show: bool = True) -> dict[str, Path]:
    """Print the table and write report.json, report.md and the PNG plots into ``out_dir``."""
    runs = _runs(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if show:
        print_report(runs, console, title)
    files = {"json": out / "report.json", "markdown": out / "report.md"}
    files["json"].write_text(json.dumps({"title": title, "runs": runs}, indent=1, default=str))
    files["markdown"].write_text(markdown_report(runs, title))
    if plots:
        if any(r["retention"] for r in runs):
            files["retention_png"] = plot_retention(runs, out / "retention.png")
        if any(r.get("tcr") is not None and r.get("sr") is not None for r in runs):
            files["pareto_png"] = plot_pareto(runs, out / "pareto.png")
        if any(r.get("series") and r.get("sr") is not None for r in runs):
            files["frontier_png"] = plot_frontier(runs, out / "frontier.png")
    return files


__all__ = ["load_runs", "markdown_report", "pareto_front", "plot_frontier", "plot_pareto", "plot_retention",
           "print_report", "series_of", "table_rows", "write_report"]
