"""Refinement (refine/): exact grids and masks after training, lower block error and KL, unchanged export."""
import copy
import math

import pytest
import torch

from prunequant import api
from prunequant.engine import compress_model
from prunequant.export import load_compact, size_report
from prunequant.models import all_linear_names, get_weight
from prunequant.recipe import PruneSpec, QuantSpec, Recipe, RecipeError, RefineSpec
from prunequant.refine import BlockRefiner, UniformWeight, global_refine, teacher_topk, topk_kl
from prunequant.solvers.grid import maxq_of
from tiny import TRAIN_TEXT, tiny_model, tiny_tokenizer

RECIPES = {
    "2bit": Recipe(quant=QuantSpec("gptq", 2, 32)),
    "50%+4bit": Recipe(prune=PruneSpec("sparsegpt", 0.5), quant=QuantSpec("gptq", 4, 32)),
    "2:4+3bit-sym": Recipe(prune=PruneSpec("sparsegpt", n=2, m=4), quant=QuantSpec("gptq", 3, 0, symmetric=True)),
    "1bit": Recipe(quant=QuantSpec("billm", 1, 32)),
    "50%": Recipe(prune=PruneSpec("sparsegpt", 0.5)),
}


def calib(n=8, L=32, seed=1):
    return torch.randint(0, 300, (n, L), generator=torch.Generator().manual_seed(seed))


class _Recording(BlockRefiner):
    """Records each layer's one-shot mask and quant state between the solve and the training."""

    def __call__(self, i, block, arch, inputs, solve, report, device):
        def solve_and_record():
            solve()
            for name, st in report.states.items():
                self.one_shot.setdefault(name, (None if st.mask is None else st.mask.clone(), copy.deepcopy(st.quant)))

        super().__call__(i, block, arch, inputs, solve_and_record, report, device)


def _refined(kind, recipe, steps=40):
    model = tiny_model(kind)
    ref = _Recording(RefineSpec(steps=steps))
    ref.one_shot = {}
    rep = compress_model(model, calib(), recipe.plan_for, device="cpu", batch_size=4, progress=False, block_hook=ref)
    return model, rep, ref


@pytest.mark.parametrize("name", list(RECIPES))
def test_refined_weights_lie_on_their_grids_with_masks_and_bits_unchanged(name):
    model, rep, ref = _refined("llama", RECIPES[name])
    assert sorted(rep.states) == sorted(all_linear_names(model))
    moved = 0
    for lname, st in rep.states.items():
        w = get_weight(model.get_submodule(lname)).detach()
        mask0, q0 = ref.one_shot[lname]
        assert st.info.get("refined")
        if mask0 is None:
            assert st.mask is None
        else:
            assert torch.equal(st.mask, mask0) and not w[~mask0].any()
        q = st.quant
        if q is None:
            continue
        assert (q.kind, q.bits, q.group_size, q.symmetric) == (q0.kind, q0.bits, q0.group_size, q0.symmetric)
        if q.kind == "uniform":
            assert torch.equal(q.dequantize(), w)  # the model's weight is exactly what the stored pieces give
            assert int(q.codes.max()) <= maxq_of(q.bits)
            assert torch.equal(q.zero, q.zero.round()) and torch.equal(q.g_idx, q0.g_idx)
            assert torch.equal(q.scale, q.scale.half().float())  # fp16 scales, as every export stores them
            if q.symmetric:
                assert torch.equal(q.zero, q0.zero)
            if mask0 is not None:  # pruned weights sit at code = zero
                assert torch.equal(q.codes[~mask0].float(), q.zero[:, q.g_idx.long()][~mask0])
            moved += int((q.codes != q0.codes).sum()) + int((q.scale != q0.scale).sum())
        else:
            from prunequant.solvers.billm import billm_dequantize

            assert torch.equal(billm_dequantize(q).float(), w)
            for k in ("sign1", "sign2", "sparse", "salient"):
                assert torch.equal(q.extra[k], q0.extra[k])
            moved += int((q.extra["params"] != q0.extra["params"]).sum())
    assert moved > 0 or name == "50%"


@pytest.mark.parametrize("name", ["2bit", "50%+4bit", "1bit"])
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_refinement_lowers_every_blocks_output_error(kind, name):
    _, _, ref = _refined(kind, RECIPES[name], steps=60)
    assert ref.log and all(b["kept"] for b in ref.log)
    for b in ref.log:
        assert b["error_after"] < 0.97 * b["error_before"], b
        assert len(b["curve"]) == 6


