"""Packed inference linears (prunequant.runtime): packing round-trips exactly on the grid, and every backend
computes the dequantized weight's matmul (the Triton kernel through Triton's CPU interpreter)."""
import types

import pytest
import torch
import torch.nn.functional as F

from prunequant.runtime import build_quant_linear, pack_codes, pack_model, unpack_codes
from prunequant.runtime.convert import segments_of
from prunequant.runtime.qlinear import PackedSegment, TinyGemmSegment
from prunequant.solvers.base import QuantState
from prunequant.solvers.grid import fit_grid, group_index, quantize_grouped
from prunequant.solvers.mixed import MixSpec, mixed_quantize
from interpreter import interpreted


def _uniform(W: torch.Tensor, bits: int, gs: int, sym: bool = False) -> QuantState:
    s, z = fit_grid(W, bits, gs, sym)
    g = group_index(W.shape[1], gs)
    codes = quantize_grouped(W, s, z, 2 ** bits - 1, g)
    return QuantState("uniform", bits, gs, sym, codes.to(torch.uint8), s.float(), z.float(), g)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_codes_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (7, 37), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, -(-37 // (32 // bits)))
    assert torch.equal(unpack_codes(packed, bits, 37), codes)


@pytest.mark.parametrize("bits,gs,sym", [(4, 128, False), (8, 0, True), (2, 16, False), (8, 24, False)])
def test_packed_weight_is_exactly_the_grid(bits, gs, sym):
    W = torch.randn(24, 200, generator=torch.Generator().manual_seed(1))
    q = _uniform(W, bits, gs, sym)
    seg = PackedSegment(q, None, "cpu", use_triton=False)
    assert torch.equal(seg.dequantize(torch.float32), q.dequantize())
    assert torch.equal(seg.dequantize(torch.bfloat16), q.dequantize().to(torch.bfloat16))
    assert seg.scale.dtype == torch.float16 and seg.zero.dtype == torch.uint8  # fp16 grids, integer zeros


def _reference(x, W, bias, dtype):
    return F.linear(x.float(), W.to(dtype).float(), None if bias is None else bias.to(dtype).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend,bits,gs,sym,shape", [
    ("packed", 4, 128, False, (32, 576)),   # ragged last group (576 = 4·128 + 64)
    ("packed", 8, 0, True, (24, 96)),
    ("tinygemm", 4, 128, False, (32, 576)),  # re-expressed as groups of 64, no padding
    ("tinygemm", 4, 32, False, (16, 100)),   # input padded to 128 columns
    ("int8pack", 8, 0, True, (24, 96)),
])
def test_quant_linear_equals_dequantized_matmul(backend, bits, gs, sym, shape, dtype):
    n, k = shape
    g = torch.Generator().manual_seed(n + k)
    q = _uniform(torch.randn(n, k, generator=g), bits, gs, sym)
    bias = torch.randn(n, generator=g)
    ql, rec = build_quant_linear([(q, None)], k, n, bias, device="cpu", dtype=dtype, prefer={bits: [backend]})
    assert rec[0]["backend"] == backend, rec
    assert ql.reconstructable  # every CPU backend can hand the BLAS a dequantized weight for many rows
    x = torch.randn(2, 5, k, generator=g).to(dtype)
    ref = _reference(x, q.dequantize(), bias, dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for small_m in (64, 0):  # the kernel for few rows, then the dequantize-once path
        ql.small_m = small_m
        y = ql(x)
        assert y.shape == (2, 5, n) and y.dtype == dtype
        assert float((y.float() - ref).norm() / ref.norm()) < tol


@pytest.mark.parametrize("n,k", [(64, 128), (80, 64), (208, 96), (16, 256)])  # whole and partial 64-row blocks
def test_tinygemm_cpu_layout_reads_back_the_codes(n, k):
    g = torch.Generator().manual_seed(n * k)
    q = _uniform(torch.randn(n, k, generator=g), 4, 32)
    seg = TinyGemmSegment(q, None, "cpu", torch.float32)
    assert seg.dequantizable
    assert torch.equal(seg._cpu_codes(), q.codes.to(torch.int32))
    torch.testing.assert_close(seg.dequantize(torch.float32), q.dequantize(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backends", [{4: ["packed"], 8: ["packed"]}, {4: ["tinygemm"], 8: ["int8pack", "packed"]}])
def test_channel_mixed_layer(backends):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(48, 320, generator=g)
    high = torch.rand(320, generator=g) < 0.3
    res = mixed_quantize(W, high, MixSpec(low_bits=4, high_bits=8, group_size=64, allow_prune=False))
    ql, rec = build_quant_linear(segments_of(res.quant), 320, 48, None, device="cpu", dtype=torch.float32,
                                 prefer=backends)
    assert [r["bits"] for r in rec] == [8, 4]
    assert rec[1]["backend"] == backends[4][0]
    x = torch.randn(6, 320, generator=g)
    ref = x @ res.weight.float().t()
    for small_m in (64, 0):  # kernels per segment, then the dequantize-once path for large inputs
        ql.small_m = small_m
        assert float((ql(x) - ref).norm() / ref.norm()) < 1e-5


def _pruned24(n: int, k: int, bits: int, gs: int, seed: int = 0) -> QuantState:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g)
    top = W.abs().reshape(n, -1, 4).topk(2, -1).indices
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, top, True).reshape(n, k)
    return _uniform(W * keep, bits, gs)  # pruned weights on the zero point: 0 exactly


@pytest.mark.parametrize("bits,gs,k", [(4, 128, 512), (4, 128, 300), (8, 0, 256), (3, 64, 192), (4, 48, 192)])
def test_sparse24_segment_holds_the_weight_exactly(bits, gs, k):
    from prunequant.runtime.qlinear import module_bytes

    q = _pruned24(40, k, bits, gs)
    ql, rec = build_quant_linear([(q, None)], k, 40, None, device="cpu", dtype=torch.float32,
                                 prefer={bits: ["sparse24"]})
    assert rec[0]["backend"] == "sparse24" and not rec[0]["fallbacks"]
    assert torch.equal(ql.dense_weight(torch.float32), q.dequantize())
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ql(x), x @ q.dequantize().t(), rtol=1e-5, atol=1e-5)
    packed, _ = build_quant_linear([(q, None)], k, 40, None, device="cpu", dtype=torch.float32,
                                   prefer={bits: ["packed"]})
    if (bits, gs) == (4, 128):  # kept codes 2 bits a weight + positions 1 bit, against 4
        assert module_bytes(ql) < 0.8 * module_bytes(packed)


