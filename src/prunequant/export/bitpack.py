"""Dense bit streams for codes, masks and N:M index ranks (the compact format's payloads; docs/format.md)."""
from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np
import torch

from ..accounting import nm_rank_bits  # noqa: F401  (the mask encoding's width; counted in the ledger)

_CHUNK = 1 << 20  # values per chunk (a multiple of 8, so every chunk starts on a byte boundary)


def _as_numpy_int(values: torch.Tensor) -> np.ndarray:
    return values.detach().reshape(-1).cpu().to(torch.int64).numpy()


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def _pack_words(chunk: np.ndarray, bits: int) -> np.ndarray:
    """8 values of b <= 8 bits make one b-byte little-endian word: no per-bit expansion needed."""
    pad = (-chunk.size) % 8
    v = np.concatenate([chunk, np.zeros(pad, dtype=np.int64)]).astype(np.uint64).reshape(-1, 8)
    word = np.zeros(v.shape[0], dtype=np.uint64)
    for j in range(8):
        word |= v[:, j] << np.uint64(j * bits)
    out = np.empty((v.shape[0], bits), dtype=np.uint8)
    for k in range(bits):
        out[:, k] = (word >> np.uint64(8 * k)) & np.uint64(0xFF)
    return out.reshape(-1)[:packed_nbytes(chunk.size, bits)]


def _unpack_words(chunk: np.ndarray, bits: int, count: int) -> np.ndarray:
    pad = (-chunk.size) % bits
    b = np.concatenate([chunk, np.zeros(pad, dtype=np.uint8)]).astype(np.uint64).reshape(-1, bits)
    word = np.zeros(b.shape[0], dtype=np.uint64)
    for k in range(bits):
        word |= b[:, k] << np.uint64(8 * k)
    out = np.empty((b.shape[0], 8), dtype=np.int64)
    mask = np.uint64((1 << bits) - 1)
    for j in range(8):
        out[:, j] = ((word >> np.uint64(j * bits)) & mask).astype(np.int64)
    return out.reshape(-1)[:count]


def _on_device(t: torch.Tensor) -> bool:
    return t.device.type != "cpu"


_TORCH_CHUNK = 1 << 24  # values per chunk on a device (a multiple of 8 and of 5): bounded int64 temporaries


def pack_bits_torch(values: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_bits with torch ops where ``values`` lives (1 <= bits <= 8); the same bytes, on that device."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_bits_torch supports 1..8 bits, got {bits}")
    v = values.detach().reshape(-1)
    _check_range(v, bits)
    out = torch.empty(packed_nbytes(v.numel(), bits), dtype=torch.uint8, device=v.device)
    if bits == 8:
        return out.copy_(v)
    shifts = torch.arange(8, device=v.device, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=v.device, dtype=torch.int64) * 8
    for start in range(0, v.numel(), _TORCH_CHUNK):
        c = v[start:start + _TORCH_CHUNK].to(torch.int64)
        count = c.numel()
        c = torch.nn.functional.pad(c, (0, -count % 8)).view(-1, 8)
        word = (c << shifts).sum(1)  # disjoint bit fields: the sum is their OR
        packed = ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
        first, n = start * bits // 8, packed_nbytes(count, bits)
        out[first:first + n] = packed[:n]
    return out


