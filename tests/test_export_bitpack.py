"""Bit streams of the compact format against an obviously-right per-bit reference."""
import math

import pytest
import torch

from prunequant.export.bitpack import (decode_nm, detect_nm, encode_nm, nm_rank_bits, pack_bits, pack_mask,
                                       pack_trits, unpack_bits, unpack_mask, unpack_trits)


def _reference_pack(values, bits):
    stream = []
    for v in values.tolist():
        stream += [(v >> j) & 1 for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return bytes(sum(stream[i + j] << j for j in range(8)) for i in range(0, len(stream), 8))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 11, 14])
@pytest.mark.parametrize("n", [1, 7, 8, 13, 100])
def test_pack_bits_matches_reference_and_size(bits, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    values = torch.randint(0, 2**bits, (n,), generator=g)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert bytes(packed.tolist()) == _reference_pack(values, bits)
    assert torch.equal(unpack_bits(packed, bits, n), values)


def test_pack_bits_long_stream_crosses_chunks():
    values = torch.randint(0, 8, (600_001,))
    assert torch.equal(unpack_bits(pack_bits(values, 3), 3, values.numel()), values)


def test_pack_bits_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([8]), 3)


def test_mask_and_trits_roundtrip():
    mask = torch.rand(37, 29) > 0.3
    p = pack_mask(mask)
    assert p.numel() == math.ceil(37 * 29 / 8)
    assert torch.equal(unpack_mask(p, (37, 29)), mask)
    t = torch.randint(0, 3, (1001,))
    pt = pack_trits(t)
    assert pt.numel() == 201  # 5 codes per byte
    assert torch.equal(unpack_trits(pt, 1001), t)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (6, 8), (8, 16)])
def test_nm_ranks_roundtrip(n, m):
    k = m - n
    score = torch.rand(6, 4 * m)
    idx = score.reshape(6, 4, m).topk(k, dim=2).indices
    mask = torch.zeros(6, 4, m, dtype=torch.bool).scatter_(2, idx, True).reshape(6, 4 * m)
    ranks = encode_nm(mask, m, k)
    assert int(ranks.max()) < math.comb(m, k)
    assert torch.equal(decode_nm(ranks, m, k, mask.shape), mask)
    assert nm_rank_bits(m, k) == math.ceil(math.log2(math.comb(m, k)))


def test_detect_nm_prefers_cheapest_and_rejects_unstructured():
    score = torch.rand(8, 64)
    idx = score.reshape(8, 16, 4).topk(2, dim=2).indices
    mask24 = torch.zeros(8, 16, 4, dtype=torch.bool).scatter_(2, idx, True).reshape(8, 64)
    assert detect_nm(mask24) == (2, 4)  # also 4:8 and 8:16, but 3 bits / 4 weights is cheapest
    assert detect_nm(torch.rand(8, 64) > 0.5) is None
    assert detect_nm(torch.ones(8, 64, dtype=torch.bool)) is None




@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 13, 1000])
def test_torch_packing_gives_the_numpy_bytes(bits, n, monkeypatch):
    """The device path (torch ops, used where a block sits on a GPU) writes the same stream as numpy;
    a small chunk makes the chunk boundaries part of the test."""
    from prunequant.export import bitpack

    monkeypatch.setattr(bitpack, "_TORCH_CHUNK", 40)
    g = torch.Generator().manual_seed(bits * 7 + n)
    values = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int64)
    packed = bitpack.pack_bits_torch(values.to(torch.uint8), bits)
    assert torch.equal(packed, pack_bits(values, bits))
    assert torch.equal(bitpack.unpack_bits_torch(packed, bits, n), values)
    with pytest.raises(ValueError):
        bitpack.pack_bits_torch(torch.tensor([2**bits]), bits)


def test_torch_mask_and_trits_give_the_numpy_bytes():
    from prunequant.export import bitpack

    mask = torch.rand(37, 29) > 0.3
    p = bitpack.pack_bits_torch(mask.reshape(-1).to(torch.uint8), 1)
    assert torch.equal(p, pack_mask(mask))
    assert torch.equal(bitpack.unpack_bits_torch(p, 1, mask.numel()).bool().reshape(mask.shape), mask)
    t = torch.randint(0, 3, (1001,))
    pt = bitpack.pack_trits_torch(t)
    assert torch.equal(pt, pack_trits(t))
    assert torch.equal(bitpack.unpack_trits_torch(pt, 1001), t)
