"""Configuration search: the recipe that keeps the most meaning for a budget (docs/search.md)."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PrunequantError
from ..recipe import Recipe
from .budget import TCR_TOLERANCE, Budget, Inventory, parse_budget
from .space import SearchSpace

__all__ = ["Budget", "SearchResult", "SearchSpace", "TCR_TOLERANCE",
           "parse_budget", "search"]


@dataclass
class SearchResult:
    study: object  # optuna.Study
    best: dict | None  # trial row of the best feasible trial (recipe, measures, full evaluation)
    best_recipe: Recipe | None
    front: list[dict] = field(default_factory=list)  # Pareto-optimal feasible trials
    paths: dict = field(default_factory=dict)  # recipe, trials, plot
    seconds: float = 0.0


def default_study_name(model: str, budget: Budget) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(model).rstrip("/")).name) or "model"
    b = f"tcr{budget.value:g}" if budget.kind == "tcr" else f"size{int(budget.value)}B"
    return f"{stem}-{b}"


def search(
    model: str,
    budget: str | Budget = "tcr=0.875",
    n_trials: int = 20,
    *,
    storage: str | None = None,
    study_name: str | None = None,
    seed: int = 0,
    workers: int = 1,
    ray_address: str | None = None,
    proxy_samples: int = 16,
    proxy_seq_len: int = 256,
    full_eval_top_k: int = 3,
    calib_text: str = "wiki",
    calib_samples: int = 32,
    seq_len: int = 256,
    eval_texts: tuple | list = ("wiki",),
    eval_seq_len: int = 512,
    eval_max_tokens: int = 20_000,
    space: SearchSpace | dict | None = None,
    sampler: str = "tpe",
    out: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
    warm_start: bool = True,
) -> SearchResult:
    """Search compression configurations of ``model`` under a budget; results under ``out`` (docs/internals.md)."""
    from . import report, study as st
    from .executors import InlineExecutor, RayExecutor, import_ray
    from .space import resolve
    from .trial import TrialRunner, TrialSetup

    t0 = time.time()
    budget = parse_budget(budget)
    space = space if isinstance(space, SearchSpace) else SearchSpace.from_dict(space or {})
    if n_trials < 1 or workers < 1:
        raise PrunequantError("need --n-trials >= 1 and --workers >= 1")
    if workers > 1:
        import_ray()  # fail before loading anything when Ray is missing
    study_name = study_name or default_study_name(model, budget)
    out = Path(out or f"search-{study_name}")
    if out.exists() and not out.is_dir():
        raise PrunequantError(f"--out {out} is a file; give a directory for the search results")
    default_db = out / "study.db"
    if storage is not None or default_db.is_file():  # an unreadable study fails here, before any loading
        st.check_storage(storage or f"sqlite:///{default_db.resolve()}")
    setup = TrialSetup(model=str(model), calib_text=calib_text, calib_samples=calib_samples, seq_len=seq_len,
                       seed=seed, proxy_samples=proxy_samples, proxy_seq_len=proxy_seq_len,
                       eval_texts=tuple(eval_texts), eval_seq_len=eval_seq_len, eval_max_tokens=eval_max_tokens,
                       batch_size=batch_size, device=device)
    executor = RayExecutor(setup.to_dict(), workers, ray_address) if workers > 1 else InlineExecutor(TrialRunner(setup))
    try:
        inv = Inventory.from_dict(executor.call("inventory"))
        # what defines the study's trials (execution details like workers or device do not)
        config = {"model": str(model), "budget": {"kind": budget.kind, "value": budget.value},
                  "setup": {k: v for k, v in setup.to_dict().items() if k not in ("device", "threads", "batch_size")},
                  "space": space.to_dict(), "sampler": sampler, "seed": seed}
        resolved = resolve(space, inv, budget)  # a budget nothing can meet is refused before any trial or file
        out.mkdir(parents=True, exist_ok=True)
        storage = storage or f"sqlite:///{default_db.resolve()}"
        study = st.open_study(storage, study_name, config, sampler, seed, n_trials)
        if warm_start:
            st.enqueue_seeds(study, resolved, inv, budget)
        st.run_trials(study, executor, resolved, inv, budget, n_trials, progress=progress)
        full = st.full_evaluations(study, executor, full_eval_top_k, progress=progress)
    finally:
        executor.shutdown()
    best = st.pick_best(study, full)
    front = st.pareto_front(study.get_trials(deepcopy=False))
    paths = {"trials": out / "trials.json", "plot": out / "pareto.png", "storage": storage}
    seconds = time.time() - t0
    report.write_trials_json(study, paths["trials"], {"budget": budget.describe(), "seconds_this_run": round(seconds, 1),
                                                      "best_trial": best.number if best else None})
    report.plot(study, front, best, budget, paths["plot"])
    if best is not None:
        paths["recipe"] = out / "best_recipe.yaml"
        report.write_best_recipe(best, paths["recipe"], setup.to_dict(), budget, full.get(best.number))
    if progress:
        from rich.console import Console

        import shutil

        con = Console(width=max(140, shutil.get_terminal_size((140, 24)).columns))
        con.print(report.front_table(front, report.full_evals_of(study), budget,
                                     f"Pareto front ({budget.describe()}, study {study_name})"))
        if best is not None:
            con.print(f"best: trial {best.number}: {best.user_attrs['plan']['describe']} → {paths['recipe']}")
        else:
            con.print("no feasible trial yet: raise --n-trials or loosen the budget")
    all_full = report.full_evals_of(study)
    return SearchResult(study=study, best=report.trial_row(best, all_full.get(best.number)) if best else None,
                        best_recipe=st.recipe_of(best) if best else None,
                        front=[report.trial_row(t, all_full.get(t.number)) for t in front], paths=paths,
                        seconds=seconds)
