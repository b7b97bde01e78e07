"""Data passed between the engine and the solvers; conventions (shapes, masks, grids): docs/methods.md."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..recipe import LayerPlan


@dataclass
class LayerStats:
    """Input statistics of one linear over the calibration tokens (None where no solver needs them): ``hessian``
    the mean of x xᵀ (in, in), ``sq_norm`` the sum of x_j² per column (in,), both float32."""

    hessian: torch.Tensor | None
    sq_norm: torch.Tensor | None
    n_tokens: int
    extra: dict = field(default_factory=dict)  # e.g. per-column activation maxima for OWL/SmoothQuant

    @property
    def col_norm(self) -> torch.Tensor:
        """‖x_j‖₂ over calibration tokens (what Wanda multiplies |W| by)."""
        if self.sq_norm is not None:
            return self.sq_norm.sqrt()
        if self.hessian is None:
            raise ValueError("neither sq_norm nor hessian was collected")
        return (torch.diagonal(self.hessian) * self.n_tokens).clamp_min(0).sqrt()


def groups_in_order(q: "QuantState", in_f: int) -> bool:
    """Whether column j belongs to group j // group_size (no act-order permutation of the groups)."""
    from .grid import group_index

    g = q.g_idx
    return g is not None and torch.equal(g.to(torch.int32), group_index(in_f, q.group_size, g.device))


@dataclass
class QuantState:
    """How a quantized weight is stored: enough to pack it and to dequantize it exactly (docs/methods.md)."""

    kind: str
    bits: float
    group_size: int  # 0 = one group per output row (per-channel)
    symmetric: bool
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        if self.kind != "uniform":
            raise NotImplementedError(f"dequantize of kind {self.kind!r} lives with its solver")
        codes = self.codes.float()
        out_f, in_f = codes.shape
        if not groups_in_order(self, in_f):  # act-order: gather each column's group
            g = self.g_idx.long()
            return self.scale[:, g] * (codes - self.zero[:, g])
        n, gs = self.scale.shape[1], max(self.group_size, 1)
        if n == 1:
            return self.scale * (codes - self.zero)
        pad = n * gs - in_f  # a ragged last group: pad it to full width for the view, then cut it off
        c = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
        w = self.scale[:, :, None] * (c.view(out_f, n, gs) - self.zero[:, :, None])  # as the gather, op for op
        return w.view(out_f, n * gs)[:, :in_f].contiguous() if pad else w.view(out_f, in_f)


def quant_to(q: QuantState, device) -> QuantState:
    """A copy of ``q`` with its tensors on ``device`` (tensors already there are shared, not copied)."""
    moved = {k: getattr(q, k).to(device) for k in ("codes", "scale", "zero", "g_idx") if torch.is_tensor(getattr(q, k))}
    return replace(q, **moved, extra={k: (v.to(device) if torch.is_tensor(v) else v) for k, v in q.extra.items()})


@dataclass
class LayerResult:
    """What a solver returns for one linear layer."""

    weight: torch.Tensor  # the compressed weight in float32, as it will be placed in the model
    mask: torch.Tensor | None = None  # True = kept; None = dense
    quant: QuantState | None = None
    info: dict = field(default_factory=dict)  # e.g. {"error": layer objective, "damp": used damping}

    def for_export(self) -> "LayerResult":
        """Mask, quantization state and info on the CPU, without the weight (the model holds it)."""
        q = self.quant
        if q is not None:
            for attr in ("codes", "scale", "zero", "g_idx"):
                v = getattr(q, attr)
                if torch.is_tensor(v):
                    setattr(q, attr, v.cpu())
            q.extra = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in q.extra.items()}
        return StoredResult(weight=None, mask=self.mask, quant=q, info=self.info)

    def mask_on(self, device) -> torch.Tensor | None:
        return None if self.mask is None else self.mask.to(device)

    def quant_on(self, device) -> QuantState | None:
        return None if self.quant is None else quant_to(self.quant, device)

    @property
    def sparsity(self) -> float:
        if self.mask is None:
            return float((self.weight == 0).float().mean())
        return 1.0 - float(self.mask.float().mean())