def unpack_bits_torch(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """unpack_bits with torch ops where ``packed`` lives (1 <= bits <= 8): the first n values as int64."""
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_bits_torch supports 1..8 bits, got {bits}")
    p = packed.detach().reshape(-1).view(torch.uint8)
    if p.numel() < packed_nbytes(n, bits):
        raise ValueError(f"packed stream has {p.numel()} bytes, {packed_nbytes(n, bits)} needed for {n}×{bits} bits")
    out = torch.empty(n, dtype=torch.int64, device=p.device)
    if bits == 8:
        return out.copy_(p[:n])
    shifts = torch.arange(8, device=p.device, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=p.device, dtype=torch.int64) * 8
    for start in range(0, n, _TORCH_CHUNK):
        count = min(_TORCH_CHUNK, n - start)
        first = start * bits // 8
        c = p[first:first + packed_nbytes(count, bits)].to(torch.int64)
        c = torch.nn.functional.pad(c, (0, -c.numel() % bits)).view(-1, bits)
        word = (c << byte_shifts).sum(1)
        vals = (word[:, None] >> shifts) & ((1 << bits) - 1)
        out[start:start + count] = vals.reshape(-1)[:count]
    return out


def _check_range(v: torch.Tensor, bits: int) -> None:
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(f"values outside [0, {(1 << bits) - 1}] cannot be packed at {bits} bits")


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers < 2**bits (1..32) into ceil(n·bits/8) uint8 bytes (on a GPU for bits <= 8)."""
    if not 1 <= bits <= 32:
        raise ValueError(f"pack_bits supports 1..32 bits, got {bits}")
    if _on_device(values) and bits <= 8:
        return pack_bits_torch(values, bits)
    v = values.detach().reshape(-1).cpu()  # converted chunk by chunk: no int64 copy of the whole tensor
    _check_range(v, bits)
    out = np.zeros(packed_nbytes(v.numel(), bits), dtype=np.uint8)
    shifts = np.arange(bits, dtype=np.int64)
    for start in range(0, v.numel(), _CHUNK):
        chunk = v[start:start + _CHUNK].to(torch.int64).numpy()
        if bits == 8:
            packed = chunk.astype(np.uint8)
        elif bits < 8:
            packed = _pack_words(chunk, bits)
        else:
            stream = ((chunk[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
            packed = np.packbits(stream, bitorder="little")
        first = start * bits // 8
        out[first:first + packed.size] = packed
    return torch.from_numpy(out)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: the first n values as int64 (on the stream's device when it is a GPU)."""
    if not 1 <= bits <= 32:
        raise ValueError(f"unpack_bits supports 1..32 bits, got {bits}")
    if _on_device(packed) and bits <= 8:
        return unpack_bits_torch(packed, bits, n)
    p = packed.detach().reshape(-1).cpu().numpy().view(np.uint8)
    if p.size < packed_nbytes(n, bits):
        raise ValueError(f"packed stream has {p.size} bytes, {packed_nbytes(n, bits)} needed for {n}×{bits} bits")
    out = np.empty(n, dtype=np.int64)
    weights = (np.int64(1) << np.arange(bits, dtype=np.int64))
    for start in range(0, n, _CHUNK):
        count = min(_CHUNK, n - start)
        first = start * bits // 8
        chunk = p[first:first + packed_nbytes(count, bits)]
        if bits == 8:
            out[start:start + count] = chunk
        elif bits < 8:
            out[start:start + count] = _unpack_words(chunk, bits, count)
        else:
            stream = np.unpackbits(chunk, bitorder="little", count=count * bits).reshape(count, bits)
            out[start:start + count] = stream.astype(np.int64) @ weights
    return torch.from_numpy(out)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor (any shape, row-major) -> 1 bit per element."""
    if _on_device(mask):
        return pack_bits_torch(mask.reshape(-1).to(torch.uint8), 1)
    m = mask.detach().reshape(-1).cpu().to(torch.bool).numpy()
    return torch.from_numpy(np.packbits(m.view(np.uint8), bitorder="little"))  # a view: no copy of the mask


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    n = math.prod(shape)
    if _on_device(packed):
        return unpack_bits_torch(packed, 1, n).bool().reshape(shape)
    p = packed.detach().reshape(-1).cpu().numpy().view(np.uint8)
    if p.size < packed_nbytes(n, 1):
        raise ValueError(f"mask stream has {p.size} bytes, {packed_nbytes(n, 1)} needed")
    bits = np.unpackbits(p, bitorder="little", count=n)
    return torch.from_numpy(bits.view(np.bool_)).reshape(shape)  # 0/1 bytes: a valid bool view


# ---- ternary --------------------------------------------------------------------------------

_TRIT_WEIGHTS = np.array([1, 3, 9, 27, 81], dtype=np.int64)


def trits_nbytes(n: int) -> int:
    return (n + 4) // 5


def pack_trits(values: torch.Tensor) -> torch.Tensor:
    """Codes in {0, 1, 2}, five per byte (value = Σ c_i·3^i)."""
    if _on_device(values):
        return pack_trits_torch(values)
    v = _as_numpy_int(values)
    if v.size and (v.min() < 0 or v.max() > 2):
        raise ValueError("ternary codes must be 0, 1 or 2")
    pad = (-v.size) % 5
    v = np.concatenate([v, np.zeros(pad, dtype=np.int64)]).reshape(-1, 5)
    return torch.from_numpy((v @ _TRIT_WEIGHTS).astype(np.uint8))


def pack_trits_torch(values: torch.Tensor) -> torch.Tensor:
    """pack_trits with torch ops where ``values`` lives."""
    v = values.detach().reshape(-1).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > 2):
        raise ValueError("ternary codes must be 0, 1 or 2")
    w = torch.as_tensor(_TRIT_WEIGHTS, device=v.device)
    return (torch.nn.functional.pad(v, (0, -v.numel() % 5)).view(-1, 5) * w).sum(1).to(torch.uint8)


def unpack_trits_torch(packed: torch.Tensor, n: int) -> torch.Tensor:
    p = packed.detach().reshape(-1).to(torch.int64)
    if p.numel() < trits_nbytes(n):
        raise ValueError(f"ternary stream has {p.numel()} bytes, {trits_nbytes(n)} needed")
    w = torch.as_tensor(_TRIT_WEIGHTS, device=p.device)
    return ((p[:, None] // w) % 3).reshape(-1)[:n].clone()


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    if _on_device(packed):
        return unpack_trits_torch(packed, n)
    p = packed.detach().reshape(-1).cpu().numpy().astype(np.int64)
    if p.size < trits_nbytes(n):
        raise ValueError(f"ternary stream has {p.size} bytes, {trits_nbytes(n)} needed")
    digits = (p[:, None] // _TRIT_WEIGHTS) % 3
    return torch.from_numpy(digits.reshape(-1)[:n].copy())


# ---- N:M patterns as ranks ------------------------------------------------------------------

MAX_NM_GROUP = 16  # pattern tables stay small (C(16, 8) = 12870 entries)


@lru_cache(maxsize=64)
def _patterns(m: int, k: int) -> np.ndarray:
    """All m-bit integers with exactly k bits set (bit i = position i kept), ascending."""
    vals = [sum(1 << i for i in c) for c in itertools.combinations(range(m), k)]
    return np.array(sorted(vals), dtype=np.int64)


def encode_nm(mask: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """(rows, cols) bool with exactly k kept in every group of m consecutive columns -> rank per group."""
    if not 2 <= m <= MAX_NM_GROUP:
        raise ValueError(f"N:M group size {m} outside 2..{MAX_NM_GROUP}")
    g = mask.detach().reshape(-1, m).cpu()
    if not bool((g.sum(dim=1, dtype=torch.int16) == k).all()):
        raise ValueError(f"mask is not {m - k}:{m} (k={k} kept per group of {m})")
    packed = np.packbits(g.numpy(), axis=1, bitorder="little")  # bit i of a group's integer = position i kept
    ints = (packed[:, 0] if m <= 8 else packed.view("<u2")[:, 0]).astype(np.int64)
    table = _patterns(m, k)
    return torch.from_numpy(np.searchsorted(table, ints))


def decode_nm(ranks: torch.Tensor, m: int, k: int, shape) -> torch.Tensor:
    table = _patterns(m, k)
    r = ranks.detach().reshape(-1).cpu().numpy()
    if r.size and (r.min() < 0 or r.max() >= table.size):
        raise ValueError(f"N:M rank outside [0, {table.size - 1}]")
    ints = table[r]
    bits = (ints[:, None] >> np.arange(m, dtype=np.int64)) & 1
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def detect_nm(mask: torch.Tensor, candidates=(4, 8, 16, 2)) -> tuple[int, int] | None:
    """(n_pruned, m) of the cheapest N:M description of a mask, or None (docs/internals.md)."""
    rows, cols = mask.shape
    best = None
    for m in candidates:
        if cols % m or m > MAX_NM_GROUP:
            continue
        first = mask[0].reshape(cols // m, m).sum(dim=-1)  # most masks fail on their first row: a cheap look
        k = int(first[0])
        if not 0 < k < m or not bool((first == k).all()):
            continue
        counts = mask.reshape(rows, cols // m, m).sum(dim=-1, dtype=torch.int16)
        if not bool((counts == k).all()):
            continue
        cost = nm_rank_bits(m, k) / m
        if best is None or cost < best[0]:
            best = (cost, m - k, m)
    return None if best is None else (best[1], best[2])
