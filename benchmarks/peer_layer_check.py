"""Layer-level side by side with llm-compressor: the same W and the same H (real SmolLM2 layers, real
calibration inputs of the dense model), each side's solver once, compared on the layer objective
tr(ΔW H ΔWᵀ). Isolates solver differences from pipeline differences, and runs in minutes.

    python benchmarks/peer_layer_check.py [--peer-python /work/peer-venv/bin/python]

Also runs two plain reference GPTQs that differ ONLY in when a group's grid is fitted: on the original
weights before the sweep (static, what llm-compressor's observer does) or at the group's first column on
the weights as updated so far (dynamic, the reference GPTQ and prunequant). Writes
benchmarks/results/peer_layer_check.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from prunequant.data import calibration_ids, load_text
from prunequant.models import load_model
from prunequant.recipe import LayerPlan, PruneSpec, QuantSpec
from prunequant.solvers import solve_layer
from prunequant.solvers.base import LayerStats
from prunequant.solvers.grid import fit_grid
from prunequant.solvers.hessian import layer_objective, prepare_hessian

HERE = Path(__file__).resolve().parent
LAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def reference_gptq(W, H, bits: int, gs: int, static: bool, damp=0.01, bs=128) -> torch.Tensor:
    """Plain GPTQ, symmetric grid; ``static`` fits every group on the original W, else at its first column."""
    Wp, U, _ = prepare_hessian(W, H, damp=damp)
    maxq, (rows, cols) = 2**bits - 1, Wp.shape
    if static:
        S, Z = fit_grid(Wp, bits, gs, True)
    Q = torch.zeros_like(Wp)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1, E = Wp[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=Wp.dtype)
        for i in range(i2 - i1):
            c = i1 + i
            if static:
                s, z = S[:, c // gs], Z[:, c // gs]
            elif c % gs == 0:  # the group as updated so far (its part right of the block lacks the lazy update)
                right = Wp[:, i2:c + gs] - E[:, :i] @ U[i1:c, i2:c + gs]
                s1, z1 = fit_grid(torch.cat([W1[:, i:i + gs], right], 1), bits, 0, True)
                s, z = s1[:, 0], z1[:, 0]
            w = W1[:, i]
            q = s * (torch.clamp(torch.round(w / s) + z, 0, maxq) - z)
            Q[:, c] = q
            e = (w - q) / U[c, c]
            W1[:, i:] -= e[:, None] * U[c, c:i2][None, :]
            E[:, i] = e
        Wp[:, i2:] -= E @ U[i1:i2, i2:]
    return Q


def capture(base: str, blocks: list[int], samples: int, seq_len: int, seed: int) -> dict:
    model, tok = load_model(base)
    ids = calibration_ids(tok, load_text("wiki", "calib"), samples, seq_len, seed)
    names = [f"model.layers.{b}.{n}" for b in blocks for n in LAYERS]
    acc: dict = {}

    def hook(name):
        def f(_m, args, _o):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            h, n = acc.get(name, (0, 0))
            acc[name] = (h + x.t() @ x, n + x.shape[0])
        return f

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    model.model.layers = model.model.layers[: max(blocks) + 1]
    with torch.no_grad():
        for i in range(0, samples, 4):
            model.model(ids[i: i + 4])
    for h in handles:
        h.remove()
    return {n: {"W": model.get_submodule(n).weight.detach().clone(), "H": (acc[n][0] / acc[n][1]).float(),
                "n": acc[n][1]} for n in names}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-python", default="/work/peer-venv/bin/python")
    ap.add_argument("--blocks", default="0,10,20")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "peer_layer_check.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peer_llmcompressor import BLOCK, DAMP, GROUP, base_checkpoint

    layers = capture(str(base_checkpoint()), [int(b) for b in args.blocks.split(",")], args.samples, args.seq_len, 0)
    with tempfile.TemporaryDirectory(prefix="peer-layers-") as tmp:
        job = {"mode": "layers", "layers": f"{tmp}/layers.pt", "out": f"{tmp}/theirs.pt", "bits": [4, 3],
               "group_size": GROUP, "block_size": BLOCK, "damp": DAMP, "threads": args.threads}
        torch.save({n: {"W": d["W"], "H": d["H"]} for n, d in layers.items()}, job["layers"])
        Path(f"{tmp}/job.json").write_text(json.dumps(job))
        subprocess.run([args.peer_python, str(HERE / "_peer_worker.py"), f"{tmp}/job.json"], check=True,
                       env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": str(args.threads)},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        theirs = torch.load(job["out"])
    rows = []
    for name, d in layers.items():
        W, H = d["W"], d["H"]
        stats = LayerStats(hessian=H, sq_norm=None, n_tokens=d["n"])

        def obj(X):
            return layer_objective(W.double(), X.detach().double(), H.double())

        for bits in (4, 3):
            spec = QuantSpec(method="gptq", bits=bits, group_size=GROUP, symmetric=True, damp=DAMP, blocksize=BLOCK)
            ours = solve_layer(W.clone(), stats, LayerPlan(quant=spec)).weight
            rows.append({"layer": name, "method": f"GPTQ W{bits} g{GROUP} sym", "ours": obj(ours),
                         "theirs": obj(theirs[f"{name}|gptq{bits}"]),
                         "ref_dynamic": obj(reference_gptq(W.clone(), H, bits, GROUP, False)),
                         "ref_static": obj(reference_gptq(W.clone(), H, bits, GROUP, True))})
        for tag, spec in (("sgpt50", PruneSpec("sparsegpt", 0.5)), ("sgpt24", PruneSpec("sparsegpt", n=2, m=4))):
            ours = solve_layer(W.clone(), stats, LayerPlan(prune=spec)).weight
            rows.append({"layer": name, "method": spec.describe(), "ours": obj(ours), "theirs": obj(theirs[f"{name}|{tag}"])})
    out = Path(args.out)
    out.write_text(json.dumps({"calibration": {"samples": args.samples, "seq_len": args.seq_len, "seed": 0},
                               "rows": rows}, indent=2))
    lines = ["# Layer-level check: same W and H, each solver once (layer objective tr(ΔW H ΔWᵀ), lower is better)", "",
             f"SmolLM2-135M blocks {args.blocks}, H from {args.samples} x {args.seq_len} wiki calib tokens through the "
             "dense model. ref_dynamic / ref_static: plain GPTQ, grid fitted at each group's first column on the "
             "updated weights / up front on the original weights.", "",
             "| layer | method | ours / theirs | ref_dynamic / theirs | ref_static / theirs |", "|---|---|---|---|---|"]
    for r in rows:
        f = [f"{r['ours'] / r['theirs']:.4f}"] + [f"{r[k] / r['theirs']:.4f}" if k in r else "" for k in ("ref_dynamic", "ref_static")]
        lines.append(f"| {r['layer'].replace('model.layers.', '')} | {r['method']} | " + " | ".join(f) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
