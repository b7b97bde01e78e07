"""Configuration search on a tiny random model: reproducible, within budget, resumable, best recipe re-runs."""
import math

import optuna
import pytest
import torch

from prunequant.errors import PrunequantError
from prunequant.recipe import PruneSpec, QuantSpec, Recipe
from prunequant.search import SearchSpace, parse_budget, search
from prunequant.search.budget import TCR_TOLERANCE, Inventory, nominal
from prunequant.search.space import resolve, suggest
from prunequant.search.study import feasible, measures
from tiny import TRAIN_TEXT, save_tiny, tiny_model

TEXT = ("Alpha beta gamma delta. " * 40 + "\n") * 30


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matrices: one thread avoids oversubscription on a shared machine (and keeps results bitwise stable)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("search")
    save_tiny(d / "tiny")
    (d / "calib.txt").write_text(TEXT)
    (d / "eval.txt").write_text(TRAIN_TEXT * 20)
    return d


def run_search(files, out, n_trials, budget="tcr=0.875", storage=None, **kw):
    opts = dict(out=out, storage=storage, calib_text=str(files / "calib.txt"), calib_samples=4, seq_len=32,
                eval_texts=[str(files / "eval.txt")], eval_max_tokens=256, eval_seq_len=32, proxy_samples=4,
                proxy_seq_len=32, full_eval_top_k=1, seed=0, progress=False)
    opts.update(kw)
    return search(str(files / "tiny"), budget, n_trials, **opts)


def trials(res):
    return res.study.get_trials(deepcopy=False)


def test_parse_budget():
    assert parse_budget("tcr=0.875").value == 0.875
    assert parse_budget("size=40MB").value == 40e6
    assert parse_budget("size=1.5MiB").value == 1.5 * 2**20
    for bad in ("tcr=1.5", "size=-3MB", "bits=4", "size=4XB", "tcr=0.5MB"):
        with pytest.raises(PrunequantError):
            parse_budget(bad)


def test_nominal_rates_match_engine():
    """The accounting the search derives with equals what compression measures (data-free recipes: fast)."""
    from prunequant.api import linear_param_counts
    from prunequant.engine import compress_model
    from prunequant.accounting import summarize
    from prunequant.recipe import Override

    inv = Inventory.of(tiny_model())
    for recipe in (Recipe(quant=QuantSpec("rtn", 3, 32)),
                   Recipe(prune=PruneSpec("magnitude", 0.4), quant=QuantSpec("rtn", 4, 0), joint="B"),
                   Recipe(prune=PruneSpec("magnitude", n=2, m=4), quant=QuantSpec("rtn", 8, 64), joint="B"),
                   Recipe(prune=PruneSpec("magnitude", 0.5), quant=QuantSpec("rtn", 4, 32), joint="B",
                          overrides=[Override("model.layers.0.*", skip=True)])):
        m = tiny_model()
        rep = compress_model(m, None, recipe.plan_for, device="cpu", progress=False)
        measured = summarize(rep.layers, recipe.plan_for, sum(p.numel() for p in m.parameters()), linear_param_counts(m))["tcr"]
        assert nominal(recipe, inv)["tcr"] == pytest.approx(measured, abs=TCR_TOLERANCE), recipe.describe()


@pytest.mark.parametrize("budget", ["tcr=0.875", "tcr=0.8", "size=0.2MB"])
def test_space_lands_on_budget(budget):
    """Every configuration the space proposes meets the budget nominally, and does not overshoot much."""
    inv = Inventory.of(tiny_model())
    b = parse_budget(budget)
    res = resolve(SearchSpace(), inv, b)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(60):
        t = study.ask()
        try:
            recipe, info = suggest(t, res, inv, b)
        except Exception as e:  # noqa: BLE001 - Infeasible is allowed, nothing else
            assert type(e).__name__ == "Infeasible", e
            study.tell(t, state=optuna.trial.TrialState.PRUNED)
            continue
        fig = nominal(recipe, inv)
        seen.add(info["config"]["family"])
        if recipe.prune and recipe.prune.structured and recipe.quant and recipe.joint == "onepass":
            assert not recipe.quant.act_order  # the one-pass solver refuses act-order on N:M groups
        if b.kind == "tcr":
            assert fig["tcr"] >= b.value - 1e-9
            continuous = info["config"]["derive"] in ("sparsity", "avg_bits")
            if continuous and recipe.prune is not None and not recipe.prune.structured:
                assert fig["tcr"] <= b.value + 0.01, (recipe.describe(), fig)
        else:
            assert fig["predicted_bytes"] <= b.value
        study.tell(t, [0.0, 0.0])
    assert {"joint", "quant"} <= seen


