"""The sequential engine on tiny random models of every supported family."""
import pytest
import torch

from prunequant.engine import compress_model
from prunequant.models import all_linear_names, get_weight
from prunequant.recipe import LayerPlan, PruneSpec, QuantSpec, Recipe
from prunequant.solvers import solve_layer
from prunequant.solvers.base import LayerResult
from tiny import CONFIGS, tiny_model

FAMILIES = list(CONFIGS)


def calib(n=4, L=16, seed=0):
    return torch.randint(0, 300, (n, L), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("true_sequential", [True, False])
def test_identity_solver_visits_every_linear_once_and_changes_nothing(kind, true_sequential):
    model = tiny_model(kind)
    ids = calib()
    before = logits(model, ids)
    seen = []

    def identity(w, stats, plan):
        assert stats.hessian is not None and stats.hessian.shape == (w.shape[1], w.shape[1])
        assert stats.n_tokens == ids.numel()
        seen.append(w.shape)
        return LayerResult(weight=w.clone())

    plan = LayerPlan(quant=QuantSpec(method="gptq", bits=4, group_size=0))
    rep = compress_model(model, ids, lambda n: plan, device="cpu", batch_size=3, solver=identity,
                         true_sequential=true_sequential, progress=False)
    names = all_linear_names(model)
    assert sorted(rep.layers) == sorted(names) and len(seen) == len(names)
    assert torch.equal(logits(model, ids), before)


def test_hessian_is_mean_of_xxT_of_the_real_inputs():
    model = tiny_model("llama")
    ids = calib(3, 8)
    captured = {}
    def keep(_m, a, _o):
        captured["x"] = a[0].detach().reshape(-1, a[0].shape[-1])

    h = model.model.layers[0].mlp.down_proj.register_forward_hook(keep)
    with torch.no_grad():
        model(ids)
    h.remove()
    got = {}

    def grab(w, stats, plan):
        got.setdefault(w.shape, stats)
        return LayerResult(weight=w.clone())

    compress_model(model, ids, lambda n: LayerPlan(quant=QuantSpec(method="gptq", bits=4, group_size=0))
                   if n == "model.layers.0.mlp.down_proj" else LayerPlan(), device="cpu", batch_size=2,
                   solver=grab, progress=False)
    x = captured["x"].double()
    stats = got[(64, 128)]
    torch.testing.assert_close(stats.hessian.double(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", FAMILIES)
def test_magnitude_exact_sparsity_and_rtn_on_grid(kind):
    model = tiny_model(kind)
    recipe = Recipe(prune=PruneSpec(method="magnitude", sparsity=0.5), quant=QuantSpec(method="rtn", bits=3, group_size=32),
                    joint="B")
    rep = compress_model(model, calib(), recipe.plan_for, device="cpu", progress=False)
    for name in all_linear_names(model):
        w = get_weight(model.get_submodule(name)).detach()
        st = rep.states[name]
        assert st.mask is not None and float((~st.mask).float().mean()) == pytest.approx(0.5, abs=1e-9)
        assert (w[~st.mask] == 0).all()
        q = st.quant
        deq = q.dequantize() * st.mask
        torch.testing.assert_close(w, deq.to(w.dtype), rtol=0, atol=1e-6)
        assert int(q.codes.max()) <= 7
        for g in range(q.scale.shape[1]):
            cols = (q.g_idx == g)
            for row in range(q.codes.shape[0]):
                assert q.codes[row, cols].unique().numel() <= 8


def test_solver_dispatch_real_solvers_reduce_error_vs_rtn():
    model = tiny_model("llama")
    ids = calib(8, 16)
    base = logits(model, ids)
    errs = {}
    for method in ("rtn", "gptq"):
        m = tiny_model("llama")
        r = Recipe(quant=QuantSpec(method=method, bits=3, group_size=32))
        compress_model(m, ids, r.plan_for, device="cpu", progress=False)
        errs[method] = float((logits(m, ids) - base).pow(2).mean())
    assert errs["gptq"] < errs["rtn"]


def test_resume_after_interruption_gives_the_same_model(tmp_path):
    ids = calib()
    recipe = Recipe(quant=QuantSpec(method="rtn", bits=4, group_size=32))
    ref = tiny_model("llama")
    compress_model(ref, ids, recipe.plan_for, device="cpu", progress=False)

    calls = {"n": 0}

    def flaky(w, stats, plan):
        calls["n"] += 1
        if calls["n"] == 9:  # inside block 1 (7 linears per block)
            raise KeyboardInterrupt
        return solve_layer(w, stats, plan)

    m = tiny_model("llama")
    with pytest.raises(KeyboardInterrupt):
        compress_model(m, ids, recipe.plan_for, device="cpu", solver=flaky, work_dir=tmp_path / "w",
                       fingerprint="x", progress=False)
    m = tiny_model("llama")
    rep = compress_model(m, ids, recipe.plan_for, device="cpu", work_dir=tmp_path / "w", fingerprint="x",
                         progress=False)
    assert rep.resumed_blocks == 1 and len(rep.layers) == 14
    assert torch.equal(logits(m, ids), logits(ref, ids))
    assert (tmp_path / "w" / "progress.json").is_file()  # kept until the caller has saved the result

    def never(*a):
        raise AssertionError("a finished block was compressed again")

    m = tiny_model("llama")  # killed after the last block (during evaluation or save): nothing is recomputed
    rep = compress_model(m, ids, recipe.plan_for, device="cpu", solver=never, work_dir=tmp_path / "w",
                         fingerprint="x", progress=False)
    assert rep.resumed_blocks == 2 and len(rep.layers) == 14 and len(rep.states) == 14
    assert torch.equal(logits(m, ids), logits(ref, ids))


def test_gpt2_conv1d_is_transposed():
    model = tiny_model("gpt2")
    c_fc = model.transformer.h[0].mlp.c_fc
    assert tuple(c_fc.weight.shape) == (64, 128) and tuple(get_weight(c_fc).shape) == (128, 64)
    recipe = Recipe(prune=PruneSpec(method="magnitude", n=2, m=4))
    rep = compress_model(model, calib(), recipe.plan_for, device="cpu", progress=False)
    w = get_weight(c_fc).detach()
    # 2 of every 4 consecutive *input* weights pruned
    assert ((w.reshape(128, 16, 4) == 0).sum(-1) == 2).all()
    assert rep.layers["transformer.h.0.mlp.c_fc"].shape == [128, 64]
