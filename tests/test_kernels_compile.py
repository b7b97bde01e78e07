"""Every Triton kernel launch the runtime makes compiles for a Hopper GPU (sm_90), checked on the CPU:
the launches are captured from the real dispatch code and handed to Triton's compiler with a CUDA target
(PTX and ptxas, no device needed). The interpreter tests check the arithmetic; this checks that the GPU
compiler accepts the same kernels, which the interpreter does not."""
import pytest
import torch

from prunequant.runtime import build_quant_linear
from prunequant.runtime import triton_wmm as tw
from test_runtime import _pruned24, _uniform

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

KERNELS = ("_gemv_kernel", "_gemv_rows_kernel", "_sdot_kernel", "_pdot_kernel", "_wmm_kernel",
           "_dequant_words_kernel", "_dequant_kernel")
PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
       torch.uint8: "*u8", torch.int64: "*i64"}


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


class _Capture:
    """Stands in for a @triton.jit kernel: records each launch instead of running it."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def _compile(fn, args, kwargs):
    from triton.compiler import ASTSource

    names = fn.arg_names
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(names, args), **kwargs)
    sig, const = {}, {}
    for i, n in enumerate(names):
        v = values[n]
        if fn.params[i].is_constexpr:
            sig[n], const[(i,)] = "constexpr", v
        elif torch.is_tensor(v):
            sig[n] = PTR[v.dtype]
        else:
            sig[n] = "i32"
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=_target(), options=opts)


def _launches(monkeypatch, calls) -> list:
    launches = []
    for name in KERNELS:
        monkeypatch.setattr(tw, name, _Capture(getattr(tw, name), launches))
    for call in calls:
        call()
    return launches


def _cases():
    """(x, segments, N, cfg): every kernel kind, grid kind and 2:4 path the tuner can choose."""
    g = torch.Generator().manual_seed(0)
    out = []
    for bits, gs, k in ((4, 128, 512), (8, 0, 256), (3, 64, 192), (4, 48, 192), (2, 64, 512)):
        q = _uniform(torch.randn(64, k, generator=g), bits, gs)
        ql, _ = build_quant_linear([(q, None)], k, 64, None, device="cpu", dtype=torch.bfloat16,
                                   prefer={bits: ["packed"]})
        seg = ql.segs[0]
        cfgs = [{"kind": "gemv", "BN": 16, "BW": 128, "SPLIT": 2, "num_warps": 4, "num_stages": 1, "U3": False},
                {"kind": "gemvr", "BN": 16, "BW": 16, "SPLIT": 1, "num_warps": 4, "num_stages": 2},
                {"kind": "gemvr", "BN": 16, "BW": 32, "SPLIT": 2, "num_warps": 8, "num_stages": 2},
                {"kind": "pdot", "BM": 16, "BN": 32, "BW": 16, "SPLIT": 2, "num_warps": 4, "num_stages": 3},
                tw.launch_config(64, 64)]
        cfgs += tw._sdot_candidates(8, 64, seg)[:1]
        for m, c in [(1, cfgs[0])] + [(8, c) for c in cfgs[1:]]:
            out.append((torch.randn(m, k, generator=g).to(torch.bfloat16), [seg], 64, c))
        out.append(("dequant", seg))
    for bits, gs, k in ((4, 128, 512), (8, 0, 256), (3, 64, 192)):
        q = _pruned24(64, k, bits, gs)
        ql, _ = build_quant_linear([(q, None)], k, 64, None, device="cpu", dtype=torch.bfloat16,
                                   prefer={bits: ["sparse24"]})
        view = ql.segs[0].kernel_view()
        for m, c in ((1, tw.ROWS_DEFAULT), (32, tw._gemv_rows_candidates(32, 64, view)[-1]),
                     (8, tw._gemv_rows_candidates(8, 64, view)[3])):
            out.append((torch.randn(m, k, generator=g).to(torch.bfloat16), [view], 64, c))
        out.append(("dequant24", ql.segs[0]))
    return out


def test_every_launch_compiles_for_sm90(monkeypatch):
    try:
        _compile(*_trivial())
    except Exception as e:  # noqa: BLE001 - no CUDA backend or ptxas in this Triton: nothing to check with
        pytest.skip(f"Triton cannot compile for a CUDA target here: {type(e).__name__}: {str(e)[:120]}")
    calls = []
    for case in _cases():
        if case[0] == "dequant":
            seg = case[1]
            calls.append(lambda seg=seg: tw.dequantize_into(seg, torch.empty(seg.codes.shape[0], seg.k + 3,
                                                                             dtype=torch.bfloat16), 3))
        elif case[0] == "dequant24":
            s24 = case[1]
            calls.append(lambda s24=s24: s24.dequantize(torch.bfloat16, torch.empty(64, s24.k + 3,
                                                                                    dtype=torch.bfloat16), 3))
        else:
            calls.append(lambda case=case: tw.run(*case[:3], None, case[3]))
    launches = _launches(monkeypatch, calls)
    kinds = {fn.fn.__name__ for fn, _, _ in launches}
    assert kinds == {k for k in KERNELS}, kinds
    failed = []
    for fn, args, kwargs in launches:
        try:
            _compile(fn, args, dict(kwargs))
        except Exception as e:  # noqa: BLE001 - report every kernel that does not compile
            failed.append(f"{fn.fn.__name__} {sorted((k, v) for k, v in kwargs.items() if k.isupper())}: "
                          f"{type(e).__name__}: {str(e)[:300]}")
    assert not failed, "\n".join(failed)


@triton.jit
def _copy(X, Y, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    tl.store(Y + r, tl.load(X + r))


def _trivial():
    t = torch.empty(16)
    return _copy, (t, t), {"BLOCK": 16, "num_warps": 1}