def test_sparse24_refuses_a_dense_weight_with_the_reason():
    q = _uniform(torch.randn(16, 64, generator=torch.Generator().manual_seed(2)), 4, 32)
    ql, rec = build_quant_linear([(q, None)], 64, 16, None, device="cpu", dtype=torch.float32,
                                 prefer={4: ["sparse24", "packed"]})
    assert rec[0]["backend"] == "packed" and "not 2:4 sparse" in rec[0]["fallbacks"][0]


def test_unsupported_shape_falls_back_with_a_reason():
    q = _uniform(torch.randn(20, 64, generator=torch.Generator().manual_seed(4)), 4, 32)
    ql, rec = build_quant_linear([(q, None)], 64, 20, None, device="cpu", dtype=torch.float32,
                                 prefer={4: ["tinygemm"]})
    assert rec[0]["backend"] == "dense"
    assert "multiple of 16" in rec[0]["fallbacks"][0]
    x = torch.randn(3, 64)
    torch.testing.assert_close(ql(x), x @ q.dequantize().t())


def test_pack_model_gives_the_dequantized_models_logits():
    from structural_models import calib, tiny_model

    model = tiny_model(layers=2, hidden=64, inter=96, heads=4, kv=2)
    states = {}
    g = torch.Generator().manual_seed(5)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            W = mod.weight.data.float()
            if name.endswith(("o_proj", "down_proj")):  # channel-mixed 4/8
                high = torch.rand(W.shape[1], generator=g) < 0.25
                res = mixed_quantize(W, high, MixSpec(low_bits=4, high_bits=8, group_size=32, allow_prune=False))
                states[name], new = res.quant, res.weight
            else:
                q = _uniform(W, 4, 32)
                states[name], new = q, q.dequantize()
            mod.weight.data.copy_(new)
    ids = calib(2, 12)
    with torch.no_grad():
        ref = model(ids).logits
        rec = pack_model(model, states)
        out = model(ids).logits
    assert rec["weights_differing_from_state"] == 0 and rec["layers"] == 14
    assert sum(rec["segments"].values()) == 14 + 4
    assert float((out - ref).abs().max()) < 1e-4