def _block_errors(spec):
    model = tiny_model("llama")
    ref = BlockRefiner(spec)
    compress_model(model, calib(), RECIPES["2bit"].plan_for, device="cpu", batch_size=4, progress=False, block_hook=ref)
    return [b["error_after"] for b in ref.log]


def test_default_scale_rate_beats_the_earlier_slow_one():
    """The default lr_scale (chosen on SmolLM2's held-out calibration windows) also wins on a tiny model."""
    fast = _block_errors(RefineSpec(steps=40))
    slow = _block_errors(RefineSpec(steps=40, lr_scale=1e-3))
    assert sum(fast) < 0.95 * sum(slow), (fast, slow)


def test_refined_model_is_closer_to_the_original_than_one_shot():
    ids, held = calib(), calib(seed=7)
    base = tiny_model("llama")
    one_shot = tiny_model("llama")
    compress_model(one_shot, ids, RECIPES["2bit"].plan_for, device="cpu", batch_size=4, progress=False)
    refined, _, _ = _refined("llama", RECIPES["2bit"], steps=60)
    with torch.no_grad():
        t = torch.log_softmax(base(held).logits, -1)

        def kl(m):
            return float((t.exp() * (t - torch.log_softmax(m(held).logits, -1))).sum(-1).mean())
        assert kl(refined) < kl(one_shot)


def test_uniform_view_starts_at_the_one_shot_weight_and_exports_what_it_trains():
    torch.manual_seed(0)
    model = tiny_model("llama")
    rep = compress_model(model, calib(), RECIPES["50%+4bit"].plan_for, device="cpu", batch_size=4, progress=False)
    name = next(iter(rep.states))
    st = rep.states[name]
    view = UniformWeight(st.quant, st.mask)
    assert torch.equal(view.weight().detach(), get_weight(model.get_submodule(name)))
    with torch.no_grad():  # move everything off the grid; the trained forward must equal the export
        view.code.add_(torch.randn_like(view.code) * 0.7)
        view.log_scale.add_(0.05)
        view.zero.add_(0.6)
    view.project_()
    w, q = view.export()
    assert torch.equal(view.weight().detach(), w) and torch.equal(q.dequantize(), w)


def test_topk_kl_is_the_full_kl_at_full_k_and_a_lower_bound_below():
    torch.manual_seed(0)
    t_logits, s_logits = torch.randn(2, 5, 40) * 2, torch.randn(2, 5, 40) * 2
    tp = torch.log_softmax(t_logits, -1)
    full = float((tp.exp() * (tp - torch.log_softmax(s_logits, -1))).sum(-1).mean())
    lp, idx = tp.topk(40, -1)
    assert float(topk_kl(s_logits, lp, idx)) == pytest.approx(full, rel=1e-4)
    for k in (1, 5, 20):
        lp, idx = tp.topk(k, -1)
        assert float(topk_kl(s_logits, lp, idx)) <= full + 1e-6


def test_global_stage_lowers_the_calibration_kl():
    model = tiny_model("llama")
    ids = calib()
    teacher = teacher_topk(model, ids, 32, 4, "cpu")
    rep = compress_model(model, ids, RECIPES["2bit"].plan_for, device="cpu", batch_size=4, progress=False)
    before = {n: copy.deepcopy(st.quant) for n, st in rep.states.items()}
    log = global_refine(model, ids, rep.states, teacher, RefineSpec(mode="global", steps=40), batch_size=4,
                        device="cpu")
    assert log["kept"] and log["kl_after"] < 0.95 * log["kl_before"]
    for n, st in rep.states.items():
        assert torch.equal(st.quant.dequantize(), get_weight(model.get_submodule(n)))
        assert st.quant.bits == before[n].bits


def test_holdout_split():
    from prunequant.refine.global_kl import split_holdout

    assert split_holdout(16, 0.125) == (list(range(14)), [14, 15])
    assert split_holdout(8, 0.05) == (list(range(7)), [7])  # at least one window judges
    train, judge = split_holdout(3, 0.5)  # too few windows to spare one: the trained windows judge
    assert train == judge == [0, 1, 2]
    assert split_holdout(16, 0.0)[1] == list(range(16))
    with pytest.raises(RecipeError, match="holdout"):
        RefineSpec(mode="global", holdout=1.0)


