"""Issue 2 rows: SmolLM2-135M baseline, RTN 8/4/3-bit and magnitude 50% perplexity.

python benchmarks/foundation.py   (CPU; writes benchmarks/results/foundation/*.json and prints a Markdown table)
"""
from common import markdown_table, run_configs

from prunequant.recipe import PruneSpec, QuantSpec, Recipe

CONFIGS = {
    "baseline": None,
    "rtn8_g128": Recipe(quant=QuantSpec("rtn", 8, 128, ragged=True)),
    "rtn4_g128": Recipe(quant=QuantSpec("rtn", 4, 128, ragged=True)),
    "rtn4_g32": Recipe(quant=QuantSpec("rtn", 4, 32)),
    "rtn3_g128": Recipe(quant=QuantSpec("rtn", 3, 128, ragged=True)),
    "rtn4_pc": Recipe(quant=QuantSpec("rtn", 4, 0)),
    "magnitude50": Recipe(prune=PruneSpec("magnitude", 0.5)),
}

if __name__ == "__main__":
    res = run_configs("smollm2-135m", CONFIGS, "foundation")
    print(markdown_table(res))
