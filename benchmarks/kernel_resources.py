"""Registers, spills and shared memory of the runtime's kernel tiles on a CUDA architecture, without a GPU:
each tuner candidate of a layer shape is launched through the real dispatch with the launches captured,
compiled by Triton's CUDA backend and measured by ptxas (prunequant.runtime.ptx); then prefill's
dequantization kernel (rows "prefill"). Tiles that spill or need more than ~128 registers per thread hold
few warps per SM; a GPU run decides, this only says why. With --loop-mix each row also gets the machine
instructions of the kernel's k-loop body (SASS via ptxas and nvdisasm): the count per trip, per weight word
a thread handles, and the opcode mix — what the one-row GEMV issues for each 32-bit word it reads.

    PYTHONPATH=src:benchmarks python benchmarks/kernel_resources.py --k 4096 --n 4096 --rows 1 8 32 \\
        [--sparse24] [--arch 90] [--loop-mix] [--out F]
"""
from __future__ import annotations

import argparse
import json

import torch

from prunequant.runtime import build_quant_linear
from prunequant.runtime import triton_wmm as tw
from prunequant.runtime.ptx import captured, compile_launch, loop_mix, resources
from runtime_speed import prune24, rtn


def segment(n: int, k: int, bits: int, group_size: int, sparse24: bool):
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    q = rtn(W, bits, group_size, False, prune24(W) if sparse24 else None)
    ql, _ = build_quant_linear([(q, None)], k, n, None, device="cpu", dtype=torch.bfloat16,
                               prefer={bits: ["sparse24" if sparse24 else "packed"]})
    return ql.segs[0].kernel_view() if sparse24 else ql.segs[0]


def candidates(m: int, n: int, seg, sparse24: bool) -> list[dict]:
    if sparse24:
        return [tw.ROWS_DEFAULT] + tw._gemv_rows_candidates(m, n, seg)
    out = [tw.launch_config(m, n)] + tw._gemv_rows_candidates(m, n, seg)
    out += tw._gemv_candidates(m, n, seg) if m <= 8 else []
    out += tw._sdot_candidates(m, n, seg) + tw._pdot_candidates(m, n, seg) if m > 1 else []
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--sparse24", action="store_true")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--loop-mix", action="store_true", help="also the SASS instructions of each k-loop trip")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    seg = segment(args.n, args.k, args.bits, args.group_size, args.sparse24)
    rows = []

    def measure(launch, row: dict) -> None:
        try:
            compiled = compile_launch(*launch, arch=args.arch)
            row.update(resources(compiled, args.arch))
            if args.loop_mix:
                mix = loop_mix(compiled, args.arch)
                c = row["cfg"]
                words = c["BN"] * c["BW"] / (32 * c.get("num_warps", 4)) if "BW" in c and "BN" in c else None
                row.update(loop_instructions=mix["instructions"], loop_ops=dict(list(mix["ops"].items())[:8]),
                           per_word=round(mix["instructions"] / words, 1) if words else None)
        except Exception as e:  # noqa: BLE001 - a tile that does not compile is a row too
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(row), flush=True)
        rows.append(row)

    for m in args.rows:
        x = torch.randn(m, args.k).to(torch.bfloat16)
        seen = set()
        for c in candidates(m, args.n, seg, args.sparse24):
            key = json.dumps({k: v for k, v in c.items() if k != "SPLIT"}, sort_keys=True)
            if key in seen:  # a k-split changes the grid, not the compiled kernel
                continue
            seen.add(key)
            with captured() as launches:
                try:
                    tw.run(x, [seg], args.n, None, c)
                except ValueError:  # a tile this shape does not take
                    continue
            measure(launches[0], {"rows": m, "cfg": c})
    with captured() as launches:  # prefill's dequantization into a bf16 buffer
        tw.dequantize_into(seg, torch.zeros(args.n, args.k, dtype=torch.bfloat16))
    for kernel, a, kw in launches:
        measure((kernel, a, kw), {"rows": "prefill", "cfg": {"kind": "dequant", "kernel": kernel.fn.__name__}})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
