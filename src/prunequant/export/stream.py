"""Writing an export while the model is being compressed, block by block (docs/internals.md)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..models import arch_of, get_blocks
from .compact import CompactWriter
from .common import shard_order
from .ctensors import CompressedTensorsWriter
from .dense import DenseWriter
from .integrity import ExportError, atomic_output

WRITERS = {"compact": CompactWriter, "compressed-tensors": CompressedTensorsWriter, "dense": DenseWriter}


def _dedup(items):
    """(kept items, tied map) for (name, tensor) pairs, one entry per storage (as common.model_tensors)."""
    seen, tied, out = {}, {}, []
    for k, t in items:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            tied[k] = seen[key]
            continue
        seen[key] = k
        out.append((k, t))
    return out, tied


class StreamingExport:
    """An export in progress: ``add_block`` as blocks finish, then ``finish`` or ``abort``."""

    def __init__(self, model: nn.Module, states: dict, out_dir: str | Path, fmt: str = "dense",
                 dtype: torch.dtype | None = None, overwrite: bool = False, **opts):
        if fmt not in WRITERS:
            raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(WRITERS)}")
        self.model = model
        self.prefix = arch_of(model).blocks + "."
        self.dtype = dtype or next(p for p in model.parameters() if p.is_floating_point()).dtype
        keys = [k for k in model.state_dict(keep_vars=True)]
        first = next(i for i, k in enumerate(keys) if k.startswith(self.prefix))
        self.before = [k for k in keys[:first] if not k.startswith(self.prefix)]
        self.after = [k for k in keys[first:] if not k.startswith(self.prefix)]
        self._ctx = atomic_output(out_dir, overwrite)
        self.tmp = self._ctx.__enter__()
        try:
            self.writer = WRITERS[fmt](self.tmp, states, self.dtype, **opts)
        except BaseException as e:
            self.abort(e)
            raise
        _, last = shard_order(model)
        self.writer.writer.set_last_group(last)
        self.n_blocks = len(get_blocks(model))
        self.tied: dict[str, str] = {}
        self.blocks_written = 0
        self._outside_tied = None

    def _outside(self, keys: list[str]) -> None:
        sd = self.model.state_dict(keep_vars=False)
        if self._outside_tied is None:  # ties among the tensors outside the blocks (embeddings and head)
            items, self._outside_tied = _dedup([(k, sd[k]) for k in self.before + self.after])
            self._kept = {k for k, _ in items}
            self.tied.update(self._outside_tied)
        for k in keys:
            if k in self._kept:
                self.writer.add(k, sd[k], self.model.get_submodule)

    def add_block(self, i: int, block: nn.Module) -> None:
        if self.blocks_written == 0:  # nothing outside the blocks changes while they are compressed
            self._outside(self.before + self.after)
        base = f"{self.prefix}{i}."
        items, tied = _dedup(list(block.state_dict(keep_vars=False).items()))
        self.tied.update({base + k: base + v for k, v in tied.items()})
        for k, t in items:
            self.writer.add(base + k, t, lambda name: block.get_submodule(name[len(base):]))
        self.blocks_written += 1
        for name in [n for n in self.writer.states if n.startswith(base)]:  # written: codes and masks can go
            del self.writer.states[name]
        if i == self.n_blocks - 2:  # written while the last block is compressed (as ShardWriter.add would split)
            self.writer.writer.split()
        elif i == self.n_blocks - 1:
            self.writer.writer.flush()

    def finish(self, tokenizer=None, extra_files: dict | None = None) -> Path:
        try:
            if self.blocks_written == 0:
                self._outside(self.before + self.after)
            self.writer.close(self.model, self.tied, tokenizer, extra_files)
        except BaseException as e:
            self.abort(e)
            raise
        self._ctx.__exit__(None, None, None)
        return Path(self.tmp)

    def abort(self, exc: BaseException | None = None) -> None:
        """Remove the partial output (nothing half-written is left)."""
        exc = exc or ExportError("export aborted")
        shards = getattr(getattr(self, "writer", None), "writer", None)
        if shards is not None:  # no shard write may outlive the removal of the output
            shards.abort()
        try:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException:  # noqa: BLE001 - the context re-raises what it was given
            pass
