"""Run a test module's function in a fresh Python with Triton's CPU interpreter on (it must be set before
Triton is imported) and return what the function returned, through JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def interpreted(module: str, call: str, timeout: int = 900):
    pytest.importorskip("triton")
    here = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(here), str(here.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    code = f"import json, torch; torch.set_num_threads(1); import {module} as t; print(json.dumps(t.{call}))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
