"""The Triton GPTQ column loop equals the torch loop (on the CPU through Triton's interpreter).

Triton decides at import whether it interprets, so the comparison runs in a child process started
with TRITON_INTERPRET=1.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CASES = [
    (32, 64, False, False, False),   # several dynamic groups per block
    (64, 64, False, True, True),     # group = block, with a pruning mask
    (0, 48, False, False, False),    # per channel, block not a power of two
    (32, 64, True, False, False),    # act-order: static groups, permuted columns
]


def _compare_all() -> list[dict]:
    import torch

    from prunequant.recipe import QuantSpec
    from prunequant.solvers import triton_gptq
    from prunequant.solvers.base import LayerStats
    from prunequant.solvers.quant import gptq_quantize

    out = []
    for gs, blocksize, act, sym, masked in CASES:
        g = torch.Generator().manual_seed(gs + blocksize)
        W = torch.randn(24, 128, generator=g)
        X = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.3
        X[:, 3] = 0  # a dead column
        stats = LayerStats(hessian=X.T @ X / X.shape[0], sq_norm=None, n_tokens=X.shape[0])
        mask = (torch.rand(W.shape, generator=g) > 0.5) if masked else None
        spec = QuantSpec(method="gptq", bits=3, group_size=gs, blocksize=blocksize, act_order=act, symmetric=sym)
        os.environ.pop("PRUNEQUANT_NO_TRITON", None)
        used = triton_gptq.available(W)
        fast = gptq_quantize(W, stats, spec, mask=mask)
        os.environ["PRUNEQUANT_NO_TRITON"] = "1"
        ref = gptq_quantize(W, stats, spec, mask=mask)
        out.append({
            "used": used,
            "same_codes": float((fast.quant.codes == ref.quant.codes).float().mean()),
            "err_fast": fast.info["error"], "err_ref": ref.info["error"],
            "scale_diff": float((fast.quant.scale - ref.quant.scale).abs().max()),
            "pruned_nonzero": bool(fast.weight[~mask].any()) if masked else False,
        })
    return out


JOINT_CASES = [
    (0.5, 0, 0, 32, 64, False),   # unstructured windows = blocks, dynamic groups inside them
    (0.5, 2, 4, 64, 64, False),   # 2:4, a window every 4 columns
    (0.3, 0, 0, 32, 48, True),    # act-order static groups, block not a power of two
]


def _compare_joint() -> list[dict]:
    import torch

    from prunequant.recipe import PruneSpec, QuantSpec
    from prunequant.solvers import triton_gptq
    from prunequant.solvers.base import LayerStats
    from prunequant.solvers.joint import joint_obs

    out = []
    for sp, n, m, gs, blocksize, act in JOINT_CASES:
        g = torch.Generator().manual_seed(gs + blocksize + n)
        W = torch.randn(24, 128, generator=g)
        X = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.3
        stats = LayerStats(hessian=X.T @ X / X.shape[0], sq_norm=None, n_tokens=X.shape[0])
        prune = PruneSpec(method="sparsegpt", sparsity=sp, n=n, m=m, blocksize=blocksize)
        quant = QuantSpec(method="gptq", bits=3, group_size=gs, blocksize=blocksize, act_order=act)
        os.environ.pop("PRUNEQUANT_NO_TRITON", None)
        used = triton_gptq.available(W)
        fast = joint_obs(W, stats, prune, quant)
        os.environ["PRUNEQUANT_NO_TRITON"] = "1"
        ref = joint_obs(W, stats, prune, quant)
        out.append({"used": used, "same_codes": float((fast.quant.codes == ref.quant.codes).float().mean()),
                    "same_mask": float((fast.mask == ref.mask).float().mean()),
                    "err_fast": fast.info["error"], "err_ref": ref.info["error"]})
    return out


def _interpreted(fn: str) -> list[dict]:
    """``fn()`` of this module run in a child process under Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PRUNEQUANT_NO_TRITON", None)
    code = f"import json, test_triton_gptq as t; print(json.dumps(t.{fn}()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


PRUNE_CASES = [(0.5, 0, 0, 64), (0.5, 2, 4, 64), (0.3, 0, 0, 48)]  # unstructured, 2:4, a ragged block


