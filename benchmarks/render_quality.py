"""Print the Markdown tables of whatever quality_suite.py configurations have finished (for BENCHMARKS.md).

    python benchmarks/render_quality.py [RESULTS_SUBDIR]      (default: quality; the H100 run: quality_h100)
"""
import json
import sys
from pathlib import Path

from common import RESULTS, markdown_table
from quality_suite import GROUPS

done = {p.stem: json.loads(p.read_text()) for p in (RESULTS / (sys.argv[1] if len(sys.argv) > 1 else "quality")).glob("*.json")}
for group, configs in GROUPS.items():
    rows = {k: done[k] for k in configs if k in done}
    missing = [k for k in configs if k not in done]
    print(f"\n#### {group}\n")
    if rows:
        print(markdown_table(rows))
    if missing:
        print(f"\nNot run (time): {', '.join(missing)}")