def test_search_is_reproducible_and_within_budget(files, tmp_path):
    a = run_search(files, tmp_path / "a", 4)
    b = run_search(files, tmp_path / "b", 4)
    ta, tb = trials(a), trials(b)
    assert [t.params for t in ta] == [t.params for t in tb]
    assert [t.values for t in ta] == [t.values for t in tb]
    done = [t for t in ta if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4
    for t in done:  # tcr budgets are met by construction, and checked on the measured rate
        assert feasible(t) and measures(t)["tcr"] >= 0.875 - TCR_TOLERANCE
    assert a.best is not None and a.best["tcr"] >= 0.875 - TCR_TOLERANCE
    for name in ("recipe", "trials", "plot"):
        assert a.paths[name].is_file()


def test_resume_continues_the_study(files, tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    first = run_search(files, tmp_path / "o", 3, storage=storage, full_eval_top_k=0)
    before = [(t.number, t.params, t.values) for t in trials(first) if t.state.name == "COMPLETE"]
    assert len(before) == 3
    again = run_search(files, tmp_path / "o", 5, storage=storage, full_eval_top_k=0)
    after = [(t.number, t.params, t.values) for t in trials(again) if t.state.name == "COMPLETE"]
    assert len(after) == 5 and after[:3] == before
    assert "base_eval" not in again.study.user_attrs  # no full evaluation asked for
    with pytest.raises(PrunequantError, match="different search settings"):
        run_search(files, tmp_path / "o", 5, storage=storage, calib_samples=8)


def test_best_recipe_reruns_to_the_same_score(files, tmp_path):
    from prunequant import api
    from prunequant.models import load_model
    from prunequant.search.trial import TrialSetup, logit_agreement, proxy_ids

    res = run_search(files, tmp_path / "o", 3)
    assert res.study.user_attrs["base_eval"]  # the original model's evaluation is cached in the study
    full = res.best["full_eval"]
    assert full["sr"] > 0 and full["srcr"] == pytest.approx(full["sr"] / (1 - full["tcr"]))
    recipe = Recipe.load(res.paths["recipe"])
    assert recipe.to_dict() == res.best["recipe"]
    base, tok = load_model(str(files / "tiny"))
    model, _ = load_model(str(files / "tiny"))
    api.compress(model, recipe, tokenizer=tok, calib_text=str(files / "calib.txt"), calib_samples=4, seq_len=32,
                 seed=0, progress=False)
    setup = TrialSetup(model="", calib_text=str(files / "calib.txt"), eval_texts=(str(files / "eval.txt"),),
                       eval_max_tokens=256, proxy_samples=4, proxy_seq_len=32)
    ids, _ = proxy_ids(tok, setup)
    kl = logit_agreement(model, base, ids)["kl"]
    assert kl == pytest.approx(res.best["kl"], rel=1e-5, abs=1e-9)
    assert math.exp(-kl) == pytest.approx(res.best["values"][0], rel=1e-5)


def test_size_budget_is_a_hard_constraint(files, tmp_path, monkeypatch):
    ok = run_search(files, tmp_path / "ok", 3, budget="size=0.15MB", full_eval_top_k=0)
    done = [t for t in trials(ok) if t.state.name == "COMPLETE"]
    assert len(done) == 3
    for t in done:  # the real bytes of the compact export decide feasibility, exactly
        m = measures(t)
        assert m["constraint"] == m["bytes"] - 0.15e6
        assert feasible(t) == (m["bytes"] <= 0.15e6)
        assert t.values[1] == pytest.approx(1 - m["bytes"] / Inventory.of(tiny_model()).dense_bytes)
    assert any(feasible(t) for t in done)
    # real bytes above the budget: every trial is kept, marked infeasible, and never picked as best
    from prunequant.search import trial as trial_mod

    real = trial_mod.compact_bytes
    monkeypatch.setattr(trial_mod, "compact_bytes", lambda res: real(res) + 10**6)
    bad = run_search(files, tmp_path / "bad", 2, budget="size=0.15MB", full_eval_top_k=1)
    done = [t for t in trials(bad) if t.state.name == "COMPLETE"]
    assert len(done) == 2 and all(measures(t)["constraint"] > 0 and not feasible(t) for t in done)
    assert bad.best is None and "recipe" not in bad.paths


def test_trials_orphaned_by_a_dead_driver_are_failed(tmp_path):
    import socket

    from prunequant.search.study import fail_orphans

    storage = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize", "maximize"])
    dead, alive = study.ask(), study.ask()
    dead.set_user_attr("plan", {"driver": f"{socket.gethostname()}:99999999"})
    alive.set_user_attr("plan", {"driver": f"{socket.gethostname()}:{__import__('os').getpid()}"})
    fail_orphans(optuna.load_study(storage=storage, study_name="s"))
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "RUNNING"]


def test_workers_need_ray(files, tmp_path):
    try:
        import ray  # noqa: F401
        pytest.skip("ray is installed")
    except ImportError:
        pass
    with pytest.raises(PrunequantError, match=r"pip install 'prunequant\[dist\]'"):
        run_search(files, tmp_path / "o", 2, workers=2)


def test_cli_search(files, tmp_path, capsys):
    from prunequant.cli import main

    common = ["--calib-text", files / "calib.txt", "--calib-samples", 4, "--seq-len", 32, "--text", files / "eval.txt",
              "--max-tokens", 256, "--eval-seq-len", 32, "--proxy-samples", 4, "--proxy-seq-len", 32]
    args = ["search", files / "tiny", "--budget", "tcr=0.8", "--n-trials", 2, "--out", tmp_path / "o",
            "--full-eval-top-k", 0, "--json", tmp_path / "r.json", *common]
    assert main([str(x) for x in args]) == 0
    assert (tmp_path / "o" / "best_recipe.yaml").is_file() and (tmp_path / "r.json").is_file()
    Recipe.load(tmp_path / "o" / "best_recipe.yaml")
    capsys.readouterr()
    # a user mistake is one line and exit code 2
    assert main(["search", str(files / "tiny"), "--budget", "bits=4", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "budget" in err


@pytest.mark.slow
def test_ray_workers_give_the_inline_results(files, tmp_path):
    """Two Ray workers (each loading the model itself) report the same trials as the in-process run."""
    pytest.importorskip("ray")
    inline = run_search(files, tmp_path / "a", 3, full_eval_top_k=0)
    ray_run = run_search(files, tmp_path / "b", 3, workers=2, full_eval_top_k=1)
    a = sorted((t.number, t.params, t.values) for t in trials(inline) if t.state.name == "COMPLETE")
    b = sorted((t.number, t.params, t.values) for t in trials(ray_run) if t.state.name == "COMPLETE")
    assert [x[:2] for x in a] == [x[:2] for x in b]  # startup draws do not depend on the order results arrive
    for (_, _, va), (_, _, vb) in zip(a, b):
        assert va == pytest.approx(vb, rel=1e-4)
    assert ray_run.best is not None and "sr" in ray_run.best["full_eval"]


def test_warm_start_seeds_are_the_standard_recipes():
    from prunequant.search.space import seed_params

    inv = Inventory.of(tiny_model())
    b = parse_budget("tcr=0.875")
    seeds = seed_params(resolve(SearchSpace(), inv, b), inv, b)
    assert seeds[0]["family"] == "joint" and seeds[0]["bits"] == 4  # SparseGPT 50% + GPTQ 4-bit, one pass
    assert {s["family"] for s in seeds} == {"joint", "quant"}
    assert len({tuple(sorted(s.items())) for s in seeds}) == len(seeds)
    assert not any("refine" in s for s in seeds)  # refinement not on offer: nothing to choose
    sp = SearchSpace(refine=("none", "blockwise", "both"), refine_steps=7)
    with_refine = seed_params(resolve(sp, inv, b), inv, b)
    plain, extra = with_refine[:len(seeds)], with_refine[len(seeds):]

    def rest(s):
        return {k: v for k, v in s.items() if k != "refine"}
    assert [rest(s) for s in plain] == seeds and {s["refine"] for s in plain} == {"none"}  # standard ones first
    assert [s["refine"] for s in extra] == ["blockwise", "both"]  # then the first of them in each mode
    assert all(rest(s) == seeds[0] for s in extra)


def test_new_study_runs_the_seeds_first(files, tmp_path):
    res = run_search(files, tmp_path / "s", 2, full_eval_top_k=0)
    first = sorted(res.study.trials, key=lambda t: t.number)[0]
    plan = first.user_attrs["plan"]
    assert first.user_attrs.get("seed") is True
    assert plan["recipe"]["prune"]["method"] == "sparsegpt" and plan["recipe"]["quant"]["bits"] == 4
    assert abs(plan["nominal_tcr"] - 0.875) <= TCR_TOLERANCE + 1e-9
    off = run_search(files, tmp_path / "n", 1, full_eval_top_k=0, warm_start=False)
    assert not any(t.user_attrs.get("seed") for t in off.study.trials)