def _compare_prune() -> list[dict]:
    import torch

    from prunequant.recipe import PruneSpec
    from prunequant.solvers import triton_gptq
    from prunequant.solvers.base import LayerStats
    from prunequant.solvers.hessian import prepare_hessian
    from prunequant.solvers.obs import prune_columns
    from prunequant.solvers.prune import sparsegpt_prune

    out = []
    for sp, n, m, blocksize in PRUNE_CASES:
        g = torch.Generator().manual_seed(blocksize + n)
        W = torch.randn(40, 128, generator=g)
        X = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.3
        H = X.T @ X / X.shape[0]
        stats = LayerStats(hessian=H, sq_norm=None, n_tokens=X.shape[0])
        _, U, _ = prepare_hessian(W, H)
        keep = torch.rand(W.shape, generator=g) > sp
        seg = slice(16, 16 + blocksize)  # a segment as a strided view of W, as the sweep hands it over
        os.environ.pop("PRUNEQUANT_NO_TRITON", None)
        used = triton_gptq.available(W)
        Wf = W.clone()
        Ef = prune_columns(Wf[:, seg], U[seg, seg], keep[:, seg])
        fast = sparsegpt_prune(W, stats, PruneSpec(method="sparsegpt", sparsity=sp, n=n, m=m, blocksize=blocksize))
        os.environ["PRUNEQUANT_NO_TRITON"] = "1"
        Wr = W.clone()
        Er = prune_columns(Wr[:, seg], U[seg, seg], keep[:, seg])
        ref = sparsegpt_prune(W, stats, PruneSpec(method="sparsegpt", sparsity=sp, n=n, m=m, blocksize=blocksize))
        out.append({"used": used, "w_diff": float((Wf - Wr).abs().max()), "e_diff": float((Ef - Er).abs().max()),
                    "pruned_zero": bool((Wf[:, seg][~keep[:, seg]] == 0).all()),
                    "outside_same": bool(torch.equal(Wf[:, :16], W[:, :16]) and torch.equal(Wf[:, 16 + blocksize:],
                                                                                           W[:, 16 + blocksize:])),
                    "same_mask": float((fast.mask == ref.mask).float().mean()),
                    "err_fast": fast.info["error"], "err_ref": ref.info["error"]})
    return out


def test_triton_pruning_loop_matches_torch_loop():
    results = _interpreted("_compare_prune")
    for case, r in zip(PRUNE_CASES, results):
        assert r["used"] and r["pruned_zero"] and r["outside_same"], (case, r)
        assert r["w_diff"] < 1e-4 and r["e_diff"] < 1e-4, (case, r)
        assert r["same_mask"] > 0.995, (case, r)
        assert r["err_fast"] == pytest.approx(r["err_ref"], rel=2e-3), (case, r)


def test_triton_loop_matches_torch_loop():
    results = _interpreted("_compare_all")
    for case, r in zip(CASES, results):
        assert r["used"], case
        assert r["same_codes"] > 0.995, (case, r)  # float rounding may flip a rare near-tie code
        assert r["err_fast"] == pytest.approx(r["err_ref"], rel=2e-3), (case, r)
        assert r["scale_diff"] < 1e-4, (case, r)
        assert not r["pruned_nonzero"], (case, r)


def test_triton_loop_matches_torch_loop_in_joint_solver():
    results = _interpreted("_compare_joint")
    for case, r in zip(JOINT_CASES, results):
        assert r["used"], case
        assert r["same_mask"] > 0.995 and r["same_codes"] > 0.995, (case, r)
        assert r["err_fast"] == pytest.approx(r["err_ref"], rel=2e-3), (case, r)


def test_kernel_reads_no_module_globals():
    """Compiled Triton (unlike its CPU interpreter) rejects non-constexpr module globals inside a kernel
    (seen on the H100 with Triton 3.6): every name the kernel reads is a parameter, a local, tl/range, or
    another @triton.jit function of the module."""
    from prunequant.solvers import triton_gptq

    for fn in (triton_gptq._gptq_cols_kernel, triton_gptq._prune_cols_kernel, triton_gptq._row_tile):
        _check_globals(fn, triton_gptq)


def _check_globals(fn, module):
    import triton
    import ast
    import inspect

    src = inspect.getsource(getattr(fn, "fn", fn))
    tree = ast.parse(src.lstrip() if not src.startswith(" ") else "if True:\n" + src)
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    params = {a.arg for a in func.args.args}
    body = [n for stmt in func.body for n in ast.walk(stmt)]  # not the @triton.jit decorator
    stored = {n.id for n in body if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    loaded = {n.id for n in body if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    jitted = {n for n in loaded if isinstance(getattr(module, n, None), triton.runtime.JITFunction)}
    assert loaded - params - stored - jitted <= {"tl", "range"}, loaded - params - stored - jitted
