"""Per-block checkpoints of the engine, so that an interrupted run resumes where it stopped."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .engine import EngineReport
    from .models import ArchSpec

log = logging.getLogger(__name__)


class _Checkpoint:
    """Per-block checkpoints so an interrupted run resumes where it stopped."""

    def __init__(self, work_dir, fingerprint: str):
        self.dir = Path(work_dir)
        self.fingerprint = fingerprint
        self.meta = self.dir / "progress.json"

    def done(self) -> int:
        if not self.meta.is_file():
            return 0
        try:
            meta = json.loads(self.meta.read_text())
        except json.JSONDecodeError:
            return 0
        if meta.get("fingerprint") != self.fingerprint:
            log.warning("work dir %s belongs to a different run; starting over", self.dir)
            shutil.rmtree(self.dir, ignore_errors=True)
            return 0
        return int(meta.get("done", 0))

    def save_block(self, i, block, report: EngineReport, arch: ArchSpec):
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        prefix = f"{arch.blocks}.{i}."
        sd = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        save_file(sd, str(self.dir / f"block_{i}.safetensors"))
        mine = {k: v for k, v in report.layers.items() if k.startswith(prefix)}
        states = {k: v for k, v in report.states.items() if k.startswith(prefix)}
        torch.save({"layers": mine, "states": states}, self.dir / f"block_{i}.pt")
        tmp = self.meta.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": i + 1}))
        tmp.replace(self.meta)

    def load_block(self, i, block, report: EngineReport):
        from safetensors.torch import load_file

        sd = load_file(str(self.dir / f"block_{i}.safetensors"))
        block.load_state_dict(sd)
        saved = torch.load(self.dir / f"block_{i}.pt", weights_only=False)
        report.layers.update(saved["layers"])
        report.states.update(saved["states"])

    def clear(self):
        shutil.rmtree(self.dir, ignore_errors=True)
