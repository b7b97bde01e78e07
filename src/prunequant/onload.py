"""Device placement for the block engine: blocks on the compute device, activations on the GPU or host."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:  # no C library to load: nothing to trim
        return None


def trim_host_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; docs/internals.md says why)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class BlockIO:
    """Moves block i to the compute device and back into its own host tensors (docs/internals.md)."""

    def __init__(self):
        self._home: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _tensors(block: nn.Module):
        yield from block.named_parameters()
        yield from block.named_buffers()

    def load(self, i: int, block: nn.Module, device: torch.device) -> None:
        home = {}
        for name, t in self._tensors(block):
            home[name] = t.data
            if t.device != device:
                t.data = t.data.to(device, non_blocking=t.is_pinned())
        self._home[i] = home

    def unload(self, i: int, block: nn.Module) -> None:
        home = self._home.pop(i)
        for name, t in self._tensors(block):
            src = home.get(name)  # None: a tensor the block gained (e.g. a compensation bias)
            where = src.device if src is not None else next(iter(home.values())).device
            if t.device == where:
                continue
            if src is not None and src.shape == t.shape and src.dtype == t.dtype:
                src.copy_(t.data)
                t.data = src
            else:  # the block was reshaped on the device (structural pruning): take the new tensor home
                t.data = t.data.to(where)


def to_store(t: torch.Tensor, store: torch.device) -> torch.Tensor:
    """Copy an activation to where activations are kept (pinned host memory, asynchronously; docs/internals.md)."""
    if t.device == store:
        return t
    if store.type == "cpu" and t.is_cuda:
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t, non_blocking=True)
    return t.to(store)


def _map_nest(obj, fn):
    """``fn`` on every tensor of a nest of tuples / lists / dicts."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_nest(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_nest(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_nest(v, fn) for k, v in obj.items()}
    return obj


def to_device(obj, device: torch.device):
    """Move a tensor or a nest of tuples/lists/dicts of tensors (pinned sources copy asynchronously)."""
    return _map_nest(obj, lambda t: t.to(device, non_blocking=t.is_pinned()) if t.device != device else t)


def store_nest(obj, store: torch.device):
    return _map_nest(obj, lambda t: to_store(t, store))


def _linear_shapes(block: nn.Module) -> list[tuple[int, int]]:
    return [tuple(m.weight.shape) for m in block.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2]


def gpu_bytes_needed(block: nn.Module, n_tokens: int, batch_tokens: int, hidden: int, act_bytes: int) -> dict:
    """A rough upper bound of what one block's compression holds on the GPU, by part (bytes)."""
    shapes = _linear_shapes(block)
    params = sum(p.numel() * p.element_size() for p in block.parameters())
    d_in = max(max(s) for s in shapes) if shapes else hidden
    widest = max(shapes, key=lambda s: s[0] * s[1]) if shapes else (hidden, hidden)
    # Hessians of one stage + prepare_hessian's copies (H, damped H, L, H⁻¹, U) + float32 W, codes, masks
    solver = 6 * d_in * d_in * 4 + 4 * widest[0] * widest[1] * 4
    forward = batch_tokens * max(d_in, hidden) * act_bytes * 8  # intermediates of one batch
    activations = 2 * n_tokens * hidden * act_bytes  # block inputs and outputs
    return {"params": params, "solver": solver, "forward": forward, "activations": activations}


def decide_offload(block: nn.Module, device: torch.device, n_tokens: int, batch_tokens: int, hidden: int,
                   act_bytes: int, headroom: float = 0.9) -> bool:
    """Offload calibration activations to CPU when they do not fit beside the block and its solver work."""
    if device.type != "cuda":
        return False
    need = gpu_bytes_needed(block, n_tokens, batch_tokens, hidden, act_bytes)
    free, _total = torch.cuda.mem_get_info(device)
    offload = sum(need.values()) > headroom * free
    log.info("activations %.1f GiB, block work %.1f GiB, free %.1f GiB: %s", need["activations"] / 2**30,
             (sum(need.values()) - need["activations"]) / 2**30, free / 2**30,
             "offloading activations to CPU" if offload else "activations stay on the GPU")
    return offload
