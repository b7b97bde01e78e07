"""Global-error joint allocation vs layer-wise allocation vs uniform GPTQ, at one average bit budget.

Perplexity protocol: held-out embedded Wikipedia text ('wiki' eval split), non-overlapping windows of
--seq-len tokens, token-level exp(mean NLL) (prunequant.evaluate.perplexity). Calibration: the disjoint
'wiki' calib split, --calib-n random windows of --calib-len tokens (seed 0).
Bits: stored bits per original block-linear weight (codes + fp16 scales + zero points + channel maps +
fp16 biases added by compensation); embeddings and norms are not counted.

    python benchmarks/global_vs_layerwise.py --bits 2.5 --steps 40 --eval-tokens 4096
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=float, nargs="+", default=[2.5])
    ap.add_argument("--low", type=int, default=2)
    ap.add_argument("--high", type=int, default=4)
    ap.add_argument("--no-prune", action="store_true", help="precision only (no structural choice)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--gqa", default="query", choices=("group", "query"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--hypernet", action="store_true")
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--learn-batch", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--uniform", type=int, nargs="*", default=[2, 3], help="uniform GPTQ bit widths to compare")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--ids", default=None, help="a .pt with {'calib': (N, L), 'eval': (T,)} token ids, made by "
                                                "--save-ids (for machines without the text packages)")
    ap.add_argument("--save-ids", default=None, help="write the calibration / evaluation ids here and exit")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from prunequant.engine import compress_model
    from prunequant.evaluate.perplexity import perplexity
    from prunequant.models import load_model
    from prunequant.recipe import QuantSpec, Recipe
    from prunequant import structural as S

    t0 = time.time()
    model, tok = load_model(args.model, device=args.device)
    if args.ids:
        saved = torch.load(args.ids)
        calib, ev = saved["calib"][: args.calib_n, : args.calib_len], saved["eval"][: args.eval_tokens]
    else:
        from prunequant.data import calibration_ids, load_text, tokenize

        calib_text, eval_text = load_text("wiki", "calib"), load_text("wiki", "eval")
        calib = calibration_ids(tok, calib_text, args.calib_n, args.calib_len, seed=0)
        ev = tokenize(tok, eval_text, max_tokens=args.eval_tokens)
    if args.save_ids:
        torch.save({"calib": calib, "eval": ev}, args.save_ids)
        return

    def ppl(m):
        return round(perplexity(m, ev, args.seq_len, batch_size=4, progress=False)["perplexity"], 3)

    results = {"model": args.model, "protocol": {"eval": f"wiki eval split, first {ev.numel()} tokens, "
                                                          f"windows of {args.seq_len}",
                                                 "calib": f"wiki calib split, {args.calib_n}x{args.calib_len} tokens",
                                                 "group_size": args.group_size}, "rows": []}
    base_ppl = ppl(model)
    results["rows"].append({"method": "uncompressed (dequantized Q4_1 GGUF)", "bits": 16.0, "ppl": base_ppl})
    print(f"uncompressed ppl {base_ppl} ({time.time() - t0:.0f}s)", flush=True)
    spec_kw = dict(group_size=args.group_size)
    for b in args.uniform:
        m = copy.deepcopy(model)
        q = QuantSpec("gptq", bits=b, group_size=args.group_size)
        compress_model(m, calib, Recipe(quant=q).plan_for, device=args.device, progress=False)
        bits = b + (16 + b) / args.group_size if args.group_size else b
        results["rows"].append({"method": f"uniform GPTQ {b}-bit g{args.group_size}", "bits": round(bits, 4),
                                "ppl": ppl(m)})
        print(results["rows"][-1], f"({time.time() - t0:.0f}s)", flush=True)
        del m
    choices = ((("prune", 0),) if not args.no_prune else ()) + (("low", args.low), ("high", args.high))
    for target in args.bits:
        t1 = time.time()
        glob = S.learn_global_allocation(model, calib, target, choices=choices, steps=args.steps, lr=args.lr,
                                         gqa=args.gqa, hypernet=args.hypernet, batch_size=args.learn_batch,
                                         log_every=max(1, args.steps // 8), **spec_kw)
        learn_s = time.time() - t1
        lw = glob.info.pop("layerwise")
        for name, alloc in (("layer-wise allocation", lw), ("global-error allocation", glob)):
            kl = S.allocation_kl(model, alloc, calib[:8], batch_size=4)
            m = copy.deepcopy(model)
            rep = S.apply_allocation(m, alloc, calib, method="gptq")
            row = {"method": f"{name} {args.low}/{args.high}{'' if args.no_prune else '/prune'} + GPTQ",
                   "target": target, "bits": round(rep.avg_bits, 4), "ppl": ppl(m), "calib_kl_rtn_sim": round(kl, 4),
                   "kept_heads": sum(int(la.keep_heads.sum()) for la in alloc.layers),
                   "kept_mlp": sum(int(la.keep_mlp.sum()) for la in alloc.layers),
                   "layers": alloc.summary()["layers"]}
            if name.startswith("global"):
                row["learn_seconds"] = round(learn_s, 1)
                row["steps"] = args.steps
            results["rows"].append(row)
            print({k: v for k, v in row.items() if k != "layers"}, f"({time.time() - t0:.0f}s)", flush=True)
            del m
    results["seconds"] = round(time.time() - t0, 1)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps([{k: v for k, v in r.items() if k != "layers"} for r in results["rows"]], indent=1))


if __name__ == "__main__":
    main()