# ---- the Triton kernels, through the interpreter (it decides at import, hence a child process) ----------

def _interpreted() -> list[dict]:
    from prunequant.runtime import triton_wmm

    out = []
    g = torch.Generator().manual_seed(0)
    cases = [([(4, 128, False, 300)], torch.float32), ([(8, 0, True, 100)], torch.float16),
             ([(2, 16, False, 64)], torch.float32), ([(8, 24, False, 90)], torch.float32),
             ("mixed", torch.float32), ("mixed", torch.float16)]
    for spec, dtype in cases:
        n = 40
        if spec == "mixed":
            W = torch.randn(n, 300, generator=g)
            res = mixed_quantize(W, torch.rand(300, generator=g) < 0.3,
                                 MixSpec(low_bits=4, high_bits=8, group_size=64, allow_prune=False))
            parts, k, Wq = segments_of(res.quant), 300, res.weight.float()
        else:
            bits, gs, sym, k = spec[0]
            q = _uniform(torch.randn(n, k, generator=g), bits, gs, sym)
            parts, Wq = [(q, None)], q.dequantize()
        bias = torch.randn(n, generator=g)
        ql, rec = build_quant_linear(parts, k, n, bias, device="cpu", dtype=dtype,
                                     prefer={b: ["triton"] for b in (2, 4, 8)})
        errs = {}
        for m, mode in ((3, "reconstruct"), (40, "reconstruct"), (130, "kernel"), (130, "reconstruct")):
            ql.large_m = mode
            x = torch.randn(m, k, generator=g).to(dtype)
            ref = _reference(x, Wq, bias, dtype)
            errs[f"{m}-{mode}"] = float((ql(x).float() - ref).norm() / ref.norm())
        out.append({"case": str(spec), "dtype": str(dtype), "available": triton_wmm.available(torch.empty(0)),
                    "backends": [r["backend"] for r in rec], "fused": ql.fused, "errs": errs})
    return out


