"""Sibling projections that read the same input (q/k/v, gate/up) as one packed matmul.

Decode is a chain of small launches; a k or v projection alone is too narrow to fill the GPU. Siblings
with the same packing become one QuantLinear over their stacked rows (``SharedProjection``, registered on
their parent module); each sibling's place holds a ``ProjectionSlice`` that returns its columns of the
shared output. The shared output is computed once per input tensor: the model calls the siblings one
after another with the same tensor, so the first call computes and the others slice.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from . import triton_wmm
from .qlinear import PackedSegment, QuantLinear, probe_tolerance, rel_err

log = logging.getLogger(__name__)

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"), ("w1", "w3"))


class SharedProjection(nn.Module):
    """A QuantLinear whose last input and output are kept until its last slice has read them."""

    def __init__(self, linear: QuantLinear):
        super().__init__()
        self.linear = linear
        self._x = self._version = self._y = None

    def output(self, x: torch.Tensor, last: bool) -> torch.Tensor:
        # traced by torch.compile: the identity of the traced input decides (no version counters there)
        version = None if torch.compiler.is_compiling() or x.is_inference() else x._version
        if self._x is not x or self._version != version:
            self._y, self._x, self._version = self.linear(x), x, version
        y = self._y
        if last:  # free the activation; a later call with the same tensor recomputes (correct, slower)
            self._x = self._y = None
        return y


class ProjectionSlice(nn.Module):
    """Output columns [start, end) of a SharedProjection (not a submodule: the parent holds that)."""

    def __init__(self, shared: SharedProjection, start: int, end: int, last: bool, in_features: int):
        super().__init__()
        object.__setattr__(self, "shared", shared)
        self.start, self.end, self.last = start, end, last
        self.in_features, self.out_features = in_features, end - start

    @property
    def backend(self) -> str:
        return f"{self.shared.linear.backend} (fused)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output(x, self.last)[..., self.start:self.end]

    def dense_weight(self, dtype) -> torch.Tensor:
        return self.shared.linear.dense_weight(dtype)[self.start:self.end]

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.end} of a fused projection"


def _fusable(mods: list[nn.Module]) -> bool:
    if not all(isinstance(m, QuantLinear) and len(m.segs) == 1 and isinstance(m.segs[0], PackedSegment)
               for m in mods):
        return False
    segs = [m.segs[0] for m in mods]
    a = segs[0]
    return all(s.cols is None and s.bits == a.bits and s.group_size == a.group_size and s.k == a.k
               and s.use_triton == a.use_triton and s.scale.shape[1] == a.scale.shape[1] for s in segs) \
        and len({m.bias is None for m in mods}) == 1


def _stack(segs: list[PackedSegment]) -> PackedSegment:
    a = segs[0]
    new = PackedSegment.__new__(PackedSegment)
    nn.Module.__init__(new)
    new.n, new.k, new.bits, new.group_size = sum(s.n for s in segs), a.k, a.bits, a.group_size
    new.register_buffer("cols", None)
    new.register_buffer("codes", torch.cat([s.codes for s in segs]).contiguous())
    for attr in ("scale", "zero"):  # mixed storage dtypes meet in float32 (exact for both)
        ts = [getattr(s, attr) for s in segs]
        same = len({t.dtype for t in ts}) == 1
        new.register_buffer(attr, torch.cat(ts if same else [t.float() for t in ts]).contiguous())
    new.use_triton, new.backend = a.use_triton, a.backend
    return new


@torch.no_grad()
def fuse_siblings(model: nn.Module, dtype: torch.dtype, check: bool = True) -> int:
    """Fuse every group of sibling projections that share a packing; returns how many groups were fused."""
    fused = 0
    for parent in list(model.modules()):
        for names in SIBLINGS:
            mods = [getattr(parent, n, None) for n in names]
            if any(m is None for m in mods) or not _fusable(mods):
                continue
            bias = None
            if mods[0].bias is not None:
                bias = torch.cat([m.bias for m in mods])
            ql = QuantLinear(mods[0].in_features, sum(m.out_features for m in mods), [_stack([m.segs[0] for m in mods])],
                             bias, small_m=mods[0].small_m, large_m=mods[0].large_m)
            if check:
                probe = torch.randn(3, ql.in_features, generator=torch.Generator().manual_seed(0))
                probe = probe.to(ql.segs[0].codes.device, dtype)
                with triton_wmm.untuned():
                    ref = torch.cat([m(probe).float() for m in mods], dim=-1)
                    err = rel_err(ql(probe), ref)
                if not err <= probe_tolerance(dtype):
                    log.info("%s: fused projection differs (rel. error %.2e); left unfused", "+".join(names), err)
                    continue
            shared = SharedProjection(ql)
            parent.add_module("fused_" + "_".join(names), shared)
            start = 0
            for i, (n, m) in enumerate(zip(names, mods)):
                setattr(parent, n, ProjectionSlice(shared, start, start + m.out_features, i == len(names) - 1,
                                                   m.in_features))
                start += m.out_features
            fused += 1
    return fused

