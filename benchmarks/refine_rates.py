"""Issue 19, CPU reduced protocol: which refinement learning rates help, judged on held-out calibration windows.

    python benchmarks/refine_rates.py [K] ['{"name": {RefineSpec fields} | null, ...}'] [q2,s50q4,...]

A recipe is a name of RECIPES or PRUNE+QUANT in the CLI's syntax, e.g. ``sparsegpt:0.5+gptq:4:g128:actorder``.

The first K decoder blocks of SmolLM2-135M (final norm and head kept), 24 calibration windows x 256 tokens
(wiki calibration split, seed 0): the first 16 calibrate and refine, the last 8 judge (relative error of the last
hidden state, top-64 KL of the logits against the uncompressed truncated model). No evaluation text is read.
One JSON line per (recipe, variant); ``null`` = one-shot.
"""
import copy
import json
import sys
import time

import torch

from prunequant.data import calibration_ids, load_text
from prunequant.engine import compress_model
from prunequant.models import load_model
from prunequant.recipe import PruneSpec, QuantSpec, Recipe, RefineSpec, parse_prune, parse_quant
from prunequant.refine import BlockRefiner, global_refine, teacher_topk
from prunequant.refine.global_kl import calib_kl

K = int(sys.argv[1]) if len(sys.argv) > 1 else 6
VARIANTS = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {"one-shot": None, "lr_scale 1e-3": {"lr_scale": 1e-3},
                                                              "lr_scale 2e-2": {"lr_scale": 2e-2}}
RECIPE_NAMES = sys.argv[3].split(",") if len(sys.argv) > 3 else ["q2"]
Q = lambda b: QuantSpec("gptq", b, 128, ragged=True)  # noqa: E731
RECIPES = {"q2": Recipe(quant=Q(2)), "s50q4": Recipe(prune=PruneSpec("sparsegpt", 0.5), quant=Q(4))}


def recipe(name: str) -> Recipe:
    if name in RECIPES:
        return RECIPES[name]
    prune, _, quant = name.rpartition("+")
    return Recipe(prune=parse_prune(prune) if prune else None, quant=parse_quant(quant))


@torch.no_grad()
def hidden(m, x):
    return m.model(x).last_hidden_state


def main():
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    model.model.layers = model.model.layers[:K]
    model.config.num_hidden_layers = K
    model.eval()
    ids = calibration_ids(tok, load_text("wiki", "calib"), 24, 256, 0)
    cal, held = ids[:16], ids[16:]
    teacher_held = teacher_topk(model, held, 64, 4, "cpu")
    ref_h = hidden(model, held)
    for rname in RECIPE_NAMES:
        for vname, kw in VARIANTS.items():
            m = copy.deepcopy(model)
            spec = None if kw is None else RefineSpec(**{"mode": "blockwise", "steps": 40, **kw})
            hook = BlockRefiner(spec) if spec and spec.blockwise else None
            t0 = time.time()
            rep = compress_model(m, cal, recipe(rname).plan_for, device="cpu", batch_size=4, progress=False,
                                 block_hook=hook)
            g = None
            if spec and spec.global_stage:
                g = global_refine(m, cal, rep.states, teacher_topk(model, cal, 64, 4, "cpu"), spec, batch_size=4,
                                  device="cpu")
            h = hidden(m, held)
            print(json.dumps({"recipe": rname, "variant": vname, "K": K,
                              "held_err": round(float((h - ref_h).pow(2).sum() / ref_h.pow(2).sum()), 5),
                              "held_kl": round(calib_kl(m, held, teacher_held, 4, "cpu"), 5),
                              "seconds": round(time.time() - t0, 1),
                              "blocks": [(round(b["error_before"], 4), round(b["error_after"], 4))
                                         for b in (hook.log if hook else [])],
                              "global": g and {k: g.get(k) for k in ("kl_before", "kl_after", "curve")}}), flush=True)


if __name__ == "__main__":
    main()