def _every_kernel_kind() -> list[dict]:
    """Each kernel kind the tuner can pick (GEMV with and without k-splits and the 3-D unpack, the few-row
    tensor-core kernel with and without splits, the per-position and the plain dot kernel) on small tiles."""
    from prunequant.runtime import triton_wmm as tw

    out = []
    g = torch.Generator().manual_seed(1)
    for bits, gs, sym, k in ((4, 128, False, 512), (8, 0, True, 256), (2, 64, False, 512), (4, 32, False, 256),
                             (3, 64, False, 192), (4, 128, False, 300),  # a ragged group and word
                             (4, 48, False, 192)):  # groups of 6 words: the few-row GEMV's grid per word
        n = 40
        q = _uniform(torch.randn(n, k, generator=g), bits, gs, sym)
        ql, _ = build_quant_linear([(q, None)], k, n, None, device="cpu", dtype=torch.float32,
                                   prefer={bits: ["triton"]})
        seg, per = ql.segs[0], tw.per_word(bits)
        rows = [{"kind": "gemvr", "BN": 16, "BW": bw, "SPLIT": sp, "num_warps": 4, "num_stages": 2}
                for bw in (4, 8, 16) for sp in (1, 2)]
        rows.append({"kind": "gemvr", "BN": 16, "BW": 8, "SPLIT": 2, "MR": 4, "num_warps": 4, "num_stages": 2})
        if gs == 48:
            assert {tw._gemv_grid(seg, c["BW"])[0] for c in rows} == {1}
            for m in (1, 5):
                x = torch.randn(m, k, generator=g)
                ref = x @ q.dequantize().t()
                out += [{"case": f"{bits}b g{gs} m{m}", "cfg": c, "grid": tw._gemv_grid(seg, c["BW"]),
                         "err": float((tw.run(x, [seg], n, None, c).float() - ref).norm() / ref.norm())} for c in rows]
            continue
        cfgs = rows + [{"kind": "gemv", "BN": 8, "BW": 8, "SPLIT": sp, "num_warps": 4, "num_stages": 1, "U3": u3}
                       for sp in (1, 2) for u3 in (False, True) if not (u3 and 32 % bits)]
        cfgs += [{"kind": "gemv", "BN": 8, "BW": 8, "SPLIT": sp, "num_warps": 4, "num_stages": 3, "U3": False,
                  "PIPE": 3, "EVEN": even} for sp in (1, 2) for even in (False, True)]
        cfgs += [{"kind": "gemv", "BN": 8, "BW": 8, "SPLIT": sp, "num_warps": 4, "num_stages": 1, "U3": False,
                  "WG": True} for sp in (1, 2)]
        if bits in (2, 4, 8):
            cfgs += [{"kind": "sdot", "BM": 16, "BN": 16, "BW": bk // per, "SPLIT": sp, "num_warps": 4,
                      "num_stages": 3 if pipe else 2, "PIPE": pipe} for bk in (32, 64) for sp in (1, 2)
                     for pipe in (False, True) if gs <= 0 or gs % bk == 0 or bk % gs == 0]
        cfgs += [{"kind": "pdot", "BM": 16, "BN": 16, "BW": bw, "SPLIT": sp, "num_warps": 4, "num_stages": 2}
                 for bw in (4, 16) for sp in (1, 2)] + [tw.launch_config(8, n)]
        if k == 300:  # more splits than this K holds: a tile tuned on a longer layer of its size bucket
            cfgs += [{"kind": "gemv", "BN": 8, "BW": 8, "SPLIT": 8, "num_warps": 4, "num_stages": 1, "U3": False},
                     {"kind": "pdot", "BM": 16, "BN": 16, "BW": 16, "SPLIT": 8, "num_warps": 4, "num_stages": 2}]
        buf = torch.full((n, k + 7), float("nan"))  # prefill's dequantization, into a wider buffer at column 3
        tw.dequantize_into(seg, buf, 3)
        words = tw._is_pow2(per) and tw._tile_groups(gs, 32 * per) is not None
        out.append({"case": f"{bits}b g{gs} dequant", "cfg": {"kind": "dequant", "words": words},
                    "err": float((buf[:, 3:3 + k] - seg.dequantize_torch(torch.float32)).abs().max())
                    + float(buf[:, :3].isfinite().any() or buf[:, 3 + k:].isfinite().any())})
        for m in (1, 5):
            x = torch.randn(m, k, generator=g)
            ref = x @ q.dequantize().t()
            for c in cfgs:
                y = tw.run(x, [seg], n, None, c)
                out.append({"case": f"{bits}b g{gs} m{m}", "cfg": c, "grid": tw._gemv_grid(seg, c.get("BW", 1)),
                            "err": float((y.float() - ref).norm() / ref.norm())})
    W = torch.randn(40, 256, generator=g)  # a channel-mixed layer: each part alone, its columns read or gathered
    res = mixed_quantize(W, torch.rand(256, generator=g) < 0.3,
                         MixSpec(low_bits=4, high_bits=8, group_size=32, allow_prune=False))
    ql, _ = build_quant_linear(segments_of(res.quant), 256, 40, None, device="cpu", dtype=torch.float32,
                               prefer={b: ["triton"] for b in (4, 8)})
    segs = list(ql.segs)
    assert len(segs) == 2 and all(s.cols is not None for s in segs)
    for m in (1, 5):
        x = torch.randn(m, 256, generator=g)
        ref = x @ res.weight.float().t()
        cat = [c for c in tw._cat_candidates(m, 40, segs) if c["SPLIT"] in (1, 4) and
               (c["BN"], c.get("BW"), c.get("BK")) in ((16, 128, None), (8, 128, None), (16, None, 128), (32, None, 128))]
        bias = torch.randn(40, generator=g)
        for c in ({"kind": "split"}, {"kind": "split", "GATHER": True}, *cat):
            out.append({"case": f"mixed m{m}", "cfg": c, "err": float((tw.run(x, segs, 40, None, c) - ref).norm()
                                                                      / ref.norm())})
            if c["kind"] == "cat":  # the bias added once, by part A's first k-split
                out.append({"case": f"mixed m{m} bias", "cfg": c,
                            "err": float((tw.run(x, segs, 40, bias, c) - ref - bias).norm() / ref.norm())})
        y = sum(tw.run(xs, [v], 40, None, {"kind": "sdot", "BM": 16, "BN": 16, "BW": 32 // tw.per_word(v.bits),
                                           "SPLIT": 1, "num_warps": 4, "num_stages": 2})
                for xs, v in (tw._gathered(x, s) for s in segs))
        out.append({"case": f"mixed m{m}", "cfg": {"kind": "sdot gathered"}, "err": float((y - ref).norm() / ref.norm())})
    for bits, gs, k in ((4, 128, 300), (8, 0, 256), (3, 64, 192)):  # 2:4 codes: grids 2, 3 and 0
        q = _pruned24(24, k, bits, gs)
        ql, _ = build_quant_linear([(q, None)], k, 24, None, device="cpu", dtype=torch.float32,
                                   prefer={bits: ["sparse24"]})
        view = ql.segs[0].kernel_view()
        buf = torch.full((24, k + 7), float("nan"))  # kept values scattered, pruned ones zeroed, nothing beside
        ql.segs[0].dequantize(torch.float32, buf, 3)
        out.append({"case": f"2:4 {bits}b g{gs} dequant", "cfg": {"kind": "dequant", "words": False},
                    "err": float((buf[:, 3:3 + k] - q.dequantize()).abs().max())
                    + float(buf[:, :3].isfinite().any() or buf[:, 3 + k:].isfinite().any())})
        for m in (1, 5, 20):  # 20 rows: blocks of 8 and of 4 rows
            x = torch.randn(m, k, generator=g)
            ref = x @ q.dequantize().t()
            for c in [tw.ROWS_DEFAULT] + tw._gemv_rows_candidates(m, 24, view)[:3] + \
                    [c for c in tw._gemv_rows_candidates(m, 24, view) if c.get("MR") == 4][:1]:
                out.append({"case": f"2:4 {bits}b g{gs} m{m}", "cfg": dict(c, kind="gemvr 2:4"),
                            "grid": tw._gemv_grid(view, c["BW"]),
                            "err": float((tw.run(x, [view], 24, None, c).float() - ref).norm() / ref.norm())})
    return out