@pytest.mark.parametrize("lr_scale,expect_kept", [(2e-2, True), (30.0, False)])
def test_global_stage_keeps_the_best_step_on_held_out_windows(lr_scale, expect_kept):
    from prunequant.refine.global_kl import calib_kl

    model = tiny_model("llama")
    ids = calib(n=16)
    teacher = teacher_topk(model, ids, 32, 4, "cpu")
    rep = compress_model(model, ids, RECIPES["2bit"].plan_for, device="cpu", batch_size=4, progress=False)
    one_shot = {n: get_weight(model.get_submodule(n)).clone() for n in rep.states}
    spec = RefineSpec(mode="global", steps=16, lr_scale=lr_scale, holdout=0.25)
    log = global_refine(model, ids, rep.states, teacher, spec, batch_size=4, device="cpu")
    assert log["train_windows"] == 12 and log["judge_windows"] == 4
    curve = [kl for _, kl in log["judge_curve"]]
    assert log["kept"] == expect_kept
    assert log["kl_after"] == pytest.approx(min([log["kl_before"], *curve]), abs=1e-6)
    # the model holds the weights of the step it reports, measured on the windows it never trained on
    assert calib_kl(model, ids, teacher, 4, "cpu", list(range(12, 16))) == pytest.approx(log["kl_after"], rel=1e-4)
    if not expect_kept:
        assert all(torch.equal(get_weight(model.get_submodule(n)), w) for n, w in one_shot.items())


def test_compress_with_refinement_exports_the_same_format_and_tcr(tmp_path):
    tok = tiny_tokenizer()
    (tmp_path / "calib.txt").write_text(TRAIN_TEXT * 20)
    kw = dict(tokenizer=tok, calib_text=str(tmp_path / "calib.txt"), calib_samples=4, seq_len=32, device="cpu",
              progress=False)
    recipe = Recipe(prune=PruneSpec("sparsegpt", 0.5), quant=QuantSpec("gptq", 4, 32))
    plain = api.compress(tiny_model("llama"), recipe, **kw)
    refined_recipe = Recipe.from_dict({**recipe.to_dict(), "refine": {"mode": "both", "steps": 5, "global_steps": 5}})
    res = api.compress(tiny_model("llama"), refined_recipe, **kw)
    assert res.rates["tcr"] == plain.rates["tcr"]
    info = res.record["refine"]
    assert info["spec"]["mode"] == "both" and len(info["blocks"]) == 2 and "global" in info
    assert info["seconds_one_shot"] > 0 and info["seconds"] > 0 and info["time_ratio"] > 0
    out = api.save(res, tmp_path / "c", fmt="compact")
    reloaded = load_compact(out, dtype=torch.float32)
    for name in res.report.states:
        assert torch.equal(reloaded.get_submodule(name).weight, res.model.get_submodule(name).weight)
    rows = {r["name"]: r for r in size_report(out)["layers"]}
    rows_plain = {r["name"]: r for r in size_report(api.save(plain, tmp_path / "p", fmt="compact"))["layers"]}
    keys = ("stored_as", "sparsity", "bits", "group_size", "tcr")
    assert {n: [r[k] for k in keys] for n, r in rows.items()} == {n: [r[k] for k in keys] for n, r in rows_plain.items()}
    for n, r in rows.items():  # same encoding; only the count of kept weights that round to 0 may differ
        assert r["bytes"] == pytest.approx(rows_plain[n]["bytes"], rel=0.02)


def test_refine_spec_validation_and_recipe_round_trip():
    with pytest.raises(RecipeError, match="refine mode"):
        RefineSpec(mode="everything")
    with pytest.raises(RecipeError, match="steps"):
        RefineSpec(steps=0)
    with pytest.raises(RecipeError, match="schedule 'linear' unknown"):
        RefineSpec(schedule="linear")
    r = Recipe.from_dict({"quant": {"method": "gptq", "bits": 2}, "refine": "both"})
    assert r.refine == RefineSpec(mode="both") and Recipe.from_dict(r.to_dict()).refine == r.refine
    assert "refine" not in Recipe(quant=QuantSpec()).to_dict()  # plain recipes keep their old form and fingerprint
    assert "refined both" in r.describe() and math.isfinite(r.refine.n_global_steps)


