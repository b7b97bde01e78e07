"""The search driver: an optuna study (multi-objective, constrained; docs/internals.md)."""
from __future__ import annotations

import logging
import os
import socket
import sys
import time

import optuna

from ..errors import PrunequantError
from ..recipe import Recipe
from .budget import Budget, Inventory
from .space import Infeasible, Resolved, suggest

log = logging.getLogger(__name__)
CONFIG_ATTR = "search_config"
BASE_EVAL_ATTR = "base_eval"
FULL_EVAL_PREFIX = "full_eval:"


def measures(trial) -> dict:
    """A trial's plan (recipe, derived variable, nominal figures) and measurements in one mapping."""
    ua = trial.user_attrs
    return {**ua.get("plan", {}), **ua.get("result", {}),
            **{k: ua[k] for k in ("error", "infeasible", "duplicate_of") if k in ua}}


def constraint_of(trial) -> tuple[float]:
    """optuna constraints_func: the budget violation recorded by the driver (≤ 0 feasible)."""
    return (float(trial.user_attrs.get("result", {}).get("constraint", 0.0)),)


def feasible(trial) -> bool:
    return trial.state == optuna.trial.TrialState.COMPLETE and constraint_of(trial)[0] <= 0


# optuna >= 5 reads constraints set on the trial; optuna 4 needs the sampler's constraints_func
SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")


def make_sampler(name: str, seed: int, n_existing: int, n_trials: int = 24):
    # seed offset by the trials already there: a resumed study must not replay its first random draws
    s = seed + 7919 * n_existing
    startup = max(4, min(8, n_trials // 3))  # small budgets: leave most trials to the model, not random draws
    cons = {} if SET_CONSTRAINT else {"constraints_func": constraint_of}
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=s, multivariate=True, group=True, n_startup_trials=startup, **cons)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s, population_size=12, **cons)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=s)
    raise PrunequantError(f"unknown sampler {name!r}; choose tpe, nsga2 or random")


