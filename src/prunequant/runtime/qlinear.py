"""Inference linears that keep quantized weights packed and multiply with low-bit kernels: ``QuantLinear``
over one or two uniform-grid segments (a channel-mixed layer is two), with backends tried in order and
each checked against the dequantized weight on load. Storage, backends and kernels: docs/runtime.md.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..solvers.base import QuantState
from ..solvers.grid import group_index
from . import ops, triton_wmm

log = logging.getLogger(__name__)

BACKENDS = ("triton", "sparse24", "packed", "tinygemm", "int8pack", "dense")
SMALL_M = 64  # input rows up to which the low-bit kernels run; above, see QuantLinear.large_m
# Rows up to which torch's CPU kernels beat dequantize (~1.4 ms) + BLAS, SmolLM2 shapes, one thread, on an
# AVX512-BF16 CPU: in float32 tinygemm costs 1.5 ms a row and int8pack 0.75 ms (the BLAS wins from 1-2 rows);
# in bfloat16 both take ~0.07 ms at one row (dense's speed) and ~0.02 ms a row more (tinygemm: ~256 rows
# to break even in whole-model prefill with two threads)
SMALL_M_CPU = {"tinygemm": {torch.float32: 1, torch.bfloat16: 256},
               "int8pack": {torch.float32: 0, torch.bfloat16: 16}}


class Unsupported(Exception):
    """A backend cannot hold this segment (shape, bit width, grid or device); the reason is the message."""


# ---- packing -------------------------------------------------------------------------------------

def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) integer codes → (N, ceil(K / per)) int32 words, per = 32 // bits; code k sits in word k // per
    at bit (k % per)·bits (for 2, 4 and 8 bits the bytes of export/bitpack.py's little-endian stream;
    3-bit codes leave the top 2 bits of a word unused)."""
    if bits not in triton_wmm.SUPPORTED_BITS:
        raise Unsupported(f"{bits}-bit codes have no packed layout (2, 3, 4 and 8 bits do)")
    per = triton_wmm.per_word(bits)
    n, k = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes outside [0, {(1 << bits) - 1}] do not fit {bits} bits")
    pad = (-k) % per
    if pad:
        c = F.pad(c, (0, pad))
    c = c.reshape(n, -1, per)
    shifts = torch.arange(per, device=c.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_codes: (N, k) uint8 codes."""
    per = triton_wmm.per_word(bits)
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(packed.shape[0], -1)[:, :k].to(torch.uint8)


def check_state(q: QuantState, k: int) -> None:
    """Raise Unsupported unless ``q`` is a uniform grid with contiguous groups over ``k`` columns."""
    if q.kind != "uniform" or q.codes is None or q.scale is None or q.zero is None:
        raise Unsupported(f"quantization kind {q.kind!r} is not a plain uniform grid")
    if float(q.bits) != int(q.bits):
        raise Unsupported(f"{q.bits}-bit codes (ternary) have no packed kernel")
    if tuple(q.codes.shape)[1] != k:
        raise ValueError(f"codes have {q.codes.shape[1]} columns, the segment {k}")
    if q.g_idx is not None and not torch.equal(q.g_idx.long(), group_index(k, q.group_size, q.g_idx.device).long()):
        raise Unsupported("groups are not contiguous (act-order): no kernel reads a g_idx")


# ---- segments ------------------------------------------------------------------------------------

class Segment(nn.Module):
    """One uniform-grid part of a weight: (N, k) over input columns ``cols`` (None = all, in order)."""

    backend = "?"
    dequantizable = False  # whether dequantize() exists: many input rows then take the BLAS path

    def __init__(self, n: int, k: int, bits: int, group_size: int, cols: torch.Tensor | None):
        super().__init__()
        self.n, self.k, self.bits, self.group_size = n, k, int(bits), int(group_size)
        self.register_buffer("cols", None if cols is None else cols.to(torch.int32).contiguous())

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def gather(self, x2: torch.Tensor) -> torch.Tensor:
        return x2 if self.cols is None else x2.index_select(1, self.cols)

    def extra_repr(self) -> str:
        return f"{self.backend}, {self.bits}-bit, g{self.group_size}, ({self.n}, {self.k})"


class PackedSegment(Segment):
    """Codes packed into int32 words, fp16 (or fp32) scales, uint8 (or fp32) zero points."""

    dequantizable = True

    def __init__(self, q: QuantState, cols, device, use_triton: bool):
        n, k = q.codes.shape
        super().__init__(n, k, int(q.bits), q.group_size, cols)
        check_state(q, k)
        self.register_buffer("codes", pack_codes(q.codes.to(device), self.bits).contiguous())
        scale = q.scale.to(device, torch.float32)
        s16 = scale.to(torch.float16)
        self.register_buffer("scale", (s16 if torch.equal(s16.float(), scale) else scale).contiguous())
        zero = q.zero.to(device, torch.float32)
        exact = bool(((zero == zero.round()) & (zero >= 0) & (zero <= 255)).all())
        self.register_buffer("zero", (zero.to(torch.uint8) if exact else zero).contiguous())
        self.use_triton = use_triton
        self.backend = "triton" if use_triton else "packed"

    def dequantize_torch(self, dtype) -> torch.Tensor:
        c = unpack_codes(self.codes, self.bits, self.k).float()
        g = group_index(self.k, self.group_size, c.device).long()
        return ((c - self.zero.float()[:, g]) * self.scale.float()[:, g]).to(dtype)

    def dequantize(self, dtype, out: torch.Tensor | None = None, col0: int = 0) -> torch.Tensor:
        if out is None:
            out = torch.empty(self.n, self.k, device=self.codes.device, dtype=dtype)
            col0 = 0
        if self.use_triton and triton_wmm.available(self.codes):
            return ops.dequantize_into(self, out, col0)
        out[:, col0:col0 + self.k] = self.dequantize_torch(out.dtype)
        return out

    def forward(self, x2: torch.Tensor, small_m: int = SMALL_M) -> torch.Tensor:
        if self.use_triton and x2.shape[0] <= small_m and triton_wmm.available(x2):
            return ops.matmul(x2, [self], self.n)
        return F.linear(self.gather(x2), self.dequantize(x2.dtype))


class Sparse24Segment(Segment):
    """A weight with at most two nonzeros in every four consecutive columns: the two kept codes of each
    four packed as in PackedSegment (half the words), their positions as 2-bit indices (16 per int32 word),
    the grid in the kept columns' groups (half as long). Weights that quantize to 0 count as pruned. 4-bit
    g128: 0.40 bytes a weight against 0.52 for PackedSegment."""

    dequantizable = True
    backend = "sparse24"

    def __init__(self, q: QuantState, cols, device, use_triton: bool):
        n, k = q.codes.shape
        super().__init__(n, k, int(q.bits), q.group_size, cols)
        check_state(q, k)
        if k % 4 or (q.group_size > 0 and q.group_size % 4):
            raise Unsupported(f"2:4 codes need columns ({k}) and groups ({q.group_size}) in whole fours")
        if cols is not None:
            raise Unsupported("2:4 codes of a channel-mixed part have no kernel")
        codes = q.codes.to(device)
        g = group_index(k, q.group_size, codes.device).long()
        nz = (codes.float() != q.zero.to(device, torch.float32)[:, g]).reshape(n, k // 4, 4)
        if nz.numel() and int(nz.sum(-1).max()) > 2:
            raise Unsupported("more than two nonzero weights in some four consecutive columns: not 2:4 sparse")
        # the two kept positions of each four: the nonzeros first, then zeros (their code is the zero point)
        pos = torch.sort((~nz).to(torch.int8), dim=-1, stable=True).indices[..., :2].sort(-1).values
        kept = codes.reshape(n, k // 4, 4).gather(-1, pos).reshape(n, k // 2)
        half = q.group_size // 2 if q.group_size > 0 else q.group_size
        view = QuantState("uniform", q.bits, half, q.symmetric, kept, q.scale, q.zero,
                          group_index(k // 2, half, codes.device))
        self.inner = PackedSegment(view, None, device, use_triton)
        self.register_buffer("meta", pack_codes(pos.reshape(n, k // 2), 2).contiguous())
        self.use_triton = use_triton

    def kernel_view(self):
        """What the few-row GEMV reads: the kept codes' segment with the positions beside it."""
        s = self.inner
        return ops.segment_view(s.codes, s.scale, s.zero, None, s.bits, s.group_size, s.k, self.meta)

    def dequantize(self, dtype, out: torch.Tensor | None = None, col0: int = 0) -> torch.Tensor:
        if out is None:
            out = torch.empty(self.n, self.k, device=self.meta.device, dtype=dtype)
            col0 = 0
        if self.use_triton and triton_wmm.available(out) and not torch.compiler.is_compiling():
            return triton_wmm.dequantize_into(self.kernel_view(), out, col0)
        kept = self.inner.dequantize_torch(dtype)
        pos = unpack_codes(self.meta, 2, self.k // 2).long()
        idx = 4 * (torch.arange(self.k // 2, device=pos.device) // 2) + pos
        out[:, col0:col0 + self.k].zero_().scatter_(1, idx.expand(self.n, -1), kept)
        return out

    def forward(self, x2: torch.Tensor, small_m: int = SMALL_M) -> torch.Tensor:
        if self.use_triton and x2.shape[0] <= min(small_m, triton_wmm.ROWS_MAX) and triton_wmm.available(x2):
            return ops.matmul(x2, [self.kernel_view()], self.n)
        return F.linear(x2, self.dequantize(x2.dtype))


class TinyGemmSegment(Segment):
    """4-bit codes in torch's tinygemm layout (``_convert_weight_to_int4pack``), scale/offset per group."""

    backend = "tinygemm"
    _order: dict[str, str] = {}  # device type → nibble order that matched the reference

    def __init__(self, q: QuantState, cols, device, dtype):
        n, k = q.codes.shape
        super().__init__(n, k, int(q.bits), q.group_size, cols)
        check_state(q, k)
        if self.bits != 4:
            raise Unsupported(f"tinygemm holds 4-bit codes only, not {self.bits}-bit")
        cuda = torch.device(device).type == "cuda"
        if cuda and not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
            raise Unsupported("this torch has no aten._weight_int4pack_mm")
        if not cuda and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            raise Unsupported("this torch has no aten._weight_int4pack_mm_for_cpu")
        if cuda and dtype != torch.bfloat16:
            raise Unsupported(f"tinygemm on CUDA takes bfloat16 activations, not {dtype}")
        mult = 8 if cuda else 16
        if n % mult:
            raise Unsupported(f"{n} output rows are not a multiple of {mult}")
        gs = q.group_size
        cands = [g for g in (256, 128, 64, 32) if gs <= 0 or gs % g == 0]
        if not cands:
            raise Unsupported(f"group size {gs} is not a multiple of 32 (tinygemm groups: 32, 64, 128, 256)")
        exact = [g for g in cands if k % g == 0]
        self.tg_group = exact[0] if exact else cands[0]
        self.kpad = math.ceil(k / self.tg_group) * self.tg_group
        self.inner_k_tiles = next(t for t in (8, 4, 2) if self.kpad % (16 * t) == 0)
        codes = q.codes.to(device, torch.int32)
        if self.kpad > k:  # padded columns meet zero-padded inputs
            codes = F.pad(codes, (0, self.kpad - k), value=8)
        n_tg = self.kpad // self.tg_group
        ours = torch.arange(n_tg, device=device) * self.tg_group
        ours = torch.zeros_like(ours) if gs <= 0 else (ours // gs).clamp_max(q.scale.shape[1] - 1)
        scale = q.scale.to(device, torch.float32)[:, ours]
        offset = scale * (8 - q.zero.to(device, torch.float32)[:, ours])
        self.register_buffer("scale_offset", torch.stack([scale, offset], -1).transpose(0, 1).contiguous().to(dtype))
        self.cuda_kernel = cuda
        if cuda:
            order = self._order.get("cuda") or self._probe_order(device)
            self.register_buffer("packed", self._pack_cuda(codes, order))
        else:
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes.contiguous(), self.inner_k_tiles))
            # the CPU kernel's time grows with the input rows: prefill dequantizes instead, if we read its layout
            self.dequantizable = torch.equal(self._cpu_codes().to(torch.int32), codes)

    def _cpu_codes(self) -> torch.Tensor:
        """(N, kpad) uint8 codes back from the CPU layout: blocks of 64 rows, each (kpad, 32) bytes holding rows
        j (low nibble) and j + 32 (high); a last block of t < 64 rows holds rows 2j and 2j + 1."""
        flat, kp = self.packed.reshape(-1), self.kpad
        full, t = divmod(self.n, 64)
        b = flat[:full * kp * 32].reshape(full, kp, 32)
        blocks = [torch.cat([b & 15, b >> 4], 2).transpose(1, 2).reshape(full * 64, kp)]
        if t:
            b = flat[full * kp * 32:].reshape(kp, t // 2)
            blocks.append(torch.stack([b & 15, b >> 4], 2).reshape(kp, t).t())
        return torch.cat(blocks) if len(blocks) > 1 else blocks[0]

    def dequantize(self, dtype, out: torch.Tensor | None = None, col0: int = 0) -> torch.Tensor:
        so = self.scale_offset.float().permute(1, 0, 2).contiguous()[:, :, None]  # w = (q − 8)·s + offset
        c = self._cpu_codes().view(self.n, -1, self.tg_group).float().sub_(8)
        w = torch.addcmul(so[..., 1], c, so[..., 0]).reshape(self.n, self.kpad)[:, :self.k].to(dtype)
        if out is None:
            return w
        out[:, col0:col0 + self.k] = w
        return out

    def _pack_cuda(self, codes: torch.Tensor, order: str) -> torch.Tensor:
        even, odd = codes[:, ::2], codes[:, 1::2]
        u8 = (even << 4 | odd) if order == "even-high" else (odd << 4 | even)
        return torch.ops.aten._convert_weight_to_int4pack(u8.to(torch.uint8).contiguous(), self.inner_k_tiles)

    @classmethod
    def _probe_order(cls, device) -> str:
        """Which nibble of the (N, K/2) uint8 input holds the even column (torch documents even-high)."""
        g = torch.Generator(device="cpu").manual_seed(0)
        codes = torch.randint(0, 16, (16, 128), generator=g, dtype=torch.int32).to(device)
        x = torch.randn(3, 128, generator=g).to(device, torch.bfloat16)
        sz = torch.stack([torch.full((2, 16), 0.01), torch.zeros(2, 16)], -1).to(device, torch.bfloat16)
        ref = x.float() @ ((codes.float() - 8) * 0.01).t()
        for order in ("even-high", "even-low"):
            even, odd = codes[:, ::2], codes[:, 1::2]
            u8 = (even << 4 | odd) if order == "even-high" else (odd << 4 | even)
            w = torch.ops.aten._convert_weight_to_int4pack(u8.to(torch.uint8).contiguous(), 8)
            y = torch.ops.aten._weight_int4pack_mm(x, w, 64, sz).float()
            if float((y - ref).norm() / ref.norm()) < 2e-2:
                cls._order["cuda"] = order
                return order
        raise Unsupported("tinygemm matches its reference with neither nibble order on this device")

    def forward(self, x2: torch.Tensor, small_m: int = SMALL_M) -> torch.Tensor:
        xg = self.gather(x2)
        if self.kpad > self.k:
            xg = F.pad(xg, (0, self.kpad - self.k))
        xg = xg.contiguous()
        if self.cuda_kernel:
            return torch.ops.aten._weight_int4pack_mm(xg, self.packed, self.tg_group, self.scale_offset)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xg, self.packed, self.tg_group, self.scale_offset)


class Int8PackSegment(Segment):
    """8-bit per-channel symmetric codes as int8 (code − 128) with one scale per row."""

    backend = "int8pack"

    def __init__(self, q: QuantState, cols, device, dtype):
        n, k = q.codes.shape
        super().__init__(n, k, int(q.bits), q.group_size, cols)
        check_state(q, k)
        if self.bits != 8 or q.scale.shape[1] != 1:
            raise Unsupported("torch's int8 weight-only kernel takes 8-bit codes with one scale per row")
        if not bool((q.zero == 128).all()):
            raise Unsupported("torch's int8 weight-only kernel takes symmetric grids (zero point 128)")
        w = (q.codes.to(device, torch.int16) - 128).to(torch.int8)
        self.register_buffer("weight_int8", w.contiguous())
        self.register_buffer("scales", q.scale.to(device, torch.float32)[:, 0].to(dtype).contiguous())

    dequantizable = True

    def dequantize(self, dtype, out: torch.Tensor | None = None, col0: int = 0) -> torch.Tensor:
        w = (self.weight_int8.float() * self.scales.float()[:, None]).to(dtype)
        if out is None:
            return w
        out[:, col0:col0 + self.k] = w
        return out

    def forward(self, x2: torch.Tensor, small_m: int = SMALL_M) -> torch.Tensor:
        return torch._weight_int8pack_mm(self.gather(x2).contiguous(), self.weight_int8, self.scales)


class DenseSegment(Segment):
    """The dequantized weight in the activation dtype (the fallback; no memory saved)."""

    backend = "dense"

    def __init__(self, q: QuantState, cols, device, dtype):
        n, k = q.codes.shape if q.codes is not None else (None, None)
        super().__init__(n, k, int(q.bits) if float(q.bits).is_integer() else 16, q.group_size, cols)
        self.register_buffer("weight", q.dequantize().to(device, dtype).contiguous())

    def forward(self, x2: torch.Tensor, small_m: int = SMALL_M) -> torch.Tensor:
        return F.linear(self.gather(x2), self.weight)


def make_segment(backend: str, q: QuantState, cols, device, dtype) -> Segment:
    dev = torch.device(device)
    if backend == "triton":
        probe = torch.empty(0, device=dev)
        if not triton_wmm.available(probe):
            raise Unsupported("triton is not installed or cannot run on " + dev.type)
        return PackedSegment(q, cols, dev, use_triton=True)
    if backend == "packed":
        return PackedSegment(q, cols, dev, use_triton=False)
    if backend == "sparse24":
        return Sparse24Segment(q, cols, dev, use_triton=triton_wmm.available(torch.empty(0, device=dev)))
    if backend == "tinygemm":
        return TinyGemmSegment(q, cols, dev, dtype)
    if backend == "int8pack":
        return Int8PackSegment(q, cols, dev, dtype)
    if backend == "dense":
        return DenseSegment(q, cols, dev, dtype)
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


# ---- the layer -----------------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """``y = x · Wᵀ + b`` with W held as packed segments (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, segments: list[Segment],
                 bias: torch.Tensor | None = None, small_m: int = SMALL_M, large_m: str = "reconstruct"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.segs = nn.ModuleList(segments)
        self.register_buffer("bias", None if bias is None else bias.contiguous())
        self.small_m, self.large_m = small_m, large_m
        self.fused = len(segments) <= 2 and all(isinstance(s, PackedSegment) and s.use_triton for s in segments)
        self.reconstructable = all(s.dequantizable for s in segments)
        perm = None
        if any(s.cols is not None for s in segments):
            perm = torch.cat([s.cols if s.cols is not None else torch.arange(in_features, device=s.device,
                                                                            dtype=torch.int32)
                              for s in segments]) if self.reconstructable else None
        self.register_buffer("perm", perm)

    @property
    def backend(self) -> str:
        names = "+".join(s.backend for s in self.segs)
        return f"{names} (fused)" if self.fused and len(self.segs) > 1 else names

    def dense_weight(self, dtype) -> torch.Tensor:
        """The weight over ``perm``'s column order (the original order for one segment without cols)."""
        out = torch.empty(self.out_features, sum(s.k for s in self.segs), device=self.segs[0].device,
                          dtype=dtype)
        col = 0
        for s in self.segs:
            s.dequantize(dtype, out, col)
            col += s.k
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        if self.fused and (m <= self.small_m or self.large_m == "kernel") and triton_wmm.available(x2):
            y = ops.matmul(x2, list(self.segs), self.out_features, self.bias)
        elif self.reconstructable and m > self.small_m:
            xp = x2 if self.perm is None else x2.index_select(1, self.perm)
            y = F.linear(xp, self.dense_weight(x2.dtype), self.bias)
        else:
            y = self.segs[0](x2, self.small_m)
            for s in self.segs[1:]:
                y = y + s(x2, self.small_m)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def probe_tolerance(dtype) -> float:
    return {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 5e-3}.get(dtype, 2e-2)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


@torch.no_grad()
@triton_wmm.untuned()
def build_quant_linear(parts: list[tuple[QuantState, torch.Tensor | None]], in_features: int, out_features: int,
                       bias: torch.Tensor | None, *, device, dtype, prefer: dict[int, list[str]],
                       check: bool = True, seed: int = 0) -> tuple[QuantLinear, list[dict]]:
    """A QuantLinear for segments ``parts`` ((state, input columns or None)), each on the first backend of
    ``prefer[bits]`` that takes it and passes the probe check; returns it and a record per segment."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    probe = torch.randn(3, in_features, generator=g).to(device, dtype)
    segs, records = [], []
    ref_total = None
    for q, cols in parts:
        cols_dev = None if cols is None else cols.to(device)
        W_ref = q.dequantize().to(device, dtype)
        xg = probe if cols_dev is None else probe.index_select(1, cols_dev.long())
        ref = xg.float() @ W_ref.float().t()
        ref_total = ref if ref_total is None else ref_total + ref
        bits = int(q.bits) if float(q.bits).is_integer() else 16
        tried = []
        chosen = None
        for backend in list(prefer.get(bits, [])) + ["dense"]:
            try:
                seg = make_segment(backend, q, cols_dev, device, dtype).to(device)
                if check and backend != "dense":
                    err = rel_err(seg(probe), ref)
                    if not err <= probe_tolerance(dtype):
                        raise Unsupported(f"probe output differs from the dequantized weight's (rel. error {err:.2e})")
                    if isinstance(seg, PackedSegment) and not torch.equal(seg.dequantize(dtype), W_ref):
                        raise Unsupported("dequantized packed weight differs from the grid's")
                    if seg.dequantizable and not isinstance(seg, PackedSegment):
                        err = rel_err(seg.dequantize(dtype), W_ref.float())
                        if not err <= probe_tolerance(dtype):
                            seg.dequantizable = False
                            tried.append(f"{backend} dequantized for many rows: rel. error {err:.2e}; "
                                         "the kernel takes every row count")
                chosen = seg
                break
            except Unsupported as e:
                tried.append(f"{backend}: {e}")
            except Exception as e:  # noqa: BLE001 - a kernel that refuses the input or fails to compile
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                tried.append(f"{backend}: {type(e).__name__}: {first}")
        segs.append(chosen)
        records.append({"bits": bits, "group_size": q.group_size, "k": q.codes.shape[1], "backend": chosen.backend,
                        "fallbacks": tried})
    ql = QuantLinear(in_features, out_features, segs, None if bias is None else bias.to(device, dtype),
                     small_m=SMALL_M if torch.device(device).type == "cuda"
                     else min(SMALL_M_CPU.get(s.backend, {}).get(dtype, SMALL_M) for s in segs)).to(device)
    if check and ql.fused and len(segs) > 1:
        err = rel_err(ql(probe) - (ql.bias if ql.bias is not None else 0), ref_total)
        if not err <= probe_tolerance(dtype):
            ql.fused = False
            records[0]["fallbacks"].append(f"fused two-segment kernel: rel. error {err:.2e}, runs per segment")
    return ql, records


def set_runtime_mode(model: nn.Module, small_m: int | None = None, large_m: str | None = None) -> None:
    """Set, on every QuantLinear of ``model``, up to how many input rows the low-bit kernels run and what
    larger inputs do ("reconstruct": dequantize the weight, then cuBLAS; "kernel": the Triton kernel)."""
    if large_m is not None and large_m not in ("reconstruct", "kernel"):
        raise ValueError(f"large_m {large_m!r}: use 'reconstruct' or 'kernel'")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if small_m is not None:
                m.small_m = small_m
            if large_m is not None:
                m.large_m = large_m


def module_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once (tied weights once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def place_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name`` in ``model``, keeping the bias the old module had loaded."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    bias = getattr(old, "bias", None)
    if isinstance(module, QuantLinear) and isinstance(bias, torch.Tensor) and bias.device.type != "meta":
        module.bias = bias.to(module.bias.device if module.bias is not None else bias.device)
    setattr(parent, attr, module)


def has_bias(model: nn.Module, name: str) -> bool:
    return getattr(model.get_submodule(name), "bias", None) is not None


def swap_in_packed(model: nn.Module, name: str, q: QuantState, device, dtype, prefer, check: bool,
                   counts, fallbacks) -> None:
    """Replace linear ``name`` by a QuantLinear over ``q``; tally its backend and any fallbacks taken."""
    out_f, in_f = q.codes.shape
    bias = torch.zeros(out_f, dtype=dtype) if has_bias(model, name) else None
    ql, recs = build_quant_linear([(q, None)], in_f, out_f, bias, device=device, dtype=dtype, prefer=prefer,
                                  check=check)
    for r in recs:
        counts[f"{r['bits']}-bit:{r['backend']}"] += 1
        for reason in r["fallbacks"]:
            fallbacks[reason] += 1
            log.info("layer %s: %s", name, reason)
    place_module(model, name, ql)
