"""Every Triton kernel launch the runtime makes compiles for a Hopper GPU (sm_90), checked on the CPU:
the launches are captured from the real dispatch code and handed to Triton's compiler with a CUDA target
(PTX and ptxas, no device needed). The interpreter tests check the arithmetic; this checks that the GPU
compiler accepts the same kernels, which the interpreter does not."""
import pytest
import torch

from prunequant.runtime import build_quant_linear
from prunequant.runtime import triton_wmm as tw
from prunequant.runtime.convert import segments_of
from prunequant.solvers.mixed import MixSpec, mixed_quantize
from test_runtime import _pruned24, _uniform

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from prunequant.runtime.ptx import KERNELS, captured, compile_launch, loop_mix, resources  # noqa: E402


@triton.jit
def _copy(X, Y, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    tl.store(Y + r, tl.load(X + r))


def _cases():
    """Calls of the runtime's dispatch that launch every kernel kind, grid kind and 2:4 path the tuner can
    choose."""
    g = torch.Generator().manual_seed(0)
    calls = []
    for bits, gs, k in ((4, 128, 512), (8, 0, 256), (3, 64, 192), (4, 48, 192), (2, 64, 512)):
        q = _uniform(torch.randn(64, k, generator=g), bits, gs)
        ql, _ = build_quant_linear([(q, None)], k, 64, None, device="cpu", dtype=torch.bfloat16,
                                   prefer={bits: ["packed"]})  # the triton backend's storage, without a GPU
        seg = ql.segs[0]
        cfgs = [{"kind": "gemv", "BN": 16, "BW": 128, "SPLIT": 2, "num_warps": 4, "num_stages": 1, "U3": False},
                {"kind": "gemvr", "BN": 16, "BW": 16, "SPLIT": 1, "num_warps": 4, "num_stages": 2},
                {"kind": "gemvr", "BN": 16, "BW": 32, "SPLIT": 2, "num_warps": 8, "num_stages": 2},
                {"kind": "pdot", "BM": 16, "BN": 32, "BW": 16, "SPLIT": 2, "num_warps": 4, "num_stages": 3},
                tw.launch_config(64, 64)] + \
            [c for c in tw._sdot_candidates(8, 64, seg) if c["SPLIT"] == 1] + \
            [{"kind": "gemv", "BN": 16, "BW": 64, "SPLIT": 1, "num_warps": 4, "num_stages": 4, "U3": False, "PIPE": 4,
              "EVEN": True},
             {"kind": "gemv", "BN": 16, "BW": 128, "SPLIT": 1, "num_warps": 4, "num_stages": 1, "U3": False, "WG": True}]
        assert not tw._sdot_candidates(8, 64, seg) or any(c.get("PIPE") for c in cfgs)
        for m, c in [(1, cfgs[0]), (1, cfgs[-2]), (1, cfgs[-1])] + [(8, c) for c in cfgs[1:]]:
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            calls.append(lambda x=x, seg=seg, c=c: tw.run(x, [seg], 64, None, c))
        calls.append(lambda seg=seg: tw.dequantize_into(seg, torch.empty(64, seg.k + 3, dtype=torch.bfloat16), 3))
    for bits, gs, k in ((4, 128, 512), (8, 0, 256), (3, 64, 192)):
        q = _pruned24(64, k, bits, gs)
        ql, _ = build_quant_linear([(q, None)], k, 64, None, device="cpu", dtype=torch.bfloat16,
                                   prefer={bits: ["sparse24"]})
        s24 = ql.segs[0]
        view = s24.kernel_view()
        for m, c in ((1, tw.ROWS_DEFAULT), (32, tw._gemv_rows_candidates(32, 64, view)[-1]),
                     (8, tw._gemv_rows_candidates(8, 64, view)[3])):
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            calls.append(lambda x=x, view=view, c=c: tw.run(x, [view], 64, None, c))
        calls.append(lambda s24=s24: s24.dequantize(torch.bfloat16,
                                                    torch.empty(64, s24.k + 3, dtype=torch.bfloat16), 3))
    # a channel-mixed layer (8-bit per channel + 4-bit g128) in one launch, on the GEMV and on tensor cores
    res = mixed_quantize(torch.randn(64, 512, generator=g), torch.rand(512, generator=g) < 0.25,
                         MixSpec(low_bits=4, high_bits=8, group_size=128, allow_prune=False))
    ql, _ = build_quant_linear(segments_of(res.quant), 512, 64, None, device="cpu", dtype=torch.bfloat16,
                               prefer={4: ["packed"], 8: ["packed"]})
    segs = list(ql.segs)
    for m in (1, 8):
        x = torch.randn(m, 512, generator=g).to(torch.bfloat16)
        for c in [c for c in tw._cat_candidates(m, 64, segs) if c["SPLIT"] == 2][::3]:
            calls.append(lambda x=x, c=c: tw.run(x, segs, 64, None, c))
    return calls


def test_every_launch_compiles_for_sm90():
    t = torch.empty(16)
    try:
        resources(compile_launch(_copy, (t, t), {"BLOCK": 16, "num_warps": 1}))
    except Exception as e:  # noqa: BLE001 - no CUDA backend or ptxas in this Triton: nothing to check with
        pytest.skip(f"Triton cannot compile for a CUDA target here: {type(e).__name__}: {str(e)[:120]}")
    with captured() as launches:
        for call in _cases():
            call()
    assert {kernel.fn.__name__ for kernel, _, _ in launches} == set(KERNELS)
    failed, pipelined = [], []
    for kernel, args, kwargs in launches:
        try:
            compiled = compile_launch(kernel, args, kwargs)
            res = resources(compiled)
            assert res["registers"] > 0
            if kernel.fn.__name__ == "_gemv_kernel" and kwargs["PIPE"] and kwargs["ONE_ROW"]:  # async copies
                pipelined.append("cp.async" in compiled.asm["ptx"])
        except Exception as e:  # noqa: BLE001 - report every kernel that does not compile
            failed.append(f"{kernel.fn.__name__} {sorted((k, v) for k, v in kwargs.items() if k.isupper())}: "
                          f"{type(e).__name__}: {str(e)[:300]}")
    assert not failed, "\n".join(failed)
    assert pipelined and all(pipelined), "the pipelined GEMV tiles compiled without asynchronous copies"


def test_loop_mix_reads_the_gemv_k_loop():
    """The static profile: a kernel without a loop has none; the one-row GEMV's k-loop turns codes into floats
    (LOP3), multiplies them (FFMA), and issues at least 3 instructions for each of a word's 8 codes."""
    t = torch.empty(16)
    try:
        flat = loop_mix(compile_launch(_copy, (t, t), {"BLOCK": 16, "num_warps": 1}))
    except Exception as e:  # noqa: BLE001 - no CUDA backend, ptxas or nvdisasm in this Triton
        pytest.skip(f"Triton cannot compile and disassemble for a CUDA target here: {type(e).__name__}")
    assert flat == {"instructions": 0, "ops": {}}
    seg = build_quant_linear([(_uniform(torch.randn(64, 512), 4, 128), None)], 512, 64, None, device="cpu",
                             dtype=torch.bfloat16, prefer={4: ["packed"]})[0].segs[0]
    cfg = {"kind": "gemv", "BN": 16, "BW": 64, "SPLIT": 1, "num_warps": 4, "num_stages": 1, "U3": False}
    with captured() as launches:
        tw.run(torch.randn(1, 512).to(torch.bfloat16), [seg], 64, None, cfg)
    mix = loop_mix(compile_launch(*launches[0]))
    words = 16 * 64 / 128  # per thread and trip
    assert mix["ops"].get("FFMA", 0) >= 8 * words and mix["ops"].get("LOP3", 0) >= 8 * words, mix
    assert mix["instructions"] >= 24 * words, mix