def check_storage(storage: str) -> None:
    """Fail with one line on a storage that cannot be read (a corrupt SQLite file, a bad URL)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        optuna.get_all_study_summaries(optuna.storages.get_storage(storage))
    except Exception as e:  # noqa: BLE001 - a bad URL or unreadable database is the user's to fix
        raise PrunequantError(f"cannot open optuna storage {storage!r}: {_first_line(e)}; give another --storage "
                              "or remove the damaged file") from None


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def open_study(storage, name: str, config: dict, sampler: str, seed: int, n_trials: int = 24) -> optuna.Study:
    """Create the study, or load it and check that it was created by the same search settings."""
    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        storage = optuna.storages.get_storage(storage)  # one connection for the summaries and the study
        existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    except Exception as e:  # noqa: BLE001 - a bad URL or unreachable database is the user's to fix
        raise PrunequantError(f"cannot open optuna storage {storage!r}: {_first_line(e)}") from None
    n_existing = existing[name].n_trials if name in existing else 0
    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                directions=["maximize", "maximize"],
                                sampler=make_sampler(sampler, seed, n_existing, n_trials))
    old = study.user_attrs.get(CONFIG_ATTR)
    if old is None:
        study.set_user_attr(CONFIG_ATTR, config)
        study.set_metric_names(["proxy_retention", "compression"])
    elif old != config:
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise PrunequantError(f"study {name!r} in this storage was created with different search settings "
                              f"({', '.join(diff)}); re-run with the same settings to continue it, or use another "
                              "--study-name")
    fail_orphans(study)
    return study


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_orphans(study) -> None:
    """Trials left RUNNING by a driver of this host that no longer runs (killed hard) are marked FAIL."""
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = t.user_attrs.get("plan", {}).get("driver", "")
        h, _, pid = owner.partition(":")
        if h == host and pid.isdigit() and not _alive(int(pid)):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _complete(study) -> list:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _duplicate_of(study, params: dict):
    for t in _complete(study):
        if t.params == params and "kl" in t.user_attrs.get("result", {}):
            return t
    return None


def _objectives(budget: Budget, m: dict, inv: Inventory) -> list[float]:
    comp = m["tcr"] if budget.kind == "tcr" else 1.0 - m["bytes"] / inv.dense_bytes
    return [m["proxy_retention"], comp]


def run_trials(study, executor, res: Resolved, inv: Inventory, budget: Budget, n_trials: int,
               progress: bool = True) -> None:
    """Ask, run and tell until the study holds ``n_trials`` completed trials."""
    from optuna.trial import TrialState

    in_flight: dict[int, tuple] = {}
    asks, max_asks = 0, 4 * n_trials + 20
    t_start = time.time()

    def n_done() -> int:
        return len(_complete(study))

    try:
        while True:
            while len(in_flight) < executor.size and n_done() + len(in_flight) < n_trials and asks < max_asks:
                asks += 1
                trial = study.ask()
                try:
                    recipe, info = suggest(trial, res, inv, budget)
                except Infeasible as e:  # nothing to compress: recorded as pruned with the reason
                    trial.set_user_attr("infeasible", str(e))
                    study.tell(trial, state=TrialState.PRUNED)
                    continue
                trial.set_user_attr("plan", {"driver": _owner(), "recipe": recipe.to_dict(),
                                             "describe": recipe.describe(), **info})
                dup = _duplicate_of(study, trial.params)
                if dup is not None:  # same configuration, deterministic result: reuse it
                    trial.set_user_attr("result", dup.user_attrs["result"])
                    trial.set_user_attr("duplicate_of", dup.number)
                    if SET_CONSTRAINT:
                        trial.set_constraint("budget", constraint_of(dup)[0])
                    study.tell(trial, list(dup.values))
                    continue
                in_flight[trial.number] = (trial, info)
                executor.submit(trial.number, "run", recipe.to_dict(), budget.kind == "size")
            if not in_flight:
                break
            out = executor.next_result()
            trial, info = in_flight.pop(out["token"])
            if not out["ok"]:
                trial.set_user_attr("error", out["error"])
                if not out.get("user_error"):
                    print(f"prunequant search: trial {trial.number} failed: {out['error']}\n"
                          f"{out.get('traceback', '')}", file=sys.stderr)
                study.tell(trial, state=TrialState.FAIL)
                continue
            m = out["result"]
            violation = budget.violation(m["tcr"], m.get("bytes"))
            trial.set_user_attr("result", {**m, "constraint": violation})
            if SET_CONSTRAINT:
                trial.set_constraint("budget", violation)
            values = _objectives(budget, m, inv)
            study.tell(trial, values)
            if progress:
                print(f"trial {trial.number}: {info['short']} | TCr {m['tcr']:.4f}"
                      + (f" | {m['bytes'] / 1e6:.2f} MB" if "bytes" in m else "")
                      + f" | KL {m['kl']:.4f} top-1 {m['top1']:.3f} | {m['seconds']:.0f}s"
                      + ("" if violation <= 0 else " | INFEASIBLE")
                      + f" [{n_done()}/{n_trials}, {time.time() - t_start:.0f}s]", file=sys.stderr)
    except BaseException:
        for trial, _ in in_flight.values():  # interrupted: the unfinished trials are failed, not left running
            try:
                trial.set_user_attr("error", "interrupted")
                study.tell(trial, state=TrialState.FAIL)
            except Exception:  # noqa: BLE001
                pass
        raise
    if n_done() < n_trials:
        log.warning("stopped after %d asks with %d completed trials: most choices cannot meet the budget", asks,
                    n_done())


def enqueue_seeds(study, res: Resolved, inv: Inventory, budget: Budget) -> int:
    """A new study starts with the standard recipes at its budget (space.seed_params); returns how many."""
    from .space import seed_params

    if study.get_trials(deepcopy=False):
        return 0
    seeds = seed_params(res, inv, budget)
    for params in seeds:
        study.enqueue_trial(params, user_attrs={"seed": True})
    return len(seeds)


def ranked(study) -> list:
    """Feasible completed trials, best proxy first (ties: more compression, then earlier)."""
    return sorted((t for t in _complete(study) if feasible(t) and "duplicate_of" not in t.user_attrs),
                  key=lambda t: (-t.values[0], -t.values[1], t.number))


def ensure_base_eval(study, executor) -> dict:
    base = study.user_attrs.get(BASE_EVAL_ATTR)
    if base is None:  # the original model is evaluated once per study
        base = executor.call("base_eval")
        study.set_user_attr(BASE_EVAL_ATTR, base)
    return base


def full_evaluations(study, executor, top_k: int, progress: bool = True) -> dict[int, dict]:
    """Full evaluation of the ``top_k`` best trials by proxy (cached in the study's attributes)."""
    if top_k <= 0:
        return {}
    top = ranked(study)[:top_k]
    todo = [t for t in top if FULL_EVAL_PREFIX + str(t.number) not in study.user_attrs]
    if todo:
        base = ensure_base_eval(study, executor)
        for t in todo:
            executor.submit(t.number, "full_eval", t.user_attrs["plan"]["recipe"], base)
        for _ in todo:
            out = executor.next_result()
            if not out["ok"]:
                print(f"prunequant search: full evaluation of trial {out['token']} failed: {out['error']}",
                      file=sys.stderr)
                continue
            study.set_user_attr(FULL_EVAL_PREFIX + str(out["token"]), out["result"])
            if progress:
                r = out["result"]
                ppl = ", ".join(f"{k} {v:.3f}" for k, v in r["perplexity"].items())
                print(f"full eval trial {out['token']}: perplexity {ppl} | Sr {r['sr']:.4f} SrCr {r['srcr']:.3f}",
                      file=sys.stderr)
    attrs = study.user_attrs
    return {t.number: attrs[FULL_EVAL_PREFIX + str(t.number)] for t in top if FULL_EVAL_PREFIX + str(t.number) in attrs}


def full_score(ev: dict) -> float:
    """What ranks fully evaluated trials: Sr (under a budget the compression is fixed)."""
    return float(ev["sr"])


def pick_best(study, full: dict[int, dict]):
    """The best feasible trial: by the full evaluation where there is one, else by the proxy."""
    cands = ranked(study)
    if not cands:
        return None
    evaluated = [t for t in cands if t.number in full]
    if evaluated:
        return max(evaluated, key=lambda t: (full_score(full[t.number]), t.values[0], -t.number))
    return cands[0]


def pareto_front(trials) -> list:
    """Non-dominated feasible trials (both objectives maximised)."""
    pts = [t for t in trials if feasible(t) and "duplicate_of" not in t.user_attrs]
    front = []
    for t in pts:
        dominated = any(all(o >= v for o, v in zip(u.values, t.values)) and any(o > v for o, v in zip(u.values, t.values))
                        for u in pts)
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: t.values[1])


def recipe_of(trial) -> Recipe:
    return Recipe.from_dict(trial.user_attrs["plan"]["recipe"])