def test_every_kernel_kind_in_the_interpreter():
    rows = interpreted("test_runtime", "_every_kernel_kind()")
    kinds = {(r["cfg"]["kind"], r["cfg"].get("SPLIT", 1), r["cfg"].get("U3", False)) for r in rows}
    assert {r["cfg"].get("PIPE") for r in rows if r["cfg"]["kind"] == "sdot"} == {False, True}
    # group scales applied per word (GRID 4), on tiles inside one group and tiles of several groups
    assert {r["grid"][1] > 1 for r in rows if r["cfg"].get("WG") and r["grid"][0] == 2} == {False, True}
    assert {("gemv", 1, False), ("gemv", 2, False), ("gemv", 1, True), ("sdot", 1, False), ("sdot", 2, False),
            ("pdot", 1, False), ("pdot", 2, False), ("dot", 1, False), ("gemvr", 1, False), ("gemvr", 2, False),
            ("gemvr 2:4", 1, False), ("split", 1, False), ("sdot gathered", 1, False)} <= kinds
    assert any(r["cfg"].get("GATHER") for r in rows)
    cat = {(r["cfg"]["inner"], r["cfg"]["SPLIT"], r["cfg"].get("U3", False), r["cfg"].get("PIPE", False),
            r["case"]) for r in rows if r["cfg"]["kind"] == "cat"}  # one launch for both parts of a mixed layer
    assert {("gemv", 1, False, False, "mixed m1"), ("gemv", 4, True, False, "mixed m1"),
            ("sdot", 1, False, False, "mixed m5"),
            ("sdot", 4, False, True, "mixed m5")} <= cat, cat
    assert {r["cfg"]["words"] for r in rows if r["cfg"]["kind"] == "dequant"} == {True, False}
    for kind in ("gemvr", "gemvr 2:4"):  # few-row tiles holding several whole groups, dense and 2:4
        assert any(r["cfg"]["kind"] == kind and r["grid"][0] == 2 and r["grid"][1] > 1 for r in rows), kind
        assert any(r["cfg"]["kind"] == kind and r["cfg"].get("MR") == 4 and int(r["case"].split(" m")[-1]) > 4
                   for r in rows), kind  # several blocks of input rows
    from types import SimpleNamespace

    from prunequant.runtime.triton_wmm import _gemv_grid, _pdot_grid
    grids = {_gemv_grid(SimpleNamespace(bits=b, group_size=g), bw)[0] for b, g, bw in
             ((4, 48, 4), (8, 0, 4), (3, 64, 4), (4, 128, 8))}
    assert grids == {0, 1, 2, 3}  # the few-row GEMV meets every grid above
    grids = {_pdot_grid(SimpleNamespace(bits=b, group_size=g), bw) for b, g, bw in
             ((4, 128, 4), (8, 0, 4), (3, 64, 4), (4, 32, 16))}
    assert grids == {0, 1, 2, 3}  # every way the per-position kernel finds its scales is exercised above
    bad = [r for r in rows if not (r["err"] == 0 if r["cfg"]["kind"] == "dequant" else r["err"] < 1e-5)]
    assert not bad, bad[:5]


