"""What a search leaves behind: the Pareto table, the best recipe (YAML), all trials (JSON), a plot."""
from __future__ import annotations

import json
from pathlib import Path

import optuna

from .budget import Budget
from .study import FULL_EVAL_PREFIX, feasible, measures


def trial_row(t, full: dict | None = None) -> dict:
    ua = measures(t)
    row = {"number": t.number, "state": t.state.name, "params": t.params, "values": t.values,
           "feasible": feasible(t), "describe": ua.get("describe"), "short": ua.get("short"), "recipe": ua.get("recipe"),
           "config": ua.get("config"), "derived": ua.get("derived")}
    for k in ("tcr", "rate_with_overheads", "bytes", "kl", "top1", "proxy_retention", "constraint", "nominal_tcr",
              "predicted_bytes", "mean_sparsity", "allocation", "compress_seconds", "seconds", "duplicate_of",
              "infeasible", "error"):
        if k in ua:
            row[k] = ua[k]
    if full is not None:
        row["full_eval"] = full
    if t.datetime_start and t.datetime_complete:
        row["wall_seconds"] = round((t.datetime_complete - t.datetime_start).total_seconds(), 2)
    return row


def full_evals_of(study) -> dict[int, dict]:
    return {int(k[len(FULL_EVAL_PREFIX):]): v for k, v in study.user_attrs.items() if k.startswith(FULL_EVAL_PREFIX)}


def write_trials_json(study, path: Path, extra: dict) -> None:
    full = full_evals_of(study)
    rows = [trial_row(t, full.get(t.number)) for t in study.get_trials(deepcopy=False)]
    doc = {**extra, "study_name": study.study_name, "trials": rows,
           "base_eval": study.user_attrs.get("base_eval"), "search_config": study.user_attrs.get("search_config")}
    path.write_text(json.dumps(doc, indent=2, default=str))


def write_best_recipe(trial, path: Path, setup: dict, budget: Budget, full: dict | None) -> None:
    """A YAML recipe ``prunequant compress --recipe`` takes; the header says how it was found and scored."""
    import yaml

    ua = measures(trial)
    score = f"proxy retention exp(-KL) {trial.values[0]:.5f} (KL {ua['kl']:.5f}, top-1 {ua['top1']:.4f})"
    lines = [
        f"# best configuration found by `prunequant search` for {budget.describe()} (trial {trial.number})",
        f"# {ua.get('describe')}",
        f"# measured TCr {ua['tcr']:.4f}" + (f", compact export {ua['bytes']:,} bytes" if "bytes" in ua else ""),
        f"# {score}",
    ]
    if full:
        lines.append(f"# perplexity {json.dumps({k: round(v, 4) for k, v in full['perplexity'].items()})}, "
                     f"Sr {full['sr']:.4f}, SrCr {full['srcr']:.4f}")
    lines += [
        "# reproduce with the same calibration protocol:",
        f"#   prunequant compress {setup['model']} --recipe {path.name} --calib-text {setup['calib_text']} "
        f"--calib-samples {setup['calib_samples']} --seq-len {setup['seq_len']} --seed {setup['seed']} --out DIR",
    ]
    body = yaml.safe_dump(ua["recipe"], sort_keys=False)
    path.write_text("\n".join(lines) + "\n" + body)


def front_table(front, full: dict[int, dict], budget: Budget, title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("trial", "configuration", "TCr", "rate+ovh", "MB" if budget.kind == "size" else None,
                "KL", "top-1", "proxy ret.", "Sr", "SrCr", "perplexity"):
        if col:
            t.add_column(col, justify="left" if col == "configuration" else "right")
    for tr in front:
        ua, ev = measures(tr), full.get(tr.number)
        cells = [str(tr.number), ua.get("short") or ua.get("describe", ""), f"{ua['tcr']:.4f}", f"{ua['rate_with_overheads']:.4f}"]
        if budget.kind == "size":
            cells.append(f"{ua['bytes'] / 1e6:.2f}")
        cells += [f"{ua['kl']:.4f}", f"{ua['top1']:.3f}", f"{tr.values[0]:.4f}",
                  f"{ev['sr']:.4f}" if ev else "—", f"{ev['srcr']:.3f}" if ev else "—",
                  ", ".join(f"{v:.2f}" for v in ev["perplexity"].values()) if ev else "—"]
        t.add_row(*cells)
    return t


def plot(study, front, best, budget: Budget, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for ok, color, label in ((True, "tab:blue", "feasible"), (False, "tab:gray", "infeasible")):
        pts = [t for t in done if feasible(t) == ok]
        if pts:
            ax.scatter([measures(t)["tcr"] for t in pts], [t.values[0] for t in pts], c=color, s=22, alpha=0.7,
                       label=f"{label} trials", marker="o" if ok else "x")
    if front:
        ax.plot([measures(t)["tcr"] for t in front], [t.values[0] for t in front], "-o", c="tab:red", ms=5,
                label="Pareto front")
    if best is not None:
        ax.scatter([measures(best)["tcr"]], [best.values[0]], s=160, facecolors="none", edgecolors="k",
                   label=f"best (trial {best.number})")
    if budget.kind == "tcr":
        ax.axvline(budget.value, ls="--", c="k", lw=0.8, label=f"budget TCr {budget.value:g}")
    ax.set_xlabel("theoretical compression rate (TCr)")
    ax.set_ylabel("proxy retention exp(−KL)")
    ax.set_title(f"{study.study_name}: retention vs compression")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