def test_cli_compress_with_refine_records_it_and_rejects_bad_flags(tmp_path, capsys):
    import json

    from prunequant.cli import main
    from tiny import save_tiny

    save_tiny(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(TRAIN_TEXT * 20)
    common = ["compress", str(tmp_path / "tiny"), "--quant", "rtn:2:g32", "--calib-text", str(tmp_path / "calib.txt"),
              "--calib-samples", "4", "--seq-len", "32", "--device", "cpu"]
    assert main(common + ["--refine", "blockwise", "--refine-steps", "3", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "refinement: block output error" in out
    rec = json.loads((tmp_path / "o" / "prunequant.json").read_text())
    assert rec["recipe"]["refine"]["steps"] == 3 and len(rec["refine"]["blocks"]) == 2
    for args, msg in ((["--refine-steps", "3"], "needs --refine"), (["--refine", "global", "--refine-steps", "0"],
                                                                      "positive integer")):
        assert main(common + args + ["--out", str(tmp_path / "bad")]) == 2
        assert msg in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_prunequant_report_writes_the_frontier_plot_from_compression_records_and_run_files(tmp_path, capsys):
    import json

    from prunequant.cli import main
    from prunequant.report import series_of

    ev = {"compressed": {"texts": {"wiki": {"perplexity": 30.0}}}, "retention": {"ppl:wiki": 0.8}, "sr": 0.8}
    recs = {"q2": {"recipe": {"quant": {"bits": 2}}}, "j": {"recipe": {"prune": {"sparsity": 0.5}, "quant": {}}},
            "jr": {"recipe": {"prune": {"sparsity": 0.5}, "quant": {}, "refine": {"mode": "both"}}}}
    paths = []
    for name, rec in recs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "prunequant.json").write_text(json.dumps({**rec, "rates": {"tcr": 0.875}, "evaluation": ev}))
        paths.append(str(tmp_path / name))
    run = tmp_path / "r.json"
    run.write_text(json.dumps({"name": "q4", "tcr": 0.75, "sr": 0.9, "series": "quantization only", "metrics": {},
                               "retention": {"kl": 0.9}}))
    assert [series_of(r) for r in recs.values()] == ["quantization only", "joint one-shot", "joint refined"]
    assert main(["report", *paths, str(run), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "frontier.png").stat().st_size > 1000
    assert main(["report", str(tmp_path / "none.json"), "--out", str(tmp_path / "x")]) == 2
    assert "cannot read the runs" in capsys.readouterr().err


def test_search_space_has_refinement_as_a_dimension_that_leaves_the_budget_unchanged():
    import optuna

    from prunequant.errors import PrunequantError
    from prunequant.search.budget import Inventory, nominal, parse_budget
    from prunequant.search.space import SearchSpace, resolve, short_describe, suggest

    inv, b = Inventory.of(tiny_model()), parse_budget("tcr=0.875")
    res = resolve(SearchSpace(refine=("none", "blockwise", "both"), refine_steps=7), inv, b)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(40):
        t = study.ask()
        try:
            recipe, info = suggest(t, res, inv, b)
        except Exception as e:  # noqa: BLE001 - Infeasible is allowed, nothing else
            assert type(e).__name__ == "Infeasible", e
            continue
        mode = t.params["refine"]
        assert (recipe.refine.mode, recipe.refine.steps) == (mode, 7) if mode != "none" else recipe.refine is None
        plain = Recipe.from_dict({k: v for k, v in recipe.to_dict().items() if k != "refine"})
        assert nominal(recipe, inv) == nominal(plain, inv)
        seen[mode] = short_describe(recipe)
    assert set(seen) == {"none", "blockwise", "both"} and "refined both" in seen["both"]
    assert SearchSpace().refine == ("none",)  # off unless a space file asks for it: old studies keep their space
    with pytest.raises(PrunequantError, match="refine choices"):
        SearchSpace(refine=("sometimes",))


def test_original_stream_targets_follow_the_uncompressed_model():
    """Block 0 sees the same inputs either way; later blocks' targets are the original model's activations."""
    model = tiny_model("llama")
    ids = calib()
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # embeddings, block 0 out, block 1 out (+norm)
    seen = []

    class Spy(BlockRefiner):
        def _train(self, i, block, inputs, targets, views, device):
            seen.append(torch.cat(targets))
            return super()._train(i, block, inputs, targets, views, device)

    ref = Spy(RefineSpec(steps=30, target="original-stream"))
    compress_model(model, ids, RECIPES["2bit"].plan_for, device="cpu", batch_size=4, progress=False, block_hook=ref)
    assert torch.allclose(seen[0], hidden[1], atol=1e-5)
    assert all(b["kept"] and b["error_after"] < b["error_before"] for b in ref.log)
    with pytest.raises(RecipeError, match="target"):
        RefineSpec(target="teacher")


def test_global_lr_scales_the_global_stage_rates():
    """global_lr multiplies the global stage's rates: near zero the weights (and the KL) stay where the
    block-wise stage left them; at 1 they move."""
    moved = {}
    for mult in (1e-7, 1.0):
        model = tiny_model("llama")
        ids = calib(n=8)
        teacher = teacher_topk(model, ids, 32, 4, "cpu")
        rep = compress_model(model, ids, RECIPES["2bit"].plan_for, device="cpu", batch_size=4, progress=False)
        spec = RefineSpec(mode="global", steps=4, holdout=0, global_lr=mult)
        log = global_refine(model, ids, rep.states, teacher, spec, batch_size=4, device="cpu")
        moved[mult] = max(abs(kl - log["kl_before"]) for _, kl in log["judge_curve"])
    assert moved[1e-7] < 1e-5 < moved[1.0]


def test_cosine_schedule_decays_each_stages_rate_to_zero_and_still_refines(monkeypatch):
    """With schedule cosine every Adam group's rate follows 0.5·(1 + cos(π·t/T)) over the stage's own T steps
    (the last step near zero), in both stages, and the blocks still get better."""
    import prunequant.refine.blockwise as bw

    seen = []
    real = bw.optimizer

    def spy(groups, device, schedule, n):
        base = [g["lr"] for g in groups]
        opt, sched = real(groups, device, schedule, n)
        advance = sched.step

        def recording_step():  # called right after each optimiser step: the rates that step used
            seen.append((n, [g["lr"] / b for g, b in zip(opt.param_groups, base) if b]))
            advance()
        sched.step = recording_step
        return opt, sched
    monkeypatch.setattr(bw, "optimizer", spy)
    monkeypatch.setattr("prunequant.refine.global_kl.optimizer", spy)
    model = tiny_model("llama")
    ids = calib(n=8)
    teacher = teacher_topk(model, ids, 32, 4, "cpu")
    spec = RefineSpec(mode="both", steps=20, global_steps=10, holdout=0, schedule="cosine")
    ref = BlockRefiner(spec)
    rep = compress_model(model, ids, RECIPES["2bit"].plan_for, device="cpu", batch_size=4, progress=False,
                         block_hook=ref)
    global_refine(model, ids, rep.states, teacher, spec, batch_size=4, device="cpu")
    assert all(b["error_after"] < b["error_before"] for b in ref.log)
    for n in (20, 10):
        runs = [f for m, f in seen if m == n]
        stage = runs[:n]  # the first run of this stage's length
        for t, factors in enumerate(stage):
            assert factors and all(abs(f - 0.5 * (1 + math.cos(math.pi * t / n))) < 1e-9 for f in factors), (n, t)
        assert max(stage[-1]) < 0.03
    assert len(seen) == 20 * len(ref.log) + 10


def _norms(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}


def test_norm_rate_trains_the_norms_and_the_export_carries_them(tmp_path):
    """lr_norm > 0: the block-wise and global stages move the norm weights (full precision in every format, so
    TCr stays); the compact export reloads them exactly; at lr_norm 0 they stay bit for bit."""
    tok = tiny_tokenizer()
    (tmp_path / "calib.txt").write_text(TRAIN_TEXT * 20)
    kw = dict(tokenizer=tok, calib_text=str(tmp_path / "calib.txt"), calib_samples=4, seq_len=32, device="cpu",
              progress=False)
    base = _norms(tiny_model("llama"))
    res = {}
    for lr in (0.0, 1e-2):
        r = Recipe(quant=QuantSpec("gptq", 2, 32), refine=RefineSpec(mode="both", steps=8, global_steps=8,
                                                                      holdout=0, lr_norm=lr))
        res[lr] = api.compress(tiny_model("llama"), r, **kw)
    assert all(torch.equal(t, base[n]) for n, t in _norms(res[0.0].model).items())
    tuned = _norms(res[1e-2].model)
    assert any(n.startswith("model.layers.") and not torch.equal(t, base[n]) for n, t in tuned.items())
    assert not torch.equal(tuned["model.norm.weight"], base["model.norm.weight"])  # the global stage's
    assert res[1e-2].rates["tcr"] == res[0.0].rates["tcr"]
    reloaded = load_compact(api.save(res[1e-2], tmp_path / "c", fmt="compact"), dtype=torch.float32)
    assert all(torch.equal(t, tuned[n]) for n, t in _norms(reloaded).items())
    with pytest.raises(RecipeError, match="lr_norm"):
        RefineSpec(lr_norm=-1.0)


def test_rejected_block_restores_its_norms():
    """A block whose error did not fall keeps its one-shot state, norms included."""
    model = tiny_model("llama")
    before = _norms(model)
    ref = BlockRefiner(RefineSpec(steps=4, lr_norm=1e3, lr_scale=0.0))  # a rate that only makes things worse
    compress_model(model, calib(), RECIPES["2bit"].plan_for, device="cpu", batch_size=4, progress=False, block_hook=ref)
    assert not any(b["kept"] for b in ref.log)
    assert all(torch.equal(t, before[n]) for n, t in _norms(model).items())