def test_triton_kernels_in_the_interpreter():
    rows = interpreted("test_runtime", "_interpreted()")
    for r in rows:
        assert r["available"] and set(r["backends"]) == {"triton"}, r
        if r["case"] == "mixed":
            assert r["fused"], r
        tol = 1e-5 if "float32" in r["dtype"] else 5e-3
        assert max(r["errs"].values()) < tol, r


def test_tuner_times_unsplit_tiles_then_splits_of_the_leaders(monkeypatch):
    """The tuner's two stages on a fake clock: every unsplit tile is timed, k-splits only for the fastest
    unsplit tiles, and the overall fastest candidate whose output matches the default's is kept."""
    from prunequant.runtime import triton_wmm as tw

    gemv = [{"kind": "gemv", "BN": bn, "SPLIT": s} for bn in (4, 8, 16) for s in (1, 2, 4)]
    clock = {("gemv", 4, 1): 9.0, ("gemv", 8, 1): 5.0, ("gemv", 16, 1): 6.0,
             ("gemv", 8, 2): 4.0, ("gemv", 8, 4): 3.0, ("gemv", 16, 2): 2.0, ("gemv", 16, 4): 7.0,
             ("gemv", 4, 2): 0.5, ("gemv", 4, 4): 0.5}  # splits of a slow tile: never timed
    wrong = {("gemv", 16, 2)}  # the fastest timed candidate computes something else: rejected
    timed, current = [], {}

    def key(c):
        return c["kind"], c.get("BN"), c.get("SPLIT", 1)

    def run(x, segments, N, bias, c):
        current["c"] = c
        return torch.full((1, N), 2.0 if key(c) in wrong else 1.0)

    def clocked(fn):
        fn()
        timed.append(key(current["c"]))
        return clock.get(timed[-1], 8.0)

    for name, value in {"_TUNED": {}, "_save_cache": lambda: None, "_LOADED": [True],
                        "_tuning_allowed": lambda x: True, "_gemv_candidates": lambda M, N, s: gemv,
                        "_sdot_candidates": lambda M, N, s: [], "_pdot_candidates": lambda M, N, s: [],
                        "launch_config": lambda M, N: {"kind": "dot"}, "run": run, "_time": clocked,
                        "TUNE_SPLIT_LEADERS": 2}.items():
        monkeypatch.setattr(tw, name, value)
    seg = types.SimpleNamespace(bits=4, group_size=128, k=64, cols=None)
    cfg = tw.tuned(torch.zeros(1, 64), [seg], 16, None)
    assert key(cfg) == ("gemv", 8, 4)
    assert {k for k in timed if k[2] == 1} == {("dot", None, 1), ("gemv", 4, 1), ("gemv", 8, 1), ("gemv", 16, 1)}
    assert {k for k in timed if k[2] != 1} == {("gemv", 8, 2), ("gemv", 8, 4), ("gemv", 16, 4)}  # (16, 2) rejected