class StoredResult(LayerResult):
    """A result kept for export, held small until read: its mask as bits and uniform codes of up to 4 bits two
    to a byte, on the CPU (a mask on a GPU is packed there, so only its bits cross to the host)."""

    @property
    def mask(self) -> torch.Tensor | None:
        return self.mask_on("cpu")

    @mask.setter
    def mask(self, m: torch.Tensor | None) -> None:
        from ..export.bitpack import pack_mask

        self.__dict__["_mask_bits"] = None if m is None else (tuple(m.shape), pack_mask(m.detach().bool()).cpu())

    @property
    def quant(self) -> QuantState | None:
        return self._unpacked("cpu")

    def _unpacked(self, device) -> QuantState | None:
        q, nibbles = self.__dict__.get("_quant"), self.__dict__.get("_code_nibbles")
        return q if nibbles is None else replace(q, codes=_from_nibbles(nibbles[0].to(device), nibbles[1]))

    def mask_on(self, device) -> torch.Tensor | None:
        """The mask unpacked on ``device`` (a GPU: only its bits cross from the host)."""
        from ..export.bitpack import unpack_mask  # export imports this module

        packed = self.__dict__.get("_mask_bits")
        return None if packed is None else unpack_mask(packed[1].to(device), packed[0])

    def quant_on(self, device) -> QuantState | None:
        """The state on ``device``, its codes unpacked there (a GPU: half a byte a code crosses from the host)."""
        q = self._unpacked(device)
        return None if q is None else quant_to(q, device)

    @quant.setter
    def quant(self, q: QuantState | None) -> None:
        nibbles = None
        if q is not None and q.kind == "uniform" and q.bits <= 4 and torch.is_tensor(q.codes) \
                and q.codes.dtype == torch.uint8:
            nibbles, q = (_to_nibbles(q.codes).cpu(), tuple(q.codes.shape)), replace(q, codes=None)
        self.__dict__["_quant"], self.__dict__["_code_nibbles"] = q, nibbles


# not export.bitpack's pack_bits: that unpacks to int64 (8 bytes a code); these stay uint8 on the way back
def _to_nibbles(codes: torch.Tensor) -> torch.Tensor:
    flat = codes.detach().reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def _from_nibbles(packed: torch.Tensor, shape: tuple) -> torch.Tensor:
    out = torch.empty(2 * packed.numel(), dtype=torch.uint8, device=packed.device)
    out[0::2], out[1::2] = packed & 15, packed >> 4
    return out[:math.prod(shape)].reshape(shape)


@dataclass
class LayerRecord:
    """What the engine records for one compressed linear."""

    name: str
    shape: list[int]
    n_params: int
    prune: str | None  # the specs, described
    quant: str | None
    sparsity: float  # measured
    nm: list[int] | None
    bits: float
    group_size: int | None
    error: float | None  # ‖WX − ŴX‖²/n_tokens, when the solver measured it
    seconds: float
    damp: float | None = None  # relative damping used, Hessian solvers only
    dead: int | None = None  # dead input columns
    stacked: int | None = None  # linears solved together as one matrix

    @classmethod
    def of(cls, name: str, w: torch.Tensor, plan: LayerPlan, res: LayerResult, seconds: float) -> "LayerRecord":
        q = plan.quant
        return cls(name=name, shape=list(w.shape), n_params=w.numel(),
                   prune=plan.prune.describe() if plan.prune else None, quant=q.describe() if q else None,
                   sparsity=round(res.sparsity, 6) if plan.prune else 0.0,
                   nm=[plan.prune.n, plan.prune.m] if plan.prune and plan.prune.structured else None,
                   bits=q.bits if q else 16, group_size=q.group_size if q else None, error=res.info.get("error"),
                   seconds=round(seconds, 4), **{k: res.info[k] for k in ("damp", "dead", "stacked") if k in res.info})

    def to_dict(self) -> dict:
        optional = ("damp", "dead", "stacked")
        return {k: v for k, v in asdict(self).items() if v is not None or k not in optional}
