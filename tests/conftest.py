import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)  # small ops: 1 thread is far faster on a loaded 2-core box


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # keep the embedded-corpus cache shared across tests but separate from the user's
    monkeypatch.setenv("PRUNEQUANT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