def test_layers_of_one_size_bucket_share_one_tuning(monkeypatch):
    """A channel-mixed model gives every layer its own hi/lo column counts: layers within an eighth of a
    power of two of each other share one tuned tile instead of each timing every candidate."""
    from prunequant.runtime import triton_wmm as tw

    x = torch.zeros(1, 8)

    def segs(k_hi):
        cols = torch.zeros(1, dtype=torch.int32)
        return [types.SimpleNamespace(bits=8, group_size=128, k=k_hi, cols=cols),
                types.SimpleNamespace(bits=4, group_size=128, k=4096 - k_hi, cols=cols)]

    assert tw.tune_key(x, segs(1017), 10752, False) == tw.tune_key(x, segs(1020), 10700, False)
    assert tw.tune_key(x, segs(1017), 10752, False) != tw.tune_key(x, segs(1500), 10752, False)
    assert tw.tune_key(x, segs(1017), 4096, False) != tw.tune_key(x, segs(1017), 14336, False)
    assert [tw._size_bucket(n) for n in (4096, 6144, 14336, 28672)] == [4096, 6144, 14336, 28672]
    assert all(n <= tw._size_bucket(n) <= n * 1.25 for n in range(1, 5000))
    tuned_once = []
    monkeypatch.setattr(tw, "_TUNED", {})
    monkeypatch.setattr(tw, "_LOADED", [True])
    monkeypatch.setattr(tw, "_save_cache", lambda: None)
    monkeypatch.setattr(tw, "_tuning_allowed", lambda x: True)
    monkeypatch.setattr(tw, "run", lambda *a: tuned_once.append(1) or torch.ones(1, 16))
    monkeypatch.setattr(tw, "_time", lambda fn: 1.0)
    monkeypatch.setattr(tw, "_dot_candidates", lambda M: [])
    monkeypatch.setattr(tw, "launch_config", lambda M, N: {"kind": "dot"})
    first = tw.tuned(x, segs(1017), 10752, None)
    calls = len(tuned_once)
    assert calls > 0 and tw.tuned(x, segs(1023), 10752, None) == first and len(tuned_once) == calls


def test_untuned_blocks_tuning_and_nests():
    from prunequant.runtime import triton_wmm as tw

    fake_cuda = types.SimpleNamespace(is_cuda=True)
    with tw.untuned():
        with tw.untuned():
            assert not tw._tuning_allowed(fake_cuda)
        assert not tw._tuning_allowed(fake_cuda)
    assert tw._UNTUNED == [0]
