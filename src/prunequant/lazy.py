"""Lazy model I/O for local safetensors checkpoints, one decoder block at a time (docs/internals.md)."""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError
from .export.common import assign_tensor
from .models import ARCHITECTURES, arch_of, get_blocks
from .onload import BlockIO, trim_host_heap

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsFiles:
    """The tensors of a checkpoint directory, read on demand; every file is checked up front."""

    def __init__(self, root: str | Path, files: list[Path] | None = None):
        self.root = Path(root)
        self.owned = False
        if files is None:
            files = self._listed_files()
        self.entries: dict[str, tuple[Path, dict, int]] = {}  # key -> (file, header entry, data start)
        for f in files:
            header, start = _checked_header(f)
            for k, e in header.items():
                self.entries[k] = (f, e, start)

    def _listed_files(self) -> list[Path]:
        index = self.root / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ModelLoadError(f"{index} is unreadable ({e}); download or copy the checkpoint again") from None
            return [self.root / name for name in sorted(set(weight_map.values()))]
        if (self.root / SINGLE).is_file():
            return [self.root / SINGLE]
        raise ModelLoadError(f"{self.root} has neither {INDEX} nor {SINGLE}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, key: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        return _placed(self.read_host(key, pinned=torch.device(device).type == "cuda"), device, dtype)

    def read_host(self, key: str, pinned: bool = False) -> torch.Tensor:
        """Tensor ``key`` in host memory as stored (``pinned``: in page-locked memory, for a copy to the GPU)."""
        path, e, start = self.entries[key]
        lo, hi = e["data_offsets"]
        buf = torch.empty(hi - lo, dtype=torch.uint8, pin_memory=pinned)
        with open(path, "rb") as f:
            f.seek(start + lo)
            if f.readinto(buf.numpy()) != hi - lo:
                raise ModelLoadError(f"{path} is truncated (tensor {key} ends past the end of the file); "
                                     "download or copy it again")
        return buf.view(_DTYPES[e["dtype"]]).reshape(e["shape"])


def _placed(t: torch.Tensor, device, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.to(device, non_blocking=False)
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _checked_header(path: Path) -> tuple[dict, int]:
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing (named in {INDEX}); download or copy the checkpoint again")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > min(size - 8, 100 * 2**20):
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({e}); download or copy it again") from None
    header.pop("__metadata__", None)
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if size < 8 + n + end:
        raise ModelLoadError(f"{path} is truncated: {size} bytes, its header needs {8 + n + end}; "
                             "download or copy it again")
    return header, 8 + n


def lazy_eligible(where: str | Path) -> bool:
    """A local safetensors checkpoint of a known architecture with one attention kind per block?"""
    root = Path(where)
    if not root.is_dir() or not ((root / INDEX).is_file() or (root / SINGLE).is_file()):
        return False
    try:
        cfg = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if cfg.get("model_type") not in ARCHITECTURES or cfg.get("quantization_config"):
        return False
    if cfg.get("prunequant_layer_shapes") or cfg.get("prunequant_removed_blocks"):
        return False
    lt = cfg.get("layer_types")
    return not (lt and len(set(lt)) > 1)


def skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The architecture with parameters on the meta device and buffers (rotary tables) real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def load_lazy(where: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of a checkpoint directory with every block left on the meta device (see LazyBlocks)."""
    from transformers import AutoConfig

    files = SafetensorsFiles(where)
    model = skeleton(AutoConfig.from_pretrained(where), dtype)
    arch = arch_of(model)
    expected = dict(model.state_dict(keep_vars=True))
    unknown = [k for k in files.keys() if k not in expected]
    if unknown:  # names of another layout (an older transformers' or a converted checkpoint)
        raise ModelLoadError(f"{where}: tensor {unknown[0]} names nothing in the model")
    block_prefix = arch.blocks + "."
    for k in files.keys():
        if not k.startswith(block_prefix):
            assign_tensor(model, k, files.read(k, "cpu", dtype), dtype, "cpu")
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(block_prefix)]
    if missing:
        raise ModelLoadError(f"{where} lacks tensor {missing[0]}; download or copy the checkpoint again")
    for i in range(len(get_blocks(model, arch))):
        have = {k for k in files.keys() if k.startswith(f"{block_prefix}{i}.")}
        need = {k for k, t in expected.items() if k.startswith(f"{block_prefix}{i}.") and isinstance(t, nn.Parameter)}
        if need - have:
            raise ModelLoadError(f"{where} lacks tensor {sorted(need - have)[0]}; download or copy the checkpoint again")
    model._prunequant_lazy = files  # noqa: SLF001 - read by lazy_source()
    return model


def lazy_source(model: nn.Module) -> SafetensorsFiles | None:
    """The files a lazily loaded model reads its blocks from (None for a model held in memory)."""
    return getattr(model, "_prunequant_lazy", None)


def load_block(files: SafetensorsFiles, prefix: str, block: nn.Module, device, dtype: torch.dtype) -> None:
    for k in [k for k in files.keys() if k.startswith(prefix)]:
        assign_tensor(block, k[len(prefix):], files.read(k, device, dtype), dtype, device)


class LazyBlocks(BlockIO):
    """The engine's BlockIO for a lazily loaded model (docs/internals.md)."""

    def __init__(self, model: nn.Module, on_done=None, keep: bool = False):
        super().__init__()
        self.files = lazy_source(model)
        self.arch = arch_of(model)
        self.blocks = get_blocks(model, self.arch)
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.on_done, self.keep = on_done, keep
        self.live = self.peak_blocks = self.reads = 0
        self.write_seconds = 0.0
        self._ahead: tuple[int, Future] | None = None  # the next block's bytes, read on a thread
        self._reader: ThreadPoolExecutor | None = None

    read_ahead: bool | None = None  # read block i+1 while block i is compressed (None: on a GPU)

    def _read(self, i: int, pinned: bool) -> dict[str, torch.Tensor]:
        prefix = f"{self.arch.blocks}.{i}."
        return {k[len(prefix):]: self.files.read_host(k, pinned) for k in self.files.keys() if k.startswith(prefix)}

    def load(self, i, block, device):
        cuda = torch.device(device).type == "cuda"
        if not (cuda if self.read_ahead is None else self.read_ahead):
            load_block(self.files, f"{self.arch.blocks}.{i}.", block, device, self.dtype)
        else:  # one block's bytes more in host memory, its file reads off the critical path
            ahead, self._ahead = self._ahead, None
            host = ahead[1].result() if ahead is not None and ahead[0] == i else self._read(i, cuda)
            for name, t in host.items():
                assign_tensor(block, name, _placed(t, device, self.dtype), self.dtype, device)
            if i + 1 < len(self.blocks):
                self._reader = self._reader or ThreadPoolExecutor(1, thread_name_prefix="block-reader")
                self._ahead = (i + 1, self._reader.submit(self._read, i + 1, cuda))
        self.reads += 1
        self.live = sum(any(p.device.type != "meta" for p in b.parameters()) for b in self.blocks) \
            if not self.keep else self.live + 1
        self.peak_blocks = max(self.peak_blocks, self.live)

    def unload(self, i, block):
        if self.on_done is not None:
            t = time.perf_counter()
            self.on_done(i, block)
            self.write_seconds += time.perf_counter() - t
        if self.keep:
            block.to("cpu")
        else:
            block.to("meta")
            self.live -= 1


def is_lazy(model: nn.Module) -> bool:
    files = lazy_source(model)
    return files is not None and any(p.device.type == "meta" for p in model.parameters())


def streamed_original(model: nn.Module, files: SafetensorsFiles) -> nn.Module:
    """The original model for comparisons, at the memory cost of one block (docs/internals.md)."""
    arch = arch_of(model)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    base = skeleton(model.config, dtype)
    prefix = arch.blocks + "."
    shared = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    for k, t in shared.items():
        if not k.startswith(prefix):
            v = t.data if isinstance(t, nn.Parameter) else t
            assign_tensor(base, k, v, v.dtype, v.device)
    for i, block in enumerate(get_blocks(base, arch)):
        block.to("meta")
        block.register_forward_pre_hook(_reader(files, f"{prefix}{i}.", dtype), with_kwargs=True)
        block.register_forward_hook(_drop)
    return base


def _drop(block, _args, _output) -> None:
    block.to("meta")  # returns None: a forward hook's return value would replace the output
    trim_host_heap()


def _reader(files, prefix, dtype):
    def hook(block, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        load_block(files, prefix, block, hidden.device, dtype)
    return hook


def save_blocks(model: nn.Module, path: Path) -> SafetensorsFiles:
    """Write the model's block tensors to one safetensors file, one tensor at a time (no second copy in memory)."""
    prefix = arch_of(model).blocks + "."
    items = [(k, t.detach()) for k, t in model.state_dict().items() if k.startswith(prefix)]
    names = {v: k for k, v in _DTYPES.items()}
    header, off = {}, 0
    for k, t in items:
        n = t.numel() * t.element_size()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, t in items:
            f.write(t.to("cpu").contiguous().view(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)
    files = SafetensorsFiles(path.parent, [path])
    files.owned = True  # a copy made for this run: the caller deletes it (api.drop_original)
    return files


def materialise(model: nn.Module, device="cpu") -> nn.Module:
    """Read every block of a lazily loaded model (for work that needs the whole model at once)."""
    files, arch = lazy_source(model), arch_of(model)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    for i, block in enumerate(get_blocks(model, arch)):
        if any(p.device.type == "meta" for p in block.parameters()):
            load_block(files, f"{arch.blocks}.{i}.", block, device, dtype)
    return model
