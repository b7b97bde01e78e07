"""`prunequant generate` and `prunequant bench`; light, so that the command line starts fast (runtime/serve.py)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .errors import PrunequantError


DTYPE_NAMES = ("bfloat16", "float16", "float32")


def add_serve_parsers(sub) -> None:
    g = sub.add_parser("generate", help="generate text with a compressed model (packed kernels), streaming, "
                       "and print tokens/s")
    g.add_argument("dir", help="a compact export (loads packed) or any model spec (loads as stored)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--compile", action="store_true",
                   help="generate through torch.compile over a static cache (the first tokens wait for the compile)")
    _add_device_args(g)

    b = sub.add_parser("bench", help="prefill / decode tokens/s and peak memory of a compressed model "
                       "(next to a dense one with --against)")
    b.add_argument("dir")
    b.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    b.add_argument("--prompt-len", type=int, default=2048, help="prefill tokens per sequence")
    b.add_argument("--decode", type=int, default=128, help="greedy decode tokens per sequence")
    b.add_argument("--decode-prompt-len", type=int, default=256, help="prompt tokens before decoding")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--json", help="write the results to this JSON file")
    b.add_argument("--against", help="a model to measure the same way (e.g. the uncompressed one)")
    b.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (both models): fuses the norms, RoPE and adds between the "
                        "layers, most of a batch-1 step besides the weights; the first steps compile")
    _add_device_args(b)


def _add_device_args(p) -> None:
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="activation dtype (default: bfloat16 on CUDA, float32 on the CPU, which is exact; on a CPU "
                        "with AVX512-BF16, bfloat16 runs torch's int4/int8 kernels ~20x faster)")
    p.add_argument("--exact", action="store_true",
                   help="run packed layers by dequantize-per-call (bit-exact dequantized weights; slow)")
    p.add_argument("--kernel", choices=("auto", "triton", "tinygemm", "sparse24"), default="auto",
                   help="first choice for packed layers (auto: Triton on CUDA, torch's int4/int8 on the CPU; "
                        "tinygemm: torch's int4 kernel for 4-bit layers, fastest decode on an H200 but slow "
                        "prefill; sparse24: 2:4-sparse layers as kept codes + 2-bit positions, 0.76x the "
                        "memory of 4-bit codes); a layer it cannot hold falls back")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="load a directory whose files do not match its manifest")


def _device_of(a):
    import torch

    from .runtime.serve import DTYPES

    if a.device and torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        raise PrunequantError("--device cuda: no CUDA device is available here; use --device cpu")
    return a.device, DTYPES[a.dtype] if a.dtype else None


def cmd_generate(a) -> int:
    if a.max_new_tokens < 1:
        raise PrunequantError(f"--max-new-tokens {a.max_new_tokens} must be at least 1")
    from .runtime.serve import generate, load_for_serving

    device, dtype = _device_of(a)
    model, tok, rec = load_for_serving(a.dir, device, dtype, exact=a.exact, kernel=a.kernel, verify=a.verify)
    r = generate(model, tok, a.prompt, a.max_new_tokens, compile=a.compile)
    kinds = rec.get("modules") or {"dense": 1}
    compiled = f" after {r['compile_seconds']:.1f} s compiling" if r.get("compile_seconds") is not None else ""
    print(f"[{r['new_tokens']} tokens in {r['seconds']:.2f} s{compiled}: {r['tokens_per_s']} tokens/s; {rec['device']}, "
          f"{rec['dtype']}, {', '.join(f'{k}×{v}' for k, v in kinds.items())}]", file=sys.stderr)
    return 0


def cmd_bench(a) -> int:
    try:
        batches = [int(v) for v in a.batch.split(",") if v.strip()]
    except ValueError:
        raise PrunequantError(f"--batch {a.batch!r}: give comma-separated integers, e.g. 1,8") from None
    for flag, v in (("--batch", min(batches, default=0)), ("--prompt-len", a.prompt_len), ("--decode", a.decode),
                    ("--decode-prompt-len", a.decode_prompt_len), ("--repeats", a.repeats)):
        if v < 1:
            raise PrunequantError(f"{flag} {v} must be at least 1")
    import torch

    from .runtime.serve import bench, format_bench, load_for_serving, ratios

    def say(msg):
        print(f"[bench {time.perf_counter() - t0:.1f} s] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    device, dtype = _device_of(a)
    model, _, rec = load_for_serving(a.dir, device, dtype, exact=a.exact, kernel=a.kernel, verify=a.verify)
    say(f"loaded {a.dir} ({rec['device']}, {rec['dtype']})")
    res = {"model": a.dir, "load": rec}
    res.update(bench(model, batches, a.prompt_len, a.decode, a.decode_prompt_len, repeats=a.repeats,
                     compile=a.compile, say=say))
    print(format_bench(a.dir, res))
    if a.against:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        base, _, brec = load_for_serving(a.against, device, dtype, verify=a.verify)
        res["against"] = {"model": a.against, "load": brec}
        res["against"].update(bench(base, batches, a.prompt_len, a.decode, a.decode_prompt_len, repeats=a.repeats,
                                    compile=a.compile, say=say))
        res["ratios"] = ratios(res, res["against"])
        print(format_bench(a.against, res["against"]))
        r = res["ratios"]
        print("ratios (compressed / against): prefill " + ", ".join(f"b{b} {v:.2f}×" for b, v in r["prefill"].items())
              + " | decode " + ", ".join(f"b{b} {v:.2f}×" for b, v in r["decode"].items())
              + f" | weights {r['weights']:.2f}×")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0
