"""Per-block engine checkpoints for resuming, in safetensors and JSON only (nothing executes on load)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .background import OneBehind, arrived, host_copies
from .errors import PrunequantError
from .solvers.base import LayerRecord, LayerResult, QuantState, StoredResult

if TYPE_CHECKING:
    from .engine import EngineReport
    from .models import ArchSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 2


class CheckpointError(PrunequantError):
    """A work directory whose files are not checkpoints this version wrote."""


def _flatten(obj, key: str, tensors: dict):
    """JSON-able copy of ``obj`` with every tensor moved into ``tensors`` under a unique key."""
    if torch.is_tensor(obj):
        tensors[key] = obj  # copied later, each key on its own (stacked solves share g_idx)
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"{key}: only string keys can be checkpointed")
        return {k: _flatten(v, f"{key}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"{key}: cannot checkpoint a {type(obj).__name__}")


def _restore(obj, tensors: dict):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _restore(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v, tensors) for v in obj]
    return obj


def _state_to_plain(state: LayerResult) -> dict:
    q = state.quant
    return {"mask": state.mask, "info": state.info,
            "quant": None if q is None else {k: getattr(q, k) for k in q.__dataclass_fields__}}


def _state_from_plain(d: dict) -> LayerResult:
    q = d.get("quant")
    return StoredResult(weight=None, mask=d.get("mask"), quant=None if q is None else QuantState(**q),
                        info=d.get("info") or {})


class Checkpoint:
    """Per-block checkpoints so an interrupted run resumes where it stopped."""

    def __init__(self, work_dir, fingerprint: str):
        self.dir = Path(work_dir)
        self.fingerprint = fingerprint
        self.meta = self.dir / "progress.json"
        self._thread: OneBehind | None = None

    def _refuse(self, path: Path, why: str) -> CheckpointError:
        return CheckpointError(f"resume checkpoint {path} is not one prunequant wrote ({why}); delete {self.dir} "
                               "to start over")

    def done(self) -> int:
        if not self.meta.is_file():
            return 0
        try:
            meta = json.loads(self.meta.read_text())
            fp, done = meta["fingerprint"], int(meta["done"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise self._refuse(self.meta, f"unreadable: {type(e).__name__}") from None
        if fp != self.fingerprint:
            log.warning("work dir %s belongs to a different run; starting over", self.dir)
            shutil.rmtree(self.dir, ignore_errors=True)
            return 0
        return done

    def save_block(self, i, block, report: EngineReport, arch: ArchSpec | str):
        """Copy block i to the host now and write it on a worker thread; ``wait``/``close`` await the disk."""
        prefix = f"{arch if isinstance(arch, str) else arch.blocks}.{i}."
        tensors: dict[str, torch.Tensor] = {}
        layers = {k: v.to_dict() for k, v in report.layers.items() if k.startswith(prefix)}
        states = {k: _state_to_plain(v) for k, v in report.states.items() if k.startswith(prefix)}
        plain = {"version": FORMAT_VERSION, "layers": _flatten(layers, "layers", tensors),
                 "states": _flatten(states, "states", tensors)}
        if self._thread is None:
            self._thread = OneBehind("checkpoint-writer")
        sd = None if block is None else host_copies(block.state_dict(), clone=False)
        self._thread.submit(self._write_block, i, sd, host_copies(tensors), plain)

    def _write_block(self, i, sd, tensors, plain) -> None:
        from safetensors.torch import save_file

        sd, tensors = arrived(sd), arrived(tensors)
        self.dir.mkdir(parents=True, exist_ok=True)
        if sd is not None:
            save_file(sd, str(self.dir / f"block_{i}.safetensors"))
        save_file(tensors, str(self.dir / f"results_{i}.safetensors"))
        (self.dir / f"results_{i}.json").write_text(json.dumps(plain))
        tmp = self.meta.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": i + 1, "version": FORMAT_VERSION}))
        tmp.replace(self.meta)  # the block counts as done only once all its files are complete

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.wait()

    def close(self, failing: bool = False) -> None:
        """Wait for the last block's files (``failing``: and drop a write error, another error is on its way)."""
        if self._thread is None:
            return
        if failing:
            self._thread.drain()
        self._thread.close()
        self._thread = None

    def load_block(self, i, block, report: EngineReport):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if block is not None:
            path = self.dir / f"block_{i}.safetensors"
            try:
                block.load_state_dict(load_file(str(path)))
            except (OSError, SafetensorError, RuntimeError) as e:
                raise self._refuse(path, str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None
        path = self.dir / f"results_{i}.safetensors"
        try:
            tensors = load_file(str(path))
            path = self.dir / f"results_{i}.json"
            plain = json.loads(path.read_text())
            if plain.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {plain.get('version')!r}")
            report.layers.update({k: LayerRecord(**v) for k, v in _restore(plain["layers"], tensors).items()})
            report.states.update({k: _state_from_plain(v) for k, v in _restore(plain["states"], tensors).items()})
        except (OSError, SafetensorError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise self._refuse(path, str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None

    def write_json(self, name: str, obj) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"{name}.tmp"
        tmp.write_text(json.dumps(obj, default=str))
        tmp.replace(self.dir / name)

    def read_json(self, name: str):
        p = self.dir / name
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError):
            return None

    def clear(self):
        clear_work_dir(self.dir)


def clear_work_dir(path: str | Path) -> None:
    """Remove a run's checkpoints, and the output's work root once no other run's are left in it."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    parent = path.parent
    if parent.name.endswith(".prunequant-work") and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
